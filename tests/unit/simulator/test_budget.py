"""``[policy] budget`` in simulation: the simulator hands the budget to the real core and tells it
what the simulated clouds have billed (``SchedulerCore.set_spending``), so a sweep on a priced
cloud pool is held where the budget would break, as the real control plane holds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.simulator.cluster import parse_cluster
from stowplan.simulator.provider import CloudInstanceType
from stowplan.simulator.shell import HELD_FOR_GOOD_S, SimOptions, Simulation
from stowplan.simulator.workloads import SimJob, Workload
from stowplan.spec.models import SpendBudget

# one instance-hour costs $3.60 (a cent a second); instances boot in 2 minutes
CLOUD = """\
[cluster]
name = "b"
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
HOUR = 3600.0
DAY = 86400.0


def simulate(
    jobs: list[SimJob], budget: SpendBudget | None, until: float | None = None
) -> Simulation:
    wl = Workload(name="w", kind="synthetic", source="t", jobs=jobs)
    sim = Simulation(
        parse_cluster(CLOUD, Path("b.toml")),
        wl,
        SimOptions(policy="greedy", faults=False, budget=budget, until=until),
    )
    sim.run()
    return sim


def sweep(n: int, at: float = 0.0, prefix: str = "t") -> list[SimJob]:
    """``n`` one-GPU trials of one hour (the core's estimate when none is given)."""
    return [SimJob(id=f"{prefix}{i}", submit=at, duration=HOUR, gpus=1, cpus=2) for i in range(n)]


def states(sim: Simulation) -> dict[str, str]:
    return {r["job"]: r["state"] for r in sim.metrics.job_rows()}


def test_without_a_budget_the_whole_sweep_runs_and_costs_what_it_costs() -> None:
    sim = simulate(sweep(8), None)
    assert set(states(sim).values()) == {"SUCCEEDED"}
    # two waves on four instances, over two hours: the pool's own books say the same
    summary = sim.metrics.summary(sim.metrics.job_rows())
    assert sim.billed_usd() == pytest.approx(summary["pools"]["g5"]["cost"])
    assert sim.billed_usd() > 4 * 2 * 3.6
    assert sim.counters.spending_refreshes == 0


@pytest.mark.parametrize("kind", ["per_experiment_usd", "monthly_usd"])
def test_runs_past_the_budget_are_held_not_launched(kind: str) -> None:
    """$10: two one-hour launches ($3.60 each estimated) fit, a third does not. When the first
    two end, what they were billed ($7.44) leaves no room for another hour on the instances
    already up: the rest stay READY, the budget's reason given, and nothing more is launched."""
    sim = simulate(sweep(8), SpendBudget(**{kind: 10.0}), until=DAY)
    got = states(sim)
    assert sorted(got.values()) == ["READY"] * 6 + ["SUCCEEDED"] * 2, got
    what = "per-experiment" if kind == "per_experiment_usd" else "monthly"
    reasons = {sim.core.held(r) for r, state in got.items() if state == "READY"} - {""}
    assert reasons and all(
        r.startswith(f"held: the {what} budget of $10.00 would be exceeded") for r in reasons
    ), reasons
    pool = sim.providers["cloud"].pools["g5"]
    assert isinstance(pool, CloudInstanceType) and pool.launches == 2
    assert sim.counters.spending_refreshes > 0


def test_instances_left_idle_by_the_budget_stop_and_the_bill_stays_within_it() -> None:
    sim = simulate(sweep(8), SpendBudget(per_experiment_usd=10.0), until=DAY)
    assert sim.providers["cloud"].pools["g5"].instances == 0
    assert sim.billed_usd() <= 10.0


def test_a_simulation_whose_runs_are_held_for_good_ends() -> None:
    """Without ``until``, runs the budget holds with nothing left to happen end the simulation
    (after ``HELD_FOR_GOOD_S``) instead of sampling an idle world for ever."""
    sim = simulate(sweep(8), SpendBudget(per_experiment_usd=10.0))
    assert sorted(states(sim).values()) == ["READY"] * 6 + ["SUCCEEDED"] * 2
    assert sim.engine.now <= HOUR + 120 + HELD_FOR_GOOD_S + sim.sample_every
    assert any("only more budget would place them" in n for n in sim.counters.notes)


def test_a_new_month_gives_the_monthly_budget_back_but_not_the_experiments() -> None:
    """Two trials in January, two in February (virtual time 0 is 1970-01-01 UTC): a monthly
    budget that holds two runs a month runs all four; the same amount per experiment only
    the first two."""
    jobs = sweep(2) + sweep(2, at=40 * DAY, prefix="feb")
    monthly = states(simulate(jobs, SpendBudget(monthly_usd=10.0)))
    assert set(monthly.values()) == {"SUCCEEDED"}, monthly
    per_experiment = states(simulate(jobs, SpendBudget(per_experiment_usd=10.0)))
    assert {k: v for k, v in per_experiment.items() if v == "SUCCEEDED"} == {
        "t0": "SUCCEEDED",
        "t1": "SUCCEEDED",
    }, per_experiment


def test_a_budget_leaves_unpriced_pools_alone() -> None:
    """Only priced elastic pools count: the same budget on a free cloud pool holds nothing."""
    wl = Workload(name="w", kind="synthetic", source="t", jobs=sweep(8))
    free = parse_cluster(CLOUD.replace("price_per_hour = 3.6", "price_per_hour = 0"), Path("f"))
    sim = Simulation(
        free, wl, SimOptions(policy="greedy", faults=False, budget=SpendBudget(monthly_usd=1.0))
    )
    sim.run()
    assert set(states(sim).values()) == {"SUCCEEDED"}
    assert sim.billed_usd() == 0.0


def test_a_cluster_file_carries_the_budget_stowplan_sim_uses() -> None:
    cluster = parse_cluster(CLOUD + "budget = { per_experiment_usd = 10 }\n", Path("b.toml"))
    assert cluster.scheduler.budget == SpendBudget(per_experiment_usd=10.0)


def test_a_budget_of_0_in_a_cluster_file_names_the_field() -> None:
    from stowplan.errors import SpecError

    with pytest.raises(SpecError) as e:
        parse_cluster(CLOUD + "budget = { monthly_usd = 0 }\n", Path("b.toml"))
    assert e.value.path == "$.scheduler.budget" or "$.scheduler.budget" in str(e.value)
    assert "monthly_usd" in str(e.value)
