"""Outputs and logs of pods come back through the bucket: the Kubernetes driver with
``bucket``, the emulated cluster running each pod's real container program as a local process
(``ProcessKubelet``), and moto's S3 server on the loopback as the bucket.

The pods get no AWS credentials (their environment is PATH alone): they reach S3 only through
the presigned URLs the driver puts in the ConfigMap at submit. The layout is the AWS driver's:
``PREFIX/attempts/RUN/KEY/outputs/PATH`` (a directory ``d/`` as ``d.tar.gz``), ``.../stdout``,
``.../stderr`` and ``PREFIX/exit/RUN/KEY.json``. Nothing here is skipped: moto and aiobotocore
are in the test extra.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    ProviderState,
    Report,
    WatchSet,
)
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.spec.models import FailureClass, KubernetesProviderConfig
from tests.kubecluster import KubeCluster
from tests.kubecluster.kubelet import ProcessKubelet

pytestmark = [pytest.mark.integration]

S = ProviderState
BUCKET = "stowplan-k8s"
PREFIX = "lab/runs"


class Moto:
    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self.secret = secret
        self.env = {
            "AWS_ACCESS_KEY_ID": "AKIAK8STESTS",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]

        return boto3.Session(
            aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        ).client("s3", endpoint_url=self.url)

    def objects(self) -> dict[str, bytes]:
        s3 = self.client()
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for o in page.get("Contents") or []:
                out[o["Key"]] = s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        return out


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    """moto's S3 on the loopback with a bucket; this process's SDK reaches it through
    ``AWS_ENDPOINT_URL`` and signs with a secret key the test can look for."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto's backends live in this process, shared by every server it starts: start clean
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).close()
    m = Moto(url, "moto-secret-" + secrets.token_urlsafe(16))
    for k, v in m.env.items():
        monkeypatch.setenv(k, v)
    m.client().create_bucket(Bucket=BUCKET)
    try:
        yield m
    finally:
        server.stop()


@pytest.fixture
def kubelet(kube_cluster: KubeCluster, tmp_path: Path) -> Iterator[ProcessKubelet]:
    # NOTE: a pod's environment is the image's (PATH), never the control plane's credentials
    k = ProcessKubelet(kube_cluster, tmp_path / "kubelet", base_env={"PATH": os.environ["PATH"]})
    kube_cluster.set_pod_behaviour(k)
    try:
        yield k
    finally:
        kube_cluster.set_pod_behaviour(None)
        k.close()


def config(kubeconfig: Path, bucket: str = f"s3://{BUCKET}/{PREFIX}") -> KubernetesProviderConfig:
    return KubernetesProviderConfig(
        kubeconfig=str(kubeconfig), image="python:3.12-slim", bucket=bucket
    )


@pytest.fixture
async def driver(
    kubeconfig: Path, tmp_path: Path, moto: Moto, kubelet: ProcessKubelet
) -> AsyncIterator[KubernetesProvider]:
    async with KubernetesProvider("k8s", config(kubeconfig), state_dir=tmp_path) as d:
        yield d


TRAIN = (
    "import json, os, sys; i = int(sys.argv[1]); os.makedirs('ckpt/epoch1'); "
    "open('ckpt/epoch1/w.bin', 'wb').write(bytes([i]) * 100); "
    "json.dump({'trial': i, 'acc': i / 10}, open('metrics.json', 'w')); "
    "print('trial', i, 'done'); print('warning from', i, file=sys.stderr)"
)


def launch(
    i: int, code: str = TRAIN, outputs: tuple[str, ...] = ("metrics.json", "ckpt/")
) -> LaunchSpec:
    return LaunchSpec(
        key=f"k{i}-train",
        run_id=f"run{i}",
        attempt=0,
        pool="k8s/cpu",
        name="train",
        argv=[sys.executable, "-c", code, str(i)],
        cpus=1,
        memory=256 << 20,
        timeout_s=300,
        outputs=list(outputs),
    )


async def run_all(
    driver: KubernetesProvider, specs: list[LaunchSpec]
) -> tuple[KubernetesRequest, dict[str, Report]]:
    pools = await driver.discover()
    (req,) = driver.plan(specs, Facts.of(pools))
    assert isinstance(req, KubernetesRequest)
    await driver.submit([req])
    return req, await until_terminal(driver, list(req.keys))


