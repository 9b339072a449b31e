"""A service task submitted to the shared-lab service: a real ``stowplan serve`` (uvicorn on
the loopback, a private local Ray with the control plane, SQLite, the local provider) runs a
small HTTP server as a ``[tasks.service]`` task. ``stowplan status --server`` shows where it
answers, and it does; killed from outside, it is restarted (another process answers); a
``stowplan cancel --server`` stops it for good: the run ends CANCELLED and no server process
is left behind."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from stowplan.cli.main import main
from stowplan.scheduler.states import FINAL
from tests.integration.service.conftest import Service, auth, free_port, lab, poll

pytestmark = pytest.mark.integration

SERVER_PY = b"""import http.server, os, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(f"ok {os.getpid()}".encode())

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def web(port: int) -> str:
    return f"""
[experiment]
name = "web"

[[tasks]]
name = "serve"
command = ["python", "{{experiment_dir}}/server.py", "{port}"]
resources = {{ cpus = 1, memory = "128MiB" }}

[tasks.service]
port = {port}
backoff = "1s"
backoff_cap = "2s"

[tasks.service.health]
http = "/healthz"
interval = "1s"
timeout = "2s"
failures = 3
"""


def answer(port: int) -> int | None:
    """The pid of the process that answers on ``port``, or None while none does."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    assert text.startswith("ok "), text
    return int(text.removeprefix("ok "))


def servers(root: Path) -> list[int]:
    """Pids of the processes still alive (not zombies) that run our server under ``root``."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        ours = any(str(root) in a and "/server.py" in a for a in cmd)  # or a shell around it
        if ours and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p.info["pid"])
    return out


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, dict[str, str]]]:
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    tokens = lab(lab_dir)
    svc = Service(lab_dir, read_only=False)
    try:
        svc.wait_healthy(240)
        yield svc, tokens
    finally:
        code = svc.stop()
        # the service leaves running jobs alone when it stops: a failed test must not leave
        # its HTTP server behind
        for pid in servers(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert code == 0, svc.text()


def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: str, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("STOWPLAN_TOKEN", token)
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.timeout(900)
def test_a_service_task_through_the_service_is_shown_restarted_and_cancelled(
    service: tuple[Service, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    svc, tokens = service
    mona = tokens["mona"]
    port = free_port()
    monkeypatch.chdir(tmp_path)  # the user's side: no stowplan.toml, no store
    monkeypatch.delenv("STOWPLAN_SERVER", raising=False)

    with httpx.Client(base_url=svc.url, timeout=120, headers=auth(mona)) as c:
        r = c.post(
            "/api/v1/experiments",
            json={
                "request_id": "web-00000001",
                "filename": "web.toml",
                "experiment": web(port),
                "files": {"server.py": base64.b64encode(SERVER_PY).decode()},
            },
        )
        assert r.status_code == 201, r.text
        (run_id,) = r.json()["run_ids"]

    def status() -> dict[str, Any]:
        rc, out, err = cli(
            capsys, monkeypatch, mona, "status", "web", "--json", "--server", svc.url
        )
        assert rc == 0, err
        (row,) = json.loads(out)
        assert row["run_id"] == run_id
        return dict(row)

    def shown_running(restarts: int) -> dict[str, Any] | None:
        row = status()
        svc_view = row["service"]
        assert svc_view is not None, row  # a service task's run has its service part
        if row["state"] == "RUNNING" and svc_view["endpoint"] and svc_view["restarts"] == restarts:
            return row
        assert row["state"] not in FINAL, row  # a service ends only when cancelled
        return None

    # (1) the endpoint is in `status --server`, as JSON and as text, and the server answers there
    row = poll("the service to run", 240, lambda: shown_running(0))
    assert row["service"] == {
        "port": port,
        "endpoint": f"127.0.0.1:{port}",
        "restarts": 0,
        "health": "GET /healthz",
    }
    first = poll("the service to answer on its endpoint", 60, lambda: answer(port))
    assert first in servers(tmp_path), (first, servers(tmp_path))
    rc, out, err = cli(capsys, monkeypatch, mona, "status", "web", "--server", svc.url)
    assert rc == 0, err
    assert f"service RUNNING at 127.0.0.1:{port}" in out, out

    # (2) killed from outside: a new attempt starts and another process answers
    os.kill(first, signal.SIGKILL)
    second = poll(
        "another process to answer after the kill",
        120,
        lambda: pid if (pid := answer(port)) not in (None, first) else None,
    )
    assert first not in servers(tmp_path)
    row = poll("status to show the restart", 60, lambda: shown_running(1))
    assert row["service"]["endpoint"] == f"127.0.0.1:{port}"
    assert row["attempts"] == 2, row
    rc, out, err = cli(capsys, monkeypatch, mona, "status", "web", "--server", svc.url)
    assert rc == 0 and f"service RUNNING at 127.0.0.1:{port} (1 restart)" in out, (out, err)
    assert servers(tmp_path) == [second]

    # (3) cancel through the service stops it for good: the run ends, nothing is left running
    rc, out, err = cli(
        capsys, monkeypatch, mona, "cancel", "web", "--why", "done serving", "--server", svc.url
    )
    assert rc == 0 and "cancelled 1 run through the service" in out, (out, err)
    row = poll(
        "the service's run to be CANCELLED",
        120,
        lambda: r if (r := status())["state"] == "CANCELLED" else None,
    )
    assert row["reason"] == "done serving", row
    assert row["service"]["endpoint"] is None, row
    poll("the server processes to be gone", 60, lambda: True if not servers(tmp_path) else None)
    poll("nothing to answer on the port", 30, lambda: True if answer(port) is None else None)
    # asked again after the polls above (no fixed wait, so this does not prove that no restart
    # could ever come): still CANCELLED, no third attempt recorded, nothing left to cancel
    row = status()
    assert row["state"] == "CANCELLED" and row["attempts"] == 2, row
    rc, out, err = cli(capsys, monkeypatch, mona, "cancel", "web", "--server", svc.url)
    assert rc == 0 and "nothing to cancel" in out, (out, err)
    assert not servers(tmp_path) and answer(port) is None
