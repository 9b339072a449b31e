"""Schema version 7 of the run store: placement decisions once per solve, the upgrade from
version 6, and the bulk writes of the control plane (a submit's intents alone, answers with
their runs' steps) with what a restarted queue reads back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from stowplan.actors.store import StoreActor
from stowplan.actors.wire import pack, unpack
from stowplan.provenance.records import (
    AttemptRecord,
    PlacementRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.provenance.store import SCHEMA_VERSION, RunStore
from stowplan.provenance.store.runs import (
    AttemptRow,
    Dispatch,
    IntentRow,
    SolveRow,
    Step,
    StepBatch,
)
from stowplan.provenance.store.schema import (
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_V4,
    SCHEMA_V5,
    SCHEMA_V6,
)
from stowplan.spec.canonical import attempt_key
from tests.unit.provenance.test_store import experiment, run, step

SOLVE = SolveRow(
    problem="ab" * 32,
    request_id=3,
    status="OPTIMAL",
    objective=12.5,
    bound=12.0,
    gap=0.04,
    assignments=[("cpu-x86", {"runtime": 2.0}), ("gpu-a100", {"runtime": 1.0, "usd": 0.5})],
)


def dispatch(runs: list[RunRecord], *, at: float = 20.0, solve: int = 0) -> Dispatch:
    return Dispatch(
        provider="campus",
        pool="gpu",
        at=at,
        attempts=[],
        steps=[],
        solves=[SOLVE] if solve >= 0 else [],
        intents=[
            IntentRow(attempt_key(r.run_id, 1), r.run_id, 1, solve, 1 if solve >= 0 else 0)
            for r in runs
        ],
    )


def _runs(store: RunStore, n: int) -> list[RunRecord]:
    e = experiment()
    store.put_experiment(e)
    runs = [run(e, i) for i in range(n)]
    store.put_runs(runs)
    return runs


def test_a_version_6_store_is_upgraded_and_keeps_its_placements(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    e = experiment()
    r, s = run(e, 0), run(e, 1)
    c = sqlite3.connect(db, isolation_level=None)
    for statement in (*SCHEMA_V2, *SCHEMA_V3, *SCHEMA_V4, *SCHEMA_V5, *SCHEMA_V6):
        c.execute(statement)
    c.execute("PRAGMA user_version = 6")
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
    # as version 6 recorded a decision: the whole of it in a row per run
    c.execute(
        "INSERT INTO placements VALUES (?, 1, 9, 'campus', 'cpu', 'cpu-x86', 'FEASIBLE', "
        "3.0, 2.0, 0.5, '{\"runtime\":3.0}', ?, 5.0)",
        (r.run_id, "cd" * 32),
    )
    c.close()

    with RunStore(db) as store:
        old = PlacementRecord(
            run_id=r.run_id,
            attempt=1,
            request_id=9,
            provider="campus",
            pool="cpu",
            hardware_class="cpu-x86",
            status="FEASIBLE",
            objective=3.0,
            bound=2.0,
            gap=0.5,
            terms={"runtime": 3.0},
            problem="cd" * 32,
            at=5.0,
        )
        assert store.placements_for(r.run_id) == [old]
        store.write_dispatch(dispatch([s]))
        [new] = store.placements_for(s.run_id)
        assert new == PlacementRecord(
            run_id=s.run_id,
            attempt=1,
            request_id=3,
            provider="campus",
            pool="gpu",
            hardware_class="gpu-a100",
            status="OPTIMAL",
            objective=12.5,
            bound=12.0,
            gap=0.04,
            terms={"runtime": 1.0, "usd": 0.5},
            problem=SOLVE.problem,
            at=20.0,
        )
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    # what the service's placement metric reads, over old and new decisions alike
    got = c.execute(
        "SELECT problem, max(at), max(gap), min(status) FROM placements GROUP BY problem "
        "ORDER BY problem"
    ).fetchall()
    assert got == [(SOLVE.problem, 20.0, 0.04, "OPTIMAL"), ("cd" * 32, 5.0, 0.5, "FEASIBLE")]
    c.close()


def test_a_solve_is_kept_once_however_many_runs_it_placed(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        runs = _runs(store, 6)
        store.write_dispatch(dispatch(runs[:3], at=20.0))
        store.write_dispatch(dispatch(runs[3:5], at=21.0))  # the same solve, sent again
        store.write_dispatch(dispatch(runs[5:], at=22.0, solve=-1))  # no decision known
        c = sqlite3.connect(store.path)
        assert c.execute("SELECT count(*) FROM solves").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM placements").fetchone()[0] == 5
        c.close()
        assert [p.at for r in runs[:5] for p in store.placements_for(r.run_id)] == [
            20.0,
            20.0,
            20.0,
            21.0,
            21.0,
        ]
        assert store.placements_for(runs[5].run_id) == []


def test_a_dispatch_writes_the_intents_and_leaves_the_runs_to_their_steps(
    tmp_path: Path,
) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        runs = _runs(store, 2)
        store.write_dispatch(dispatch(runs))
        got = store.get_runs([r.run_id for r in runs])
        assert [(got[r.run_id].state, got[r.run_id].attempts) for r in runs] == [
            ("PENDING", 0),
            ("PENDING", 0),
        ]
        # every attempt that may exist at a provider is listed for reconciliation
        assert sorted(a.key for a in store.active_attempts()) == sorted(
            attempt_key(r.run_id, 1) for r in runs
        )
        # written again after a restart: the intents are kept as they were
        store.write_dispatch(dispatch(runs, at=99.0))
        assert {a.intent_at for a in store.active_attempts()} == {20.0}


def test_answers_and_the_steps_of_their_runs_are_one_transaction(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        [r] = _runs(store, 1)
        store.write_dispatch(dispatch([r]))
        key = attempt_key(r.run_id, 1)
        answer = AttemptRow(key, r.run_id, 1, "campus", "gpu", "SUCCEEDED", "j1", exit_code=0)
        ghost = run(experiment(), 99)  # never put
        steps = [
            Step(r.run_id, 0, "PENDING", "READY", 1.0),
            Step(r.run_id, 1, "READY", "SUBMITTING", 2.0, pool="gpu"),
            Step(r.run_id, 1, "SUBMITTING", "SUCCEEDED", 3.0, pool="gpu"),
        ]
        with pytest.raises(sqlite3.IntegrityError, match="unknown run"):
            store.write_steps(
                StepBatch(attempts=[answer], steps=[*steps, Step(ghost.run_id, 0, "A", "B", 1)])
            )
        [a] = store.attempts_for([r.run_id])[r.run_id]
        assert a.state == "SUBMITTING"  # the answer rolled back with the steps
        store.write_steps(StepBatch(attempts=[answer], steps=steps))
        [a] = store.attempts_for([r.run_id])[r.run_id]
        assert (a.state, a.job_id, a.exit_code, a.intent_at) == ("SUCCEEDED", "j1", 0, 20.0)
        assert store.get_runs([r.run_id])[r.run_id].state == "SUCCEEDED"
        assert store.events_for(r.run_id) == [
            TransitionRecord(
                run_id=t.run_id,
                attempt=t.attempt,
                from_state=t.from_state,
                to_state=t.to_state,
                at=t.at,
                pool=t.pool,
            )
            for t in steps
        ]
        c = sqlite3.connect(store.path)
        assert c.execute("SELECT count(*) FROM events").fetchone()[0] == 1  # one row per run
        c.close()


def test_a_restarted_queue_finds_a_run_by_its_intent_when_its_steps_were_not_written(
    tmp_path: Path,
) -> None:
    actor = StoreActor(str(tmp_path / "runs.db"))
    runs = _runs(actor.store, 2)
    actor.write_dispatch(pack(dispatch(runs[:1])))
    # the other run's steps were written as usual before its intent
    actor.update_attempts(
        pack(
            StepBatch(
                attempts=[],
                steps=[Step(runs[1].run_id, 1, "PENDING", "SUBMITTING", 2.0, pool="gpu")],
            )
        )
    )
    actor.write_dispatch(pack(dispatch(runs[1:])))
    got, attempts, _ = unpack(
        actor.load_active(),
        tuple[list[RunRecord], dict[str, list[AttemptRecord]], list[str]],
    )
    by_id = {r.run_id: r for r in got}
    # as if its steps had been written: restored under its key, reconciled, never resubmitted
    for r in runs:
        assert (by_id[r.run_id].state, by_id[r.run_id].attempts) == ("SUBMITTING", 1)
        assert [a.key for a in attempts[r.run_id]] == [attempt_key(r.run_id, 1)]
    actor.store.close()


def test_bulk_rows_travel_as_arrays_without_field_names() -> None:
    r = run(experiment(), 0)
    record = step(r, "PLACED", "SUBMITTING", 3.0, attempt=1, pool="gpu")
    row = Step(r.run_id, 1, "PLACED", "SUBMITTING", 3.0, pool="gpu")
    assert unpack(pack([row]), list[Step]) == [row]
    assert len(pack(row)) < len(pack(record)) - 40
    # trailing defaults are left out
    assert len(pack(Step(r.run_id, 1, "A", "B", 1.0))) < len(pack(row))


def test_a_submission_reads_what_ran_before_and_its_budget_in_one_call(tmp_path: Path) -> None:
    actor = StoreActor(str(tmp_path / "runs.db"))
    runs = _runs(actor.store, 3)
    actor.store.apply_transitions(
        [
            step(runs[0], "PENDING", "SUCCEEDED", 1.0, attempt=1),
            step(runs[1], "PENDING", "FAILED", 1.0, attempt=2),
        ]
    )
    ghost = run(experiment(), 99)  # never put
    so_far, experiment_id, budget = unpack(
        actor.submitted([r.run_id for r in [*runs, ghost]]),
        tuple[dict[str, tuple[str, int]], str | None, None],
    )
    # a fresh run is left out: it starts at attempt 1
    assert so_far == {runs[0].run_id: ("SUCCEEDED", 1), runs[1].run_id: ("FAILED", 2)}
    assert (experiment_id, budget) == (runs[0].experiment_id, None)
    assert unpack(actor.budget_of([r.run_id for r in runs]), tuple[str, None]) == (
        runs[0].experiment_id,
        None,
    )
    actor.store.close()


def test_answers_written_with_steps_still_refuse_an_unknown_run(tmp_path: Path) -> None:
    # write_steps leaves SQLite's foreign key checks out and checks the runs itself
    with RunStore(tmp_path / "runs.db") as store:
        [r] = _runs(store, 1)
        ghost = run(experiment(), 99)  # never put
        answer = AttemptRow(attempt_key(ghost.run_id, 1), ghost.run_id, 1, "c", "p", "RUNNING")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            store.write_steps(StepBatch(attempts=[answer], steps=[]))
        # a key never stored of a stored run is inserted whole, as update_attempts does
        known = AttemptRow(attempt_key(r.run_id, 1), r.run_id, 1, "c", "p", "RUNNING")
        store.write_steps(StepBatch(attempts=[known], steps=[]))
        assert [a.state for a in store.attempts_for([r.run_id])[r.run_id]] == ["RUNNING"]
        c = sqlite3.connect(store.path)
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        c.close()
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # on again


def test_a_dispatch_refuses_the_intent_of_an_unknown_run_and_writes_nothing(
    tmp_path: Path,
) -> None:
    # write_dispatch leaves SQLite's foreign key checks out and checks the intents' runs itself
    with RunStore(tmp_path / "runs.db") as store:
        a, b = _runs(store, 2)
        store.write_dispatch(dispatch([a]))
        answer = AttemptRow(attempt_key(a.run_id, 1), a.run_id, 1, "campus", "gpu", "RUNNING")
        steps = [Step(a.run_id, 1, "PENDING", "SUBMITTING", 1.0, pool="gpu")]
        ghost = run(experiment(), 99)  # never put
        bad = dispatch([b, ghost])
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            store.write_dispatch(msgspec.structs.replace(bad, attempts=[answer], steps=steps))
        assert store.attempts_for([b.run_id, ghost.run_id]) == {}
        [got] = store.attempts_for([a.run_id])[a.run_id]
        assert got.state == "SUBMITTING"  # the answer rolled back with the intents
        assert store.events_for(a.run_id) == []
        store.write_dispatch(msgspec.structs.replace(dispatch([b]), attempts=[answer], steps=steps))
        assert [x.state for x in store.attempts_for([a.run_id])[a.run_id]] == ["RUNNING"]
        c = sqlite3.connect(store.path)
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        c.close()
