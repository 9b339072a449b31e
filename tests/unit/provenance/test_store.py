"""The SQLite run store, on real SQLite files in a temporary directory."""

from __future__ import annotations

import gc
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from stowplan.actors.store import StoreActor
from stowplan.errors import StowplanError
from stowplan.provenance.records import (
    AttemptRecord,
    ExperimentRecord,
    ProvenanceRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.provenance.store import SCHEMA_VERSION, ArtifactsNotStored, RunStore, database
from stowplan.spec.canonical import attempt_key, canonical_json, sha256_hex


def hexid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def experiment(name: str = "digits", at: float = 100.0, tag: str = "") -> ExperimentRecord:
    return ExperimentRecord(
        id=hexid(f"exp/{name}/{at}/{tag}"),
        name=name,
        project="vision-lab",
        description="does gamma matter?",
        file="exp.toml",
        spec={"experiment": {"name": name}, "tasks": [{"name": "train"}]},
        created_at=at,
    )


def run(
    exp: ExperimentRecord,
    index: int,
    *,
    task: str = "train",
    replicate: int = 0,
    run_id: str | None = None,
    at: float | None = None,
) -> RunRecord:
    rid = run_id or hexid(f"run/{exp.id}/{task}/{index}/{replicate}")
    return RunRecord(
        run_id=rid,
        experiment_id=exp.id,
        experiment=exp.name,
        task=task,
        index=index,
        params={"C": 0.1 * index, "gamma": 0.01, "kernel": "rbf", "shrink": True},
        seed=7 + index,
        replicate=replicate,
        depends_on=[hexid("upstream")] if task == "select" else [],
        identity={"params": {"C": 0.1 * index}, "seed": 7 + index, "code_version": "abc"},
        task_spec={"name": task, "command": ["python", "train.py", "--C", str(0.1 * index)]},
        provenance=hexid("prov"),
        created_at=exp.created_at if at is None else at,
        updated_at=exp.created_at if at is None else at,
    )


def intent(r: RunRecord, attempt: int = 1, state: str = "SUBMITTING") -> AttemptRecord:
    return AttemptRecord(
        key=attempt_key(r.run_id, attempt),
        run_id=r.run_id,
        attempt=attempt,
        provider="laptop",
        pool="local",
        state=state,
        intent_at=10.0 + attempt,
    )


def step(
    r: RunRecord, frm: str, to: str, at: float, attempt: int = 0, **kw: object
) -> TransitionRecord:
    return TransitionRecord(
        run_id=r.run_id,
        attempt=attempt,
        from_state=frm,
        to_state=to,
        at=at,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    s = RunStore(tmp_path / "state" / "runs.db")
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def exp(store: RunStore) -> ExperimentRecord:
    e = experiment()
    store.put_experiment(e)
    return e


# -- opening ---------------------------------------------------------------------------------


def test_opens_in_wal_mode_with_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "runs.db"
    with RunStore(path) as s:
        assert s.blob_dir == path.parent / "blobs" / "sha256"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "runs", "attempts", "events", "artifacts", "provenance"} <= tables
    conn.close()


def test_reopening_keeps_data(tmp_path: Path) -> None:
    e = experiment()
    with RunStore(tmp_path / "runs.db") as s:
        s.put_experiment(e)
        s.put_runs([run(e, 0)])
    with RunStore(tmp_path / "runs.db") as s:
        assert [r.index for r in s.runs_for_experiment(e.id)] == [0]


@pytest.mark.parametrize(("version", "says"), [(SCHEMA_VERSION + 1, "newer"), (1, "pre-release")])
def test_refuses_a_store_it_cannot_read(tmp_path: Path, version: int, says: str) -> None:
    path = tmp_path / "runs.db"
    RunStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    with pytest.raises(StowplanError, match=says):
        RunStore(path)


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "stowplan-store-checkpoint"]


def test_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    e = experiment()
    with RunStore(path) as s:
        s.put_experiment(e)
        empty = path.stat().st_size
        s.put_runs([run(e, i) for i in range(2000)])
        assert len(_checkpoint_threads()) == 1
        deadline = time.monotonic() + 20
        while path.stat().st_size <= empty and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size > empty  # the runs reached the database file
    assert _checkpoint_threads() == []


