"""Which Ray `stowplan run` uses: a private local one unless `--address` says otherwise.

A `ray_current_cluster` file left in Ray's temp dir by an earlier `ray start` (and
`RAY_ADDRESS`) once made `run` join that dead cluster and retry "Failed to connect to GCS"
until killed. Each test gives Ray its own short temp dir (`RAY_TMPDIR`), so the stale file
never touches the Ray of the other tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowplan.provenance.store import RunStore

pytestmark = pytest.mark.integration

EXPERIMENT = """
[experiment]
name = "hello"
[[tasks]]
name = "t"
command = ["true"]
resources = { cpus = 1, memory = "64MiB" }
"""


def _dead_address() -> str:
    """host:port where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # NOTE: short, because Ray's unix sockets live under it and their paths are limited
    d = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "r"\n[providers.local]\nkind = "local"\ncpus = 1\n'
    )
    (tmp_path / "hello.toml").write_text(EXPERIMENT)
    return tmp_path


def _run(project: Path, ray_tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(ray_tmp), **env)
    return subprocess.run(
        [sys.executable, "-m", "stowplan.cli.main", "run", "hello.toml", *args],
        cwd=project,
        env=full,
        capture_output=True,
        text=True,
        timeout=150,
    )


def test_a_stale_cluster_file_and_ray_address_are_ignored(project: Path, ray_tmp: Path) -> None:
    dead = _dead_address()
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead + "\n")
    done = _run(project, ray_tmp, RAY_ADDRESS=dead)
    assert done.returncode == 0, done.stderr
    assert "1 succeeded" in done.stdout, done.stdout


def test_an_unreachable_address_fails_fast(project: Path, ray_tmp: Path) -> None:
    dead = _dead_address()
    started = time.monotonic()
    done = _run(project, ray_tmp, "--address", dead)
    assert time.monotonic() - started < 60
    assert done.returncode == 2, done.stderr
    assert f"--address {dead}: no Ray cluster answers there" in done.stderr, done.stderr
    assert "fix:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    db = project / ".stowplan" / "stowplan.db"
    if db.exists():
        with RunStore(db) as store:
            assert store.list_experiments() == []


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None])
def test_an_address_where_something_else_listens_fails_fast(
    project: Path, ray_tmp: Path, reply: bytes | None
) -> None:
    """Ray's client waited without end on such a port: the probe asks in HTTP/2 first."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if reply is None:
                held.append(conn)  # accepts and never answers
            else:
                conn.sendall(reply)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        started = time.monotonic()
        done = _run(project, ray_tmp, "--address", f"127.0.0.1:{port}")
        assert time.monotonic() - started < 60
    finally:
        server.close()
        for c in held:
            c.close()
    assert done.returncode == 2, done.stderr
    expect = "it is not a Ray cluster's GCS" if reply else "no Ray cluster answers there"
    assert expect in done.stderr and "Traceback" not in done.stderr, done.stderr
