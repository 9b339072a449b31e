"""A task that declares ``outputs`` runs only where they come back (``Capability.OUTPUTS``).

A Kubernetes provider without ``bucket`` cannot return them (they are lost with the pod): a task
with outputs is refused there before anything is written, or placed only on the providers it may
run on that return them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.errors import SpecError
from stowplan.providers.base import Capability
from stowplan.providers.registry import make_provider
from stowplan.session import prepare
from stowplan.simulator.provider import SimProvider
from stowplan.spec.loader import load_project

K8S = '[providers.k8s]\nkind = "kubernetes"\n'
BUCKET = 'bucket = "s3://lab/stowplan"\n'
LOCAL = '[providers.local]\nkind = "local"\ncpus = 2\n'


def project(tmp_path: Path, providers: str, task: str = 'outputs = ["m.json"]\n') -> Path:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n' + providers)
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[experiment]\nname = "x"\n[[tasks]]\nname = "prep"\ncommand = ["true"]\n'
        '[[tasks]]\nname = "train"\ncommand = ["true", "{i}"]\n'
        "sweep = { parameters = { i = [1, 2] } }\n" + textwrap.dedent(task)
    )
    return exp


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def k8s_reason(tmp_path: Path, config: str = "") -> str:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    f = tmp_path / "cfg" / "stowplan.toml"
    f.write_text('[project]\nname = "p"\n' + K8S + config)
    cfg = load_project(f).config.providers["k8s"]
    driver = make_provider("k8s", cfg, state_dir=tmp_path / "cfg" / ".stowplan")
    return driver.capabilities.reason(Capability.OUTPUTS)


def test_outputs_on_kubernetes_without_a_bucket_are_refused(tmp_path: Path) -> None:
    exp = project(tmp_path, K8S)
    before = tree(tmp_path)
    with pytest.raises(SpecError) as info:
        prepare(exp)
    err = info.value
    assert tree(tmp_path) == before  # nothing written
    assert err.file == str(exp) and err.path == "$.tasks[1].outputs" and err.line == 10
    assert "'train'" in err.message and "outputs" in err.message and "k8s" in err.message
    reason = k8s_reason(tmp_path)
    assert reason and err.hint == reason
    assert "bucket = 's3://BUCKET/PREFIX'" in err.hint and "[providers." in err.hint


def test_the_cli_exits_2_naming_file_field_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project(tmp_path, K8S)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert main(["run", "exp.toml", "--dry-run"]) == 2
    assert main(["run", "exp.toml"]) == 2
    err = capsys.readouterr().err
    assert tree(tmp_path) == before
    assert "exp.toml:10 at $.tasks[1].outputs: task 'train'" in err
    assert "fix: no bucket: set bucket" in err and "Traceback" not in err


def test_outputs_run_only_where_they_come_back(tmp_path: Path) -> None:
    prepared = prepare(project(tmp_path, K8S + LOCAL))
    placed = {(r.task, r.instance.allowed_providers) for r in prepared.planned}
    # the task without outputs may still run anywhere
    assert placed == {("train", ("local",)), ("prep", None)}


def test_an_explicit_provider_without_outputs_is_refused(tmp_path: Path) -> None:
    exp = project(tmp_path, K8S + LOCAL)
    with pytest.raises(SpecError) as info:
        prepare(exp, provider="k8s")
    assert info.value.path == "$.tasks[1].outputs"
    assert not (tmp_path / ".stowplan").exists()
    prepare(exp, provider="local")  # and where they come back, it is accepted


def test_policy_allowed_providers_limit_the_providers_asked(tmp_path: Path) -> None:
    exp = project(
        tmp_path,
        K8S + LOCAL,
        'outputs = ["m.json"]\n[policy]\nallowed_providers = ["k8s"]\n',
    )
    with pytest.raises(SpecError) as info:
        prepare(exp)
    assert info.value.path == "$.tasks[1].outputs"


def test_kubernetes_with_a_bucket_returns_outputs(tmp_path: Path) -> None:
    assert k8s_reason(tmp_path, BUCKET) == ""
    prepared = prepare(project(tmp_path, K8S + BUCKET))
    placed = {(r.task, r.instance.allowed_providers) for r in prepared.planned}
    assert placed == {("train", ("k8s",)), ("prep", None)}


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("local", LOCAL),
        ("fast", '[providers.fast]\nkind = "instant"\n'),
        ("campus", '[providers.campus]\nkind = "slurm"\nhost = "login.example"\n'),
        (
            "campus",
            '[providers.campus]\nkind = "slurm"\nhost = "login.example"\ntransport = "rest"\n'
            'rest_url = "http://slurm:6820"\nworkdir = "/scratch/sp"\n',
        ),
        (
            "cloud",
            '[providers.cloud]\nkind = "aws"\nbucket = "s3://lab/sp"\nregions = ["us-east-1"]\n'
            'ami = "/aws/service/deeplearning/ami/latest"\n',
        ),
    ],
)
def test_the_other_drivers_return_outputs(tmp_path: Path, name: str, config: str) -> None:
    f = tmp_path / "stowplan.toml"
    f.write_text('[project]\nname = "p"\n' + config)
    cfg = load_project(f).config.providers[name]
    driver = make_provider(name, cfg, state_dir=tmp_path / ".stowplan")
    assert Capability.OUTPUTS in driver.capabilities


def test_the_simulator_returns_outputs() -> None:
    assert Capability.OUTPUTS in SimProvider.capabilities