def _checkpointed(path: Path, empty: int, within: float) -> bool:
    """Whether the database file grows past ``empty`` (a checkpoint wrote it) ``within`` s."""
    deadline = time.monotonic() + within
    while path.stat().st_size <= empty and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.stat().st_size > empty


def test_a_burst_of_commits_is_checkpointed_once_it_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "_CHECKPOINT_LATEST", 60.0)
    path = tmp_path / "runs.db"
    e = experiment()
    with RunStore(path) as s:
        s.put_experiment(e)
        empty = path.stat().st_size
        burst_end = time.monotonic() + 2 * database._CHECKPOINT_QUIET
        i = 0
        while time.monotonic() < burst_end:  # commits without a pause
            s.put_runs([run(e, i)])
            i += 1
            time.sleep(0.02)
            assert path.stat().st_size == empty  # nothing copied while commits keep coming
        assert _checkpointed(path, empty, within=20)  # and copied once they pause
        assert s.run_states([run(e, 0).run_id, run(e, i - 1).run_id])


def test_a_long_burst_is_checkpointed_anyway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "_CHECKPOINT_LATEST", 0.5)
    path = tmp_path / "runs.db"
    e = experiment()
    with RunStore(path) as s:
        s.put_experiment(e)
        empty = path.stat().st_size
        deadline = time.monotonic() + 20
        i = 0
        while path.stat().st_size <= empty and time.monotonic() < deadline:
            s.put_runs([run(e, i)])  # commits that never pause
            i += 1
        assert path.stat().st_size > empty


def test_the_writer_bounds_the_wal_of_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "_CHECKPOINT_LATEST", 60.0)
    monkeypatch.setattr(database, "_CHECKPOINT_QUIET", 60.0)  # no background checkpoint
    monkeypatch.setattr(database, "_WAL_MAX", 1 << 20)
    monkeypatch.setattr(database, "_WAL_LIMIT", 64 << 10)
    path = tmp_path / "runs.db"
    wal = tmp_path / "runs.db-wal"
    e = experiment()
    with RunStore(path) as s:
        s.put_experiment(e)
        empty = path.stat().st_size
        s.put_runs([run(e, i) for i in range(2000)])  # a few MiB of WAL
        assert wal.stat().st_size > 1 << 20
        assert path.stat().st_size > empty  # copied by the writer before it returned
        s.put_runs([run(e, 2000)])
        assert wal.stat().st_size <= 128 << 10  # started over, truncated
        assert len(s.run_states([run(e, i).run_id for i in (0, 1999, 2000)])) == 3


def test_a_store_nobody_closed_stops_its_thread(tmp_path: Path) -> None:
    s = RunStore(tmp_path / "runs.db")
    s.put_experiment(experiment())
    (thread,) = _checkpoint_threads()
    del s
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


# -- experiments -----------------------------------------------------------------------------


def test_experiments_insert_or_ignore_and_lookups(store: RunStore) -> None:
    old = experiment("digits", at=1.0)
    new = experiment("digits", at=2.0)
    other = experiment("mnist", at=3.0)
    for e in (old, new, other, old):
        store.put_experiment(e)
    changed = ExperimentRecord(**{**_fields(old), "description": "rewritten"})
    store.put_experiment(changed)

    assert store.get_experiment(old.id) == old
    assert store.get_experiment(hexid("nope")) is None
    assert [e.name for e in store.list_experiments()] == ["mnist", "digits", "digits"]
    assert store.find_experiment("digits") == [new, old]
    assert store.find_experiment(other.id[:6]) == [other]
    assert store.find_experiment(other.id[:6].upper()) == [other]
    assert store.find_experiment(other.id[:3]) == []  # too short to be an id prefix
    assert store.find_experiment("nothing") == []


def _fields(rec: ExperimentRecord | RunRecord) -> dict[str, object]:
    return {f: getattr(rec, f) for f in rec.__struct_fields__}


# -- runs ------------------------------------------------------------------------------------


