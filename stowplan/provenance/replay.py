"""Rebuild runs from their records: checks, a clean worktree, and the verdict.

Theory of operation. ``stowplan replay`` calls four functions in this order and renders what
they return; every decision is made here, and nothing is written or submitted until every
check has passed:

- :func:`plan_replay` picks the runs (run id prefixes, or the first replicate of an
  experiment's original runs), checks each record and its upstream runs (steps 1 and 4 below),
  that the recorded commit is reachable, and what ``--strict-env`` refuses: a :class:`ReplayPlan`.
- :func:`checked_out` holds the worktree (step 2) while the replay runs;
- :func:`build_replay` checks the data in it (step 3) and plans the replay runs and their
  hardware pins (step 5): a :class:`ReplayBuild` for the caller to dispatch, with
  :func:`record_replay` writing its links and ledger entry when the runs are recorded;
- :func:`verify_replay`, once the runs are final, gives each its verdict (step 6) and records
  it: a :class:`ReplayOutcome`.

The steps:

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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from stowplan.errors import SpecError
from stowplan.provenance.query import RunView, load_view
from stowplan.provenance.records import ArtifactRecord, ReplayRecord
from stowplan.provenance.store import RunStore
from stowplan.spec.canonical import RunIdentity, canonical_json, sha256_hex, spec_hash
from stowplan.spec.loader import LoadedProject
from stowplan.spec.models import ProviderConfig

if TYPE_CHECKING:
    from stowplan.session import Prepared

__all__ = [
    "CodeCheckout",
    "OutputVerdict",
    "ReplayBuild",
    "ReplayOutcome",
    "ReplayPlan",
    "ReplayResult",
    "Verdict",
    "build_replay",
    "captured_differences",
    "check_data",
    "check_record",
    "checked_out",
    "close_code",
    "compare_outputs",
    "environment_differences",
    "open_code",
    "plan_replay",
    "record_replay",
    "recorded_experiment",
    "replay_targets",
    "used_by",
    "verify_replay",
]

Verdict = Literal["REPRODUCED", "DIFFERS"]

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


# -- the whole replay --------------------------------------------------------------------------


class ReplayPlan(msgspec.Struct, kw_only=True):
    """What the checks before any code is checked out decided (:func:`plan_replay`)."""

    project: LoadedProject
    state_dir: str
    store_path: str
    providers: dict[str, ProviderConfig]
    """The providers the replay may run on: all configured, or the one ``--provider`` named."""
    provider: str | None
    views: list[RunView]
    """The runs to replay, each record checked against its hashes, in the order named."""
    upstream: list[str]
    """The recorded upstream runs (all SUCCEEDED): their outputs are the replay's inputs."""
    repo: str
    """The repository that holds the recorded commit."""
    diff: bytes
    """The recorded uncommitted diff (empty when there was none)."""
    environment: dict[str, Any]
    """This environment, as the replay's provenance records it."""
    environment_differences: list[str]


class ReplayBuild(msgspec.Struct, kw_only=True):
    """The replay runs, planned in the worktree and ready to dispatch (:func:`build_replay`)."""

    prepared: Prepared
    replay_of: dict[str, str]
    """Original run id -> its replay's run id, in planned order."""
    pins: dict[str, str | None]
    """Replay run id -> the hardware class it is pinned to (None: runs unpinned)."""
    pin_supported: bool
    """Whether the scheduler can pin a hardware class at all."""
    notes: list[str]
    """What the replay could not check or rebuild exactly (unpinned data, another code version)."""
    commit: str
    applied_diff: bool
    at: float
    """When the replay was recorded: its links and verdicts carry this time."""

    @property
    def todo(self) -> list[str]:
        """The replay run ids, in planned order."""
        return [p.run_id for p in self.prepared.planned]


class ReplayResult(msgspec.Struct, kw_only=True):
    run_id: str
    of: str
    task: str
    index: int
    state: str
    """The replay's final state (``MISSING`` when it never reached the store)."""
    verdict: Verdict | None
    """None unless verified."""
    differences: list[str]
    outputs: list[OutputVerdict]
    hardware_class: str | None


class ReplayOutcome(msgspec.Struct, kw_only=True):
    """Every replay's end (:func:`verify_replay`); its fields are ``replay --json``'s."""

    verdict: Verdict | None
    """REPRODUCED when every replay was; None unless verified."""
    commit: str
    diff_applied: bool
    environment_differences: list[str]
    notes: list[str]
    replays: list[ReplayResult]

    @property
    def ok(self) -> bool:
        """Every replay succeeded and, when verified, reproduced its original."""
        return self.verdict != "DIFFERS" and all(r.state == "SUCCEEDED" for r in self.replays)


