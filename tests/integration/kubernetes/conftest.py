"""Fixtures for tests against the emulated Kubernetes cluster (tests/kubecluster/).

``kube_cluster`` is a fresh emulated API server per test with the nodes of ``DEFAULT_NODES``;
``kubeconfig`` a token kubeconfig for it; ``kube_api`` a kubernetes-asyncio ``ApiClient`` built
from that kubeconfig (async tests: ``@pytest.mark.anyio``). Nothing here is skipped: the
emulator needs only Python packages of the ``test`` extra, so a missing one fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kubecluster import KubeCluster, NodeSpec

# Two node pools as GKE labels them: a CPU pool, and a GPU pool in another zone whose nodes
# carry the NVIDIA GPU operator's taint and product label.
DEFAULT_NODES = (
    NodeSpec(
        name="cpu-1",
        pool="cpu",
        cpu="8",
        memory="32Gi",
        region="europe-west4",
        zone="europe-west4-a",
        instance_type="n2-standard-8",
    ),
    NodeSpec(
        name="cpu-2",
        pool="cpu",
        cpu="8",
        memory="32Gi",
        region="europe-west4",
        zone="europe-west4-a",
        instance_type="n2-standard-8",
    ),
    NodeSpec(
        name="gpu-1",
        pool="a100",
        cpu="12",
        memory="85Gi",
        gpus=1,
        gpu_product="NVIDIA-A100-SXM4-40GB",
        region="europe-west4",
        zone="europe-west4-b",
        instance_type="a2-highgpu-1g",
        taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    ),
)


def write_project(tmp_path: Path, kubeconfig: Path, experiment: str) -> Path:
    """A project whose ``stowplan.toml`` has a local provider and ``[providers.k8s]`` on the
    emulated cluster; returns the experiment file (``sweep.toml``)."""
    (tmp_path / "stowplan.toml").write_text(
        f"""
[project]
name = "k8s-e2e"

[providers.local]
kind = "local"
cpus = 2

[providers.k8s]
kind = "kubernetes"
kubeconfig = "{kubeconfig}"
image = "python:3.12-slim"
"""
    )
    (tmp_path / ".stowplanignore").write_text("kubeconfig\n*.log\n")
    f = tmp_path / "sweep.toml"
    f.write_text(experiment)
    return f


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # kubernetes-asyncio is asyncio only


@pytest.fixture
def kube_cluster() -> Iterator[KubeCluster]:
    cluster = KubeCluster(bookmark_interval=0.2)
    cluster.start()
    try:
        for node in DEFAULT_NODES:
            cluster.add_node(node)
        yield cluster
        cluster.raise_errors()
    finally:
        cluster.stop()


@pytest.fixture
def kubeconfig(kube_cluster: KubeCluster, tmp_path: Path) -> Path:
    return kube_cluster.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
async def kube_api(kubeconfig: Path) -> AsyncIterator[Any]:
    from kubernetes_asyncio import config

    client = await config.new_client_from_config(config_file=str(kubeconfig))
    async with client:
        yield client
