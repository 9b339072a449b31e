"""Indexed Job rendering: golden manifests, each validated against the Kubernetes OpenAPI
schemas (strict, two minor versions), grouping, names and labels, and the container wrapper."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.base import Facts, LaunchSpec, SecretRef, request_name
from stowplan.providers.kubernetes import KubernetesProvider, KubernetesRequest
from stowplan.providers.kubernetes.render import (
    KEYS_ANNOTATION,
    WRAPPER,
    cpu_quantity,
    label_value,
    memory_quantity,
)
from stowplan.spec.models import KubernetesProviderConfig
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
    params = tmp_path / "params"
    params.mkdir()
    for name, text in req.config_map["data"].items():
        (params / name).write_text(text)
    program = (
        WRAPPER.replace("/stowplan/params", str(params))
        .replace("/stowplan/work", str(tmp_path / "work"))
        .replace("/dev/termination-log", str(tmp_path / "termination-log"))
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "JOB_COMPLETION_INDEX": "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[\"it's $HOME\", 'a b'] 0 k0000-trial\n"
    assert (tmp_path / "work" / "r1" / "0" / "cfg" / "x.txt").read_bytes() == b"hi"
    record = json.loads((tmp_path / "termination-log").read_text())
    assert record == {"stowplan": 1, "key": "k0000-trial", "exit_code": 0, "missing": []}
