"""A service task end to end: a real HTTP server run by `stowplan run` on the local provider
(real Ray control plane), restarted when it is killed from outside and when its health check
fails, its endpoint shown by `stowplan status`, and stopped for good by `stowplan cancel`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stowplan.provenance.records import RunRecord, TransitionRecord
from stowplan.provenance.store import RunStore
from stowplan.service import views

from .conftest import wait_for

pytestmark = pytest.mark.integration

SERVER = """
import http.server, os, sys
from pathlib import Path

SICK = Path(sys.argv[2])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        bad = self.path == "/healthz" and SICK.exists()
        self.send_response(500 if bad else 200)
        self.end_headers()
        self.wfile.write(b"sick" if bad else f"ok {os.getpid()}".encode())

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stowplan.cli.main", *args]


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, int]:
    port = _free_port()
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "s"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / ".stowplanignore").write_text("sick\n")
    (tmp_path / "svc.toml").write_text(
        f"""
[experiment]
name = "svc"

[[tasks]]
name = "web"
command = ["{sys.executable}", "{{experiment_dir}}/server.py", "{port}",
           "{{experiment_dir}}/sick"]
resources = {{ cpus = 1, memory = "128MiB" }}

[tasks.service]
port = {port}
backoff = "1s"
backoff_cap = "2s"

[tasks.service.health]
http = "/healthz"
interval = "1s"
timeout = "2s"
failures = 2
"""
    )
    return tmp_path, port


def _run(db: Path) -> RunRecord | None:
    if not db.exists():
        return None
    with RunStore(db) as store:
        runs = store.runs_by_name("svc")
    return runs[0] if runs else None


def _events(db: Path, run_id: str) -> list[TransitionRecord]:
    with RunStore(db) as store:
        return store.events_for(run_id)


def _answer(port: int) -> str | None:
    """What the service answers on / (its pid), or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return str(r.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def _servers(tmp: Path) -> list[int]:
    """Pids of our server processes still alive (not zombies), found by command line."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if any(str(tmp / "server.py") == a for a in cmd) and p.info["status"] != "zombie":
            out.append(p.info["pid"])
    return out


def _detail(tmp: Path, run_id: str) -> views.RunDetail:
    with RunStore(tmp / ".stowplan" / "stowplan.db") as store:
        return views.run_detail(store, run_id, providers={}, state_dir=tmp / ".stowplan")


def _run_page(run: RunRecord, detail: views.RunDetail) -> str:
    """The dashboard's run page template, rendered with this run's detail."""
    import jinja2

    templates = Path(views.__file__).parent / "templates"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates), autoescape=True)
    env.globals["when"] = lambda t: "" if t is None else str(t)
    return env.get_template("run.html").render(
        who=None,
        title="run",
        prefix="/ui",
        run=run,
        d=detail,
        live={"state": run.state, "attempts": run.attempts, "why": ""},
        lineage="",
        provenance=[],
        upstream=[],
        downstream=[],
    )


def _running_attempt(db: Path, n: int) -> bool:
    r = _run(db)
    return r is not None and r.state == "RUNNING" and r.attempts == n


def test_a_service_is_restarted_health_checked_shown_and_cancelled(
    project: tuple[Path, int],
) -> None:
    tmp, port = project
    db = tmp / ".stowplan" / "stowplan.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.Popen(
        _cli("run", "svc.toml"),
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _running_attempt(db, 1), 120, "the service's first attempt to run")
        wait_for(lambda: _answer(port) is not None, 30, "the service to answer")
        first = _answer(port)
        rec = _run(db)
        assert rec is not None
        run_id = rec.run_id

        # the endpoint is in `status`, as text and as JSON
        shown = subprocess.run(
            _cli("status", "svc"), cwd=tmp, env=env, capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        assert f"service RUNNING at 127.0.0.1:{port}" in shown.stdout
        js = subprocess.run(
            _cli("status", "svc", "--json"),
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        (row,) = json.loads(js.stdout)
        assert row["service"]["endpoint"] == f"127.0.0.1:{port}"
        assert row["service"]["health"] == "GET /healthz"
        # and on the dashboard's run page
        detail = _detail(tmp, run_id)
        assert detail.service == views.ServiceView(
            port=port, endpoint=f"127.0.0.1:{port}", restarts=0, health="GET /healthz"
        )
        page = _run_page(rec, detail)
        assert f'at <a href="http://127.0.0.1:{port}/"><code>127.0.0.1:{port}</code></a>' in page

        # killed from outside: a new attempt starts and answers, from another process
        (pid,) = _servers(tmp)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _running_attempt(db, 2), 60, "the killed service to restart")
        wait_for(lambda: _answer(port) not in (None, first), 30, "the new attempt to answer")
        moves = _events(db, run_id)
        restart = [e for e in moves if e.to_state == "RETRYING"]
        assert len(restart) == 1 and restart[0].attempt == 1
        assert restart[0].reason.startswith("service restart 1 in 1s")
        assert pid not in _servers(tmp)

        # the health check fails: the attempt is stopped and restarted
        (tmp / "sick").write_text("")
        wait_for(
            lambda: any(e.failure == "unhealthy" for e in _events(db, run_id)),
            60,
            "the health check to give up",
        )
        (tmp / "sick").unlink()
        wait_for(lambda: _running_attempt(db, 3), 60, "the unhealthy service to restart")
        unhealthy = [e for e in _events(db, run_id) if e.failure == "unhealthy"]
        assert len(unhealthy) == 1 and unhealthy[0].attempt == 2
        assert "health check failed 2 times in a row" in unhealthy[0].reason
        assert "HTTP 500" in unhealthy[0].reason
        wait_for(lambda: len(_servers(tmp)) == 1, 30, "one server process, the new one")
        wait_for(lambda: _answer(port) is not None, 30, "the third attempt to answer")

        # cancel stops it for good: the run ends, nothing is left running
        done = subprocess.run(
            _cli("cancel", "svc", "--why", "done serving"),
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert run.wait(120) == 1
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
            for pid in _servers(tmp):  # a failed test leaves no service behind
                os.kill(pid, signal.SIGKILL)
        assert run.stderr is not None
        run.stderr.close()
    rec = _run(db)
    assert rec is not None and rec.state == "CANCELLED" and rec.reason == "done serving"
    detail = _detail(tmp, rec.run_id)
    assert detail.service is not None and detail.service.endpoint is None
    assert detail.service.restarts == 2
    assert "not answering now (port" in _run_page(rec, detail)
    wait_for(lambda: not _servers(tmp), 30, "the server processes to be gone")
    assert _answer(port) is None
