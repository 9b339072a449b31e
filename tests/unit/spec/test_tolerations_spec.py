"""``placement.tolerations`` of a task and ``[providers.NAME.autoscale.POOL]`` of a Kubernetes
provider: what loads, where it goes, and one-paragraph errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.scheduler.plan import Versions, plan_runs
from stowplan.spec.canonical import task_hash
from stowplan.spec.loader import load_experiment, load_project
from stowplan.spec.models import KubernetesProviderConfig

VERSIONS = Versions(code_version="c" * 40, env_hash="e" * 64)
TASK = '[experiment]\nname = "x"\n[[tasks]]\nname = "train"\ncommand = ["python", "t.py"]\n'


def experiment(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    f = tmp_path / "exp.toml"
    f.write_text(TASK + extra)
    return f


def test_tolerations_reach_the_run_and_leave_other_tasks_hashes_alone(tmp_path: Path) -> None:
    plain = load_experiment(experiment(tmp_path)).spec.tasks[0]
    f = experiment(tmp_path, '[tasks.placement]\ntolerations = ["example.com/team", "dedicated"]\n')
    loaded = load_experiment(f)
    task = loaded.spec.tasks[0]
    assert task.placement.tolerations == ["dedicated", "example.com/team"]
    (run,) = plan_runs(loaded, VERSIONS, project="p")
    assert run.instance.tolerations == ("dedicated", "example.com/team")
    # a field added later: a task without it keeps the hash it had before it existed
    assert task_hash(plain) == task_hash(plain.__class__(name="train", command=["python", "t.py"]))
    assert task_hash(task) != task_hash(plain)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('["has space"]', "must be a Kubernetes label key"),
        ('["a", "a"]', "lists a key twice"),
    ],
)
def test_a_bad_toleration_key_names_file_and_field(tmp_path: Path, value: str, words: str) -> None:
    f = experiment(tmp_path, f"[tasks.placement]\ntolerations = {value}\n")
    with pytest.raises(SpecError) as e:
        load_experiment(f)
    text = str(e.value)
    assert words in text and "exp.toml" in text
    assert "tasks" in text and "placement.tolerations" in text


BASE = '[project]\nname = "p"\n[providers.k8s]\nkind = "kubernetes"\n'


def provider(tmp_path: Path, extra: str) -> KubernetesProviderConfig:
    f = tmp_path / "stowplan.toml"
    f.write_text(BASE + extra)
    cfg = load_project(f).config.providers["k8s"]
    assert isinstance(cfg, KubernetesProviderConfig)
    return cfg


def test_autoscale_pool_loads(tmp_path: Path) -> None:
    cfg = provider(
        tmp_path,
        "[providers.k8s.autoscale.gpu-burst]\n"
        'node = { cpus = 8, memory = "30GiB", gpus = { h100 = 1 } }\n'
        'max_nodes = 4\nboot_time = "3m"\ntaints = ["spot"]\nregion = "europe-west4"\n',
    )
    spec = cfg.autoscale["gpu-burst"]
    assert (spec.node.cpus, spec.node.memory, spec.node.gpus) == (8.0, 30 << 30, {"h100": 1})
    assert (spec.max_nodes, spec.boot_s, spec.taints) == (4, 180.0, ["spot"])


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        (
            "[providers.k8s.autoscale.burst]\nmax_nodes = 2\n",
            "$.providers.k8s.autoscale.burst.node",
            "missing required field",
        ),
        (
            '[providers.k8s.autoscale.burst]\nnode = { cpus = 8, memory = "30GiB" }\n'
            "max_nodes = 0\n",
            "$.providers.k8s.autoscale.burst.max_nodes",
            "at least 1",
        ),
        (
            "[providers.k8s.autoscale.burst]\n"
            'node = { cpus = 8, memory = "30GiB", gpus = { "NVIDIA-H100" = 1 } }\n'
            "max_nodes = 2\n",
            "$.providers.k8s.autoscale.burst.node.gpus",
            "lowercase model word",
        ),
        (
            "[providers.k8s.autoscale.burst]\n"
            'node = { cpus = 8, memory = "30GiB" }\nmax_nodes = 2\nboot_time = "soon"\n',
            "$.providers.k8s.autoscale.burst.boot_time",
            "",
        ),
        (
            '[providers.k8s.autoscale."Bad Pool"]\n'
            'node = { cpus = 8, memory = "30GiB" }\nmax_nodes = 2\n',
            "$.providers.k8s.autoscale",
            "pool name 'Bad Pool'",
        ),
    ],
)
def test_bad_autoscale_config_names_the_field(
    tmp_path: Path, body: str, path: str, words: str
) -> None:
    with pytest.raises(SpecError) as e:
        provider(tmp_path, body)
    assert e.value.path == path, str(e.value)
    assert words in str(e.value) and "stowplan.toml" in str(e.value)
