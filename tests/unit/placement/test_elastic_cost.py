"""Elastic pools are billed per instance: a launched instance costs its whole price for as long
as it runs, whatever share of it its tasks use. The small case of ``benchmarks/bench_aws.py``
without moto: three g5 shapes at their us-east-1 prices, six trials."""

from __future__ import annotations

import itertools
import random

import pytest

from stowplan.placement import solve
from stowplan.placement.explain import explain
from stowplan.placement.greedy import solve_greedy
from stowplan.placement.problem import (
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    Pool,
    Shape,
    Weights,
)

GiB = 1 << 30
# (instance type, vCPUs, GiB, A10G GPUs, dollars per hour)
SHAPES = [
    ("g5.xlarge", 4, 16, 1, 1.006),
    ("g5.2xlarge", 8, 32, 1, 1.212),
    ("g5.12xlarge", 48, 192, 4, 5.672),
]
# (cpus, memory GiB, gpus) of the six trials of the bench's small case
TRIALS = [(2, 8, 1), (2, 8, 1), (6, 24, 1), (6, 24, 1), (3, 12, 0), (3, 12, 0)]
COST_ONLY = Weights(data=0.0, cost=1.0, wait=0.0, priority=1.0)


def pools(max_instances: int = 6) -> list[Pool]:
    return [
        Pool(
            id=f"cloud/us-east-1/{name}",
            provider="cloud",
            kind="cloud",
            site="us-east-1",
            region="us-east-1",
            node=Shape(cpus=cpus, memory=mem * GiB, gpus={"A10G": gpus}),
            price_per_hour=price,
            max_instances=max_instances,
            boot_s=90.0,
            hardware_class=f"aws:{name}",
        )
        for name, cpus, mem, gpus, price in SHAPES
    ]


def classes(trials: list[tuple[int, int, int]]) -> list[DemandClass]:
    return [
        DemandClass(id=f"t{i}", members=[f"t{i}"], cpus=c, memory=m * GiB, gpus=g)
        for i, (c, m, g) in enumerate(trials)
    ]


def dollars(sol: PlacementSolution) -> float:
    price = {p.id: p.price_per_hour for p in pools()}
    return sum(price[pid] * n for pid, n in sol.instances.items())


def packable(trials: list[tuple[int, int, int]], bins: list[tuple[int, int, int]]) -> bool:
    """Whether every trial goes on one of ``bins`` (cpus, GiB, GPUs) at once."""
    free = [list(b) for b in bins]

    def place(i: int) -> bool:
        if i == len(trials):
            return True
        need = trials[i]
        for f in free:
            if all(have >= n for have, n in zip(f, need, strict=True)):
                for d in range(3):
                    f[d] -= need[d]
                if place(i + 1):
                    return True
                for d in range(3):
                    f[d] += need[d]
        return False

    return place(0)


def cheapest(trials: list[tuple[int, int, int]]) -> float:
    """Brute force over every multiset of instances: the cheapest that packs every trial."""
    best = float("inf")
    for counts in itertools.product(range(len(trials) + 1), repeat=len(SHAPES)):
        usd = sum(s[4] * k for s, k in zip(SHAPES, counts, strict=True))
        if usd >= best or not 0 < sum(counts) <= len(trials):
            continue
        bins = [(s[1], s[2], s[3]) for s, k in zip(SHAPES, counts, strict=True) for _ in range(k)]
        if packable(trials, bins):
            best = usd
    return best


@pytest.mark.parametrize("weights", [COST_ONLY, Weights()], ids=["cost-only", "default"])
def test_one_small_trial_launches_the_cheapest_instance_that_holds_it(weights: Weights) -> None:
    # 3 CPUs alone: a fifth of a g5.12xlarge's share price, but the whole instance is billed
    sol = solve(PlacementProblem(pools=pools(), classes=classes([(3, 12, 0)]), weights=weights))
    assert sol.placed() == 1
    assert sol.instances == {"cloud/us-east-1/g5.xlarge": 1}


def test_trials_that_share_an_instance_pay_for_it_once() -> None:
    four = [(2, 8, 0)] * 4  # one g5.2xlarge holds all four: $1.212, not 2 x $1.006
    sol = solve(PlacementProblem(pools=pools(), classes=classes(four), weights=COST_ONLY))
    assert sol.placed() == 4
    assert sol.instances == {"cloud/us-east-1/g5.2xlarge": 1}


@pytest.mark.parametrize("weights", [COST_ONLY, Weights()], ids=["cost-only", "default"])
def test_bench_small_case_costs_no_more_than_the_cheapest_packing(weights: Weights) -> None:
    best = cheapest(TRIALS)
    assert best == pytest.approx(4.642)  # 3 x g5.2xlarge + 1 x g5.xlarge
    problem = PlacementProblem(pools=pools(), classes=classes(TRIALS), weights=weights)
    sol = solve(problem)
    assert sol.placed() == len(TRIALS)
    assert dollars(sol) == pytest.approx(best), sol.instances
    shapes = {f"cloud/us-east-1/{s[0]}": (s[1], s[2], s[3]) for s in SHAPES}
    bins = [shapes[pid] for pid, n in sorted(sol.instances.items()) for _ in range(n)]
    assert packable(TRIALS, bins)
    # the instance-hours the objective counts are the dollars launched (runtime 1 h, 90 s boot)
    assert sol.terms["compute_cost"] == pytest.approx(dollars(sol) * (1 + 90 / 3600), abs=1e-6)
    again = solve(problem)
    assert again.fingerprint() == sol.fingerprint()


