"""The service SIGKILLed mid-sweep and started again on the same store: a real ``stowplan
serve`` (uvicorn, a private local Ray with the control plane, SQLite, the local provider).

Every trial prints half its log, waits for a go-file the test creates only once the service
is back, prints the rest and appends its run id to a marker file. After the restart: every
run succeeded at its first attempt, each attempt was launched once (the local launcher's own
log) and recorded once, each trial's marker line is there once; and a ``stowplan logs -f
--server`` that was following a run when the service died reconnected by itself (with
``Last-Event-ID``) and wrote the run's whole log exactly once."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.errors import SpecError
from stowplan.provenance.store import RunStore
from stowplan.scheduler.states import FINAL
from stowplan.service.api import SubmitRequest
from stowplan.service.client import RESUME_FOR_S, SUBMIT_FOR_S, follow_logs, submit
from tests.integration.conftest import launches_per_key
from tests.integration.service import conftest
from tests.integration.service.conftest import Service, auth, free_port, lab, poll

pytestmark = pytest.mark.integration

N = 6
HALF = 5
TRIAL_PY = f"""import os, sys, time
from pathlib import Path
i = int(sys.argv[1])
for k in range({HALF}):
    print(f"trial {{i}} line {{k}}", flush=True)
go = Path(os.environ["GO"])
while not go.exists():
    time.sleep(0.05)
for k in range({HALF}, {2 * HALF}):
    print(f"trial {{i}} line {{k}}", flush=True)
with open(os.environ["MARKER"], "a") as f:
    f.write(os.environ["STOWPLAN_RUN_ID"] + "\\n")
""".encode()


def sweep(marker: Path, go: Path) -> str:
    return f"""
[experiment]
name = "sturdy"

[[tasks]]
name = "trial"
command = ["python", "{{experiment_dir}}/trial.py", "{{i}}"]
env = {{ MARKER = "{marker}", GO = "{go}" }}
resources = {{ cpus = 1, memory = "64MiB" }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {N - 1} }} }} }}
"""


def expected_log(i: int) -> bytes:
    return b"".join(f"trial {i} line {k}\n".encode() for k in range(2 * HALF))


def restart(root: Path, port: int, monkeypatch: pytest.MonkeyPatch) -> Service:
    """A new ``stowplan serve`` of the same project on the same port."""
    monkeypatch.setattr(conftest, "free_port", lambda: port)
    return Service(root, read_only=False)


@pytest.mark.timeout(900)
def test_service_killed_mid_sweep_loses_nothing_runs_nothing_twice_and_logs_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    tokens = lab(lab_dir)
    marker, go = tmp_path / "executions.log", tmp_path / "go"
    first = Service(lab_dir, read_only=False)
    second: Service | None = None
    follower: subprocess.Popen[bytes] | None = None
    try:
        first.wait_healthy(240)
        with httpx.Client(base_url=first.url, timeout=120, headers=auth(tokens["mona"])) as c:
            r = c.post(
                "/api/v1/experiments",
                json={
                    "request_id": "sturdy-00000001",
                    "filename": "sweep.toml",
                    "experiment": sweep(marker, go),
                    "files": {"trial.py": base64.b64encode(TRIAL_PY).decode()},
                },
            )
            assert r.status_code == 201, r.text
            run_ids: list[str] = r.json()["run_ids"]
            assert len(run_ids) == N

            def a_run_started() -> str | None:
                for rid in run_ids:
                    if c.get(f"/api/v1/runs/{rid}").json()["attempts"]:
                        return rid
                return None

            followed = poll("a trial to start", 180, a_run_started)

        # a user follows the run's log with the CLI, in a process of its own
        out = tmp_path / "follow.out"
        env = {
            **os.environ,
            "STOWPLAN_TOKEN": tokens["tara"],  # the team admin reads a teammate's run
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
        env.pop("STOWPLAN_SERVER", None)
        with out.open("wb") as sink, (tmp_path / "follow.err").open("wb") as err:
            follower = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stowplan.cli.main",
                    "logs",
                    followed,
                    "-f",
                    "--server",
                    first.url,
                ],
                cwd=tmp_path,
                env=env,
                stdout=sink,
                stderr=err,
            )
        poll(
            "the follower to get the first half",
            120,
            lambda: True if out.read_bytes().count(b"\n") >= HALF else None,
        )

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        assert not marker.exists(), "a trial ended before the kill: it was not mid-sweep"
        assert follower.poll() is None, (
            f"logs -f gave up when the service died:\n{(tmp_path / 'follow.err').read_text()}"
        )

        second = restart(lab_dir, first.port, monkeypatch)
        second.wait_healthy(240)
        # the follower comes back by itself (its access-log line); only then may the trials
        # go on, so it resumes a live run
        poll(
            "logs -f to reconnect",
            60,
            lambda: True if f"/api/v1/runs/{followed}/logs" in second.text() else None,
        )
        go.touch()
        rc = follower.wait(120)
        err_text = (tmp_path / "follow.err").read_text()
        assert rc == 0, err_text
        got = out.read_bytes()
        i = int(got.split()[1])
        assert got == expected_log(i), got

        with httpx.Client(base_url=second.url, timeout=60, headers=auth(tokens["mona"])) as c:

            def all_final() -> list[dict[str, Any]] | None:
                rows: list[dict[str, Any]] = c.get("/api/v1/experiments/sturdy/status").json()
                return rows if all(row["state"] in FINAL for row in rows) else None

            rows = poll("every trial to end", 240, all_final)
        assert sorted(row["run_id"] for row in rows) == sorted(run_ids)
        assert {row["state"] for row in rows} == {"SUCCEEDED"}, rows
    finally:
        go.touch()  # a failure above must not leave trials waiting for it
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
        if second is not None:
            assert second.stop() == 0, second.text()

    # nothing lost, nothing run twice
    with RunStore(lab_dir / ".stowplan" / "stowplan.db") as store:
        runs = store.get_runs(run_ids)
        attempts = store.attempts_for(run_ids)
    assert {r.state for r in runs.values()} == {"SUCCEEDED"}
    assert {rid: r.attempts for rid, r in runs.items()} == dict.fromkeys(run_ids, 1)
    assert {rid: [(a.attempt, a.exit_code) for a in attempts[rid]] for rid in run_ids} == (
        {rid: [(1, 0)] for rid in run_ids}
    )
    assert Counter(marker.read_text().split()) == Counter(run_ids)
    launches = launches_per_key(lab_dir / ".stowplan")
    assert len(launches) == N and set(launches.values()) == {1}, launches


# -- the follower's reconnects, against scripted answers on the loopback ---------------------


class Scripted:
    """A listening socket on the loopback that answers its first connections with the raw
    HTTP answers given, one each, then closes: later connections are refused. ``heads``
    keeps the head of each request."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.heads: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self._sock:
            for answer in self.answers:
                conn, _ = self._sock.accept()
                with conn:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += conn.recv(4096)
                    self.heads.append(head)
                    conn.sendall(answer)

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()


