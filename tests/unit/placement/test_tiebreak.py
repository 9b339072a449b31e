"""Ties between pools of equal cost: a task that asks for no GPU leaves GPU pools to the tasks
that need them (issue 17: with no prices set, CPU-only tasks landed on GPU pools by a hash)."""

from __future__ import annotations

from stowplan.placement import solve
from stowplan.placement.greedy import solve_greedy
from stowplan.placement.problem import DemandClass, PlacementProblem, Pool

GiB = 1 << 30


def problem() -> PlacementProblem:
    pools = [
        Pool(id=f"gpu{i}", provider="x", cpus=64, memory=256 * GiB, gpus={"V100": 8})
        for i in range(3)
    ] + [Pool(id=f"cpu{i}", provider="x", cpus=64, memory=256 * GiB) for i in range(3)]
    classes = [
        DemandClass(id=f"c{i}", members=[f"c{i}t{k}" for k in range(2)], cpus=2, memory=GiB)
        for i in range(12)
    ]
    return PlacementProblem(pools=pools, classes=classes)


def test_cpu_only_tasks_take_pools_without_gpus_at_equal_cost() -> None:
    p = problem()
    for sol in (solve(p), solve_greedy(p)):
        assert sol.placed() == 24
        on = sorted({a.pool_id for a in sol.assignments})
        assert all(pid.startswith("cpu") for pid in on), on


def test_cpu_only_tasks_still_use_gpu_pools_when_the_others_are_full() -> None:
    p = problem()
    full = PlacementProblem(
        pools=[q for q in p.pools if q.id.startswith("gpu")]
        + [Pool(id="cpu0", provider="x", cpus=4, memory=256 * GiB)],
        classes=p.classes,
    )
    sol = solve(full)
    assert sol.placed() == 24
    assert sum(a.count for a in sol.assignments if a.pool_id == "cpu0") == 2