def replay_targets(store: RunStore, targets: Sequence[str]) -> list[str]:
    """Run ids from run id prefixes, or every original run of an experiment named (its lowest
    replicate)."""
    ids: list[str] = []
    for t in targets:
        try:
            ids.append(store.resolve_run(t))
            continue
        except ValueError as e:
            raise SpecError(str(e.args[0]), hint="give more characters of the run id") from None
        except KeyError:
            pass
        exps = store.find_experiment(t)
        if not exps:
            raise SpecError(
                f"{t!r} is neither a run id nor an experiment name",
                hint="see stowplan status and stowplan ls",
            )
        runs = [
            r
            for r in store.runs_for_experiment(exps[0].id)
            if store.replay_source(r.run_id) is None
        ]
        if runs:
            low = min(r.replicate for r in runs)
            ids += [r.run_id for r in runs if r.replicate == low]
    return list(dict.fromkeys(ids))


def plan_replay(
    project: LoadedProject,
    targets: Sequence[str],
    *,
    provider: str | None = None,
    strict_env: bool = False,
    may_read: Callable[[str], None] | None = None,
) -> ReplayPlan:
    """Every check that needs neither the code checked out nor anything written: the runs
    named, their records and their upstream runs', the recorded commit, and the environment
    (``strict_env`` refuses any difference). SpecError names the first refusal.
    ``may_read(experiment_id)`` raises unless the caller may read that experiment's runs (the
    service): called on each run named before anything is said about it."""
    from stowplan.provenance.capture import capture_environment
    from stowplan.session import project_paths

    state_dir, store_path = project_paths(project)
    if not store_path.exists():
        raise SpecError(f"no run store at {store_path}", hint="pass --project-dir")
    providers = dict(project.config.providers)
    if provider is not None:
        if provider not in providers:
            raise SpecError(
                f"--provider {provider!r} is not configured",
                file=project.file or "stowplan.toml",
                path="$.providers",
                hint="use one of: " + ", ".join(sorted(providers)),
            )
        providers = {provider: providers[provider]}

    with RunStore(store_path) as store:
        ids = replay_targets(store, targets)
        if not ids:
            raise SpecError("nothing to replay", hint="name a run id or an experiment")
        views = [load_view(store, i) for i in ids]
        if may_read is not None:
            for v in views:
                may_read(v.run.experiment_id)
        for v in views:
            check_record(store, v)
        for d in sorted({d for v in views for d in v.run.depends_on}):
            # upstream outputs are the replay's inputs: they must be intact too
            check_record(store, load_view(store, d))
        first = views[0]
        assert first.provenance is not None  # check_record refuses a run without one
        if len({(v.run.experiment_id, v.run.identity.get("code_version")) for v in views}) > 1:
            raise SpecError(
                "these runs come from different experiments or code versions",
                hint="replay the runs of one experiment version at a time",
            )
        upstream = sorted({d for v in views for d in v.run.depends_on})
        states = store.run_states(upstream)
        for d in upstream:
            if states.get(d, ("missing", 0))[0] != "SUCCEEDED":
                raise SpecError(
                    f"cannot replay: upstream run {d[:12]} did not succeed "
                    f"({states.get(d, ('missing', 0))[0]})",
                    hint="a replay reads what its original read: run the upstream runs first",
                )
        repo = check_code(first, Path(project.root))
        diff_sha = first.provenance.code.get("diff_sha256")
        patch = store.get_blob(diff_sha) if diff_sha else b""

    env_now = capture_environment(lock_dirs=[Path(project.root)])
    env_diffs = environment_differences(first.provenance.environment, env_now)
    with RunStore(store_path) as store:
        # what the run imported, captured where it ran, against what its interpreter has now
        env_diffs += captured_differences(
            used_by(store, first, project.config.providers, state_dir)
        )
    if env_diffs and strict_env:
        shown = "\n  ".join(env_diffs[:20])
        raise SpecError(
            f"cannot replay with --strict-env: the environment differs from the record:\n  {shown}",
            hint="install the recorded versions (stowplan show RUN --json lists them), or "
            "drop --strict-env",
        )
    return ReplayPlan(
        project=project,
        state_dir=str(state_dir),
        store_path=str(store_path),
        providers=providers,
        provider=provider,
        views=views,
        upstream=upstream,
        repo=str(repo),
        diff=patch,
        environment=env_now,
        environment_differences=env_diffs,
    )


