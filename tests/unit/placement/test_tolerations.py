"""Tainted pools: offered only to classes that tolerate every taint key, on every path of the
placer (the scalar and vector tables, greedy, CP-SAT) and in the reasons a pool is out."""

from __future__ import annotations

import pytest

from stowplan.placement import solve
from stowplan.placement.greedy import eligible, solve_greedy, why_not
from stowplan.placement.problem import (
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    Pool,
    Shape,
)
from stowplan.placement.table import SMALL_POOLS

GiB = 1 << 30


def problem(padding: int = 0, *, elastic: bool = False) -> PlacementProblem:
    dedicated = Pool(
        id="k8s/dedicated",
        provider="k8s",
        kind="kubernetes",
        cpus=0.0 if elastic else 64.0,
        memory=0 if elastic else 256 * GiB,
        node=Shape(cpus=16, memory=64 * GiB),
        max_instances=4 if elastic else 0,
        boot_s=120.0 if elastic else 0.0,
        taints=("dedicated", "example.com/team"),
    )
    shared = Pool(
        id="k8s/shared",
        provider="k8s",
        kind="kubernetes",
        cpus=64.0,
        memory=256 * GiB,
        price_per_hour=5.0,  # dearer: every class would rather go to the dedicated pool
        expected_wait_s=600.0,
    )
    # pools no class fits (too small nodes): more than SMALL_POOLS selects the vector table
    pad = [
        Pool(id=f"x/p{i:02d}", provider="x", cpus=1.0, memory=GiB, node=Shape(cpus=1, memory=GiB))
        for i in range(padding)
    ]
    classes = [
        DemandClass(
            id="c0",
            cpus=4,
            memory=8 * GiB,
            members=["tolerant-0", "tolerant-1"],
            tolerations=("dedicated", "example.com/team", "other"),
        ),
        DemandClass(
            id="c1", cpus=4, memory=8 * GiB, members=["half-0"], tolerations=("dedicated",)
        ),
        DemandClass(id="c2", cpus=4, memory=8 * GiB, members=["plain-0", "plain-1"]),
    ]
    return PlacementProblem(pools=[dedicated, shared, *pad], classes=classes)


def pools_by_class(solution: PlacementSolution) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a in solution.assignments:
        out.setdefault(a.class_id, set()).add(a.pool_id)
    return out


@pytest.mark.parametrize("padding", [0, SMALL_POOLS + 4], ids=["scalar-table", "vector-table"])
@pytest.mark.parametrize("placer", ["solve", "greedy"])
@pytest.mark.parametrize("elastic", [False, True], ids=["fixed", "elastic"])
def test_only_tolerating_classes_go_to_a_tainted_pool(
    padding: int, placer: str, elastic: bool
) -> None:
    p = problem(padding, elastic=elastic)
    solution = solve(p) if placer == "solve" else solve_greedy(p)
    assert solution.placed() == 5
    assert pools_by_class(solution) == {
        "c0": {"k8s/dedicated"},
        "c1": {"k8s/shared"},
        "c2": {"k8s/shared"},
    }
    assert solution.instances == ({"k8s/dedicated": 1} if elastic else {})


def test_classes_that_do_not_tolerate_the_only_pool_stay_unplaced() -> None:
    p = problem()
    only = PlacementProblem(pools=[p.pools[0]], classes=p.classes)
    solution = solve(only, budget=1.0)
    assert pools_by_class(solution) == {"c0": {"k8s/dedicated"}}
    assert set(solution.unplaced) == {"c1", "c2"}


def test_reasons_name_the_taints_and_the_fix() -> None:
    p = problem()
    dedicated = p.pools[0]
    c0, c1, c2 = p.classes
    assert eligible(c0, dedicated, p)
    assert not eligible(c1, dedicated, p) and not eligible(c2, dedicated, p)
    why = why_not(c1, [dedicated], p)
    assert "tainted example.com/team" in why and "placement.tolerations" in why
    assert "dedicated," not in why  # the tolerated key is not a reason
    assert eligible(c2, p.pools[1], p)  # no taints: every class may go
