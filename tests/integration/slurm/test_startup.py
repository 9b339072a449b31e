"""The fixed cost of ``stowplan run`` on Slurm: Ray starts while the CLI discovers, and the
control plane stops without waiting on Ray's autoscaler monitor.

``stowplan run`` runs here as its own process with the phases timed by wrappers around the
functions it calls (as ``benchmarks/bench_slurm.py`` times them), and the tests assert on the
order of those phases, not on their lengths. The provider actor's first discovery takes the
pools the CLI discovered (``actors.provider``, "Handed facts"): counted here on a control
plane on the test session's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from stowplan.actors.control import ControlPlane, kill_monitor, provider_actor_name
from stowplan.actors.provider import FACTS_TRUSTED_S
from stowplan.actors.runtime import WORKERS_DIR
from stowplan.actors.wire import pack
from stowplan.provenance.store import RunStore
from stowplan.providers.base import LaunchSpec
from stowplan.providers.slurm.driver import POLLS_KEPT
from stowplan.session import discover, prepare, record, submissions
from tests.slurmcluster.cluster import SlurmCluster

from ..conftest import wait_for
from .conftest import runs_of, write_project

pytestmark = pytest.mark.integration

SWEEP = """
[experiment]
name = "startup"
[[tasks]]
name = "noop"
command = ["true"]
resources = { cpus = 1, memory = "16MiB" }
sweep = { parameters = { i = { type = "int", low = 0, high = 2 } } }
"""

# no partition of the test cluster has this GPU type: refused before anything is written
# (NOTE: not a task larger than a node: the partitions carry no node shape, and with the
# derived queue depth such a task is offered a place and waits)
NOWHERE = """
[experiment]
name = "nowhere"
[[tasks]]
name = "a100"
command = ["true"]
resources = { cpus = 1, memory = "16MiB", gpus = 1, gpu_type = "a100" }
"""

# ``stowplan ARGV`` with each call of the functions below recorded as [label, began, ended]
# (epoch seconds), written as JSON to the first argument when the process exits
TRACED = r"""
import atexit, functools, json, sys, time
out = sys.argv.pop(1)
marks = []
def wrap(owner, name):
    f = getattr(owner, name)
    @functools.wraps(f)
    def timed(*a, **k):
        t = time.time()
        try:
            return f(*a, **k)
        finally:
            marks.append([name, t, time.time()])
    setattr(owner, name, timed)
import stowplan.cli.main as cli
import stowplan.session as session
import stowplan.actors.control as control
for n in ("discover", "check_feasible"):
    wrap(session, n)
for n in ("prestart", "init_ray", "kill_monitor", "shutdown_ray"):
    wrap(control, n)
atexit.register(lambda: open(out, "w").write(json.dumps(marks)))
sys.exit(cli.main(sys.argv[1:]))
"""


def traced_run(
    project: Path, experiment: Path, timeout: float = 240
) -> tuple[int, str, dict[str, list[float]]]:
    """Run ``stowplan run EXPERIMENT --json`` traced: (exit code, stderr, label -> [began,
    ended] of its first call)."""
    trace = project / "trace.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", TRACED, str(trace), "run", str(experiment), "--json"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    first: dict[str, list[float]] = {}
    for label, began, ended in json.loads(trace.read_text()):
        first.setdefault(label, [began, ended])
    return proc.returncode, proc.stderr, first


def test_ray_starts_while_the_cli_discovers(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    assert slurm_cluster.facts is not None
    f = write_project(tmp_path, slurm_cluster.facts, SWEEP)
    rc, err, phases = traced_run(tmp_path, f)
    assert rc == 0, err[-3000:]
    assert sorted(r.state for r in runs_of(tmp_path)) == ["SUCCEEDED"] * 3
    discover, ray = phases["discover"], phases["init_ray"]
    # the two overlap: each began before the other ended
    assert discover[0] < ray[1] and ray[0] < discover[1], phases
    # the check runs on discovery's thread, with the pools, before its connections close
    assert discover[0] <= phases["check_feasible"][0] <= phases["check_feasible"][1] <= discover[1]
    # the control plane stopped the Ray it took over, the monitor first
    assert "kill_monitor" in phases and "shutdown_ray" in phases, phases
    assert phases["kill_monitor"][1] <= phases["shutdown_ray"][0]


def test_a_refused_experiment_stops_the_ray_started_beside_discovery(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    f = write_project(tmp_path, slurm_cluster.facts, NOWHERE)
    rc, err, phases = traced_run(tmp_path, f, timeout=90)
    assert rc == 2, err[-3000:]
    assert "no configured pool can run" in err and "Traceback" not in err, err
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()
    assert not (tmp_path / "remote" / "jobs").exists()  # nothing submitted
    # Ray was started beside discovery, then stopped (not left to the interpreter's exit)
    assert "prestart" in phases, phases
    assert phases["shutdown_ray"][0] >= phases["check_feasible"][1], phases


def test_kill_monitor_kills_only_the_monitor() -> None:
    """Ray's autoscaler monitor answers SIGTERM only after Ray's one-second grace; it is
    SIGKILLed before ``ray.shutdown``, and the node's other processes are left to Ray."""
    stubborn = ["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"]
    monitor = subprocess.Popen(stubborn)
    other = subprocess.Popen(stubborn)
    try:
        node = SimpleNamespace(
            all_processes={
                "monitor": [SimpleNamespace(process=monitor)],
                "raylet": [SimpleNamespace(process=other)],
            }
        )
        started = time.monotonic()
        kill_monitor(node)
        assert monitor.wait(timeout=5) == -signal.SIGKILL
        assert time.monotonic() - started < 1.0
        assert other.poll() is None
        kill_monitor(node)  # a monitor already gone: nothing to do
        kill_monitor(SimpleNamespace())  # a Ray without these attributes: nothing to do
    finally:
        for p in (monitor, other):
            p.kill()
            p.wait()


