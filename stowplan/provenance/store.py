"""The run store: SQLite for records, a content-addressed directory for blobs.

Theory of operation:

- One database file (``runs.db`` or whatever path the caller picks) in WAL mode, so one writer
  (the store actor) and any number of readers in other processes (the CLI) work at once; a
  reader sees the last committed state and never blocks the writer.
- Every public method is one transaction and takes a batch: the scheduler hands over thousands
  of transitions at a time, and one ``executemany`` per table keeps 10^5 rows to about a second
  on a small machine. Batches are written in run id order, so b-tree inserts and updates walk
  the pages in order instead of at random; secondary indexes are few for the same reason.
- A run is two rows: its state (small, rewritten by every transition) in ``runs``, and what
  never changes after it is put (parameters, identity, task spec) as one JSON document in
  ``run_bodies`` (same ``rid``), so a transition rewrites a ~200-byte row rather than the
  whole run (1-2 KiB with its task spec).
- The writer never checkpoints the WAL itself: a background thread does, on its own
  connection, so a 10^5-run commit does not wait for 100 MiB to be copied into the database.
  Durability is SQLite's ``synchronous=NORMAL`` in WAL mode: a commit survives a crash of the
  process, and the last ones may be lost with the machine's power; submits are idempotent by
  key, so a lost intent is found again by reconciliation rather than submitted twice.
- Write-ahead: :meth:`RunStore.write_intents` records an attempt (state ``SUBMITTING``) before
  its submit is sent, so after a crash :meth:`RunStore.active_attempts` lists every job that may
  exist at a provider, to be reconciled by idempotency key before anything else happens.
- Inserts of identity-keyed rows (experiments, runs, intents, provenance) are "insert or
  ignore": the same id means the same content, so a repeated write is a no-op.
- Blobs live at ``<db dir>/blobs/sha256/<2 hex>/<62 hex>``, written to a temporary file and
  renamed into place, so a reader never sees half a blob. A row may point at a blob; a blob is
  never deleted by the store. With a remote blob store (``blob_url``, or ``$STOWPLAN_BLOB_URL``:
  any fsspec URL) every blob is also copied there, and a blob missing here is fetched from
  there (and checked against its hash), so records can move without their blobs directory.
- What an attempt's Python processes imported (``AttemptRecord.used``) is kept once per
  distinct record, by the SHA-256 of its JSON, in ``used``; the attempt's row holds only that
  hash, so 10^5 trials of one task in one environment add 64 bytes each, not a record each.
- Dict- and list-valued columns hold msgspec JSON text (readable with the ``sqlite3`` shell and
  its ``json_*`` functions).

The schema version is ``PRAGMA user_version``; a database written by a newer stowplan is refused
rather than misread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import operator
import os
import re
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Final

import msgspec

from stowplan.errors import StowplanError
from stowplan.provenance.records import (
    LEDGER_ACTIONS,
    ArtifactRecord,
    AttemptRecord,
    ExperimentRecord,
    LedgerAction,
    LedgerEntry,
    PlacementRecord,
    ProvenanceRecord,
    ReplayRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.spec.canonical import canonical_json, sha256_hex

__all__ = [
    "ACTIVE_ATTEMPT_STATES",
    "BLOB_URL_ENV",
    "SCHEMA_VERSION",
    "TERMINAL_RUN_STATES",
    "ArtifactsNotStored",
    "RunStore",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 4

TERMINAL_RUN_STATES: Final = ("SUCCEEDED", "FAILED", "CANCELLED")
ACTIVE_ATTEMPT_STATES: Final = ("SUBMITTING", "QUEUED", "RUNNING", "UNKNOWN")

BLOB_URL_ENV: Final = "STOWPLAN_BLOB_URL"
"""Environment variable naming a remote blob store (an fsspec URL) for every store opened."""

MIN_PREFIX: Final = 4
"""Shortest run id prefix :meth:`RunStore.resolve_run` accepts."""

# SQLITE_MAX_VARIABLE_NUMBER was 999 before SQLite 3.32; stay under it everywhere.
_CHUNK: Final = 900
_COPY_CHUNK: Final = 1 << 20
_CACHE_KIB: Final = 64 * 1024
_WAL_LIMIT: Final = 64 << 20
"""Bytes the WAL file is truncated to after a checkpoint (it otherwise keeps its largest size)."""
_CHECKPOINT_EVERY: Final = 1.0
"""Least seconds between two background checkpoints."""
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")

_SCHEMA: Final = (
    """
    CREATE TABLE experiments (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        project     TEXT NOT NULL,
        description TEXT NOT NULL,
        file        TEXT NOT NULL,
        spec        TEXT NOT NULL,
        created_at  REAL NOT NULL
    )
    """,
    "CREATE INDEX experiments_by_name ON experiments (name, created_at)",
    "CREATE INDEX experiments_by_time ON experiments (created_at)",
    """
    CREATE TABLE runs (
        rid           INTEGER PRIMARY KEY,
        run_id        TEXT NOT NULL UNIQUE,
        experiment_id TEXT NOT NULL REFERENCES experiments (id),
        experiment    TEXT NOT NULL,
        task          TEXT NOT NULL,
        idx           INTEGER NOT NULL,
        replicate     INTEGER NOT NULL,
        state         TEXT NOT NULL,
        attempts      INTEGER NOT NULL,
        failure       TEXT,
        reason        TEXT NOT NULL,
        pool          TEXT,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    )
    """,
    # NOTE: no index on (experiment, task, idx): rows arrive in run id order, so it would be
    # updated at random, which doubled the cost of put_runs. Name lookups go through
    # experiments, then this index.
    "CREATE INDEX runs_by_experiment ON runs (experiment_id)",
    """
    CREATE TABLE run_bodies (
        rid  INTEGER PRIMARY KEY,
        body TEXT NOT NULL
    )
    """,
    # Keyed by the idempotency key: provider reports name only that. (run_id, attempt) is
    # unique too (the key is derived from it), and its index serves attempts_for.
    """
    CREATE TABLE attempts (
        key        TEXT PRIMARY KEY,
        run_id     TEXT NOT NULL REFERENCES runs (run_id),
        attempt    INTEGER NOT NULL,
        provider   TEXT NOT NULL,
        pool       TEXT NOT NULL,
        state      TEXT NOT NULL,
        job_id     TEXT,
        node       TEXT,
        exit_code  INTEGER,
        failure    TEXT,
        message    TEXT NOT NULL,
        intent_at  REAL NOT NULL,
        started_at REAL,
        ended_at   REAL
    ) WITHOUT ROWID
    """,
    "CREATE UNIQUE INDEX attempts_by_run ON attempts (run_id, attempt)",
    """
    CREATE TABLE events (
        -- max(seq) + 1 per row, and events are never deleted, so seq only grows. AUTOINCREMENT
        -- would add a sqlite_sequence read and write per row for nothing.
        seq        INTEGER PRIMARY KEY,
        run_id     TEXT NOT NULL REFERENCES runs (run_id),
        attempt    INTEGER NOT NULL,
        from_state TEXT NOT NULL,
        to_state   TEXT NOT NULL,
        at         REAL NOT NULL,
        failure    TEXT,
        reason     TEXT NOT NULL,
        pool       TEXT
    )
    """,
    "CREATE INDEX events_by_run ON events (run_id, seq)",
    """
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL REFERENCES runs (run_id),
        name   TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size   INTEGER NOT NULL,
        PRIMARY KEY (run_id, name)
    )
    """,
    """
    CREATE TABLE provenance (
        hash   TEXT PRIMARY KEY,
        record TEXT NOT NULL
    )
    """,
)

# Version 3 adds these to a version 2 store (and to a new one): placements, the audit ledger,
# replays and data versions. Nothing in the version 2 tables changes.
_SCHEMA_V3: Final = (
    """
    CREATE TABLE placements (
        run_id         TEXT NOT NULL REFERENCES runs (run_id),
        attempt        INTEGER NOT NULL,
        request_id     INTEGER NOT NULL,
        provider       TEXT NOT NULL,
        pool           TEXT NOT NULL,
        hardware_class TEXT NOT NULL,
        status         TEXT NOT NULL,
        objective      REAL NOT NULL,
        bound          REAL NOT NULL,
        gap            REAL NOT NULL,
        terms          TEXT NOT NULL,
        problem        TEXT NOT NULL,
        at             REAL NOT NULL,
        PRIMARY KEY (run_id, attempt)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE ledger (
        seq     INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        who     TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        why     TEXT NOT NULL,
        details TEXT NOT NULL,
        prev    TEXT NOT NULL,
        hash    TEXT NOT NULL
    )
    """,
    # Append-only for everyone going through SQLite's front door; the hash chain catches the
    # rest (someone who drops these triggers, or edits the file's bytes).
    """
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END
    """,
    """
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END
    """,
    """
    CREATE TABLE replays (
        run_id      TEXT PRIMARY KEY REFERENCES runs (run_id),
        of_run_id   TEXT NOT NULL REFERENCES runs (run_id),
        at          REAL NOT NULL,
        verdict     TEXT,
        differences TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX replays_of ON replays (of_run_id)",
)

# Version 4 adds what each attempt imported: a hash per attempt, each distinct record once.
_SCHEMA_V4: Final = (
    "ALTER TABLE attempts ADD COLUMN used TEXT",
    """
    CREATE TABLE used (
        hash   TEXT PRIMARY KEY,
        record TEXT NOT NULL
    ) WITHOUT ROWID
    """,
)

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
    "intent_at, started_at, ended_at, used"
)
_EXPERIMENT_COLUMNS: Final = "id, name, project, description, file, spec, created_at"

