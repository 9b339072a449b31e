"""``[providers.X] kind = "kubernetes"`` in stowplan.toml: what loads, what users get wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.providers.base import Capability
from stowplan.providers.kubernetes import KubernetesProvider
from stowplan.providers.registry import make_provider
from stowplan.spec.loader import load_project
from stowplan.spec.models import KubernetesProviderConfig

BASE = '[project]\nname = "p"\n[providers.k8s]\nkind = "kubernetes"\n'


def load(tmp_path: Path, extra: str) -> KubernetesProviderConfig:
    f = tmp_path / "stowplan.toml"
    f.write_text(BASE + extra)
    cfg = load_project(f).config.providers["k8s"]
    assert isinstance(cfg, KubernetesProviderConfig)
    return cfg


def test_defaults_and_registry(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert (cfg.kubeconfig, cfg.context, cfg.namespace, cfg.gpu_resource) == (
        None,
        None,
        None,
        "nvidia.com/gpu",
    )
    assert cfg.kueue_queue is None and cfg.max_parallelism is None
    driver = make_provider("k8s", cfg, state_dir=tmp_path)
    assert isinstance(driver, KubernetesProvider)
    for cap in (Capability.ARRAYS, Capability.CONTAINERS, Capability.SECRETS, Capability.LOGS):
        assert cap in driver.capabilities
    assert Capability.NATIVE_WATCH in driver.capabilities
    assert Capability.CANCEL_MEMBER not in driver.capabilities
    assert "Indexed Job" in driver.capabilities.reason(Capability.CANCEL_MEMBER)
    assert any("outputs" in n for n in driver.capabilities.notes)


def test_every_field_loads(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'kubeconfig = "~/.kube/lab"\ncontext = "gke_lab"\nnamespace = "ml"\n'
        'image = "ghcr.io/lab/train:1.2"\nimage_pull_secrets = ["ghcr"]\n'
        'service_account = "trainer"\nnode_pool_label = "cloud.google.com/gke-nodepool"\n'
        'gpu_resource = "nvidia.com/gpu"\nkueue_queue = "team-a"\n'
        'priority_class = "batch-low"\nttl_after_finished = "1h"\nmax_parallelism = 64\n'
        'tolerations = ["dedicated"]\n',
    )
    assert cfg.ttl_after_finished == 3600.0 and cfg.max_parallelism == 64
    assert cfg.image == "ghcr.io/lab/train:1.2" and cfg.kueue_queue == "team-a"


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ('image = "my image:1"\n', "$.providers.k8s.image", "no spaces"),
        ('namespace = "ML_Team"\n', "$.providers.k8s.namespace", "ML_Team"),
        ('node_pool_label = "bad label"\n', "$.providers.k8s.node_pool_label", "label key"),
        ('kueue_queue = "a queue"\n', "$.providers.k8s.kueue_queue", "label value"),
        ('ttl_after_finished = "soon"\n', "$.providers.k8s.ttl_after_finished", "soon"),
        ("max_parallelism = 0\n", "$.providers.k8s.max_parallelism", "at least 1"),
        ('image_pull_secrets = ["Bad_Name"]\n', "$.providers.k8s.image_pull_secrets", "Bad"),
        ('tolerations = ["a b"]\n', "$.providers.k8s.tolerations[0]", "label key"),
        ('namespaces = "x"\n', "$.providers.k8s", "namespaces"),
    ],
)
def test_mistakes_name_the_field(tmp_path: Path, extra: str, path: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        load(tmp_path, extra)
    text = e.value.render()
    assert "stowplan.toml" in text and words in text, text
    assert (e.value.path or "").startswith(path), e.value.path
    assert e.value.hint


@pytest.mark.anyio
async def test_unknown_context_is_a_spec_error(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: "
        "'http://127.0.0.1:1'}\nusers:\n- name: u\n  user: {token: secret-token-value}\n"
        "contexts:\n- name: lab\n  context: {cluster: c, user: u}\ncurrent-context: lab\n"
    )
    cfg = load(tmp_path, f'kubeconfig = "{kubeconfig}"\ncontext = "nope"\n')
    driver = KubernetesProvider("k8s", cfg, state_dir=tmp_path)
    with pytest.raises(SpecError) as e:
        await driver.discover()
    assert e.value.path == "$.providers.k8s.context"
    assert "lab" in (e.value.hint or "") and "secret-token-value" not in e.value.render()
    await driver.aclose()


@pytest.mark.anyio
async def test_missing_kubeconfig_is_a_spec_error(tmp_path: Path) -> None:
    cfg = load(tmp_path, f'kubeconfig = "{tmp_path / "absent"}"\n')
    async with KubernetesProvider("k8s", cfg, state_dir=tmp_path) as driver:
        with pytest.raises(SpecError) as e:
            await driver.discover()
    assert e.value.path == "$.providers.k8s.kubeconfig"