def _provider_pids(state_dir: Path) -> set[int]:
    """The processes the cluster's provider actor ran in, from their notes (``note_worker``)."""
    notes = (json.loads(p.read_text()) for p in (state_dir / WORKERS_DIR).glob("*.json"))
    return {n["pid"] for n in notes if n["actor"] == provider_actor_name("cluster")}


def _discoveries(plane: ControlPlane) -> int:
    import ray

    actor = plane.actors[provider_actor_name("cluster")]
    n: int = ray.get(actor.stats.remote(), timeout=60)["discovers"]
    return n


def _remote_calls(state_dir: Path) -> list[str]:
    """The verbs of the backend calls the cluster's driver made, in the order they began (its
    ``remote.json``, written at the end of the submit and of each poll; every one a remote
    command), all of them: a list cut at ``POLLS_KEPT`` fails here, not silently."""
    path = state_dir / "slurm" / "cluster" / "remote.json"
    wait_for(path.exists, 60, "the driver's remote.json")
    calls = json.loads(path.read_text())["calls"]
    assert len(calls) < POLLS_KEPT, f"only the last {POLLS_KEPT} calls are kept: {calls}"
    return [verb for _, verb, _ in sorted(calls)]


def test_the_provider_actor_submits_first_with_the_clis_facts(
    ray_session: None, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Fresh facts: no discovery asked of the provider by its actor before (or after) the
    first submit, and no remote command before it; a restarted actor does not take them
    again, it discovers itself."""
    import ray

    assert slurm_cluster.facts is not None
    prepared = prepare(write_project(tmp_path, slurm_cluster.facts, SWEEP))
    began = time.time()
    pools = discover(prepared)
    with RunStore(prepared.store_path) as store:
        ids = [r.run_id for r in record(prepared, store)]
    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        poll_max=0.5,
        facts=pools,
        facts_at=began,
    )
    plane.start()
    try:
        plane.submit(submissions(prepared, set(ids)), [])

        def done() -> bool:
            info = plane.progress(ids)
            assert info["fatal"] is None, info
            return bool(info["counts"].get("SUCCEEDED", 0) == len(ids))

        wait_for(done, 120, "the sweep to succeed")
        assert _discoveries(plane) == 0
        # nor did its driver send a discovery of its own (the one the SSH driver begins as it
        # is built): the first remote command it sent was the sweep's submit
        verbs = _remote_calls(Path(prepared.state_dir))
        assert "submit" in verbs, verbs
        assert verbs[: verbs.index("submit")] == [], verbs
        actor = plane.actors[provider_actor_name("cluster")]
        first = _provider_pids(Path(prepared.state_dir))
        ray.kill(actor, no_restart=False)
        # ray.kill returns at once: wait for the restart (its note), so the calls below go to it
        wait_for(
            lambda: bool(_provider_pids(Path(prepared.state_dir)) - first),
            60,
            "the provider actor to restart",
        )
        spec = LaunchSpec(key="k", run_id="r", attempt=1, pool=pools[0].id, name="n", argv=["true"])
        # Ray retries the call on the restarted actor, which plans with facts of its own
        ray.get(actor.plan.remote(pack([spec])), timeout=120)
        assert _discoveries(plane) == 1
    finally:
        plane.stop()


def test_stale_facts_are_discovered_again(
    ray_session: None, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    prepared = prepare(write_project(tmp_path, slurm_cluster.facts, SWEEP))
    pools = discover(prepared)
    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        facts=pools,
        facts_at=time.time() - FACTS_TRUSTED_S - 1,
    )
    plane.start()  # the queue's boot discovers every provider
    try:
        assert _discoveries(plane) == 1
    finally:
        plane.stop()
