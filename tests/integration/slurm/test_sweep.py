"""A 40-trial sweep through ``stowplan run`` on the real cluster, as job arrays on cpu and gpu."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore
from tests.slurmcluster.cluster import SlurmCluster

from .conftest import finish, our_elements, runs_of, stowplan, write_project

pytestmark = pytest.mark.integration

SWEEP = """
[experiment]
name = "slurm-sweep"

[[tasks]]
name = "cpu"
script = 'printf "%s %s %s\\n" "{i}" "$SLURM_JOB_PARTITION" "$SLURM_ARRAY_JOB_ID" > out.txt'
outputs = ["out.txt"]
resources = { cpus = 1, memory = "64MiB" }
sweep = { parameters = { i = { type = "int", low = 0, high = 19 } } }

[[tasks]]
name = "gpu"
script = 'printf "%s %s\\n" "{i}" "${{CUDA_VISIBLE_DEVICES:-none}}" > out.txt'
outputs = ["out.txt"]
resources = { cpus = 1, memory = "64MiB", gpus = 1, gpu_type = "fake" }
sweep = { parameters = { i = { type = "int", low = 0, high = 19 } } }
"""


def test_dry_run_prints_the_sbatch_script(
    slurm_cluster: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert slurm_cluster.facts is not None
    f = write_project(tmp_path, slurm_cluster.facts, SWEEP)
    os.chdir(tmp_path)
    assert main(["run", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#!/bin/bash" in out and "#SBATCH --array=0" in out
    assert "#SBATCH --gres=gpu:fake:1" in out
    assert not (tmp_path / "remote").exists()  # nothing submitted, nothing written there


def test_forty_trials_as_arrays_on_cpu_and_gpu(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    assert slurm_cluster.facts is not None
    f = write_project(tmp_path, slurm_cluster.facts, SWEEP)
    rc, out, err = finish(stowplan(tmp_path, "run", str(f), "--json"), 240)
    assert rc == 0, err[-3000:]
    status = json.loads(out)
    assert status["counts"] == {"SUCCEEDED": 40}
    runs = runs_of(tmp_path)
    assert len(runs) == 40 and all(r.attempts == 1 for r in runs)
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        arts = store.artifacts_for([r.run_id for r in runs])
        attempts = store.attempts_for([r.run_id for r in runs])
    for r in runs:
        (a,) = arts[r.run_id]
        i, *rest = Path(a.path).read_text().split()
        assert int(i) == r.params["i"]
        if r.task == "gpu":
            assert rest[0] in ("0", "1"), f"GPU trial saw CUDA_VISIBLE_DEVICES={rest[0]}"
        (att,) = attempts[r.run_id]
        assert att.job_id and "_" in att.job_id and att.node in ("n1", "n2", "n3", "n4")
        assert att.exit_code == 0
    elements = our_elements(slurm_cluster, tmp_path / "remote", 40)
    # every trial ran as exactly one array element, and arrays were really used
    assert sum(len(v) for v in elements.values()) == 40
    assert len(elements) < 40 and max(len(v) for v in elements.values()) > 1
    partitions = {
        line.split()[1]
        for r in runs
        if r.task == "cpu"
        for line in [Path(arts[r.run_id][0].path).read_text()]
    }
    assert partitions <= {"cpu", "gpu"}
