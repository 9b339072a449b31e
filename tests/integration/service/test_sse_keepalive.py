"""A quiet ``logs -f`` stream is kept alive: while a live run prints nothing, the service
sends a ``: keep-alive`` comment every ``keepalive_s`` seconds, so a proxy or a client with a
read timeout shorter than the quiet spell does not cut it; the comments carry no data.

A real ``stowplan serve`` runs the trial; a second app over the same store, with a small
``keepalive_s``, is served by uvicorn in a thread on the loopback and followed over HTTP."""

from __future__ import annotations

import base64
import itertools
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.provenance.store import RunStore
from stowplan.service.client import _events
from stowplan.service.people import SERVICE_DB, People
from tests.integration.service.conftest import Service, auth, free_port, lab, poll

pytestmark = pytest.mark.integration

EVERY = 0.5
"""keepalive_s under test"""
READ_TIMEOUT = 2.0
"""the client's read timeout: what a proxy's idle timeout would cut"""
QUIET = 8
"""keep-alives to see before the trial goes on: 4 s of silence, twice the read timeout"""

QUIET_PY = b"""import os, time
from pathlib import Path
print("hello", flush=True)
while not Path(os.environ["GO"]).exists():
    time.sleep(0.05)
print("bye", flush=True)
"""


def quiet_experiment(go: Path) -> str:
    return f"""
[experiment]
name = "quiet"

[[tasks]]
name = "wait"
command = ["python", "{{experiment_dir}}/quiet.py"]
env = {{ GO = "{go}" }}
resources = {{ cpus = 1, memory = "64MiB" }}
"""


class InProcess:
    """The service's app over ``root``'s store, with no control plane, served by uvicorn in
    a thread."""

    def __init__(self, root: Path, *, keepalive_s: float) -> None:
        import uvicorn

        from stowplan.session import project_paths
        from stowplan.spec.loader import load_project

        project = load_project(search_from=root)
        state_dir, store_path = project_paths(project)
        self.store = RunStore(store_path)
        self.people = People(state_dir / SERVICE_DB)
        with warnings.catch_warnings():
            # NOTE: some handlers still declare parameters in a style Litestar 2.25 calls
            # deprecated; they warn once, when the app is imported and built, and are not
            # what this test is about
            warnings.simplefilter("ignore", DeprecationWarning)
            from stowplan.service.app import ServiceState, create_app

            app = create_app(
                ServiceState(
                    project=project,
                    state_dir=state_dir,
                    store=self.store,
                    people=self.people,
                    keepalive_s=keepalive_s,
                )
            )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        poll("the in-process app to start", 30, lambda: True if self.server.started else None)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.people.close()
        self.store.close()


@pytest.fixture
def quiet_run(tmp_path: Path) -> Iterator[tuple[Path, str, str, Path]]:
    """The lab's directory, a token, a live run that printed "hello" and waits for its
    go-file, and that file."""
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    tokens = lab(lab_dir)
    go = tmp_path / "go"
    svc = Service(lab_dir, read_only=False)
    try:
        svc.wait_healthy(240)
        with httpx.Client(base_url=svc.url, timeout=120, headers=auth(tokens["mona"])) as c:
            r = c.post(
                "/api/v1/experiments",
                json={
                    "request_id": "quiet-00000001",
                    "filename": "quiet.toml",
                    "experiment": quiet_experiment(go),
                    "files": {"quiet.py": base64.b64encode(QUIET_PY).decode()},
                },
            )
            assert r.status_code == 201, r.text
            (run_id,) = r.json()["run_ids"]
            poll(
                "the run to start",
                180,
                lambda: c.get(f"/api/v1/runs/{run_id}").json()["attempts"] or None,
            )
        yield lab_dir, tokens["mona"], run_id, go
    finally:
        go.touch()  # the trial ends; the service stops
        assert svc.stop() == 0, svc.text()


@pytest.mark.timeout(600)
def test_a_quiet_log_stream_gets_keepalive_comments_and_survives_a_short_read_timeout(
    quiet_run: tuple[Path, str, str, Path],
) -> None:
    lab_dir, token, run_id, go = quiet_run
    app = InProcess(lab_dir, keepalive_s=EVERY)
    lines: list[tuple[float, str]] = []
    try:
        with (
            httpx.Client(
                base_url=app.url,
                timeout=httpx.Timeout(30, read=READ_TIMEOUT),
                headers=auth(token),
            ) as c,
            c.stream("GET", f"/api/v1/runs/{run_id}/logs", params={"follow": "true"}) as resp,
        ):
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                lines.append((time.monotonic(), line))
                if sum(1 for _, x in lines if x == ": keep-alive") == QUIET:
                    go.touch()
    finally:
        app.close()
    got: list[Any] = list(_events(x for _, x in lines))
    assert [e.event for e in got] == ["chunk", "chunk", "end"], lines
    assert b"".join(base64.b64decode(e.data) for e in got[:2]) == b"hello\nbye\n"
    # the keep-alives come while the run is quiet, one per interval, and carry nothing
    at = [t for t, x in lines if x == ": keep-alive"]
    assert len(at) >= QUIET
    gaps = [b - a for a, b in itertools.pairwise(at)][: QUIET - 1]
    assert all(EVERY * 0.8 <= g <= READ_TIMEOUT for g in gaps), gaps
    comments = [x for _, x in lines if x.startswith(":")]
    assert set(comments) == {": keep-alive"}
    hello = next(i for i, (_, x) in enumerate(lines) if x.startswith("event: chunk"))
    assert hello < next(i for i, (_, x) in enumerate(lines) if x == ": keep-alive")
