"""Device leases on Kubernetes, on the emulated cluster: the scheduler core places runs on the
node and GPUs that discovery describes, and the pod goes to exactly that node.

A node pool of three 2-GPU nodes, two of them with one GPU taken by someone else's pod: a
2-GPU run goes to the one node with 2 free devices (its pod pinned there by a required node
affinity, asking 2 GPUs); a second 2-GPU run fits the pool's totals (2 GPUs free) but no node
(one free on each of two), and waits with that reason, also after a rediscovery made while
the first one's pod runs (its pod is the core's lease, not someone else's use); when the first
ends, the second goes to the devices it freed.

The first test drives the real core (``SchedulerCore``, with the real placer) and the real
driver over HTTP, doing what the command shell does between them one step at a time; the
second is ``stowplan run`` end to end (Ray actors, the store) on the same cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stowplan.cli.main import main
from stowplan.placement import solve
from stowplan.placement.leases import MILLI, DeviceLease
from stowplan.placement.problem import Pool
from stowplan.provenance.store import RunStore
from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Command,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    SolvePlacement,
    Submit,
    TaskInstance,
    TasksSubmitted,
    Transitioned,
)
from stowplan.scheduler.states import TaskState
from stowplan.spec.models import KubernetesProviderConfig
from tests.kubecluster import KubeCluster, NodeSpec, PodOutcome, validate_manifest

from .conftest import write_project

pytestmark = pytest.mark.integration

GiB = 1 << 30
POOL = "k8s/v100"
HOSTNAME = "kubernetes.io/hostname"
PIN = "requiredDuringSchedulingIgnoredDuringExecution"


def v100(name: str) -> NodeSpec:
    return NodeSpec(
        name=name,
        pool="v100",
        cpu="16",
        memory="64Gi",
        gpus=2,
        gpu_product="Tesla-V100-SXM2-16GB",
        region="europe-west4",
        taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    )


def someone_elses_pod(node: str) -> dict[str, Any]:
    """A pod not of stowplan's, bound to ``node``, holding one of its GPUs."""
    req = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"other-{node}", "namespace": "default"},
        "spec": {
            "nodeName": node,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "resources": {"requests": req, "limits": req},
                }
            ],
        },
    }


async def fragment(kube_cluster: KubeCluster, kubeconfig: Path) -> None:
    """The v100 pool: gpu-a with both GPUs free, gpu-b and gpu-c with one taken each."""
    from kubernetes_asyncio import client, config

    for name in ("gpu-a", "gpu-b", "gpu-c"):
        kube_cluster.add_node(v100(name))
    api = await config.new_client_from_config(config_file=str(kubeconfig))
    async with api:
        for node in ("gpu-b", "gpu-c"):
            body: Any = someone_elses_pod(node)  # the API takes the JSON as it is
            await client.CoreV1Api(api).create_namespaced_pod("default", body)
    await kube_cluster.asettle()


@pytest.fixture
async def driver(
    kube_cluster: KubeCluster, kubeconfig: Path, tmp_path: Path
) -> AsyncIterator[KubernetesProvider]:
    await fragment(kube_cluster, kubeconfig)
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    config = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.12-slim")
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        yield d


class Plane:
    """The command shell's part, by hand: the core's commands carried out on the driver."""

    def __init__(self, driver: KubernetesProvider) -> None:
        self.driver = driver
        self.core = SchedulerCore(CoreConfig())
        self.pools: list[Pool] = []
        self.submits: list[KubernetesRequest] = []
        self.leases: dict[str, DeviceLease | None] = {}
        self.why: dict[str, str] = {}
        self.tasks: dict[str, TaskInstance] = {}

    async def feed(self, event: Event) -> None:
        pending: list[Event] = [event]
        while pending:
            commands: list[Command] = self.core.handle(pending.pop(0), 0.0)
            for cmd in commands:
                if isinstance(cmd, SolvePlacement):
                    pending.append(PlacementDecided(solution=solve(cmd.problem)))
                elif isinstance(cmd, Submit):
                    pending.append(await self.submit(cmd))
                elif isinstance(cmd, Transitioned):
                    for t in cmd.records:
                        if t.to_state is TaskState.READY and t.reason:
                            self.why[t.run_id] = t.reason

    async def submit(self, cmd: Submit) -> ProviderReported:
        launches = []
        for item in cmd.items:
            t = self.tasks[item.run_id]
            self.leases[item.run_id] = item.lease
            launches.append(
                LaunchSpec(
                    key=item.key,
                    run_id=item.run_id,
                    attempt=item.attempt,
                    pool=cmd.pool,
                    name="train",
                    argv=["python", "train.py"],
                    cpus=t.cpus,
                    memory=t.memory,
                    gpus=t.gpus,
                    gpu_milli=t.gpu_milli,
                    gpu_types=t.gpu_types,
                    lease=item.lease,  # what the shell's launch_spec passes on
                )
            )
        requests = self.driver.plan(launches, Facts.of(self.pools))
        self.submits += [r for r in requests if isinstance(r, KubernetesRequest)]
        return ProviderReported(provider="k8s", reports=await self.driver.submit(requests))

    async def discover(self) -> None:
        self.pools = await self.driver.discover()
        await self.feed(PoolsDiscovered(provider="k8s", pools=self.pools))

    async def run(self, *tasks: TaskInstance) -> None:
        self.tasks.update({t.run_id: t for t in tasks})
        await self.feed(TasksSubmitted(tasks=list(tasks)))

    async def observe(self, *run_ids: str) -> None:
        keys = [self.core.key(r) for r in run_ids]
        await self.feed(ProviderReported(provider="k8s", reports=await self.driver.describe(keys)))

    def request_of(self, run_id: str) -> KubernetesRequest:
        key = self.core.key(run_id)
        return next(r for r in self.submits if key in r.keys)


