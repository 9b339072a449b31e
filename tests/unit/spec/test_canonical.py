"""Canonical encoding and the identity hashes built on it."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.providers.base import KEY_MAX, KEY_PATTERN, request_name
from stowplan.spec.canonical import (
    ID_LEN,
    KEY_LEN,
    RunIdentity,
    attempt_key,
    canonical_json,
    run_id,
    sha256_hex,
    spec_hash,
)
from stowplan.spec.loader import load_experiment
from stowplan.spec.models import Experiment, Resources, Task

TOML_A = """\
[experiment]
name = "hash-me"
seed = 3

[[tasks]]
name = "train"
command = ["python", "train.py", "{lr}"]
resources = { cpus = 2, memory = "1GiB", gpus = 1, gpu_type = ["H100", "A100"] }
timeout = "2h"
retry = { on = ["preempted", "lost"], max_attempts = 4 }
sweep = { method = "grid", parameters = { lr = [0.1, 0.01] } }
"""

TOML_B = """\
[[tasks]]
sweep = { parameters = { lr = [0.1, 0.01] }, method = "grid" }
retry = { max_attempts = 4, on = ["lost", "preempted", "lost"] }
timeout = 7200
resources = { gpu_type = ["A100", "H100"], gpus = 1, memory = 1073741824, cpus = 2.0 }
command = ["python", "train.py", "{lr}"]
name = "train"

[experiment]
seed = 3
name = "hash-me"
"""

YAML_C = """\
tasks:
  - name: train
    command: [python, train.py, "{lr}"]
    resources: {cpus: 2, memory: 1024MiB, gpus: 1, gpu_type: [A100, H100]}
    timeout: 2:00:00
    retry: {max_attempts: 4, on: [lost, preempted]}
    sweep:
      parameters: {lr: [0.1, 0.01]}
experiment:
  name: hash-me
  seed: 3
"""


def load(tmp_path: Path, name: str, text: str) -> Experiment:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_experiment(path).spec


def test_same_spec_written_three_ways_hashes_the_same(tmp_path: Path) -> None:
    a = load(tmp_path, "a.toml", TOML_A)
    b = load(tmp_path, "b.toml", TOML_B)
    c = load(tmp_path, "c.yaml", YAML_C)
    assert canonical_json(a) == canonical_json(b) == canonical_json(c)
    assert spec_hash(a) == spec_hash(b) == spec_hash(c)
    assert len(spec_hash(a)) == ID_LEN


def test_a_real_difference_changes_the_hash(tmp_path: Path) -> None:
    a = load(tmp_path, "a.toml", TOML_A)
    d = load(tmp_path, "d.toml", TOML_A.replace('memory = "1GiB"', 'memory = "1GB"'))
    e = load(tmp_path, "e.toml", TOML_A.replace("seed = 3", "seed = 4"))
    assert len({spec_hash(a), spec_hash(d), spec_hash(e)}) == 3


def test_canonical_json_sorts_keys_and_writes_defaults() -> None:
    task = msgspec.convert({"name": "t", "command": ["x"]}, Task)
    raw = canonical_json(task)
    data: dict[str, Any] = json.loads(raw)
    assert list(data) == sorted(data)
    assert list(data["resources"]) == sorted(data["resources"])
    assert data["resources"]["memory"] == 1024**3
    assert data["timeout"] is None  # defaults are explicit, not omitted
    assert data["env"] == {}
    assert b" " not in raw
    assert canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == b'{"a":{"c":3,"d":2},"b":1}'


def test_spec_hash_is_sha256_of_the_canonical_form() -> None:
    r = Resources()
    assert spec_hash(r) == hashlib.sha256(canonical_json(r)).hexdigest()
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()


BASE: dict[str, Any] = {
    "task_spec_hash": "a" * 64,
    "params": {"lr": 0.1, "layers": 3},
    "seed": 7,
    "code_version": "abc123",
    "data_versions": {"s3://b/train.csv": "v1"},
    "env_hash": "e" * 64,
    "upstream": ["u1", "u2"],
}


def test_run_id_is_stable_and_order_insensitive() -> None:
    first = run_id(**BASE)
    again = run_id(
        **{
            **BASE,
            "params": {"layers": 3, "lr": 0.1},
            "data_versions": dict(BASE["data_versions"]),
            "upstream": ["u2", "u1"],
        }
    )
    assert first == again
    assert len(first) == ID_LEN
    assert first == RunIdentity(**{**BASE, "upstream": sorted(BASE["upstream"])}).run_id()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_spec_hash", "b" * 64),
        ("params", {"lr": 0.2, "layers": 3}),
        ("params", {"lr": 0.1, "layers": 3, "extra": True}),
        ("params", {"lr": 0.1}),
        ("seed", 8),
        ("code_version", "abc124"),
        ("data_versions", {"s3://b/train.csv": "v2"}),
        ("data_versions", {}),
        ("env_hash", "f" * 64),
        ("upstream", ["u1"]),
        ("upstream", ["u1", "u3"]),
        ("replicate", 1),
    ],
)
def test_run_id_changes_with_each_input(field: str, value: object) -> None:
    assert run_id(**{**BASE, field: value}) != run_id(**BASE)


def test_run_id_distinguishes_types_of_parameter_values() -> None:
    ids = {run_id(**{**BASE, "params": {"x": v}}) for v in (1, 1.5, "1", True)}
    assert len(ids) == 4


def test_attempt_key_differs_per_attempt_and_run() -> None:
    rid = run_id(**BASE)
    other = run_id(**{**BASE, "seed": 8})
    keys = {attempt_key(rid, n) for n in range(1, 6)} | {attempt_key(other, 1)}
    assert len(keys) == 6
    assert attempt_key(rid, 1) == attempt_key(rid, 1)
    assert attempt_key(rid, 2) == hashlib.sha256(f"{rid}/2".encode()).hexdigest()[:KEY_LEN]


def test_an_attempt_key_fits_every_provider_s_names_with_a_prefix() -> None:
    """A Kubernetes label value and a DNS label hold 63 characters, an EC2 ClientToken 64: a
    key with a driver's prefix fits all of them as it is."""
    key = attempt_key(run_id(**BASE), 1)
    assert len(key) == KEY_LEN
    assert len(request_name([key], "stowplan")) <= KEY_MAX
    assert KEY_PATTERN.match(key)


PINNED_EXPERIMENT = """\
[experiment]
name = "pinned"

[policy]
priority = 3

[[tasks]]
name = "t"
command = ["python", "t.py"]
"""
PINNED_EXPERIMENT_HASH = "162ca0047de68d9f053fe0f3e1daa6268ad220ffbaeaa84c0d40298daedb4f49"
"""computed before ``policy.budget`` existed: an experiment with its own ``[policy]`` that
does not set a budget keeps its id."""


def test_fields_added_later_keep_old_experiment_ids(tmp_path: Path) -> None:
    from stowplan.spec.canonical import canonical_experiment

    path = tmp_path / "experiment.toml"
    path.write_text(PINNED_EXPERIMENT)
    assert spec_hash(canonical_experiment(load_experiment(path).spec)) == PINNED_EXPERIMENT_HASH
    path.write_text(PINNED_EXPERIMENT.replace("priority = 3", "budget = { monthly_usd = 5 }"))
    canonical = canonical_experiment(load_experiment(path).spec)
    assert canonical["policy"]["budget"]["monthly_usd"] == 5