def test_runs_round_trip_every_field(store: RunStore, exp: ExperimentRecord) -> None:
    r = RunRecord(
        run_id=hexid("x"),
        experiment_id=exp.id,
        experiment=exp.name,
        task="select",
        index=3,
        params={"lr": 1e-3, "layers": [1, 2], "name": "é"},
        seed=11,
        replicate=2,
        depends_on=[hexid("a"), hexid("b")],
        identity={"nested": {"deep": [1, {"x": None}]}},
        task_spec={"name": "select", "env": {}},
        provenance=hexid("p"),
        state="QUEUED",
        attempts=2,
        failure="preempted",
        reason="spot reclaimed",
        pool="campus/gpu",
        created_at=5.5,
        updated_at=6.5,
    )
    store.put_runs([r])
    assert store.get_runs([r.run_id]) == {r.run_id: r}


def test_put_runs_keeps_an_existing_run_as_it_is(store: RunStore, exp: ExperimentRecord) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    store.apply_transitions([step(r, "PENDING", "READY", 200.0)])
    fresh = [run(exp, i) for i in range(1, 40)]
    # existing runs and new ones mixed, one new run sent twice with other content
    twice = RunRecord(**{**_fields(fresh[7]), "params": {"other": 1}})
    store.put_runs([*fresh[:20], r, *fresh[20:], twice])
    got = store.get_runs([r.run_id] + [f.run_id for f in fresh])
    assert got[r.run_id].state == "READY"
    assert got[r.run_id].params == r.params
    assert [got[f.run_id] for f in fresh] == fresh  # the first copy of a duplicate wins
    assert len(store.runs_for_experiment(exp.id)) == 40


