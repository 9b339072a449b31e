"""Rebuild runs from their records: checks, a clean worktree, and the verdict.

Theory of operation (``stowplan replay`` drives these steps in this order, and nothing is
written or submitted until every check has passed):

1. :func:`check_record` verifies a run's record against its own hashes: the run id is the
   hash of its identity, the experiment id the hash of its spec, the task's spec hash, the
   provenance hash, the uncommitted diff's blob hash, and that identity, provenance and run
   agree. Any mismatch means the record was edited: refuse.
2. :func:`open_code` checks that the recorded commit is in the repository, then makes a clean
   detached ``git worktree`` at it (outside the project, in the user's cache directory) and
   applies the recorded diff with ``git apply``. A failure removes the worktree again.
3. :func:`check_data` re-versions every data input (relative paths inside the worktree): a
   version that is gone or changed is refused; an unpinned one is reported.
4. :func:`environment_differences` lists how this environment differs from the recorded one
   (Python, declared lock files, packages added, removed, changed), and
   :func:`captured_differences` how what the run actually imported (captured where it ran,
   :func:`used_by`) differs from what its interpreter has now; ``--strict-env`` refuses any.
5. The caller plans the replay runs from the *recorded* spec with the worktree as the
   experiment's directory: same parameters and seed, a new replicate number so the replay is
   a run of its own, pinned to the recorded hardware class when the scheduler supports it.
6. :func:`compare_outputs` compares each replay's artifacts with the original's: bit for bit,
   or for JSON outputs the numbers within a declared tolerance: REPRODUCED or DIFFERS.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from stowplan.errors import SpecError
from stowplan.provenance.query import RunView
from stowplan.provenance.records import ArtifactRecord
from stowplan.provenance.store import RunStore
from stowplan.spec.canonical import RunIdentity, canonical_json, sha256_hex, spec_hash

__all__ = [
    "CodeCheckout",
    "OutputVerdict",
    "captured_differences",
    "check_data",
    "check_record",
    "close_code",
    "compare_outputs",
    "environment_differences",
    "open_code",
    "recorded_experiment",
    "used_by",
]

GIT_TIMEOUT: Final = 120.0


def _refuse(run_id: str, message: str, hint: str) -> SpecError:
    return SpecError(f"cannot replay run {run_id[:12]}: {message}", hint=hint)


# -- 1. the record against its own hashes ------------------------------------------------------


def check_record(store: RunStore, view: RunView) -> None:
    """Raise SpecError when any part of the record disagrees with the hash that names it."""
    run = view.run
    rid = run.run_id
    tampered = "the record was changed after it was written; replay only untampered records"
    try:
        identity = msgspec.convert(run.identity, RunIdentity)
    except msgspec.ValidationError as e:
        raise _refuse(rid, f"its identity does not decode ({e})", tampered) from None
    if identity.run_id() != rid:
        raise _refuse(rid, "its identity no longer hashes to its run id", tampered)
    if identity.params != run.params or identity.seed != run.seed:
        raise _refuse(rid, "its parameters or seed differ from its identity", tampered)
    if identity.replicate != run.replicate or sorted(run.depends_on) != identity.upstream:
        raise _refuse(rid, "its replicate or upstream runs differ from its identity", tampered)
    exp = view.experiment
    if exp is None:
        raise _refuse(rid, f"its experiment {run.experiment_id[:12]} is not in the store", tampered)
    if spec_hash(exp.spec) != exp.id or exp.id != run.experiment_id:
        raise _refuse(rid, "its experiment's spec no longer hashes to the experiment id", tampered)
    task = view.task_spec
    if not task or spec_hash(task) != identity.task_spec_hash:
        raise _refuse(rid, f"the spec of task {run.task!r} no longer matches its hash", tampered)
    prov = view.provenance
    if prov is None:
        raise _refuse(rid, f"its provenance record {run.provenance[:12]} is missing", tampered)
    if sha256_hex(canonical_json(prov)) != run.provenance:
        raise _refuse(rid, "its provenance record no longer hashes to its id", tampered)
    if prov.code.get("version") != identity.code_version:
        raise _refuse(rid, "its code version differs from its provenance record", tampered)
    if prov.environment.get("env_hash") != identity.env_hash:
        raise _refuse(rid, "its environment hash differs from its provenance record", tampered)
    recorded = {u: d.get("version") for u, d in prov.data.items() if u in identity.data_versions}
    if recorded and recorded != {u: identity.data_versions[u] for u in recorded}:
        raise _refuse(rid, "its data versions differ from its provenance record", tampered)
    diff_sha = prov.code.get("diff_sha256")
    if diff_sha:
        try:
            blob = store.get_blob(str(diff_sha))
        except KeyError:
            raise _refuse(
                rid,
                f"its uncommitted diff (blob {str(diff_sha)[:12]}) is missing from the store",
                "restore the store's blobs/ directory from a backup",
            ) from None
        if sha256_hex(blob) != diff_sha:
            raise _refuse(rid, "its uncommitted diff's blob no longer matches its hash", tampered)
    for art in view.artifacts:
        if not (store.ensure_blob(art.sha256) and _blob_ok(store, art)):
            raise _refuse(
                rid,
                f"its output {art.name!r} (blob {art.sha256[:12]}) is missing or was changed",
                tampered,
            )


def _blob_ok(store: RunStore, art: ArtifactRecord) -> bool:
    import hashlib

    try:
        with open(store.blob_path(art.sha256), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == art.sha256
    except OSError:
        return False


def recorded_experiment(view: RunView, directory: Path, file: Path) -> Any:
    """A LoadedExperiment built from the recorded spec (not from any file), rooted at
    ``directory``: what the replay plans from."""
    from stowplan.spec.loader import LoadedExperiment
    from stowplan.spec.models import Experiment, Policy

    assert view.experiment is not None  # check_record ran first
    spec = dict(view.experiment.spec)
    policy = spec.pop("effective_policy", None) or {}
    return LoadedExperiment(
        spec=msgspec.convert(spec, Experiment),
        policy=msgspec.convert(policy, Policy),
        file=str(file),
        directory=str(directory),
        text="",
    )


# -- 2. the code -------------------------------------------------------------------------------


class CodeCheckout(msgspec.Struct, kw_only=True):
    repo: str
    worktree: str
    commit: str
    experiment_dir: str
    experiment_file: str
    applied_diff: bool


def _git(
    args: Sequence[str], cwd: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    git = shutil.which("git")
    if git is None:
        raise SpecError("cannot replay: git is not installed", hint="install git")
    return subprocess.run(
        [git, *args],
        cwd=cwd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=GIT_TIMEOUT,
        check=False,
    )


def worktrees_dir() -> Path:
    from stowplan.provenance.data import default_cache_path

    return default_cache_path().parent / "replays"


def check_code(view: RunView, repo_hint: Path) -> Path:
    """The repository holding the recorded commit; SpecError when there is none."""
    assert view.provenance is not None
    code = view.provenance.code
    rid = view.run.run_id
    commit = code.get("commit")
    if not commit or code.get("version") in ("no-git", "no-commit"):
        raise _refuse(
            rid,
            f"it was run from code that git did not track ({code.get('version')}), so there is "
            "no recorded code to rebuild",
            "run experiments from a git working tree to make them replayable",
        )
    top = _git(["rev-parse", "--show-toplevel"], repo_hint)
    if top.returncode != 0:
        raise _refuse(
            rid,
            f"{repo_hint} is not inside a git repository",
            "run replay from a clone of the repository the run came from (--project-dir)",
        )
    repo = Path(top.stdout.decode().strip())
    if _git(["cat-file", "-e", f"{commit}^{{commit}}"], repo).returncode != 0:
        remote = code.get("remote_url")
        where = f" (recorded remote: {remote})" if remote else ""
        raise _refuse(
            rid,
            f"its commit {commit} is not in the repository at {repo}{where}",
            "fetch the commit (git fetch --all, or from the recorded remote) and try again; a "
            "commit that was rewritten away cannot be replayed",
        )
    return repo


def open_code(store: RunStore, view: RunView, repo: Path) -> CodeCheckout:
    """A clean detached worktree at the recorded commit with the recorded diff applied."""
    assert view.provenance is not None
    code = view.provenance.code
    rid = view.run.run_id
    commit = str(code["commit"])
    base = worktrees_dir()
    base.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix=f"{rid[:12]}-", dir=base))
    tree.rmdir()  # git worktree add wants to create it
    done = _git(["worktree", "add", "--detach", "--quiet", str(tree), commit], repo)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()
        raise _refuse(
            rid,
            f"git could not check out {commit[:12]}: {why}",
            "check the repository (git worktree prune) and try again",
        )
    checkout = CodeCheckout(
        repo=str(repo),
        worktree=str(tree),
        commit=commit,
        experiment_dir="",
        experiment_file="",
        applied_diff=False,
    )
    try:
        diff_sha = code.get("diff_sha256")
        if diff_sha:
            patch = store.get_blob(str(diff_sha))
            applied = _git(["apply", "--binary", "--whitespace=nowarn", "-"], tree, stdin=patch)
            if applied.returncode != 0:
                raise _refuse(
                    rid,
                    "the recorded uncommitted diff does not apply to its commit: "
                    + applied.stderr.decode(errors="replace").strip(),
                    "the record may be damaged; compare it with stowplan show --json",
                )
            checkout.applied_diff = True
        rel_file = code.get("experiment_file") or ""
        subdir = code.get("subdir") or "."
        checkout.experiment_dir = str((tree / subdir).resolve())
        checkout.experiment_file = str(tree / rel_file) if rel_file else ""
        return checkout
    except BaseException:
        close_code(checkout)
        raise


def close_code(checkout: CodeCheckout) -> None:
    """Remove the worktree (and git's note of it)."""
    _git(["worktree", "remove", "--force", checkout.worktree], Path(checkout.repo))
    shutil.rmtree(checkout.worktree, ignore_errors=True)
    _git(["worktree", "prune"], Path(checkout.repo))


def code_matches(view: RunView, checkout: CodeCheckout) -> str | None:
    """None when the worktree's code version is the recorded one, else what differs."""
    from stowplan.provenance.capture import capture_code

    assert view.provenance is not None
    now, _ = capture_code(Path(checkout.experiment_dir))
    want = view.provenance.code.get("version")
    if now.version == want:
        return None
    return f"the rebuilt code is {now.version}, the record says {want}"


# -- 3. data -----------------------------------------------------------------------------------


def check_data(view: RunView, experiment_dir: Path) -> list[str]:
    """Refuse a data input whose recorded version is gone; return notes on unpinned inputs."""
    from stowplan.provenance.data import HashCache, capture_data, default_cache_path

    rid = view.run.run_id
    notes: list[str] = []
    recorded: dict[str, str] = view.run.identity.get("data_versions", {})
    pinned = {i.get("uri"): i.get("version") for i in view.task_spec.get("inputs", [])}
    with HashCache(default_cache_path()) as cache:
        for uri, version in sorted(recorded.items()):
            if version.startswith("unpinned:"):
                notes.append(f"data {uri} was not versioned when recorded: cannot check it")
                continue
            try:
                now = capture_data(uri, pinned.get(uri), experiment_dir, cache=cache).version
            except SpecError as e:
                raise _refuse(
                    rid,
                    f"its data input {uri} (version {version}) is gone: {e.message}",
                    "restore that version of the data (or its object version) and try again",
                ) from None
            if now != version:
                raise _refuse(
                    rid,
                    f"its data input {uri} has changed: recorded {version}, now {now}; the "
                    "recorded version is gone",
                    "restore that version of the data and try again",
                )
    return notes


# -- 4. environment ----------------------------------------------------------------------------


def environment_differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How the environment ``now`` differs from ``recorded``, one line per difference."""
    out: list[str] = []
    pa = (recorded.get("python") or {}).get("version")
    pb = (now.get("python") or {}).get("version")
    if pa != pb:
        out.append(f"python {pa} -> {pb}")

    def split(ds: list[str]) -> dict[str, str]:
        return {d.partition("==")[0]: d.partition("==")[2] for d in ds}

    a = split(list(recorded.get("distributions", [])))
    b = split(list(now.get("distributions", [])))
    out += [f"package added: {n}=={b[n]}" for n in sorted(set(b) - set(a))]
    out += [f"package removed: {n}=={a[n]}" for n in sorted(set(a) - set(b))]
    out += [
        f"package changed: {n} {a[n]} -> {b[n]}" for n in sorted(set(a) & set(b)) if a[n] != b[n]
    ]
    la: dict[str, str] = dict(recorded.get("lock_files") or {})
    lb: dict[str, str] = dict(now.get("lock_files") or {})
    for name in sorted(set(la) | set(lb)):
        if name not in lb:
            out.append(f"declared: lock file {name} is gone")
        elif name not in la:
            out.append(f"declared: lock file {name} is new")
        elif la[name] != lb[name]:
            out.append(f"declared: lock file {name} changed")
    return out


def used_by(store: RunStore, view: RunView, providers: Mapping[str, Any], state_dir: Path) -> Any:
    """What the run's succeeded attempt imported (a ``provenance.imports.UsedRecord``), as its
    launcher captured it; None where nothing was captured or the record is out of reach."""
    from stowplan.provenance.imports import used_records

    return used_records(store, [view.run.run_id], providers, state_dir).get(view.run.run_id)


def captured_differences(used: Any, checker: Any = None) -> list[str]:
    """How what a run imported differs from what the interpreter it ran has now, one line
    each (``used package changed: numpy 1.26.4 -> 2.0.0``); [] when nothing was captured."""
    if used is None:
        return []
    from stowplan.provenance.imports import UsedChecker

    check = checker if checker is not None else UsedChecker()
    out = []
    for c in check.changes(used):
        if c.now is None:
            out.append(f"used package gone: {c.name}=={c.was}")
        else:
            out.append(f"used package changed: {c.name} {c.was} -> {c.now}")
    return out


# -- 6. verdict --------------------------------------------------------------------------------


class OutputVerdict(msgspec.Struct, kw_only=True):
    name: str
    same: bool
    how: str
    """``identical``, ``within tolerance``, ``differs``, ``missing`` or ``extra``."""
    details: list[str] = msgspec.field(default_factory=list)


def _json_numbers(path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def compare_outputs(
    original: Sequence[ArtifactRecord],
    replay: Sequence[ArtifactRecord],
    *,
    tolerance: float | None = None,
    tolerances: Mapping[str, float] | None = None,
) -> list[OutputVerdict]:
    """Each output of the original against the replay's: bit for bit, else (JSON objects with
    a tolerance declared) every numeric value within its tolerance and the rest equal."""
    tols = dict(tolerances or {})
    a = {x.name: x for x in original}
    b = {x.name: x for x in replay}
    out: list[OutputVerdict] = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            out.append(OutputVerdict(name=name, same=False, how="missing"))
            continue
        if name not in a:
            out.append(OutputVerdict(name=name, same=False, how="extra"))
            continue
        if a[name].sha256 == b[name].sha256:
            out.append(OutputVerdict(name=name, same=True, how="identical"))
            continue
        ja, jb = _json_numbers(a[name].path), _json_numbers(b[name].path)
        if (tolerance is None and not tols) or ja is None or jb is None:
            out.append(
                OutputVerdict(
                    name=name,
                    same=False,
                    how="differs",
                    details=[f"sha256 {a[name].sha256[:12]} -> {b[name].sha256[:12]}"],
                )
            )
            continue
        details: list[str] = []
        for key in sorted(set(ja) | set(jb)):
            x, y = ja.get(key), jb.get(key)
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
            tol = tols.get(key, tolerance)
            if numeric and tol is not None:
                assert isinstance(x, int | float) and isinstance(y, int | float)
                if not math.isclose(x, y, rel_tol=0.0, abs_tol=tol):
                    details.append(f"{key}: {x} -> {y} (|diff| {abs(x - y):.3g} > {tol:g})")
            elif x != y:
                details.append(f"{key}: {x!r} -> {y!r}")
        out.append(
            OutputVerdict(
                name=name,
                same=not details,
                how="within tolerance" if not details else "differs",
                details=details,
            )
        )
    return out