_TERMINAL_SQL: Final = ", ".join(f"'{s}'" for s in TERMINAL_RUN_STATES)
_ACTIVE_SQL: Final = ", ".join(f"'{s}'" for s in ACTIVE_ATTEMPT_STATES)

_encoder = msgspec.json.Encoder()
_terms_decoder = msgspec.json.Decoder(dict[str, float])
_list_decoder = msgspec.json.Decoder(list[str])
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_provenance_decoder = msgspec.json.Decoder(ProvenanceRecord)


def _json(obj: object) -> str:
    return _encoder.encode(obj).decode()


_by_run_id: Final = operator.attrgetter("run_id")


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _rows_in(c: sqlite3.Connection, sql: str, ids: Sequence[str]) -> Iterator[Any]:
    """Rows of ``sql`` (with ``{}`` where the ``IN`` list goes) for ``ids``, in chunks that
    stay under SQLite's variable limit."""
    for chunk in _chunks(ids):
        yield from c.execute(sql.format(", ".join("?" * len(chunk))), chunk)


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


def _body_row(rid: int, r: RunRecord) -> tuple[int, str]:
    body = _RunBody(
        params=r.params,
        seed=r.seed,
        depends_on=r.depends_on,
        identity=r.identity,
        task_spec=r.task_spec,
        provenance=r.provenance,
    )
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
)
_by_key: Final = operator.attrgetter("key")


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
    )


