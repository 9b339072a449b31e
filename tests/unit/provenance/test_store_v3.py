"""Schema version 3 of the run store: placements, replays, and the upgrade from version 2."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from stowplan.provenance.records import PlacementRecord, ReplayRecord
from stowplan.provenance.store import SCHEMA_VERSION, RunStore
from stowplan.provenance.store.schema import SCHEMA_V2
from tests.unit.provenance.test_store import experiment, run


def placement(run_id: str, attempt: int, pool: str = "gpu-a") -> PlacementRecord:
    return PlacementRecord(
        run_id=run_id,
        attempt=attempt,
        request_id=7,
        provider="campus",
        pool=pool,
        hardware_class="H100-80GB",
        status="OPTIMAL",
        objective=12.5,
        bound=12.5,
        gap=0.0,
        terms={"cost": 10.0, "wait": 2.5},
        problem="ab" * 32,
        at=100.0 + attempt,
    )


def test_placements_round_trip_by_attempt(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        e = experiment()
        store.put_experiment(e)
        r = run(e, 0)
        store.put_runs([r])
        store.put_placements([placement(r.run_id, 2, "gpu-b"), placement(r.run_id, 1)])
        # the same attempt again keeps the first decision
        store.put_placements([placement(r.run_id, 1, "elsewhere")])
        got = store.placements_for(r.run_id)
        assert [(p.attempt, p.pool) for p in got] == [(1, "gpu-a"), (2, "gpu-b")]
        assert got[0] == placement(r.run_id, 1)
        assert store.placements_for("f" * 64) == []
        with pytest.raises(sqlite3.IntegrityError):
            store.put_placements([placement("e" * 64, 1)])


def test_replays_link_both_ways(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        e = experiment()
        store.put_experiment(e)
        a, b = run(e, 0), run(e, 0, replicate=1)
        store.put_runs([a, b])
        store.put_replay(ReplayRecord(run_id=b.run_id, of_run_id=a.run_id, at=5.0))
        store.put_replay(
            ReplayRecord(
                run_id=b.run_id,
                of_run_id=a.run_id,
                at=5.0,
                verdict="DIFFERS",
                differences=["metrics.json"],
            )
        )
        (rec,) = store.replays_of(a.run_id)
        assert rec.verdict == "DIFFERS" and rec.differences == ["metrics.json"]
        assert store.replay_source(b.run_id) == rec
        assert store.replay_source(a.run_id) is None


def test_a_version_2_store_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    c = sqlite3.connect(db, isolation_level=None)
    for statement in SCHEMA_V2:
        c.execute(statement)
    c.execute("PRAGMA user_version = 2")
    e = experiment()
    c.execute(
        "INSERT INTO experiments VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.id, e.name, e.project, e.description, e.file, "{}", e.created_at),
    )
    c.close()
    with RunStore(db) as store:
        assert [x.id for x in store.list_experiments()] == [e.id]
        store.append_ledger(who="a", action="submit", target=e.id, why="")
        assert len(store.ledger()) == 1
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    c.close()
