"""Crashes mid-sweep: nothing lost, nothing run twice.

Every trial appends its run id to a marker file when it finishes, and the local provider's
launcher logs each start of an attempt directory; both are counted after the sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stowplan.actors.control import PLACEMENT, QUEUE, STORE, ControlPlane
from stowplan.provenance.store import RunStore
from stowplan.session import prepare, record, submissions

from .conftest import launches_per_key, sweep_project, wait_for

pytestmark = pytest.mark.integration

N = 16


def _succeeded(db: Path) -> int:
    if not db.exists():
        return 0
    with RunStore(db) as store:
        return sum(
            1
            for e in store.list_experiments()
            for r in store.runs_for_experiment(e.id)
            if r.state == "SUCCEEDED"
        )


def _check_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
    assert len(runs) == N
    assert {r.state for r in runs} == {"SUCCEEDED"}
    executed = Counter((tmp_path / "executions.log").read_text().split())
    assert set(executed) == {r.run_id for r in runs}
    assert set(executed.values()) == {1}, executed
    launches = launches_per_key(tmp_path / ".stowplan")
    assert launches and set(launches.values()) == {1}, launches


@pytest.mark.parametrize("actor", [QUEUE, STORE, PLACEMENT, "provider:local"])
def test_actor_killed_mid_sweep_resumes_at_once(
    ray_session: None, tmp_path: Path, actor: str
) -> None:
    """Ray restarts a killed actor; it must take up its duties at once (a provider watching
    its live attempts again, the queue reconciling), not when something next calls it, which
    left finished trials RUNNING until their 900 s lease ran out."""
    import ray

    f = sweep_project(tmp_path, N, sleep=0.6)
    prepared = prepare(f)
    with RunStore(prepared.store_path) as store:
        runs = record(prepared, store)
    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        poll_max=0.5,
    )
    plane.start()
    try:
        plane.submit(submissions(prepared, {r.run_id for r in runs}), [])
        ids = [r.run_id for r in runs]

        def succeeded() -> int:
            n: int = plane.progress(ids)["counts"].get("SUCCEEDED", 0)
            return n

        wait_for(lambda: succeeded() >= 3, 60, "3 successes")
        before = succeeded()
        assert before < N, "the sweep finished before the kill"
        ray.kill(plane.actors[actor], no_restart=False)
        # a killed local driver's successor starts the attempts it had queued but not started
        # (their claimer is dead), instead of calling them LOST after QUEUED_GRACE_S
        try:
            wait_for(lambda: succeeded() > before, 30, f"a run to end after killing {actor}")
        except AssertionError as e:
            raise AssertionError(f"{e}: {plane.progress(ids)}") from None
        wait_for(lambda: succeeded() == N, 120, "all to finish")
        info = plane.progress(ids)
        assert info["fatal"] is None, info
        assert info["boots"] == 1  # the queue booted once (again, if it was the one killed)
    finally:
        plane.stop()
    _check_exactly_once(tmp_path)
    with RunStore(prepared.store_path) as store:
        tries = {r.run_id: r.attempts for r in store.get_runs(ids).values()}
    # nothing was lost and retried: every run succeeded at its first attempt
    assert set(tries.values()) == {1}, tries


def test_driver_killed_mid_sweep_and_restarted(tmp_path: Path) -> None:
    f = sweep_project(tmp_path, N, sleep=0.6)
    db = tmp_path / ".stowplan" / "stowplan.db"
    cmd = [sys.executable, "-m", "stowplan.cli.main", "run", str(f)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: _succeeded(db) >= 3, 120, "3 successes before the kill")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert _succeeded(db) < N, "the sweep finished before the driver was killed"
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr
    _check_exactly_once(tmp_path)
