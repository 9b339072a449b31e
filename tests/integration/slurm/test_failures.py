"""Failures on the real cluster are classified: a user error (exit 3, not retried), a job
cancelled from outside stowplan, and a job killed at its time limit. Hostile input rides along
in the same run (Slurm's time limit makes it last over a minute anyway): quotes, $( ),
backticks, newlines and #SBATCH lines in arguments and environment reach the task verbatim,
and nothing extra executes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stowplan.provenance.store import RunStore
from tests.slurmcluster.cluster import SlurmCluster

from ..conftest import wait_for
from .conftest import finish, our_elements, runs_of, stowplan, write_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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


def hostile_task(pwned: Path) -> tuple[str, list[str]]:
    """A task whose argv and env are hostile; it records what it received in out.json."""
    hostile = [h.replace("PWNED", str(pwned)) for h in HOSTILE]
    argv = [
        "python3",
        "-c",
        # no braces: they are placeholders in commands
        "import json, os, sys; json.dump(dict(argv=sys.argv[1:], "
        "env=[os.environ['H1'], os.environ['H2']]), open('out.json', 'w'))",
        *hostile,
    ]
    toml = f"""
[[tasks]]
name = "hostile"
command = {json.dumps(argv)}
env = {{ H1 = {json.dumps(hostile[2])}, H2 = {json.dumps(hostile[5])} }}
outputs = ["out.json"]
resources = {{ cpus = 1, memory = "64MiB" }}
"""
    return toml, hostile


FAILING = """
[experiment]
name = "slurm-failures"

[[tasks]]
name = "user-error"
command = ["sh", "-c", "echo doomed >&2; exit 3"]
resources = { cpus = 1, memory = "64MiB" }

[[tasks]]
name = "victim"
command = ["sleep", "600"]
resources = { cpus = 1, memory = "64MiB" }

[[tasks]]
name = "overtime"
command = ["sleep", "600"]
timeout = "20s"
resources = { cpus = 1, memory = "64MiB" }
"""


def test_exit_3_cancel_time_limit_and_hostile_input(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    hostile_toml, hostile = hostile_task(pwned)
    f = write_project(tmp_path, slurm_cluster.facts, FAILING + hostile_toml)
    proc = stowplan(tmp_path, "run", str(f))
    try:

        def victim_job() -> str | None:
            for r in runs_of(tmp_path):
                if r.task == "victim" and r.state == "RUNNING":
                    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
                        (att,) = store.attempts_for([r.run_id])[r.run_id]
                    return att.job_id
            return None

        wait_for(lambda: victim_job() is not None, 90, "the victim to run")
        job = victim_job()
        assert job is not None
        slurm_cluster.slurm("scancel", job)
        # Slurm's time limits are whole minutes, checked every 30 s: up to ~2 minutes
        rc, _out, err = finish(proc, 240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 1, err[-3000:]
    by_task = {r.task: r for r in runs_of(tmp_path)}
    user, victim, overtime = by_task["user-error"], by_task["victim"], by_task["overtime"]
    # the default policy retries infrastructure failures only: a user error is not retried
    assert (user.state, user.failure) == ("FAILED", "user_error")
    assert user.attempts == 1
    assert (victim.state, victim.failure) == ("CANCELLED", "cancelled")
    assert victim.attempts == 1
    assert (overtime.state, overtime.failure) == ("FAILED", "timeout")
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        atts = store.attempts_for([user.run_id, overtime.run_id])
    assert all(a.exit_code == 3 for a in atts[user.run_id])
    assert "TIMEOUT" in atts[overtime.run_id][0].message
    assert sum(len(v) for v in our_elements(slurm_cluster, tmp_path / "remote", 3).values()) >= 3
    # the failed attempt's stderr, read back over SFTP by `stowplan logs`
    rc, out, err = finish(stowplan(tmp_path, "logs", user.run_id[:12], "--stderr"), 60)
    assert rc == 0, err
    assert out == "doomed\n"

    # hostile input: verbatim to the task, nothing else ran, no option was added
    run = by_task["hostile"]
    assert run.state == "SUCCEEDED", run.reason
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (art,) = store.artifacts_for([run.run_id])[run.run_id]
    seen = json.loads(Path(art.path).read_text())
    assert seen == {"argv": hostile, "env": [hostile[2], hostile[5]]}
    assert os.listdir(pwned) == [], "a hostile string executed"
    for script in (tmp_path / "remote" / "jobs").glob("*/job.sh"):
        options = [ln for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
        assert sum(o.startswith("#SBATCH --partition=") for o in options) == 1, options
