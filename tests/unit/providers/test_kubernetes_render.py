"""Indexed Job rendering: golden manifests, each validated against the Kubernetes OpenAPI
schemas (strict, two minor versions), grouping, names and labels, and the container wrapper."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.errors import ProviderError
from stowplan.placement.leases import MILLI, DeviceLease, NodeDevices, PoolDevices
from stowplan.placement.problem import Pool
from stowplan.providers.base import Facts, LaunchSpec, ProviderState, SecretRef, request_name
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.providers.kubernetes.render import (
    DEVICES_ANNOTATION,
    KEYS_ANNOTATION,
    cpu_quantity,
    label_value,
    memory_quantity,
    pin_to_node,
)
from stowplan.spec.models import FailureClass, KubernetesProviderConfig
from tests.kubecluster import KUBERNETES_VERSIONS, validate_manifest

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "kubernetes" / "golden"
POOLS = (
    Pool(
        id="k8s/cpu",
        provider="k8s",
        kind="kubernetes",
        cpus=16,
        memory=64 << 30,
        hardware_class="kubernetes:cloud.google.com/gke-nodepool=cpu",
    ),
    Pool(
        id="k8s/a100",
        provider="k8s",
        kind="kubernetes",
        cpus=12,
        memory=85 << 30,
        gpus={"a100": 1},
        hardware_class="kubernetes:cloud.google.com/gke-nodepool=a100",
    ),
)
FACTS = Facts.of(POOLS)


def launch(i: int, **kw: Any) -> LaunchSpec:
    base: dict[str, Any] = {
        "key": f"k{i:04d}-trial",
        "run_id": "r1",
        "attempt": 0,
        "pool": "k8s/cpu",
        "name": "train",
        "argv": ["python", "train.py", f"--lr=0.{i}", "it's $HOME"],
        "env": {"SEED": str(i)},
        "cpus": 2,
        "memory": 4 << 30,
        "outputs": ["metrics.json"],
    }
    base.update(kw)
    return LaunchSpec(**base)


def driver(tmp_path: Path, **cfg: Any) -> KubernetesProvider:
    config = KubernetesProviderConfig(image="ghcr.io/lab/train:1.2", **cfg)
    return KubernetesProvider("k8s", config, state_dir=tmp_path)


def plan(tmp_path: Path, launches: list[LaunchSpec], **cfg: Any) -> list[KubernetesRequest]:
    reqs = driver(tmp_path, **cfg).plan(launches, FACTS)
    assert all(isinstance(r, KubernetesRequest) for r in reqs)
    out = [r for r in reqs if isinstance(r, KubernetesRequest)]
    for r in out:
        validate_manifest(r.job)
        validate_manifest(r.config_map)
    return out


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("STOWPLAN_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing; STOWPLAN_UPDATE_GOLDEN=1 writes it (review it!)"
    assert text == path.read_text()


def test_validated_against_two_versions() -> None:
    assert len(KUBERNETES_VERSIONS) >= 2


def test_sweep_is_one_indexed_job_golden(tmp_path: Path) -> None:
    launches = [launch(i) for i in range(3)]
    (req,) = plan(tmp_path, launches)
    check_golden("sweep_cpu.json", req.render())
    assert req.keys == tuple(sorted(x.key for x in launches))
    assert req.name == request_name(req.keys) == req.job["metadata"]["name"]
    spec = req.job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["backoffLimitPerIndex"] == 0 and spec["suspend"] is False
    actions = [r["action"] for r in spec["podFailurePolicy"]["rules"]]
    assert actions == ["FailIndex", "FailIndex"]
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "cpu"}
    assert pod["restartPolicy"] == "Never"
    res = pod["containers"][0]["resources"]
    assert res["requests"] == res["limits"] == {"cpu": "2", "memory": "4096Mi"}
    data = req.config_map["data"]
    assert [json.loads(data[f"{i}.json"])["key"] for i in range(3)] == list(req.keys)
    assert json.loads(req.job["metadata"]["annotations"][KEYS_ANNOTATION]) == list(req.keys)


def test_gpu_kueue_secrets_timeout_golden(tmp_path: Path) -> None:
    launches = [
        launch(
            i,
            pool="k8s/a100",
            gpus=1,
            gpu_types=("a100",),
            timeout_s=3600,
            secrets={"WANDB_API_KEY": SecretRef(name="wandb", key="api-key")},
        )
        for i in range(2)
    ]
    (req,) = plan(
        tmp_path,
        launches,
        kueue_queue="team-a",
        priority_class="batch-low",
        service_account="trainer",
        image_pull_secrets=["ghcr"],
        ttl_after_finished=86400.0,
        max_parallelism=1,
    )
    check_golden("gpu_kueue.json", req.render())
    job = req.job
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True and job["spec"]["parallelism"] == 1
    pod = job["spec"]["template"]["spec"]
    assert pod["activeDeadlineSeconds"] == 3600
    assert job["spec"]["activeDeadlineSeconds"] == 2 * 3600 + 60
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["containers"][0]["env"] == [
        {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
        }
    ]
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert "WANDB_API_KEY" not in json.dumps(req.config_map)


def test_groups_by_shape_and_every_key_once(tmp_path: Path) -> None:
    launches = (
        [launch(i) for i in range(5)]
        + [launch(10 + i, cpus=4) for i in range(3)]
        + [launch(20, pool="k8s/a100", gpus=1)]
    )
    reqs = plan(tmp_path, launches)
    assert len(reqs) == 3
    keys = [k for r in reqs for k in r.keys]
    assert sorted(keys) == sorted(x.key for x in launches)
    shuffled = list(launches)
    random.Random(7).shuffle(shuffled)
    assert [r.render() for r in plan(tmp_path, shuffled)] == [r.render() for r in reqs]


def test_large_sweeps_are_chunked(tmp_path: Path) -> None:
    reqs = driver(tmp_path).plan([launch(i) for i in range(2001)], FACTS)
    assert [len(r.keys) for r in reqs] == [1000, 1000, 1]


def test_label_values_fit_and_long_provider_names_hash() -> None:
    long = "a" * 100
    v = label_value(long)
    assert len(v) <= 63 and v != label_value("a" * 101)
    assert label_value("k8s") == "k8s"


def test_single_attempt_job_carries_its_key_label(tmp_path: Path) -> None:
    (req,) = plan(tmp_path, [launch(1)])
    assert req.job["metadata"]["labels"]["stowplan.io/key"] == "k0001-trial"
    for labels in (
        req.job["metadata"]["labels"],
        req.job["spec"]["template"]["metadata"]["labels"],
    ):
        assert all(len(v) <= 63 for v in labels.values())


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"argv": ["a\0b"]}, "NUL"),
        ({"pool": "k8s/nope"}, "not a node pool"),
        ({"image": "bad image"}, "not an image reference"),
        ({"outputs": ["../x"]}, "relative path"),
        ({"secrets": {"TOKEN": SecretRef(name="Bad_Name")}}, "Secret name"),
    ],
)
def test_refusals_name_the_attempt(tmp_path: Path, kw: dict[str, Any], words: str) -> None:
    with pytest.raises(ProviderError) as e:
        driver(tmp_path).plan([launch(1, **kw)], FACTS)
    assert not e.value.retryable and words in str(e.value) and "k0001-trial" in str(e.value)


def test_no_image_anywhere_is_refused(tmp_path: Path) -> None:
    bare = KubernetesProvider("k8s", KubernetesProviderConfig(), state_dir=tmp_path)
    with pytest.raises(ProviderError, match="no container image"):
        bare.plan([launch(1)], FACTS)


def test_quantities() -> None:
    assert [cpu_quantity(c) for c in (1, 1.5, 0.1, 2.0001)] == ["1", "1500m", "100m", "2001m"]
    assert memory_quantity(1 << 30) == "1024Mi" and memory_quantity(1000) == "1000"


def test_wrapper_runs_exactly_the_argv_and_env(tmp_path: Path) -> None:
    """The container program, run here with its two directories moved into tmp_path."""
    (req,) = plan(
        tmp_path,
        [
            launch(
                0,
                argv=[
                    sys.executable,
                    "-c",
                    "import os,sys; print(repr(sys.argv[1:]), "
                    "os.environ['SEED'], os.environ['STOWPLAN_KEY']); open('metrics.json','w')",
                    "it's $HOME",
                    "a b",
                ],
                files={"cfg/x.txt": b"hi"},
            )
        ],
    )
    done, record = run_wrapper(tmp_path, req)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[\"it's $HOME\", 'a b'] 0 k0000-trial\n"
    assert (tmp_path / "work" / "r1" / "0" / "cfg" / "x.txt").read_bytes() == b"hi"
    assert record.pop("started_at") <= record.pop("ended_at")
    assert record == {
        "stowplan": 1,
        "key": "k0000-trial",
        "exit_code": 0,
        "reason": "exit",
        "missing": [],
    }


def run_wrapper(
    tmp_path: Path, req: KubernetesRequest, config_map: dict[str, Any] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The container's command as rendered, its volume paths moved into tmp_path."""
    params = tmp_path / "params"
    params.mkdir(exist_ok=True)
    for name, text in (config_map or req.config_map)["data"].items():
        (params / name).write_text(text)
    command = req.job["spec"]["template"]["spec"]["containers"][0]["command"]
    moved = {
        "python3": sys.executable,
        "/stowplan/params": str(params),
        "/stowplan/work": str(tmp_path / "work"),
        "/dev/termination-log": str(tmp_path / "termination-log"),
    }
    assert command[3:] == ["/stowplan/params", "/stowplan/work", "/dev/termination-log"]
    done = subprocess.run(
        [moved.get(a, a) for a in command],
        env={**os.environ, "JOB_COMPLETION_INDEX": "0"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done, json.loads((tmp_path / "termination-log").read_text())


# -- outputs and logs through a bucket -----------------------------------------------------------

BUCKET = "s3://lab-results/stowplan/k8s"


def test_bucket_entries_name_their_objects_golden(tmp_path: Path) -> None:
    launches = [launch(i, outputs=["metrics.json", "ckpt/"], timeout_s=600) for i in range(2)]
    (req,) = plan(tmp_path, launches, bucket=BUCKET)
    check_golden("sweep_bucket.json", req.render())
    here = "stowplan/k8s/attempts/r1/k0000-trial"
    assert req.bucket == "lab-results"
    assert req.slots["k0000-trial"] == {
        "stdout": f"{here}/stdout",
        "stderr": f"{here}/stderr",
        "exit": "stowplan/k8s/exit/r1/k0000-trial.json",
        "output_0": f"{here}/outputs/metrics.json",
        "output_1": f"{here}/outputs/ckpt.tar.gz",
    }
    assert req.outputs["k0000-trial"] == {
        "metrics.json": f"{here}/outputs/metrics.json",
        "ckpt/": f"{here}/outputs/ckpt.tar.gz",
    }
    entry = json.loads(req.config_map["data"]["0.json"])
    assert entry["urls"]["output_1"] == (
        f"<presigned at submit: PUT s3://lab-results/{here}/outputs/ckpt.tar.gz>"
    )
    # the Job's deadline (one wave of 600 s, plus 60) plus the margin
    assert req.lease_s == 600 + 60 + 3600
    filled = req.with_urls(
        {
            k: {slot: f"https://s3.example/{slot}?sig={k}" for slot in v}
            for k, v in req.slots.items()
        }
    )
    validate_manifest(filled)
    got = json.loads(filled["data"]["1.json"])
    assert got["urls"]["stdout"] == "https://s3.example/stdout?sig=k0001-trial"
    assert req.config_map["data"] != filled["data"]  # the plan's request is left as it was


def test_without_bucket_entries_carry_no_urls(tmp_path: Path) -> None:
    (req,) = plan(tmp_path, [launch(0)])
    assert "urls" not in json.loads(req.config_map["data"]["0.json"])
    assert req.slots == {} and req.outputs == {} and req.bucket == ""


def test_presigned_urls_fit_the_configmap(tmp_path: Path) -> None:
    """Each placeholder becomes a URL of up to URL_BYTES at submit: packing counts it."""
    from stowplan.providers.kubernetes.render import MAX_CONFIGMAP_BYTES, URL_BYTES

    launches = [launch(i, outputs=["a", "b/"]) for i in range(400)]
    reqs = plan(tmp_path, launches, bucket=BUCKET)
    assert len(reqs) > 1
    for r in reqs:
        filled = r.with_urls({k: {slot: "u" * URL_BYTES for slot in v} for k, v in r.slots.items()})
        assert sum(len(t) for t in filled["data"].values()) <= MAX_CONFIGMAP_BYTES


class _Puts(ThreadingHTTPServer):
    """A stand-in for S3's presigned PUTs: path -> body; paths under /deny/ answer 403."""

    def __init__(self) -> None:
        self.got: dict[str, bytes] = {}
        self.puts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                n = int(self.headers["Content-Length"])
                body = self.rfile.read(n)
                path = self.path.split("?", 1)[0]
                outer.puts.append(path)
                if path.startswith("/deny/"):
                    self.send_response(403)
                else:
                    outer.got[path] = body
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                body = json.dumps(outer.puts).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def __enter__(self) -> _Puts:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def _urls(req: KubernetesRequest, base: str, deny: str = "") -> dict[str, Any]:
    return req.with_urls(
        {
            k: {
                slot: f"{base}/{'deny/' if slot == deny else ''}{obj}?X-Amz-Signature=x"
                for slot, obj in v.items()
            }
            for k, v in req.slots.items()
        }
    )


def _program(body: str) -> list[str]:
    return [sys.executable, "-c", body]


def test_wrapper_uploads_outputs_logs_and_exit_record(tmp_path: Path) -> None:
    script = (
        "import os, sys; os.makedirs('ckpt/sub'); open('ckpt/sub/w.bin','wb').write(b'W'); "
        "open('metrics.json','w').write('{\"acc\": 1}'); print('out line'); "
        "print('err line', file=sys.stderr)"
    )
    (req,) = plan(
        tmp_path,
        [launch(0, argv=_program(script), outputs=["metrics.json", "ckpt/"])],
        bucket=BUCKET,
    )
    with _Puts() as s3:
        done, record = run_wrapper(tmp_path, req, _urls(req, f"http://127.0.0.1:{s3.server_port}"))
    assert done.returncode == 0, done.stderr
    assert "out line" in done.stdout and "err line" in done.stderr  # the container log
    assert (record["exit_code"], record["reason"], record["missing"]) == (0, "exit", [])
    here = "/stowplan/k8s/attempts/r1/k0000-trial"
    assert s3.got[f"{here}/outputs/metrics.json"] == b'{"acc": 1}'
    assert s3.got[f"{here}/stdout"] == b"out line\n"
    assert s3.got[f"{here}/stderr"] == b"err line\n"
    assert json.loads(s3.got["/stowplan/k8s/exit/r1/k0000-trial.json"])["exit_code"] == 0
    with tarfile.open(fileobj=io.BytesIO(s3.got[f"{here}/outputs/ckpt.tar.gz"])) as tar:
        assert sorted(tar.getnames()) == ["ckpt", "ckpt/sub", "ckpt/sub/w.bin"]
        member = tar.extractfile("ckpt/sub/w.bin")
        assert member is not None and member.read() == b"W"


def test_wrapper_missing_output_fails_and_uploads_logs(tmp_path: Path) -> None:
    (req,) = plan(
        tmp_path,
        [launch(0, argv=_program("print('ran')"), outputs=["metrics.json"])],
        bucket=BUCKET,
    )
    with _Puts() as s3:
        done, record = run_wrapper(tmp_path, req, _urls(req, f"http://127.0.0.1:{s3.server_port}"))
    assert done.returncode == 1
    assert (record["reason"], record["missing"]) == ("outputs", ["metrics.json"])
    here = "/stowplan/k8s/attempts/r1/k0000-trial"
    assert f"{here}/outputs/metrics.json" not in s3.got
    assert b"declared output metrics.json is missing" in s3.got[f"{here}/stderr"]


def test_wrapper_refused_upload_is_a_setup_failure(tmp_path: Path) -> None:
    (req,) = plan(
        tmp_path,
        [launch(0, argv=_program("open('m','w').write('x')"), outputs=["m"])],
        bucket=BUCKET,
    )
    with _Puts() as s3:
        done, record = run_wrapper(
            tmp_path, req, _urls(req, f"http://127.0.0.1:{s3.server_port}", deny="output_0")
        )
    assert (done.returncode, record["exit_code"], record["reason"]) == (70, 70, "setup")
    assert "cannot upload output_0: HTTP Error 403" in done.stderr
    assert "X-Amz-Signature" not in done.stderr + done.stdout  # a URL is never printed


def test_wrapper_output_outside_the_attempt_is_refused(tmp_path: Path) -> None:
    (req,) = plan(
        tmp_path,
        [launch(0, argv=_program("import os; os.symlink('/etc/hostname', 'm')"), outputs=["m"])],
        bucket=BUCKET,
    )
    with _Puts() as s3:
        done, record = run_wrapper(tmp_path, req, _urls(req, f"http://127.0.0.1:{s3.server_port}"))
    assert (done.returncode, record["reason"]) == (1, "outputs")
    assert "leads outside the attempt directory" in done.stderr
    assert not [p for p in s3.got if "/outputs/" in p]


def test_wrapper_uploads_logs_while_the_command_runs(tmp_path: Path) -> None:
    """The logs are PUT every ``log_every`` seconds while the command runs, not only at the
    end: the command waits until the bucket has its first line."""
    with _Puts() as s3:
        stdout = "/stowplan/k8s/attempts/r1/k0000-trial/stdout"
        code = (
            "import sys, time, urllib.request; print('first', flush=True); t = time.time()\n"
            f"while {stdout!r} not in urllib.request.urlopen(sys.argv[1]).read().decode():\n"
            "    assert time.time() - t < 20; time.sleep(0.05)\n"
            "print('second')"
        )
        # the command asks the stand-in what it got (a GET of its list of PUT paths)
        argv = [*_program(code), f"http://127.0.0.1:{s3.server_port}/puts"]
        (req,) = plan(tmp_path, [launch(0, argv=argv, outputs=[])], bucket=BUCKET)
        cm = _urls(req, f"http://127.0.0.1:{s3.server_port}")
        entry = json.loads(cm["data"]["0.json"])
        entry["log_every"] = 0.1
        cm["data"]["0.json"] = json.dumps(entry)
        done, _ = run_wrapper(tmp_path, req, cm)
    assert done.returncode == 0, done.stderr
    assert s3.puts.count(stdout) >= 2  # at least one while it ran, and the last
    assert s3.got[stdout] == b"first\nsecond\n"


def test_a_job_event_that_outruns_its_pods_is_not_a_preemption(tmp_path: Path) -> None:
    """The Job and pod watches are two streams: the Job's failedIndexes can arrive before the
    pod's own Failed status. A live pod then means "ending", not "deleted under us"."""
    d = driver(tmp_path)
    d._remember("sp-x", ["k0"])
    job = {"metadata": {"name": "sp-x"}, "status": {"failedIndexes": "0", "failed": 1}}
    labels = {
        "batch.kubernetes.io/job-name": "sp-x",
        "batch.kubernetes.io/job-completion-index": "0",
    }
    running = {
        "metadata": {
            "name": "sp-x-0-abc",
            "labels": labels,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "main", "state": {"running": {}}}],
        },
    }
    (r,) = d._reports(["k0"], {"sp-x": job}, [running])
    assert r.state is ProviderState.RUNNING and "ending" in r.message
    failed = {
        **running,
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "main", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}
            ],
        },
    }
    (r,) = d._reports(["k0"], {"sp-x": job}, [failed])
    assert (r.state, r.failure, r.exit_code) == (ProviderState.FAILED, FailureClass.USER_ERROR, 1)
    # no pod (it was deleted): the index failed with it
    again = driver(tmp_path)
    again._remember("sp-x", ["k0"])
    (r,) = again._reports(["k0"], {"sp-x": job}, [])
    assert (r.state, r.failure) == (ProviderState.FAILED, FailureClass.PREEMPTED)


