"""Recording a run (``stowplan.session.record``): the rows it writes are the ones its
straightforward form writes, ``RunStore.put_runs(run_records(...))``, byte for byte.

``record`` hands the store each run's identity and payload as the Structs they are
(``NewRunRecord``) instead of as builtins; these tests keep the stored rows, blobs and run ids
the same as the builtins give."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from stowplan import session
from stowplan.provenance.records import ProvenanceRecord, RunRecord
from stowplan.provenance.store import RunStore
from stowplan.session import Prepared, payload, payload_of, prepare, record, run_records

CONFIG = (
    '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    '[providers.fast]\nkind = "instant"\n'
)
# two tasks, one downstream of the other; floats, booleans, strings and a repeated value
# (a second trial of the same parameters); command, script, env, outputs, image and secrets
EXPERIMENT = """\
[experiment]
name = "x"
seed = 7
[[tasks]]
name = "a"
command = ["python", "-c", "{lr} {seed} {run_id}", "{name}", "{flag}"]
env = { LR = "{lr}", FIXED = "yes" }
outputs = ["out.txt"]
timeout = "1h"
image = "ghcr.io/org/t:1"
secrets = { TOKEN = "hf-token", DB = "prod/db#password" }
resources = { cpus = 2, memory = "3GiB" }
[tasks.sweep]
parameters = { lr = [0.1, 0.01, 0.1], name = ["u", "v"], flag = [true, false] }
[[tasks]]
name = "b"
depends_on = ["a"]
script = "echo {seed} {run_id}"
priority = 3
[tasks.placement]
forbid_sites = ["s1"]
"""
NOW = 1_700_000_000.5


def prepared_in(d: Path, monkeypatch: pytest.MonkeyPatch) -> Prepared:
    d.mkdir()
    (d / "stowplan.toml").write_text(CONFIG)
    (d / "exp.toml").write_text(EXPERIMENT)
    # the same clock and provenance for every store
    monkeypatch.setattr(session, "time", SimpleNamespace(time=lambda: NOW))
    prepared = prepare(d / "exp.toml", replicates=2)
    prepared.provenance = ProvenanceRecord(code={"version": "v1"})
    return prepared


def rows(path: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the runs' tables, in storage order."""
    with sqlite3.connect(path) as c:
        return {
            "runs": c.execute("SELECT * FROM runs ORDER BY rid").fetchall(),
            "run_bodies": c.execute("SELECT * FROM run_bodies ORDER BY rid").fetchall(),
            "experiments": c.execute("SELECT * FROM experiments ORDER BY id").fetchall(),
        }


def straightforward(prepared: Prepared, store: RunStore) -> list[RunRecord]:
    """``record`` as it was: every run as a ``RunRecord`` of builtins, then ``put_runs``."""
    h = store.put_provenance(prepared.provenance)
    store.put_experiment(prepared.experiment)
    runs = run_records(prepared, h)
    store.put_runs(runs)
    return runs


def test_record_writes_the_rows_run_records_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = prepared_in(tmp_path / "a", monkeypatch)
    with RunStore(prepared.store_path) as store:
        recorded = record(prepared, store)
    other = prepared_in(tmp_path / "b", monkeypatch)
    with RunStore(other.store_path) as store:
        expected = straightforward(other, store)

    assert len(recorded) == len(expected) == 26  # 12 trials and 1 downstream, 2 replicates
    assert [r.run_id for r in recorded] == [r.run_id for r in expected]
    assert any(r.identity.trial > 0 for r in recorded)  # a repeated parameter set is covered
    mine, theirs = rows(prepared.store_path), rows(other.store_path)
    # the experiment's file path differs between the two directories, nothing else does
    assert [r[:4] + r[5:] for r in mine["experiments"]] == [
        r[:4] + r[5:] for r in theirs["experiments"]
    ]
    assert mine["runs"] == theirs["runs"]
    assert mine["run_bodies"] == theirs["run_bodies"]
    assert all(isinstance(body, str) for _, body in mine["run_bodies"])  # TEXT, as before
    # and so is what is read back, the payload included
    ids = [r.run_id for r in recorded]
    with RunStore(prepared.store_path) as store:
        back = store.get_runs(ids)
    with RunStore(other.store_path) as store:
        assert back == store.get_runs(ids)
    for r in recorded:
        assert payload_of(back[r.run_id]) == payload(prepared, r)


def test_record_again_keeps_what_is_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = prepared_in(tmp_path / "a", monkeypatch)
    with RunStore(prepared.store_path) as store:
        record(prepared, store)
        first = rows(prepared.store_path)
        record(prepared, store)
    assert rows(prepared.store_path) == first


def test_record_beside_runs_already_stored_writes_only_the_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # some of the runs exist already (as RunRecords, with a state of their own): record
    # writes the rest, each body beside its own state row
    prepared = prepared_in(tmp_path / "a", monkeypatch)
    other = prepared_in(tmp_path / "b", monkeypatch)
    h = "p" * 64
    some = [msgspec.structs.replace(r, state="SUCCEEDED") for r in run_records(prepared, h)]
    with RunStore(prepared.store_path) as store:
        store.put_experiment(prepared.experiment)
        store.put_runs(some[::3])
        record(prepared, store)
    with RunStore(other.store_path) as store:
        store.put_experiment(other.experiment)
        store.put_runs(some[::3])
        straightforward(other, store)
    mine, theirs = rows(prepared.store_path), rows(other.store_path)
    assert mine["runs"] == theirs["runs"] and mine["run_bodies"] == theirs["run_bodies"]
    with sqlite3.connect(prepared.store_path) as c:
        states = c.execute("SELECT state, count(*) FROM runs GROUP BY state ORDER BY state")
        assert states.fetchall() == [("PENDING", 17), ("SUCCEEDED", 9)]
