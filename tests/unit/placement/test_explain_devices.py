"""``explain`` in pools that know their devices: it names the node and devices a task gets,
and says when the capacity the pool's totals show is there only in pieces."""

from __future__ import annotations

from stowplan.placement import solve
from stowplan.placement.explain import explain, lease_text
from stowplan.placement.leases import MILLI, DeviceLease, NodeDevices, PoolDevices
from stowplan.placement.problem import (
    Assignment,
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
)

GiB = 1 << 30


def pool(free: list[tuple[int, ...]]) -> Pool:
    devices = PoolDevices(
        nodes=tuple(NodeDevices(name=f"n{i}", model="a100", devices=d) for i, d in enumerate(free))
    )
    whole = sum(1 for d in free for x in d if x == MILLI)
    return Pool(
        id="k8s", provider="k8s", cpus=64, memory=512 * GiB, gpus={"a100": whole}, devices=devices
    )


def test_a_placed_task_names_its_node_and_devices() -> None:
    p = pool([(MILLI, 0, 0, 0), (MILLI,) * 4])
    problem = PlacementProblem(
        pools=[p],
        classes=[DemandClass(id="c", cpus=1, memory=GiB, gpus=2, members=["two"])],
    )
    solution = solve(problem)
    e = explain(problem, solution, "two")
    assert e.placed and e.devices == DeviceLease("n1", (0, 1))
    assert "\n  k8s: node n1, GPUs 0,1" in e.render()


def test_totals_that_exist_only_in_pieces_are_not_a_placement() -> None:
    p = pool([(MILLI, 0), (MILLI, 0), (MILLI, 0)])
    problem = PlacementProblem(
        pools=[p],
        classes=[DemandClass(id="c", cpus=1, memory=GiB, gpus=2, members=["two"])],
    )
    # a placer that counts GPUs per pool puts it there (3 free >= 2) ...
    solution = PlacementSolution(
        request_id=0,
        status=PlacementStatus.GREEDY,
        assignments=[Assignment("c", "k8s", 1, "a100")],
    )
    e = explain(problem, solution, "two")
    # ... but no node has 2 free devices
    assert not e.placed
    assert e.reason == (
        "k8s: 3 GPUs free on 3 nodes, none has 2 free devices (at most 1 on one node)"
    )


def test_an_unplaced_task_is_told_the_capacity_is_fragmented() -> None:
    p = pool([(MILLI, 0), (MILLI, 0)])
    problem = PlacementProblem(
        pools=[p],
        classes=[DemandClass(id="c", cpus=1, memory=GiB, gpus=2, members=["two"])],
    )
    solution = PlacementSolution(request_id=0, status=PlacementStatus.GREEDY, assignments=[])
    e = explain(problem, solution, "two")
    assert not e.placed and "none has 2 free devices" in e.reason


def test_the_lease_line_names_the_pool_node_and_gpus() -> None:
    assert lease_text(DeviceLease("myhost", (0, 1))) == "node myhost, GPUs 0,1"
    assert lease_text(DeviceLease("myhost", (3,))) == "node myhost, GPU 3"
    assert lease_text(DeviceLease("myhost", ())) == "node myhost, no GPU"
    p = pool([(MILLI, MILLI)])
    problem = PlacementProblem(
        pools=[p], classes=[DemandClass(id="c", cpus=1, memory=GiB, gpus=2, members=["two"])]
    )
    e = explain(problem, solve(problem), "two")
    assert "\n  k8s: node n0, GPUs 0,1" in e.render()


def test_what_the_core_made_of_the_answer_is_the_answer() -> None:
    # the caller (``stowplan plan``) fed the solution to the scheduler core, as ``run`` does:
    # its leases and its refusals are shown, not a replay of the solution
    p = pool([(MILLI,) * 4, (MILLI,) * 4])
    problem = PlacementProblem(
        pools=[p],
        classes=[DemandClass(id="c", cpus=1, memory=GiB, gpus=2, members=["a", "b"])],
    )
    solution = solve(problem)
    e = explain(problem, solution, "b", leases={"a": DeviceLease("n0", (2, 3))}, refused={})
    assert e.placed and e.devices is None  # the core gave b no lease here: none is made up
    e = explain(problem, solution, "a", leases={"a": DeviceLease("n0", (2, 3))}, refused={})
    assert e.placed and e.devices == DeviceLease("n0", (2, 3))
    why = "k8s: 8 GPUs free on 5 nodes, none has 2 free devices (at most 1 on one node)"
    e = explain(problem, solution, "b", leases={}, refused={"b": why})
    assert not e.placed and e.reason == why
    assert e.render().endswith(f"not placed ({solution.status}): {why}")


def test_a_run_the_answer_left_out_is_told_what_the_core_holds_it_for() -> None:
    p = pool([(MILLI, 0), (MILLI, 0)])
    problem = PlacementProblem(
        pools=[p],
        classes=[DemandClass(id="c", cpus=1, memory=GiB, gpus=2, members=["two"])],
    )
    solution = PlacementSolution(request_id=0, status=PlacementStatus.GREEDY, assignments=[])
    why = "k8s: 2 GPUs free on 2 nodes, none has 2 free devices (at most 1 on one node)"
    e = explain(problem, solution, "two", leases={}, refused={"two": why})
    assert not e.placed and e.reason == why
