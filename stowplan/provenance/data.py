"""Versions of data inputs through fsspec, with a content-hash cache for local files.

What a version is depends on where the data lives:

- a local file (a path, relative to the experiment's directory, or ``file://``): its size,
  mtime and SHA-256; the version is ``sha256:<hex>``. Hashes are cached by (path, size,
  mtime, ctime, inode) in :class:`HashCache`, so a large dataset is read once, not every run;
  ctime and inode are in the key because a same-size rewrite can keep its mtime
  (``touch -r``), but not its ctime.
- a local directory: ``sha256:`` of its sorted manifest of (relative path, size, SHA-256).
- an object in a store fsspec reaches (``s3://``, ``gs://``, ``az://``, ``memory://``, ...):
  the object version id when the store versions objects (``version:<id>``), else its ETag
  (``etag:<etag>``), else the SHA-256 of its bytes read through fsspec.
- a pinned version written in the spec wins over all of these.
- a URI whose scheme has no fsspec implementation installed here, or ``http(s)://``, is
  ``unpinned:<uri>``: recorded, but not reproducible by hash.

:func:`capture_data` returns the whole :class:`DataVersionRecord` (what the run record keeps);
its ``version`` string is what goes into run identity, and equals what
:func:`stowplan.provenance.capture.data_version` always returned for local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import unquote, urlsplit

from msgspec import Struct

from stowplan.errors import SpecError
from stowplan.spec.canonical import canonical_json, sha256_hex

if TYPE_CHECKING:
    from stowplan.spec.loader import LoadedExperiment

__all__ = [
    "DataVersionRecord",
    "HashCache",
    "capture_data",
    "capture_inputs",
    "default_cache_path",
    "local_path",
]

log = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20
_UNVERSIONED_SCHEMES: Final = frozenset({"http", "https"})
_VERSION_KEYS: Final = ("VersionId", "version_id", "versionId", "generation")
_ETAG_KEYS: Final = ("ETag", "etag", "Etag", "md5Hash", "content_md5")

DataKind = Literal["file", "directory", "object", "pinned", "unpinned"]


class DataVersionRecord(Struct, frozen=True, kw_only=True):
    uri: str
    version: str
    """what goes into run identity: ``sha256:<hex>``, ``version:<id>``, ``etag:<etag>``, the
    pinned string, or ``unpinned:<uri>``."""
    kind: DataKind
    size: int | None = None
    mtime: float | None = None
    sha256: str | None = None
    etag: str | None = None
    version_id: str | None = None
    files: int | None = None
    """number of files, for a directory."""


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/stowplan/hash-cache.db`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stowplan" / "hash-cache.db"


class HashCache:
    """SHA-256 of local files keyed by (path, size, mtime, ctime, inode), in its own SQLite file.

    Only a cache: deleting the file costs one re-read of each dataset. Safe to share between
    processes (SQLite locking); the file is created on first use, and a cache that cannot be
    opened or written is logged and bypassed, never an error.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False
        self.hits = 0
        self.misses = 0

    def _db(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=10.0
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, "
                    "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, "
                    "inode INTEGER NOT NULL, sha256 TEXT NOT NULL)"
                )
                self._conn = conn
            except (OSError, sqlite3.Error) as e:
                log.warning("hash cache %s unusable, hashing without it: %s", self.path, e)
                self._broken = True
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sha256(self, path: Path) -> str:
        """The SHA-256 of a regular file, from the cache when its stat data is unchanged."""
        key = str(path.resolve())
        st = path.stat()
        stat_key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with self._lock:
            db = self._db()
            row = (
                None
                if db is None
                else db.execute(
                    "SELECT size, mtime_ns, ctime_ns, inode, sha256 FROM hashes WHERE path = ?",
                    (key,),
                ).fetchone()
            )
        if row is not None and tuple(row[:4]) == stat_key:
            self.hits += 1
            return str(row[4])
        self.misses += 1
        sha = file_sha256(path)
        # Stat again: a file written while it was read must not be cached under the new stat.
        st2 = path.stat()
        if (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns, st2.st_ino) == stat_key:
            try:
                with self._lock:
                    db = self._db()
                    if db is not None:
                        db.execute(
                            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
                            (key, *stat_key, sha),
                        )
            except sqlite3.Error as e:
                log.warning("cannot write the hash cache %s: %s", self.path, e)
        return sha


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def local_path(uri: str, base_dir: Path) -> Path | None:
    """The local path a URI names, or None for a remote scheme (s3://, https://, ...)."""
    if "://" not in uri:
        try:
            path = Path(uri).expanduser()
        except RuntimeError:  # ~someone for a user this machine does not know
            raise SpecError(
                f"data input {uri!r} names the home directory of an unknown user",
                hint="write the path out, or start it with ~/ for your own home",
            ) from None
        return path if path.is_absolute() else Path(base_dir) / path
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise SpecError(
            f"data input {uri!r} names a file on another host ({parts.netloc})",
            hint="use file:///absolute/path for a local file, or a remote scheme such as s3://",
        )
    return Path(unquote(parts.path))


