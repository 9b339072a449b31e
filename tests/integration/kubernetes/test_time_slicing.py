"""GPU time-slicing on Kubernetes, on the emulated cluster: a node whose device plugin hands
out each GPU as 4 replicas (``nvidia.com/gpu.replicas``; its allocatable ``nvidia.com/gpu``
is replicas) has 2 devices, not 8. Shares of one GPU go side by side on a device, each pod
asking for its replicas; a whole GPU asks for all 4 replicas of a device nobody uses.

One T4 node of 2 GPUs x 4 replicas, someone else's pod holding 3 replicas: the devices have
1 and 4 replicas free. Five 0.25 shares fill them and all five pods are admitted (3 + 5 = 8
replicas); a sixth share and a whole GPU wait. When the shares on the free device end, the
whole GPU goes there with a pod asking for 4 replicas, which the scheduler admits.

The real core and placer drive the real driver over HTTP (``test_devices.Plane``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stowplan.placement.leases import MILLI
from stowplan.providers.base import ProviderState
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.scheduler.events import TaskInstance
from stowplan.scheduler.states import TaskState
from stowplan.spec.models import KubernetesProviderConfig
from tests.kubecluster import KubeCluster, NodeSpec, PodOutcome, validate_manifest

from .test_devices import GiB, Plane, pinned_to, someone_elses_pod

pytestmark = pytest.mark.integration

POOL = "k8s/t4"


@pytest.fixture
async def driver(
    kube_cluster: KubeCluster, kubeconfig: Path, tmp_path: Path
) -> AsyncIterator[KubernetesProvider]:
    from kubernetes_asyncio import client, config

    kube_cluster.add_node(
        NodeSpec(
            name="ts-a",
            pool="t4",
            cpu="16",
            memory="64Gi",
            gpus=2,
            gpu_replicas=4,
            gpu_product="Tesla-T4",
            taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        )
    )
    api = await config.new_client_from_config(config_file=str(kubeconfig))
    async with api:
        body: Any = someone_elses_pod("ts-a")
        for where in ("requests", "limits"):
            body["spec"]["containers"][0]["resources"][where]["nvidia.com/gpu"] = "3"
        await client.CoreV1Api(api).create_namespaced_pod("default", body)
    await kube_cluster.asettle()
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    cfg = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.12-slim")
    async with KubernetesProvider("k8s", cfg, state_dir=tmp_path) as d:
        yield d


def share(run_id: str) -> TaskInstance:
    return TaskInstance(run_id=run_id, cpus=1, memory=GiB, gpus=1, gpu_milli=250, gpu_types=("t4",))


def pod_of(kube_cluster: KubeCluster, plane: Plane, run_id: str) -> dict[str, Any]:
    """The pod of ``run_id``'s completion index in its Indexed Job."""
    req = plane.request_of(run_id)
    index = str(req.keys.index(plane.core.key(run_id)))
    (pod,) = [
        p
        for p in kube_cluster.job_pods(req.name)
        if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == index
    ]
    return pod


def replicas_asked(req: KubernetesRequest) -> str:
    (container,) = req.job["spec"]["template"]["spec"]["containers"]
    limits: dict[str, str] = container["resources"]["limits"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    return limits["nvidia.com/gpu"]


@pytest.mark.anyio
async def test_shares_and_a_whole_gpu_on_time_sliced_devices(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    plane = Plane(driver)
    await plane.discover()
    pool = {p.id: p for p in plane.pools}[POOL]
    assert pool.devices is not None and pool.devices.sharing and pool.devices.slices == 4
    [(name, free)] = [(n.name, n.devices) for n in pool.devices.nodes]
    assert (name, free) == ("ts-a", (250, MILLI))  # the other pod's 3 replicas on device 0

    shares = [share(f"s{i}") for i in range(5)]
    await plane.run(*shares)
    on = {t.run_id: plane.leases[t.run_id] for t in shares}
    assert sorted(lease.devices for lease in on.values() if lease) == [(0,), (1,), (1,), (1,), (1,)]
    await kube_cluster.asettle()
    for t in shares:
        req = plane.request_of(t.run_id)
        validate_manifest(req.job)
        assert pinned_to(req) == ["ts-a"] and replicas_asked(req) == "1"
        pod = pod_of(kube_cluster, plane, t.run_id)
        assert pod["spec"].get("nodeName") == "ts-a", pod.get("status")
    await plane.observe(*(t.run_id for t in shares))
    assert {plane.core.state(t.run_id) for t in shares} == {TaskState.RUNNING}

    # the devices are full: a sixth share and a whole GPU wait
    whole = TaskInstance(run_id="w", cpus=1, memory=GiB, gpus=1, gpu_types=("t4",))
    await plane.run(whole)
    await plane.run(share("s5"))
    assert plane.core.state("s5") is plane.core.state("w") is TaskState.READY
    assert "w" not in plane.leases and "s5" not in plane.leases

    # the four shares on device 1 end: the whole GPU takes it, asking for all 4 replicas
    ending = [r for r, lease in on.items() if lease and lease.devices == (1,)]
    for run_id in ending:
        kube_cluster.succeed_pod(pod_of(kube_cluster, plane, run_id)["metadata"]["name"])
    await kube_cluster.asettle()
    await plane.observe(*ending)
    assert {plane.core.state(r) for r in ending} == {TaskState.SUCCEEDED}
    lease = plane.leases["w"]
    assert lease is not None and lease.devices == (1,)
    req = plane.request_of("w")
    assert pinned_to(req) == ["ts-a"] and replicas_asked(req) == "4"
    await kube_cluster.asettle()
    pod = pod_of(kube_cluster, plane, "w")
    assert pod["spec"].get("nodeName") == "ts-a", pod.get("status")
    (report,) = await driver.describe([plane.core.key("w")])
    assert report.state is ProviderState.RUNNING
    # the sixth share still finds no replica: device 0 is full, device 1 is the whole GPU's
    assert plane.core.state("s5") is TaskState.READY