def train(run_id: str) -> TaskInstance:
    return TaskInstance(run_id=run_id, cpus=2, memory=4 * GiB, gpus=2, gpu_types=("v100",))


def pinned_to(req: KubernetesRequest) -> list[str]:
    pod = req.job["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"][PIN]["nodeSelectorTerms"]
    return [v for e in term["matchExpressions"] if e["key"] == HOSTNAME for v in e["values"]]


@pytest.mark.anyio
async def test_a_run_goes_to_the_node_whose_devices_hold_it(
    driver: KubernetesProvider, kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    plane = Plane(driver)
    await plane.discover()
    pool = {p.id: p for p in plane.pools}[POOL]
    assert pool.devices is not None and pool.gpus == {"v100": 4}
    assert [(n.name, n.devices) for n in pool.devices.nodes] == [
        ("gpu-a", (MILLI, MILLI)),
        ("gpu-b", (0, MILLI)),
        ("gpu-c", (0, MILLI)),
    ]

    await plane.run(train("r0"))
    assert plane.leases["r0"] == DeviceLease("gpu-a", (0, 1))
    req = plane.request_of("r0")
    validate_manifest(req.job)
    assert pinned_to(req) == ["gpu-a"]
    (container,) = req.job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    await kube_cluster.asettle()
    (pod,) = kube_cluster.job_pods(req.name)
    assert pod["spec"]["nodeName"] == "gpu-a"
    record = pod["metadata"]["annotations"]["stowplan.io/devices"]
    assert json.loads(record) == {"node": "gpu-a", "devices": [[0, 1]]}
    await plane.observe("r0")
    assert plane.core.state("r0") is TaskState.RUNNING

    # 2 GPUs free in the pool, one on each of two nodes: it waits, and says why
    await plane.run(train("r1"))
    assert plane.core.state("r1") is TaskState.READY and "r1" not in plane.leases
    assert "none has 2 free devices" in plane.why.pop("r1")

    # rediscovered while r0's pod runs: its pod is r0's lease, not someone else's GPUs
    before = plane.pools
    await plane.discover()
    assert plane.pools == before
    # and by a restarted control plane's driver, which has not looked its keys up yet
    async with KubernetesProvider("k8s", driver.config, state_dir=tmp_path / "again") as fresh:
        assert await fresh.discover() == before
    assert plane.core.state("r1") is TaskState.READY and "r1" not in plane.leases
    assert plane.core.lease("r0") == DeviceLease("gpu-a", (0, 1))
    assert "not known" not in plane.why.get("r1", "")

    # r0 ends: r1 takes the devices it freed
    kube_cluster.succeed_pod(pod["metadata"]["name"])
    await kube_cluster.asettle()
    await plane.observe("r0")
    assert plane.core.state("r0") is TaskState.SUCCEEDED
    assert plane.leases["r1"] == DeviceLease("gpu-a", (0, 1))
    req = plane.request_of("r1")
    assert pinned_to(req) == ["gpu-a"]
    await kube_cluster.asettle()
    (pod,) = kube_cluster.job_pods(req.name)
    assert pod["spec"]["nodeName"] == "gpu-a"
    (report,) = await driver.describe([plane.core.key("r1")])
    assert report.state is ProviderState.RUNNING


SWEEP = """
[experiment]
name = "k8s-devices"

[[tasks]]
name = "train"
command = ["python", "train.py", "--trial", "{i}"]
resources = { cpus = 2, memory = "4GiB", gpus = 2, gpu_type = "v100" }
sweep = { parameters = { i = [0, 1] } }
"""


def test_stowplan_run_pins_each_pod_to_its_leased_node(
    ray_session: None,
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(fragment(kube_cluster, kubeconfig))
    f = write_project(tmp_path, kubeconfig, SWEEP)
    os.chdir(tmp_path)
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("succeed"))

    assert main(["run", str(f), "--provider", "k8s"]) == 0, capsys.readouterr().err

    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        events = {r.run_id: store.events_for(r.run_id) for r in runs}
    assert len(runs) == 2 and {r.state for r in runs} == {"SUCCEEDED"}
    # both trials were placed at once; only one node holds 2 free GPUs, so one waited
    waited = [
        e.reason for es in events.values() for e in es if "none has 2 free devices" in e.reason
    ]
    assert waited, events
    pods = [p for p in kube_cluster.pods() if p["metadata"]["name"].startswith("sp-")]
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == "gpu-a"
        (term,) = pod["spec"]["affinity"]["nodeAffinity"][PIN]["nodeSelectorTerms"]
        pin = {"key": HOSTNAME, "operator": "In", "values": ["gpu-a"]}
        assert pin in term["matchExpressions"]
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
