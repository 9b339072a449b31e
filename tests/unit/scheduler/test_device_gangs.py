"""The core leases a gang on a pool that knows its devices and its nodes: each node's part on
its own node, one lease naming them all, given back whole when the attempt ends."""

from __future__ import annotations

import msgspec

from stowplan.placement.problem import NodeGroup, Shape
from stowplan.scheduler.reports import ProviderState
from tests.unit.scheduler.test_core import Harness, items, task
from tests.unit.scheduler.test_devices import device_pool


def gang_pool(nodes: int, per_node: int):  # type: ignore[no-untyped-def]
    p = device_pool(nodes, per_node)
    shape = Shape(cpus=64, memory=1 << 40, gpus={"a100": per_node})
    return msgspec.structs.replace(p, node_groups=(NodeGroup(shape=shape, count=nodes),))


def test_a_gang_gets_one_lease_over_distinct_nodes_and_gives_it_back() -> None:
    h = Harness(gang_pool(3, 4))
    # h's 4 GPUs fit the pool's total left after g, but not one node's 2 each on 2 nodes
    out = h.submit(task("g", gpus=8, cpus=2, nodes=2), task("h", gpus=4, cpus=2, nodes=2))
    got = {i.run_id: i.lease for i in items(out)}
    assert set(got) == {"g"}  # the second gang finds one node left
    lease = got["g"]
    assert lease is not None and lease == h.core.lease("g")
    parts = lease.parts()
    assert len(parts) == 2 and len({n for n, _ in parts}) == 2
    assert all(devs == (0, 1, 2, 3) for _, devs in parts)
    assert h.core.held("h").endswith("1 node can hold a part (2 free devices); the gang spans 2")
    # the gang ends: both its nodes come back, and the second gang goes
    out = h.report("g", ProviderState.SUCCEEDED)
    got = {i.run_id: i.lease for i in items(out)}
    assert set(got) == {"h"}
