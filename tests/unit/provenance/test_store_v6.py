"""Schema version 6 of the run store: a run's steps of one batch in one events row, events
found by the run's rid, and the upgrade from version 5; the store actor's held batches."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stowplan.actors.store import StoreActor
from stowplan.actors.wire import pack, unpack
from stowplan.provenance.records import AttemptRecord, RunRecord, TransitionRecord
from stowplan.provenance.store import SCHEMA_VERSION, RunStore
from stowplan.provenance.store.schema import SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5
from tests.unit.provenance.test_store import experiment, intent, run, step


def test_a_version_5_store_is_upgraded_and_its_events_read_as_before(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    e = experiment()
    r, s = run(e, 0), run(e, 1)
    old = [
        step(r, "PENDING", "READY", 1.0),
        step(s, "PENDING", "READY", 1.5),
        step(r, "READY", "PLACED", 2.0, pool="campus/gpu"),
        step(r, "PLACED", "SUBMITTING", 3.0, attempt=1),
    ]
    # a store as stowplan with schema version 5 wrote it: one events row per step
    c = sqlite3.connect(db, isolation_level=None)
    for statement in (*SCHEMA_V2, *SCHEMA_V3, *SCHEMA_V4, *SCHEMA_V5):
        c.execute(statement)
    c.execute("PRAGMA user_version = 5")
    c.execute(
        "INSERT INTO experiments VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.id, e.name, e.project, e.description, e.file, "{}", e.created_at),
    )
    body = '{"params":{},"seed":7,"depends_on":[],"identity":{},"task_spec":{},"provenance":"p"}'
    for rid, x in ((1, r), (2, s)):
        c.execute(
            "INSERT INTO runs (rid, run_id, experiment_id, experiment, task, idx, replicate, "
            "state, attempts, failure, reason, pool, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, 'train', ?, 0, 'PENDING', 0, NULL, '', NULL, 1.0, 1.0)",
            (rid, x.run_id, e.id, e.name, x.index),
        )
        c.execute("INSERT INTO run_bodies (rid, body) VALUES (?, ?)", (rid, body))
    c.executemany(
        "INSERT INTO events (run_id, attempt, from_state, to_state, at, failure, reason, pool) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (t.run_id, t.attempt, t.from_state, t.to_state, t.at, t.failure, t.reason, t.pool)
            for t in old
        ],
    )
    c.close()

    with RunStore(db) as store:
        assert store.events_for(r.run_id) == [t for t in old if t.run_id == r.run_id]
        assert store.events_for(s.run_id) == [old[1]]
        new = [
            step(r, "SUBMITTING", "RUNNING", 4.0, attempt=1, pool="campus/gpu"),
            step(r, "RUNNING", "SUCCEEDED", 5.0, attempt=1, pool="campus/gpu"),
        ]
        store.apply_transitions(new)
        assert store.events_for(r.run_id) == [t for t in [*old, *new] if t.run_id == r.run_id]
        assert store.get_runs([r.run_id])[r.run_id].state == "SUCCEEDED"
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    # the old rows were given their run's rid; the index is the narrow one
    assert c.execute("SELECT count(*) FROM events WHERE rid IS NULL").fetchone()[0] == 0
    indexes = {row[1] for row in c.execute("PRAGMA index_list(events)")}
    assert "events_by_rid" in indexes and "events_by_run" not in indexes
    c.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "runs.db")
    yield s
    s.close()


def _runs(store: RunStore, n: int) -> list[RunRecord]:
    e = experiment()
    store.put_experiment(e)
    runs = [run(e, i) for i in range(n)]
    store.put_runs(runs)
    return runs


def test_a_runs_steps_of_one_batch_are_one_row(store: RunStore) -> None:
    [r] = _runs(store, 1)
    batch = [
        step(r, "PENDING", "READY", 1.0),
        step(r, "READY", "PLACED", 2.0, pool="a"),
        step(r, "PLACED", "SUBMITTING", 3.0, attempt=1, pool="a"),
    ]
    store.apply_transitions(batch)
    assert store.events_for(r.run_id) == batch
    c = sqlite3.connect(store.path)
    rows = c.execute("SELECT from_state, to_state, at, steps FROM events").fetchall()
    c.close()
    assert len(rows) == 1
    assert rows[0][:3] == ("PENDING", "SUBMITTING", 3.0)


def test_a_lost_step_ends_its_row_so_lost_rows_count_lost_steps(store: RunStore) -> None:
    [r] = _runs(store, 1)
    batch = [
        step(r, "PLACED", "SUBMITTING", 1.0, attempt=1, pool="a"),
        step(r, "SUBMITTING", "LOST", 2.0, attempt=1, reason="lease expired"),
        step(r, "LOST", "RUNNING", 3.0, attempt=1),
        step(r, "RUNNING", "LOST", 4.0, attempt=1, reason="lease expired"),
        # not where the one before ended: a row of its own
        step(r, "QUEUED", "FAILED", 5.0, attempt=1, failure="user_error", reason="exit 1"),
    ]
    store.apply_transitions(batch)
    assert store.events_for(r.run_id) == batch
    got = store.get_runs([r.run_id])[r.run_id]
    assert (got.state, got.failure, got.pool, got.attempts) == ("FAILED", "user_error", "a", 1)
    c = sqlite3.connect(store.path)
    # what the service's lease-expiry metric counts
    assert c.execute("SELECT count(*) FROM events WHERE to_state = 'LOST'").fetchone()[0] == 2
    assert c.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    c.close()


def _actor(tmp_path: Path, hold_s: float) -> tuple[StoreActor, list[RunRecord]]:
    actor = StoreActor(str(tmp_path / "runs.db"), hold_s=hold_s)
    return actor, _runs(actor.store, 2)


def _states(actor: StoreActor, runs: list[RunRecord]) -> list[str]:
    # straight from the file, as another process (the CLI) reads it
    with RunStore(actor.store.path) as reader:
        got = reader.get_runs([r.run_id for r in runs])
    return [got[r.run_id].state for r in runs]


def test_the_store_actor_writes_held_steps_with_the_next_batch(tmp_path: Path) -> None:
    actor, runs = _actor(tmp_path, hold_s=600.0)
    ready = [step(r, "PENDING", "READY", 1.0) for r in runs]
    actor.apply_transitions(pack(ready))
    assert _states(actor, runs) == ["PENDING", "PENDING"]  # held
    submit = [
        x
        for r in runs
        for x in (
            step(r, "READY", "PLACED", 2.0, pool="a"),
            step(r, "PLACED", "SUBMITTING", 3.0, attempt=1, pool="a"),
        )
    ]
    actor.apply_transitions(pack(submit))
    assert _states(actor, runs) == ["SUBMITTING", "SUBMITTING"]
    for r in runs:
        assert actor.store.events_for(r.run_id) == [
            t for t in [*ready, *submit] if t.run_id == r.run_id
        ]
    actor.store.close()


def test_the_store_actor_writes_held_steps_before_a_read_an_intent_or_a_ping(
    tmp_path: Path,
) -> None:
    actor, runs = _actor(tmp_path, hold_s=600.0)
    actor.apply_transitions(pack([step(runs[0], "PENDING", "READY", 1.0)]))
    assert actor.states([runs[0].run_id]) == {runs[0].run_id: "READY"}
    actor.apply_transitions(pack([step(runs[0], "READY", "PLACED", 2.0, pool="a")]))
    actor.write_intents(pack([intent(runs[0])]))
    assert _states(actor, runs)[0] == "PLACED"
    actor.apply_transitions(pack([step(runs[1], "PENDING", "READY", 3.0)]))
    assert actor.ping()
    assert _states(actor, runs) == ["PLACED", "READY"]
    got = unpack(actor.get_runs([runs[0].run_id]), dict[str, RunRecord])
    assert got[runs[0].run_id].state == "PLACED"
    actor.store.close()


def test_the_store_actor_writes_held_steps_alone_after_a_while(tmp_path: Path) -> None:
    actor, runs = _actor(tmp_path, hold_s=0.05)
    actor.apply_transitions(pack([step(r, "PENDING", "READY", 1.0) for r in runs]))
    deadline = time.monotonic() + 10.0
    while _states(actor, runs) != ["READY", "READY"]:
        assert time.monotonic() < deadline, "held steps never written"
        time.sleep(0.01)
    actor.store.close()


def test_a_held_batch_that_cannot_be_written_fails_the_next_call(tmp_path: Path) -> None:
    actor, runs = _actor(tmp_path, hold_s=600.0)
    ghost = run(experiment(), 99)  # never put
    actor.apply_transitions(pack([step(ghost, "PENDING", "READY", 1.0)]))
    with pytest.raises(sqlite3.IntegrityError, match="unknown run"):
        actor.apply_transitions(pack([step(runs[0], "PENDING", "CANCELLED", 2.0)]))
    assert _states(actor, runs) == ["PENDING", "PENDING"]  # the whole transaction rolled back
    actor.apply_transitions(pack([step(runs[0], "PENDING", "CANCELLED", 2.0)]))
    assert _states(actor, runs) == ["CANCELLED", "PENDING"]
    actor.store.close()


def test_transitions_of_the_store_actor_are_records(tmp_path: Path) -> None:
    # the wire type the queue sends is what the actor decodes
    actor, runs = _actor(tmp_path, hold_s=0.0)
    batch = [step(runs[0], "PENDING", "CANCELLED", 1.0)]
    assert unpack(pack(batch), list[TransitionRecord]) == batch
    actor.apply_transitions(pack(batch))  # hold_s=0: nothing is held
    assert _states(actor, runs)[0] == "CANCELLED"
    actor.store.close()


def test_one_batch_of_updates_mixes_stored_new_and_unknown_keys(
    store: RunStore, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = _runs(store, 2)
    first = intent(a)
    store.write_intents([first])
    new = intent(b)  # never written ahead: inserted whole, then updated in the same batch
    blank = intent(b, 2)  # a report naming only a key this store never saw: skipped
    store.update_attempts(
        [
            AttemptRecord(**{**_fields(first), "state": "RUNNING", "node": "n1"}),
            AttemptRecord(**{**_fields(new), "state": "QUEUED", "job_id": "7"}),
            AttemptRecord(key=blank.key, run_id="", attempt=0, provider="", pool="", state="X"),
            AttemptRecord(**{**_fields(new), "state": "RUNNING", "message": "started"}),
        ]
    )
    got = store.attempts_for([a.run_id, b.run_id])
    assert [(x.state, x.node) for x in got[a.run_id]] == [("RUNNING", "n1")]
    assert [(x.key, x.state, x.job_id, x.message) for x in got[b.run_id]] == [
        (new.key, "RUNNING", "7", "started")
    ]
    assert "1 attempt update(s) named keys this store never saw" in caplog.text


def _fields(a: AttemptRecord) -> dict[str, Any]:
    return {f: getattr(a, f) for f in a.__struct_fields__}