# -- device leases (issue 17: the lease is the placement) ------------------------------------

PIN = "requiredDuringSchedulingIgnoredDuringExecution"


def node_terms(req: KubernetesRequest) -> list[dict[str, Any]]:
    pod = req.job["spec"]["template"]["spec"]
    terms: list[dict[str, Any]] = pod["affinity"]["nodeAffinity"][PIN]["nodeSelectorTerms"]
    return terms


def test_a_lease_pins_the_pod_to_its_node_and_requests_its_gpus(tmp_path: Path) -> None:
    leased = launch(1, pool="k8s/a100", gpus=2, lease=DeviceLease("gpu-a", (0, 1)))
    (req,) = plan(tmp_path, [leased])
    assert node_terms(req) == [
        {
            "matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-a"]}
            ]
        }
    ]
    pod = req.job["spec"]["template"]["spec"]
    assert "nodeName" not in pod  # the scheduler and the device plugin still admit it
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "a100"}
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "2"
    annotations = req.job["spec"]["template"]["metadata"]["annotations"]
    assert json.loads(annotations[DEVICES_ANNOTATION]) == {"node": "gpu-a", "devices": [[0, 1]]}


def test_launches_are_grouped_by_their_leases_node(tmp_path: Path) -> None:
    launches = [
        launch(1, pool="k8s/a100", gpus=1, lease=DeviceLease("gpu-b", (1,))),
        launch(2, pool="k8s/a100", gpus=1, lease=DeviceLease("gpu-a", (0,))),
        launch(3, pool="k8s/a100", gpus=1, lease=DeviceLease("gpu-b", (0,))),
    ]
    reqs = plan(tmp_path, launches)
    got = {
        node_terms(r)[0]["matchExpressions"][0]["values"][0]: (
            r.keys,
            json.loads(r.job["spec"]["template"]["metadata"]["annotations"][DEVICES_ANNOTATION]),
        )
        for r in reqs
    }
    assert got == {
        "gpu-a": (("k0002-trial",), {"node": "gpu-a", "devices": [[0]]}),
        "gpu-b": (("k0001-trial", "k0003-trial"), {"node": "gpu-b", "devices": [[1], [0]]}),
    }


