"""Restarts mid-sweep on the real cluster: slurmctld, and stowplan's own control plane.

Each trial appends its run id to a marker file; afterwards every trial ran exactly once and
Slurm had exactly one array element per trial (nothing resubmitted).
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.slurmcluster.cluster import SlurmCluster

from ..conftest import wait_for
from .conftest import finish, our_elements, runs_of, stowplan, write_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 12


def sweep(marker: Path, sleep: float) -> str:
    return f"""
[experiment]
name = "slurm-restarts"

[[tasks]]
name = "work"
script = 'sleep {sleep}; echo "$STOWPLAN_RUN_ID" >> "$MARKER"'
env = {{ MARKER = "{marker}" }}
resources = {{ cpus = 1, memory = "32MiB" }}
sweep = {{ parameters = {{ i = {{ type = "int", low = 0, high = {N - 1} }} }} }}
"""


def running(cluster: SlurmCluster, workdir: Path) -> int:
    names = {p.name for p in (workdir / "jobs").glob("*")}
    out = cluster.slurm("squeue", "-h", "-r", "-t", "R", "-o", "%j", check=False)
    return sum(1 for name in out.split() if name in names)


def check_exactly_once(cluster: SlurmCluster, tmp_path: Path) -> None:
    runs = runs_of(tmp_path)
    assert len(runs) == N and {r.state for r in runs} == {"SUCCEEDED"}
    assert all(r.attempts == 1 for r in runs), [r.attempts for r in runs]
    executed = Counter((tmp_path / "executions.log").read_text().split())
    assert set(executed) == {r.run_id for r in runs}
    assert set(executed.values()) == {1}, executed
    elements = our_elements(cluster, tmp_path / "remote", N)
    assert sum(len(v) for v in elements.values()) == N, elements


def test_slurmctld_restarted_mid_sweep(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    assert slurm_cluster.facts is not None
    marker = tmp_path / "executions.log"
    f = write_project(tmp_path, slurm_cluster.facts, sweep(marker, 4))
    proc = stowplan(tmp_path, "run", str(f))
    try:
        wait_for(lambda: running(slurm_cluster, tmp_path / "remote") >= 2, 120, "jobs to run")
        slurm_cluster.restart_slurmctld()
        rc, _out, err = finish(proc, 240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    check_exactly_once(slurm_cluster, tmp_path)


def test_control_plane_killed_and_restarted(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    assert slurm_cluster.facts is not None
    marker = tmp_path / "executions.log"
    f = write_project(tmp_path, slurm_cluster.facts, sweep(marker, 8))
    first = stowplan(tmp_path, "run", str(f))
    try:
        wait_for(lambda: running(slurm_cluster, tmp_path / "remote") >= 2, 120, "jobs to run")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert not marker.exists() or len(marker.read_text().split()) < N
    rc, _out, err = finish(stowplan(tmp_path, "run", str(f)), 240)
    assert rc == 0, err[-3000:]
    check_exactly_once(slurm_cluster, tmp_path)
