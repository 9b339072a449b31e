"""Self-tests of the emulated Kubernetes cluster, only through kubernetes-asyncio over HTTP
(the controls stand in for kubelets, nodes and the network)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiException
from kubernetes_asyncio.watch import Watch

from tests.kubecluster import KubeCluster, validate_manifest
from tests.kubecluster.validation import ManifestError

pytestmark = pytest.mark.anyio

NS = "default"


def indexed_job(name: str, completions: int = 3, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "sweep"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimitPerIndex": 0,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {"action": "FailIndex", "onExitCodes": {"operator": "NotIn", "values": [0]}},
                ]
            },
            "template": {
                "metadata": {"labels": {"app": "sweep"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", "print(1)"],
                            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                        }
                    ],
                },
            },
            **spec,
        },
    }


def core_api(api: Any) -> Any:
    """CoreV1Api, untyped: the tests send plain dict manifests, as the API accepts."""
    return client.CoreV1Api(api)


def batch_api(api: Any) -> Any:
    return client.BatchV1Api(api)


def status_body(e: ApiException) -> dict[str, Any]:
    assert e.body is not None
    body: dict[str, Any] = json.loads(e.body)
    return body


def header(e: ApiException, name: str) -> str:
    assert e.headers is not None
    return str(e.headers[name])


async def job_pods(core: Any, job: str) -> list[Any]:
    selector = f"batch.kubernetes.io/job-name={job}"
    out = await core.list_namespaced_pod(NS, label_selector=selector)
    return list(out.items)


def by_index(pods: list[Any]) -> dict[int, Any]:
    return {
        int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]): p for p in pods
    }


async def test_create_twice_is_409_already_exists_and_missing_is_404(kube_api: Any) -> None:
    core = core_api(kube_api)
    first = await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "params"}, "data": {"0": "--lr=0.1"}}
    )
    assert first.metadata.uid and int(first.metadata.resource_version) > 0
    with pytest.raises(ApiException) as dup:
        await core.create_namespaced_config_map(NS, {"metadata": {"name": "params"}})
    status = status_body(dup.value)
    assert (dup.value.status, status["kind"], status["reason"]) == (409, "Status", "AlreadyExists")
    assert status["details"] == {"name": "params", "kind": "configmaps"}
    with pytest.raises(ApiException) as missing:
        await batch_api(kube_api).read_namespaced_job("nope", NS)
    body = status_body(missing.value)
    assert (missing.value.status, body["reason"], body["message"]) == (
        404,
        "NotFound",
        'jobs.batch "nope" not found',
    )
    second = await core.create_namespaced_config_map(NS, {"metadata": {"name": "other"}})
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert second.metadata.uid != first.metadata.uid


async def test_watch_resumes_sends_bookmarks_and_answers_410_after_compaction(
    kube_api: Any, kube_cluster: KubeCluster
) -> None:
    core = core_api(kube_api)
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "a", "labels": {"sweep": "s1"}}}
    )
    listed = await core.list_namespaced_config_map(NS, label_selector="sweep=s1")
    rv = listed.metadata.resource_version
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "b", "labels": {"sweep": "s1"}}}
    )
    await core.create_namespaced_config_map(
        NS, {"metadata": {"name": "c", "labels": {"sweep": "other"}}}
    )
    seen: list[tuple[str, str | None]] = []
    async with Watch() as w:
        async for ev in w.stream(
            core.list_namespaced_config_map,
            NS,
            label_selector="sweep=s1",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=5,
        ):
            name = ev["raw_object"]["metadata"].get("name")
            seen.append((ev["type"], name))
            if ev["type"] == "ADDED":
                kube_cluster.send_bookmarks()
            if ev["type"] == "BOOKMARK":
                bookmark_rv = ev["raw_object"]["metadata"]["resourceVersion"]
                break
    # resumed after `a`; `c` is filtered by the selector; then a bookmark
    assert seen == [("ADDED", "b"), ("BOOKMARK", None)]
    assert int(bookmark_rv) >= int(rv)

    kube_cluster.compact()
    with pytest.raises(ApiException) as gone:
        async with Watch() as w:
            async for _ in w.stream(
                core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=5
            ):
                pass
    assert gone.value.status == 410

    # relist, then watch from the new resourceVersion
    relisted = await core.list_namespaced_config_map(NS, label_selector="sweep=s1")
    assert sorted(i.metadata.name for i in relisted.items) == ["a", "b"]
    await core.delete_namespaced_config_map("a", NS)
    async with Watch() as w:
        async for ev in w.stream(
            core.list_namespaced_config_map,
            NS,
            label_selector="sweep=s1",
            resource_version=relisted.metadata.resource_version,
            timeout_seconds=5,
        ):
            assert (ev["type"], ev["object"].metadata.name) == ("DELETED", "a")
            break


async def test_indexed_job_with_an_oom_killed_index(
    kube_api: Any, kube_cluster: KubeCluster
) -> None:
    core, batch = core_api(kube_api), batch_api(kube_api)
    manifest = indexed_job("sweep")
    validate_manifest(manifest)
    created = await batch.create_namespaced_job(NS, manifest)
    assert created.spec.selector.match_labels == {
        "batch.kubernetes.io/controller-uid": created.metadata.uid
    }
    await kube_cluster.asettle()
    pods = by_index(await job_pods(core, "sweep"))
    assert sorted(pods) == [0, 1, 2]
    for i, pod in pods.items():
        assert pod.metadata.labels["batch.kubernetes.io/job-completion-index"] == str(i)
        assert pod.metadata.name.startswith(f"sweep-{i}-")
        assert pod.spec.hostname == f"sweep-{i}"
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert env["JOB_COMPLETION_INDEX"].value_from.field_ref.field_path == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        )
        assert pod.metadata.owner_references[0].uid == created.metadata.uid
        assert pod.spec.node_name in ("cpu-1", "cpu-2")

    kube_cluster.succeed_pod(pods[0].metadata.name)
    kube_cluster.oom_kill_pod(pods[1].metadata.name)
    await kube_cluster.asettle()
    job = await batch.read_namespaced_job_status("sweep", NS)
    assert (job.status.completed_indexes, job.status.failed_indexes) == ("0", "1")
    assert not job.status.conditions  # index 2 still runs: the Job goes on
    oom = await core.read_namespaced_pod_status(pods[1].metadata.name, NS)
    term = oom.status.container_statuses[0].state.terminated
    assert (oom.status.phase, term.reason, term.exit_code) == ("Failed", "OOMKilled", 137)

    kube_cluster.succeed_pod(pods[2].metadata.name)
    await kube_cluster.asettle()
    job = await batch.read_namespaced_job_status("sweep", NS)
    assert (job.status.completed_indexes, job.status.failed_indexes) == ("0,2", "1")
    assert (job.status.succeeded, job.status.failed, job.status.active) == (2, 1, None)
    assert [(c.type, c.reason) for c in job.status.conditions] == [
        ("FailureTarget", "FailedIndexes"),
        ("Failed", "FailedIndexes"),
    ]
    assert len(await job_pods(core, "sweep")) == 3  # no retry: backoffLimitPerIndex 0


async def test_suspended_job_starts_no_pod_until_resumed(
    kube_api: Any, kube_cluster: KubeCluster
) -> None:
    core, batch = core_api(kube_api), batch_api(kube_api)
    await batch.create_namespaced_job(NS, indexed_job("queued", 2, suspend=True))
    await kube_cluster.asettle()
    assert await job_pods(core, "queued") == []
    job = await batch.read_namespaced_job_status("queued", NS)
    assert [(c.type, c.status, c.reason) for c in job.status.conditions] == [
        ("Suspended", "True", "JobSuspended")
    ]
    assert job.status.start_time is None
    await batch.patch_namespaced_job("queued", NS, {"spec": {"suspend": False}})
    await kube_cluster.asettle()
    assert sorted(by_index(await job_pods(core, "queued"))) == [0, 1]
    job = await batch.read_namespaced_job_status("queued", NS)
    assert [(c.type, c.status, c.reason) for c in job.status.conditions] == [
        ("Suspended", "False", "JobResumed")
    ]
    assert job.status.start_time is not None


async def test_background_delete_removes_owned_pods_and_configmaps(
    kube_api: Any, kube_cluster: KubeCluster
) -> None:
    core, batch = core_api(kube_api), batch_api(kube_api)
    job = await batch.create_namespaced_job(NS, indexed_job("doomed", 2))
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "doomed", "uid": job.metadata.uid}
    await core.create_namespaced_config_map(
        NS,
        {
            "metadata": {"name": "doomed-params", "ownerReferences": [owner]},
            "data": {"0": "a", "1": "b"},
        },
    )
    await kube_cluster.asettle()
    assert len(await job_pods(core, "doomed")) == 2
    await batch.delete_namespaced_job("doomed", NS, propagation_policy="Background")
    await kube_cluster.asettle()
    assert await job_pods(core, "doomed") == []
    with pytest.raises(ApiException) as e:
        await core.read_namespaced_config_map("doomed-params", NS)
    assert e.value.status == 404

    # without a policy the batch/v1 default orphans the pods, and says so
    await batch.create_namespaced_job(NS, indexed_job("kept", 1))
    await kube_cluster.asettle()
    _, status, headers = await batch.delete_namespaced_job_with_http_info("kept", NS)
    assert status == 200 and "child pods are preserved" in headers["Warning"]
    await kube_cluster.asettle()
    (orphan,) = await job_pods(core, "kept")
    assert orphan.metadata.owner_references is None


async def test_retry_after_burst_then_success(kube_api: Any, kube_cluster: KubeCluster) -> None:
    core = core_api(kube_api)
    kube_cluster.inject_errors(503, 2, retry_after=1, path_contains="/configmaps")
    kube_cluster.inject_errors(429, 1, retry_after=2, path_contains="/configmaps")
    seen = []
    for _ in range(3):
        with pytest.raises(ApiException) as e:
            await core.list_namespaced_config_map(NS)
        body = status_body(e.value)
        seen.append(
            (
                e.value.status,
                header(e.value, "Retry-After"),
                body["reason"],
                body["details"]["retryAfterSeconds"],
            )
        )
    assert seen == [
        (503, "1", "ServiceUnavailable", 1),
        (503, "1", "ServiceUnavailable", 1),
        (429, "2", "TooManyRequests", 2),
    ]
    assert (await core.list_namespaced_config_map(NS)).items == []


async def test_dropped_answer_of_a_create_leaves_the_object_created(
    kube_api: Any, kube_cluster: KubeCluster
) -> None:
    core = core_api(kube_api)
    kube_cluster.drop_connections(1, after_processing=True, method="POST")
    with pytest.raises(aiohttp.ClientError):
        await core.create_namespaced_config_map(NS, {"metadata": {"name": "lost-answer"}})
    found = await core.read_namespaced_config_map("lost-answer", NS)
    with pytest.raises(ApiException) as e:
        await core.create_namespaced_config_map(NS, {"metadata": {"name": "lost-answer"}})
    assert e.value.status == 409
    kube_cluster.drop_connections(1, method="POST")
    with pytest.raises(aiohttp.ClientError):
        await core.create_namespaced_config_map(NS, {"metadata": {"name": "never-arrived"}})
    names = [i.metadata.name for i in (await core.list_namespaced_config_map(NS)).items]
    assert names == [found.metadata.name]


async def test_restart_keeps_or_resets_state(kube_api: Any, kube_cluster: KubeCluster) -> None:
    core = core_api(kube_api)
    before = await core.create_namespaced_config_map(NS, {"metadata": {"name": "survivor"}})
    port = kube_cluster.port
    kube_cluster.restart(keep_state=True)
    assert kube_cluster.port == port
    after = await core.read_namespaced_config_map("survivor", NS)
    assert after.metadata.uid == before.metadata.uid
    kube_cluster.restart(keep_state=False)
    with pytest.raises(ApiException) as e:
        await core.read_namespaced_config_map("survivor", NS)
    assert e.value.status == 404
    with pytest.raises(ApiException) as gone:
        async with Watch() as w:
            async for _ in w.stream(
                core.list_namespaced_config_map,
                NS,
                resource_version=before.metadata.resource_version,
                timeout_seconds=5,
            ):
                pass
    assert gone.value.status == 410


async def test_unschedulable_pod_and_node_loss(kube_api: Any, kube_cluster: KubeCluster) -> None:
    core = core_api(kube_api)
    nodes = {n.metadata.name: n for n in (await core.list_node()).items}
    gpu = nodes["gpu-1"]
    assert gpu.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert gpu.status.allocatable["nvidia.com/gpu"] == "1"
    pod = {
        "metadata": {"name": "greedy"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"cloud.google.com/gke-nodepool": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                }
            ],
        },
    }
    await core.create_namespaced_pod(NS, pod)
    await kube_cluster.asettle()
    got = await core.read_namespaced_pod_status("greedy", NS)
    (cond,) = [c for c in got.status.conditions if c.type == "PodScheduled"]
    assert (cond.status, cond.reason) == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in cond.message

    await core.create_namespaced_pod(
        NS,
        {
            "metadata": {"name": "worker"},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"kubernetes.io/hostname": "cpu-1"},
                "containers": [{"name": "main", "image": "busybox"}],
            },
        },
    )
    await kube_cluster.asettle()
    kube_cluster.run_pod("worker")
    kube_cluster.lose_node("cpu-1")
    await kube_cluster.asettle()
    node = await core.read_node_status("cpu-1")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "Unknown"
    assert {(t.key, t.effect) for t in node.spec.taints} == {
        ("node.kubernetes.io/unreachable", "NoSchedule"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
    }
    assert (await core.read_namespaced_pod("worker", NS)).status.phase == "Running"
    kube_cluster.advance_clock(301)  # past the default 300 s toleration
    await kube_cluster.asettle()
    with pytest.raises(ApiException) as e:
        await core.read_namespaced_pod("worker", NS)
    assert e.value.status == 404


async def test_pod_log_follow(kube_api: Any, kube_cluster: KubeCluster) -> None:
    core = core_api(kube_api)
    await core.create_namespaced_pod(
        NS,
        {
            "metadata": {"name": "talker"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox"}],
            },
        },
    )
    await kube_cluster.asettle()
    with pytest.raises(ApiException) as e:
        await core.read_namespaced_pod_log("talker", NS)
    assert e.value.status == 400 and "waiting to start" in status_body(e.value)["message"]
    kube_cluster.run_pod("talker")
    kube_cluster.write_log("talker", "epoch 1\n")
    lines = []
    async with Watch() as w:
        async for line in w.stream(core.read_namespaced_pod_log, "talker", NS):
            lines.append(line)
            if line == "epoch 1\n":
                kube_cluster.write_log("talker", "epoch 2\n")
                kube_cluster.succeed_pod("talker")
    assert lines == ["epoch 1\n", "epoch 2\n"]


async def test_emulated_objects_pass_the_schema(kube_api: Any, kube_cluster: KubeCluster) -> None:
    core, batch = core_api(kube_api), batch_api(kube_api)
    await batch.create_namespaced_job(NS, indexed_job("shape", 1))
    await kube_cluster.asettle()
    (pod,) = await job_pods(core, "shape")
    kube_cluster.succeed_pod(pod.metadata.name)
    await kube_cluster.asettle()
    objs = [
        kube_api.sanitize_for_serialization(o)
        for o in (
            await batch.read_namespaced_job("shape", NS),
            await core.read_namespaced_pod(pod.metadata.name, NS),
            await core.read_node("gpu-1"),
        )
    ]
    assert [o["status"].get("phase") for o in objs] == [None, "Succeeded", None]
    for o in objs:
        validate_manifest(o)
    with pytest.raises(ManifestError, match="Additional properties"):
        validate_manifest(
            {**indexed_job("typo"), "spec": {**indexed_job("typo")["spec"], "completion": 3}}
        )


async def test_bearer_token_never_logged(
    kube_cluster: KubeCluster, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api = await config.new_client_from_config(config_file=str(kubeconfig))
    async with api:
        core = core_api(api)
        await core.create_namespaced_secret(
            NS, {"metadata": {"name": "s"}, "stringData": {"k": "v"}}
        )
        kube_cluster.inject_errors(503, 1, retry_after=1)
        with pytest.raises(ApiException):
            await core.list_namespaced_secret(NS)
        await core.list_namespaced_secret(NS)
    bad = kubeconfig.parent / "bad-kubeconfig"
    bad.write_text(kubeconfig.read_text().replace(kube_cluster.token, "wrong-token"))
    api = await config.new_client_from_config(config_file=str(bad))
    async with api:
        with pytest.raises(ApiException) as e:
            await core_api(api).list_namespaced_secret(NS)
        assert e.value.status == 401
    kube_cluster.restart()
    harness = [r for r in caplog.records if r.name == "tests.kubecluster"]
    assert any("401" in r.getMessage() for r in harness)
    assert any("/secrets" in r.getMessage() for r in harness)
    assert kube_cluster.token not in caplog.text
    assert kube_cluster.token not in repr(kube_cluster.requests)
    assert len(kube_cluster.requests) >= 4


async def test_the_api_server_is_kmock_with_the_emulator_behind_it(
    kube_api: Any, kube_cluster: KubeCluster
) -> None:
    """kmock serves the HTTP: the emulator answers through its one catch-all reaction, and
    kmock's own request history sees the same requests the emulator records."""
    import kmock

    server = kube_cluster._server
    assert server is not None and isinstance(server.handler, kmock.RawHandler)
    before = len(list(server.handler))
    await core_api(kube_api).list_namespaced_config_map(NS)
    assert len(list(server.handler)) == before + 1
    assert kube_cluster.requests[-1].path.endswith("/configmaps")
