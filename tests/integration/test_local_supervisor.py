"""The local supervisor killed mid-sweep under ``stowplan run``: every trial exactly once.

Every trial appends its run id to a marker file when it finishes, and each keeper logs its
start of an attempt directory (``launches``); both are counted after the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from stowplan.provenance.store import RunStore
from stowplan.providers.local.supervisor import SUPERVISOR_DIR

from .conftest import launches_per_key, sweep_project, wait_for

pytestmark = pytest.mark.integration

N = 24


def _runs(db: Path) -> list[tuple[str, str, int]]:
    if not db.exists():
        return []
    with RunStore(db) as store:
        return [
            (r.run_id, r.state, r.attempts)
            for e in store.list_experiments()
            for r in store.runs_for_experiment(e.id)
        ]


def _supervisor(state_dir: Path) -> psutil.Process | None:
    try:
        rec = json.loads((state_dir / "runs" / SUPERVISOR_DIR / "pid").read_text())
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["create_time"]) < 0.05 and proc.status() != "zombie":
            return proc
    except (FileNotFoundError, ValueError, psutil.Error):
        pass
    return None


def test_supervisor_killed_mid_sweep_runs_every_trial_exactly_once(tmp_path: Path) -> None:
    f = sweep_project(tmp_path, N, sleep=0.3)
    state_dir = tmp_path / ".stowplan"
    db = state_dir / "stowplan.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.Popen(
        [sys.executable, "-m", "stowplan.cli.main", "run", str(f)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def succeeded() -> int:
            return sum(1 for _, state, _ in _runs(db) if state == "SUCCEEDED")

        wait_for(lambda: succeeded() >= 3, 120, "3 successes before the kill")
        first = _supervisor(state_dir)
        assert first is not None, "no supervisor runs the sweep"
        assert succeeded() < N, "the sweep finished before the supervisor was killed"
        first.send_signal(signal.SIGKILL)
        _, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
    assert run.returncode == 0, err[-3000:]
    runs = _runs(db)
    assert len(runs) == N
    assert {state for _, state, _ in runs} == {"SUCCEEDED"}
    # nothing was lost and retried: every run succeeded at its first attempt
    assert {attempts for _, _, attempts in runs} == {1}, runs
    executed = Counter((tmp_path / "executions.log").read_text().split())
    assert executed == Counter({run_id: 1 for run_id, _, _ in runs})
    launches = launches_per_key(state_dir)
    assert len(launches) == N and set(launches.values()) == {1}, launches
    # a new supervisor took over the starts
    second = _supervisor(state_dir)
    assert second is None or second.pid != first.pid
