"""The SQLite connection under the run store: WAL, one writer, checkpoints off its path.

Every table module (``runs``, ``artifacts``, ``audit``) is a mixin over :class:`Database` and
reaches SQLite only through :meth:`Database._read` and :meth:`Database._write`, one transaction
each; this module alone sets pragmas, owns the connection and runs the checkpointer.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
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
_CACHE_KIB: Final = 64 * 1024
_WAL_LIMIT: Final = 64 << 20
"""Bytes the WAL file is truncated to after a checkpoint (it otherwise keeps its largest size)."""
_CHECKPOINT_EVERY: Final = 1.0
"""Least seconds between two background checkpoints."""

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


class Database:
    """One connection to the store's SQLite file, in WAL mode, at the current schema.

    Synchronous and thread-safe (one lock around the connection). Open it as a context manager
    or call :meth:`close`. Several processes may open the same path; keep one writer.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
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
