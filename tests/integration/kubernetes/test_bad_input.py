"""Bad Kubernetes input through the real CLI, against the emulated cluster: an unknown kubeconfig
context, an image name with spaces, a ``node_pool_label`` no node carries, a GPU model no pool
has. Each is refused with exit code 2 and one paragraph on stderr that names the file, the field
path and a fix; nothing is written: no run store, no object created on the cluster.

``run`` and ``plan`` both go through the same checks; both are tried.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stowplan.cli.main import main
from tests.kubecluster import KubeCluster

from .conftest import write_project

pytestmark = pytest.mark.integration

SWEEP = """
[experiment]
name = "k8s-bad"

[[tasks]]
name = "train"
command = ["python", "train.py", "--i", "{i}"]
resources = { cpus = 1, memory = "256MiB" }
sweep = { parameters = { i = [1, 2, 3] } }
"""
GPU_SWEEP = """
[experiment]
name = "k8s-bad-gpu"

[[tasks]]
name = "prep"
command = ["python", "prep.py"]
resources = { cpus = 1, memory = "256MiB" }

[[tasks]]
name = "train"
command = ["python", "train.py", "--i", "{i}"]
resources = { cpus = 4, memory = "8GiB", gpus = 1, gpu_type = "h100" }
sweep = { parameters = { i = [1, 2, 3] } }
"""
TASK_IMAGE = """
[experiment]
name = "k8s-bad-image"

[[tasks]]
name = "train"
command = ["python", "train.py"]
image = "ghcr.io/lab/train 1.2"
resources = { cpus = 1, memory = "256MiB" }
"""


def _provider_line(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text
        return text.replace(old, new)

    return edit


def _add(line: str) -> Callable[[str], str]:
    return lambda text: text + line + "\n"


# name -> (edit of stowplan.toml, experiment, where the error points, words the paragraph has)
CASES: dict[str, tuple[Callable[[str], str], str, str, tuple[str, ...]]] = {
    "unknown-context": (
        _add('context = "prod-eu"'),
        SWEEP,
        "stowplan.toml at $.providers.k8s.context",
        ("'prod-eu'", "use one of: kubecluster"),
    ),
    "provider-image-with-spaces": (
        _provider_line('image = "python:3.12-slim"', 'image = "python 3.12-slim"'),
        SWEEP,
        "stowplan.toml",
        ("$.providers.k8s", "image", "no spaces"),
    ),
    "task-image-with-spaces": (
        lambda text: text,
        TASK_IMAGE,
        "sweep.toml",
        ("$.tasks[0].image", "registry/name:tag"),
    ),
    "pool-label-on-no-node": (
        _add('node_pool_label = "example.com/pool"'),
        SWEEP,
        "stowplan.toml at $.providers.k8s.node_pool_label",
        ("'example.com/pool'", "cloud.google.com/gke-nodepool"),
    ),
    "gpu-model-no-pool-has": (
        lambda text: text,
        GPU_SWEEP,
        "sweep.toml",
        ("$.tasks[1].resources", "'train'", "1 GPU h100", "no 1 x h100 there"),
    ),
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_kubernetes_input_is_refused_and_nothing_is_written(
    project: Path,
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    command: str,
) -> None:
    edit, experiment, where, words = CASES[case]
    f = write_project(project, kubeconfig, experiment)
    toml = project / "stowplan.toml"
    toml.write_text(edit(toml.read_text()))
    before = len(kube_cluster.requests)

    assert main([command, str(f), "--provider", "k8s"]) == 2
    err = capsys.readouterr().err.strip()

    # one paragraph: the message, then at most a "fix:" line
    assert err.startswith("stowplan: ") and "Traceback" not in err, err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2, err
    assert len(lines) == 1 or lines[1].startswith("  fix: "), err
    assert len(err) < 1000, err
    assert where in lines[0], err
    assert "fix: " in err, err  # every one of these has a fix to give
    for w in words:
        assert w in err, (w, err)
    assert kube_cluster.token not in err
    # nothing written: no run store here, nothing created or changed on the cluster
    assert not (project / ".stowplan" / "stowplan.db").exists()
    writes = [r for r in kube_cluster.requests[before:] if r.method not in ("GET", "HEAD")]
    assert not writes, writes
    assert not kube_cluster.objects("jobs", group="batch")
    assert not kube_cluster.objects("configmaps", namespace="default")
