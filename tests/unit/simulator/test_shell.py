from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.placement.problem import PlacementProblem, PlacementSolution, PlacementStatus
from stowplan.scheduler.states import TaskState
from stowplan.shell import Wake
from stowplan.simulator.cluster import parse_cluster
from stowplan.simulator.policies import RateOf
from stowplan.simulator.shell import WAKE_PRIORITY, SimOptions, Simulation
from stowplan.simulator.workloads import SimJob, SyntheticSpec, Workload, synthetic_sweep

CLUSTER = """\
[cluster]
name = "t"
[[sites]]
name = "campus"
[[sites]]
name = "cloud"
[[pools]]
name = "gpu"
site = "campus"
kind = "slurm"
nodes = 4
gpus_per_node = 4
gpu_model = "a100"
cpus_per_node = 32
memory_per_node = "256GiB"
failures = { mtbf = "2d", mttr = "2h" }
[[pools]]
name = "spot"
site = "cloud"
kind = "cloud"
max_instances = 8
gpus_per_node = 1
gpu_model = "a10g"
cpus_per_node = 8
memory_per_node = "32GiB"
price_per_hour = 1.0
boot = "2m"
spot = true
interruptions_per_hour = 0.5
[faults]
api_error_rate = 0.05
lost_answer_rate = 0.05
submit_rate_limit = 0.01
[[faults.cutoffs]]
site = "cloud"
at = "3h"
duration = "2h"
[scheduler]
lease_ttl = "30m"
max_attempts = 10
"""


def sweep(n: int = 300, seed: int = 2) -> Workload:
    return synthetic_sweep(
        SyntheticSpec(
            trials=n,
            arrivals_per_hour=120,
            duration_median="40m",
            gpus=1,
            cpus=2,
            memory=2**30,
            projects=3,
            seed=seed,
        )
    )


def run(policy: str = "fifo", seed: int = 0, faults: bool = True, n: int = 300) -> Simulation:
    spec = parse_cluster(CLUSTER, Path("t.toml"))
    sim = Simulation(spec, sweep(n), SimOptions(policy=policy, seed=seed, faults=faults))
    sim.run()
    return sim


def test_every_job_finishes_despite_every_kind_of_fault_and_no_key_runs_twice() -> None:
    sim = run()
    c = sim.counters
    rows = sim.metrics.job_rows()
    assert {r["state"] for r in rows} == {"SUCCEEDED"}
    # faults really happened ...
    assert c.node_failures > 0 and c.preemptions > 0
    assert c.api_errors > 0 and c.lost_answers > 0 and c.throttled > 0
    assert c.unreachable_calls > 0 and c.submit_retries > 0
    # ... and were recovered from without running anything twice
    assert c.duplicate_submits_absorbed > 0
    # the cut-off site's leases expired; reconciliation found the jobs again by key
    assert sim.metrics.lost > 0
    attempts = sum(r["attempts"] for r in rows)
    assert c.keys_executed <= attempts
    assert any(r["attempts"] > 1 for r in rows)
    executed = [k for p in sim.providers.values() for k in p.executed]
    assert len(executed) == len(set(executed))


def test_a_policy_that_keeps_waiting_does_not_spin_the_shell() -> None:
    """The core stalls on an answer that placed nothing until something changes, so the shell
    holds nothing back itself: solves are bounded by the changes (here the arrivals), not by
    the instants at which the core could ask again."""

    def wait(
        problem: PlacementProblem, *, seed: int, pool_order: list[str], rate: RateOf | None
    ) -> PlacementSolution:
        del seed, pool_order, rate
        return PlacementSolution(
            request_id=problem.request_id, status=PlacementStatus.FEASIBLE, assignments=[]
        )

    wl = sweep(40)
    sim = Simulation(
        parse_cluster(CLUSTER, Path("t.toml")),
        wl,
        SimOptions(faults=False, until=6 * 3600.0),
        policy_fn=wait,
    )
    sim.run()
    arrivals = len({j.submit for j in wl.jobs})
    assert 0 < sim.counters.solves <= 2 * arrivals
    assert {sim.core.state(j.id) for j in wl.jobs} == {TaskState.READY}


