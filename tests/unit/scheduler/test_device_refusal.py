"""A run wider than every node of a device pool: no node there could ever hold it, free or
not, so it is refused like any run no pool can hold, unless another pool can take it, which
then does (module doc of ``scheduler.core``: *Devices*)."""

from __future__ import annotations

from stowplan.placement.leases import MILLI, NodeDevices, PoolDevices
from stowplan.placement.problem import Pool
from stowplan.scheduler.reports import ProviderState
from stowplan.scheduler.states import TaskState
from stowplan.spec.models import FailureClass
from tests.unit.scheduler.test_core import Harness, items, task, transitions

GiB = 1 << 30


def device_pool(widths: tuple[int, ...], *, pid: str = "k8s/gpu", model: str = "a100") -> Pool:
    """One node per width, named n0, n1, ...: that many devices each, all free."""
    spec = PoolDevices(
        nodes=tuple(
            NodeDevices(name=f"n{i}", model=model, devices=(MILLI,) * w)
            for i, w in enumerate(widths)
        )
    )
    return Pool(
        id=pid,
        provider=pid.split("/")[0],
        kind="kubernetes",
        cpus=1000,
        memory=1 << 50,
        gpus={model: sum(widths)},
        devices=spec,
    )


def counted_pool(gpus: int) -> Pool:
    """A pool that counts its GPUs in total only (no devices known)."""
    return Pool(
        id="slurm/gpu",
        provider="slurm",
        kind="slurm",
        cpus=64,
        memory=512 * GiB,
        gpus={"a100": gpus},
    )


def test_a_run_wider_than_every_node_is_refused_naming_the_pool_and_its_widest_node() -> None:
    # 6 GPUs in all (the totals admit 4), but no node has more than 2
    h = Harness(device_pool((2, 1, 2)))
    out = h.submit(task("wide", gpus=4), task("after", depends_on=("wide",)), task("fits", gpus=2))
    assert h.states("wide", "after", "fits") == [
        TaskState.FAILED,
        TaskState.FAILED,
        TaskState.SUBMITTING,
    ]
    recs = {t.run_id: t for t in transitions(out)}
    assert recs["wide"].failure is FailureClass.PROVIDER_REJECTED
    why = recs["wide"].reason
    assert "no pool is large enough" in why and "4 x GPU" in why
    assert "k8s/gpu: no node has 4 GPUs (the widest, n0, has 2)" in why
    assert [i.run_id for i in items(out)] == ["fits"]
    h.check_counts()


def test_only_nodes_of_a_model_it_accepts_count() -> None:
    a100 = device_pool((2, 2), pid="k8s/a100")
    h100 = device_pool((8,), pid="k8s/h100", model="h100")
    h = Harness(a100, h100)
    out = h.submit(task("wide", gpus=4, gpu_types=("a100",)))
    assert h.states("wide") == [TaskState.FAILED]
    why = transitions(out)[-1].reason
    assert "k8s/a100: no node has 4 GPUs (the widest, n0, has 2)" in why
    # any model: the 8-GPU node holds it
    out = h.submit(task("any", gpus=4))
    assert [(i.run_id, i.lease) for i in items(out)] == [("any", h.core.lease("any"))]
    assert h.core.pool("any") == "k8s/h100"


def test_a_run_too_wide_for_one_pool_goes_to_another_that_can_hold_it() -> None:
    h = Harness(device_pool((2, 2, 2)), counted_pool(4))
    out = h.submit(task("w1", gpus=4), task("w2", gpus=4))
    # the first goes where 4 GPUs can be had; the second waits for it, not for a pool whose
    # nodes could never hold it
    assert [i.run_id for i in items(out)] == ["w1"]
    assert h.core.pool("w1") == "slurm/gpu"
    assert h.states("w1", "w2") == [TaskState.SUBMITTING, TaskState.READY]
    assert h.core.held("w2") == ""
    out = h.report("w1", ProviderState.SUCCEEDED, provider="slurm")
    assert [i.run_id for i in items(out)] == ["w2"] and h.core.pool("w2") == "slurm/gpu"
    h.check_counts()


def test_a_run_that_only_fragmentation_stops_waits_with_the_reason() -> None:
    # each node has 2 devices, one of them taken now: the run is not too wide, only early
    spec = PoolDevices(
        nodes=tuple(NodeDevices(name=f"n{i}", model="a100", devices=(MILLI, 0)) for i in range(2))
    )
    p = Pool(id="k8s/gpu", provider="k8s", cpus=64, memory=1 << 40, gpus={"a100": 2}, devices=spec)
    h = Harness(p)
    out = h.submit(task("two", gpus=2))
    assert items(out) == [] and h.core.state("two") is TaskState.READY
    assert h.core.held("two") == (
        "k8s/gpu: 2 GPUs free on 2 nodes, none has 2 free devices (at most 1 on one node)"
    )
