"""Experiments, runs, their transitions and attempts: the records the control plane writes.

The layout (a run's state row apart from its body, batches in dispatch order, one events row
per run per batch, import records kept once by hash) is explained in the package docstring.
"""

from __future__ import annotations

import functools
import logging
import operator
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec

from stowplan.provenance.records import (
    AttemptRecord,
    ExperimentRecord,
    NewRunRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.provenance.store.database import HEX, Database, json_text, rows_in
from stowplan.scheduler.states import FINAL
from stowplan.spec.canonical import sha256_hex

__all__ = [
    "ACTIVE_ATTEMPT_STATES",
    "MIN_PREFIX",
    "AttemptRow",
    "Dispatch",
    "IntentRow",
    "RunTables",
    "SolveRow",
    "Step",
    "StepBatch",
]

log = logging.getLogger(__name__)

ACTIVE_ATTEMPT_STATES: Final = ("SUBMITTING", "QUEUED", "RUNNING", "UNKNOWN")
"""Attempt states in which a job may still exist at its provider."""

MIN_PREFIX: Final = 4
"""Shortest run id prefix :meth:`RunTables.resolve_run` accepts."""

_STATE_COLUMNS: Final = (
    "run_id, experiment_id, experiment, task, idx, replicate, state, attempts, failure, reason, "
    "pool, created_at, updated_at"
)
_RUN_SELECT: Final = (
    "SELECT r.run_id, r.experiment_id, r.experiment, r.task, r.idx, r.replicate, r.state, "
    "r.attempts, r.failure, r.reason, r.pool, r.created_at, r.updated_at, b.body "
    "FROM runs AS r JOIN run_bodies AS b ON b.rid = r.rid"
)
_ATTEMPT_COLUMNS: Final = (
    "key, run_id, attempt, provider, pool, state, job_id, node, exit_code, failure, message, "
    "intent_at, started_at, ended_at, used, instance_type, market, billed_s, usd, devices"
)
_EXPERIMENT_COLUMNS: Final = "id, name, project, description, file, spec, created_at"

_TERMINAL_SQL: Final = ", ".join(f"'{s}'" for s in sorted(FINAL))
_ACTIVE_SQL: Final = ", ".join(f"'{s}'" for s in ACTIVE_ATTEMPT_STATES)

_encoder = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_by_run_id: Final = operator.attrgetter("run_id")


class Step(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """A ``TransitionRecord`` as an array, fields in the same order: how the control plane
    hands steps over in bulk (10^5 at a time), without every field's name in every record.

    ``gc=False`` (as ``AttemptRow`` and ``IntentRow``): the queue keeps 10^5 of them, made
    with the states' enums (objects the collector tracks), and text, numbers and enums can
    never lead back to a struct, so none can be part of a reference cycle
    (``tests/unit/actors/test_gc_light.py`` checks the field types)."""

    run_id: str
    attempt: int
    from_state: str
    to_state: str
    at: float
    failure: str | None = None
    reason: str = ""
    pool: str | None = None


class AttemptRow(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """An ``AttemptRecord`` as an array, fields in the same order (see :class:`Step`)."""

    key: str
    run_id: str
    attempt: int
    provider: str
    pool: str
    state: str
    job_id: str | None = None
    node: str | None = None
    exit_code: int | None = None
    failure: str | None = None
    message: str = ""
    intent_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    used: str | None = None
    instance_type: str | None = None
    market: str | None = None
    billed_s: float | None = None
    usd: float | None = None
    devices: str | None = None


class IntentRow(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """One attempt about to be submitted, in a :class:`Dispatch` (which says where and when).
    ``solve`` indexes ``Dispatch.solves`` (-1: no placement decision is recorded with it) and
    ``assignment`` that solution's assignments."""

    key: str
    run_id: str
    attempt: int
    solve: int = -1
    assignment: int = 0
    node: str | None = None
    """in a pool that knows its devices: the node the core leased (``DeviceLease.node``)."""
    devices: str | None = None
    """and the device indices there (``AttemptRecord.devices``); None elsewhere."""


class SolveRow(msgspec.Struct, frozen=True, kw_only=True):
    """What every run placed by one solve shares (``schema.SCHEMA_V7``)."""

    problem: str
    """SHA-256 of the blob holding the encoded problem and solution."""
    request_id: int
    status: str
    objective: float
    bound: float
    gap: float
    assignments: list[tuple[str, dict[str, float]]]
    """per assignment, in the solution's order: its pool's hardware class and a run's share
    of each objective term."""


class Dispatch(msgspec.Struct, frozen=True, kw_only=True):
    """One submit's write-ahead record (:meth:`RunTables.write_dispatch`): provider answers
    that came before it, the steps of its runs still unwritten, the solves that placed them,
    and the intents, all on one pool."""

    provider: str
    pool: str
    at: float
    attempts: list[AttemptRow]
    steps: list[Step]
    solves: list[SolveRow]
    intents: list[IntentRow]


class StepBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Provider answers and steps written together (:meth:`RunTables.write_steps`)."""

    attempts: list[AttemptRow]
    steps: list[Step]


class _RunBody(msgspec.Struct, kw_only=True):
    """The part of a run that never changes after it is put: one JSON column, one encode."""

    params: dict[str, Any]
    seed: int
    depends_on: list[str]
    identity: dict[str, Any]
    task_spec: dict[str, Any]
    provenance: str


_body_decoder = msgspec.json.Decoder(_RunBody)


# attrgetter builds the row tuples in C: per-row Python calls were a fifth of put_runs.
_state_row: Final = operator.attrgetter(
    "run_id",
    "experiment_id",
    "experiment",
    "task",
    "index",
    "replicate",
    "state",
    "attempts",
    "failure",
    "reason",
    "pool",
    "created_at",
    "updated_at",
)


class _RunBodyOut(msgspec.Struct):
    """``_RunBody`` as it is written, the same fields in the same order, from a ``RunRecord``
    or a ``NewRunRecord``: a Struct among its values encodes as its builtins would."""

    params: dict[str, Any]
    seed: int
    depends_on: list[str]
    identity: Any
    task_spec: Any
    provenance: str


def _body_row(rid: int, r: RunRecord | NewRunRecord) -> tuple[int, str]:
    body = _RunBodyOut(r.params, r.seed, r.depends_on, r.identity, r.task_spec, r.provenance)
    return rid, _encoder.encode(body).decode()


def _run_from_row(row: Sequence[Any]) -> RunRecord:
    body = _body_decoder.decode(row[13])
    return RunRecord(
        run_id=row[0],
        experiment_id=row[1],
        experiment=row[2],
        task=row[3],
        index=row[4],
        replicate=row[5],
        state=row[6],
        attempts=row[7],
        failure=row[8],
        reason=row[9],
        pool=row[10],
        created_at=row[11],
        updated_at=row[12],
        params=body.params,
        seed=body.seed,
        depends_on=body.depends_on,
        identity=body.identity,
        task_spec=body.task_spec,
        provenance=body.provenance,
    )


_attempt_row: Final = operator.attrgetter(
    "key",
    "run_id",
    "attempt",
    "provider",
    "pool",
    "state",
    "job_id",
    "node",
    "exit_code",
    "failure",
    "message",
    "intent_at",
    "started_at",
    "ended_at",
    "used",
    "instance_type",
    "market",
    "billed_s",
    "usd",
    "devices",
)
_by_key: Final = operator.attrgetter("key")


# ?1..?20 are an attempt row (``_attempt_row``): what an update of a stored key changes
_ATTEMPT_CHANGES: Final = (
    "state = ?6, job_id = coalesce(?7, job_id), node = coalesce(?8, node), "
    "exit_code = coalesce(?9, exit_code), failure = coalesce(?10, failure), "
    "message = CASE WHEN ?11 = '' THEN message ELSE ?11 END, "
    "started_at = coalesce(?13, started_at), ended_at = coalesce(?14, ended_at), "
    "used = coalesce(?15, used), instance_type = coalesce(?16, instance_type), "
    "market = coalesce(?17, market), billed_s = coalesce(?18, billed_s), "
    "usd = coalesce(?19, usd), devices = coalesce(?20, devices)"
)
_UPDATE_ATTEMPT: Final = f"UPDATE attempts SET {_ATTEMPT_CHANGES} WHERE key = ?1"
_SETTABLE: Final = tuple(
    (i, name) for i, name in enumerate(_ATTEMPT_COLUMNS.split(", ")) if i >= 6 and i != 11
)
"""what ``_ATTEMPT_CHANGES`` sets when the update gives it (not None; ``message``: not
empty), by index in an attempt row"""
_NONES: Final = (None,) * len(_ATTEMPT_COLUMNS.split(", "))


@functools.cache
def _narrow_update(given: tuple[bool, ...], no_message: bool) -> tuple[str, Any]:
    """The UPDATE of a stored key for rows that give the fields ``given`` says (``given[i]``:
    row ``i`` is not None), and a getter of its parameters from a row: what ``_UPDATE_ATTEMPT``
    does for them, with only the columns that change."""
    cols = [(i, n) for i, n in _SETTABLE if given[i] and not (i == 10 and no_message)]
    sets = "".join(f", {n} = ?" for _, n in cols)
    return (
        f"UPDATE attempts SET state = ?{sets} WHERE key = ?",
        operator.itemgetter(5, *(i for i, _ in cols), 0),
    )


def _update_stored(c: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    """Apply attempt rows (sorted by key) to the stored keys; how many rows changed one.

    Rows that give the same fields go in one statement that sets only those (an instant or
    Slurm answer gives 6 of the 14): fewer parameters to bind and no ``coalesce`` per column.
    That reorders updates of different keys only; a batch with a key twice (rare) goes in one
    statement, in order."""
    if len({r[0] for r in rows}) < len(rows):
        return int(c.executemany(_UPDATE_ATTEMPT, rows).rowcount)
    groups: dict[tuple[tuple[bool, ...], bool], list[tuple[Any, ...]]] = {}
    is_not = operator.is_not
    for r in rows:
        shape = (tuple(map(is_not, r, _NONES)), r[10] == "")
        group = groups.get(shape)
        if group is None:
            groups[shape] = [r]
        else:
            group.append(r)
    changed = 0
    for (given, no_message), group in groups.items():
        sql, params = _narrow_update(given, no_message)
        changed += c.executemany(sql, map(params, group)).rowcount
    return changed


_UPSERT_ATTEMPT: Final = (
    # the WHERE drops blank-run updates of unknown keys
    f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) "
    "SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, "
    "?20 "
    "WHERE ?2 != '' OR EXISTS (SELECT 1 FROM attempts WHERE key = ?1) "
    f"ON CONFLICT (key) DO UPDATE SET {_ATTEMPT_CHANGES}"
)


def _attempt_from_row(row: Sequence[Any]) -> AttemptRecord:
    return AttemptRecord(
        key=row[0],
        run_id=row[1],
        attempt=row[2],
        provider=row[3],
        pool=row[4],
        state=row[5],
        job_id=row[6],
        node=row[7],
        exit_code=row[8],
        failure=row[9],
        message=row[10],
        intent_at=row[11],
        started_at=row[12],
        ended_at=row[13],
        used=row[14],
        instance_type=row[15],
        market=row[16],
        billed_s=row[17],
        usd=row[18],
        devices=row[19],
    )


_event_row: Final = operator.attrgetter(
    "run_id", "attempt", "from_state", "to_state", "at", "failure", "reason", "pool"
)
_step_fields: Final = operator.attrgetter("attempt", "to_state", "at", "failure", "reason", "pool")
_to_state: Final = operator.attrgetter("to_state")
_from_state: Final = operator.attrgetter("from_state")
_steps_decoder = msgspec.json.Decoder(list[tuple[int, str, float, str | None, str, str | None]])

CHAIN_BREAK: Final = "LOST"
"""A step to this state ends its events row (see ``schema.SCHEMA_V6``)."""


def _chain_row(
    rid: int, steps: Sequence[TransitionRecord | Step], start: int, end: int
) -> tuple[Any, ...]:
    """The events row of ``steps[start:end]``, one stretch: its last step, from where the
    first began, with the earlier ones as JSON (None when there are none)."""
    last = steps[end - 1]
    earlier = (
        json_text(list(map(_step_fields, steps[start : end - 1]))) if end - 1 > start else None
    )
    return (
        rid,
        last.run_id,
        last.attempt,
        steps[start].from_state,
        last.to_state,
        last.at,
        last.failure,
        last.reason,
        last.pool,
        earlier,
    )


def _chain_rows(
    rid: int, steps: Sequence[TransitionRecord | Step], out: list[tuple[Any, ...]]
) -> None:
    """Append the events rows of run ``rid``'s steps (in order) to ``out``: a row per stretch
    of steps that each start where the one before ended, cut after a step to LOST."""
    tos = list(map(_to_state, steps))
    if tos[:-1] == list(map(_from_state, steps[1:])) and CHAIN_BREAK not in tos[:-1]:
        # one stretch (almost every run: its steps from PENDING to its end), built in C
        out.append(_chain_row(rid, steps, 0, len(steps)))
        return
    start = 0
    for i in range(1, len(steps) + 1):
        if i < len(steps):
            prev = steps[i - 1].to_state
            if steps[i].from_state == prev and prev != CHAIN_BREAK:
                continue
        out.append(_chain_row(rid, steps, start, i))
        start = i


def _apply_steps(c: sqlite3.Connection, ts: Sequence[TransitionRecord | Step]) -> None:
    """``RunTables.apply_transitions`` inside the caller's write transaction."""
    if not ts:
        return
    by_run: dict[str, list[TransitionRecord | Step]] = {}
    for t in ts:
        steps = by_run.get(t.run_id)
        if steps is None:
            by_run[t.run_id] = [t]
        else:
            steps.append(t)
    sql = "SELECT rid, run_id FROM runs WHERE run_id IN ({})"
    rids = sorted(rows_in(c, sql, sorted(by_run)))
    if len(rids) < len(by_run):
        known = {run_id for _, run_id in rids}
        unknown = sorted(r for r in by_run if r not in known)
        raise sqlite3.IntegrityError(
            f"FOREIGN KEY constraint failed: transitions of {len(unknown)} unknown "
            f"run(s), {', '.join(r[:12] for r in unknown[:3])}"
        )
    events: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    # by rid, the order the runs were put in: neighbouring rows, written in order
    for rid, run_id in rids:
        steps = by_run[run_id]
        last = steps[-1]
        if len(steps) == 1:
            events.append((rid, *_event_row(last), None))
            top, pool = last.attempt, last.pool
        else:
            _chain_rows(rid, steps, events)
            top = max(t.attempt for t in steps)
            pool = next((t.pool for t in reversed(steps) if t.pool is not None), None)
        updates.append(
            (
                last.to_state,
                top,
                last.failure,
                last.reason,
                pool,
                last.at,
                rid,
                steps[0].from_state,
            )
        )
    c.executemany(
        "INSERT INTO events (rid, run_id, attempt, from_state, to_state, at, failure, "
        "reason, pool, steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        events,
    )
    c.executemany(
        # a cancelled run leaves CANCELLED only by being submitted afresh (PENDING): a
        # late transition from a control plane that died after an offline cancel must
        # not bring it back
        "UPDATE runs SET state = ?, attempts = max(attempts, ?), failure = ?, "
        "reason = ?, pool = coalesce(?, pool), updated_at = ? WHERE rid = ? "
        "AND (state != 'CANCELLED' OR ? IN ('PENDING', 'CANCELLED'))",
        updates,
    )


def _update_attempts(c: sqlite3.Connection, updates: Sequence[AttemptRecord | AttemptRow]) -> None:
    """``RunTables.update_attempts`` inside the caller's write transaction."""
    if not updates:
        return
    rows = list(map(_attempt_row, sorted(updates, key=_by_key)))
    # almost every update is of a stored key: a plain UPDATE by key, and the upsert
    # (which also checks the run's foreign key) only for the keys not stored
    changed = _update_stored(c, rows)
    if changed < len(rows):
        sql = "SELECT key FROM attempts WHERE key IN ({})"
        stored = {k for (k,) in rows_in(c, sql, sorted({r[0] for r in rows}))}
        new = [r for r in rows if r[0] not in stored]
        # the run's foreign key, checked here too for a write that leaves SQLite's out
        named = sorted({r[1] for r in new if r[1]})
        known = {k for (k,) in rows_in(c, "SELECT run_id FROM runs WHERE run_id IN ({})", named)}
        if len(known) < len(named):
            raise sqlite3.IntegrityError(
                f"FOREIGN KEY constraint failed: attempts of {len(named) - len(known)} "
                "unknown run(s)"
            )
        changed += c.executemany(_UPSERT_ATTEMPT, new).rowcount
    if changed < len(updates):
        log.warning(
            "%d attempt update(s) named keys this store never saw; skipped",
            len(updates) - changed,
        )


def _check_runs(c: sqlite3.Connection, run_ids: Sequence[str], what: str) -> None:
    """Raise ``sqlite3.IntegrityError`` (as SQLite's foreign key check) unless every one of
    ``run_ids`` (sorted) names a stored run."""
    wanted = list(dict.fromkeys(run_ids))
    sql = "SELECT count(*) FROM runs WHERE run_id IN ({})"
    known = sum(n for (n,) in rows_in(c, sql, wanted))
    if known < len(wanted):
        raise sqlite3.IntegrityError(
            f"FOREIGN KEY constraint failed: {what} of {len(wanted) - known} unknown run(s)"
        )


_INSERT_INTENT: Final = (
    "INSERT OR IGNORE INTO attempts (key, run_id, attempt, provider, pool, state, message, "
    "intent_at, solve, assignment, node, devices) "
    "VALUES (?, ?, ?, ?, ?, 'SUBMITTING', '', ?, ?, ?, ?, ?)"
)


def _insert_solves(c: sqlite3.Connection, solves: Sequence[SolveRow]) -> list[int]:
    """Insert the solves not stored yet (by their blob's hash); their row ids, in order."""
    if not solves:
        return []
    c.executemany(
        "INSERT OR IGNORE INTO solves (problem, request_id, status, objective, bound, gap, "
        "assignments) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                s.problem,
                s.request_id,
                s.status,
                s.objective,
                s.bound,
                s.gap,
                json_text(s.assignments),
            )
            for s in solves
        ],
    )
    ids = dict(
        rows_in(
            c, "SELECT problem, id FROM solves WHERE problem IN ({})", [s.problem for s in solves]
        )
    )
    return [int(ids[s.problem]) for s in solves]


def _experiment_from_row(row: Sequence[Any]) -> ExperimentRecord:
    return ExperimentRecord(
        id=row[0],
        name=row[1],
        project=row[2],
        description=row[3],
        file=row[4],
        spec=_dict_decoder.decode(row[5]),
        created_at=row[6],
    )


class RunTables(Database):
    """Reads and writes of experiments, runs, events, attempts and import records."""

    # -- experiments -----------------------------------------------------------------------

    def put_experiment(self, rec: ExperimentRecord) -> None:
        """Insert an experiment; one with the same id (same spec hash) is kept as is."""
        with self._write() as c:
            c.execute(
                f"INSERT OR IGNORE INTO experiments ({_EXPERIMENT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.name,
                    rec.project,
                    rec.description,
                    rec.file,
                    json_text(rec.spec),
                    rec.created_at,
                ),
            )

    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        with self._read() as c:
            row = c.execute(
                f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?", (experiment_id,)
            ).fetchone()
        return None if row is None else _experiment_from_row(row)

    def list_experiments(self) -> list[ExperimentRecord]:
        """All experiments, newest first."""
        with self._read() as c:
            rows = c.execute(
                f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments ORDER BY created_at DESC, id"
            ).fetchall()
        return [_experiment_from_row(r) for r in rows]

    def find_experiment(self, name_or_id_prefix: str) -> list[ExperimentRecord]:
        """Experiments named exactly ``name_or_id_prefix`` or whose id starts with it.

        Newest first. An id prefix counts only from :data:`MIN_PREFIX` hex characters on, so a
        short name is never mistaken for a prefix.
        """
        key = name_or_id_prefix
        prefix = key.lower()
        by_id = len(prefix) >= MIN_PREFIX and HEX.fullmatch(prefix) is not None
        with self._read() as c:
            rows = c.execute(
                f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments "
                "WHERE name = ? OR (? AND id GLOB ?) ORDER BY created_at DESC, id",
                (key, by_id, prefix + "*"),
            ).fetchall()
        return [_experiment_from_row(r) for r in rows]

    # -- runs ------------------------------------------------------------------------------

    def put_runs(self, recs: Sequence[RunRecord | NewRunRecord]) -> None:
        """Insert runs; an existing run (same id) is kept as it is, state included.

        Rows go in the order given, which should be the order they will be dispatched in (a
        sweep's, by trial): the control plane moves them in slices of that order, and a slice
        of neighbouring rows rewrites a few pages, where one spread by run id rewrites them all.
        """
        ordered = list(recs)
        if not ordered:
            return
        with self._write() as c:
            # SQLite numbers new rows max(rid) + 1 on, in insertion order, so the state row and
            # its body share a rid.
            base = int(c.execute("SELECT coalesce(max(rid), 0) + 1 FROM runs").fetchone()[0])
            inserted = c.executemany(
                f"INSERT OR IGNORE INTO runs ({_STATE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                map(_state_row, ordered),
            ).rowcount
            if inserted == 0:
                return
            bodies: Iterable[tuple[int, str]]
            if inserted == len(ordered):
                bodies = (_body_row(base + i, r) for i, r in enumerate(ordered))
            else:  # some existed already (or came twice): bodies only for the rows inserted
                rid = dict(
                    c.execute("SELECT run_id, rid FROM runs WHERE rid >= ?", (base,)).fetchall()
                )
                bodies = (_body_row(rid.pop(r.run_id), r) for r in ordered if r.run_id in rid)
            c.executemany("INSERT INTO run_bodies (rid, body) VALUES (?, ?)", bodies)

    def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        """The runs among ``run_ids`` that exist, by id; unknown ids are left out."""
        out: dict[str, RunRecord] = {}
        ids = sorted(set(run_ids))
        with self._read() as c:
            for row in rows_in(c, f"{_RUN_SELECT} WHERE r.run_id IN ({{}})", ids):
                out[row[0]] = _run_from_row(row)
        return out

    def experiment_ids(self, run_ids: Sequence[str]) -> list[str]:
        """The experiments the stored runs among ``run_ids`` belong to, sorted: a narrow read
        (no run bodies) for 10^5 runs at a time."""
        with self._read() as c:
            sql = "SELECT DISTINCT experiment_id FROM runs WHERE run_id IN ({})"
            return sorted({row[0] for row in rows_in(c, sql, sorted(set(run_ids)))})

    def run_states(self, run_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """``(state, attempts)`` of the runs among ``run_ids`` that exist: the narrow read
        the control plane makes for 10^5 runs at a time, without decoding run bodies."""
        out: dict[str, tuple[str, int]] = {}
        ids = sorted(set(run_ids))
        with self._read() as c:
            sql = "SELECT run_id, state, attempts FROM runs WHERE run_id IN ({})"
            for run_id, state, attempts in rows_in(c, sql, ids):
                out[run_id] = (state, attempts)
        return out

    def submission_states(
        self, run_ids: Sequence[str]
    ) -> tuple[dict[str, tuple[str, int]], list[str]]:
        """For a submission of ``run_ids``, in one narrow read: ``(state, attempts)`` of each
        stored run that already had an attempt or succeeded (the rest are fresh), and the
        experiments the stored ones belong to, sorted."""
        out: dict[str, tuple[str, int]] = {}
        experiments: set[str] = set()
        with self._read() as c:
            sql = "SELECT run_id, state, attempts, experiment_id FROM runs WHERE run_id IN ({})"
            for run_id, state, attempts, experiment_id in rows_in(c, sql, sorted(set(run_ids))):
                experiments.add(experiment_id)
                if attempts > 0 or state == "SUCCEEDED":
                    out[run_id] = (state, attempts)
        return out, sorted(experiments)

    def runs_for_experiment(self, experiment_id: str) -> list[RunRecord]:
        """Runs of one experiment by task name, trial index and replicate."""
        with self._read() as c:
            rows = c.execute(
                f"{_RUN_SELECT} WHERE r.experiment_id = ? "
                "ORDER BY r.task, r.idx, r.replicate, r.run_id",
                (experiment_id,),
            ).fetchall()
        return [_run_from_row(r) for r in rows]

    def runs_by_name(self, experiment_name: str) -> list[RunRecord]:
        """All runs of every experiment called ``experiment_name``, newest first.

        Runs created together come by task, index and newest replicate first.
        """
        with self._read() as c:
            rows = c.execute(
                f"{_RUN_SELECT} WHERE r.experiment_id IN "
                "(SELECT id FROM experiments WHERE name = ?) "
                "ORDER BY r.created_at DESC, r.task, r.idx, r.replicate DESC, r.run_id",
                (experiment_name,),
            ).fetchall()
        return [_run_from_row(r) for r in rows]

    def latest_runs(self, experiment_name: str, task: str, index: int) -> list[RunRecord]:
        """Every replicate of one trial (across versions of the experiment), highest first.

        Reads through the experiment's runs: meant for one trial at a time (the CLI, a rerun),
        not for a loop over a sweep; use :meth:`runs_by_name` for that.
        """
        with self._read() as c:
            rows = c.execute(
                f"{_RUN_SELECT} WHERE r.experiment_id IN "
                "(SELECT id FROM experiments WHERE name = ?) AND r.task = ? AND r.idx = ? "
                "ORDER BY r.replicate DESC, r.created_at DESC, r.run_id",
                (experiment_name, task, index),
            ).fetchall()
        return [_run_from_row(r) for r in rows]

    def all_runs(self) -> list[RunRecord]:
        """Every run, oldest first: what queries over all provenance scan."""
        with self._read() as c:
            rows = c.execute(f"{_RUN_SELECT} ORDER BY r.created_at, r.run_id").fetchall()
        return [_run_from_row(r) for r in rows]

    def active_runs(self) -> list[RunRecord]:
        """Runs not in a terminal state (SUCCEEDED, FAILED, CANCELLED), by run id."""
        with self._read() as c:
            rows = c.execute(
                f"{_RUN_SELECT} WHERE r.state NOT IN ({_TERMINAL_SQL}) ORDER BY r.run_id"
            ).fetchall()
        return [_run_from_row(r) for r in rows]

    def resolve_run(self, prefix: str) -> str:
        """The one run id starting with ``prefix`` (like git's abbreviated hashes).

        Raises ``ValueError`` for a prefix shorter than :data:`MIN_PREFIX` or one that matches
        several runs (the message lists them), ``KeyError`` when no run matches.
        """
        p = prefix.strip().lower()
        if len(p) < MIN_PREFIX:
            raise ValueError(
                f"run id prefix {prefix!r} is too short: give at least {MIN_PREFIX} characters"
            )
        if HEX.fullmatch(p) is None:
            raise KeyError(f"no run id starts with {prefix!r} (run ids are hexadecimal)")
        with self._read() as c:
            rows = c.execute(
                "SELECT run_id FROM runs WHERE run_id GLOB ? ORDER BY run_id LIMIT 11",
                (p + "*",),
            ).fetchall()
        if not rows:
            raise KeyError(f"no run id starts with {prefix!r}")
        if len(rows) > 1:
            shown = ", ".join(r[0][:12] for r in rows[:10])
            more = " and more" if len(rows) > 10 else ""
            raise ValueError(
                f"run id prefix {prefix!r} is ambiguous: it matches {shown}{more}; "
                "give more characters"
            )
        return str(rows[0][0])

    def apply_transitions(self, ts: Sequence[TransitionRecord | Step]) -> None:
        """Log every transition in the events table and move each run to its last one.

        For each run, ``state``, ``failure``, ``reason`` and ``updated_at`` come from its last
        transition in the batch, ``pool`` from the last one that names a pool (a transition
        without one keeps the pool), and ``attempts`` becomes the largest attempt number seen.
        A transition of an unknown run violates a foreign key (``sqlite3.IntegrityError``) and
        the whole batch is rolled back.

        A run's transitions in the batch, in the order given, go into one events row while
        each starts where the one before ended (see ``schema.SCHEMA_V6``): a run's three steps
        to its submit cost one row, not three, and :meth:`events_for` gives them back one by
        one. Rows and updates go by ``rid``, the order the runs were put in (see
        :meth:`put_runs`), so a batch writes neighbouring rows and index entries. Runs are found
        by id once per batch, and a transition of an unknown run raises before anything is
        written.
        """
        if not ts:
            return
        with self._write() as c:
            _apply_steps(c, ts)

    def events_for(self, run_id: str) -> list[TransitionRecord]:
        """A run's transitions in the order they were applied, one per step."""
        with self._read() as c:
            rows = c.execute(
                "SELECT run_id, attempt, from_state, to_state, at, failure, reason, pool, steps "
                "FROM events WHERE rid = (SELECT rid FROM runs WHERE run_id = ?) ORDER BY seq",
                (run_id,),
            ).fetchall()
        out: list[TransitionRecord] = []
        for r in rows:
            frm = r[2]
            if r[8] is not None:
                for attempt, to, at, failure, reason, pool in _steps_decoder.decode(r[8]):
                    out.append(
                        TransitionRecord(
                            run_id=r[0],
                            attempt=attempt,
                            from_state=frm,
                            to_state=to,
                            at=at,
                            failure=failure,
                            reason=reason,
                            pool=pool,
                        )
                    )
                    frm = to
            out.append(
                TransitionRecord(
                    run_id=r[0],
                    attempt=r[1],
                    from_state=frm,
                    to_state=r[3],
                    at=r[4],
                    failure=r[5],
                    reason=r[6],
                    pool=r[7],
                )
            )
        return out

    # -- attempts --------------------------------------------------------------------------

    def write_intents(self, intents: Sequence[AttemptRecord]) -> None:
        """Record attempts about to be submitted; call before the submit, never after.

        An intent already written (same key, or same run and attempt number) is left as it is,
        so re-sending a batch after a crash neither duplicates it nor rolls its state back.
        """
        # Sorting by a str key allocates nothing the garbage collector tracks: a tuple key per
        # record made sorting 10^5 intents slower than inserting them, next to a large heap.
        rows = map(_attempt_row, sorted(intents, key=_by_run_id))
        with self._write() as c:
            c.executemany(
                f"INSERT OR IGNORE INTO attempts ({_ATTEMPT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def update_attempts(self, updates: Sequence[AttemptRecord | AttemptRow]) -> None:
        """Upsert attempts by key with what the provider reported, in the order given.

        For a stored key, ``state`` takes the new value; ``job_id``, ``node``, ``devices``,
        ``exit_code``, ``failure``, ``started_at``, ``ended_at``, ``used`` and the cost
        (``instance_type``, ``market``, ``billed_s``, ``usd``) keep their stored value when the
        update has None, and ``message`` when the update's is empty. ``run_id``, ``attempt``,
        ``provider``, ``pool`` and ``intent_at`` come from the intent and never change, so an
        update may leave them blank (a provider report knows only the key).

        A key never stored is inserted whole if its ``run_id`` names a stored run, and skipped
        (logged) if its ``run_id`` is blank: a report for an attempt this store never saw.
        """
        if not updates:
            return
        with self._write() as c:
            _update_attempts(c, updates)

    def write_dispatch(self, d: Dispatch) -> None:
        """Write one submit ahead of it, in one transaction: the answers before it (as
        :meth:`update_attempts`), the steps of its runs not yet written (as
        :meth:`apply_transitions`), the solves that placed them, and its intents
        (as :meth:`write_intents`, each naming its solve and assignment when it has one).
        Call before the submit, never after; writing the same dispatch again changes nothing
        but the steps."""
        # SQLite's foreign key checks left out, as in write_steps: the steps' runs and the
        # answers' are checked as they are written, the solves were just found, and the
        # intents' runs are checked below (each events row cost two probes otherwise)
        with self._write(foreign_keys=False) as c:
            _update_attempts(c, d.attempts)
            _apply_steps(c, d.steps)
            ids = _insert_solves(c, d.solves)
            rows = sorted(d.intents, key=_by_run_id)
            _check_runs(c, [i.run_id for i in rows], "intents")
            c.executemany(
                _INSERT_INTENT,
                [
                    (
                        i.key,
                        i.run_id,
                        i.attempt,
                        d.provider,
                        d.pool,
                        d.at,
                        ids[i.solve] if i.solve >= 0 else None,
                        i.assignment if i.solve >= 0 else None,
                        i.node,
                        i.devices,
                    )
                    for i in rows
                ],
            )

    def write_steps(self, batch: StepBatch) -> None:
        """Provider answers (as :meth:`update_attempts`), then steps (as
        :meth:`apply_transitions`), in one transaction."""
        if not batch.attempts and not batch.steps:
            return
        # the steps' runs are looked up (an unknown one raises) and answers of unknown keys
        # checked (``_update_attempts``): SQLite's own checks would only repeat that
        with self._write(foreign_keys=False) as c:
            _update_attempts(c, batch.attempts)
            _apply_steps(c, batch.steps)

    def attempts_for(self, run_ids: Sequence[str]) -> dict[str, list[AttemptRecord]]:
        """Attempts of each run (by attempt number); runs without attempts are left out."""
        out: dict[str, list[AttemptRecord]] = {}
        ids = list(dict.fromkeys(run_ids))
        with self._read() as c:
            sql = (
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE run_id IN ({{}}) "
                "ORDER BY run_id, attempt"
            )
            for row in rows_in(c, sql, ids):
                out.setdefault(row[1], []).append(_attempt_from_row(row))
        return out

    def active_attempts(self) -> list[AttemptRecord]:
        """Attempts that may still exist at a provider: what reconciliation must look up.

        Those in SUBMITTING, QUEUED, RUNNING or UNKNOWN whose run is not terminal.
        """
        with self._read() as c:
            rows = c.execute(
                f"SELECT {', '.join('a.' + n for n in _ATTEMPT_COLUMNS.split(', '))} "
                "FROM attempts AS a JOIN runs AS r ON r.run_id = a.run_id "
                f"WHERE a.state IN ({_ACTIVE_SQL}) AND r.state NOT IN ({_TERMINAL_SQL}) "
                "ORDER BY a.intent_at, a.key"
            ).fetchall()
        return [_attempt_from_row(r) for r in rows]

    def attempts_on(self, provider: str, job_ids: Iterable[str]) -> list[AttemptRecord]:
        """Every attempt of ``provider`` whose job id is one of ``job_ids`` (for a cloud
        provider, its instance): the attempts billed together (``prices.bill``), by key."""
        with self._read() as c:
            sql = (
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE provider = ? "
                "AND job_id IN ({}) ORDER BY key"
            )
            out: list[AttemptRecord] = []
            for ids in _chunks(sorted(set(job_ids)), 500):
                q = sql.replace("({})", "(" + ", ".join("?" * len(ids)) + ")")
                out.extend(_attempt_from_row(r) for r in c.execute(q, (provider, *ids)))
        return sorted(out, key=_by_key)

    def job_ids(self, provider: str, keys: Sequence[str]) -> list[str]:
        """The job ids (instances) of ``provider``'s attempts among ``keys`` that have one."""
        with self._read() as c:
            sql = "SELECT key, provider, job_id FROM attempts WHERE key IN ({})"
            found = {
                str(job)
                for _, prov, job in rows_in(c, sql, sorted(set(keys)))
                if prov == provider and job
            }
        return sorted(found)

    def state_counts(self, experiment_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Each experiment's runs counted by state, in one grouped query (``ls`` over 10^5
        runs must not decode them); experiments without runs are left out."""
        out: dict[str, dict[str, int]] = {}
        with self._read() as c:
            sql = (
                "SELECT experiment_id, state, count(*) FROM runs "
                "WHERE experiment_id IN ({}) GROUP BY experiment_id, state"
            )
            for eid, state, n in rows_in(c, sql, sorted(set(experiment_ids))):
                out.setdefault(str(eid), {})[str(state)] = int(n)
        return out

    def cost_by_experiment(
        self, experiment_ids: Sequence[str], since: float | None = None
    ) -> dict[str, float]:
        """Dollars recorded for the attempts of each experiment's runs (those that started at
        or after ``since``, when given: a team's month); experiments without any priced
        attempt are left out."""
        out: dict[str, float] = {}
        when = (
            "" if since is None else f"AND coalesce(a.started_at, a.intent_at) >= {float(since)!r} "
        )
        with self._read() as c:
            sql = (
                "SELECT r.experiment_id, sum(a.usd) FROM attempts AS a "
                "JOIN runs AS r ON r.run_id = a.run_id "
                f"WHERE a.usd IS NOT NULL {when}AND r.experiment_id IN ({{}}) "
                "GROUP BY r.experiment_id"
            )
            for eid, total in rows_in(c, sql, sorted(set(experiment_ids))):
                out[str(eid)] = float(total)
        return out

    def cost_since(self, since: float) -> float:
        """Dollars recorded for attempts that started at or after ``since`` (a month's spend,
        for the monthly budget)."""
        with self._read() as c:
            row = c.execute(
                "SELECT coalesce(sum(usd), 0) FROM attempts WHERE usd IS NOT NULL "
                "AND coalesce(started_at, intent_at) >= ?",
                (since,),
            ).fetchone()
        return float(row[0])

    # -- what attempts imported ------------------------------------------------------------

    def put_used(self, records: Iterable[bytes]) -> list[str]:
        """Keep each import record (the JSON an ``AttemptRecord.used`` hash names) once, by
        the SHA-256 of its bytes; returns those hashes, in order. Putting one again is a no-op.
        """
        rows = [(sha256_hex(r), r.decode()) for r in records]
        if rows:
            with self._write() as c:
                c.executemany(
                    "INSERT OR IGNORE INTO used (hash, record) VALUES (?, ?)",
                    sorted(dict(rows).items()),
                )
        return [h for h, _ in rows]

    def get_used(self, hashes: Iterable[str]) -> dict[str, bytes]:
        """The import records with these hashes, as put; unknown hashes are left out."""
        out: dict[str, bytes] = {}
        with self._read() as c:
            sql = "SELECT hash, record FROM used WHERE hash IN ({})"
            for h, record in rows_in(c, sql, sorted(set(hashes))):
                out[str(h)] = str(record).encode()
        return out


def _chunks(items: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