async def until_terminal(driver: KubernetesProvider, keys: list[str]) -> dict[str, Report]:
    seen: dict[str, Report] = {}
    it = aiter(driver.watch(WatchSet(keys), renew_every=3600))
    try:
        async with asyncio.timeout(60):
            while not all(k in seen and seen[k].state in TERMINAL_PROVIDER_STATES for k in keys):
                for r in await anext(it):
                    seen[r.key] = r
    finally:
        await it.aclose()  # type: ignore[attr-defined]
    return seen


@pytest.mark.anyio
async def test_sweep_outputs_and_logs_reach_the_bucket(
    driver: KubernetesProvider,
    kube_cluster: KubeCluster,
    kubelet: ProcessKubelet,
    moto: Moto,
    kube_api: Any,
    tmp_path: Path,
) -> None:
    req, done = await run_all(driver, [launch(i) for i in range(3)])
    assert len(kubelet.ran) == 3  # each index's container really ran, once
    objects = moto.objects()
    for i in range(3):
        key, here = f"k{i}-train", f"{PREFIX}/attempts/run{i}/k{i}-train"
        r = done[key]
        assert r.state is S.SUCCEEDED, r
        assert r.outputs == {
            "metrics.json": f"s3://{BUCKET}/{here}/outputs/metrics.json",
            "ckpt/": f"s3://{BUCKET}/{here}/outputs/ckpt.tar.gz",
        }
        assert json.loads(objects[f"{here}/outputs/metrics.json"]) == {"trial": i, "acc": i / 10}
        with tarfile.open(fileobj=io.BytesIO(objects[f"{here}/outputs/ckpt.tar.gz"])) as tar:
            member = tar.extractfile("ckpt/epoch1/w.bin")
            assert member is not None and member.read() == bytes([i]) * 100
        assert objects[f"{here}/stdout"] == f"trial {i} done\n".encode()
        assert objects[f"{here}/stderr"] == f"warning from {i}\n".encode()
        record = json.loads(objects[f"{PREFIX}/exit/run{i}/k{i}-train.json"])
        assert (record["key"], record["exit_code"], record["reason"]) == (key, 0, "exit")
    # the container log is still the pod's log (merged streams)
    log = b"".join([c async for c in driver.logs("k1-train")])
    assert b"trial 1 done" in log and b"warning from 1" in log

    # the cluster holds URLs, never the key that signs them; the plan's request holds none
    cm = kube_cluster.get("configmaps", req.name)
    assert cm is not None
    entry = json.loads(cm["data"]["0.json"])
    assert entry["urls"]["output_0"].startswith(f"{moto.url}/{BUCKET}/{PREFIX}/attempts/")
    assert "X-Amz-Signature=" in entry["urls"]["output_0"]
    stored = json.dumps(kube_cluster.objects("configmaps")) + json.dumps(
        kube_cluster.objects("jobs", group="batch")
    )
    assert moto.secret not in stored
    assert "<presigned at submit" in req.render() and "X-Amz-Signature" not in req.render()

    # a restarted driver knows where the outputs went (from the ConfigMap) ...
    async with KubernetesProvider("k8s", driver.config, state_dir=tmp_path) as again:
        (r,) = await again.describe(["k2-train"])
        assert r.state is S.SUCCEEDED and r.outputs == done["k2-train"].outputs
    # ... and once the pod is gone, logs come from the bucket, one per stream
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_api)
    for p in kube_cluster.job_pods(req.name):
        await core.delete_namespaced_pod(p["metadata"]["name"], "default")
    await kube_cluster.asettle()
    assert kube_cluster.job_pods(req.name) == []
    assert b"".join([c async for c in driver.logs("k0-train")]) == b"trial 0 done\n"
    got = b"".join([c async for c in driver.logs("k0-train", stream="stderr")])
    assert got == b"warning from 0\n"


@pytest.mark.anyio
async def test_a_missing_output_is_the_users_error_with_its_logs_uploaded(
    driver: KubernetesProvider, moto: Moto
) -> None:
    _, done = await run_all(driver, [launch(0, code="print('forgot it')", outputs=("m.json",))])
    r = done["k0-train"]
    assert (r.state, r.failure, r.exit_code) == (S.FAILED, FailureClass.USER_ERROR, 1), r
    assert "m.json" in r.message and r.outputs == {}
    objects = moto.objects()
    here = f"{PREFIX}/attempts/run0/k0-train"
    assert f"{here}/outputs/m.json" not in objects
    assert objects[f"{here}/stdout"] == b"forgot it\n"
    assert b"declared output m.json is missing" in objects[f"{here}/stderr"]


