"""Properties of every placement, on random small problems (hypothesis).

The checks here are written from the problem's definition, not with the engine's own helpers,
so an engine bug cannot hide behind a checker with the same bug.
"""

from __future__ import annotations

from unittest import mock

import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stowplan.placement import (
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
    Shape,
    expand,
    solve,
)
from stowplan.placement import table as table_module
from stowplan.placement.greedy import eligible
from stowplan.placement.problem import NodeGroup
from stowplan.placement.synthetic import problem as synthetic
from stowplan.placement.table import Table, build, node_need, pool_reasons, spans

GiB = 1 << 30
MODELS = ("A100", "H100")
SITES = ("eu-1", "eu-2", "us-1")
HW = ("cpu=x86", "cpu=arm")


@st.composite
def pools(draw: st.DrawFn, i: int) -> Pool:
    site = draw(st.sampled_from(SITES))
    elastic = draw(st.booleans())
    gpus = {m: draw(st.integers(0, 4)) for m in draw(st.sets(st.sampled_from(MODELS)))}
    node = None
    groups: tuple[NodeGroup, ...] = ()
    if elastic:
        node = Shape(
            cpus=draw(st.sampled_from([2, 4, 8])), memory=16 * GiB, gpus={m: 2 for m in gpus}
        )
    elif draw(st.booleans()):
        # a batch scheduler's nodes by shape (Slurm): runs must fit one, gangs several
        groups = tuple(
            NodeGroup(
                shape=Shape(
                    cpus=float(draw(st.sampled_from([1, 2, 4]))),
                    memory=draw(st.integers(1, 8)) * GiB,
                    gpus={m: draw(st.integers(0, 2)) for m in gpus},
                ),
                count=draw(st.integers(1, 3)),
            )
            for _ in range(draw(st.integers(1, 2)))
        )
        node = Shape(
            cpus=max(g.shape.cpus for g in groups),
            memory=max(g.shape.memory for g in groups),
            gpus={m: max(g.shape.gpus.get(m, 0) for g in groups) for m in gpus},
        )
    return Pool(
        id=f"p{i}",
        provider="x",
        kind="cloud" if elastic else "slurm",
        site=site,
        region=site[:2],
        cpus=float(draw(st.integers(0, 12))),
        memory=draw(st.integers(0, 48)) * GiB,
        gpus=gpus,
        node=node,
        node_groups=groups,
        max_instances=draw(st.integers(0, 3)) if elastic else 0,
        price_per_hour=float(draw(st.integers(0, 5))),
        expected_wait_s=float(draw(st.integers(0, 3600))),
        hardware_class=draw(st.sampled_from(HW)),
        max_tasks=draw(st.one_of(st.none(), st.integers(0, 6))),
    )


@st.composite
def problems(draw: st.DrawFn, same_priority: bool = False) -> PlacementProblem:
    ps = [draw(pools(i)) for i in range(draw(st.integers(1, 4)))]
    classes = []
    for c in range(draw(st.integers(1, 4))):
        gpus = draw(st.integers(0, 2))
        nodes = draw(st.sampled_from([1, 1, 2]))  # a gang: totals of ``nodes`` equal parts
        classes.append(
            DemandClass(
                id=f"c{c}",
                cpus=float(draw(st.sampled_from([0.5, 1, 2, 3]))) * nodes,
                memory=draw(st.integers(1, 8)) * GiB * nodes,
                gpus=gpus * nodes,
                nodes=nodes,
                gpu_types=tuple(sorted(draw(st.sets(st.sampled_from(MODELS))))) if gpus else (),
                residency=("eu-only",) if draw(st.booleans()) else (),
                hardware_class=draw(st.one_of(st.none(), st.sampled_from(HW))),
                forbid_sites=tuple(sorted(draw(st.sets(st.sampled_from(SITES), max_size=1)))),
                priority=0 if same_priority else draw(st.integers(0, 2)),
                runtime_s=float(draw(st.integers(60, 7200))),
                members=[f"c{c}-t{i}" for i in range(draw(st.integers(1, 8)))],
            )
        )
    p = PlacementProblem(pools=ps, classes=classes, residency={"eu-only": ("eu",)})
    # a pin that no pool offers is bad input (tested elsewhere), not a property case
    have = {x.hardware_class for x in ps}
    assume(all(c.hardware_class in have for c in classes if c.hardware_class))
    return p