_event_row: Final = operator.attrgetter(
    "run_id", "attempt", "from_state", "to_state", "at", "failure", "reason", "pool"
)


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


class _Checkpointer:
    """Copies committed WAL frames into the database file, off the writer's path.

    A PASSIVE checkpoint never blocks the writer or readers; it runs at most once a second,
    after a commit pokes it, on its own connection (the sqlite3 module lets go of the GIL).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="stowplan-store-checkpoint", daemon=True
        )
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=10.0)
        except sqlite3.Error as e:  # pragma: no cover - the writer opened the same file
            log.warning("cannot open %s to checkpoint it: %s", self._path, e)
            return
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                self._wake.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:
                    log.warning("checkpoint of %s failed: %s", self._path, e)
                if self._stopping.wait(_CHECKPOINT_EVERY):
                    return
        finally:
            conn.close()


class RunStore:
    """SQLite run store plus content-addressed blob directory; see the module docstring.

    Synchronous and thread-safe (one lock around the connection). Open it as a context manager
    or call :meth:`close`. Several processes may open the same path; keep one writer.
    """

    def __init__(self, path: str | os.PathLike[str], *, blob_url: str | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.blob_dir = self.path.parent / "blobs" / "sha256"
        self.blob_url = (blob_url or os.environ.get(BLOB_URL_ENV) or "").rstrip("/") or None
        """An fsspec URL (``s3://bucket/prefix``, ``file:///mnt/share``, ...) every blob is
        also copied to, and read back from when the local copy is missing."""
        self._lock = threading.RLock()
        self._checkpointer: _Checkpointer | None = None
        self._stop_checkpointer: weakref.finalize[Any, Any] | None = None
        # isolation_level=None: no implicit transactions; each method says BEGIN itself.
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # A 10^5-run batch touches ~100 MiB; a small page cache would spill mid-transaction.
            self._conn.execute(f"PRAGMA cache_size={-_CACHE_KIB}")
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # see _Checkpointer
            self._conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the checkpointer and close; the last connection to close empties the WAL."""
        with self._lock:
            if self._stop_checkpointer is not None:
                self._stop_checkpointer()
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def _user_version(self) -> int:
        row = self._conn.execute("PRAGMA user_version").fetchone()
        return int(row[0])

    def _migrate(self) -> None:
        # Readers skip the write lock when the schema is already current.
        if self._user_version() == SCHEMA_VERSION:
            return
        with self._write():
            version = self._user_version()
            if version > SCHEMA_VERSION:
                raise StowplanError(
                    f"{self.path}: run store schema version {version} is newer than this "
                    f"stowplan understands ({SCHEMA_VERSION}); upgrade stowplan to read it"
                )
            if version == 1:
                # Only development builds ever wrote version 1; there is nothing to migrate.
                raise StowplanError(
                    f"{self.path}: run store schema version {version} comes from a pre-release "
                    "stowplan; move the store's directory aside to start a new one"
                )
            if version == 0:
                for statement in _SCHEMA:
                    self._conn.execute(statement)
            if version in (0, 2):
                for statement in _SCHEMA_V3:
                    self._conn.execute(statement)
            if version in (0, 2, 3):
                for statement in _SCHEMA_V4:
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            if self._checkpointer is None:
                self._checkpointer = _Checkpointer(self.path)
                # Stops the thread on close(), or when a store nobody closed is collected.
                self._stop_checkpointer = weakref.finalize(self, self._checkpointer.stop)
            self._checkpointer.poke()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so multi-query reads see a single snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

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
                    _json(rec.spec),
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
        by_id = len(prefix) >= MIN_PREFIX and _HEX.fullmatch(prefix) is not None
        with self._read() as c:
            rows = c.execute(
                f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments "
                "WHERE name = ? OR (? AND id GLOB ?) ORDER BY created_at DESC, id",
                (key, by_id, prefix + "*"),
            ).fetchall()
        return [_experiment_from_row(r) for r in rows]

    # -- runs ------------------------------------------------------------------------------

    def put_runs(self, recs: Sequence[RunRecord]) -> None:
        """Insert runs; an existing run (same id) is kept as it is, state included."""
        ordered = sorted(recs, key=_by_run_id)
        if not ordered:
            return
        with self._write() as c:
            # SQLite numbers new rows max(rid) + 1 on, in insertion (run id) order, so the
            # state row and its body share a rid and later sorted batches touch pages in order.
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
            for row in _rows_in(c, f"{_RUN_SELECT} WHERE r.run_id IN ({{}})", ids):
                out[row[0]] = _run_from_row(row)
        return out

    def run_states(self, run_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """``(state, attempts)`` of the runs among ``run_ids`` that exist: the narrow read
        the control plane makes for 10^5 runs at a time, without decoding run bodies."""
        out: dict[str, tuple[str, int]] = {}
        ids = sorted(set(run_ids))
        with self._read() as c:
            sql = "SELECT run_id, state, attempts FROM runs WHERE run_id IN ({})"
            for run_id, state, attempts in _rows_in(c, sql, ids):
                out[run_id] = (state, attempts)
        return out

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
        if _HEX.fullmatch(p) is None:
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

    def apply_transitions(self, ts: Sequence[TransitionRecord]) -> None:
        """Append every transition to the events log and move each run to its last one.

        For each run, ``state``, ``failure``, ``reason`` and ``updated_at`` come from its last
        transition in the batch, ``pool`` from the last one that names a pool (a transition
        without one keeps the pool), and ``attempts`` becomes the largest attempt number seen.
        A transition of an unknown run violates a foreign key (``sqlite3.IntegrityError``) and
        the whole batch is rolled back.

        Within a batch, events are numbered run by run (each run's in the order given): the
        batch is one transaction, and grouping by run keeps the events index written in order.
        """
        if not ts:
            return
        # The result equals applying the transitions one by one, in one UPDATE per run.
        first: dict[str, str] = {}
        last: dict[str, TransitionRecord] = {}
        top: dict[str, int] = {}
        pool: dict[str, str] = {}
        for t in ts:
            first.setdefault(t.run_id, str(t.from_state))
            last[t.run_id] = t
            if t.attempt > top.get(t.run_id, -1):
                top[t.run_id] = t.attempt
            if t.pool is not None:
                pool[t.run_id] = t.pool
        with self._write() as c:
            c.executemany(
                "INSERT INTO events (run_id, attempt, from_state, to_state, at, failure, reason, "
                "pool) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                map(_event_row, sorted(ts, key=_by_run_id)),
            )
            c.executemany(
                # a cancelled run leaves CANCELLED only by being submitted afresh (PENDING): a
                # late transition from a control plane that died after an offline cancel must
                # not bring it back
                "UPDATE runs SET state = ?, attempts = max(attempts, ?), failure = ?, "
                "reason = ?, pool = coalesce(?, pool), updated_at = ? WHERE run_id = ? "
                "AND (state != 'CANCELLED' OR ? IN ('PENDING', 'CANCELLED'))",
                (
                    (
                        last[r].to_state,
                        top[r],
                        last[r].failure,
                        last[r].reason,
                        pool.get(r),
                        last[r].at,
                        r,
                        first[r],
                    )
                    for r in sorted(last)
                ),
            )

    def events_for(self, run_id: str) -> list[TransitionRecord]:
        """A run's transitions in the order they were applied."""
        with self._read() as c:
            rows = c.execute(
                "SELECT run_id, attempt, from_state, to_state, at, failure, reason, pool "
                "FROM events WHERE run_id = ? ORDER BY seq",
                (run_id,),
            ).fetchall()
        return [
            TransitionRecord(
                run_id=r[0],
                attempt=r[1],
                from_state=r[2],
                to_state=r[3],
                at=r[4],
                failure=r[5],
                reason=r[6],
                pool=r[7],
            )
            for r in rows
        ]

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
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def update_attempts(self, updates: Sequence[AttemptRecord]) -> None:
        """Upsert attempts by key with what the provider reported, in the order given.

        For a stored key, ``state`` takes the new value; ``job_id``, ``node``, ``exit_code``,
        ``failure``, ``started_at``, ``ended_at`` and ``used`` keep their stored value when the
        update has None, and ``message`` when the update's is empty. ``run_id``, ``attempt``,
        ``provider``, ``pool`` and ``intent_at`` come from the intent and never change, so an
        update may leave them blank (a provider report knows only the key).

        A key never stored is inserted whole if its ``run_id`` names a stored run, and skipped
        (logged) if its ``run_id`` is blank: a report for an attempt this store never saw.
        """
        if not updates:
            return
        with self._write() as c:
            changed = c.executemany(
                # ?1..?15 are the attempt row; the WHERE drops blank-run updates of unknown keys
                f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) "
                "SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15 "
                "WHERE ?2 != '' OR EXISTS (SELECT 1 FROM attempts WHERE key = ?1) "
                "ON CONFLICT (key) DO UPDATE SET "
                "state = excluded.state, "
                "job_id = coalesce(excluded.job_id, job_id), "
                "node = coalesce(excluded.node, node), "
                "exit_code = coalesce(excluded.exit_code, exit_code), "
                "failure = coalesce(excluded.failure, failure), "
                "message = CASE WHEN excluded.message = '' THEN message ELSE excluded.message END, "
                "started_at = coalesce(excluded.started_at, started_at), "
                "ended_at = coalesce(excluded.ended_at, ended_at), "
                "used = coalesce(excluded.used, used)",
                map(_attempt_row, sorted(updates, key=_by_key)),
            ).rowcount
        if changed < len(updates):
            log.warning(
                "%d attempt update(s) named keys this store never saw; skipped",
                len(updates) - changed,
            )

    def attempts_for(self, run_ids: Sequence[str]) -> dict[str, list[AttemptRecord]]:
        """Attempts of each run (by attempt number); runs without attempts are left out."""
        out: dict[str, list[AttemptRecord]] = {}
        ids = list(dict.fromkeys(run_ids))
        with self._read() as c:
            sql = (
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE run_id IN ({{}}) "
                "ORDER BY run_id, attempt"
            )
            for row in _rows_in(c, sql, ids):
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
            for h, record in _rows_in(c, sql, sorted(set(hashes))):
                out[str(h)] = str(record).encode()
        return out

    # -- blobs -----------------------------------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        """Where the blob with this SHA-256 lives (whether or not it exists)."""
        if _HEX64.fullmatch(sha) is None:
            raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
        return self.blob_dir / sha[:2] / sha[2:]

    def put_blob(self, data: bytes) -> str:
        """Store bytes by content; returns their SHA-256. Storing them again is a no-op."""
        sha = sha256_hex(data)
        dest = self.blob_path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self._publish(tmp, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        self._upload(sha)
        return sha

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int, Path]:
        """Copy a file into the blob store by content, streaming; returns (sha256, size, path)."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".tmp-")
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha = h.hexdigest()
            dest = self.blob_path(sha)
            if dest.exists():
                os.unlink(tmp)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._publish(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._upload(sha)
        return sha, size, dest

    def _remote(self, sha: str) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.blob_url)
        return fs, f"{root.rstrip('/')}/sha256/{sha[:2]}/{sha[2:]}"

    def _upload(self, sha: str) -> None:
        """Copy a local blob to the remote blob store unless it is there already."""
        if self.blob_url is None:
            return
        try:
            fs, dest = self._remote(sha)
            if not fs.exists(dest):
                fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                # upload under a temporary name, then move: readers never see half a blob
                tmp = f"{dest}.tmp-{os.getpid()}-{threading.get_ident()}"
                fs.put_file(str(self.blob_path(sha)), tmp)
                fs.mv(tmp, dest)
        except (ImportError, ValueError, OSError) as e:
            raise StowplanError(
                f"cannot copy blob {sha[:12]} to the blob store {self.blob_url}: {e}"
            ) from None

    def ensure_blob(self, sha: str) -> bool:
        """Whether the blob is here, fetching it from the remote blob store when it is not
        (checked against its hash on the way in)."""
        dest = self.blob_path(sha)
        if dest.exists():
            return True
        if self.blob_url is None:
            return False
        try:
            fs, src = self._remote(sha)
            data = fs.cat_file(src)
        except (ImportError, ValueError, OSError):
            return False
        if sha256_hex(data) != sha:
            log.warning("remote blob %s in %s does not match its hash; ignored", sha, self.blob_url)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._publish(tmp, dest)
        return True

    @staticmethod
    def _publish(tmp: str, dest: Path) -> None:
        # Blobs are immutable: read-only, like git's objects. os.replace is atomic, so a
        # concurrent writer of the same content simply wins or loses the rename.
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)

    def get_blob(self, sha: str) -> bytes:
        """The bytes stored under ``sha`` (from the remote blob store when not here);
        ``KeyError`` when there is no such blob."""
        self.ensure_blob(sha)
        try:
            return self.blob_path(sha).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"no blob {sha}") from None

    # -- artifacts -------------------------------------------------------------------------

    def put_artifacts(self, run_id: str, outputs: Mapping[str, str]) -> list[ArtifactRecord]:
        """Copy a run's outputs into the blob store and record them, sorted by name.

        ``outputs`` maps an output name to a path. A file is one artifact with that name; a
        directory is one artifact per file under it, named ``<name>/<path inside it>`` (the
        names ``show``, ``lineage``, ``find`` and ``replay --verify`` use). A path ending in
        its name (``<dir>/d/x`` for ``d/x``) must stay inside ``<dir>``, links included; any
        other path must stay inside its parent directory (the rule of ``scan_outputs``).
        Putting the same outputs again changes nothing; putting a name again with other content
        records the new content.

        Every output that can be stored is stored and recorded, even when others cannot; then
        ``ArtifactsNotStored`` names each one that was not, and why.
        """
        from stowplan.providers.launcher import scan_outputs

        files: dict[str, Path] = {}
        failed: list[str] = []
        for name in sorted(outputs):
            path = Path(outputs[name])
            clean = PurePosixPath(name).as_posix()
            if path.as_posix().endswith("/" + clean) and not name.startswith("/"):
                # scanned as declared, inside the directory the path names it in
                root, declared, scanned = Path(path.as_posix()[: -len(clean) - 1]), name, clean
            else:
                root, scanned = path.parent, path.name
                declared = scanned + ("/" if name.endswith("/") else "")
            scan = scan_outputs(root, [declared])
            for found, real in scan.files.items():
                files[name if found == declared else clean + found[len(scanned) :]] = real
            failed.extend(f"{name}: {path} does not exist" for _ in scan.missing)
            for why in scan.refused:
                top = why.startswith(declared + ":")
                failed.append(name + why[len(declared) :] if top else clean + why[len(scanned) :])
        stored: list[tuple[str, str, int]] = []
        for name in sorted(files):
            try:
                sha, size, _ = self.put_file(files[name])
            except (OSError, StowplanError) as e:
                failed.append(f"{name}: cannot be stored: {e}")
                continue
            stored.append((name, sha, size))
        with self._write() as c:
            c.executemany(
                "INSERT INTO artifacts (run_id, name, sha256, size) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, name) DO UPDATE SET sha256 = excluded.sha256, "
                "size = excluded.size",
                ((run_id, name, sha, size) for name, sha, size in stored),
            )
        recs = [self._artifact(run_id, name, sha, size) for name, sha, size in stored]
        if failed:
            raise ArtifactsNotStored(run_id, recs, failed)
        return recs

    def artifacts_for(self, run_ids: Sequence[str]) -> dict[str, list[ArtifactRecord]]:
        """Artifacts of each run, sorted by name; runs without artifacts are left out."""
        out: dict[str, list[ArtifactRecord]] = {}
        ids = list(dict.fromkeys(run_ids))
        with self._read() as c:
            sql = (
                "SELECT run_id, name, sha256, size FROM artifacts WHERE run_id IN ({}) "
                "ORDER BY run_id, name"
            )
            for row in _rows_in(c, sql, ids):
                out.setdefault(row[0], []).append(self._artifact(*row))
        return out

    def _artifact(self, run_id: str, name: str, sha: str, size: int) -> ArtifactRecord:
        # The path is derived, not stored, so a store directory can be moved or copied whole.
        return ArtifactRecord(
            run_id=run_id, name=name, sha256=sha, size=size, path=str(self.blob_path(sha))
        )

    # -- provenance ------------------------------------------------------------------------

    def put_provenance(self, rec: ProvenanceRecord) -> str:
        """Store a provenance record by the SHA-256 of its canonical JSON; returns that hash."""
        data = canonical_json(rec)
        h = sha256_hex(data)
        with self._write() as c:
            c.execute(
                "INSERT OR IGNORE INTO provenance (hash, record) VALUES (?, ?)",
                (h, data.decode()),
            )
        return h

    def get_provenance(self, h: str) -> ProvenanceRecord:
        """The provenance record with hash ``h``; ``KeyError`` when there is none."""
        with self._read() as c:
            row = c.execute("SELECT record FROM provenance WHERE hash = ?", (h,)).fetchone()
        if row is None:
            raise KeyError(f"no provenance record {h}")
        return _provenance_decoder.decode(row[0])

    # -- placements ------------------------------------------------------------------------

    def put_placements(self, records: Sequence[PlacementRecord]) -> None:
        """Record the placement decision of each (run, attempt); one already recorded is kept.

        A record of an unknown run violates a foreign key and the whole batch is rolled back.
        """
        if not records:
            return
        with self._write() as c:
            c.executemany(
                "INSERT OR IGNORE INTO placements (run_id, attempt, request_id, provider, pool, "
                "hardware_class, status, objective, bound, gap, terms, problem, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        p.run_id,
                        p.attempt,
                        p.request_id,
                        p.provider,
                        p.pool,
                        p.hardware_class,
                        p.status,
                        p.objective,
                        p.bound,
                        p.gap,
                        _json(p.terms),
                        p.problem,
                        p.at,
                    )
                    for p in sorted(records, key=lambda p: (p.run_id, p.attempt))
                ),
            )

    def placements_for(self, run_id: str) -> list[PlacementRecord]:
        """The placement of each attempt of a run, by attempt number."""
        with self._read() as c:
            rows = c.execute(
                "SELECT run_id, attempt, request_id, provider, pool, hardware_class, status, "
                "objective, bound, gap, terms, problem, at FROM placements WHERE run_id = ? "
                "ORDER BY attempt",
                (run_id,),
            ).fetchall()
        return [
            PlacementRecord(
                run_id=r[0],
                attempt=r[1],
                request_id=r[2],
                provider=r[3],
                pool=r[4],
                hardware_class=r[5],
                status=r[6],
                objective=r[7],
                bound=r[8],
                gap=r[9],
                terms=_terms_decoder.decode(r[10]),
                problem=r[11],
                at=r[12],
            )
            for r in rows
        ]

    # -- audit ledger ----------------------------------------------------------------------

    def append_ledger(
        self,
        *,
        who: str,
        action: LedgerAction,
        target: str,
        why: str,
        details: Mapping[str, Any] | None = None,
        at: float | None = None,
    ) -> LedgerEntry:
        """Append one entry, chained to the last one, in one transaction; returns it."""
        from stowplan.provenance.ledger import GENESIS, entry_hash

        with self._write() as c:
            row = c.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (1, GENESIS) if row is None else (int(row[0]) + 1, str(row[1]))
            entry = LedgerEntry(
                seq=seq,
                at=time.time() if at is None else at,
                who=who,
                action=action,
                target=target,
                why=why,
                details=dict(details or {}),
                prev=prev,
            )
            entry = msgspec.structs.replace(entry, hash=entry_hash(entry))
            c.execute(
                "INSERT INTO ledger (seq, at, who, action, target, why, details, prev, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.at,
                    entry.who,
                    entry.action,
                    entry.target,
                    entry.why,
                    canonical_json(entry.details).decode(),
                    entry.prev,
                    entry.hash,
                ),
            )
        return entry

    def ledger(self, *, target: str | None = None) -> list[LedgerEntry]:
        """Every ledger entry (or those on ``target``), by ``seq``, exactly as stored.

        Rows that no longer decode (an edited action, a details column that is not JSON) come
        back with what can be read, so :func:`stowplan.provenance.ledger.verify` flags them.
        """
        with self._read() as c:
            rows = c.execute(
                "SELECT seq, at, who, action, target, why, details, prev, hash FROM ledger "
                + ("WHERE target = ? " if target is not None else "")
                + "ORDER BY seq",
                (target,) if target is not None else (),
            ).fetchall()
        out = []
        for r in rows:
            try:
                details = _dict_decoder.decode(r[6])
            except msgspec.DecodeError:
                details = {"undecodable": str(r[6])}
            out.append(
                msgspec.convert(
                    {
                        "seq": r[0],
                        "at": float(r[1]),
                        "who": str(r[2]),
                        "action": r[3],
                        "target": str(r[4]),
                        "why": str(r[5]),
                        "details": details,
                        "prev": str(r[7]),
                        "hash": str(r[8]),
                    },
                    LedgerEntry,
                    strict=False,
                )
                if r[3] in _LEDGER_ACTIONS
                else _raw_entry(r, details)
            )
        return out

    # -- replays ---------------------------------------------------------------------------

    def put_replay(self, rec: ReplayRecord) -> None:
        """Record (or update the verdict of) a replay."""
        self.put_replay_batch([rec])

    def put_replay_batch(self, recs: Sequence[ReplayRecord]) -> None:
        """Record (or update the verdicts of) replays, in one transaction."""
        with self._write() as c:
            c.executemany(
                "INSERT INTO replays (run_id, of_run_id, at, verdict, differences) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                "verdict = excluded.verdict, differences = excluded.differences",
                ((r.run_id, r.of_run_id, r.at, r.verdict, _json(r.differences)) for r in recs),
            )

    def replays_of(self, run_id: str) -> list[ReplayRecord]:
        """Replays made of ``run_id``, oldest first."""
        return self._replays("of_run_id", run_id)

    def replay_source(self, run_id: str) -> ReplayRecord | None:
        """The replay record of ``run_id`` when it is a replay, else None."""
        found = self._replays("run_id", run_id)
        return found[0] if found else None

    def _replays(self, column: str, value: str) -> list[ReplayRecord]:
        with self._read() as c:
            rows = c.execute(
                f"SELECT run_id, of_run_id, at, verdict, differences FROM replays "
                f"WHERE {column} = ? ORDER BY at, run_id",
                (value,),
            ).fetchall()
        return [
            ReplayRecord(
                run_id=r[0],
                of_run_id=r[1],
                at=r[2],
                verdict=r[3],
                differences=_list_decoder.decode(r[4]),
            )
            for r in rows
        ]

    # -- queries ---------------------------------------------------------------------------

    def all_runs(self) -> list[RunRecord]:
        """Every run, oldest first: what queries over all provenance scan."""
        with self._read() as c:
            rows = c.execute(f"{_RUN_SELECT} ORDER BY r.created_at, r.run_id").fetchall()
        return [_run_from_row(r) for r in rows]

    def runs_producing(self, sha256: str) -> list[str]:
        """Run ids with an artifact of this content, by run id."""
        with self._read() as c:
            rows = c.execute(
                "SELECT DISTINCT run_id FROM artifacts WHERE sha256 = ? ORDER BY run_id", (sha256,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def artifacts_by_prefix(self, prefix: str) -> list[str]:
        """Distinct artifact hashes starting with ``prefix`` (at most 11)."""
        p = prefix.strip().lower().removeprefix("sha256:")
        if _HEX.fullmatch(p) is None:
            return []
        with self._read() as c:
            rows = c.execute(
                "SELECT DISTINCT sha256 FROM artifacts WHERE sha256 GLOB ? ORDER BY sha256 "
                "LIMIT 11",
                (p + "*",),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def latest_artifact_named(self, name: str) -> str | None:
        """The hash of the output called ``name`` of the newest run that has one."""
        with self._read() as c:
            row = c.execute(
                "SELECT a.sha256 FROM artifacts AS a JOIN runs AS r ON r.run_id = a.run_id "
                "WHERE a.name = ? ORDER BY r.created_at DESC, r.run_id LIMIT 1",
                (name,),
            ).fetchone()
        return None if row is None else str(row[0])

    def runs_depending_on(self, run_ids: Sequence[str]) -> dict[str, list[str]]:
        """For each of ``run_ids``, the runs that list it in ``depends_on``."""
        wanted = set(run_ids)
        out: dict[str, list[str]] = {}
        for r in self.all_runs():
            for d in r.depends_on:
                if d in wanted:
                    out.setdefault(d, []).append(r.run_id)
        return out


_LEDGER_ACTIONS: Final = frozenset(LEDGER_ACTIONS)


def _raw_entry(r: Sequence[Any], details: dict[str, Any]) -> LedgerEntry:
    # An action outside the Literal (someone edited the row): keep the text so verify sees it.
    return msgspec.structs.replace(
        LedgerEntry(
            seq=int(r[0]),
            at=float(r[1]),
            who=str(r[2]),
            action="submit",
            target=str(r[4]),
            why=str(r[5]),
            details=details,
            prev=str(r[7]),
            hash=str(r[8]),
        ),
        action=str(r[3]),
    )


class ArtifactsNotStored(StowplanError):
    """Some of a run's outputs could not be stored; the others were (``stored``)."""

    def __init__(self, run_id: str, stored: list[ArtifactRecord], failed: list[str]) -> None:
        self.run_id = run_id
        self.stored = stored
        self.failed = failed
        super().__init__(
            f"run {run_id[:12]}: {len(failed)} output{'s' if len(failed) != 1 else ''} not "
            f"stored ({len(stored)} stored): {'; '.join(failed)}"
        )
