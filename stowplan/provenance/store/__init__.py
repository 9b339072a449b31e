"""The run store: SQLite for records, a content-addressed directory for blobs.

Theory of operation:

- One database file (``runs.db`` or whatever path the caller picks) in WAL mode, so one writer
  (the store actor) and any number of readers in other processes (the CLI) work at once; a
  reader sees the last committed state and never blocks the writer.
- Every public method is one transaction and takes a batch: the scheduler hands over thousands
  of transitions at a time, and one ``executemany`` per table keeps 10^5 rows to about a second
  on a small machine. Runs are put in the order given (the order they will be dispatched in)
  and transitions are written by the run's row number, so a batch rewrites neighbouring pages
  instead of all of them; a run's consecutive transitions of one batch are one events row
  (``schema.SCHEMA_V6``), and the control plane holds a run's steps up to its submit for up to
  5 s to write them with the next one (a crash loses only those: a restart finds the run by
  its intent, or redoes it from PENDING). Bulk rows come as arrays (``runs.Step``,
  ``runs.AttemptRow``), a submit's intents in one ``write_dispatch`` with the solve that placed
  them, kept once per solve (``schema.SCHEMA_V7``), and answers with their runs' steps in one
  ``write_steps``. Secondary indexes are few for the same reason.
- A run is two rows: its state (small, rewritten by every transition) in ``runs``, and what
  never changes after it is put (parameters, identity, task spec) as one JSON document in
  ``run_bodies`` (same ``rid``), so a transition rewrites a ~200-byte row rather than the
  whole run (1-2 KiB with its task spec).
- The writer does not checkpoint the WAL itself: a background thread does, on its own
  connection, once commits pause (at the latest 5 s into a burst of them), so a 10^5-run
  commit does not wait for 100 MiB to be copied into the database and a burst's pages are
  copied once. Only a WAL grown past 1 GiB (a long burst, which no checkpoint running beside
  it can catch up with) is checkpointed by the writer, so that it starts over.
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

One module per reason to change: ``schema`` (tables and migrations), ``database`` (the
connection, transactions and checkpoints), ``blobs`` (blob files, local and remote), and the
tables' reads and writes by the records they keep: ``runs`` (experiments, runs, events,
attempts: the control plane's records), ``artifacts`` (a run's outputs) and ``audit``
(provenance, placements, the ledger, replays). :class:`RunStore` is all of them over one
connection.
"""

from __future__ import annotations

import os
from pathlib import Path

from stowplan.provenance.store.artifacts import ArtifactsNotStored, ArtifactTables
from stowplan.provenance.store.audit import AuditTables
from stowplan.provenance.store.blobs import BLOB_URL_ENV, BlobStore
from stowplan.provenance.store.runs import ACTIVE_ATTEMPT_STATES, MIN_PREFIX, RunTables
from stowplan.provenance.store.schema import SCHEMA_VERSION

__all__ = [
    "ACTIVE_ATTEMPT_STATES",
    "BLOB_URL_ENV",
    "MIN_PREFIX",
    "SCHEMA_VERSION",
    "ArtifactsNotStored",
    "BlobStore",
    "RunStore",
]


class RunStore(RunTables, ArtifactTables, AuditTables):
    """SQLite run store plus content-addressed blob directory; see the module docstring.

    Synchronous and thread-safe (one lock around the connection). Open it as a context manager
    or call :meth:`close`. Several processes may open the same path; keep one writer.
    """

    def __init__(self, path: str | os.PathLike[str], *, blob_url: str | None = None) -> None:
        resolved = Path(path).expanduser().resolve()
        resolved.parent.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(resolved.parent / "blobs" / "sha256", blob_url)
        super().__init__(resolved)

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # -- blobs (see BlobStore) -------------------------------------------------------------

    @property
    def blob_dir(self) -> Path:
        """The local blob directory, ``<db dir>/blobs/sha256``."""
        return self.blobs.directory

    @property
    def blob_url(self) -> str | None:
        """An fsspec URL (``s3://bucket/prefix``, ``file:///mnt/share``, ...) every blob is
        also copied to, and read back from when the local copy is missing."""
        return self.blobs.url

    def blob_path(self, sha: str) -> Path:
        """Where the blob with this SHA-256 lives (whether or not it exists)."""
        return self.blobs.path(sha)

    def put_blob(self, data: bytes) -> str:
        """Store bytes by content; returns their SHA-256. Storing them again is a no-op."""
        return self.blobs.put(data)

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int, Path]:
        """Copy a file into the blob store by content, streaming; returns (sha256, size, path)."""
        return self.blobs.put_file(path)

    def ensure_blob(self, sha: str) -> bool:
        """Whether the blob is here, fetching it from the remote blob store when it is not."""
        return self.blobs.ensure(sha)

    def get_blob(self, sha: str) -> bytes:
        """The bytes stored under ``sha`` (from the remote blob store when not here);
        ``KeyError`` when there is no such blob."""
        return self.blobs.get(sha)