def check(problem: PlacementProblem, sol: PlacementSolution) -> None:
    by_pool = {p.id: p for p in problem.pools}
    by_class = {c.id: c for c in problem.classes}
    cpu: dict[str, float] = {}
    mem: dict[str, int] = {}
    gpu: dict[tuple[str, str], int] = {}
    tasks: dict[str, int] = {}
    per_class: dict[str, int] = {}
    for a in sol.assignments:
        c, p = by_class[a.class_id], by_pool[a.pool_id]
        assert a.count > 0
        cpu[p.id] = cpu.get(p.id, 0.0) + a.count * c.cpus
        mem[p.id] = mem.get(p.id, 0) + a.count * c.memory
        tasks[p.id] = tasks.get(p.id, 0) + a.count
        per_class[c.id] = per_class.get(c.id, 0) + a.count
        if c.gpus:
            assert a.gpu_model, "a GPU task must be given a model"
            assert not c.gpu_types or a.gpu_model in c.gpu_types
            gpu[(p.id, a.gpu_model)] = gpu.get((p.id, a.gpu_model), 0) + a.count * c.gpus
        else:
            assert a.gpu_model == ""
        place = {p.site, p.region}
        if c.residency:
            assert place & {"eu"}, f"{c.id} left the eu in {p.id}"
        if c.hardware_class is not None:
            assert p.hardware_class == c.hardware_class
        assert not place & set(c.forbid_sites)
        # a run fits one node of the pool; a gang, its part on each of its nodes
        assert spans(p, c, node_need(c), a.gpu_model), (c, p)
    for pid, used in cpu.items():
        p = by_pool[pid]
        k = sol.instances.get(pid, 0)
        assert k <= p.max_instances
        node = p.node or Shape()
        assert used <= p.cpus + k * node.cpus + 1e-9
        assert mem[pid] <= p.memory + k * node.memory
        if p.max_tasks is not None:
            assert tasks[pid] <= p.max_tasks
    for (pid, m), used_g in gpu.items():
        p = by_pool[pid]
        k = sol.instances.get(pid, 0)
        assert used_g <= p.gpus.get(m, 0) + k * (p.node.gpus.get(m, 0) if p.node else 0)
    for cid, n in per_class.items():
        assert n <= len(by_class[cid].members)
    placed = [a.class_id for a in expand(problem, sol)]
    assert len(placed) == len(set(placed)) == sol.placed()


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(problems())
def test_every_solution_respects_every_constraint(problem: PlacementProblem) -> None:
    sol = solve(problem, budget=2.0)
    check(problem, sol)
    assert sol.bound <= sol.objective


@SETTINGS
@given(problems(same_priority=True), st.data())
def test_more_capacity_never_places_fewer(problem: PlacementProblem, data: st.DataObject) -> None:
    before = solve(problem, budget=5.0)
    i = data.draw(st.integers(0, len(problem.pools) - 1))
    p = problem.pools[i]
    bigger = msgspec.structs.replace(
        p,
        cpus=p.cpus + data.draw(st.integers(0, 8)),
        memory=p.memory + data.draw(st.integers(0, 16)) * GiB,
        gpus={m: n + data.draw(st.integers(0, 2)) for m, n in p.gpus.items()},
    )
    pools = [*problem.pools[:i], bigger, *problem.pools[i + 1 :]]
    after = solve(msgspec.structs.replace(problem, pools=pools), budget=5.0)
    assume(before.status is PlacementStatus.OPTIMAL and after.status is PlacementStatus.OPTIMAL)
    assert after.placed() >= before.placed()


def build_vectorised(problem: PlacementProblem) -> Table:
    """The table through the numpy builder, which large problems take."""
    with mock.patch.object(table_module, "SMALL_POOLS", -1):
        return build(problem)


@SETTINGS
@given(problems())
def test_the_vectorised_table_agrees_with_the_scalar_reasons(problem: PlacementProblem) -> None:
    for table in (build(problem), build_vectorised(problem)):
        for ci, c in enumerate(table.classes):
            usable = {table.pools[j].id for j in table.columns[ci].pool.tolist()}
            for p in table.pools:
                if p.id in usable:
                    assert not pool_reasons(problem, c, p), (c.id, p.id)
                    assert eligible(c, p, problem)
            assert (table.eligible_full[ci] > 0) == any(
                not pool_reasons(problem, c, p) for p in table.pools
            )


def assert_same_table(a: Table, b: Table) -> None:
    assert [p.id for p in a.pools] == [p.id for p in b.pools]
    assert (a.eligible_full, a.need, a.reward, a.models) == (
        b.eligible_full,
        b.need,
        b.reward,
        b.models,
    )
    assert (a.free, a.node, a.instance_cost, a.instance_cost_int, a.scale) == (
        b.free,
        b.node,
        b.instance_cost,
        b.instance_cost_int,
        b.scale,
    )
    for ca, cb in zip(a.columns, b.columns, strict=True):
        for name in ("pool", "model", "ub", "unit", "terms", "cost_int"):
            x, y = getattr(ca, name), getattr(cb, name)
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert (x == y).all(), name  # identical, not merely close


@SETTINGS
@given(problems())
def test_both_table_builders_give_the_same_table(problem: PlacementProblem) -> None:
    assert_same_table(build(problem), build_vectorised(problem))


@settings(max_examples=30, deadline=None)
@given(
    pools=st.integers(1, table_module.SMALL_POOLS),
    classes=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_both_builders_agree_on_fleets(pools: int, classes: int, seed: int) -> None:
    # the synthetic fleet adds what the small strategy lacks: datasets and links, residency,
    # spot rates, waits, runtimes, prices
    p = synthetic(40 * classes, pools, classes, seed=seed)
    assert_same_table(build(p), build_vectorised(p))
