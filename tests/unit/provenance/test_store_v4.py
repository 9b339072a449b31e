"""Schema version 4 of the run store: what each attempt imported, and the upgrade from 3."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from stowplan.provenance.imports import InterpreterUse, UsedRecord
from stowplan.provenance.records import AttemptRecord
from stowplan.provenance.store import SCHEMA_VERSION, RunStore
from stowplan.provenance.store.schema import SCHEMA_V2, SCHEMA_V3
from stowplan.spec.canonical import attempt_key, sha256_hex
from tests.unit.provenance.test_store import experiment, intent, run

USED = msgspec.json.encode(
    UsedRecord(
        interpreters=[
            InterpreterUse(
                executable="/venv/bin/python",
                implementation="cpython",
                python="3.11.9",
                distributions={"numpy": "1.26.4", "scipy": "1.13.0"},
                path=["/work", "/venv/lib/python3.11/site-packages"],
            )
        ]
    )
)


def done(a: AttemptRecord, used: str | None) -> AttemptRecord:
    """What the queue records when the provider reports ``a`` succeeded (key only, plus used)."""
    return AttemptRecord(
        key=a.key, run_id="", attempt=0, provider="", pool="", state="SUCCEEDED", used=used
    )


def test_a_version_3_store_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    # a store as stowplan with schema version 3 wrote it: its statements, its columns
    c = sqlite3.connect(db, isolation_level=None)
    for statement in (*SCHEMA_V2, *SCHEMA_V3):
        c.execute(statement)
    c.execute("PRAGMA user_version = 3")
    e = experiment()
    r = run(e, 0)
    c.execute(
        "INSERT INTO experiments VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.id, e.name, e.project, e.description, e.file, "{}", e.created_at),
    )
    c.execute(
        "INSERT INTO runs (rid, run_id, experiment_id, experiment, task, idx, replicate, state, "
        "attempts, failure, reason, pool, created_at, updated_at) "
        "VALUES (1, ?, ?, ?, 'train', 0, 0, 'SUCCEEDED', 1, NULL, '', 'local', 1.0, 2.0)",
        (r.run_id, e.id, e.name),
    )
    body = '{"params":{},"seed":7,"depends_on":[],"identity":{},"task_spec":{},"provenance":"p"}'
    c.execute("INSERT INTO run_bodies (rid, body) VALUES (1, ?)", (body,))
    c.execute(
        "INSERT INTO attempts (key, run_id, attempt, provider, pool, state, job_id, node, "
        "exit_code, failure, message, intent_at, started_at, ended_at) "
        "VALUES (?, ?, 1, 'laptop', 'local', 'SUCCEEDED', '42', 'host', 0, NULL, '', 1.0, "
        "1.5, 2.0)",
        (attempt_key(r.run_id, 1), r.run_id),
    )
    c.close()

    with RunStore(db) as store:
        [old] = store.attempts_for([r.run_id])[r.run_id]
        assert (old.state, old.exit_code, old.used) == ("SUCCEEDED", 0, None)
        [h] = store.put_used([USED])
        store.update_attempts([done(old, h)])
        [now] = store.attempts_for([r.run_id])[r.run_id]
        assert now.used == h and now.job_id == "42"
        assert store.get_used([h]) == {h: USED}
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    c.close()
    with RunStore(db) as again:  # opening an upgraded store again changes nothing
        assert again.attempts_for([r.run_id])[r.run_id] == [now]


def test_each_distinct_import_record_is_kept_once(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        e = experiment()
        store.put_experiment(e)
        runs = [run(e, i) for i in range(500)]
        store.put_runs(runs)
        intents = [intent(r) for r in runs]
        store.write_intents(intents)
        other = USED.replace(b"1.26.4", b"2.0.0")
        hashes = store.put_used([USED, other, USED])
        assert hashes == [sha256_hex(USED), sha256_hex(other), sha256_hex(USED)]
        store.update_attempts(
            [done(a, hashes[1] if i == 0 else hashes[0]) for i, a in enumerate(intents)]
        )
        # a later report without a record (a renewal) keeps the one recorded
        store.update_attempts([done(intents[1], None)])
        got = store.attempts_for([r.run_id for r in runs])
        assert got[runs[0].run_id][0].used == hashes[1]
        assert {got[r.run_id][0].used for r in runs[1:]} == {hashes[0]}
        assert store.get_used([hashes[0], hashes[1], "0" * 64]) == {
            hashes[0]: USED,
            hashes[1]: other,
        }
    c = sqlite3.connect(tmp_path / "runs.db")
    assert c.execute("SELECT count(*) FROM used").fetchone()[0] == 2
    # each attempt row holds the hash (64 characters), never the record
    assert c.execute("SELECT max(length(used)) FROM attempts").fetchone()[0] == 64
    c.close()
