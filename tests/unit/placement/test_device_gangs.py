"""Gangs on devices: one node's part on each of n distinct nodes, all or none."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stowplan.errors import SpecError
from stowplan.placement.devices import (
    MILLI,
    DeviceLedger,
    DeviceModel,
    DeviceNode,
    DeviceTask,
    Placement,
)
from stowplan.placement.leases import (
    DeviceLease,
    NodeDevices,
    PoolDevices,
    lease_columns,
    lease_from_columns,
)
from tests.unit.placement.test_devices import MIX, check_ledger, nodes_st


def nodes(*gpus: int, model: str = "A") -> list[DeviceNode]:
    return [
        DeviceNode(name=f"n{i}", cpu=16000, memory=64, gpus=g, model=model)
        for i, g in enumerate(gpus)
    ]


def test_a_gang_takes_its_part_on_distinct_nodes() -> None:
    m = DeviceModel(nodes(4, 4, 4), shapes=MIX)
    part = DeviceTask(cpu=2000, memory=4, gpus=2, nodes=2)
    got = m.place_gang(part)
    assert got is not None and len(got) == 2
    assert len({p.node for p in got}) == 2  # never two parts on one node, though one has room
    assert all(len(p.devices) == 2 for p in got)
    check_ledger(m, {i: (p, part) for i, p in enumerate(got)})


def test_a_gang_that_does_not_fit_takes_nothing() -> None:
    m = DeviceModel(nodes(4, 4, 2), shapes=MIX)
    m.commit(0, DeviceTask(cpu=1000, memory=1, gpus=2), (0, 1))  # n0 keeps 2 of 4 free
    before = ([list(d) for d in m.dev_free], list(m.cpu_free), m.classes())
    part = DeviceTask(cpu=1000, memory=1, gpus=4, nodes=2)
    assert m.place_gang(part) is None
    assert ([list(d) for d in m.dev_free], list(m.cpu_free), m.classes()) == before
    why = m.why_not_gang(part)
    assert why == "1 node can hold a part (4 free devices); the gang spans 2"
    # the nodes left out while the gang was tried are placeable again
    assert m.place_gang(msgspec.structs.replace(part, nodes=1)) is not None


def test_parts_are_released_one_by_one() -> None:
    m = DeviceModel(nodes(2, 2), shapes=MIX)
    part = DeviceTask(cpu=1000, memory=1, gpus=2, nodes=2)
    got = m.place_gang(part)
    assert got is not None
    assert m.place(DeviceTask(gpus=1)) is None
    for p in got:
        m.release(p, part)
    assert m.dev_free == [[MILLI, MILLI], [MILLI, MILLI]]
    assert m.classes() == 1


def test_a_share_spans_one_node() -> None:
    m = DeviceModel(nodes(2, 2), shapes=MIX)
    with pytest.raises(SpecError, match="spans one node"):
        m.place_gang(DeviceTask(gpus=1, milli=500, nodes=2))
    with pytest.raises(SpecError, match="1 or more nodes"):
        m.place_gang(DeviceTask(gpus=1, nodes=0))


gang_st = st.builds(
    lambda cpu, k, models, n: DeviceTask(cpu=cpu, memory=4, gpus=k, models=models, nodes=n),
    st.sampled_from([0, 1000, 4000]),
    st.integers(0, 3),
    st.sampled_from([None, frozenset({"A"})]),
    st.integers(1, 4),
)


@settings(max_examples=150, deadline=None)
@given(nodes=nodes_st, ops=st.lists(st.tuples(gang_st, st.integers(0, 4)), max_size=15))
def test_a_gang_fits_exactly_when_enough_nodes_each_hold_a_part(
    nodes: list[DeviceNode], ops: list[tuple[DeviceTask, int]]
) -> None:
    """Against a per-node brute force: the gang is placed iff at least n nodes could each
    host a part now; no device is ever exceeded; a gang never has two parts on one node."""
    m = DeviceModel(nodes, shapes=MIX)
    held: dict[int, tuple[Placement, DeviceTask]] = {}  # gang k's part j at k * 8 + j
    for k, (part, r) in enumerate(ops):
        n = part.nodes
        if r == 0 and held:  # now and then, a whole gang departs
            first = min(held) // 8
            for key in [key for key in held if key // 8 == first]:
                m.release(*held.pop(key))
        could = sum(1 for i in range(len(nodes)) if _brute_holds(m, i, part))
        got = m.place_gang(part)
        if could >= n:
            assert got is not None and len(got) == n
            assert len({p.node for p in got}) == n
            for j, p in enumerate(got):
                held[k * 8 + j] = (p, part)
        else:
            assert got is None
            assert m.why_not_gang(part)
        check_ledger(m, held)


def _brute_holds(m: DeviceModel, i: int, task: DeviceTask) -> bool:
    node = m.nodes[i]
    if m.cpu_free[i] < task.cpu or m.mem_free[i] < task.memory:
        return False
    if not task.gpus:
        return True
    if task.models is not None and node.model not in task.models:
        return False
    return sum(1 for f in m.dev_free[i] if f == MILLI) >= task.gpus


# -- the ledger: a gang's lease names every node -------------------------------------------------


def pool(*gpus: int) -> PoolDevices:
    return PoolDevices(
        nodes=tuple(
            NodeDevices(name=f"n{i}", model="A", devices=(MILLI,) * g) for i, g in enumerate(gpus)
        )
    )


def test_a_gang_lease_names_each_node_and_is_given_back_whole() -> None:
    ledger = DeviceLedger(pool(4, 4, 4))
    task = ledger.task(cpus=8, memory=0, gpus=8, models=["A"], nodes=2)
    assert task is not None and task.gpus == 4 and task.nodes == 2
    assert ledger.take("r", task) is None
    lease = ledger.confirm("r", "k1")
    assert lease is not None and len({n for n, _ in lease.parts()}) == 2
    assert all(devs == (0, 1, 2, 3) for _, devs in lease.parts())
    assert ledger.lease("r") == lease and ledger.held_gpus() == 8
    # a second such gang finds one node left: it waits, saying why
    assert ledger.take("s", task) == "1 node can hold a part (4 free devices); the gang spans 2"
    ledger.give("r")
    assert ledger.model.dev_free == [[MILLI] * 4] * 3


def test_a_restored_gang_lease_is_held_again_or_not_at_all() -> None:
    ledger = DeviceLedger(pool(2, 2, 2))
    task = ledger.task(cpus=2, memory=0, gpus=4, models=["A"], nodes=2)
    assert task is not None
    lease = DeviceLease("n2", (0, 1), (("n0", (0, 1)),))
    assert ledger.hold("r", "k1", task, lease)
    assert ledger.lease("r") == lease
    assert ledger.model.dev_free == [[0, 0], [MILLI, MILLI], [0, 0]]
    # a lease that names one node twice, a missing node, or too few parts takes nothing
    for bad in (
        DeviceLease("n1", (0, 1), (("n1", (0, 1)),)),
        DeviceLease("n1", (0, 1), (("gone", (0, 1)),)),
        DeviceLease("n1", (0, 1)),
    ):
        assert not ledger.hold("s", "k2", task, bad)
        assert ledger.model.dev_free[1] == [MILLI, MILLI]
    # rediscovered without n0: the gang's hold goes with it, whole
    smaller = PoolDevices(nodes=pool(2, 2, 2).nodes[1:])
    assert "r" not in ledger.rebuilt(smaller).holds
    assert ledger.rebuilt(pool(2, 2, 2)).lease("r") == lease


def test_a_one_node_lease_stored_before_gangs_still_reads() -> None:
    old = msgspec.json.encode(["n1", [0, 1]])
    assert msgspec.json.decode(old, type=DeviceLease) == DeviceLease("n1", (0, 1))


def test_the_store_columns_keep_a_gang_lease_and_read_old_rows() -> None:
    gang = DeviceLease("n1", (0, 1), (("n2", (2, 3)),))
    assert lease_columns(gang) == ("n1;n2", "0,1;2,3")
    assert lease_from_columns(*lease_columns(gang)) == gang
    one = DeviceLease("n1", (0,))
    assert lease_columns(one) == ("n1", "0")  # what rows held before gangs
    assert lease_from_columns("n1", "0") == one
    assert lease_from_columns("n1", "") == DeviceLease("n1", ())
    assert lease_columns(DeviceLease("", ())) == (None, "")
    for node, devices in ((None, "0"), ("n1", None), ("n1;n2", "0"), ("n1", "x")):
        assert lease_from_columns(node, devices) is None


def test_a_gang_lease_is_named_node_by_node() -> None:
    from stowplan.placement.explain import lease_text

    gang = DeviceLease("n1", (0, 1), (("n2", (2, 3)),))
    assert lease_text(gang) == "node n1, GPUs 0,1; node n2, GPUs 2,3"
    assert lease_text(DeviceLease("n1", (0,)), 250) == "node n1, 0.25 of GPU 0"


def test_held_gpus_counts_the_confirmed_holds_through_every_change() -> None:
    """``held_gpus`` is kept as holds change, not summed: it must equal the sum at each step."""
    ledger = DeviceLedger(pool(4, 4, 4))

    def summed(ledger: DeviceLedger) -> int:
        return sum(h.task.gpus * h.task.nodes for h in ledger.holds.values() if h.key)

    gang = ledger.task(cpus=2, memory=0, gpus=4, models=["A"], nodes=2)
    one = ledger.task(cpus=1, memory=0, gpus=1, models=["A"])
    assert gang is not None and one is not None
    steps = [
        lambda: ledger.take("g", gang),  # taken, not confirmed: not counted
        lambda: ledger.confirm("g", "k1"),
        lambda: ledger.take("a", one),
        lambda: ledger.confirm("a", "k2"),
        lambda: ledger.take("a", one),  # taken again: the old hold given back first
        lambda: ledger.follow("a", "k3", one, DeviceLease("n2", (3,))),
        lambda: ledger.hold("b", "k4", one, DeviceLease("n2", (2,))),
        lambda: ledger.give("g"),
        lambda: ledger.give("missing"),
    ]
    for step in steps:
        step()
        assert ledger.held_gpus() == summed(ledger)
    rebuilt = ledger.rebuilt(pool(4, 4, 4))
    assert rebuilt.held_gpus() == summed(rebuilt) == summed(ledger) > 0