def test_a_cpu_only_lease_pins_without_a_gpu(tmp_path: Path) -> None:
    (req,) = plan(tmp_path, [launch(1, pool="k8s/a100", lease=DeviceLease("gpu-a"))])
    assert node_terms(req)[0]["matchExpressions"][0]["values"] == ["gpu-a"]
    resources = req.job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"]
    assert "nvidia.com/gpu" not in resources["limits"]


def test_a_lease_without_a_node_pins_nothing(tmp_path: Path) -> None:
    (req,) = plan(tmp_path, [launch(1, lease=DeviceLease(""))])
    (plain,) = plan(tmp_path, [launch(1)])
    assert req.render() == plain.render()


def test_a_lease_that_contradicts_the_launch_is_refused(tmp_path: Path) -> None:
    for lease, words in (
        (DeviceLease("gpu-a", (0,)), "asks for 2 GPUs but its lease holds devices [0]"),
        (DeviceLease("bad node!", (0, 1)), "not a label value"),
    ):
        with pytest.raises(ProviderError) as e:
            driver(tmp_path).plan([launch(1, pool="k8s/a100", gpus=2, lease=lease)], FACTS)
        assert not e.value.retryable and words in str(e.value), e.value


def test_pinning_adds_the_node_to_every_existing_term() -> None:
    spec: dict[str, Any] = {
        "affinity": {
            "nodeAffinity": {
                PIN: {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                        {"matchFields": [{"key": "x", "operator": "In", "values": ["y"]}]},
                    ]
                }
            }
        }
    }
    pin_to_node(spec, "n1")
    host = {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}
    terms = spec["affinity"]["nodeAffinity"][PIN]["nodeSelectorTerms"]
    assert [t["matchExpressions"][-1] for t in terms] == [host, host]
    assert terms[0]["matchExpressions"][0]["key"] == "zone" and "matchFields" in terms[1]


