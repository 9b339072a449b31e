"""`stowplan cancel` from another process: through a running control plane, and offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from stowplan.provenance.store import RunStore

from .conftest import wait_for

pytestmark = pytest.mark.integration

EXPERIMENT = """
[experiment]
name = "slow"
[[tasks]]
name = "nap"
command = ["sleep", "300"]
resources = { cpus = 1, memory = "64MiB" }
sweep = { parameters = { i = [0, 1, 2, 3] } }
"""


def _cli(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stowplan.cli.main", *args]


def _states(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    with RunStore(db) as store:
        out: dict[str, int] = {}
        for r in store.runs_by_name("slow"):
            out[r.state] = out.get(r.state, 0) + 1
        return out


def _sleepers(tmp: Path) -> list[int]:
    """Pids of our `sleep 300` tasks that are still alive (from the launchers' records)."""
    import psutil

    alive = []
    for rec in (tmp / ".stowplan" / "runs").glob("*/*/launcher.json"):
        pid = json.loads(rec.read_text()).get("child_pid")
        if not pid:
            continue
        try:
            proc = psutil.Process(pid)
            # a killed sleep is a zombie until its launcher reaps it: it is gone
            if proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline()[:2] == ["sleep", "300"]:
                alive.append(pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return alive


def _actor_pids(tmp: Path) -> list[int]:
    """Pids of the control plane's actor processes, as they recorded themselves."""
    from stowplan.actors.runtime import WORKERS_DIR, WorkerNote

    return [
        msgspec.json.decode(p.read_bytes(), type=WorkerNote).pid
        for p in (tmp / ".stowplan" / WORKERS_DIR).glob("*.json")
    ]


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "c"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (tmp_path / "slow.toml").write_text(EXPERIMENT)
    return tmp_path


def test_cancel_reaches_the_running_control_plane(project: Path) -> None:
    db = project / ".stowplan" / "stowplan.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.Popen(
        _cli(project, "run", "slow.toml"),
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _states(db).get("RUNNING", 0) == 2, 120, "two running naps")
        wait_for(lambda: len(_sleepers(project)) == 2, 30, "two sleep processes")
        done = subprocess.run(
            _cli(project, "cancel", "slow", "--why", "enough"),
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "through the running control plane" in done.stdout
        assert run.wait(120) == 1  # the run ends by itself, with cancelled runs
    finally:
        if run.poll() is None:
            run.kill()
    assert _states(db) == {"CANCELLED": 4}
    wait_for(lambda: not _sleepers(project), 30, "the naps to be killed")
    with RunStore(db) as store:
        reasons = {r.reason for r in store.runs_by_name("slow")}
    assert reasons == {"enough"}


def test_cancel_offline_after_the_driver_died(project: Path) -> None:
    db = project / ".stowplan" / "stowplan.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.Popen(
        _cli(project, "run", "slow.toml"),
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(_sleepers(project)) == 2, 120, "two sleep processes")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(30)
    # the tasks outlive the driver; cancel finds no control plane and acts directly
    assert len(_sleepers(project)) == 2
    actors = _actor_pids(project)
    assert len(actors) == 4, actors  # store, placement, provider:local, queue
    done = subprocess.run(
        _cli(project, "cancel", "slow"),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "cancelled 4 runs" in done.stdout
    # the dead session's actors are stopped before cancel acts: none can launch a nap after
    assert [p for p in actors if not _gone(p)] == []
    launched = set((project / ".stowplan" / "runs").glob("*/*"))
    wait_for(lambda: not _sleepers(project), 30, "the naps to be killed")
    assert _states(db) == {"CANCELLED": 4}
    assert set((project / ".stowplan" / "runs").glob("*/*")) == launched
