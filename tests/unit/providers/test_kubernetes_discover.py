"""Node pools from nodes and pods: labels, allocatable minus requests, GPU models, exclusions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stowplan.placement.leases import MILLI, NodeDevices, PoolDevices
from stowplan.placement.problem import Shape
from stowplan.providers.kubernetes.discover import (
    detect_pool_label,
    gpu_model_of,
    leased_devices,
    parse_quantity,
    pools_of,
    unschedulable_patience,
)
from stowplan.providers.kubernetes.render import pool_selector
from stowplan.spec.models import KubernetesAutoscaleSpec, NodeShapeSpec
from tests.kubecluster import NodeSpec

GKE = "cloud.google.com/gke-nodepool"


def nodes(*specs: NodeSpec) -> list[dict[str, Any]]:
    return [s.render() for s in specs]


def running_pod(node: str, cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    req = {"cpu": cpu, "memory": memory}
    if gpus:
        req["nvidia.com/gpu"] = str(gpus)
    return {
        "metadata": {"name": f"p-{node}"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": req}}]},
        "status": {"phase": "Running"},
    }


@pytest.mark.parametrize(
    ("product", "model"),
    [
        ("NVIDIA-A100-SXM4-40GB", "a100"),
        ("NVIDIA-A100-SXM4-80GB", "a100"),
        ("Tesla-V100-SXM2-16GB", "v100"),
        ("NVIDIA-H100-80GB-HBM3", "h100"),
        ("Tesla-T4", "t4"),
        ("NVIDIA-L4", "l4"),
        ("NVIDIA-A10G", "a10g"),
        ("NVIDIA-GeForce-RTX-4090", "rtx4090"),
        ("NVIDIA-A100-SXM4-40GB-SHARED", "a100"),
        ("Tesla-K80", "k80"),
        ("Tesla-P100-PCIE-16GB", "p100"),
    ],
)
def test_gpu_model_vocabulary(product: str, model: str) -> None:
    assert gpu_model_of(product) == model


def test_quantities() -> None:
    assert parse_quantity("500m") * 1000 == 500
    assert parse_quantity("32Gi") == 32 << 30
    assert parse_quantity("1e3") == 1000 and parse_quantity(8) == 8
    assert parse_quantity("junk") == 0


def test_pools_free_capacity_gpus_and_exclusions() -> None:
    ns = nodes(
        NodeSpec(name="c1", pool="cpu", cpu="8", memory="32Gi", region="eu-west4"),
        NodeSpec(name="c2", pool="cpu", cpu="8", memory="32Gi", region="eu-west4"),
        NodeSpec(name="c3", pool="cpu", cpu="8", memory="32Gi", unschedulable=True),
        NodeSpec(name="c4", pool="cpu", cpu="8", memory="32Gi", ready=False),
        NodeSpec(
            name="g1",
            pool="a100",
            cpu="12",
            memory="85Gi",
            gpus=2,
            gpu_product="NVIDIA-A100-SXM4-40GB",
            taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        ),
        NodeSpec(
            name="g2",
            pool="a100",
            gpus=1,
            gpu_product="NVIDIA-A100-SXM4-40GB",
            allocatable_gpus=0,
        ),
        NodeSpec(
            name="d1",
            pool="dedicated",
            taints=[{"key": "team", "value": "x", "effect": "NoSchedule"}],
        ),
    )
    pods = [running_pod("c1", "2", "8Gi"), running_pod("g1", "1500m", "1Gi", gpus=1)]
    found = pools_of("k8s", ns, pods, pool_label=None)
    assert found.pool_label == GKE
    by_id = {p.id: p for p in found.pools}
    assert sorted(by_id) == ["k8s/a100", "k8s/cpu", "k8s/dedicated"]
    assert by_id["k8s/dedicated"].taints == ("team",)
    assert by_id["k8s/cpu"].taints == by_id["k8s/a100"].taints == ()  # GPU taint: tolerated
    cpu = by_id["k8s/cpu"]
    assert (cpu.cpus, cpu.memory, cpu.gpus) == (14.0, (64 - 8) << 30, {})
    assert (cpu.site, cpu.region, cpu.kind) == ("eu-west4", "eu-west4", "kubernetes")
    gpu = by_id["k8s/a100"]
    assert (gpu.cpus, gpu.gpus) == (10.5, {"a100": 1})
    assert gpu.node is not None and gpu.node.gpus == {"a100": 2}
    assert pool_selector(gpu) == (GKE, "a100")
    notes = "\n".join(found.notes)
    for words in (
        "c3: cordoned",
        "c4: not Ready",
        "g2: labelled NVIDIA-A100",
        "dedicated: tainted team",
    ):
        assert words in notes
    tolerant = pools_of("k8s", ns, pods, pool_label=None, tolerations=["team"])
    assert {p.id: p.taints for p in tolerant.pools}["k8s/dedicated"] == ()


def test_taints_of_a_pool_are_those_of_all_its_nodes() -> None:
    ns = nodes(
        NodeSpec(
            name="t1",
            pool="team",
            taints=[
                {"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
                {"key": "soft", "effect": "PreferNoSchedule"},
            ],
        ),
        NodeSpec(
            name="t2",
            pool="team",
            taints=[{"key": "example.com/drain", "effect": "NoExecute"}],
        ),
    )
    (pool,) = pools_of("k8s", ns, [], pool_label=None).pools
    assert pool.taints == ("dedicated", "example.com/drain")  # PreferNoSchedule: no need
    assert pool.cpus == 16.0


AUTOSCALE = {
    "burst": KubernetesAutoscaleSpec(
        node=NodeShapeSpec(cpus=8, memory="30GiB", gpus={"h100": 1}),
        max_nodes=3,
        boot_time="2m",
        taints=["spot"],
    )
}


def test_autoscaled_pool_with_no_node_is_offered_as_elastic_capacity() -> None:
    ns = nodes(NodeSpec(name="c1", pool="cpu", region="eu-west4"))
    found = pools_of("k8s", ns, [], pool_label=None, autoscale=AUTOSCALE)
    by_id = {p.id: p for p in found.pools}
    burst = by_id["k8s/burst"]
    assert burst.elastic and burst.max_instances == 3 and burst.boot_s == 120.0
    assert burst.node == Shape(cpus=8.0, memory=30 << 30, gpus={"h100": 1})
    assert (burst.cpus, burst.memory, burst.gpus) == (0.0, 0, {})
    assert burst.taints == ("spot",) and burst.region == "eu-west4"
    assert pool_selector(burst) == (GKE, "burst")
    assert not by_id["k8s/cpu"].elastic


def test_autoscaled_pool_counts_its_nodes_against_the_maximum() -> None:
    ns = nodes(
        NodeSpec(name="b1", pool="burst", gpus=1, gpu_product="NVIDIA-H100-80GB-HBM3"),
        NodeSpec(name="b2", pool="burst", ready=False),  # booting: counts, offers nothing
    )
    (burst,) = pools_of("k8s", ns, [], pool_label=None, autoscale=AUTOSCALE).pools
    assert burst.max_instances == 1 and burst.gpus == {"h100": 1} and burst.cpus == 8.0
    full = nodes(*(NodeSpec(name=f"b{i}", pool="burst") for i in range(3)))
    found = pools_of("k8s", full, [], pool_label=None, autoscale=AUTOSCALE)
    assert found.pools[0].max_instances == 0 and not found.pools[0].elastic
    assert "at its maximum of 3 nodes" in "\n".join(found.notes)


def test_autoscaled_pool_needs_a_pool_label() -> None:
    found = pools_of("k8s", [], [], pool_label=None, autoscale=AUTOSCALE)
    assert found.pools == [] and "set node_pool_label" in found.notes[0]
    found = pools_of("k8s", [], [], pool_label=GKE, autoscale=AUTOSCALE)
    assert [p.id for p in found.pools] == ["k8s/burst"]


def test_unschedulable_patience_adds_the_boot_time_of_autoscaled_pools() -> None:
    def job(pool: str) -> dict[str, Any]:
        return {"spec": {"template": {"spec": {"nodeSelector": {GKE: pool}}}}}

    assert unschedulable_patience(job("burst"), unschedulable_after=600, autoscale=AUTOSCALE) == (
        720.0
    )
    assert unschedulable_patience(job("cpu"), unschedulable_after=600, autoscale=AUTOSCALE) == (
        600.0
    )
    assert unschedulable_patience({}, unschedulable_after=5.0) == 5.0


def test_pool_label_detection_order() -> None:
    ns = nodes(
        NodeSpec(name="a", pool="ng", pool_label="eks.amazonaws.com/nodegroup", instance_type="m5"),
        NodeSpec(name="b", instance_type="m5"),
    )
    assert detect_pool_label(ns) == "eks.amazonaws.com/nodegroup"
    assert detect_pool_label(nodes(NodeSpec(name="b", instance_type="m5"))) == (
        "node.kubernetes.io/instance-type"
    )
    found = pools_of("k8s", nodes(NodeSpec(name="x")), [], pool_label=None)
    assert found.pools == [] and "no node carries" in found.notes[0]


# -- devices (issue 17: the lease is the placement) ------------------------------------------

GPU_TAINT = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]


def v100(name: str, gpus: int = 2, **kw: Any) -> NodeSpec:
    return NodeSpec(
        name=name,
        pool="v100",
        cpu="16",
        memory="64Gi",
        gpus=gpus,
        gpu_product="Tesla-V100-SXM2-16GB",
        taints=GPU_TAINT,
        **kw,
    )


def own_pod(
    job: str, index: int, node: str | None, lease: dict[str, Any], gpus: int, **meta: Any
) -> dict[str, Any]:
    """A pod of index ``index`` of this provider's Job ``job``, whose template records
    ``lease`` (``render.DEVICES_ANNOTATION``)."""
    pod = running_pod(node or "", "2", "4Gi", gpus=gpus)
    if node is None:
        del pod["spec"]["nodeName"]
        pod["status"] = {"phase": "Pending"}
    pod["metadata"] = {
        "name": f"{job}-{index}",
        "labels": {
            "batch.kubernetes.io/job-name": job,
            "batch.kubernetes.io/job-completion-index": str(index),
        },
        "annotations": {"stowplan.io/devices": json.dumps(lease)},
        **meta,
    }
    return pod


def test_a_static_gpu_pool_describes_its_devices_by_node() -> None:
    ns = nodes(
        v100("gpu-b"),
        v100("gpu-a", labels={"kubernetes.io/hostname": "host-a"}),
        v100("gpu-c", ready=False),
        NodeSpec(name="c1", pool="cpu", cpu="8", memory="32Gi"),
    )
    pods = [running_pod("gpu-b", "4", "8Gi", gpus=1)]
    by_id = {p.id: p for p in pools_of("k8s", ns, pods, pool_label=None).pools}
    pool = by_id["k8s/v100"]
    assert pool.devices == PoolDevices(
        nodes=(
            NodeDevices(name="gpu-b", model="v100", devices=(0, MILLI), cpus=12.0,
                        memory=56 << 30),
            NodeDevices(name="host-a", model="v100", devices=(MILLI, MILLI), cpus=16.0,
                        memory=64 << 30),
        )
    )  # fmt: skip
    assert pool.gpus == {"v100": 3} and pool.cpus == 28.0  # the totals, as before
    assert pool.node == Shape(cpus=16.0, memory=64 << 30, gpus={"v100": 2})
    assert by_id["k8s/cpu"].devices is None  # no GPU: counted


def test_an_autoscaled_gpu_pool_keeps_counting() -> None:
    ns = nodes(NodeSpec(name="b1", pool="burst", gpus=1, gpu_product="NVIDIA-H100-80GB-HBM3"))
    (burst,) = pools_of("k8s", ns, [], pool_label=None, autoscale=AUTOSCALE).pools
    assert burst.devices is None and burst.gpus == {"h100": 1}


def test_own_pods_hold_the_cores_leases_and_other_pods_take_the_devices_left() -> None:
    ns = nodes(v100("gpu-a", gpus=4), v100("gpu-b"))
    pods = [
        # running on gpu-a with lease [0, 1]; pending with lease [3]: the core counts both
        own_pod("sp-1", 0, "gpu-a", {"node": "gpu-a", "devices": [[0, 1], [3]]}, gpus=2),
        own_pod("sp-1", 1, None, {"node": "gpu-a", "devices": [[0, 1], [3]]}, gpus=1),
        running_pod("gpu-a", "1", "1Gi", gpus=1),  # someone else's: not on 0, 1 or 3
        # being deleted: its run's lease is given back, the pod still holds its GPU
        own_pod("sp-2", 0, "gpu-b", {"node": "gpu-b", "devices": [[1]]}, gpus=1,
                deletionTimestamp="2026-12-05T12:00:00Z"),
    ]  # fmt: skip
    found = pools_of("k8s", ns, pods, pool_label=None, own_jobs={"sp-1", "sp-2"})
    (pool,) = found.pools
    assert pool.devices is not None
    assert [(n.name, n.devices, n.cpus) for n in pool.devices.nodes] == [
        ("gpu-a", (MILLI, MILLI, 0, MILLI), 15.0),
        ("gpu-b", (0, MILLI), 14.0),
    ]
    assert pool.gpus == {"v100": 4} and pool.cpus == 29.0
    # not ours: everything bound is subtracted, as before
    (other,) = pools_of("k8s", ns, pods, pool_label=None).pools
    assert other.devices is not None
    assert [n.devices for n in other.devices.nodes] == [(0, 0, 0, MILLI), (0, MILLI)]
    assert other.gpus == {"v100": 2}


def test_a_node_full_of_cpu_work_counts_as_full() -> None:
    ns = nodes(v100("gpu-a"))
    (pool,) = pools_of("k8s", ns, [running_pod("gpu-a", "16", "64Gi")], pool_label=None).pools
    assert pool.devices is not None
    (row,) = pool.devices.nodes
    assert row.devices == (MILLI, MILLI) and row.cpus < 0.01 and row.memory == 1


def test_a_lease_record_is_read_per_completion_index_and_never_trusted_blindly() -> None:
    lease = {"node": "gpu-a", "devices": [[0, 1], [3]]}
    assert leased_devices(own_pod("sp-1", 1, "gpu-a", lease, gpus=1)) == ("gpu-a", (3,))
    for bad in (
        {"node": "gpu-a", "devices": [[0, 1]]},  # no row for index 1
        {"node": "gpu-a", "devices": [[True], [-1]]},
        {"node": 7, "devices": [[0], [1]]},
        {"devices": [[0], [1]]},
        "not json",
    ):
        pod = own_pod("sp-1", 1, "gpu-a", {}, gpus=1)
        pod["metadata"]["annotations"]["stowplan.io/devices"] = (
            bad if isinstance(bad, str) else json.dumps(bad)
        )
        assert leased_devices(pod) is None, bad


def test_two_nodes_with_one_hostname_make_the_pool_count() -> None:
    ns = nodes(v100("gpu-a"), v100("gpu-b", labels={"kubernetes.io/hostname": "gpu-a"}))
    found = pools_of("k8s", ns, [], pool_label=None)
    (pool,) = found.pools
    assert pool.devices is None and pool.gpus == {"v100": 4}
    assert "another node has kubernetes.io/hostname=gpu-a" in "\n".join(found.notes)


# -- time-slicing (the device plugin's replicas) ---------------------------------------------


def t4(name: str, replicas: int = 4, **kw: Any) -> NodeSpec:
    return NodeSpec(
        name=name,
        pool="t4",
        cpu="16",
        memory="64Gi",
        gpus=2,
        gpu_product="Tesla-T4",
        gpu_replicas=replicas,
        taints=GPU_TAINT,
        **kw,
    )


def test_a_time_sliced_pool_shares_its_devices_in_replicas() -> None:
    """2 T4s of 4 replicas each (8 allocatable): the node has 2 devices, not 8; someone
    else's 5 replicas fill device 0 and a quarter of device 1."""
    ns = nodes(t4("ts-a"), t4("ts-b"))
    assert ns[0]["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert ns[0]["metadata"]["labels"]["nvidia.com/gpu.product"] == "Tesla-T4-SHARED"
    pods = [running_pod("ts-a", "1", "1Gi", gpus=5)]
    (pool,) = pools_of("k8s", ns, pods, pool_label=None).pools
    assert pool.devices == PoolDevices(
        nodes=(
            NodeDevices(name="ts-a", model="t4", devices=(0, 750), cpus=15.0, memory=63 << 30),
            NodeDevices(name="ts-b", model="t4", devices=(MILLI, MILLI), cpus=16.0,
                        memory=64 << 30),
        ),
        sharing=True,
        slices=4,
    )  # fmt: skip
    assert pool.devices.slice_milli(250) == 250 and pool.devices.slice_milli(300) == 500
    assert pool.gpus == {"t4": 2}  # whole GPUs' worth of free replicas: 3 // 4 + 8 // 4
    assert pool.node == Shape(cpus=16.0, memory=64 << 30, gpus={"t4": 2})


def test_replicas_that_do_not_make_whole_gpus_or_differ_in_a_pool_are_named() -> None:
    bad = t4("bad", labels={"nvidia.com/gpu.replicas": "x"})
    found = pools_of("k8s", nodes(t4("odd", allocatable_gpus=7), bad), [], pool_label=None)
    notes = "\n".join(found.notes)
    assert "node odd: nvidia.com/gpu.replicas='4' does not divide its 7 allocatable" in notes
    assert "node bad: nvidia.com/gpu.replicas='x'" in notes
    assert found.pools == []
    mixed = pools_of("k8s", nodes(t4("ts-a"), t4("ts-b", replicas=2)), [], pool_label=None)
    (pool,) = mixed.pools
    assert pool.gpus == {} and pool.devices is None
    assert "pool t4: its nodes time-slice their GPUs into different numbers of replicas (2, 4)" in (
        "\n".join(mixed.notes)
    )
    # replicas=1 (GPU feature discovery labels every GPU node): whole devices, as before
    (whole,) = pools_of("k8s", nodes(t4("w", replicas=1)), [], pool_label=None).pools
    assert whole.devices is not None and not whole.devices.sharing and whole.devices.slices == 0
    assert whole.devices.nodes[0].devices == (MILLI, MILLI)
