"""Canonical encoding and identity hashes.

The canonical form of any spec is msgspec JSON with sorted keys and every default written out,
so two files that mean the same thing hash the same. Identity is layered:

- ``spec_hash``: SHA-256 of the canonical encoding of a spec; ``task_hash`` that of a task,
  whose canonical form leaves out fields added later while they are at their defaults
  (``TASK_FIELDS_ADDED_LATER``), so adding a field does not change every stored run's id;
- ``run_id``: SHA-256 of everything that determines a run's result (task spec hash, parameters,
  seed, code version, data versions, environment hash, the run ids of its upstream runs, the
  replicate number and, for a repeated parameter set, the trial number);
- ``attempt_key``: SHA-256 of run id and attempt number; every provider maps it onto its own
  de-duplication, so a retried submit finds the first job instead of making a second.

Pure functions: no I/O here. Capturing code, data and environment versions is provenance's job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

_encoder = msgspec.json.Encoder(order="sorted")

ID_LEN = 64


def canonical_json(obj: object) -> bytes:
    """Deterministic JSON: sorted keys, defaults explicit, no whitespace."""
    return _encoder.encode(obj)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_hash(obj: object) -> str:
    return sha256_hex(canonical_json(obj))


TASK_FIELDS_ADDED_LATER: Final[Mapping[str, object]] = {
    "image": None,
    "secrets": {},
    "service": None,
}
"""Task fields added after stores existed, with their defaults. A task's canonical form leaves
each out while it has its default, so a task that does not use it keeps the hash (and its runs
keep the ids) it had before the field existed; a task that sets it hashes differently."""
NESTED_FIELDS_ADDED_LATER: Final[Mapping[tuple[str, str], object]] = {
    ("placement", "tolerations"): [],
    ("resources", "nodes"): 1,
}
"""The same, for fields of a task's sub-tables: (table, field) -> default."""


def canonical_task(task: object) -> dict[str, Any]:
    """A task's canonical form (``spec.models.Task`` or its stored dict): every default
    written out, except those of ``TASK_FIELDS_ADDED_LATER``."""
    fields: dict[str, Any] = msgspec.to_builtins(task)
    for name, default in TASK_FIELDS_ADDED_LATER.items():
        if name in fields and fields[name] == default:
            del fields[name]
    for (table, name), default in NESTED_FIELDS_ADDED_LATER.items():
        sub = fields.get(table)
        if isinstance(sub, dict) and name in sub and sub[name] == default:
            del sub[name]
    return fields


def task_hash(task: object) -> str:
    """The hash of a task's spec as written (``RunIdentity.task_spec_hash``)."""
    return spec_hash(canonical_task(task))


EXPERIMENT_FIELDS_ADDED_LATER: Final[Mapping[tuple[str, str], object]] = {
    ("policy", "budget"): None,
}
"""The same, for an experiment's own tables: an experiment that does not set the field keeps
the id it had before the field existed."""


def canonical_experiment(spec: object) -> dict[str, Any]:
    """An experiment's canonical form, as stored (``ExperimentRecord.spec``): its tasks in
    ``canonical_task`` form, so a stored task hashes (``spec_hash``) to its ``task_hash``."""
    out: dict[str, Any] = msgspec.to_builtins(spec)
    out["tasks"] = [canonical_task(t) for t in out.get("tasks", [])]
    for (table, name), default in EXPERIMENT_FIELDS_ADDED_LATER.items():
        sub = out.get(table)
        if isinstance(sub, dict) and name in sub and sub[name] == default:
            del sub[name]
    return out


class RunIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that determines a run's result; its hash is the run id."""

    task_spec_hash: str
    params: dict[str, str | int | float | bool]
    seed: int
    code_version: str
    data_versions: dict[str, str]
    env_hash: str
    upstream: list[str]
    replicate: int = 0
    trial: int = 0
    """Which repeat of the same parameters within one task's sweep this is: 0 for the first
    trial with these parameters, k for its k-th repeat (a random sweep that draws the same
    value twice, a grid that lists a value twice). Each trial is its own run."""

    def run_id(self) -> str:
        if self.trial == 0:
            # NOTE: the hash of an unrepeated trial leaves ``trial`` out, so the run ids of
            # stores written before the field existed stay the same.
            fields = msgspec.to_builtins(self)
            del fields["trial"]
            return spec_hash(fields)
        return spec_hash(self)


def run_id(
    *,
    task_spec_hash: str,
    params: Mapping[str, str | int | float | bool],
    seed: int,
    code_version: str,
    data_versions: Mapping[str, str],
    env_hash: str,
    upstream: Sequence[str],
    replicate: int = 0,
    trial: int = 0,
) -> str:
    return RunIdentity(
        task_spec_hash=task_spec_hash,
        params=dict(params),
        seed=seed,
        code_version=code_version,
        data_versions=dict(data_versions),
        env_hash=env_hash,
        upstream=sorted(upstream),
        replicate=replicate,
        trial=trial,
    ).run_id()


KEY_LEN = 32
"""Hex characters of an attempt key: 128 bits, and short enough for every provider's names and
tokens (``providers.base.KEY_MAX``) with a prefix."""


def attempt_key(run_id: str, attempt: int) -> str:
    """Idempotency key of attempt ``attempt`` (1-based) of a run: ``KEY_LEN`` hex characters.

    Keys made before 0.2 were 64 characters long; a restored attempt keeps the key its store
    row has (``RestoredTask.key``), so an attempt in flight across an upgrade is found again."""
    return sha256_hex(f"{run_id}/{attempt}".encode())[:KEY_LEN]