def sse(*events: tuple[str, int, bytes]) -> bytes:
    body = b"".join(
        f"id: {i}\r\nevent: {name}\r\ndata: {base64.b64encode(data).decode()}\r\n\r\n".encode()
        for name, i, data in events
    )
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        + b": keep-alive\r\n\r\n"
        + body
    )


BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


def test_logs_follow_resumes_after_a_cut_and_a_gateway_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOWPLAN_TOKEN", "t")
    server = Scripted(
        [
            sse(("chunk", 6, b"hello\n")),  # then cut: no end event
            BAD_GATEWAY,  # a proxy while the service restarts
            sse(("chunk", 10, b"bye\n"), ("end", 10, b"")),
        ]
    )
    got: list[bytes] = []
    t = FakeTime()
    follow_logs(server.url, "abcdef12", got.append, follow=True, sleep=t.sleep, clock=t.clock)
    server.join()
    assert b"".join(got) == b"hello\nbye\n"
    assert t.slept == [0.5, 1.0]  # backing off
    assert [b"last-event-id: 6" in h.lower() for h in server.heads] == [False, True, True]


def test_logs_follow_gives_up_when_the_service_stays_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOWPLAN_TOKEN", "t")
    server = Scripted([sse(("chunk", 6, b"hello\n"))])
    t = FakeTime()
    with pytest.raises(SpecError) as e:
        follow_logs(server.url, "abcdef12", ignore, follow=True, sleep=t.sleep, clock=t.clock)
    server.join()
    assert "any more" in e.value.message and "up to byte 6" in e.value.message, e.value.message
    assert t.slept[:5] == [0.5, 1.0, 2.0, 4.0, 5.0] and set(t.slept[4:]) == {5.0}
    assert RESUME_FOR_S < sum(t.slept) <= RESUME_FOR_S + 5.0  # bounded


def test_logs_follow_of_a_service_never_reached_fails_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOWPLAN_TOKEN", "t")
    t = FakeTime()
    with pytest.raises(SpecError, match="cannot reach the service"):
        follow_logs(
            f"http://127.0.0.1:{free_port()}", "abcdef12", ignore, sleep=t.sleep, clock=t.clock
        )
    assert t.slept == []


def ignore(_: bytes) -> None:
    pass


# -- a submission's retries, against scripted answers on the loopback -------------------------

CUT = b""  # the connection closes without an answer


def created(request_id: str) -> bytes:
    body = (
        f'{{"request_id":"{request_id}","experiment_id":"e1","name":"x","runs":1,'
        '"submitted":1,"reused":0}'
    ).encode()
    return (
        b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def request(rid: str = "req-0001") -> SubmitRequest:
    return SubmitRequest(request_id=rid, filename="e.toml", experiment="x")


def test_a_submission_is_sent_again_with_its_request_id_through_cuts_and_gateways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOWPLAN_TOKEN", "t")
    server = Scripted([CUT, BAD_GATEWAY, created("req-0001")])
    t = FakeTime()
    got = submit(server.url, request(), sleep=t.sleep, clock=t.clock)
    server.join()
    assert got.experiment_id == "e1" and t.slept == [0.5, 1.0]
    assert len(server.heads) == 3  # the same request each time: the request id makes it safe


def test_a_submission_gives_up_when_the_service_stays_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOWPLAN_TOKEN", "t")
    server = Scripted([CUT])  # reached once, then nothing listens
    t = FakeTime()
    with pytest.raises(SpecError, match="cannot reach the service"):
        submit(server.url, request(), sleep=t.sleep, clock=t.clock)
    server.join()
    assert SUBMIT_FOR_S < sum(t.slept) <= SUBMIT_FOR_S + 5.0  # bounded, not a try count


def test_a_submission_to_a_service_never_reached_fails_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOWPLAN_TOKEN", "t")
    t = FakeTime()
    with pytest.raises(SpecError, match="cannot reach the service"):
        submit(f"http://127.0.0.1:{free_port()}", request(), sleep=t.sleep, clock=t.clock)
    assert t.slept == []
