"""Shares of one GPU on the local provider: ``resources.gpus = 0.25`` puts four runs on one
device at once, as Ray's fractional GPUs do, and a whole-GPU run still holds its device alone.

A real ``stowplan run`` on a local pool of two (fake) GPUs. Every attempt logs its start and
end with the ``CUDA_VISIBLE_DEVICES`` it was given; the share runs each wait until all eight
have started, so the sweep can only finish if the eight shares ran side by side on the two
devices (before shares existed, each took a whole GPU and two ran at a time: they timed out).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stowplan.provenance.store import RunStore

from .test_device_restart import _events

pytestmark = pytest.mark.integration

SHARES = 8

PROJECT = """
[project]
name = "shares"

[providers.box]
kind = "local"
cpus = 4
gpus = 2
"""

EXPERIMENT = """
[experiment]
name = "gpu-shares"

[[tasks]]
name = "share"
command = ["bash", "{{experiment_dir}}/work.sh", "share-{{i}}", "together"]
env = {{ MARKER = "{marker}" }}
resources = {{ cpus = 0.25, memory = "32MiB", gpus = 0.25 }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {last} }} }} }}

[[tasks]]
name = "whole"
command = ["bash", "{{experiment_dir}}/work.sh", "whole", "alone"]
env = {{ MARKER = "{marker}" }}
resources = {{ cpus = 0.25, memory = "32MiB", gpus = 1 }}
depends_on = ["share"]
"""

# "together": wait (at most 90 s) until every share has started, then end; a share that
# cannot see the others running beside it fails
WORK = f"""
echo "$1 start $(date +%s.%N) ${{CUDA_VISIBLE_DEVICES-unset}}" >> "$MARKER"
if [ "$2" = together ]; then
  for _ in $(seq 900); do
    [ "$(grep -c ' start ' "$MARKER")" -ge {SHARES} ] && break
    sleep 0.1
  done
  [ "$(grep -c ' start ' "$MARKER")" -ge {SHARES} ] || exit 3
fi
echo "$1 end $(date +%s.%N) ${{CUDA_VISIBLE_DEVICES-unset}}" >> "$MARKER"
"""


def test_shares_of_a_gpu_run_side_by_side_and_a_whole_gpu_alone(tmp_path: Path) -> None:
    marker = tmp_path / "executions.log"
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    (tmp_path / ".stowplanignore").write_text("executions.log\n")
    (tmp_path / "work.sh").write_text(WORK)
    f = tmp_path / "exp.toml"
    f.write_text(EXPERIMENT.format(marker=marker, last=SHARES - 1))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    plan = subprocess.run(
        [sys.executable, "-m", "stowplan.cli.main", "plan", str(f)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    # the plan places all eight at once, four to a device, and says so
    assert f"{SHARES} placed now, 0 queued" in plan.stdout, plan.stdout
    assert plan.stdout.count("0.25 of GPU 0") == 4 and plan.stdout.count("0.25 of GPU 1") == 4

    run = subprocess.run(
        [sys.executable, "-m", "stowplan.cli.main", "run", str(f)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    events = _events(marker)
    starts = {n: (at, d) for n, w, at, d in events if w == "start"}
    ends = {n: (at, d) for n, w, at, d in events if w == "end"}
    names = {"whole", *(f"share-{i}" for i in range(SHARES))}
    assert set(starts) == set(ends) == names, events
    assert sum(1 for _, w, _, _ in events if w == "start") == len(names), "a run ran twice"
    # four shares a device, each on one device only
    per_device = Counter(d for n, (_, d) in starts.items() if n != "whole")
    assert per_device == Counter({"0": SHARES // 2, "1": SHARES // 2}), per_device
    # the whole GPU is one device, alone: it started after every share had ended
    whole_at, whole_device = starts["whole"]
    assert whole_device in ("0", "1")
    assert all(ends[n][0] <= whole_at for n in names - {"whole"})
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        attempts = store.attempts_for([r.run_id for r in runs])
    assert all(r.state == "SUCCEEDED" for r in runs)
    assert all(len(a) == 1 for a in attempts.values()), attempts
    # the store records the device each share ran on
    for r in runs:
        name = "whole" if r.task == "whole" else f"share-{r.params['i']}"
        [a] = attempts[r.run_id]
        assert a.devices == starts[name][1], (name, a)