@contextmanager
def checked_out(plan: ReplayPlan, *, keep: bool = False) -> Iterator[CodeCheckout]:
    """The recorded code in a clean worktree (:func:`open_code`) for as long as the replay
    runs in it; removed afterwards unless ``keep``."""
    with RunStore(Path(plan.store_path)) as store:
        checkout = open_code(store, plan.views[0], Path(plan.repo))
    try:
        yield checkout
    finally:
        if not keep:
            close_code(checkout)


def build_replay(plan: ReplayPlan, checkout: CodeCheckout) -> ReplayBuild:
    """Check the data in the worktree, then plan the replay runs from the recorded spec: same
    parameters and seed, the lowest replicate number that names a run of its own, the recorded
    upstream runs as inputs, pinned to the recorded hardware class where the scheduler can.
    SpecError when the recorded spec no longer plans to the run it recorded."""
    from stowplan.provenance.capture import capture_code, capture_hardware, code_context
    from stowplan.provenance.data import HashCache, capture_data, default_cache_path
    from stowplan.provenance.records import ProvenanceRecord
    from stowplan.scheduler.events import TaskInstance
    from stowplan.scheduler.plan import PlannedRun, Versions, plan_runs
    from stowplan.session import Prepared

    views = plan.views
    first = views[0]
    assert first.provenance is not None and first.experiment is not None  # plan_replay checked
    directory = Path(checkout.experiment_dir)
    notes: list[str] = []
    for v in views:
        notes += check_data(v, directory)
    mismatch = code_matches(first, checkout)
    if mismatch is not None:
        notes.append(mismatch)
    loaded = recorded_experiment(
        first, directory, Path(checkout.experiment_file or checkout.experiment_dir)
    )
    recorded_data: dict[str, str] = {}
    for v in views:
        recorded_data.update(v.run.identity.get("data_versions", {}))
    versions = Versions(
        code_version=str(first.run.identity["code_version"]),
        env_hash=str(plan.environment["env_hash"]),
        data_versions=recorded_data,
    )
    plans: dict[int, list[PlannedRun]] = {}
    order: dict[tuple[int, str, int], tuple[int, PlannedRun]] = {}
    for v in views:
        rep = v.run.replicate
        if rep not in plans:
            plans[rep] = plan_runs(
                loaded, versions, project=first.experiment.project, replicate=rep
            )
        for pos, p in enumerate(plans[rep]):
            order[(rep, p.task, p.index)] = (pos, p)
    pin_supported = "hardware_class" in TaskInstance.__struct_fields__
    replay_of: dict[str, str] = {}
    planned: list[PlannedRun] = []
    pins: dict[str, str | None] = {}
    with RunStore(Path(plan.store_path)) as store:
        for v in sorted(views, key=lambda v: order[(v.run.replicate, v.run.task, v.run.index)][0]):
            _, p = order[(v.run.replicate, v.run.task, v.run.index)]
            ident = RunIdentity(**v.run.identity)
            if p.identity.task_spec_hash != ident.task_spec_hash or p.params != v.run.params:
                raise SpecError(
                    f"cannot replay run {v.run.run_id[:12]}: its recorded spec no longer "
                    "plans to the same run",
                    hint="the record may be damaged",
                )
            # The replay reads exactly what the original read: its recorded upstream runs'
            # outputs (content-addressed, checked by plan_replay), not the other replays'.
            upstream = sorted(v.run.depends_on)
            rep = v.run.replicate + 1
            while True:
                new_ident = msgspec.structs.replace(
                    ident, env_hash=versions.env_hash, upstream=upstream, replicate=rep
                )
                new_id = new_ident.run_id()
                if new_id not in replay_of.values() and not store.get_runs([new_id]):
                    break
                rep += 1
            replay_of[v.run.run_id] = new_id
            instance = msgspec.structs.replace(
                p.instance,
                run_id=new_id,
                depends_on=tuple(upstream),
                allowed_providers=(plan.provider,) if plan.provider else None,
            )
            hw_class = v.placements[-1].hardware_class if v.placements else None
            pins[new_id] = hw_class if pin_supported else None
            if pin_supported and hw_class:
                instance = msgspec.structs.replace(instance, hardware_class=hw_class)
            planned.append(
                PlannedRun(
                    run_id=new_id,
                    task=p.task,
                    index=p.index,
                    params=p.params,
                    seed=v.run.seed,
                    replicate=rep,
                    depends_on=upstream,
                    identity=new_ident,
                    launch=p.launch,
                    instance=instance,
                )
            )
    code, _ = capture_code(directory)
    code_info = msgspec.to_builtins(code)
    code_info.update(code_context(directory, code))
    code_info["experiment_file"] = first.provenance.code.get("experiment_file")
    code_info["replayed_in_worktree"] = checkout.worktree
    data_records: dict[str, Any] = {}
    with HashCache(default_cache_path()) as cache:
        for t in loaded.spec.tasks:
            for i in t.inputs:
                if i.uri in recorded_data and i.uri not in data_records:
                    data_records[i.uri] = msgspec.to_builtins(
                        capture_data(i.uri, i.version, directory, cache=cache)
                    )
    prepared = Prepared(
        project=plan.project,
        loaded=loaded,
        experiment=first.experiment,
        planned=planned,
        provenance=ProvenanceRecord(
            code=code_info,
            environment=plan.environment,
            hardware=capture_hardware(),
            data=data_records,
        ),
        diff=plan.diff,
        providers=plan.providers,
        replicate=min(p.replicate for p in planned),
        state_dir=plan.state_dir,
        store_path=plan.store_path,
    )
    return ReplayBuild(
        prepared=prepared,
        replay_of=replay_of,
        pins=pins,
        pin_supported=pin_supported,
        notes=notes,
        commit=checkout.commit,
        applied_diff=checkout.applied_diff,
        at=time.time(),
    )


