"""A restart keeps the devices of the attempts still running: ``stowplan run`` on a local pool of
two (fake) GPUs is killed while a long run holds one of them; the resumed run takes that lease
back from the store and goes on placing GPU runs on the other device at once, never on the
device the restored attempt holds.

Every attempt logs its start and end with the ``CUDA_VISIBLE_DEVICES`` it was given (the lease
is the placement); the log is checked after the sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stowplan.provenance.store import RunStore

from .conftest import wait_for

pytestmark = pytest.mark.integration

LONG_S = 40  # longer than a restart takes (a new Ray cluster on a loaded 2-core machine)
SHORT = 8

PROJECT = """
[project]
name = "devices"

[providers.box]
kind = "local"
cpus = 4
gpus = 2
"""

# nothing is found on a machine without a GPU driver: the configured count stands (fake GPUs)
EXPERIMENT = """
[experiment]
name = "device-restart"

[[tasks]]
name = "long"
command = ["bash", "{{experiment_dir}}/work.sh", "long", "{long_s}"]
env = {{ MARKER = "{marker}" }}
resources = {{ cpus = 1, memory = "64MiB", gpus = 1 }}

[[tasks]]
name = "short"
command = ["bash", "{{experiment_dir}}/work.sh", "short-{{i}}", "1"]
env = {{ MARKER = "{marker}" }}
resources = {{ cpus = 1, memory = "64MiB", gpus = 1 }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {last} }} }} }}
"""

WORK = """
echo "$1 start $(date +%s.%N) ${CUDA_VISIBLE_DEVICES-unset}" >> "$MARKER"
sleep "$2"
echo "$1 end $(date +%s.%N) ${CUDA_VISIBLE_DEVICES-unset}" >> "$MARKER"
"""


def _events(marker: Path) -> list[tuple[str, str, float, str]]:
    if not marker.exists():
        return []
    out = []
    for line in marker.read_text().splitlines():
        name, what, at, devices = line.split()
        out.append((name, what, float(at), devices))
    return out


def _succeeded(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with RunStore(db) as store:
        return {
            r.task if r.task == "long" else f"short-{r.params['i']}"
            for e in store.list_experiments()
            for r in store.runs_for_experiment(e.id)
            if r.state == "SUCCEEDED"
        }


def test_a_restarted_run_keeps_the_devices_of_live_attempts(tmp_path: Path) -> None:
    marker = tmp_path / "executions.log"
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    (tmp_path / ".stowplanignore").write_text("executions.log\n")
    (tmp_path / "work.sh").write_text(WORK)
    f = tmp_path / "exp.toml"
    f.write_text(EXPERIMENT.format(long_s=LONG_S, marker=marker, last=SHORT - 1))
    db = tmp_path / ".stowplan" / "stowplan.db"
    cmd = [sys.executable, "-m", "stowplan.cli.main", "run", str(f)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def started(name: str) -> bool:
        return any(n == name and w == "start" for n, w, _, _ in _events(marker))

    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # before any short run ends: none is queued at the provider beyond the devices yet
        # (a backlog waits for a runtime), so the resumed run has the rest to place
        wait_for(
            lambda: started("long") and started("short-0"),
            120,
            "the long run and a short one to start before the kill",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    killed_at = time.time()
    assert not any(n == "long" and w == "end" for n, w, _, _ in _events(marker))
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr

    events = _events(marker)
    starts = {(n, at): d for n, w, at, d in events if w == "start"}
    ends = {n: (at, d) for n, w, at, d in events if w == "end"}
    names = {"long", *(f"short-{i}" for i in range(SHORT))}
    assert {n for n, _ in starts} == names == set(ends), events
    assert len(starts) == len(names), "an attempt ran twice"
    # every attempt ran on exactly one of the two devices, as leased
    assert {d for d in starts.values()} <= {"0", "1"}, events
    # no two attempts were on one device at once
    spans = sorted((at, ends[n][0], d, n) for (n, at), d in starts.items())
    for i, (_, e0, d0, n0) in enumerate(spans):
        for s1, _, d1, n1 in spans[i + 1 :]:
            assert d0 != d1 or s1 >= e0, f"{n0} and {n1} shared device {d0}"
    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        attempts = store.attempts_for([r.run_id for r in runs])
    by_name = {(r.task if r.task == "long" else f"short-{r.params['i']}"): r for r in runs}
    assert all(len(attempts[r.run_id]) == 1 for r in runs), attempts
    # the resumed run placed GPU runs on the free device while the restored one still ran
    long_end, long_device = ends["long"]
    resumed = {n for n, r in by_name.items() if attempts[r.run_id][0].intent_at > killed_at}
    assert resumed and "long" not in resumed, resumed
    first_start = min(at for (n, at) in starts if n in resumed)
    assert first_start < long_end, "the resumed run waited for the restored attempt to end"
    assert all(d != long_device for (n, at), d in starts.items() if n in resumed and at < long_end)
    # the store recorded each attempt's node and devices: those it ran on
    for name, r in by_name.items():
        [a] = attempts[r.run_id]
        assert a.node and a.devices == ends[name][1], (name, a)
