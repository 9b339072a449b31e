"""The placement engine: determinism, constraints, costs, bounds, explanations, bad input."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from stowplan.errors import SpecError
from stowplan.placement import (
    Dataset,
    DemandClass,
    Link,
    PlacementProblem,
    PlacementStatus,
    Pool,
    Shape,
    expand,
    solve,
)
from stowplan.placement.explain import explain
from stowplan.placement.greedy import solve_greedy
from stowplan.placement.synthetic import problem as synthetic

GiB = 1 << 30


def shuffled(p: PlacementProblem, seed: int) -> PlacementProblem:
    rng = random.Random(seed)
    pools, classes = list(p.pools), list(p.classes)
    rng.shuffle(pools)
    rng.shuffle(classes)
    return msgspec.structs.replace(p, pools=pools, classes=classes)


def test_same_problem_same_placement_byte_for_byte() -> None:
    # a budget that stops the search before it proves anything: the hard case
    p, budget = synthetic(1000, 30, 8, seed=7), 0.05
    first = solve(p, budget=budget, workers=1)
    assert first.status is PlacementStatus.FEASIBLE
    assert first.deterministic_time >= budget
    prints = {solve(p, budget=budget, workers=1).fingerprint() for _ in range(4)}
    prints.add(first.fingerprint())
    prints |= {solve(shuffled(p, s), budget=budget, workers=1).fingerprint() for s in range(3)}
    assert len(prints) == 1
    prints2 = {solve(p, budget=budget, workers=2).fingerprint() for _ in range(3)}
    assert len(prints2) == 1


def test_an_optimal_answer_does_not_depend_on_the_workers() -> None:
    p = synthetic(1000, 30, 8, seed=7)  # CP-SAT searches about 0.6 deterministic seconds
    one = solve(p, budget=5.0, workers=1)
    two = solve(shuffled(p, 1), budget=5.0, workers=2)
    assert one.deterministic_time > 0.1
    assert one.status is PlacementStatus.OPTIMAL
    assert two.status is PlacementStatus.OPTIMAL
    assert one.fingerprint() == two.fingerprint()


def test_the_solver_beats_greedy_where_greedy_packs_badly() -> None:
    # greedy gives the cheap pool's CPUs to the CPU class first and strands its GPU
    pools = [
        Pool(id="cheap", provider="x", cpus=4, memory=64 * GiB, gpus={"A100": 1}),
        Pool(id="dear", provider="x", cpus=4, memory=64 * GiB, price_per_hour=5.0),
    ]
    classes = [
        DemandClass(id="a-cpu", cpus=4, memory=GiB, members=["x"]),
        DemandClass(id="b-gpu", cpus=1, memory=GiB, gpus=1, members=["y"]),
    ]
    p = PlacementProblem(pools=pools, classes=classes)
    assert solve_greedy(p).placed() == 1
    sol = solve(p)
    assert sol.placed() == 2
    assert sol.status is PlacementStatus.OPTIMAL
    assert {(a.class_id, a.pool_id) for a in sol.assignments} == {
        ("a-cpu", "dear"),
        ("b-gpu", "cheap"),
    }
    assert sol.objective < solve_greedy(p).objective


def test_bound_and_gap_are_consistent() -> None:
    sol = solve(synthetic(5000, 100, 20, seed=2), budget=0.05)
    assert sol.bound <= sol.objective
    assert sol.gap == pytest.approx((sol.objective - sol.bound) / abs(sol.objective), abs=1e-9)
    assert sol.status in (PlacementStatus.OPTIMAL, PlacementStatus.FEASIBLE)
    assert sol.terms["placed"] == sol.placed()
    assert sol.terms["placed"] <= sol.terms["wanted"]


def test_a_budget_of_zero_falls_back_to_the_greedy_answer() -> None:
    p = synthetic(2000, 60, 12, seed=3)
    sol = solve(p, budget=0.0)
    assert sol.status is PlacementStatus.GREEDY_FALLBACK
    assert sol.placed() >= solve_greedy(p).placed()


def test_data_goes_to_the_pool_next_to_it() -> None:
    pools = [
        Pool(id="a-us", provider="x", site="us", cpus=8, memory=64 * GiB),
        Pool(id="b-eu", provider="x", site="eu", cpus=8, memory=64 * GiB),
    ]
    data = [Dataset(id="imagenet", size=150 * 10**9, sites=("eu",))]
    links = [Link(src="eu", dst="us", bandwidth=1e9, egress_per_gb=0.02)]
    cls = DemandClass(id="c", datasets=("imagenet",), members=["t0", "t1"])
    sol = solve(PlacementProblem(pools=pools, classes=[cls], datasets=data, links=links))
    assert [(a.pool_id, a.count) for a in sol.assignments] == [("b-eu", 2)]
    assert sol.terms["data_bytes"] == 0
    # with the eu pool full, the data moves, and the terms say how much and at what price
    full = msgspec.structs.replace(pools[1], cpus=0)
    sol = solve(PlacementProblem(pools=[pools[0], full], classes=[cls], datasets=data, links=links))
    assert [(a.pool_id, a.count) for a in sol.assignments] == [("a-us", 2)]
    assert sol.terms["data_bytes"] == 2 * 150e9
    assert sol.terms["egress_cost"] == pytest.approx(2 * 150 * 0.02)
    assert sol.terms["data_seconds"] == pytest.approx(2 * 150)


def test_without_a_link_the_data_cannot_reach_a_site() -> None:
    pools = [Pool(id="a-us", provider="x", site="us", cpus=8, memory=64 * GiB)]
    data = [Dataset(id="d", size=10**9, sites=("eu",))]
    cls = DemandClass(id="c", datasets=("d",), members=["t"])
    p = PlacementProblem(pools=pools, classes=[cls], datasets=data)
    sol = solve(p)
    assert sol.placed() == 0
    assert "cannot reach site us" in sol.unplaced["c"]


def test_residency_and_gpu_model_are_explained_when_nothing_fits() -> None:
    pools = [
        Pool(
            id="us-h100",
            provider="aws",
            site="us-east-1",
            region="us",
            cpus=64,
            memory=512 * GiB,
            gpus={"H100": 8},
        ),
        Pool(
            id="eu-a100",
            provider="k8s",
            site="eu-west-1",
            region="eu",
            cpus=64,
            memory=512 * GiB,
            gpus={"A100": 8},
        ),
    ]
    cls = DemandClass(id="c", gpus=2, gpu_types=("H100",), residency=("eu-only",), members=["t"])
    p = PlacementProblem(pools=pools, classes=[cls], residency={"eu-only": ("eu",)})
    sol = solve(p)
    assert sol.assignments == []
    why = explain(p, sol, "t")
    assert not why.placed
    assert "no pool offers 1 CPU, 1 GiB, 2 x H100" in why.reason
    assert "not allowed by residency rule eu-only (us-h100)" in why.reason
    assert "no 2 x H100 there (eu-a100)" in why.reason


def test_explain_names_the_choice_and_the_alternatives() -> None:
    pools = [
        Pool(id=f"p{i}", provider="x", cpus=4, memory=64 * GiB, price_per_hour=float(i))
        for i in range(1, 5)
    ]
    p = PlacementProblem(pools=pools, classes=[DemandClass(id="c", members=["t0", "t1"])])
    sol = solve(p)
    why = explain(p, sol, "t0")
    assert why.placed and why.pool == "p1"
    assert why.chosen is not None and why.chosen.cost == pytest.approx(1.0)
    assert [a.pool for a in why.alternatives] == ["p2", "p3", "p4"]
    assert [a.cost for a in why.alternatives] == pytest.approx([2.0, 3.0, 4.0])
    assert "t0 -> p1" in why.render()
    with pytest.raises(KeyError):
        explain(p, sol, "nope")


def test_elastic_pools_launch_just_enough_instances() -> None:
    node = Shape(cpus=8, memory=32 * GiB, gpus={"L4": 1})
    pools = [
        Pool(
            id="cloud",
            provider="aws",
            kind="cloud",
            node=node,
            max_instances=10,
            price_per_hour=1.0,
            boot_s=120,
        ),
    ]
    cls = DemandClass(id="c", cpus=2, memory=4 * GiB, members=[f"t{i}" for i in range(9)])
    sol = solve(PlacementProblem(pools=pools, classes=[cls]))
    assert sol.placed() == 9
    assert sol.instances == {"cloud": 3}  # four 2-CPU tasks per 8-CPU instance
    assert sol.terms["instances"] == 3
    # an instance is billed whole: its boot, then the hour its tasks run
    assert sol.terms["compute_cost"] == pytest.approx(3 * (1 + 120 / 3600))
    assert sol.terms["wait_seconds"] == pytest.approx(3 * 120)


def test_quota_and_pin_and_forbidden_sites() -> None:
    pools = [
        Pool(
            id="a",
            provider="x",
            site="s1",
            cpus=64,
            memory=64 * GiB,
            max_tasks=2,
            hardware_class="gpu=none;cpu=x86_64",
        ),
        Pool(
            id="b",
            provider="x",
            site="s2",
            cpus=64,
            memory=64 * GiB,
            price_per_hour=1.0,
            hardware_class="gpu=none;cpu=arm64",
        ),
    ]
    members = [f"t{i}" for i in range(5)]
    p = PlacementProblem(pools=pools, classes=[DemandClass(id="c", members=members)])
    got = {a.pool_id: a.count for a in solve(p).assignments}
    assert got == {"a": 2, "b": 3}
    pinned = DemandClass(id="c", members=members, hardware_class="gpu=none;cpu=x86_64")
    got = {
        a.pool_id: a.count
        for a in solve(PlacementProblem(pools=pools, classes=[pinned])).assignments
    }
    assert got == {"a": 2}
    away = DemandClass(id="c", members=members, forbid_sites=("s2",))
    got = {
        a.pool_id: a.count for a in solve(PlacementProblem(pools=pools, classes=[away])).assignments
    }
    assert got == {"a": 2}


def test_expand_hands_out_members_in_order_once() -> None:
    p = synthetic(3000, 50, 10, seed=4)
    sol = solve(p, budget=0.05)
    placed = [a.class_id for a in expand(p, sol)]
    assert len(placed) == len(set(placed)) == sol.placed()
    members = {m: c for c in p.classes for m in c.members}
    for c in p.classes:
        mine = [t for t in placed if members[t] is c]
        assert mine == c.members[: len(mine)]


GOOD = Pool(id="p", provider="x", cpus=4, memory=GiB)


@pytest.mark.parametrize(
    ("problem", "path", "words"),
    [
        (
            PlacementProblem(pools=[msgspec.structs.replace(GOOD, cpus=-1.0)], classes=[]),
            "$.pools[0].cpus",
            "must be 0 or more",
        ),
        (
            PlacementProblem(
                pools=[msgspec.structs.replace(GOOD, price_per_hour=math.nan)], classes=[]
            ),
            "$.pools[0].price_per_hour",
            "finite",
        ),
        (
            PlacementProblem(
                pools=[msgspec.structs.replace(GOOD, price_per_hour=math.inf)], classes=[]
            ),
            "$.pools[0].price_per_hour",
            "finite",
        ),
        (
            PlacementProblem(
                pools=[GOOD], classes=[DemandClass(id="c", datasets=("nope",), members=["t"])]
            ),
            "$.classes[0].datasets[0]",
            "unknown dataset 'nope'",
        ),
        (
            PlacementProblem(
                pools=[GOOD],
                classes=[DemandClass(id="c", hardware_class="gpu=B200", members=["t"])],
            ),
            "$.classes[0].hardware_class",
            "no pool has hardware class 'gpu=B200'",
        ),
        (
            PlacementProblem(pools=[msgspec.structs.replace(GOOD, max_instances=3)], classes=[]),
            "$.pools[0].node",
            "needs its instance shape",
        ),
        (
            PlacementProblem(
                pools=[GOOD],
                classes=[],
                links=[Link(src="a", dst="b", bandwidth=0.0)],
            ),
            "$.links[0].bandwidth",
            "greater than 0",
        ),
        (
            PlacementProblem(
                pools=[GOOD], classes=[DemandClass(id="c", residency=("eu",), members=["t"])]
            ),
            "$.classes[0].residency[0]",
            "unknown residency rule 'eu'",
        ),
    ],
)
def test_bad_input_names_the_field_before_solving(
    problem: PlacementProblem, path: str, words: str
) -> None:
    with pytest.raises(SpecError) as e:
        solve(problem, source="cluster.toml")
    assert e.value.path == path
    assert e.value.file == "cluster.toml"
    assert words in e.value.message
    assert e.value.hint


def test_a_problem_the_greedy_solves_optimally_imports_no_cp_sat() -> None:
    """``stowplan run`` solves its first placement in the CLI while Ray starts (``cli.ahead``):
    a sweep of one shape on one pool is placed without importing CP-SAT (ortools brings
    pandas, 0.3 s) or SciPy's LP, which only a problem the greedy leaves open needs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from stowplan.placement import (\n"
        "    DemandClass, PlacementProblem, PlacementStatus, Pool, solve)\n"
        "p = PlacementProblem(pools=[Pool(id='c/cpu', provider='c', cpus=8, memory=8 << 30)],\n"
        "    classes=[DemandClass(id='t', cpus=1, memory=1 << 24,\n"
        "        members=[f'r{i}' for i in range(1000)])])\n"
        "sol = solve(p)\n"
        "assert sol.status is PlacementStatus.OPTIMAL and sol.placed() == 8, sol\n"
        "print(sorted(m for m in ('ortools', 'scipy', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out
