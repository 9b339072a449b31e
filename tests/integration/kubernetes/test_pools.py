"""Node pools as placement pools, on the emulated cluster: a tainted pool is offered only to the
task that tolerates its taint (and the emulated kube-scheduler runs that task's pod there), and
an autoscaled pool with no node is offered as elastic capacity, chosen, and waited for while the
cluster's autoscaler (the test, here) adds its node.

Placement is the real placer (``stowplan.placement.solve``) over what ``discover`` found."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from stowplan.placement import solve
from stowplan.placement.problem import DemandClass, PlacementProblem, PlacementSolution, Pool
from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.spec.models import KubernetesProviderConfig
from tests.kubecluster import KubeCluster, NodeSpec, PodOutcome, validate_manifest

pytestmark = pytest.mark.anyio

S = ProviderState
GiB = 1 << 30
DEDICATED = NodeSpec(
    name="ded-1",
    pool="dedicated",
    cpu="16",
    memory="64Gi",
    region="europe-west4",
    zone="europe-west4-c",
    taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}],
)
AUTOSCALE = {
    "burst": {
        "node": {"cpus": 16, "memory": "64GiB", "gpus": {"h100": 1}},
        "max_nodes": 2,
        "boot_time": "1h",
    }
}


@pytest.fixture
async def driver(kubeconfig: Path, tmp_path: Path) -> AsyncIterator[KubernetesProvider]:
    config = msgspec.convert(
        {
            "kind": "kubernetes",
            "kubeconfig": str(kubeconfig),
            "image": "python:3.12-slim",
            "unschedulable_after": 0.01,  # at once, but for the boot time
            "autoscale": AUTOSCALE,
        },
        KubernetesProviderConfig,
    )
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        yield d


def launches_of(solution: PlacementSolution, classes: list[DemandClass]) -> list[LaunchSpec]:
    by_id = {c.id: c for c in classes}
    out = []
    for a in solution.assignments:
        cls = by_id[a.class_id]
        for member in cls.members[: a.count]:
            out.append(
                LaunchSpec(
                    key=member,
                    run_id=member,
                    attempt=0,
                    pool=a.pool_id,
                    name=member.rsplit("-", 1)[0],
                    argv=["python", "-c", "print('hi')"],
                    cpus=cls.cpus,
                    memory=cls.memory,
                    gpus=cls.gpus,
                    gpu_types=(a.gpu_model,) if a.gpu_model else (),
                )
            )
    return out


async def place_and_submit(
    driver: KubernetesProvider, classes: list[DemandClass]
) -> tuple[list[Pool], PlacementSolution, list[KubernetesRequest]]:
    pools = await driver.discover()
    solution = solve(PlacementProblem(pools=pools, classes=classes))
    requests = driver.plan(launches_of(solution, classes), Facts.of(pools))
    assert all(isinstance(r, KubernetesRequest) for r in requests)
    await driver.submit(requests)
    return pools, solution, [r for r in requests if isinstance(r, KubernetesRequest)]


def node_of(cluster: KubeCluster, req: KubernetesRequest) -> str:
    (pod,) = cluster.job_pods(req.name)
    return str(pod["spec"].get("nodeName") or "")


async def test_a_tainted_pool_runs_only_the_task_that_tolerates_it(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.add_node(DEDICATED)
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("succeed"))
    # both need 12 CPUs: more than a node of the cpu pool has, as much as the dedicated node
    # or the a100 node (whose GPU taint every stowplan pod tolerates) offers
    classes = [
        DemandClass(
            id="c0", cpus=12, memory=8 * GiB, members=["tolerant-0"], tolerations=("dedicated",)
        ),
        DemandClass(id="c1", cpus=12, memory=8 * GiB, members=["plain-0"]),
    ]
    pools, solution, requests = await place_and_submit(driver, classes)
    assert {p.id: p.taints for p in pools}["k8s/dedicated"] == ("dedicated",)
    assert {a.class_id: a.pool_id for a in solution.assignments} == {
        "c0": "k8s/dedicated",
        "c1": "k8s/a100",
    }
    await kube_cluster.asettle()
    by_pool = {r.pool: r for r in requests}
    tolerant, plain = by_pool["k8s/dedicated"], by_pool["k8s/a100"]
    for r in requests:
        validate_manifest(r.job)
    keys = {t["key"] for t in tolerant.job["spec"]["template"]["spec"]["tolerations"]}
    assert "dedicated" in keys
    keys = {t["key"] for t in plain.job["spec"]["template"]["spec"]["tolerations"]}
    assert "dedicated" not in keys
    assert node_of(kube_cluster, tolerant) == "ded-1"  # the emulated scheduler let it in
    assert node_of(kube_cluster, plain) == "gpu-1"
    got = await driver.describe(["tolerant-0", "plain-0"])
    assert [r.state for r in got] == [S.SUCCEEDED, S.SUCCEEDED]


async def test_a_task_that_does_not_tolerate_the_taint_is_not_placed_there(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.add_node(DEDICATED)
    pools = await driver.discover()
    plain = DemandClass(
        id="c0", cpus=14, memory=8 * GiB, members=["plain-0"], forbid_pools=("k8s/burst",)
    )
    solution = solve(PlacementProblem(pools=pools, classes=[plain]))
    assert solution.assignments == []
    assert "tainted dedicated" in solution.unplaced["c0"]


async def test_an_autoscaled_pool_scales_from_zero_when_chosen(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    classes = [DemandClass(id="c0", cpus=8, memory=16 * GiB, gpus=1, gpu_types=("h100",),
                           members=["train-0"])]  # fmt: skip
    pools, solution, (req,) = await place_and_submit(driver, classes)
    burst = {p.id: p for p in pools}["k8s/burst"]
    assert burst.elastic and (burst.cpus, burst.gpus, burst.max_instances) == (0.0, {}, 2)
    assert [(a.pool_id, a.gpu_model) for a in solution.assignments] == [("k8s/burst", "h100")]
    assert solution.instances == {"k8s/burst": 1}
    assert req.job["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-nodepool": "burst"
    }
    # what the core does with solution.instances: nothing starts, the autoscaler does it
    assert await driver.provision("k8s/burst", 1, "tok-1") == ["burst/tok-1/0"]
    await kube_cluster.asettle()
    (pod,) = kube_cluster.job_pods(req.name)
    sched = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert sched["reason"] == "Unschedulable"
    # waiting for its node: not unschedulable yet (unschedulable_after 0.01 s, boot time 1 h)
    (report,) = await driver.describe(["train-0"])
    assert (report.state, report.failure) == (S.QUEUED, None), report
    # the cluster autoscaler's part: a node for the pending pod
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("succeed"))
    kube_cluster.add_node(
        NodeSpec(
            name="burst-1",
            pool="burst",
            cpu="16",
            memory="64Gi",
            gpus=1,
            gpu_product="NVIDIA-H100-80GB-HBM3",
            taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        )
    )
    await kube_cluster.asettle()
    assert node_of(kube_cluster, req) == "burst-1"
    (report,) = await driver.describe(["train-0"])
    assert report.state is S.SUCCEEDED
    burst = {p.id: p for p in await driver.discover()}["k8s/burst"]
    assert (burst.max_instances, burst.gpus) == (1, {"h100": 1})


async def test_an_unconfigured_empty_pool_is_not_offered(
    kube_cluster: KubeCluster, kubeconfig: Path, tmp_path: Path
) -> None:
    config = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.12-slim")
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        pools = await d.discover()
    assert sorted(p.id for p in pools) == ["k8s/a100", "k8s/cpu"]
    assert not any(p.elastic for p in pools)
