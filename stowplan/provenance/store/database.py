"""The SQLite connection under the run store: WAL, one writer, checkpoints off its path.

Every table module (``runs``, ``artifacts``, ``audit``) is a mixin over :class:`Database` and
reaches SQLite only through :meth:`Database._read` and :meth:`Database._write`, one transaction
each; this module alone sets pragmas, owns the connection and runs the checkpointer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import msgspec

from stowplan.provenance.store import schema

__all__ = ["HEX", "Database", "json_text", "rows_in"]

log = logging.getLogger(__name__)

# SQLITE_MAX_VARIABLE_NUMBER was 999 before SQLite 3.32; stay under it everywhere.
_CHUNK: Final = 900
_CACHE_KIB: Final = 16 * 1024
"""SQLite's page cache of a connection. 64 MiB cost the store actor 60-80 MiB of memory at 10^5
runs for no faster dispatch (bench_dispatch: 15.9-16.6k tasks/s either way); a 10^5-run
``put_runs`` spills to the WAL mid-transaction, which costs it nothing measurable."""
_WAL_LIMIT: Final = 64 << 20
"""Bytes the WAL file is truncated to after a checkpoint (it otherwise keeps its largest size)."""
_CHECKPOINT_QUIET: Final = 1.0
"""Seconds without a commit after which the background checkpoint runs."""
_CHECKPOINT_LATEST: Final = 5.0
"""Most seconds a commit waits for its checkpoint while commits keep coming (a burst)."""
_WAL_MAX: Final = 1 << 30
"""Bytes of WAL file past which the writer checkpoints it itself (see ``Database._bound_wal``)."""

HEX: Final = re.compile(r"[0-9a-f]+")
"""What a run id, experiment id or content hash (or a prefix of one) looks like."""

_encoder = msgspec.json.Encoder()


def json_text(obj: object) -> str:
    """``obj`` as msgspec JSON text, the form of every dict- and list-valued column."""
    return _encoder.encode(obj).decode()


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def rows_in(c: sqlite3.Connection, sql: str, ids: Sequence[str]) -> Iterator[Any]:
    """Rows of ``sql`` (with ``{}`` where the ``IN`` list goes) for ``ids``, in chunks that
    stay under SQLite's variable limit."""
    for chunk in _chunks(ids):
        yield from c.execute(sql.format(", ".join("?" * len(chunk))), chunk)


class _Checkpointer:
    """Copies committed WAL frames into the database file, off the writer's path.

    A PASSIVE checkpoint never blocks the writer or readers; it runs on its own connection
    (the sqlite3 module lets go of the GIL), after a commit pokes it, once commits have paused
    for :data:`_CHECKPOINT_QUIET`: a burst of commits (a dispatch of 10^5 runs) is copied
    once rather than every second, each page once however often the burst rewrote it; a
    long burst is checkpointed anyway :data:`_CHECKPOINT_LATEST` after its first commit.

    NOTE: a checkpoint that runs while commits go on never catches up with them, and SQLite
    starts the WAL over only after one did, so in a burst the WAL grows whatever the cadence
    here: the writer bounds it (``Database._bound_wal``). A commit is durable once it is in
    the WAL, checkpointed or not: a crashed process loses nothing by a later checkpoint; the
    machine's power, with ``synchronous=NORMAL`` as always, the commits since the WAL was last
    synced (by a checkpoint), now up to a few seconds'.
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
                if not self._burst_ended():
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:
                    log.warning("checkpoint of %s failed: %s", self._path, e)
        finally:
            conn.close()

    def _burst_ended(self) -> bool:
        """Wait, after a commit, until commits pause (or the burst has gone on long enough to
        be checkpointed anyway); False when stopping."""
        deadline = time.monotonic() + _CHECKPOINT_LATEST
        while True:
            if self._stopping.is_set():
                return False
            self._wake.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if not self._wake.wait(min(_CHECKPOINT_QUIET, left)):
                return not self._stopping.is_set()  # no commit for a while: the burst ended


class Database:
    """One connection to the store's SQLite file, in WAL mode, at the current schema.

    Synchronous and thread-safe (one lock around the connection). Open it as a context manager
    or call :meth:`close`. Several processes may open the same path; keep one writer.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wal = f"{path}-wal"
        self._wal_next = _WAL_MAX
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
            self._conn.execute(f"PRAGMA cache_size={-_CACHE_KIB}")
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # see _Checkpointer
            self._conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        """Stop the checkpointer and close; the last connection to close empties the WAL."""
        with self._lock:
            if self._stop_checkpointer is not None:
                self._stop_checkpointer()
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _migrate(self) -> None:
        # Readers skip the write lock when the schema is already current.
        if schema.user_version(self._conn) == schema.SCHEMA_VERSION:
            return
        with self._write() as c:
            schema.migrate(c, self.path)

    @contextlib.contextmanager
    def _write(self, *, foreign_keys: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front.

        ``foreign_keys=False`` leaves SQLite's foreign key checks out, for a bulk write that
        checks what it references itself (each events row costs two index probes otherwise):
        the caller must raise ``sqlite3.IntegrityError`` where SQLite would have."""
        with self._lock:
            if not foreign_keys:  # NOTE: SQLite ignores this pragma inside a transaction
                self._conn.execute("PRAGMA foreign_keys=OFF")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not foreign_keys:
                    self._conn.execute("PRAGMA foreign_keys=ON")
            self._bound_wal()
            if self._checkpointer is None:
                self._checkpointer = _Checkpointer(self.path)
                # Stops the thread on close(), or when a store nobody closed is collected.
                self._stop_checkpointer = weakref.finalize(self, self._checkpointer.stop)
            self._checkpointer.poke()

    def _bound_wal(self) -> None:
        """After a commit: checkpoint the WAL here, on the writer's connection, once its file
        has grown past :data:`_WAL_MAX` (a long burst of commits; see ``_Checkpointer``).

        No commit can come in meanwhile, so the checkpoint copies every frame (unless a reader
        in another process still reads an older snapshot) and the next commit starts the WAL
        over, truncated to :data:`_WAL_LIMIT`. Should it not start over, the next checkpoint
        here waits until the file has grown by another :data:`_WAL_MAX`."""
        try:
            size = os.stat(self._wal).st_size
        except OSError:
            return
        if size < self._wal_next:
            if size < _WAL_MAX:
                self._wal_next = _WAL_MAX  # started over
            return
        self._wal_next = size + _WAL_MAX
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as e:
            log.warning("checkpoint of %s failed: %s", self.path, e)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so multi-query reads see a single snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")