def test_same_inputs_and_seed_give_the_same_run_and_another_seed_does_not() -> None:
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert a.metrics.job_rows() == b.metrics.job_rows()
    assert a.engine.events_run == b.engine.events_run
    assert a.metrics.job_rows() != c.metrics.job_rows()


def test_without_faults_nothing_fails_and_waits_are_measured() -> None:
    sim = run(faults=False)
    s = sim.metrics.summary(sim.metrics.job_rows())
    assert s["states"] == {"SUCCEEDED": 300}
    assert s["failures"] == {}
    assert s["wait_s"]["n"] == 300 and s["wait_s"]["p99"] is not None
    assert 0 < s["utilization"] <= 1
    assert s["pools"]["spot"]["cost"] > 0


def test_heterogeneity_aware_policy_beats_agnostic_on_a_throughput_table() -> None:
    from stowplan.simulator.workloads import Throughput

    text = """\
[cluster]
name = "h"
[[sites]]
name = "s"
[[pools]]
name = "fast"
site = "s"
kind = "slurm"
nodes = 1
gpus_per_node = 1
gpu_model = "v100"
cpus_per_node = 16
[[pools]]
name = "slow"
site = "s"
kind = "slurm"
nodes = 1
gpus_per_node = 1
gpu_model = "k80"
cpus_per_node = 16
"""
    # "gan" gains 10x on a V100, "rl" nothing: the aware policy gives the V100 to gan jobs.
    # gan jobs also use more CPUs, so fair share puts rl first: FIFO gives rl the V100.
    tp = Throughput(
        source="t", table={"gan|1": {"v100": 10.0, "k80": 1.0}, "rl|1": {"v100": 1.0, "k80": 1.0}}
    )
    jobs = []
    for i in range(20):
        jt = "gan" if i % 2 else "rl"
        jobs.append(
            SimJob(
                id=f"j{i:02d}",
                submit=i * 10.0,
                gpus=1,
                job_type=jt,
                steps=1000.0,
                project=jt,
                cpus=8.0 if jt == "gan" else 1.0,
            )
        )
    wl = Workload(name="w", kind="gavel", source="t", jobs=jobs, throughput=tp)
    spec = parse_cluster(text, Path("h.toml"))
    jct = {}
    for policy in ("fifo", "throughput"):
        sim = Simulation(spec, wl, SimOptions(policy=policy))
        sim.run()
        jct[policy] = sim.metrics.summary(sim.metrics.job_rows())["completion_s"]["mean"]
    assert jct["throughput"] < jct["fifo"]


@pytest.mark.parametrize("policy", ["greedy", "cpsat"])
def test_the_production_placers_drive_the_simulation(policy: str) -> None:
    sim = run(policy=policy, faults=False, n=60)
    assert {r["state"] for r in sim.metrics.job_rows()} == {"SUCCEEDED"}
    assert sim.counters.solves > 0


DATA = """\
[cluster]
name = "d"
[[sites]]
name = "campus"
[[sites]]
name = "cloud"
[[pools]]
name = "campus"
site = "campus"
kind = "slurm"
nodes = 1
gpus_per_node = 1
gpu_model = "a100"
[[pools]]
name = "cloud"
site = "cloud"
kind = "cloud"
max_instances = 4
gpus_per_node = 1
gpu_model = "a100"
price_per_hour = 3.6
[[links]]
between = ["campus", "cloud"]
bandwidth = "8Gbps"
egress_per_gib = 0.1
[[datasets]]
name = "ds"
size = "10GiB"
sites = ["campus"]
"""


