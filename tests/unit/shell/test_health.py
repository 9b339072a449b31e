"""Service health checks: the count that decides (pure), the shell that probes RUNNING service
attempts and tells the core, and the real probes against a real HTTP server and real
commands on the loopback."""

from __future__ import annotations

import http.server
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from stowplan.providers.base import ProviderState, Report
from stowplan.scheduler.events import TasksSubmitted
from stowplan.scheduler.states import TaskState
from stowplan.shell.health import HealthCount, Probes, endpoint, endpoint_host
from stowplan.spec.models import FailureClass, HealthCheck, ServiceSpec

from .conftest import Harness


def check(**kw: object) -> HealthCheck:
    return HealthCheck(**{"http": "/healthz", **kw})  # type: ignore[arg-type]


def test_failures_in_a_row_past_the_start_period_restart() -> None:
    c = HealthCount(check=check(failures=3, start_period=30.0), since=100.0)
    # slow start: failures in the first 30 s do not count
    assert [c.record("refused", t) for t in (110.0, 120.0)] == [False, False]
    assert c.failures == 0
    assert [c.record("refused", t) for t in (130.0, 140.0)] == [False, False]
    assert c.record(None, 150.0) is False and c.failures == 0  # a success resets the row
    assert [c.record("HTTP 500", t) for t in (160.0, 170.0, 180.0)] == [False, False, True]
    assert c.reason() == ("health check failed 3 times in a row (failures = 3): HTTP 500")


def test_a_healthy_probe_ends_the_start_period_early() -> None:
    c = HealthCount(check=check(failures=1, start_period=600.0), since=0.0)
    assert c.record("refused", 5.0) is False  # still starting
    assert c.record(None, 10.0) is False
    assert c.record("refused", 15.0) is True  # it was up once: this one counts


def test_endpoints_are_the_loopback_here_and_the_node_elsewhere() -> None:
    assert endpoint_host("gpu7", here="login1") == "gpu7"
    assert endpoint_host("login1", here="login1") == "127.0.0.1"
    assert endpoint(socket.gethostname(), 8888) == "127.0.0.1:8888"
    assert endpoint("gpu7", None) is None and endpoint(None, 80) is None
    assert endpoint("fe80::1", 80, here="x") == "[fe80::1]:80"


class ScriptedProbe:
    """Answers probes from a list (None: healthy) and records what it was asked."""

    def __init__(self, answers: list[str | None], clock_now: Callable[[], float]) -> None:
        self.answers = answers
        self.asked: list[tuple[float, str, int | None]] = []
        self.clock_now = clock_now

    async def probe(self, check: HealthCheck, host: str, port: int | None) -> str | None:
        self.asked.append((self.clock_now(), host, port))
        return self.answers.pop(0) if self.answers else None


def _running(h: Harness, run_id: str, at: float) -> str:
    key = h.core.key(run_id)
    h.clock.advance(at)
    h.shell.report("p", Report(key=key, state=ProviderState.RUNNING, node="gpu7"))
    h.clock.advance(at)
    assert h.core.state(run_id) is TaskState.RUNNING
    return key


def test_the_shell_probes_a_running_service_and_reports_it_unhealthy() -> None:
    h = Harness()
    probe = ScriptedProbe([None, "HTTP 500", "HTTP 503"], h.clock.now)
    h.shell.health = probe
    h.boot()
    service = ServiceSpec(port=8888, health=check(interval=5.0, failures=2))
    h.shell.feed(TasksSubmitted(tasks=[h.task("svc", service=service), h.task("plain")]))
    key = _running(h, "svc", 1.0)
    _running(h, "plain", 1.0)
    h.clock.advance(14.0)
    # every 5 s from the start, on the node the provider named; the plain run is not probed
    assert probe.asked == [(6.0, "gpu7", 8888), (11.0, "gpu7", 8888)]
    assert h.core.state("svc") is TaskState.RUNNING
    h.clock.advance(16.0)  # the second failure in a row
    assert h.core.state("svc") is TaskState.RETRYING
    assert ("cancel", 16.0, (key,)) in h.prov.calls
    last = [t for _, t in h.records.transitions_seen if t.run_id == "svc"][-1]
    assert last.failure is FailureClass.UNHEALTHY
    assert "health check failed 2 times in a row (failures = 2): HTTP 503" in last.reason
    # no more probes of the stopped attempt, and none before the next one runs
    h.clock.advance(60.0)
    assert len(probe.asked) == 3


