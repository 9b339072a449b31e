"""Hostile task input on the real cluster: quotes, $( ), backticks, newlines and #SBATCH lines
in arguments and environment values reach the task verbatim, and nothing extra executes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stowplan.provenance.store import RunStore
from tests.slurmcluster.cluster import SlurmCluster

from .conftest import finish, runs_of, stowplan, write_project

pytestmark = pytest.mark.integration

HOSTILE = [
    "it's",
    'say "hi"',
    "$(touch PWNED/subst)",
    "`touch PWNED/backtick`",
    "a\nb",
    "x\n#SBATCH --partition=gpu\ntouch PWNED/newline",
    "; touch PWNED/semicolon",
    "$HOME",
    "\\back\\slash",
]


def test_hostile_arguments_and_environment_are_inert(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    hostile = [h.replace("PWNED", str(pwned)) for h in HOSTILE]
    argv = [
        "python3",
        "-c",
        # no braces: they are placeholders in commands
        "import json, os, sys; json.dump(dict(argv=sys.argv[1:], "
        "env=[os.environ['H1'], os.environ['H2']]), open('out.json', 'w'))",
        *hostile,
    ]
    experiment = f"""
[experiment]
name = "hostile"

[[tasks]]
name = "hostile"
command = {json.dumps(argv)}
env = {{ H1 = {json.dumps(hostile[2])}, H2 = {json.dumps(hostile[5])} }}
outputs = ["out.json"]
resources = {{ cpus = 1, memory = "64MiB" }}
"""
    f = write_project(tmp_path, slurm_cluster.facts, experiment)
    rc, _out, err = finish(stowplan(tmp_path, "run", str(f)), 180)
    assert rc == 0, err[-3000:]
    (run,) = runs_of(tmp_path)
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (art,) = store.artifacts_for([run.run_id])[run.run_id]
    seen = json.loads(Path(art.path).read_text())
    assert seen == {"argv": hostile, "env": [hostile[2], hostile[5]]}
    assert os.listdir(pwned) == [], "a hostile string executed"
    (script,) = (tmp_path / "remote" / "jobs").glob("*/job.sh")
    assert "--partition=gpu" not in [
        line for line in script.read_text().splitlines() if line.startswith("#SBATCH")
    ]
