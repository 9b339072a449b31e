"""A task's container image and secret references: how they are written, checked and hashed.

The image is part of what runs, so it is part of the run's identity; a secret's name is part of
the task's spec (and so of the identity), its value never is, anywhere.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest

from stowplan.errors import SpecError
from stowplan.scheduler.plan import Versions, plan_runs
from stowplan.spec.canonical import canonical_experiment, spec_hash, task_hash
from stowplan.spec.loader import load_experiment
from stowplan.spec.models import Experiment, Task

VERSIONS = Versions(code_version="c0de", env_hash="e" * 64)

BASE = """\
[experiment]
name = "img"

[[tasks]]
name = "train"
command = ["python", "train.py", "{lr}"]
sweep = { parameters = { lr = [0.1, 0.01] } }
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_ids(tmp_path: Path, text: str) -> list[str]:
    loaded = load_experiment(write(tmp_path, text))
    return [r.run_id for r in plan_runs(loaded, VERSIONS, project="p")]


def load_error(tmp_path: Path, text: str) -> SpecError:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    err = info.value
    rendered = err.render()
    assert str(path) in rendered and "\n  fix: " in rendered
    return err


# ---- the schema -----------------------------------------------------------------------------


def test_image_and_secrets_load_from_toml_and_yaml(tmp_path: Path) -> None:
    toml = load_experiment(
        write(
            tmp_path,
            BASE + 'image = "ghcr.io/org/train:1.2@sha256:' + "a" * 64 + '"\n'
            'secrets = { HF_TOKEN = "hf-token", DB_PASSWORD = "prod/db#password" }\n',
        )
    )
    task = toml.spec.tasks[0]
    assert task.image == "ghcr.io/org/train:1.2@sha256:" + "a" * 64
    assert task.secrets == {"HF_TOKEN": "hf-token", "DB_PASSWORD": "prod/db#password"}
    yaml = load_experiment(
        write(
            tmp_path,
            """\
            experiment: {name: img}
            tasks:
              - name: train
                command: [python, train.py, "{lr}"]
                sweep: {parameters: {lr: [0.1, 0.01]}}
                image: ghcr.io/org/train:1.2@sha256:%s
                secrets: {HF_TOKEN: hf-token, DB_PASSWORD: "prod/db#password"}
            """
            % ("a" * 64),
            name="exp.yaml",
        )
    )
    assert yaml.spec == toml.spec


def test_an_image_name_with_a_space_names_the_field_and_a_fix(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE + 'image = "python 3.12"\n')
    assert err.path == "$.tasks[0].image"
    assert err.line == 8
    assert "'python 3.12'" in err.message and "image" in err.message
    assert "registry/name:tag" in err.message


def test_a_secret_name_that_is_not_a_name_names_the_variable(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE + 'secrets = { TOKEN = "my token" }\n')
    assert err.path == "$.tasks[0].secrets.TOKEN"
    assert "'my token'" in err.message and "secret" in err.message


def test_a_secret_variable_must_be_a_variable_name(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE + 'secrets = { "1TOKEN" = "tok" }\n')
    assert err.path == "$.tasks[0].secrets"
    assert "'1TOKEN'" in err.message


def test_a_variable_set_in_env_and_from_a_secret_is_refused(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE + 'env = { TOKEN = "x" }\nsecrets = { TOKEN = "tok" }\n')
    assert err.path == "$.tasks[0].secrets.TOKEN"
    assert "env" in err.message


# ---- identity -------------------------------------------------------------------------------


def test_the_image_is_part_of_the_run_identity(tmp_path: Path) -> None:
    plain = run_ids(tmp_path, BASE)
    a = run_ids(tmp_path, BASE + 'image = "python:3.12-slim"\n')
    again = run_ids(tmp_path, BASE + 'image = "python:3.12-slim"\n')
    b = run_ids(tmp_path, BASE + 'image = "python:3.13-slim"\n')
    assert a == again
    assert len(set(plain) | set(a) | set(b)) == 6


def test_secret_names_are_in_the_identity_and_values_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("hf-token", "first-value")
    a = run_ids(tmp_path, BASE + 'secrets = { TOKEN = "hf-token" }\n')
    monkeypatch.setenv("hf-token", "second-value")
    assert run_ids(tmp_path, BASE + 'secrets = { TOKEN = "hf-token" }\n') == a
    b = run_ids(tmp_path, BASE + 'secrets = { TOKEN = "other-token" }\n')
    assert not set(a) & set(b)


def test_a_task_without_image_or_secrets_keeps_the_identity_it_had_before_them() -> None:
    # These hashes were computed before tasks had images and secrets: the stores written
    # then must keep finding their runs.
    t = msgspec.convert(
        {
            "name": "train",
            "command": ["python", "t.py", "{lr}"],
            "env": {"A": "1"},
            "resources": {"cpus": 2, "memory": "1GiB"},
        },
        Task,
    )
    assert task_hash(t) == "504f6903ac603b0ff50713775906da6aeed928bb8939a5d9dc035a2d8a46263c"
    e = msgspec.convert(
        {"experiment": {"name": "x"}, "tasks": [{"name": "train", "command": ["python", "t.py"]}]},
        Experiment,
    )
    assert (
        spec_hash(canonical_experiment(e))
        == "301bb279e0bbc419579df5f6f0190b88c8aea1d9cdb8f381bebe769c771bdb1c"
    )


def test_a_stored_task_hashes_to_its_task_spec_hash(tmp_path: Path) -> None:
    """Replay checks ``spec_hash(stored task) == identity.task_spec_hash``: the stored form
    (``canonical_experiment``) and the identity's hash (``task_hash``) must agree, with and
    without an image."""
    for text in (BASE, BASE + 'image = "python:3.12"\nsecrets = { T = "tok" }\n'):
        loaded = load_experiment(write(tmp_path, text))
        stored = canonical_experiment(loaded.spec)["tasks"][0]
        planned = plan_runs(loaded, VERSIONS, project="p")
        assert spec_hash(stored) == planned[0].identity.task_spec_hash
        assert msgspec.convert(stored, Task) == loaded.spec.tasks[0]


def test_the_launch_carries_image_code_version_and_secret_names(tmp_path: Path) -> None:
    loaded = load_experiment(
        write(tmp_path, BASE + 'image = "python:3.12"\nsecrets = { TOKEN = "hf-token#read" }\n')
    )
    launch = plan_runs(loaded, VERSIONS, project="p")[0].launch
    assert launch.image == "python:3.12"
    assert launch.code == "c0de"
    assert launch.secrets == {"TOKEN": "hf-token#read"}
