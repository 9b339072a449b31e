"""A run's outputs: copied into the blob store by content, recorded by name in ``artifacts``,
and the lookups by content, hash prefix and name that lineage and ``find`` make."""

from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from stowplan.errors import StowplanError
from stowplan.provenance.records import ArtifactRecord
from stowplan.provenance.store.blobs import BlobStore, Readable
from stowplan.provenance.store.database import HEX, Database, rows_in

__all__ = ["ArtifactTables", "ArtifactsNotStored", "is_url", "remote_outputs"]


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


class ArtifactTables(Database):
    """Reads and writes of ``artifacts``, whose content lives in :attr:`blobs`."""

    blobs: BlobStore

    def put_artifacts(self, run_id: str, outputs: Mapping[str, str]) -> list[ArtifactRecord]:
        """Copy a run's outputs into the blob store and record them, sorted by name.

        ``outputs`` maps an output name to a local path or an fsspec URL (``s3://``,
        ``gs://``, ``file://``, ``memory://``...: an output a remote driver left in object
        storage, read with the credentials of the environment; see :func:`remote_outputs`). A
        file is one artifact with that name; a directory is one artifact per file under it,
        named ``<name>/<path inside it>`` (the names ``show``, ``lineage``, ``find`` and
        ``replay --verify`` use). A path ending in its name (``<dir>/d/x`` for ``d/x``) must
        stay inside ``<dir>``, links included; any other path must stay inside its parent
        directory (the rule of ``scan_outputs``). Putting the same outputs again changes
        nothing; putting a name again with other content records the new content.

        Every output that can be stored is stored and recorded, even when others cannot; then
        ``ArtifactsNotStored`` names each one that was not, and why.
        """
        from stowplan.providers.launcher import scan_outputs

        files: dict[str, Path] = {}
        failed: list[str] = []
        remote: dict[str, tuple[str, int]] = {}
        for name in sorted(outputs):
            if is_url(outputs[name]):
                got, refused = remote_outputs(self.blobs, name, outputs[name])
                remote.update(got)
                failed.extend(refused)
                continue
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
                sha, size, _ = self.blobs.put_file(files[name])
            except (OSError, StowplanError) as e:
                failed.append(f"{name}: cannot be stored: {e}")
                continue
            stored.append((name, sha, size))
        if remote:
            by_name = {name: (sha, size) for name, sha, size in stored} | remote
            stored = [(name, *by_name[name]) for name in sorted(by_name)]
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
            for row in rows_in(c, sql, ids):
                out.setdefault(row[0], []).append(self._artifact(*row))
        return out

    def _artifact(self, run_id: str, name: str, sha: str, size: int) -> ArtifactRecord:
        # The path is derived, not stored, so a store directory can be moved or copied whole.
        return ArtifactRecord(
            run_id=run_id, name=name, sha256=sha, size=size, path=str(self.blobs.path(sha))
        )

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
        if HEX.fullmatch(p) is None:
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


# -- outputs that live remotely ---------------------------------------------------------------

_URL: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_ARCHIVE: Final = ".tar.gz"
_LINK_HOPS: Final = 40
"""Links followed from one archive entry before it is called a loop (Linux's MAXSYMLINKS)."""
_NOWHERE: Final = "/stowplan-archive"
"""The destination the ``data`` filter checks entries against; nothing is ever written there."""


def is_url(where: str) -> bool:
    """Whether an output's location is an fsspec URL (``scheme://...``) and not a local path."""
    return _URL.match(where) is not None


def remote_outputs(
    blobs: BlobStore, name: str, url: str
) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """Stream the output ``name`` that lives at ``url`` into ``blobs``: the artifacts stored
    (artifact name -> (sha256, size)) and why each thing that was not, was not. Never raises.

    The contract with remote drivers: a file output is the object at ``url``, stored under
    ``name``. A directory output (``name`` ends in ``/``) is a gzipped tar at a URL ending in
    ``.tar.gz``, as ``tar -czf OUT -- PATH`` writes it in the attempt directory: its entries
    are named by their path from there (``PATH/a.txt``, ``./PATH/a.txt``), each regular file
    under ``PATH/`` becoming the artifact ``<name>/<path inside>``, as a local directory does.
    Nothing is unpacked to disk: each file streams from the archive into the blob store.
    Refused, each on its own while the rest are stored: an absolute entry, an entry with a
    ``..`` component, an entry outside ``PATH/``, anything but a regular file, a directory or
    a link, and a link that does not lead (through at most 40 links, inside ``PATH/``) to a
    regular file of the archive (a link to a directory is not followed). A missing object is
    "does not exist". Credentials come from the environment (``AWS_*``, ``AWS_ENDPOINT_URL``,
    ...); what is said about a URL leaves out any user, password and query string.
    """
    shown = _shown(url)
    clean = PurePosixPath(name).as_posix()
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        src = fs.open(path, "rb")
    except FileNotFoundError:
        return {}, [f"{name}: {shown} does not exist"]
    except Exception as e:  # an unknown scheme, a missing SDK, no network, no credentials
        return {}, [f"{name}: cannot be read from {shown}: {_why(e, url, shown)}"]
    try:
        with src:
            if not name.endswith("/"):
                sha, size, _ = blobs.put_stream(src)
                return {name: (sha, size)}, []
            if not urlsplit(url).path.endswith(_ARCHIVE):
                return {}, [
                    f"{name}: declared as a directory, but {shown} is not a .tar.gz archive"
                ]
            return _unpack(blobs, name, clean, src, shown, url)
    except FileNotFoundError:
        return {}, [f"{name}: {shown} does not exist"]
    except Exception as e:
        return {}, [f"{name}: cannot be stored from {shown}: {_why(e, url, shown)}"]