def test_probing_stops_when_the_attempt_ends() -> None:
    h = Harness()
    probe = ScriptedProbe([], h.clock.now)
    h.shell.health = probe
    h.boot()
    service = ServiceSpec(port=8888, health=check(interval=5.0))
    h.shell.feed(TasksSubmitted(tasks=[h.task("svc", service=service)]))
    key = _running(h, "svc", 1.0)
    h.clock.advance(7.0)
    assert len(probe.asked) == 1
    h.shell.report("p", Report(key=key, state=ProviderState.FAILED, exit_code=1))
    h.clock.advance(8.0)
    assert h.core.state("svc") is TaskState.RETRYING
    h.clock.advance(10.9)  # the restart is due at 18 s; nothing probes the ended attempt
    assert len(probe.asked) == 1


def test_an_attempt_lost_and_found_running_is_probed_once_per_interval() -> None:
    h = Harness(lease_ttl=10.0)
    probe = ScriptedProbe([], h.clock.now)
    h.shell.health = probe
    h.boot()
    service = ServiceSpec(port=8888, health=check(interval=5.0))
    h.shell.feed(TasksSubmitted(tasks=[h.task("svc", service=service)]))
    key = _running(h, "svc", 1.0)
    h.prov.jobs[key] = ProviderState.RUNNING  # what the reconcile will find
    h.clock.advance(12.0)  # no report for 10 s: LOST, reconciled, RUNNING again at 11 s
    states = h.records.states("svc")
    assert states[-2:] == ["LOST", "RUNNING"] and h.core.state("svc") is TaskState.RUNNING
    h.clock.advance(30.0)
    times = [t for t, _, _ in probe.asked]
    assert len(times) == len(set(times))  # one count per attempt: no probe twice at once
    # each time it is found again its count starts over: found at 11 s (probed at 16 s),
    # lost again at 21 s (no report renews the lease here) and found (probed at 26 s)
    assert times == [6.0, 11.0, 16.0, 26.0]


class BrokenProbe:
    async def probe(self, check: HealthCheck, host: str, port: int | None) -> str | None:
        raise RuntimeError("a bug in the probe")


def test_a_probe_that_raises_is_a_failed_probe_not_the_end_of_the_control_plane() -> None:
    h = Harness()
    h.shell.health = BrokenProbe()
    h.boot()
    service = ServiceSpec(port=1, health=check(interval=1.0, failures=2))
    h.shell.feed(TasksSubmitted(tasks=[h.task("svc", service=service)]))
    _running(h, "svc", 1.0)
    h.clock.advance(3.0)
    assert h.core.state("svc") is TaskState.RETRYING and not h.shell.halted
    last = [t for _, t in h.records.transitions_seen if t.run_id == "svc"][-1]
    assert last.reason.endswith("the probe failed: RuntimeError: a bug in the probe")


# ---- the real probes ----------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


@pytest.mark.anyio
async def test_http_probes_a_real_server(server: int) -> None:
    probes = Probes()
    assert await probes.probe(check(), "127.0.0.1", server) is None
    why = await probes.probe(check(http="/broken"), "127.0.0.1", server)
    assert why == f"GET http://127.0.0.1:{server}/broken: HTTP 500"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    why = await probes.probe(check(), "127.0.0.1", closed)
    assert why is not None and why.startswith(f"GET http://127.0.0.1:{closed}/healthz: Connect")


@pytest.mark.anyio
async def test_command_probes_run_here_with_the_endpoint_in_their_environment() -> None:
    probes = Probes()
    ok = [sys.executable, "-c", "import os,sys; e=os.environ; "
          "sys.exit(0 if (e['STOWPLAN_SERVICE_HOST'], e['STOWPLAN_SERVICE_PORT']) == "
          "('10.0.0.7', '8888') else 1)"]  # fmt: skip
    assert await probes.probe(HealthCheck(command=ok), "10.0.0.7", 8888) is None
    bad = [sys.executable, "-c", "print('db down'); raise SystemExit(3)"]
    why = await probes.probe(HealthCheck(command=bad), "127.0.0.1", 1)
    assert why == f"{sys.executable} exited with status 3: db down"
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    why = await probes.probe(HealthCheck(command=slow, timeout=0.5), "127.0.0.1", 1)
    assert why == f"{sys.executable}: no exit within 0.5s"
    why = await probes.probe(HealthCheck(command=["/nonexistent/probe"]), "127.0.0.1", 1)
    assert why is not None and why.startswith("/nonexistent/probe: cannot run")