def record_replay(store: RunStore, plan: ReplayPlan, build: ReplayBuild, *, why: str) -> None:
    """Link each replay to its original and write the ledger's ``replay`` entry: what the
    dispatcher writes in place of a plain submission once the replay runs are recorded."""
    from stowplan.provenance.ledger import current_user
    from stowplan.session import run_ids_detail

    experiment = build.prepared.experiment
    store.put_replay_batch(
        [
            ReplayRecord(run_id=new, of_run_id=old, at=build.at)
            for old, new in build.replay_of.items()
        ]
    )
    store.append_ledger(
        who=current_user(),
        action="replay",
        target=experiment.id,
        why=why,
        details={
            "experiment": experiment.name,
            "of": run_ids_detail(list(build.replay_of)),
            **run_ids_detail(build.todo),
            "commit": build.commit,
            "diff_applied": build.applied_diff,
            "provider": plan.provider,
            "environment_differences": len(plan.environment_differences),
        },
    )


def verify_replay(
    plan: ReplayPlan,
    build: ReplayBuild,
    *,
    verify: bool = False,
    tolerance: float | None = None,
    tolerances: Mapping[str, float] | None = None,
) -> ReplayOutcome:
    """Each replay's final state and outputs against its original's (:func:`compare_outputs`);
    with ``verify``, a verdict per replay (REPRODUCED, or DIFFERS with what differs), recorded
    on its replay link, and one for all."""
    originals = {v.run.run_id: v for v in plan.views}
    todo = build.todo
    results: list[ReplayResult] = []
    with RunStore(Path(plan.store_path)) as store:
        final = store.get_runs(todo)
        arts = store.artifacts_for([*todo, *originals])
        for old, new in build.replay_of.items():
            state = final[new].state if new in final else "MISSING"
            outputs = compare_outputs(
                arts.get(old, []), arts.get(new, []), tolerance=tolerance, tolerances=tolerances
            )
            verdict: Verdict | None = None
            differences: list[str] = []
            if verify:
                if state != "SUCCEEDED":
                    differences = [f"the replay ended {state}"]
                else:
                    differences = [
                        f"{o.name}: {o.how}" + (f" ({'; '.join(o.details)})" if o.details else "")
                        for o in outputs
                        if not o.same
                    ]
                verdict = "REPRODUCED" if not differences else "DIFFERS"
                store.put_replay(
                    ReplayRecord(
                        run_id=new,
                        of_run_id=old,
                        at=build.at,
                        verdict=verdict,
                        differences=differences,
                    )
                )
            results.append(
                ReplayResult(
                    run_id=new,
                    of=old,
                    task=originals[old].run.task,
                    index=originals[old].run.index,
                    state=state,
                    verdict=verdict,
                    differences=differences,
                    outputs=outputs,
                    hardware_class=build.pins.get(new),
                )
            )
    overall: Verdict | None = None
    if verify:
        overall = "REPRODUCED" if all(r.verdict == "REPRODUCED" for r in results) else "DIFFERS"
    return ReplayOutcome(
        verdict=overall,
        commit=build.commit,
        diff_applied=build.applied_diff,
        environment_differences=plan.environment_differences,
        notes=build.notes,
        replays=results,
    )