def test_members_share_an_instance_only_when_they_fit_on_it_together() -> None:
    # two 8-CPU instances hold 6 + 6 CPUs; a 3-CPU member fits the 4 CPUs left in total, on
    # neither instance: the count of CPUs alone would say 15 <= 16
    pool = pools()[1]  # g5.2xlarge
    big = DemandClass(id="big", members=["b0", "b1"], cpus=6, memory=24 * GiB, gpus=1)
    small = DemandClass(id="small", members=["s0"], cpus=3, memory=12 * GiB)
    problem = PlacementProblem(pools=[pool], classes=[big, small], weights=COST_ONLY)
    for sol in (solve(problem), solve_greedy(problem)):
        assert sol.placed() == 3
        assert sol.instances == {pool.id: 3}


def test_greedy_launches_by_instance_price_per_slot() -> None:
    # the fallback launches the instance cheapest per member it holds, not the largest share
    pair = DemandClass(id="c", members=["a", "b"], cpus=3, memory=12 * GiB)
    sol = solve_greedy(PlacementProblem(pools=pools(), classes=[pair]))
    assert sol.instances == {"cloud/us-east-1/g5.2xlarge": 1}


def _mix(rng: random.Random) -> PlacementProblem:
    """A few elastic instance types (some with capacity already free) and a few classes of
    awkward sizes, small enough to check every instance exactly."""
    pool_list = []
    for i in range(rng.randint(1, 3)):
        cpus, gpus = rng.choice([(4, 1), (8, 1), (8, 2), (16, 4)])
        free = rng.random() < 0.3
        pool_list.append(
            Pool(
                id=f"p{i}",
                provider="cloud",
                kind="cloud",
                cpus=cpus if free else 0,
                memory=cpus * 4 * GiB if free else 0,
                gpus={"A10G": gpus} if free else {},
                node=Shape(cpus=cpus, memory=cpus * 4 * GiB, gpus={"A10G": gpus}),
                price_per_hour=round(rng.uniform(0.5, 4.0), 2),
                max_instances=rng.randint(1, 4),
                boot_s=60.0,
            )
        )
    cls_list = [
        DemandClass(
            id=f"c{i}",
            members=[f"c{i}m{k}" for k in range(rng.randint(1, 4))],
            cpus=rng.choice([1, 2, 3, 5, 6]),
            memory=rng.choice([2, 4, 12]) * GiB,
            gpus=rng.choice([0, 0, 1, 2]),
        )
        for i in range(rng.randint(1, 4))
    ]
    return PlacementProblem(pools=pool_list, classes=cls_list)


@pytest.mark.parametrize("seed", range(40))
def test_every_instance_launched_holds_what_is_placed_on_it(seed: int) -> None:
    # the count model adds an elastic pool's capacity up over its instances; whatever the
    # solver or greedy answers must still pack member by member onto real instances
    problem = _mix(random.Random(seed))
    pools_by_id = {p.id: p for p in problem.pools}
    need = {c.id: (int(c.cpus), c.memory // GiB, c.gpus) for c in problem.classes}
    for sol in (solve(problem), solve_greedy(problem)):
        for pid, pool in pools_by_id.items():
            node = pool.node
            assert node is not None
            members = [
                need[a.class_id]
                for a in sol.assignments
                if a.pool_id == pid
                for _ in range(a.count)
            ]
            bins = [(int(pool.cpus), pool.memory // GiB, pool.gpus.get("A10G", 0))]
            bins += [(int(node.cpus), node.memory // GiB, node.gpus["A10G"])] * sol.instances.get(
                pid, 0
            )
            members.sort(reverse=True)
            assert packable(members, bins), (pid, members, bins, sol.instances)
            assert sol.instances.get(pid, 0) <= pool.max_instances


def test_explain_names_the_instance_dollars_of_an_elastic_pool() -> None:
    problem = PlacementProblem(pools=pools(), classes=classes(TRIALS), weights=COST_ONLY)
    sol = solve(problem)
    why = explain(problem, sol, "t2")  # a 6-CPU GPU trial: a g5.2xlarge of its own
    assert why.pool == "cloud/us-east-1/g5.2xlarge"
    i = why.instances
    assert i is not None
    assert (i.pool, i.price_per_hour, i.launched) == ("cloud/us-east-1/g5.2xlarge", 1.212, 3)
    assert i.hours_each == pytest.approx(1 + 90 / 3600)
    assert i.dollars_each == pytest.approx(1.212 * (1 + 90 / 3600))
    text = why.render()
    assert "3 launched at $1.212/h each" in text, text
    assert "$3.727 in all" in text, text
