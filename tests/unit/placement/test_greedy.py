"""The greedy placer: capacity, eligibility, cost order, determinism, reasons."""

from __future__ import annotations

import copy

import pytest

from stowplan.placement.greedy import eligible, fits, solve_greedy, why_not
from stowplan.placement.problem import (
    Assignment,
    DemandClass,
    PlacementProblem,
    PlacementStatus,
    Pool,
)

GiB = 1 << 30


def pool(
    pid: str,
    *,
    cpus: float = 8,
    memory: int = 64 * GiB,
    gpus: dict[str, int] | None = None,
    price: float = 0.0,
    wait: float = 0.0,
) -> Pool:
    return Pool(
        id=pid,
        provider=pid.split("/")[0],
        cpus=cpus,
        memory=memory,
        gpus=gpus or {},
        price_per_hour=price,
        expected_wait_s=wait,
    )


def cls(
    cid: str,
    n: int,
    *,
    cpus: float = 1.0,
    memory: int = GiB,
    gpus: int = 0,
    gpu_types: tuple[str, ...] = (),
    allowed: tuple[str, ...] | None = None,
) -> DemandClass:
    return DemandClass(
        id=cid,
        cpus=cpus,
        memory=memory,
        gpus=gpus,
        gpu_types=gpu_types,
        allowed_pools=allowed,
        members=[f"{cid}-{i}" for i in range(n)],
    )


def place(pools: list[Pool], classes: list[DemandClass], request_id: int = 1) -> dict[str, int]:
    sol = solve_greedy(PlacementProblem(request_id=request_id, pools=pools, classes=classes))
    out: dict[str, int] = {}
    for a in sol.assignments:
        key = f"{a.class_id}@{a.pool_id}"
        out[key] = out.get(key, 0) + a.count
    return out


def test_fills_to_cpu_capacity_and_explains_the_rest() -> None:
    problem = PlacementProblem(request_id=4, pools=[pool("p/a", cpus=4)], classes=[cls("c", 10)])
    sol = solve_greedy(problem)
    assert sol.request_id == 4
    assert sol.status is PlacementStatus.GREEDY
    assert sol.assignments == [Assignment("c", "p/a", 4)]
    assert sol.unplaced == {"c": "6 waiting: no free capacity left for 1 CPU, 1 GiB in p/a"}


def test_everything_placed_has_no_reason() -> None:
    sol = solve_greedy(
        PlacementProblem(request_id=1, pools=[pool("p/a", cpus=4)], classes=[cls("c", 3)])
    )
    assert sol.assignments == [Assignment("c", "p/a", 3)]
    assert sol.unplaced == {}


def test_memory_and_fractional_cpus_limit_too() -> None:
    assert place([pool("p/a", cpus=64, memory=10 * GiB)], [cls("c", 9, memory=4 * GiB)]) == {
        "c@p/a": 2
    }
    assert place([pool("p/a", cpus=1.5)], [cls("c", 9, cpus=0.5)]) == {"c@p/a": 3}
    assert place([pool("p/a", cpus=0.9)], [cls("c", 1, cpus=0.3)]) == {"c@p/a": 1}  # no fp loss


def test_classes_share_capacity_in_id_order() -> None:
    # the core names classes c000000, c000001, ... in fair-share order; input order is ignored
    pools = [pool("p/a", cpus=5)]
    assert place(pools, [cls("x", 3, cpus=1), cls("y", 3, cpus=1)]) == {"x@p/a": 3, "y@p/a": 2}
    assert place(pools, [cls("y", 3, cpus=1), cls("x", 3, cpus=1)]) == {"x@p/a": 3, "y@p/a": 2}


def test_cheapest_pool_first_then_wait_then_id() -> None:
    pools = [
        pool("p/dear", cpus=2, price=3.0),
        pool("p/cheap", cpus=2, price=1.0),
        pool("p/mid-slow", cpus=2, price=2.0, wait=600),
        pool("p/mid-fast", cpus=2, price=2.0, wait=10),
        pool("p/mid-fast2", cpus=2, price=2.0, wait=10),
    ]
    sol = solve_greedy(PlacementProblem(request_id=1, pools=pools, classes=[cls("c", 9)]))
    # one hour of runtime by default; a task-hour of waiting is worth 1 (Weights.hour_value)
    assert {a.pool_id: a.count for a in sol.assignments} == {
        "p/cheap": 2,
        "p/mid-fast": 2,
        "p/mid-fast2": 2,
        "p/mid-slow": 2,
        "p/dear": 1,
    }
    expected = 2 * 1.0 + 2 * (2 + 10 / 3600) * 2 + 2 * (2 + 600 / 3600) + 1 * 3.0
    assert sol.terms["cost"] == pytest.approx(expected)
    assert sol.terms["wait_seconds"] == pytest.approx(4 * 10 + 2 * 600)


def test_allowed_pools_are_respected() -> None:
    pools = [pool("p/cheap", price=0.0), pool("p/dear", cpus=2, price=5.0)]
    assert place(pools, [cls("c", 3, allowed=("p/dear",))]) == {"c@p/dear": 2}
    sol = solve_greedy(
        PlacementProblem(request_id=1, pools=pools, classes=[cls("c", 1, allowed=("p/none",))])
    )
    assert sol.assignments == []
    assert sol.unplaced == {
        "c": "no pool offers 1 CPU, 1 GiB: not among the allowed pools (2 pools)"
    }


