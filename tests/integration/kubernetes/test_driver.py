"""The Kubernetes driver against the emulated cluster, over real HTTP with a token kubeconfig:
discover, submit, describe, watch, cancel and logs of Indexed Jobs, and the faults the issue
lists (a lost create answer, 410 mid-watch, 503 with Retry-After)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from stowplan.errors import ProviderError, SpecError
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    ProviderState,
    Report,
    WatchSet,
)
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.providers.kubernetes.api import KubernetesError
from stowplan.spec.models import FailureClass, KubernetesProviderConfig
from tests.kubecluster import KubeCluster, PodOutcome, validate_manifest

pytestmark = pytest.mark.anyio

S = ProviderState


def launches(n: int, pool: str = "k8s/cpu", **kw: Any) -> list[LaunchSpec]:
    return [
        LaunchSpec(
            key=f"t{i}-{pool.split('/')[1]}",
            run_id="r1",
            attempt=0,
            pool=pool,
            name="train",
            argv=["python", "train.py", f"--trial={i}"],
            cpus=1,
            memory=1 << 30,
            **kw,
        )
        for i in range(n)
    ]


@pytest.fixture
async def driver(kubeconfig: Path, tmp_path: Path) -> AsyncIterator[KubernetesProvider]:
    config = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.11-slim")
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        yield d


def by_index(outcomes: dict[int, PodOutcome]) -> Callable[[dict[str, Any]], PodOutcome | None]:
    def fn(pod: dict[str, Any]) -> PodOutcome | None:
        idx = int(pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])
        return outcomes.get(idx)

    return fn


async def plan_submit(
    driver: KubernetesProvider, specs: list[LaunchSpec]
) -> tuple[KubernetesRequest, list[Report]]:
    pools = await driver.discover()
    (req,) = driver.plan(specs, Facts.of(pools))
    assert isinstance(req, KubernetesRequest)
    return req, await driver.submit([req])


async def test_discover_finds_the_two_node_pools(driver: KubernetesProvider) -> None:
    pools = {p.id: p for p in await driver.discover()}
    assert sorted(pools) == ["k8s/a100", "k8s/cpu"]
    assert (pools["k8s/cpu"].cpus, pools["k8s/cpu"].memory) == (16.0, 64 << 30)
    assert pools["k8s/a100"].gpus == {"a100": 1}
    assert pools["k8s/a100"].region == "europe-west4"
    assert driver.pool_label == "cloud.google.com/gke-nodepool"


async def test_sweep_runs_as_an_indexed_job(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.set_pod_behaviour(
        by_index(
            {
                0: PodOutcome("succeed", log="epoch 1 loss 0.5\n"),
                1: PodOutcome("fail", exit_code=3),
                2: PodOutcome("oom"),
            }
        )
    )
    req, reports = await plan_submit(driver, launches(3))
    assert [r.state for r in reports] == [S.QUEUED] * 3
    await kube_cluster.asettle()
    job = kube_cluster.get("jobs", req.name, group="batch")
    assert job is not None
    validate_manifest({k: v for k, v in job.items() if k != "status"} | {"status": {}})
    cm = kube_cluster.get("configmaps", req.name)
    assert cm is not None
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    got = await driver.describe(list(req.keys))
    assert [(r.state, r.failure, r.exit_code) for r in got] == [
        (S.SUCCEEDED, None, 0),
        (S.FAILED, FailureClass.USER_ERROR, 3),
        (S.FAILED, FailureClass.OUT_OF_MEMORY, 137),
    ]
    assert got[0].node == "cpu-1" and got[0].job_id == f"default/{req.name}#0"
    logs = b"".join([c async for c in driver.logs(req.keys[0])])
    assert logs == b"epoch 1 loss 0.5\n"
    # one merged log per container: stderr is that log too, not nothing
    assert b"".join([c async for c in driver.logs(req.keys[0], stream="stderr")]) == logs
    assert [c async for c in driver.logs("never-submitted")] == []


async def test_a_restarted_driver_finds_its_keys(
    driver: KubernetesProvider, kube_cluster: KubeCluster, kubeconfig: Path, tmp_path: Path
) -> None:
    kube_cluster.set_pod_behaviour(by_index({0: PodOutcome("run")}))
    req, _ = await plan_submit(driver, launches(2))
    await kube_cluster.asettle()
    config = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.11-slim")
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as fresh:
        got = await fresh.describe([*req.keys, "unknown-key"])
    assert [r.state for r in got] == [S.RUNNING, S.QUEUED, S.UNKNOWN]


async def test_cancel_deletes_the_job_once_every_attempt_is_cancelled(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    req, _ = await plan_submit(driver, launches(2))
    await kube_cluster.asettle()
    await driver.cancel([req.keys[0]])
    assert kube_cluster.get("jobs", req.name, group="batch") is not None
    await driver.cancel([req.keys[1]])
    await kube_cluster.asettle()
    assert kube_cluster.get("jobs", req.name, group="batch") is None
    assert kube_cluster.get("configmaps", req.name) is None
    assert kube_cluster.job_pods(req.name) == []
    got = await driver.describe(list(req.keys))
    assert [r.state for r in got] == [S.CANCELLED, S.CANCELLED]
    await driver.cancel(list(req.keys))  # idempotent: 404 is success
    deletes = [r for r in kube_cluster.requests if r.verb == "delete" and "/jobs/" in r.path]
    assert "propagationPolicy=Background" in deletes[0].query


async def test_lost_create_answer_is_found_by_name_and_never_created_twice(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    pools = await driver.discover()
    (req,) = driver.plan(launches(2), Facts.of(pools))
    assert isinstance(req, KubernetesRequest)
    kube_cluster.drop_connections(1, after_processing=True, method="POST", path_contains="/jobs")
    first = await driver.submit([req])
    assert [r.state for r in first] == [S.QUEUED, S.QUEUED]
    again = await driver.submit([req])  # the shell's retry: 409, same keys -> the same Job
    assert [r.state for r in again] == [S.QUEUED, S.QUEUED]
    assert "already submitted" in again[0].message
    jobs = kube_cluster.objects("jobs", "default", group="batch")
    assert [j["metadata"]["name"] for j in jobs] == [req.name]
    creates = [r for r in kube_cluster.requests if r.method == "POST" and "/jobs" in r.path]
    assert [r.status for r in creates] == [-1, 409]


async def test_a_foreign_object_with_the_name_is_a_clear_error(
    driver: KubernetesProvider, kube_cluster: KubeCluster, kube_api: Any
) -> None:
    from kubernetes_asyncio import client

    pools = await driver.discover()
    (req,) = driver.plan(launches(1), Facts.of(pools))
    assert isinstance(req, KubernetesRequest)
    core: Any = client.CoreV1Api(kube_api)  # plain dict manifests, as the API accepts
    await core.create_namespaced_config_map(
        "default", {"metadata": {"name": req.name}, "data": {"x": "y"}}
    )
    (report,) = await driver.submit([req])
    assert (report.state, report.failure) == (S.FAILED, FailureClass.PROVIDER_REJECTED)
    assert "is not stowplan's request" in report.message
    assert kube_cluster.get("jobs", req.name, group="batch") is None


async def test_503_with_retry_after_is_retryable_and_not_retried_here(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.inject_errors(503, 1, retry_after=7, path_contains="/nodes")
    with pytest.raises(KubernetesError) as e:
        await driver.discover()
    assert e.value.retryable and e.value.status == 503 and e.value.retry_after == 7
    assert isinstance(e.value, ProviderError)
    assert len(await driver.discover()) == 2  # the shell's retry


async def next_reports(
    it: AsyncIterator[list[Report]], want: Callable[[dict[str, Report]], bool]
) -> dict[str, Report]:
    seen: dict[str, Report] = {}
    async with asyncio.timeout(20):
        while not want(seen):
            for r in await anext(it):
                seen[r.key] = r
    return seen


async def test_watch_follows_bookmarks_and_relists_after_410(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    req, _ = await plan_submit(driver, launches(2))
    keys = WatchSet(list(req.keys))
    it = aiter(driver.watch(keys, renew_every=3600))
    try:
        seen = await next_reports(
            it, lambda s: all(s.get(k) and s[k].state is S.RUNNING for k in req.keys)
        )
        assert set(seen) == set(req.keys)
        lists_before = sum(1 for r in kube_cluster.requests if r.verb == "list")
        # every watch is cut and cannot come back while the pods end and the history is
        # compacted: resuming from the last resourceVersion is then 410 Gone -> relist
        kube_cluster.inject_errors(503, 10_000, path_contains="watch=")
        kube_cluster.close_watches()
        for i in range(len(req.keys)):
            pod = kube_cluster.pod_for_index(req.name, i)
            if i == 0:
                kube_cluster.succeed_pod(pod["metadata"]["name"])
            else:
                kube_cluster.evict_pod(pod["metadata"]["name"])
        await kube_cluster.asettle()
        kube_cluster.compact()
        kube_cluster.clear_faults()
        done = await next_reports(
            it, lambda s: all(k in s and s[k].state in TERMINAL_PROVIDER_STATES for k in req.keys)
        )
        assert (done[req.keys[0]].state, done[req.keys[1]].failure) == (
            S.SUCCEEDED,
            FailureClass.PREEMPTED,
        )
        assert len(keys) == 0  # terminal keys leave the watch set
        lists_after = sum(1 for r in kube_cluster.requests if r.verb == "list")
        assert lists_after > lists_before
        watches = [r for r in kube_cluster.requests if r.verb == "watch"]
        assert watches and all("allowwatchbookmarks=true" in r.query.lower() for r in watches)
    finally:
        await it.aclose()  # type: ignore[attr-defined]
    # describe knows the eviction too: the index failed and its pod is gone
    (evicted,) = await driver.describe([req.keys[1]])
    assert evicted.failure is FailureClass.PREEMPTED


async def test_capacity_changes_follow_the_nodes(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    it = aiter(driver.capacity_changes())
    try:
        first = asyncio.ensure_future(anext(it))
        async with asyncio.timeout(10):  # the watcher has listed the nodes (it resumes there)
            while not any(
                r.verb == "list" and r.path == "/api/v1/nodes" for r in kube_cluster.requests
            ):
                await asyncio.sleep(0.01)
        kube_cluster.set_node_unschedulable("cpu-2")
        async with asyncio.timeout(10):
            assert await first == "node cpu-2 changed"
    finally:
        await it.aclose()  # type: ignore[attr-defined]
    pools = {p.id: p for p in await driver.discover()}
    assert pools["k8s/cpu"].cpus == 8.0
    assert any("cpu-2: cordoned" in n for n in driver.discovery_notes)


async def test_pool_label_on_no_node_is_a_spec_error(kubeconfig: Path, tmp_path: Path) -> None:
    config = KubernetesProviderConfig(
        kubeconfig=str(kubeconfig), image="x:1", node_pool_label="karpenter.sh/nodepool"
    )
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        with pytest.raises(SpecError) as e:
            await d.discover()
    assert e.value.path == "$.providers.k8s.node_pool_label"
    assert "cloud.google.com/gke-nodepool" in (e.value.hint or "")


async def test_the_token_is_never_in_reports_or_logs(
    driver: KubernetesProvider, kube_cluster: KubeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("fail", exit_code=2))
    req, reports = await plan_submit(driver, launches(1))
    await kube_cluster.asettle()
    reports += await driver.describe(list(req.keys))
    kube_cluster.inject_errors(500, 1)
    with pytest.raises(ProviderError) as e:
        await driver.describe(["other"])
    text = caplog.text + repr(reports) + str(e.value) + req.render()
    assert kube_cluster.token not in text


async def test_watch_survives_an_apiserver_restart(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    req, _ = await plan_submit(driver, launches(2))
    keys = WatchSet(list(req.keys))
    it = aiter(driver.watch(keys, renew_every=3600))
    try:
        await next_reports(
            it, lambda s: all(s.get(k) and s[k].state is S.RUNNING for k in req.keys)
        )
        kube_cluster.restart(keep_state=True)
        for i in range(len(req.keys)):
            kube_cluster.succeed_pod(kube_cluster.pod_for_index(req.name, i)["metadata"]["name"])
        done = await next_reports(
            it, lambda s: all(k in s and s[k].state in TERMINAL_PROVIDER_STATES for k in req.keys)
        )
        assert {r.state for r in done.values()} == {S.SUCCEEDED}
    finally:
        await it.aclose()  # type: ignore[attr-defined]
    assert [j["metadata"]["name"] for j in kube_cluster.objects("jobs", group="batch")] == [
        req.name
    ]


async def test_a_1000_trial_sweep_costs_few_api_requests(
    kubeconfig: Path, kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    config = KubernetesProviderConfig(
        kubeconfig=str(kubeconfig), image="python:3.11-slim", max_parallelism=8
    )
    async with KubernetesProvider("k8s", config, state_dir=tmp_path) as d:
        before = len(kube_cluster.requests)
        pools = await d.discover()
        reqs = d.plan(launches(1000), Facts.of(pools))
        assert len(reqs) == 1
        reports = await d.submit(reqs)
        described = await d.describe([r.key for r in reports])
        assert len(described) == 1000
        assert {r.state for r in described} <= {S.QUEUED, S.RUNNING}
        per_trial = (len(kube_cluster.requests) - before) / 1000
    assert per_trial <= 0.05, per_trial


async def test_without_cluster_wide_pod_list_only_the_namespace_counts(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.inject_errors(403, 1, path_contains="/api/v1/pods")
    pools = {p.id: p for p in await driver.discover()}
    assert pools["k8s/cpu"].cpus == 16.0
    assert "namespace default" in driver.discovery_notes[0]


async def test_logs_follow_until_the_attempt_ends(
    driver: KubernetesProvider, kube_cluster: KubeCluster
) -> None:
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    req, _ = await plan_submit(driver, launches(1))
    await kube_cluster.asettle()
    pod = kube_cluster.pod_for_index(req.name, 0)["metadata"]["name"]
    kube_cluster.write_log(pod, "step 1\n")
    it = aiter(driver.logs(req.keys[0], follow=True))
    async with asyncio.timeout(10):
        assert await anext(it) == b"step 1\n"
        kube_cluster.write_log(pod, "step 2\n")
        assert await anext(it) == b"step 2\n"
        kube_cluster.succeed_pod(pod)
        assert [c async for c in it] == []
