"""Preparing an experiment (``stowplan.session``): what is refused before anything is written,
and what each attempt's ``LaunchSpec`` is made of."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest

from stowplan.errors import SpecError
from stowplan.placement.problem import Pool, Shape
from stowplan.providers.base import Capability, Facts, SecretRef
from stowplan.providers.instant import InstantProvider
from stowplan.providers.local import LocalProvider
from stowplan.session import (
    check_feasible,
    launch_spec,
    payload,
    payload_of,
    prepare,
    run_records,
)
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import InstantProviderConfig, LocalProviderConfig

GiB = 1 << 30

LOCAL = '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 2\n'
BOTH = LOCAL + '[providers.fast]\nkind = "instant"\n'


def project(tmp_path: Path, config: str, task: str) -> Path:
    (tmp_path / "stowplan.toml").write_text(config)
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[experiment]\nname = "x"\n[[tasks]]\nname = "t"\ncommand = ["true", "{i}"]\n'
        "sweep = { parameters = { i = [1, 2] } }\n" + textwrap.dedent(task)
    )
    return exp


def refused(exp: Path, **kwargs: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        prepare(exp, **kwargs)  # type: ignore[arg-type]
    assert not (exp.parent / ".stowplan").exists()  # nothing written
    return info.value


# ---- capabilities ---------------------------------------------------------------------------


def test_an_image_no_provider_can_run_is_refused_with_the_driver_s_reason(
    tmp_path: Path,
) -> None:
    err = refused(project(tmp_path, LOCAL, 'image = "python:3.12"\n'))
    assert err.path == "$.tasks[0].image"
    assert err.line == 7
    assert "'python:3.12'" in err.message and "local" in err.message
    reason = LocalProvider("local", LocalProviderConfig(), state_dir=tmp_path).capabilities.reason(
        Capability.CONTAINERS
    )
    assert reason and err.hint == reason


def test_secrets_no_provider_can_resolve_are_refused(tmp_path: Path) -> None:
    err = refused(project(tmp_path, LOCAL, 'secrets = { TOKEN = "hf-token" }\n'))
    assert err.path == "$.tasks[0].secrets"
    reason = LocalProvider("local", LocalProviderConfig(), state_dir=tmp_path).capabilities.reason(
        Capability.SECRETS
    )
    assert err.hint == reason


def test_a_task_with_an_image_runs_only_where_containers_run(tmp_path: Path) -> None:
    assert Capability.CONTAINERS in InstantProvider("fast").capabilities
    exp = project(tmp_path, BOTH, 'image = "python:3.12"\n')
    prepared = prepare(exp)
    assert {r.instance.allowed_providers for r in prepared.planned} == {("fast",)}
    # and a task that names no image keeps every provider
    (tmp_path / "plain").mkdir()
    plain = project(tmp_path / "plain", BOTH, "")
    assert {r.instance.allowed_providers for r in prepare(plain).planned} == {None}
    # --provider local leaves no provider that runs containers
    err = refused(exp, provider="local")
    assert err.path == "$.tasks[0].image"


def test_policy_allowed_providers_limit_the_providers_asked(tmp_path: Path) -> None:
    exp = project(
        tmp_path, BOTH, 'image = "python:3.12"\n[policy]\nallowed_providers = ["local"]\n'
    )
    assert refused(exp).path == "$.tasks[0].image"


# ---- feasibility: the core decides ----------------------------------------------------------


def gpu_task(tmp_path: Path) -> Path:
    return project(
        tmp_path, LOCAL, 'resources = { cpus = 4, memory = "16GiB", gpus = 1, gpu_type = "a10g" }\n'
    )


def test_a_gpu_task_that_fits_only_an_elastic_pool_is_feasible(tmp_path: Path) -> None:
    """The copy of the core's check refused this; the core places it (it launches an
    instance), so preparing must accept it."""
    prepared = prepare(gpu_task(tmp_path))
    pools = [
        Pool(id="local", provider="local", cpus=2, memory=8 * GiB),
        Pool(
            id="g5",
            provider="local",
            kind="cloud",
            node=Shape(cpus=8, memory=32 * GiB, gpus={"a10g": 1}),
            max_instances=4,
        ),
    ]
    check_feasible(prepared, pools)


def test_a_task_no_pool_could_ever_run_is_refused_with_the_core_s_reason(
    tmp_path: Path,
) -> None:
    prepared = prepare(gpu_task(tmp_path))
    pools = [
        Pool(id="local", provider="local", cpus=2, memory=8 * GiB),
        Pool(
            id="g5",
            provider="local",
            kind="cloud",
            node=Shape(cpus=8, memory=32 * GiB, gpus={"t4": 1}),
            max_instances=4,
        ),
    ]
    with pytest.raises(SpecError) as info:
        check_feasible(prepared, pools)
    err = info.value
    assert err.path == "$.tasks[0].resources"
    assert err.message.startswith("task 't' asks for 4 CPUs, 16.00 GiB, 1 GPU a10g")
    assert "no allowed pool offers" in err.message  # the core's own words
    with pytest.raises(SpecError, match="no configured provider offers any pool"):
        check_feasible(prepared, [])


# ---- the launch -----------------------------------------------------------------------------


def test_an_attempt_carries_image_code_and_secret_references_never_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    value = "s3cr3t-value-that-must-not-leak"
    monkeypatch.setenv("hf-token", value)
    monkeypatch.setenv("TOKEN", value)
    exp = project(
        tmp_path,
        BOTH,
        'image = "ghcr.io/org/t:1"\nsecrets = { TOKEN = "hf-token", DB = "prod/db#password" }\n',
    )
    prepared = prepare(exp)
    run = prepared.planned[0]
    spec = launch_spec(payload(prepared, run), run.run_id, 1, attempt_key(run.run_id, 1), "fast")
    assert spec.image == "ghcr.io/org/t:1"
    assert spec.code == prepared.provenance.code["version"]
    assert spec.secrets == {
        "TOKEN": SecretRef(name="hf-token"),
        "DB": SecretRef(name="prod/db", key="password"),
    }
    assert spec.secrets["DB"].render() == "secret:prod/db#password"
    # what is stored of the run names the secrets and never holds their values
    (rec,) = [r for r in run_records(prepared, "p" * 64) if r.run_id == run.run_id]
    stored = msgspec.json.encode(rec)
    assert b"hf-token" in stored and value.encode() not in stored
    assert payload_of(rec) == payload(prepared, run)
    # a dry run renders the request without the value
    from stowplan.cli.common import make_console
    from stowplan.cli.run import _print_dry_run

    pools = [Pool(id="fast", provider="fast", cpus=1e9, memory=1 << 60)]
    _print_dry_run(make_console(), prepared, pools)
    assert value not in capsys.readouterr().out
    req = InstantProvider("fast", InstantProviderConfig()).plan([spec], Facts.of(pools))
    assert value not in req[0].render()


def test_payloads_stored_before_images_still_load(tmp_path: Path) -> None:
    prepared = prepare(project(tmp_path, LOCAL, ""))
    (rec, *_) = run_records(prepared, "p" * 64)
    old = rec.task_spec["payload"]
    for name in ("image", "code", "secrets"):
        del old["launch"][name]
    loaded = payload_of(msgspec.structs.replace(rec, task_spec={"payload": old}))
    assert loaded.launch.image is None and loaded.launch.secrets == {}
    assert loaded.instance == prepared.planned[0].instance