@pytest.mark.anyio
async def test_an_output_the_bucket_refuses_is_an_infrastructure_failure(
    kubeconfig: Path, tmp_path: Path, moto: Moto, kubelet: ProcessKubelet
) -> None:
    # presigning needs no bucket; the PUT to one that does not exist is refused (404)
    cfg = config(kubeconfig, bucket="s3://no-such-bucket-here")
    async with KubernetesProvider("k8s", cfg, state_dir=tmp_path) as d:
        _, done = await run_all(d, [launch(0)])
    r = done["k0-train"]
    assert (r.state, r.failure, r.exit_code) == (S.FAILED, FailureClass.NODE_FAILURE, 70)
    assert "uploading outputs" in r.message


@pytest.mark.anyio
async def test_without_a_bucket_outputs_are_checked_not_returned(
    kubeconfig: Path, tmp_path: Path, moto: Moto, kubelet: ProcessKubelet
) -> None:
    cfg = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image="python:3.12-slim")
    async with KubernetesProvider("k8s", cfg, state_dir=tmp_path) as d:
        assert any("outputs are not returned" in n for n in d.capabilities.notes)
        _, done = await run_all(d, [launch(0)])
    assert done["k0-train"].state is S.SUCCEEDED and done["k0-train"].outputs == {}
    assert moto.objects() == {}


# -- end to end: `stowplan run --provider k8s` ----------------------------------------------------

SWEEP = """
[experiment]
name = "k8s-outputs"

[[tasks]]
name = "train"
command = [
  "{python}", "-c",
  '''
import os, sys
c = sys.argv[1]
open('metrics.json', 'w').write('C=' + c)
os.mkdir('ckpt')
open('ckpt/w.bin', 'w').write(c * 3)
''',
  "{{C}}",
]
outputs = ["metrics.json", "ckpt/"]
resources = {{ cpus = 1, memory = "256MiB" }}
timeout = "5m"

[tasks.sweep]
method = "grid"
parameters = {{ C = [0.1, 1, 10] }}
"""


def test_stowplan_run_stores_the_outputs(
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    tmp_path: Path,
    moto: Moto,
    kubelet: ProcessKubelet,
) -> None:
    from stowplan.provenance.store import RunStore

    from .conftest import write_project

    f = write_project(tmp_path, kubeconfig, SWEEP.format(python=sys.executable))
    toml = tmp_path / "stowplan.toml"
    toml.write_text(toml.read_text() + f'bucket = "s3://{BUCKET}/{PREFIX}"\n')
    # its own process: its own Ray, whose workers see this environment (moto's endpoint and
    # the signing key; the pods see neither)
    with (tmp_path / "run.log").open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "stowplan.cli.main", "run", str(f), "--provider", "k8s"],
            cwd=tmp_path,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    log = (tmp_path / "run.log").read_text()
    assert done.returncode == 0, log[-3000:]
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        assert {r.state for r in runs} == {"SUCCEEDED"} and len(runs) == 3
        artifacts = store.artifacts_for([r.run_id for r in runs])
    for r in runs:
        c = str(r.params["C"])
        arts = {a.name: a for a in artifacts.get(r.run_id, [])}
        assert sorted(arts) == ["ckpt/w.bin", "metrics.json"], arts
        want = {"metrics.json": f"C={c}".encode(), "ckpt/w.bin": c.encode() * 3}
        for name, content in want.items():
            assert arts[name].sha256 == hashlib.sha256(content).hexdigest(), (name, c)
    objects = moto.objects()
    assert sum(k.endswith("/outputs/metrics.json") for k in objects) == 3
    assert sum(k.endswith("/outputs/ckpt.tar.gz") for k in objects) == 3
    # neither the signing key nor a presigned URL (a capability) in any store row or log
    leaks = [
        p
        for p in (tmp_path / ".stowplan").rglob("*")
        if p.is_file() and any(w in p.read_bytes() for w in (moto.secret.encode(), b"X-Amz-"))
    ]
    assert not leaks and moto.secret not in log and "X-Amz-" not in log
