"""The core places runs on the devices of pools that know them: the lease is the placement.

Pools with ``Pool.devices`` get node and device indices in every ``SubmitItem``; no device is
ever leased beyond its capacity; a run that fits the pool's totals but no node's devices stays
READY with the reason (capacity there only in pieces); devices come back when the attempt ends.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping

import msgspec

from stowplan.placement import solve
from stowplan.placement.leases import MILLI, DeviceLease, NodeDevices, PoolDevices
from stowplan.placement.problem import PlacementContext, Pool
from stowplan.scheduler.events import (
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    RestoredTask,
    SolvePlacement,
    TasksRestored,
    Transition,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.states import LEASED, TaskState
from tests.unit.scheduler.test_core import Harness, items, task, transitions

GiB = 1 << 30


def device_pool(
    nodes: int,
    per_node: int,
    *,
    model: str = "a100",
    free: Mapping[int, tuple[int, ...]] | None = None,
) -> Pool:
    """``nodes`` nodes of ``per_node`` devices; ``free``: node -> milli free per device."""
    free = free or {}
    spec = PoolDevices(
        nodes=tuple(
            NodeDevices(name=f"n{i}", model=model, devices=free.get(i, (MILLI,) * per_node))
            for i in range(nodes)
        )
    )
    gpus = sum(sum(1 for d in n.devices if d == MILLI) for n in spec.nodes)
    return Pool(
        id="k8s/gpu",
        provider="k8s",
        kind="kubernetes",
        cpus=1000,
        memory=1 << 50,
        gpus={model: gpus},
        devices=spec,
    )


def leased(h: Harness) -> dict[str, DeviceLease]:
    out = {}
    for run_id in h.core.run_ids():
        lease = h.core.lease(run_id)
        if lease is not None:
            out[run_id] = lease
    return out


def test_submit_carries_node_and_devices() -> None:
    h = Harness(device_pool(2, 4))
    out = h.submit(task("a", gpus=2), task("b", gpus=1))
    got = {i.run_id: i.lease for i in items(out)}
    assert set(got) == {"a", "b"}
    for run_id, lease in got.items():
        assert lease is not None and lease == h.core.lease(run_id)
        assert len(lease.devices) == h.core._runs[run_id].task.gpus
    a, b = got["a"], got["b"]
    assert a is not None and b is not None
    assert a.node != b.node or not set(a.devices) & set(b.devices)


def test_fragmented_capacity_is_refused_with_the_reason() -> None:
    # 5 whole GPUs free on 5 nodes, but no node has 2: the pool's total (5) says yes
    free: dict[int, tuple[int, ...]] = {i: (MILLI, 0) for i in range(5)}
    p = device_pool(5, 2, free=free)
    assert p.gpus == {"a100": 5}
    h = Harness(p)
    out = h.submit(task("two", gpus=2))
    assert items(out) == []
    assert h.states("two") == [TaskState.READY]
    why = h.core.held("two")
    assert why.startswith("k8s/gpu: 5 GPUs free on 5 nodes, none has 2 free devices"), why
    recorded = [t for t in transitions(out) if t.from_state is t.to_state is TaskState.READY]
    assert recorded == [Transition("two", 0, TaskState.READY, TaskState.READY, None, why, None)]
    # a one-GPU run still goes
    out = h.submit(task("one", gpus=1))
    assert [i.run_id for i in items(out)] == ["one"]


def test_devices_come_back_when_the_attempt_ends() -> None:
    h = Harness(device_pool(1, 2))
    h.submit(task("a", gpus=2))
    first = h.core.lease("a")
    assert first is not None and first.devices == (0, 1)
    out = h.submit(task("b", gpus=1))
    assert items(out) == []  # the pool's total is used up too: nothing to explain
    h.report("a", ProviderState.RUNNING, provider="k8s")
    out = h.report("a", ProviderState.SUCCEEDED, provider="k8s")
    assert h.core.lease("a") is None
    got = items(out)
    assert [i.run_id for i in got] == ["b"] and got[0].lease == DeviceLease("n0", (0,))


def test_no_device_is_ever_overbooked() -> None:
    """Random GPU runs come and go on random clusters: at every step, the leases of live
    attempts never put two runs on one device, and each holds as many devices as it asks."""
    rng = random.Random(7)
    for trial in range(20):
        nodes, per = rng.randint(1, 4), rng.choice([1, 2, 4, 8])
        h = Harness(device_pool(nodes, per))
        ids = itertools.count()
        for _ in range(30):
            if rng.random() < 0.6:
                rid = f"t{trial}-{next(ids)}"
                h.submit(task(rid, gpus=rng.randint(1, per), cpus=0.1, memory=GiB))
            else:
                live = [r for r in h.core.run_ids() if h.core.state(r) in LEASED]
                if live:
                    r = rng.choice(live)
                    h.report(r, ProviderState.SUCCEEDED, provider="k8s")
            use: Counter[tuple[str, int]] = Counter()
            for run_id, lease in leased(h).items():
                assert h.core.state(run_id) in LEASED
                assert len(lease.devices) == h.core._runs[run_id].task.gpus
                for d in lease.devices:
                    use[lease.node, d] += 1
            assert all(n == 1 for n in use.values()), use
            live = [r for r in h.core.run_ids() if h.core.state(r) in LEASED]
            assert set(live) == set(leased(h))


def test_pools_without_devices_are_unchanged() -> None:
    h = Harness(Pool(id="p", provider="local", cpus=8, memory=64 * GiB, gpus={"a100": 2}))
    out = h.submit(task("a", gpus=1))
    assert [(i.run_id, i.lease) for i in items(out)] == [("a", None)]


def test_bestfit_objective_is_configurable() -> None:
    h = Harness(
        device_pool(2, 4, free={1: (MILLI, 0, 0, 0)}), context=PlacementContext(objective="bestfit")
    )
    out = h.submit(task("a", gpus=1))
    # best fit: the node with one device free, not the idle one
    assert [i.lease for i in items(out)] == [DeviceLease("n1", (0,))]


def test_a_rediscovered_pool_keeps_the_devices_its_nodes_still_hold() -> None:
    part = {0: (MILLI, 0)}
    h = Harness(device_pool(2, 2, free=part))
    h.submit(task("a", gpus=2))
    a = h.core.lease("a")
    assert a == DeviceLease("n1", (0, 1))
    # rediscovered with its nodes in another order (a's first) and a stale total that would
    # admit another 2-GPU run: the holds follow node names, so none of a's devices is free
    full = device_pool(2, 2, free=part)
    assert full.devices is not None
    again = Pool(
        **{
            **{f: getattr(full, f) for f in full.__struct_fields__},
            "devices": PoolDevices(nodes=full.devices.nodes[::-1]),
            "gpus": {"a100": 5},
        }
    )
    h.send(PoolsDiscovered(provider="k8s", pools=[again]))
    out = h.submit(task("b", gpus=2))
    assert items(out) == [] and "none has 2 free devices" in h.core.held("b")
    assert h.core.lease("a") == a


def test_a_run_wider_than_any_node_says_so() -> None:
    p = device_pool(3, 2)
    h = Harness(p)
    out = h.submit(task("wide", gpus=4))
    assert items(out) == []
    # no node could ever hold it, every device free: it fails now instead of waiting
    assert h.core.state("wide") is TaskState.FAILED
    assert "k8s/gpu: no node has 4 GPUs (the widest, n0, has 2)" in transitions(out)[-1].reason


def test_restored_leases_without_devices_hold_the_pool_until_they_end() -> None:
    h = Harness(device_pool(2, 2))
    restored = RestoredTask(
        task=task("old", gpus=1),
        state=TaskState.RUNNING,
        attempt=1,
        provider="k8s",
        pool="k8s/gpu",
    )
    h.send(TasksRestored(tasks=[restored]))
    out = h.submit(task("new", gpus=1))
    # which device "old" runs on is not known: nothing may be given out beside it
    assert items(out) == [] and "not known" in h.core.held("new")
    assert h.core.lease("old") is None
    out = h.report("old", ProviderState.SUCCEEDED, provider="k8s")
    assert [i.run_id for i in items(out)] == ["new"] and h.core.lease("new") is not None


# ---- fragmented pools are left out of placement (module doc: *Devices*) ----------------------


def _fragmented_and_roomy() -> tuple[Pool, Pool]:
    """``k8s/gpu``: 5 GPUs free on 5 nodes, none with 2; ``k8s/a``: one node with 4 free."""
    frag = device_pool(5, 2, free={i: (MILLI, 0) for i in range(5)})
    roomy = msgspec.structs.replace(device_pool(1, 4), id="k8s/a")
    return frag, roomy


def test_a_run_goes_to_the_pool_whose_devices_hold_it() -> None:
    """The placer sees pool totals, and this one prefers the fragmented pool: left in, the
    core refuses its answer, the same answer comes back, and the run waits although another
    pool has room. The core leaves out, for each shape, the pools no node of which holds it."""
    frag, roomy = _fragmented_and_roomy()
    h = Harness(frag, roomy)
    out = h.submit(task("two", gpus=2))
    got = items(out)
    assert [(i.run_id, i.lease) for i in got] == [("two", DeviceLease("n0", (0, 1)))]
    assert h.core.pool("two") == "k8s/a"
    assert h.core.held("two") == ""
    # a shape the fragmented pool does hold may still go there
    out = h.submit(task("one", gpus=1))
    assert [i.run_id for i in items(out)] == ["one"] and h.core.pool("one") == "k8s/gpu"


def test_a_run_no_pool_holds_waits_with_the_fragmentation_reason() -> None:
    frag, roomy = _fragmented_and_roomy()
    h = Harness(frag, roomy, auto_place=False)
    h.submit(task("busy", gpus=4))  # takes the roomy pool's node
    solves = [c for c in h.log if isinstance(c, SolvePlacement)]
    h.send(PlacementDecided(solution=solve(solves[-1].problem)))
    assert h.core.pool("busy") == "k8s/a"
    before = len([c for c in h.log if isinstance(c, SolvePlacement)])
    out = h.submit(task("two", gpus=2))
    # no pool's devices hold it now: no solve, nothing submitted, the reason said once
    assert [c for c in out if isinstance(c, SolvePlacement)] == [] and items(out) == []
    assert h.states("two") == [TaskState.READY]
    why = h.core.held("two")
    assert why.startswith("k8s/gpu: 5 GPUs free on 5 nodes, none has 2 free devices"), why
    recorded = [t for t in transitions(out) if t.from_state is t.to_state is TaskState.READY]
    assert [t.reason for t in recorded] == [why]
    # nothing changes: ticks ask nothing again
    for at in (1.0, 2.0, 3.0):
        assert [c for c in h.tick(at) if isinstance(c, SolvePlacement)] == []
    assert len([c for c in h.log if isinstance(c, SolvePlacement)]) == before
    # the busy run ends: the room is back, and the waiting run goes there
    h.auto_place = True
    h.report("busy", ProviderState.RUNNING, provider="k8s")
    out = h.report("busy", ProviderState.SUCCEEDED, provider="k8s")
    assert [i.run_id for i in items(out)] == ["two"] and h.core.pool("two") == "k8s/a"


def test_members_beyond_the_room_elsewhere_say_why_the_fragmented_pool_cannot() -> None:
    frag, roomy = _fragmented_and_roomy()
    h = Harness(frag, roomy)
    out = h.submit(*(task(f"r{i}", gpus=2) for i in range(5)))
    # the roomy pool holds two; the fragmented pool's total (5 GPUs) would have admitted two
    # more: those are told why they cannot go there; the fifth fits no total: nothing to say
    assert sorted(i.run_id for i in items(out)) == ["r0", "r1"]
    assert {h.core.pool(r) for r in ("r0", "r1")} == {"k8s/a"}
    for r in ("r2", "r3"):
        assert h.core.held(r).startswith("k8s/gpu: 5 GPUs free on 5 nodes, none has 2"), r
    assert h.core.held("r4") == ""
    assert h.states("r2", "r3", "r4") == [TaskState.READY] * 3


def test_a_pool_held_by_restored_leases_is_left_out_for_gpu_runs() -> None:
    blocked = device_pool(2, 2)
    other = msgspec.structs.replace(device_pool(1, 2), id="k8s/a")
    h = Harness(blocked, other)
    restored = RestoredTask(
        task=task("old", gpus=1), state=TaskState.RUNNING, attempt=1, provider="k8s", pool="k8s/gpu"
    )
    h.send(TasksRestored(tasks=[restored]))
    out = h.submit(task("new", gpus=1))
    assert [i.run_id for i in items(out)] == ["new"] and h.core.pool("new") == "k8s/a"
    out = h.submit(task("newer", gpus=2))
    assert items(out) == [] and "not known" in h.core.held("newer")


# ---- restored runs keep their devices; reported devices are followed -----------------------


def restored(
    run_id: str, gpus: int, lease: DeviceLease | None, *, attempt: int = 1
) -> RestoredTask:
    return RestoredTask(
        task=task(run_id, gpus=gpus),
        state=TaskState.RUNNING,
        attempt=attempt,
        provider="k8s",
        pool="k8s/gpu",
        lease=lease,
    )


def devices_in_use(h: Harness) -> Counter[tuple[str, int]]:
    use: Counter[tuple[str, int]] = Counter()
    for lease in leased(h).values():
        for d in lease.devices:
            use[lease.node, d] += 1
    return use


def test_restored_runs_keep_their_devices() -> None:
    """A restarted core takes each live attempt's recorded lease back: the next GPU run goes
    at once to the devices still free, never to a restored run's."""
    before = Harness(device_pool(2, 4))
    before.submit(task("a", gpus=2), task("b", gpus=3), task("c", gpus=1))
    kept = leased(before)
    assert set(kept) == {"a", "b", "c"}
    after = Harness(device_pool(2, 4))
    after.send(TasksRestored(tasks=[restored(r, len(kept[r].devices), kept[r]) for r in kept]))
    assert leased(after) == kept
    out = after.submit(task("d", gpus=2))
    [d] = items(out)
    assert d.run_id == "d" and d.lease is not None and after.core.held("d") == ""
    taken = {(lease.node, i) for lease in kept.values() for i in lease.devices}
    assert not taken & {(d.lease.node, i) for i in d.lease.devices}
    assert all(n == 1 for n in devices_in_use(after).values())
    # all 8 devices are out now; when a restored run ends, its devices come back
    out = after.submit(task("e", gpus=2))
    assert items(out) == []
    after.report("a", ProviderState.SUCCEEDED, provider="k8s")
    assert after.core.lease("e") == kept["a"]