def capture_data(
    uri: str, pinned: str | None, base_dir: Path, *, cache: HashCache | None = None
) -> DataVersionRecord:
    """The version of one data input, now; see the module docstring for what it is.

    Raises :class:`~stowplan.errors.SpecError` when a local input does not exist or a remote
    object cannot be looked up.
    """
    if pinned is not None:
        return DataVersionRecord(uri=uri, version=pinned, kind="pinned")
    path = local_path(uri, base_dir)
    if path is None:
        return _remote(uri)
    try:
        return _local(uri, path, cache)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        if isinstance(e, SpecError):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        raise SpecError(
            f"cannot read data input {uri!r}: {why}{where}",
            hint="point it at a regular file or directory you can read, or pin its version "
            "(inputs = [{ uri = ..., version = ... }])",
        ) from None


def capture_inputs(
    loaded: LoadedExperiment, *, cache: HashCache | None = None
) -> dict[str, DataVersionRecord]:
    """The version of every data input of an experiment, by URI (each URI captured once).

    An input that cannot be versioned is a SpecError naming the experiment file, the line and
    the input's ``$.tasks[i].inputs[j].uri``.
    """
    from stowplan.spec.loader import spec_error

    base = Path(loaded.directory)
    records: dict[str, DataVersionRecord] = {}
    for i, task in enumerate(loaded.spec.tasks):
        for j, spec in enumerate(task.inputs):
            if spec.uri in records:
                continue
            try:
                records[spec.uri] = capture_data(spec.uri, spec.version, base, cache=cache)
            except SpecError as e:
                raise spec_error(
                    loaded, f"$.tasks[{i}].inputs[{j}].uri", e.message, e.hint or "fix the uri"
                ) from None
    return records


def _local(uri: str, path: Path, cache: HashCache | None) -> DataVersionRecord:
    if path.is_file():
        st = path.stat()
        sha = cache.sha256(path) if cache is not None else file_sha256(path)
        return DataVersionRecord(
            uri=uri, version=f"sha256:{sha}", kind="file", size=st.st_size,
            mtime=st.st_mtime, sha256=sha,
        )  # fmt: skip
    if path.is_dir():
        manifest = _manifest(path, cache)
        sha = sha256_hex(canonical_json(manifest))
        return DataVersionRecord(
            uri=uri, version=f"sha256:{sha}", kind="directory",
            size=sum(e[1] for e in manifest), mtime=path.stat().st_mtime, sha256=sha,
            files=len(manifest),
        )  # fmt: skip
    if path.exists():
        raise SpecError(
            f"data input {uri!r} is neither a regular file nor a directory ({path})",
            hint="point it at a file or directory",
        )
    raise SpecError(
        f"data input {uri!r} does not exist (looked for {path})",
        hint="fix the path (relative paths start at the experiment file's directory), create "
        "the data first, or pin a version for data that lives elsewhere",
    )


def _manifest(root: Path, cache: HashCache | None) -> list[tuple[str, int, str]]:
    entries: list[tuple[str, int, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            p = here / name
            if p.is_symlink():
                rel = p.relative_to(root).as_posix()
                entries.append((rel, 0, "symlink:" + os.readlink(p)))
        for name in filenames:
            p = here / name
            rel = p.relative_to(root).as_posix()
            if not p.is_file():  # dangling link, socket, fifo: present, but no content
                entries.append((rel, 0, "special"))
                continue
            sha = cache.sha256(p) if cache is not None else file_sha256(p)
            entries.append((rel, p.stat().st_size, sha))
    entries.sort()
    return entries


def _first(info: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = info.get(k)
        if v not in (None, ""):
            return str(v).strip('"')
    return None


def _remote(uri: str) -> DataVersionRecord:
    scheme = urlsplit(uri).scheme.lower()
    unpinned = DataVersionRecord(uri=uri, version=f"unpinned:{uri}", kind="unpinned")
    if scheme in _UNVERSIONED_SCHEMES:
        return unpinned
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        # no implementation of this scheme installed here (s3fs, gcsfs, adlfs, ...)
        log.info("cannot version %s here (%s); recording it unpinned", uri, e)
        return unpinned
    try:
        info: dict[str, Any] = fs.info(path)
    except FileNotFoundError:
        raise SpecError(
            f"data input {uri!r} does not exist",
            hint="fix the URI, create the object first, or pin its version in the spec",
        ) from None
    except Exception as e:  # each fsspec backend raises its own SDK's errors
        raise SpecError(
            f"cannot look up data input {uri!r}: {type(e).__name__}: {e}",
            hint="check the credentials and the network, or pin its version in the spec "
            "(inputs = [{ uri = ..., version = ... }])",
        ) from None
    size = info.get("size")
    version_id = _first(info, _VERSION_KEYS)
    etag = _first(info, _ETAG_KEYS)
    if version_id is not None:
        version = f"version:{version_id}"
        sha = None
    elif etag is not None:
        version = f"etag:{etag}"
        sha = None
    elif info.get("type") == "directory":
        raise SpecError(
            f"data input {uri!r} is a directory in an object store without versions",
            hint="pin its version in the spec (version = ...)",
        )
    else:
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        sha = h.hexdigest()
        version = f"sha256:{sha}"
    mtime: float | None = None
    raw: Any = info.get("LastModified", info.get("mtime", info.get("created")))
    with contextlib.suppress(AttributeError, TypeError, ValueError, OverflowError):
        mtime = float(raw.timestamp()) if hasattr(raw, "timestamp") else float(raw)
    return DataVersionRecord(
        uri=uri, version=version, kind="object", size=None if size is None else int(size),
        mtime=mtime, sha256=sha, etag=etag, version_id=version_id,
    )  # fmt: skip
