"""A run's outputs: copied into the blob store by content, recorded by name in ``artifacts``,
and the lookups by content, hash prefix and name that lineage and ``find`` make."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from stowplan.errors import StowplanError
from stowplan.provenance.records import ArtifactRecord
from stowplan.provenance.store.blobs import BlobStore
from stowplan.provenance.store.database import HEX, Database, rows_in

__all__ = ["ArtifactTables", "ArtifactsNotStored"]


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
                sha, size, _ = self.blobs.put_file(files[name])
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
