"""With the settings a new user gets, a sweep larger than the cluster goes to Slurm as ONE job
array at once (the partition is offered what its queue absorbs, ``providers/slurm/capacity.py``)
and is followed by few remote commands (``providers/slurm/cadence.py``), counted by the login
node's sshd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurmcluster.cluster import SlurmCluster

from .conftest import finish, our_elements, runs_of, stowplan, write_project

pytestmark = pytest.mark.integration

TRIALS = 120  # well over the cluster's 32 CPUs: with only its CPUs offered, four arrays or more

SWEEP = f"""
[experiment]
name = "slurm-throughput"

[[tasks]]
name = "noop"
command = ["true"]
resources = {{ cpus = 1, memory = "16MiB" }}
sweep = {{ parameters = {{ i = {{ type = "int", low = 0, high = {TRIALS - 1} }} }} }}
"""


def test_a_default_sweep_goes_as_one_array_with_few_remote_commands(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    f = write_project(tmp_path, slurm_cluster.facts, SWEEP)  # no queue_factor
    before, _ = slurm_cluster.ssh_sessions()
    rc, out, err = finish(stowplan(tmp_path, "run", str(f), "--json"), 300)
    assert rc == 0, err[-3000:]
    commands = slurm_cluster.ssh_sessions()[0] - before
    assert json.loads(out)["counts"] == {"SUCCEEDED": TRIALS}
    runs = runs_of(tmp_path)
    assert len(runs) == TRIALS and all(r.attempts == 1 for r in runs)
    elements = our_elements(slurm_cluster, tmp_path / "remote", TRIALS)
    assert len(elements) == 1, f"{len(elements)} arrays: {sorted(elements)}"
    assert len(next(iter(elements.values()))) == TRIALS
    # discovery, the submit and the watch's polls; a doubling backoff to 30 s, or one array per
    # 32 trials, costs more. Counted on the server, and by the driver itself.
    assert commands <= 15, f"{commands} remote commands for {TRIALS} trials"
    (counted,) = (tmp_path / ".stowplan").glob("**/slurm/cluster/remote.json")
    assert 2 <= json.loads(counted.read_text())["commands"] <= commands
    # each element ran its own lines from the array's elements/ directory (no awk over the
    # whole script) and left its end record, which the watch read instead of sacct
    (job_dir,) = (tmp_path / "remote" / "jobs").iterdir()
    records = sorted((job_dir / "elements").glob("*.end"))
    assert len(records) == TRIALS
    assert {r.read_text().split("|")[0] for r in records} == {"0"}
    assert "exec /bin/bash" not in (job_dir / "submit.sh").read_text()