def _unpack(
    blobs: BlobStore, name: str, clean: str, src: Readable, shown: str, url: str
) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """The files of a directory output's archive, streamed member by member."""
    from stowplan.providers.launcher import OUTPUT_FILES_MAX

    stored: dict[str, tuple[str, int]] = {}  # archive path -> content
    links: dict[str, tuple[str | None, str]] = {}  # archive path -> (where it leads, or why not)
    dirs: set[str] = {clean}
    failed: list[str] = []
    budget = OUTPUT_FILES_MAX
    try:
        with tarfile.open(fileobj=src, mode="r|gz") as tar:  # type: ignore[call-overload]
            for member in tar:
                budget -= 1
                if budget < 0:
                    failed.append(f"{name}: more than {OUTPUT_FILES_MAX} entries")
                    break
                path, why = _entry(member.name, clean)
                if path is None:
                    if why:
                        failed.append(f"{name}: {why}")
                    elif not member.isdir():
                        failed.append(f"{name}: declared as a directory, but is a file")
                    continue
                if member.isdir():
                    dirs.add(path)
                    continue
                art = name + path[len(clean) + 1 :]
                if not (member.isreg() or member.issym() or member.islnk()):
                    failed.append(f"{art}: not a regular file, directory or link")
                    continue
                if member.issym() or member.islnk():
                    links[path] = _link(member, path, clean)
                    if links[path][0] is None:
                        continue
                try:
                    _data_filter(member)
                except tarfile.FilterError as e:
                    links.pop(path, None)
                    failed.append(f"{art}: refused: {str(e).replace(_NOWHERE, '')}")
                    continue
                if member.issym() or member.islnk():
                    continue
                reader = tar.extractfile(member)
                if reader is None:  # a regular file always has a reader; be total anyway
                    failed.append(f"{art}: not a regular file, directory or link")
                    continue
                sha, size, _ = blobs.put_stream(reader)
                stored[path] = (sha, size)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        failed.append(f"{name}: {shown} is not a readable .tar.gz archive: {_why(e, url, shown)}")
    for path in sorted(links):
        content, why = _follow(path, links, stored, dirs)
        art = name + path[len(clean) + 1 :]
        if content is None:
            failed.append(f"{art}: {why}")
        else:
            stored[path] = content
    return {name + p[len(clean) + 1 :]: v for p, v in stored.items()}, failed


def _entry(member: str, clean: str) -> tuple[str | None, str]:
    """An archive entry's path when it is under ``clean/``; else why it is left out (or ""
    for the directory itself and the directories above it, which hold nothing to store)."""
    if "\0" in member:
        return None, f"archive entry {member!r} has a NUL byte"
    if member.startswith("/"):
        return None, f"archive entry {member!r} is an absolute path"
    if ".." in PurePosixPath(member).parts:
        return None, f"archive entry {member!r} has a '..' component"
    path = PurePosixPath(member).as_posix()
    if path.startswith(clean + "/"):
        return path, ""
    if path == "." or path == clean or clean.startswith(path + "/"):
        return None, ""
    return None, f"archive entry {member!r} is outside {clean}/"


def _link(member: tarfile.TarInfo, path: str, clean: str) -> tuple[str | None, str]:
    """Where a link entry leads, as an archive path under ``clean/``, or why it leads nowhere."""
    target = member.linkname
    if target.startswith("/"):
        return None, f"a link to {target}, an absolute path"
    # a symbolic link is relative to its directory, a hard link to the archive's root
    joined = posixpath.join(posixpath.dirname(path), target) if member.issym() else target
    lead = posixpath.normpath(joined)
    if not lead.startswith(clean + "/") and lead != clean:
        return None, f"a link that leads outside {clean}/"
    return lead, ""


def _follow(
    path: str,
    links: Mapping[str, tuple[str | None, str]],
    stored: Mapping[str, tuple[str, int]],
    dirs: set[str],
) -> tuple[tuple[str, int] | None, str]:
    """The content a link entry leads to, or why it leads to none."""
    at = path
    for _ in range(_LINK_HOPS):
        lead, why = links[at]
        if lead is None:
            return None, why
        if lead in stored:
            return stored[lead], ""
        if lead in dirs:
            return None, "a link to a directory, not followed in an archive"
        if lead not in links:
            return None, f"a link to {lead}, which is not a file in the archive"
        at = lead
    return None, "a link loop"


def _data_filter(member: tarfile.TarInfo) -> None:
    """The ``data`` extraction filter (Python 3.12, and 3.8.17+ backports), as a last check:
    what it would refuse to extract is refused, though nothing is extracted."""
    check = getattr(tarfile, "data_filter", None)
    if check is not None:
        check(member, _NOWHERE)


def _shown(url: str) -> str:
    """A URL as it may be shown and stored: without user, password, query or fragment (a
    presigned URL's signature is in its query)."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return url.split("://", 1)[0] + "://..."


def _why(e: BaseException, url: str, shown: str) -> str:
    text = str(e).replace(url, shown)
    parts = urlsplit(url)
    if "@" in parts.netloc:
        text = text.replace(parts.netloc.rpartition("@")[0], "...")
    if parts.query:
        text = text.replace(parts.query, "...")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
