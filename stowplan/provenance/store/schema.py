"""The run store's tables, and how an older database is brought up to date.

The schema version is ``PRAGMA user_version``. A new database gets every version's statements
in order; an older one gets those of the versions after its own. A database written by a newer
stowplan is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from stowplan.errors import StowplanError

__all__ = [
    "SCHEMA_V2",
    "SCHEMA_V3",
    "SCHEMA_V4",
    "SCHEMA_V5",
    "SCHEMA_V6",
    "SCHEMA_V7",
    "SCHEMA_V8",
    "SCHEMA_VERSION",
    "migrate",
    "user_version",
]

SCHEMA_VERSION: Final = 8

SCHEMA_V2: Final = (
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
"""Version 2: the first released schema."""

# Version 3 adds these to a version 2 store (and to a new one): placements, the audit ledger,
# replays and data versions. Nothing in the version 2 tables changes.
SCHEMA_V3: Final = (
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
SCHEMA_V4: Final = (
    "ALTER TABLE attempts ADD COLUMN used TEXT",
    """
    CREATE TABLE used (
        hash   TEXT PRIMARY KEY,
        record TEXT NOT NULL
    ) WITHOUT ROWID
    """,
)

# Version 5 adds what an attempt on a priced (cloud) provider cost: the instance type and
# market, the instance-seconds billed to it and their dollars (NULL elsewhere), and an index
# by job id, the instance, whose attempts are billed together.
SCHEMA_V5: Final = (
    "ALTER TABLE attempts ADD COLUMN instance_type TEXT",
    "ALTER TABLE attempts ADD COLUMN market TEXT",
    "ALTER TABLE attempts ADD COLUMN billed_s REAL",
    "ALTER TABLE attempts ADD COLUMN usd REAL",
    "CREATE INDEX attempts_by_job ON attempts (provider, job_id) WHERE job_id IS NOT NULL",
)

# Version 6 keeps a run's consecutive transitions of one batch in one events row: the row's
# columns are its last step (``from_state`` the first step's), and ``steps`` holds the steps
# before it as JSON, ``[[attempt, to_state, at, failure, reason, pool], ...]`` (each step's
# from_state is the step before's to_state), or NULL for a row of one step, as every row of
# an older store is. A LOST step always ends its row, so ``to_state = 'LOST'`` still counts
# the LOST transitions (the service's lease-expiry metric does).
#
# It also finds a run's events by the run's ``rid`` (the runs row's number, given in the order
# runs are put, which is the order they are dispatched in) rather than by its run id: the
# index entry is two integers instead of a 64-character id, and a batch's entries land side
# by side instead of across the whole index. ``run_id`` stays, for anyone reading the table.
SCHEMA_V6: Final = (
    "ALTER TABLE events ADD COLUMN steps TEXT",
    "ALTER TABLE events ADD COLUMN rid INTEGER REFERENCES runs (rid)",
    "UPDATE events SET rid = (SELECT r.rid FROM runs AS r WHERE r.run_id = events.run_id)",
    "DROP INDEX events_by_run",
    "CREATE INDEX events_by_rid ON events (rid, seq)",
)

# Version 7 keeps a placement decision once per solve instead of once per run: ``solves`` holds
# what every run of a solve shares (the solver's status, objective, bound and gap, the blob of
# problem and solution by SHA-256) and, per assignment in the solution's order, its pool's
# hardware class and the run's share of each objective term, as JSON
# ``[[hardware_class, {term: value}], ...]``; an attempt names its solve and assignment. What a
# version 6 store recorded stays in ``placements_v6``, and ``placements`` becomes a view of
# both, with the columns of the old table (an attempt's placement ``at`` is its intent's time,
# which it always was), so readers of that table read on unchanged.
SCHEMA_V7: Final = (
    "ALTER TABLE placements RENAME TO placements_v6",
    """
    CREATE TABLE solves (
        id          INTEGER PRIMARY KEY,
        problem     TEXT NOT NULL UNIQUE,
        request_id  INTEGER NOT NULL,
        status      TEXT NOT NULL,
        objective   REAL NOT NULL,
        bound       REAL NOT NULL,
        gap         REAL NOT NULL,
        assignments TEXT NOT NULL
    )
    """,
    "ALTER TABLE attempts ADD COLUMN solve INTEGER REFERENCES solves (id)",
    "ALTER TABLE attempts ADD COLUMN assignment INTEGER",
    """
    CREATE VIEW placements AS
    SELECT run_id, attempt, request_id, provider, pool, hardware_class, status, objective,
           bound, gap, terms, problem, at
    FROM placements_v6
    UNION ALL
    SELECT a.run_id, a.attempt, s.request_id, a.provider, a.pool,
           json_extract(s.assignments, '$[' || a.assignment || '][0]'),
           s.status, s.objective, s.bound, s.gap,
           json_extract(s.assignments, '$[' || a.assignment || '][1]'),
           s.problem, a.intent_at
    FROM attempts AS a JOIN solves AS s ON s.id = a.solve
    """,
)

# Version 8 records the GPU devices an attempt holds, in a pool that knows its devices: the
# indices on its ``node``, comma-joined ("0,1"; "" for none), written with the intent (the
# core's lease) and updated by a provider that binds devices itself (Slurm). A restarted core
# gives each live attempt's devices back to its pool's ledger. Older rows have NULL: not known.
SCHEMA_V8: Final = ("ALTER TABLE attempts ADD COLUMN devices TEXT",)


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version of the database ``conn`` is open on (0 for a new one)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the database at ``path`` to :data:`SCHEMA_VERSION`; call it inside a write
    transaction on ``conn``, so a failed step leaves the database as it was."""
    version = user_version(conn)
    if version > SCHEMA_VERSION:
        raise StowplanError(
            f"{path}: run store schema version {version} is newer than this "
            f"stowplan understands ({SCHEMA_VERSION}); upgrade stowplan to read it"
        )
    if version == 1:
        # Only development builds ever wrote version 1; there is nothing to migrate.
        raise StowplanError(
            f"{path}: run store schema version {version} comes from a pre-release "
            "stowplan; move the store's directory aside to start a new one"
        )
    if version == 0:
        for statement in SCHEMA_V2:
            conn.execute(statement)
    if version in (0, 2):
        for statement in SCHEMA_V3:
            conn.execute(statement)
    if version in (0, 2, 3):
        for statement in SCHEMA_V4:
            conn.execute(statement)
    if version in (0, 2, 3, 4):
        for statement in SCHEMA_V5:
            conn.execute(statement)
    if version in (0, 2, 3, 4, 5):
        for statement in SCHEMA_V6:
            conn.execute(statement)
    if version in (0, 2, 3, 4, 5, 6):
        for statement in SCHEMA_V7:
            conn.execute(statement)
    if version in (0, 2, 3, 4, 5, 6, 7):
        for statement in SCHEMA_V8:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