def test_restored_leases_are_taken_back_when_the_pool_is_discovered() -> None:
    h = Harness()
    h.send(TasksRestored(tasks=[restored("old", 1, DeviceLease("n0", (1,)))]))
    assert h.core.lease("old") is None  # no pool known yet
    h.send(PoolsDiscovered(provider="k8s", pools=[device_pool(1, 2)]))
    assert h.core.lease("old") == DeviceLease("n0", (1,))
    out = h.submit(task("new", gpus=1))
    assert [(i.run_id, i.lease) for i in items(out)] == [("new", DeviceLease("n0", (0,)))]


def test_a_restored_lease_that_conflicts_or_names_a_lost_node_is_not_known() -> None:
    """Two restored runs on one device (the store disagrees with itself), or one on a node the
    pool no longer has: that run's devices are not known (the pool's GPU runs wait, as for a
    lease restored without devices); the others' leases are kept."""
    h = Harness(device_pool(2, 4))
    h.send(
        TasksRestored(
            tasks=[
                restored("a", 1, DeviceLease("n0", (0,))),
                restored("b", 1, DeviceLease("n0", (0,))),  # a's device: a keeps it
                restored("c", 1, DeviceLease("n9", (0,))),  # no such node
                restored("d", 2, DeviceLease("n1", (0, 5))),  # no such device
            ]
        )
    )
    assert leased(h) == {"a": DeviceLease("n0", (0,))}
    out = h.submit(task("new", gpus=1))
    assert items(out) == [] and "not known" in h.core.held("new")
    # as each of them ends, nothing is freed twice; once none is unknown, devices go again
    for r in ("b", "c"):
        h.report(r, ProviderState.SUCCEEDED, provider="k8s")
    assert h.states("new") == [TaskState.READY]
    out = h.report("d", ProviderState.SUCCEEDED, provider="k8s")
    [new] = items(out)
    assert new.run_id == "new" and new.lease is not None
    assert new.lease != DeviceLease("n0", (0,)) and len(new.lease.devices) == 1
    assert all(n == 1 for n in devices_in_use(h).values())


