"""An index unschedulable past ``unschedulable_after`` is reported NO_CAPACITY; the core then
cancels it and places the trial elsewhere, so the waiting pod must go and never run later
(else the trial could run twice), while the Job's other indexes carry on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.spec.models import FailureClass, KubernetesProviderConfig
from tests.kubecluster import KubeCluster, PodOutcome

pytestmark = pytest.mark.anyio

S = ProviderState
INDEX = "batch.kubernetes.io/job-completion-index"


@pytest.fixture
async def driver(kubeconfig: Path, tmp_path: Path) -> AsyncIterator[KubernetesProvider]:
    config = KubernetesProviderConfig(
        kubeconfig=str(kubeconfig), image="python:3.11-slim", unschedulable_after=0.01
    )
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        yield d


async def test_an_index_unschedulable_too_long_is_cancelled_alone_and_never_runs(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.set_node_unschedulable("cpu-2")  # room for one 5-CPU pod only
    scheduled: list[int] = []

    def behaviour(pod: dict[str, Any]) -> PodOutcome:
        scheduled.append(int(pod["metadata"]["labels"][INDEX]))
        return PodOutcome("run")

    kube_cluster.set_pod_behaviour(behaviour)
    specs = [
        LaunchSpec(
            key=f"t{i}",
            run_id="r1",
            attempt=0,
            pool="k8s/cpu",
            name="train",
            argv=["python", "train.py", f"--trial={i}"],
            cpus=5,
            memory=1 << 30,
        )
        for i in range(2)
    ]
    (req,) = driver.plan(specs, Facts.of(await driver.discover()))
    assert isinstance(req, KubernetesRequest)
    await driver.submit([req])
    await kube_cluster.asettle()
    assert len(scheduled) == 1
    (ran,) = scheduled
    waiting = 1 - ran
    for _ in range(200):  # the threshold is 10 ms: poll until it has passed
        got = await driver.describe(list(req.keys))
        if got[waiting].state is S.FAILED:
            break
        await asyncio.sleep(0.01)
    assert got[ran].state is S.RUNNING
    assert (got[waiting].state, got[waiting].failure) == (S.FAILED, FailureClass.NO_CAPACITY)

    # the core re-places the refused trial and cancels this attempt of it
    await driver.cancel([req.keys[waiting]])
    await kube_cluster.asettle()
    assert kube_cluster.get("jobs", req.name, group="batch") is not None
    pods = kube_cluster.job_pods(req.name)
    assert [p["metadata"]["labels"][INDEX] for p in pods] == [str(ran)]

    # the running index ends, which frees the room the refused one waited for
    kube_cluster.succeed_pod(pods[0]["metadata"]["name"])
    await kube_cluster.asettle()
    job = kube_cluster.get("jobs", req.name, group="batch")
    assert job is not None
    assert job["status"].get("completedIndexes") == str(ran)
    assert job["status"].get("failedIndexes") == str(waiting)
    assert scheduled == [ran]  # the refused index never ran
    assert [p["metadata"]["labels"][INDEX] for p in kube_cluster.job_pods(req.name)] == [str(ran)]
    got = await driver.describe(list(req.keys))
    assert got[ran].state is S.SUCCEEDED
    assert got[waiting].failure is FailureClass.NO_CAPACITY
