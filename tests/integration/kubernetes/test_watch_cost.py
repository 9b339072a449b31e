"""The watch's work per event is that of what the event touched: one pod's change re-states
its own index, not every index of its Job; and a pod waiting for a node turns NO_CAPACITY
by the clock, with no event to say so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import stowplan.providers.kubernetes.driver as driver_module
from stowplan.providers.base import Facts, LaunchSpec, ProviderState, Report, WatchSet
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest, states
from stowplan.spec.models import FailureClass, KubernetesProviderConfig
from tests.kubecluster import KubeCluster, PodOutcome

pytestmark = pytest.mark.anyio

S = ProviderState
INDEX = "batch.kubernetes.io/job-completion-index"


def specs(n: int, cpus: float) -> list[LaunchSpec]:
    return [
        LaunchSpec(
            key=f"t{i}",
            run_id="r1",
            attempt=0,
            pool="k8s/cpu",
            name="train",
            argv=["python", "train.py", f"--trial={i}"],
            cpus=cpus,
            memory=1 << 20,
        )
        for i in range(n)
    ]


async def submit(driver: KubernetesProvider, launches: list[LaunchSpec]) -> KubernetesRequest:
    (req,) = driver.plan(launches, Facts.of(await driver.discover()))
    assert isinstance(req, KubernetesRequest)
    await driver.submit([req])
    return req


async def until(
    it: AsyncIterator[list[Report]], want: Callable[[dict[str, Report]], bool]
) -> dict[str, Report]:
    seen: dict[str, Report] = {}
    async with asyncio.timeout(20):
        while not want(seen):
            for r in await anext(it):
                seen[r.key] = r
    return seen


async def test_one_pod_event_restates_its_index_only(
    kubeconfig: Path, tmp_path: Path, kube_cluster: KubeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.11-slim")
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as driver:
        req = await submit(driver, specs(40, cpus=0.1))
        it = aiter(driver.watch(WatchSet(list(req.keys)), renew_every=3600))
        try:
            await until(it, lambda s: all(k in s and s[k].state is S.RUNNING for k in req.keys))
            # once one index is said ended, the streams are in (their first lists re-state all)
            pod = kube_cluster.pod_for_index(req.name, 3)
            kube_cluster.succeed_pod(pod["metadata"]["name"])
            await until(it, lambda s: req.keys[3] in s and s[req.keys[3]].state is S.SUCCEEDED)
            calls: list[int] = []
            real = states.index_state

            def counting(job: Any, index: int, *a: Any, **kw: Any) -> Any:
                calls.append(index)
                return real(job, index, *a, **kw)

            monkeypatch.setattr(driver_module, "index_state", counting)
            pod = kube_cluster.pod_for_index(req.name, 7)
            kube_cluster.succeed_pod(pod["metadata"]["name"])
            await until(it, lambda s: req.keys[7] in s and s[req.keys[7]].state is S.SUCCEEDED)
            # the pod's events and the Job's completedIndexes change: index 7 each time
            assert calls and set(calls) == {7}
        finally:
            await it.aclose()  # type: ignore[attr-defined]


async def test_an_unschedulable_pod_turns_no_capacity_without_another_event(
    kubeconfig: Path, tmp_path: Path, kube_cluster: KubeCluster
) -> None:
    config = KubernetesProviderConfig(
        kubeconfig=str(kubeconfig), image="python:3.11-slim", unschedulable_after=1.0
    )
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as driver:
        req = await submit(driver, specs(1, cpus=100))  # no node has 100 CPUs
        it = aiter(driver.watch(WatchSet(list(req.keys)), renew_every=3600))
        try:
            got = await until(it, lambda s: req.keys[0] in s and s[req.keys[0]].state is S.FAILED)
        finally:
            await it.aclose()  # type: ignore[attr-defined]
    assert got[req.keys[0]].failure is FailureClass.NO_CAPACITY