def test_jobs_away_from_their_data_move_it_pay_egress_and_wait_for_it() -> None:
    jobs = [
        SimJob(id=f"j{i}", submit=0.0, duration=100.0, gpus=1, datasets=("ds",)) for i in range(3)
    ]
    wl = Workload(name="w", kind="synthetic", source="t", jobs=jobs)
    sim = Simulation(parse_cluster(DATA, Path("d.toml")), wl, SimOptions(policy="fifo"))
    sim.run()
    rows = {r["job"]: r for r in sim.metrics.job_rows()}
    s = sim.metrics.summary(list(rows.values()))
    on_cloud = [r for r in rows.values() if r["pool"] == "cloud"]
    assert len(on_cloud) == 2 and rows["j0"]["pool"] == "campus"
    assert s["data_moved_bytes"] == 2 * 10 * 2**30
    assert s["egress_cost"] == pytest.approx(2 * 10 * 0.1)
    stage = 10 * 2**30 / 1e9  # 8 Gbps = 1 GB/s
    assert on_cloud[0]["run_time"] == pytest.approx(100.0 + stage)
    assert rows["j0"]["run_time"] == 100.0


def test_every_kind_of_shell_callback_has_an_engine_priority() -> None:
    assert set(WAKE_PRIORITY) == set(Wake)
    # the world changes first, the core's own wake-ups come after the provider traffic
    assert WAKE_PRIORITY[Wake.DISCOVER] < WAKE_PRIORITY[Wake.REPORTS] < WAKE_PRIORITY[Wake.TICK]


ELASTIC = """\
[cluster]
name = "e"
[[sites]]
name = "cloud"
[[pools]]
name = "g5"
site = "cloud"
kind = "cloud"
max_instances = 4
gpus_per_node = 1
gpu_model = "a10g"
cpus_per_node = 4
memory_per_node = "16GiB"
price_per_hour = 3.6
boot = "2m"
min_billed = "1m"
[scheduler]
idle_grace = "2m"
"""


@pytest.mark.parametrize("policy", ["fifo", "greedy", "cpsat"])
def test_a_cloud_pool_scales_from_nothing_to_what_the_work_needs_and_back(policy: str) -> None:
    """The core's Provision and Terminate, carried out by the shell on the simulated pool:
    instances boot before the work runs, stop after the idle grace, and are billed per second
    from provision to stop."""
    jobs = [SimJob(id=f"a{i}", submit=0.0, duration=600.0, gpus=1, cpus=2) for i in range(4)]
    jobs += [SimJob(id=f"b{i}", submit=7200.0, duration=600.0, gpus=1, cpus=2) for i in range(2)]
    wl = Workload(name="w", kind="synthetic", source="t", jobs=jobs)
    sim = Simulation(
        parse_cluster(ELASTIC, Path("e.toml")), wl, SimOptions(policy=policy, faults=False)
    )
    pool = sim.providers["cloud"].pools["g5"]
    seen: list[tuple[float, int]] = []
    for t in (0.0, 60.0, 719.0, 839.0, 841.0, 7200.0, 7500.0):
        sim.engine.at(t, lambda at: seen.append((at, pool.instances)), t, 100)
    sim.run()
    rows = {r["job"]: r for r in sim.metrics.job_rows()}
    assert {r["state"] for r in rows.values()} == {"SUCCEEDED"}
    # every job waited for its instance to boot, no longer
    assert {r["wait"] for r in rows.values()} == {120.0}
    # 0 -> 4 instances (booting from 0 s), idle from 720 s, stopped at 840 s, 2 more at 2 h
    assert seen == [
        (0.0, 4),
        (60.0, 4),
        (719.0, 4),
        (839.0, 4),
        (841.0, 0),
        (7200.0, 2),
        (7500.0, 2),
    ]
    c = sim.counters
    assert (c.provisions, c.terminates) == (2, 1)
    s = sim.metrics.summary(sim.metrics.job_rows())
    g5 = s["pools"]["g5"]
    # four instances for 840 s, two until the end (7920 s): per second, at 3.6 an hour
    assert g5["instance_hours"] == pytest.approx((4 * 840 + 2 * 720) / 3600)
    assert g5["cost"] == pytest.approx((4 * 840 + 2 * 720) * 3.6 / 3600)
    assert g5["launches"] == 6
    assert g5["utilization"] == pytest.approx(6 * 600 / (4 * 840 + 2 * 720))
    assert s["cost"] == g5["cost"]