def bound(h: Harness, run_id: str, node: str | None, devices: tuple[int, ...]) -> None:
    """The provider reports the attempt running, bound to ``devices`` on ``node`` itself."""
    rep = Report(key=h.core.key(run_id), state=ProviderState.RUNNING, node=node, devices=devices)
    h.send(ProviderReported(provider="k8s", reports=[rep]))


def test_the_ledger_follows_the_devices_the_provider_bound() -> None:
    h = Harness(device_pool(1, 4))
    h.submit(task("a", gpus=1), task("b", gpus=1))
    assert leased(h) == {"a": DeviceLease("n0", (0,)), "b": DeviceLease("n0", (1,))}
    bound(h, "a", "n0", (3,))  # free in the ledger: followed
    assert h.core.lease("a") == DeviceLease("n0", (3,))
    bound(h, "b", None, (3,))  # a's now: the lease stands
    assert h.core.lease("b") == DeviceLease("n0", (1,))
    out = h.submit(task("c", gpus=2))
    [c] = items(out)
    assert c.lease == DeviceLease("n0", (0, 2))


def test_a_report_names_the_devices_a_restored_run_was_not_known_to_hold() -> None:
    h = Harness(device_pool(1, 2))
    h.send(TasksRestored(tasks=[restored("old", 1, None)]))
    out = h.submit(task("new", gpus=1))
    assert items(out) == [] and "not known" in h.core.held("new")
    bound(h, "old", "n0", (0,))
    assert h.core.lease("old") == DeviceLease("n0", (0,))
    assert h.core.lease("new") == DeviceLease("n0", (1,))


def test_a_restored_intent_is_resubmitted_on_the_devices_it_holds() -> None:
    """An intent written before the restart whose submit may never have gone out is sent again
    under its key: on the devices its restored lease names, not on the whole node."""
    h = Harness(device_pool(1, 4))
    lease = DeviceLease("n0", (2, 3))
    rt = msgspec.structs.replace(restored("a", 2, lease), state=TaskState.SUBMITTING)
    h.send(TasksRestored(tasks=[rt]))
    out = h.report("a", ProviderState.UNKNOWN, provider="k8s")
    assert [(i.run_id, i.key, i.lease) for i in items(out, resubmit=True)] == [
        ("a", h.core.key("a"), lease)
    ]
