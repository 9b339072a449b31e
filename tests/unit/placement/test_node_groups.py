"""Pools that know their nodes by shape (``Pool.node_groups``: a Slurm partition): a run goes
there only if one node holds it whole, and a gang of n nodes only if n nodes each hold its
part. Pools that do not know their nodes take no gang, saying why."""

from __future__ import annotations

from stowplan.placement import DemandClass, PlacementProblem, Pool, Shape, solve
from stowplan.placement.problem import NodeGroup
from stowplan.placement.table import build, pool_reasons

GiB = 1 << 30


def slurm(groups: list[tuple[float, int, dict[str, int], int]]) -> Pool:
    """A partition of nodes (cpus, GiB, gpus by model, how many), with its totals."""
    node_groups = tuple(
        NodeGroup(shape=Shape(cpus=c, memory=m * GiB, gpus=g), count=n) for c, m, g, n in groups
    )
    models = {k for _, _, g, _ in groups for k in g}
    return Pool(
        id="slurm/main",
        provider="slurm",
        kind="slurm",
        cpus=sum(c * n for c, _, _, n in groups),
        memory=sum(m * n for _, m, _, n in groups) * GiB,
        gpus={k: sum(g.get(k, 0) * n for _, _, g, n in groups) for k in models},
        node=Shape(
            cpus=max(c for c, _, _, _ in groups),
            memory=max(m for _, m, _, _ in groups) * GiB,
            gpus={k: max(g.get(k, 0) for _, _, g, _ in groups) for k in models},
        ),
        node_groups=node_groups,
    )


def gang(cpus: float, mem_gib: int, gpus: int, nodes: int, n: int = 1) -> DemandClass:
    """``n`` runs that each span ``nodes`` nodes with (cpus, memory, gpus) on each."""
    return DemandClass(
        id="c0",
        cpus=cpus * nodes,
        memory=mem_gib * GiB * nodes,
        gpus=gpus * nodes,
        nodes=nodes,
        members=[f"t{i}" for i in range(n)],
    )


def placed(pool: Pool, cls: DemandClass) -> int:
    return solve(PlacementProblem(pools=[pool], classes=[cls])).placed()


def test_a_gang_needs_that_many_nodes_that_each_hold_its_part() -> None:
    four = slurm([(8.0, 16, {}, 4)])
    assert placed(four, gang(8, 16, 0, 2, n=3)) == 2  # 4 nodes: two 2-node gangs at once
    assert placed(four, gang(8, 16, 0, 4)) == 1
    five = gang(8, 16, 0, 5)
    assert placed(four, five) == 0
    assert pool_reasons(PlacementProblem(pools=[four], classes=[five]), five, four) == [
        "4 nodes of it have 8 CPUs, 16 GiB: the task spans 5"
    ]
    # a node's part larger than any node: no gang of any size
    fat = gang(9, 16, 0, 2)
    assert placed(four, fat) == 0


def test_a_gang_of_gpu_nodes_counts_only_the_nodes_with_its_gpus() -> None:
    # 10 GPUs in all, but only two nodes have two each
    mixed = slurm([(8.0, 32, {"a100": 2}, 2), (64.0, 256, {"a100": 1}, 6)])
    assert placed(mixed, gang(4, 16, 2, 2)) == 1
    three = gang(4, 16, 2, 3)
    assert placed(mixed, three) == 0
    problem = PlacementProblem(pools=[mixed], classes=[three])
    assert pool_reasons(problem, three, mixed) == [
        "2 nodes of it have 4 CPUs, 16 GiB and 2 x GPU: the task spans 3"
    ]


def test_a_run_must_fit_one_node_not_the_bounding_shape() -> None:
    # 4 GPUs with 8 CPUs beside 64 CPUs without GPUs: the bounding shape (64 CPUs, 4 GPUs)
    # would admit 32 CPUs with a GPU, which no node holds; sbatch refused it at submit
    mixed = slurm([(8.0, 32, {"a100": 4}, 1), (64.0, 256, {}, 1)])
    both = gang(32, 8, 1, 1)
    assert placed(mixed, both) == 0
    assert pool_reasons(PlacementProblem(pools=[mixed], classes=[both]), both, mixed) == [
        "no node of it has 32 CPUs, 8 GiB and 1 x GPU together"
    ]
    assert placed(mixed, gang(32, 8, 0, 1)) == 1
    assert placed(mixed, gang(8, 8, 1, 1)) == 1


def test_a_pool_that_does_not_know_its_nodes_takes_no_gang() -> None:
    local = Pool(id="local", provider="local", cpus=64, memory=256 * GiB)
    two = gang(1, 1, 0, 2)
    assert placed(local, two) == 0
    problem = PlacementProblem(pools=[local], classes=[two])
    assert pool_reasons(problem, two, local) == [
        "its runs do not span nodes (the task asks for nodes = 2)"
    ]
    assert build(problem).eligible_full == [0]
    assert placed(local, gang(1, 1, 0, 1)) == 1