def test_gpu_models_are_respected() -> None:
    pools = [
        pool("p/a100", cpus=64, gpus={"A100": 8}),
        pool("p/h100", cpus=64, gpus={"H100": 3}, price=10.0),
        pool("p/cpu", cpus=64),
    ]
    assert place(pools, [cls("h", 5, gpus=1, gpu_types=("H100",))]) == {"h@p/h100": 3}
    assert place(pools, [cls("any", 12, gpus=1)]) == {"any@p/a100": 8, "any@p/h100": 3}
    assert place(pools, [cls("two", 9, gpus=2, gpu_types=("A100", "H100"))]) == {
        "two@p/a100": 4,
        "two@p/h100": 1,
    }
    assert place(pools, [cls("big", 1, gpus=4, gpu_types=("H100",))]) == {}


def test_gpus_used_by_one_class_are_gone_for_the_next() -> None:
    pools = [pool("p/g", cpus=64, gpus={"A100": 4})]
    got = place(pools, [cls("a", 3, gpus=1), cls("b", 3, gpus=1, gpu_types=("A100",))])
    assert got == {"a@p/g": 3, "b@p/g": 1}


def test_one_gpu_model_per_assignment() -> None:
    # a class may use either model, but each member sits on one model
    pools = [pool("p/mixed", cpus=64, gpus={"A100": 2, "H100": 3})]
    sol = solve_greedy(PlacementProblem(pools=pools, classes=[cls("c", 9, gpus=1)]))
    assert {a.gpu_model: a.count for a in sol.assignments} == {"A100": 2, "H100": 3}
    assert all(a.pool_id == "p/mixed" for a in sol.assignments)


def test_gpu_reason_names_the_model() -> None:
    pools = [pool("p/a100", cpus=64, gpus={"A100": 8})]
    c = cls("h", 1, gpus=2, gpu_types=("H100",))
    assert why_not(c, pools) == (
        "no allowed pool offers 1 CPU, 1 GiB, 2 x GPU H100 (1 pool: no 2 x H100 there)"
    )
    assert why_not(cls("a", 1, gpus=1), []) == "no allowed pool offers 1 CPU, 1 GiB, 1 x GPU any"


def test_deterministic_and_independent_of_input_order() -> None:
    pools = [pool(f"p/{i}", cpus=3, price=float(i % 3), wait=float(i % 2)) for i in range(7)]
    classes = [cls("a", 7, cpus=2), cls("b", 5), cls("c", 4, memory=3 * GiB)]
    first = solve_greedy(PlacementProblem(request_id=9, pools=pools, classes=classes))
    again = solve_greedy(PlacementProblem(request_id=9, pools=pools, classes=classes))
    shuffled = solve_greedy(
        PlacementProblem(request_id=9, pools=list(reversed(pools)), classes=classes)
    )
    assert first == again == shuffled


def test_never_places_more_than_members_or_capacity() -> None:
    pools = [pool("p/a", cpus=7, memory=9 * GiB), pool("p/b", cpus=3, memory=100 * GiB)]
    classes = [cls("a", 4, cpus=2, memory=2 * GiB), cls("b", 20, cpus=1, memory=3 * GiB)]
    sol = solve_greedy(PlacementProblem(request_id=1, pools=pools, classes=classes))
    by_class = {c.id: 0 for c in classes}
    used = {p.id: [0.0, 0] for p in pools}
    size = {c.id: c for c in classes}
    for a in sol.assignments:
        by_class[a.class_id] += a.count
        used[a.pool_id][0] += a.count * size[a.class_id].cpus
        used[a.pool_id][1] += a.count * size[a.class_id].memory
    # a: 3 on p/a (7 CPUs), 1 on p/b; b: the last CPU of each pool
    assert by_class == {"a": 4, "b": 2}
    assert sol.assignments == [
        Assignment("a", "p/a", 3),
        Assignment("a", "p/b", 1),
        Assignment("b", "p/a", 1),
        Assignment("b", "p/b", 1),
    ]
    for p in pools:
        assert used[p.id][0] <= p.cpus and used[p.id][1] <= p.memory
    assert set(sol.unplaced) == {"b"}


def test_does_not_mutate_its_input() -> None:
    pools = [pool("p/g", cpus=4, gpus={"A100": 2})]
    classes = [cls("c", 5, gpus=1)]
    problem = PlacementProblem(request_id=1, pools=pools, classes=classes)
    before = copy.deepcopy(problem)
    solve_greedy(problem)
    assert problem == before
    assert pools[0].gpus == {"A100": 2}


def test_eligible_and_fits() -> None:
    p = pool("p/g", cpus=8, memory=16 * GiB, gpus={"A100": 2})
    assert eligible(cls("c", 1), p)
    assert eligible(cls("c", 1, gpus=2), p)
    assert not eligible(cls("c", 1, gpus=3), p)
    assert not eligible(cls("c", 1, gpus=1, gpu_types=("H100",)), p)
    assert not eligible(cls("c", 1, allowed=("p/other",)), p)
    assert fits(cls("c", 1, cpus=3), 8, 16 * GiB, {}) == 2
    assert fits(cls("c", 1, memory=5 * GiB), 8, 16 * GiB, {}) == 3
    assert fits(cls("c", 1, gpus=1), 8, 16 * GiB, {"A100": 2}) == 2
    assert fits(cls("c", 1, gpus=1, gpu_types=("H100",)), 8, 16 * GiB, {"A100": 2}) == 0
    assert fits(cls("c", 1), -1.0, 16 * GiB, {}) == 0
    assert fits(cls("c", 4, cpus=0, memory=0), 0, 0, {}) == 4
