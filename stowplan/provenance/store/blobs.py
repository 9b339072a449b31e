"""Content-addressed blob files, and their copies in a remote blob store.

Blobs live at ``<dir>/<2 hex>/<62 hex>`` by their SHA-256, written to a temporary file and
renamed into place, so a reader never sees half a blob; a blob is never deleted. With a remote
blob store (``blob_url``, or ``$STOWPLAN_BLOB_URL``: any fsspec URL) every blob is also copied
there, and a blob missing here is fetched from there (and checked against its hash), so
records can move without their blobs directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Final, Protocol

from stowplan.errors import StowplanError
from stowplan.spec.canonical import sha256_hex

__all__ = ["BLOB_URL_ENV", "BlobStore", "Readable"]

log = logging.getLogger(__name__)

BLOB_URL_ENV: Final = "STOWPLAN_BLOB_URL"
"""Environment variable naming a remote blob store (an fsspec URL) for every store opened."""

_COPY_CHUNK: Final = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Readable(Protocol):
    """What :meth:`BlobStore.put_stream` reads from."""

    def read(self, n: int = ..., /) -> bytes: ...


class BlobStore:
    """Immutable blobs by SHA-256 in ``directory``, mirrored to ``url`` when there is one."""

    def __init__(self, directory: Path, url: str | None = None) -> None:
        self.directory = directory
        self.url = (url or os.environ.get(BLOB_URL_ENV) or "").rstrip("/") or None
        """An fsspec URL (``s3://bucket/prefix``, ``file:///mnt/share``, ...) every blob is
        also copied to, and read back from when the local copy is missing."""

    def path(self, sha: str) -> Path:
        """Where the blob with this SHA-256 lives (whether or not it exists)."""
        if _HEX64.fullmatch(sha) is None:
            raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
        return self.directory / sha[:2] / sha[2:]

    def put(self, data: bytes) -> str:
        """Store bytes by content; returns their SHA-256. Storing them again is a no-op."""
        sha = sha256_hex(data)
        dest = self.path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                _publish(tmp, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        self._upload(sha)
        return sha

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int, Path]:
        """Copy a file into the blob store by content, streaming; returns (sha256, size, path)."""
        with open(path, "rb") as src:
            return self.put_stream(src)

    def put_stream(self, src: Readable) -> tuple[str, int, Path]:
        """Copy what ``src`` reads (an open file, an fsspec file, a member of a tar stream)
        into the blob store by content, in chunks of ``_COPY_CHUNK`` bytes, never whole in
        memory; returns (sha256, size, path). ``src`` is read to its end, not closed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha = h.hexdigest()
            dest = self.path(sha)
            if dest.exists():
                os.unlink(tmp)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _publish(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._upload(sha)
        return sha, size, dest

    def ensure(self, sha: str) -> bool:
        """Whether the blob is here, fetching it from the remote blob store when it is not
        (checked against its hash on the way in)."""
        dest = self.path(sha)
        if dest.exists():
            return True
        if self.url is None:
            return False
        try:
            fs, src = self._remote(sha)
            data = fs.cat_file(src)
        except (ImportError, ValueError, OSError):
            return False
        if sha256_hex(data) != sha:
            log.warning("remote blob %s in %s does not match its hash; ignored", sha, self.url)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, dest)
        return True

    def get(self, sha: str) -> bytes:
        """The bytes stored under ``sha`` (from the remote blob store when not here);
        ``KeyError`` when there is no such blob."""
        self.ensure(sha)
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"no blob {sha}") from None

    def _remote(self, sha: str) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, f"{root.rstrip('/')}/sha256/{sha[:2]}/{sha[2:]}"

    def _upload(self, sha: str) -> None:
        """Copy a local blob to the remote blob store unless it is there already."""
        if self.url is None:
            return
        try:
            fs, dest = self._remote(sha)
            if not fs.exists(dest):
                fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                # upload under a temporary name, then move: readers never see half a blob
                tmp = f"{dest}.tmp-{os.getpid()}-{threading.get_ident()}"
                fs.put_file(str(self.path(sha)), tmp)
                fs.mv(tmp, dest)
        except (ImportError, ValueError, OSError) as e:
            raise StowplanError(
                f"cannot copy blob {sha[:12]} to the blob store {self.url}: {e}"
            ) from None


def _publish(tmp: str, dest: Path) -> None:
    # Blobs are immutable: read-only, like git's objects. os.replace is atomic, so a
    # concurrent writer of the same content simply wins or loses the rename.
    os.chmod(tmp, 0o444)
    os.replace(tmp, dest)
