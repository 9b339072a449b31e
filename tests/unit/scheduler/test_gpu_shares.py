"""Shares of one GPU (``TaskInstance.gpu_milli`` below 1000) in the scheduler core.

On a pool that shares its devices (``PoolDevices.sharing``: the local provider) shares go
side by side on one device until it is full, and the count model is offered the room in
shares; a whole-GPU run still needs a device nobody uses. On a pool that does not share (a
Kubernetes node pool), a share holds a whole device. After a restart, a restored share takes
back its part of the device, not all of it.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from stowplan.placement.leases import MILLI, DeviceLease, PoolDevices
from stowplan.placement.problem import Pool
from stowplan.scheduler.events import RestoredTask, TaskInstance, TasksRestored
from stowplan.scheduler.reports import ProviderState
from stowplan.scheduler.states import TaskState
from tests.unit.scheduler.test_core import Harness, items, task
from tests.unit.scheduler.test_devices import device_pool, leased


def sharing_pool(devices: int = 2) -> Pool:
    p = device_pool(1, devices, model="unknown")
    assert p.devices is not None
    return msgspec.structs.replace(
        p,
        id="box",
        provider="box",
        kind="local",
        devices=PoolDevices(nodes=p.devices.nodes, sharing=True),
    )


def share(run_id: str, milli: int = 250, **kw: object) -> TaskInstance:
    return task(run_id, gpus=1, gpu_milli=milli, cpus=0.1, **kw)


def milli_on_devices(h: Harness) -> Counter[tuple[str, int]]:
    use: Counter[tuple[str, int]] = Counter()
    for run_id, lease in leased(h).items():
        t = h.core._runs[run_id].task
        for d in lease.devices:
            use[lease.node, d] += t.gpu_milli if t.gpus == 1 else MILLI
    return use


def test_shares_fill_each_device_in_one_round() -> None:
    h = Harness(sharing_pool(2))
    out = h.submit(*(share(f"s{i}") for i in range(9)))
    placed = {i.run_id: i.lease for i in items(out)}
    # two devices hold eight shares of 0.25, all given out at once; the ninth waits
    assert len(placed) == 8 and h.core.state("s8") is TaskState.READY
    assert Counter(lease.devices for lease in placed.values() if lease) == {(0,): 4, (1,): 4}
    assert max(milli_on_devices(h).values()) == MILLI
    # a share that ends makes room for the next
    h.report("s0", ProviderState.RUNNING, provider="box")
    out = h.report("s0", ProviderState.SUCCEEDED, provider="box")
    assert [i.run_id for i in items(out)] == ["s8"]
    assert max(milli_on_devices(h).values()) == MILLI


def test_a_whole_gpu_waits_for_a_device_no_share_uses() -> None:
    h = Harness(sharing_pool(2))
    h.submit(share("a", 500), share("b", 500))
    # the two halves pack one device, leaving the other whole
    used = milli_on_devices(h)
    assert list(used.values()) == [MILLI], used
    [(node, full)] = used
    out = h.submit(task("whole", gpus=1, cpus=0.1))
    [it] = items(out)
    assert it.run_id == "whole" and it.lease == DeviceLease(node, (1 - full,))
    # no room is left: neither a share nor a second whole GPU goes
    out = h.submit(share("c", 250), task("whole2", gpus=1, cpus=0.1))
    assert items(out) == []
    assert h.core.state("c") is h.core.state("whole2") is TaskState.READY
    # a half ends: the share goes beside the other half; the whole GPU still finds no device
    # that nobody uses
    h.report("a", ProviderState.RUNNING, provider="box")
    out = h.report("a", ProviderState.SUCCEEDED, provider="box")
    [it] = items(out)
    assert it.run_id == "c" and it.lease == DeviceLease(node, (full,))
    assert h.core.state("whole2") is TaskState.READY
    assert milli_on_devices(h) == Counter({(node, full): 750, (node, 1 - full): MILLI})


def test_a_pool_that_does_not_share_gives_a_share_a_whole_device() -> None:
    h = Harness(device_pool(1, 1))  # sharing=False: a Kubernetes node pool
    out = h.submit(share("a"), share("b"))
    assert [i.run_id for i in items(out)] == ["a"]
    assert h.core.state("b") is TaskState.READY
    h.report("a", ProviderState.RUNNING, provider="k8s")
    out = h.report("a", ProviderState.SUCCEEDED, provider="k8s")
    assert [i.run_id for i in items(out)] == ["b"]


def test_a_restored_share_takes_back_only_its_part_of_the_device() -> None:
    h = Harness(sharing_pool(1))
    h.send(
        TasksRestored(
            tasks=[
                RestoredTask(
                    task=share("old", 500),
                    state=TaskState.RUNNING,
                    attempt=1,
                    provider="box",
                    pool="box",
                    lease=DeviceLease("n0", (0,)),
                )
            ]
        )
    )
    out = h.submit(share("new", 500), task("whole", gpus=1, cpus=0.1))
    # half the device is the restored share's: the new share goes beside it, a whole GPU waits
    assert [i.run_id for i in items(out)] == ["new"]
    assert milli_on_devices(h) == Counter({("n0", 0): MILLI})
    assert h.core.state("whole") is TaskState.READY


def test_a_pool_of_slices_holds_a_share_in_whole_slices() -> None:
    """Devices handed out in 4 slices (Kubernetes time-slicing's replicas): a 0.3 share holds
    two slices (half a device), so two devices take four such shares, not six; 0.25 shares
    fill them four to a device."""
    p = sharing_pool(2)
    assert p.devices is not None
    sliced = msgspec.structs.replace(p, devices=msgspec.structs.replace(p.devices, slices=4))
    h = Harness(sliced)
    out = h.submit(*(share(f"s{i}", 300) for i in range(6)))
    assert len(items(out)) == 4 and h.core.state("s5") is TaskState.READY
    assert Counter(i.lease.devices for i in items(out) if i.lease) == {(0,): 2, (1,): 2}
    # without slices the same six 0.3 shares go at once, three to a device
    h = Harness(sharing_pool(2))
    assert len(items(h.submit(*(share(f"s{i}", 300) for i in range(6))))) == 6