def test_a_time_sliced_pool_is_asked_for_replicas(tmp_path: Path) -> None:
    """Nodes that time-slice each GPU into 4 replicas: a share asks for its whole replicas,
    rounded up, and a whole GPU for all four of one; a pool without slices as before."""
    row = NodeDevices(name="gpu-a", model="t4", devices=(MILLI, MILLI))
    sliced = msgspec.structs.replace(
        POOLS[1], id="k8s/t4", devices=PoolDevices(nodes=(row,), sharing=True, slices=4)
    )
    facts = Facts.of([*POOLS, sliced])
    cases = [(1, 250, "1"), (1, 300, "2"), (1, 500, "2"), (1, 999, "4"), (1, MILLI, "4")]
    cases += [(2, MILLI, "8")]
    for gpus, milli, replicas in cases:
        devices = (0,) if gpus == 1 else (0, 1)
        leased = launch(
            1, pool="k8s/t4", gpus=gpus, gpu_milli=milli, lease=DeviceLease("gpu-a", devices)
        )
        (req,) = driver(tmp_path).plan([leased], facts)
        assert isinstance(req, KubernetesRequest)
        validate_manifest(req.job)
        resources = req.job["spec"]["template"]["spec"]["containers"][0]["resources"]
        asked = (resources["requests"]["nvidia.com/gpu"], resources["limits"]["nvidia.com/gpu"])
        assert asked == (replicas, replicas), (gpus, milli)
    # the same share on a pool that does not slice: one whole GPU
    share = launch(1, pool="k8s/a100", gpus=1, gpu_milli=250, lease=DeviceLease("gpu-a", (0,)))
    (req,) = plan(tmp_path, [share])
    resources = req.job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "1"
