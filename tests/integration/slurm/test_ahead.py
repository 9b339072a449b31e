"""``stowplan run`` submits the first placement itself while Ray starts (``cli/ahead.py``), and
the control plane takes it over as after a restart: every trial runs exactly once, whatever
became of that submit (it went out, its answer was lost, it never went out), and Ctrl-C
before the control plane is up cancels what went out.

``stowplan run`` runs as its own process, with the CLI's own driver patched where a case needs
it (the provider actor, in Ray's worker processes, runs the real driver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stowplan.provenance.store import RunStore
from tests.slurmcluster.cluster import SlurmCluster

from ..conftest import wait_for
from .conftest import our_elements, runs_of, write_project

pytestmark = pytest.mark.integration

TRIALS = 40

# a command of its own per case: trials of equal tasks have equal keys, hence equal array
# names, and accounting (``our_elements``) would count another case's elements with these
SWEEP = f"""
[experiment]
name = "ahead-{{case}}"
[[tasks]]
name = "noop"
command = ["true", "{{case}}"]
resources = {{{{ cpus = 1, memory = "16MiB" }}}}
sweep = {{{{ parameters = {{{{ i = {{{{ type = "int", low = 0, high = {TRIALS - 1} }}}} }}}} }}}}
"""

# ``stowplan ARGV`` with the case's patches, the phases' [label, began, ended] (epoch seconds)
# written as JSON to the first argument when the process exits
HARNESS = r"""
import asyncio, atexit, functools, json, os, sys, threading, time
out, case = sys.argv.pop(1), sys.argv.pop(1)
marks = []
import stowplan.cli.main as cli
import stowplan.cli.ahead as ahead
import stowplan.actors.control as control
from stowplan.errors import ProviderError
from stowplan.providers.slurm.driver import SlurmProvider

submitted = threading.Event()
real_ahead = ahead.submit_ahead
async def submit_ahead(*a, **k):
    t = time.time()
    try:
        return await real_ahead(*a, **k)
    finally:
        marks.append(["submit_ahead", t, time.time()])
        submitted.set()
ahead.submit_ahead = submit_ahead

real_start = control.ControlPlane.start
def start(self):
    marks.append(["plane_start", time.time(), time.time()])
    return real_start(self)
control.ControlPlane.start = start

real_submit = SlurmProvider.submit
async def submit(self, requests):
    if case == "unsent":  # failed before sbatch ran
        raise ProviderError("injected: unreachable", provider=self.name, retryable=True)
    reports = await real_submit(self, requests)
    if case == "lost":  # sbatch ran, its answer did not come back
        raise ProviderError("injected: answer lost", provider=self.name, retryable=True)
    return reports
SlurmProvider.submit = submit

if case == "interrupt":  # Ctrl-C while Ray starts, once the submit ahead went out
    real_prestart = control.prestart
    def prestart(**k):
        started = real_prestart(**k)
        assert submitted.wait(120)
        raise KeyboardInterrupt
    control.prestart = prestart

atexit.register(lambda: open(out, "w").write(json.dumps(marks)))
sys.exit(cli.main(sys.argv[1:]))
"""


def run_case(project: Path, experiment: Path, case: str) -> tuple[int, str, dict[str, list[float]]]:
    trace = project / f"trace-{case}.log"  # ignored (``*.log``): not part of the code's identity
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, str(trace), case, "run", str(experiment), "--json"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    phases = {label: [began, ended] for label, began, ended in json.loads(trace.read_text())}
    return proc.returncode, proc.stderr, phases


def _submissions(project: Path) -> list[str]:
    with RunStore(project / ".stowplan" / "stowplan.db") as store:
        return [e.action for e in store.ledger() if e.action in ("submit", "retry")]


@pytest.mark.parametrize("case", ["sent", "lost", "unsent"])
def test_each_trial_runs_once_whatever_became_of_the_submit_ahead(
    slurm_cluster: SlurmCluster, tmp_path: Path, case: str
) -> None:
    assert slurm_cluster.facts is not None
    f = write_project(tmp_path, slurm_cluster.facts, SWEEP.format(case=case))
    rc, err, phases = run_case(tmp_path, f, case)
    assert rc == 0, err[-3000:]
    # the submit ahead ended before the control plane began to start
    assert phases["submit_ahead"][1] <= phases["plane_start"][0], phases
    runs = runs_of(tmp_path)
    assert sorted(r.state for r in runs) == ["SUCCEEDED"] * TRIALS
    assert all(r.attempts == 1 for r in runs), sorted(r.attempts for r in runs)
    # one array, each element once: the control plane found the array the CLI submitted, or
    # (never sent) submitted the same keys itself
    elements = our_elements(slurm_cluster, tmp_path / "remote", TRIALS)
    assert len(elements) == 1, f"{len(elements)} arrays: {sorted(elements)}"
    (ids,) = elements.values()
    assert len(ids) == len(set(ids)) == TRIALS, ids
    assert _submissions(tmp_path) == ["submit"]  # recorded once, ahead


CANCELLABLE = """
[experiment]
name = "ahead-cancel"
[[tasks]]
name = "wait"
command = ["sh", "-c", "while [ ! -e {go} ]; do sleep 0.2; done"]
resources = {{ cpus = 1, memory = "16MiB" }}
sweep = {{ parameters = {{ i = {{ type = "int", low = 0, high = 2 }} }} }}
"""


def test_ctrl_c_while_ray_starts_cancels_what_went_out_ahead(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    go = tmp_path / "remote" / "go"  # the cluster's workdir: not part of the code's identity
    f = write_project(tmp_path, slurm_cluster.facts, CANCELLABLE.format(go=go))
    rc, err, phases = run_case(tmp_path, f, "interrupt")
    assert rc == 130, err[-3000:]
    assert "plane_start" not in phases, phases
    runs = runs_of(tmp_path)
    assert [(r.state, r.attempts) for r in runs] == [("CANCELLED", 1)] * 3, runs
    assert {r.reason for r in runs} == {"interrupted from the terminal"}
    names = [p.name for p in (tmp_path / "remote" / "jobs").iterdir()]
    assert len(names) == 1, names  # it did go out ahead

    def gone() -> bool:
        out = slurm_cluster.slurm("squeue", "-h", "-r", "-n", names[0], "-o", "%T", check=False)
        return out.strip() == ""

    wait_for(gone, 60, "the array cancelled at Slurm")
    # run again: the cancelled trials run, each once more, under new keys
    go.parent.mkdir(parents=True, exist_ok=True)
    go.touch()
    rc, err, _ = run_case(tmp_path, f, "sent")
    assert rc == 0, err[-3000:]
    runs = runs_of(tmp_path)
    assert [(r.state, r.attempts) for r in runs] == [("SUCCEEDED", 2)] * 3, runs
    assert _submissions(tmp_path) == ["submit", "retry"]