def test_put_runs_needs_its_experiment(store: RunStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.put_runs([run(experiment("never-put"), 0)])


def test_get_runs_spans_sqlite_variable_limit(store: RunStore, exp: ExperimentRecord) -> None:
    runs = [run(exp, i) for i in range(2500)]
    store.put_runs(runs)
    ids = [r.run_id for r in runs] + [hexid("unknown")] + [runs[0].run_id]
    got = store.get_runs(ids)
    assert len(got) == 2500
    assert got[runs[1234].run_id] == runs[1234]


def test_experiment_ids_of_runs(store: RunStore) -> None:
    a, b = experiment("digits", at=1.0), experiment("digits", at=2.0)
    store.put_experiment(a)
    store.put_experiment(b)
    runs_a = [run(a, i) for i in range(1500)]
    store.put_runs([*runs_a, run(b, 0)])
    assert store.experiment_ids([r.run_id for r in runs_a]) == [a.id]
    ids = [runs_a[3].run_id, run(b, 0).run_id, hexid("unknown")]
    assert store.experiment_ids(ids) == sorted([a.id, b.id])
    assert store.experiment_ids([hexid("unknown")]) == []


def test_the_store_actor_gives_the_inputs_of_runs_experiments(tmp_path: Path) -> None:
    """What a long-lived queue hands its core with a submission (core doc: *Datasets*)."""
    from stowplan.actors.wire import unpack
    from stowplan.placement.problem import Dataset

    actor = StoreActor(str(tmp_path / "state" / "runs.db"))
    inputs = [
        {"uri": "s3://lab/corpus", "size": 2_000_000, "sites": ["west", "east"]},
        {"uri": "notes.md", "version": None, "size": None, "sites": [], "residency": "eu"},
    ]
    spec = {"experiment": {"name": "x"}, "tasks": [{"name": "t", "inputs": inputs}]}
    e = msgspec.structs.replace(experiment(), spec=spec)
    actor.store.put_experiment(e)
    r = run(e, 0)
    actor.store.put_runs([r])
    got = unpack(actor.datasets_of([r.run_id, hexid("unknown")]), list[Dataset])
    assert got == [
        Dataset(id="notes.md", size=0, sites=(), residency="eu"),
        Dataset(id="s3://lab/corpus", size=2_000_000, sites=("east", "west")),
    ]
    assert unpack(actor.datasets_of([hexid("unknown")]), list[Dataset]) == []
    actor.store.close()


def test_run_listings_and_order(store: RunStore) -> None:
    v1 = experiment("digits", at=1.0)
    v2 = experiment("digits", at=2.0)
    for e in (v1, v2):
        store.put_experiment(e)
    a = [run(v1, i) for i in (1, 0)]
    b = [run(v2, 0), run(v2, 0, replicate=1), run(v2, 0, task="select")]
    store.put_runs(a + b)

    assert [(r.task, r.index) for r in store.runs_for_experiment(v1.id)] == [
        ("train", 0),
        ("train", 1),
    ]
    by_name = store.runs_by_name("digits")
    assert [r.experiment_id for r in by_name] == [v2.id] * 3 + [v1.id] * 2
    assert [(r.task, r.replicate) for r in by_name[:3]] == [
        ("select", 0),
        ("train", 1),
        ("train", 0),
    ]
    assert store.runs_by_name("mnist") == []
    latest = store.latest_runs("digits", "train", 0)
    assert [(r.experiment_id, r.replicate) for r in latest] == [(v2.id, 1), (v2.id, 0), (v1.id, 0)]


def test_resolve_run_by_unique_prefix(store: RunStore, exp: ExperimentRecord) -> None:
    one = run(exp, 0, run_id="abcd1" + "0" * 59)
    two = run(exp, 1, run_id="abcd2" + "0" * 59)
    three = run(exp, 2, run_id="ffff" + "1" * 60)
    store.put_runs([one, two, three])

    assert store.resolve_run("abcd1") == one.run_id
    assert store.resolve_run("FFFF") == three.run_id
    assert store.resolve_run(two.run_id) == two.run_id
    with pytest.raises(ValueError, match="ambiguous") as amb:
        store.resolve_run("abcd")
    assert "abcd10000000" in str(amb.value)
    assert "abcd20000000" in str(amb.value)
    with pytest.raises(KeyError, match="1234"):
        store.resolve_run("1234")
    with pytest.raises(KeyError):
        store.resolve_run("abcd*")
    with pytest.raises(ValueError, match="too short"):
        store.resolve_run("abc")


# -- transitions -----------------------------------------------------------------------------


def test_apply_transitions_logs_all_and_keeps_the_last(
    store: RunStore, exp: ExperimentRecord
) -> None:
    r, s = run(exp, 0), run(exp, 1)
    store.put_runs([r, s])
    batch = [
        step(r, "PENDING", "READY", 1.0),
        step(s, "PENDING", "READY", 1.5),
        step(r, "READY", "PLACED", 2.0, pool="campus/gpu"),
        step(r, "PLACED", "SUBMITTING", 3.0, attempt=1),
        step(r, "SUBMITTING", "RETRYING", 4.0, attempt=1, failure="preempted", reason="spot"),
        step(r, "RETRYING", "READY", 5.0, attempt=0),
    ]
    store.apply_transitions(batch)

    got = store.get_runs([r.run_id, s.run_id])
    assert got[r.run_id].state == "READY"
    assert got[r.run_id].attempts == 1  # the largest attempt seen, not the last one
    assert got[r.run_id].pool == "campus/gpu"  # kept: the last transition has no pool
    assert got[r.run_id].failure is None
    assert got[r.run_id].updated_at == 5.0
    assert got[s.run_id].state == "READY"
    assert store.events_for(r.run_id) == [t for t in batch if t.run_id == r.run_id]

    store.apply_transitions(
        [step(r, "READY", "FAILED", 6.0, failure="user_error", reason="exit 1")]
    )
    final = store.get_runs([r.run_id])[r.run_id]
    assert (final.state, final.failure, final.reason, final.attempts) == (
        "FAILED",
        "user_error",
        "exit 1",
        1,
    )
    assert len(store.events_for(r.run_id)) == 6
    store.apply_transitions([])


def test_a_late_transition_does_not_bring_a_cancelled_run_back(
    store: RunStore, exp: ExperimentRecord
) -> None:
    # an offline cancel, then a control plane that outlived its driver reports what it did
    r = run(exp, 0)
    store.put_runs([r])
    store.apply_transitions([step(r, "PENDING", "CANCELLED", 1.0, reason="cancelled by user")])
    store.apply_transitions([step(r, "PLACED", "SUBMITTING", 2.0, attempt=1, pool="local")])
    assert store.get_runs([r.run_id])[r.run_id].state == "CANCELLED"
    # submitted afresh (a later `stowplan run`), it moves again
    store.apply_transitions([step(r, "PENDING", "READY", 3.0)])
    assert store.get_runs([r.run_id])[r.run_id].state == "READY"


def test_a_bad_transition_batch_changes_nothing(store: RunStore, exp: ExperimentRecord) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    ghost = run(exp, 99)  # never put
    with pytest.raises(sqlite3.IntegrityError):
        store.apply_transitions(
            [step(r, "PENDING", "READY", 1.0), step(ghost, "PENDING", "READY", 1.0)]
        )
    assert store.events_for(r.run_id) == []
    assert store.get_runs([r.run_id])[r.run_id].state == "PENDING"


# -- attempts --------------------------------------------------------------------------------


def test_write_intents_is_idempotent(store: RunStore, exp: ExperimentRecord) -> None:
    runs = [run(exp, i) for i in range(3)]
    store.put_runs(runs)
    intents = [intent(r) for r in runs]
    store.write_intents(intents)
    store.update_attempts([AttemptRecord(**{**_attempt_fields(intents[0]), "state": "RUNNING"})])
    store.write_intents(intents)  # re-sent after a crash

    got = store.attempts_for([r.run_id for r in runs])
    assert {k: len(v) for k, v in got.items()} == {r.run_id: 1 for r in runs}
    assert got[runs[0].run_id][0].state == "RUNNING"  # not rolled back to SUBMITTING
    assert got[runs[1].run_id] == [intents[1]]


def _attempt_fields(a: AttemptRecord) -> dict[str, object]:
    return {f: getattr(a, f) for f in a.__struct_fields__}


def test_update_attempts_keeps_what_the_update_does_not_know(
    store: RunStore, exp: ExperimentRecord
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    first = intent(r)
    store.write_intents([first])
    base = _attempt_fields(first)
    store.update_attempts(
        [
            AttemptRecord(**{**base, "state": "QUEUED", "job_id": "4242", "message": "queued"}),
            AttemptRecord(**{**base, "state": "RUNNING", "node": "gpu07", "started_at": 20.0}),
        ]
    )
    store.update_attempts(
        [AttemptRecord(**{**base, "state": "SUCCEEDED", "exit_code": 0, "ended_at": 30.0})]
    )
    (got,) = store.attempts_for([r.run_id])[r.run_id]
    assert got == AttemptRecord(
        **{
            **base,
            "state": "SUCCEEDED",
            "job_id": "4242",
            "node": "gpu07",
            "exit_code": 0,
            "message": "queued",
            "started_at": 20.0,
            "ended_at": 30.0,
        }
    )

    # an update for an attempt never written ahead is inserted whole
    second = AttemptRecord(**{**_attempt_fields(intent(r, 2)), "state": "UNKNOWN"})
    store.update_attempts([second])
    assert [a.attempt for a in store.attempts_for([r.run_id])[r.run_id]] == [1, 2]


def test_updates_that_give_different_fields_in_one_batch(
    store: RunStore, exp: ExperimentRecord
) -> None:
    # one statement per set of fields given (runs._update_stored): each keeps what it lacks
    runs = [run(exp, i) for i in range(4)]
    store.put_runs(runs)
    intents = [intent(r) for r in runs]
    store.write_intents(intents)
    base = [_attempt_fields(i) for i in intents]
    store.update_attempts(
        [
            AttemptRecord(**{**b, "state": "QUEUED", "job_id": f"j{n}", "message": "queued"})
            for n, b in enumerate(base)
        ]
    )
    changes: list[dict[str, object]] = [
        {"state": "RUNNING", "node": "n0", "started_at": 20.0},
        {"state": "SUCCEEDED", "exit_code": 0, "ended_at": 30.0, "message": "done"},
        {"state": "FAILED", "failure": "NODE_FAILURE", "devices": "0,1", "usd": 1.5},
        {"state": "RUNNING"},
    ]
    store.update_attempts(
        [AttemptRecord(**{**b, **ch}) for b, ch in zip(base, changes, strict=True)][::-1]
    )
    got = store.attempts_for([r.run_id for r in runs])
    for n, (r, b, ch) in enumerate(zip(runs, base, changes, strict=True)):
        kept = {"job_id": f"j{n}", "message": "queued"}
        assert got[r.run_id] == [AttemptRecord(**{**b, **kept, **ch})]


def test_update_attempts_by_key_alone(
    store: RunStore, exp: ExperimentRecord, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider report knows only the key: run, attempt, pool may come blank."""
    r = run(exp, 0)
    store.put_runs([r])
    first = intent(r)
    store.write_intents([first])
    report = AttemptRecord(
        key=first.key, run_id="", attempt=0, provider="laptop", pool="", state="RUNNING"
    )
    stray = AttemptRecord(
        key=attempt_key(r.run_id, 9),
        run_id="",
        attempt=0,
        provider="laptop",
        pool="",
        state="QUEUED",
    )
    store.update_attempts([report, stray])
    (got,) = store.attempts_for([r.run_id])[r.run_id]
    assert got == AttemptRecord(**{**_attempt_fields(first), "state": "RUNNING"})
    assert "1 attempt update(s)" in caplog.text


def test_active_attempts_and_runs(store: RunStore, exp: ExperimentRecord) -> None:
    runs = [run(exp, i) for i in range(5)]
    store.put_runs(runs)
    store.write_intents([intent(r) for r in runs])
    a = [intent(r) for r in runs]
    store.update_attempts(
        [
            AttemptRecord(**{**_attempt_fields(a[1]), "state": "QUEUED"}),
            AttemptRecord(**{**_attempt_fields(a[2]), "state": "FAILED"}),
            AttemptRecord(**{**_attempt_fields(a[3]), "state": "UNKNOWN"}),
        ]
    )
    # run 4's attempt still says SUBMITTING, but the run itself was cancelled
    store.apply_transitions([step(runs[4], "SUBMITTING", "CANCELLED", 9.0, attempt=1)])

    active = store.active_attempts()
    assert sorted((x.run_id, x.state) for x in active) == sorted(
        [(runs[0].run_id, "SUBMITTING"), (runs[1].run_id, "QUEUED"), (runs[3].run_id, "UNKNOWN")]
    )
    assert {r.run_id for r in store.active_runs()} == {r.run_id for r in runs[:4]}


def test_attempts_for_sorts_by_attempt(store: RunStore, exp: ExperimentRecord) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    store.write_intents([intent(r, 3), intent(r, 1), intent(r, 2)])
    assert [a.attempt for a in store.attempts_for([r.run_id])[r.run_id]] == [1, 2, 3]
    assert store.attempts_for([hexid("none")]) == {}


# -- blobs and artifacts ---------------------------------------------------------------------


def test_blobs_are_content_addressed(store: RunStore) -> None:
    data = b"diff --git a/x b/x\n"
    sha = store.put_blob(data)
    assert sha == hashlib.sha256(data).hexdigest()
    path = store.blob_path(sha)
    assert path == store.blob_dir / sha[:2] / sha[2:]
    assert path.read_bytes() == data
    assert store.put_blob(data) == sha
    assert store.get_blob(sha) == data
    assert [p.name for p in path.parent.iterdir()] == [sha[2:]]  # no temporary files left
    with pytest.raises(KeyError):
        store.get_blob(hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ValueError):
        store.blob_path("../../etc/passwd")


def test_put_file_streams_large_files(store: RunStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    src.write_bytes(data)
    sha, size, path = store.put_file(src)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert path.read_bytes() == data
    assert store.put_file(src) == (sha, size, path)
    assert sorted(p.name for p in store.blob_dir.iterdir()) == [sha[:2]]


def test_artifacts(store: RunStore, exp: ExperimentRecord, tmp_path: Path) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    (tmp_path / "metrics.json").write_text('{"acc": 0.97}')
    (tmp_path / "model.bin").write_bytes(b"\x00weights")
    outputs = {"model": str(tmp_path / "model.bin"), "metrics": str(tmp_path / "metrics.json")}
    recs = store.put_artifacts(r.run_id, outputs)
    assert [a.name for a in recs] == ["metrics", "model"]
    assert recs[0].sha256 == sha256_hex(b'{"acc": 0.97}')
    assert recs[0].size == 13
    assert Path(recs[0].path).read_bytes() == b'{"acc": 0.97}'
    assert Path(recs[0].path).is_relative_to(store.blob_dir)

    assert store.put_artifacts(r.run_id, outputs) == recs
    assert store.artifacts_for([r.run_id, hexid("none")]) == {r.run_id: recs}

    (tmp_path / "metrics.json").write_text('{"acc": 0.98}')
    again = store.put_artifacts(r.run_id, {"metrics": str(tmp_path / "metrics.json")})
    assert store.artifacts_for([r.run_id])[r.run_id] == [again[0], recs[1]]


def test_a_missing_artifact_is_named_and_the_others_are_stored(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ArtifactsNotStored) as caught:
        store.put_artifacts(r.run_id, {"a": str(tmp_path / "a.txt"), "b": str(tmp_path / "nope")})
    assert caught.value.failed == [f"b: {tmp_path / 'nope'} does not exist"]
    assert isinstance(caught.value, StowplanError)
    assert "1 output not stored (1 stored)" in str(caught.value)
    assert [a.name for a in store.artifacts_for([r.run_id])[r.run_id]] == ["a"]
    assert caught.value.stored == store.artifacts_for([r.run_id])[r.run_id]


def attempt_dir(tmp_path: Path) -> Path:
    """An attempt directory as a task leaves it: a tree, a file, and links in and out."""
    d = tmp_path / "attempt"
    (d / "d" / "sub").mkdir(parents=True)
    (d / "d" / "a.txt").write_text("a")
    (d / "d" / "x").write_text("x")
    (d / "d" / "sub" / "b.txt").write_text("b")
    (tmp_path / "hostname").write_text("not the task's")
    (d / "out.txt").symlink_to(tmp_path / "hostname")
    (d / "in.txt").symlink_to("d/a.txt")
    return d


def test_a_directory_is_stored_as_one_artifact_per_file(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    d = attempt_dir(tmp_path)
    recs = store.put_artifacts(
        r.run_id, {"d/x": str(d / "d" / "x"), "d/": str(d / "d"), "in.txt": str(d / "in.txt")}
    )
    assert [(a.name, Path(a.path).read_text()) for a in recs] == [
        ("d/a.txt", "a"),
        ("d/sub/b.txt", "b"),
        ("d/x", "x"),
        ("in.txt", "a"),  # a link inside: its content
    ]
    assert store.artifacts_for([r.run_id])[r.run_id] == recs
    assert store.latest_artifact_named("d/sub/b.txt") == recs[1].sha256
    # a directory under another name keeps that name as its prefix
    again = store.put_artifacts(r.run_id, {"tree": str(d / "d" / "sub")})
    assert [a.name for a in again] == ["tree/b.txt"]


def test_links_out_and_fifos_are_refused_and_the_rest_stored(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    d = attempt_dir(tmp_path)
    os.mkfifo(d / "d" / "pipe")  # reading it would block the store forever
    (d / "d" / "leak").symlink_to(tmp_path / "hostname")
    with pytest.raises(ArtifactsNotStored) as caught:
        store.put_artifacts(r.run_id, {"out.txt": str(d / "out.txt"), "d": str(d / "d")})
    real = Path(os.path.realpath(tmp_path))
    assert caught.value.failed == [
        f"d/leak: leads to {real / 'hostname'}, outside the attempt directory",
        "d/pipe: is a FIFO, not a regular file or a directory",
        f"out.txt: leads to {real / 'hostname'}, outside the attempt directory",
    ]
    names = [a.name for a in store.artifacts_for([r.run_id])[r.run_id]]
    assert names == ["d/a.txt", "d/sub/b.txt", "d/x"]
    assert store.runs_producing(sha256_hex(b"not the task's")) == []


def test_the_store_actor_stores_every_run_it_can_and_names_the_rest(
    tmp_path: Path,
) -> None:
    actor = StoreActor(str(tmp_path / "state" / "runs.db"))
    e = experiment()
    actor.store.put_experiment(e)
    good, bad = run(e, 0), run(e, 1)
    actor.store.put_runs([good, bad])
    d = attempt_dir(tmp_path)
    outputs = {
        bad.run_id: {"d/x": str(d / "d" / "x"), "out.txt": str(d / "out.txt")},
        good.run_id: {"d/": str(d / "d")},
    }
    assert actor.store_outputs(outputs) == {
        bad.run_id: f"run {bad.run_id[:12]}: 1 output not stored (1 stored): out.txt: leads to "
        f"{Path(os.path.realpath(tmp_path)) / 'hostname'}, outside the attempt directory"
    }
    stored = actor.store.artifacts_for([good.run_id, bad.run_id])
    assert [a.name for a in stored[good.run_id]] == ["d/a.txt", "d/sub/b.txt", "d/x"]
    assert [a.name for a in stored[bad.run_id]] == ["d/x"]
    # a run the store cannot record at all (no such run) is named too, and the others go on
    failed = actor.store_outputs({"0" * 64: {"d/x": str(d / "d" / "x")}, **outputs})
    assert sorted(failed) == sorted(["0" * 64, bad.run_id])
    actor.store.close()


# -- provenance ------------------------------------------------------------------------------


def test_provenance_by_content_hash(store: RunStore) -> None:
    rec = ProvenanceRecord(
        code={"commit": "abc", "dirty": False},
        environment={"env_hash": "e" * 64, "distributions": ["msgspec==0.22.0"]},
        hardware={"gpus": [{"name": "NVIDIA H200"}]},
    )
    h = store.put_provenance(rec)
    assert h == sha256_hex(canonical_json(rec))
    assert store.put_provenance(rec) == h
    assert store.get_provenance(h) == rec
    with pytest.raises(KeyError):
        store.get_provenance("0" * 64)


# -- concurrency -----------------------------------------------------------------------------

READER = """
import sys
from stowplan.provenance.store import RunStore
with RunStore(sys.argv[1]) as s:
    print(len(s.active_runs()), s.resolve_run(sys.argv[2]))
"""


def test_reader_in_another_process_sees_committed_state(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    e = experiment()
    with RunStore(path) as s:
        s.put_experiment(e)
        s.put_runs([run(e, 0)])
        # A writer mid-transaction (uncommitted rows) must neither block nor leak to readers.
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE runs SET state = 'SUCCEEDED' WHERE run_id = ?", (run(e, 0).run_id,))
        out = subprocess.run(
            [sys.executable, "-c", READER, str(path), run(e, 0).run_id[:8]],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        writer.execute("ROLLBACK")
        writer.close()
    assert out.stdout.split() == ["1", run(e, 0).run_id]


def test_threads_share_one_store(store: RunStore, exp: ExperimentRecord) -> None:
    def put(start: int) -> None:
        for i in range(start, start + 50, 10):
            store.put_runs([run(exp, j) for j in range(i, i + 10)])

    threads = [threading.Thread(target=put, args=(k * 50,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.runs_for_experiment(exp.id)) == 200


def test_state_counts_group_each_experiments_runs_by_state(store: RunStore) -> None:
    a, b, empty = experiment("a", at=1.0), experiment("b", at=2.0), experiment("c", at=3.0)
    for e in (a, b, empty):
        store.put_experiment(e)
    runs_a = [run(a, i) for i in range(5)]
    store.put_runs([*runs_a, run(b, 0)])
    store.apply_transitions([step(r, "PENDING", "READY", 10.0) for r in runs_a[:3]])
    store.apply_transitions([step(runs_a[0], "READY", "CANCELLED", 11.0)])
    got = store.state_counts([a.id, b.id, empty.id, hexid("nope")])
    assert got == {
        a.id: {"CANCELLED": 1, "READY": 2, "PENDING": 2},
        b.id: {"PENDING": 1},
    }
