"""Capture what a run's result depends on, besides its spec: code, environment, hardware, data.

Each capture answers for this machine, now. What goes into a run's identity must be stable:
the same working tree, installed packages or data give the same strings on any machine, so
diffs are taken with git's output options pinned (a user's ``diff.algorithm`` or
``diff.mnemonicPrefix`` must not change a hash), and hashes are over canonical encodings.

Heavy or optional modules (psutil, pynvml) are imported inside the functions that need them,
so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Struct, field

from stowplan.errors import StowplanError
from stowplan.provenance.data import HashCache, capture_data
from stowplan.spec.canonical import canonical_json, sha256_hex

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "CodeVersion",
    "allowed_env",
    "capture_code",
    "capture_environment",
    "capture_hardware",
    "code_context",
    "data_version",
    "installed_distributions",
]

log = logging.getLogger(__name__)

GIT_TIMEOUT: Final = 30.0
UNTRACKED_MAX_FILE: Final = 8 << 20
"""Untracked files larger than this are listed in ``CodeVersion.skipped``, not captured."""
UNTRACKED_MAX_TOTAL: Final = 64 << 20
_CHUNK: Final = 1 << 20

# Every option that a user's git config could change in `git diff` output is pinned, so one
# working tree always gives the same bytes (and hash) and the patch applies with `git apply`.
_DIFF_ARGS: Final = (
    "diff",
    "HEAD",
    "--binary",
    "--full-index",
    "--no-color",
    "--no-ext-diff",
    "--no-textconv",
    "--no-renames",
    "--no-relative",
    "--src-prefix=a/",
    "--dst-prefix=b/",
    "--unified=3",
    "--inter-hunk-context=0",
    "--diff-algorithm=myers",
    "--indent-heuristic",
    "--ignore-submodules=none",
    "-O/dev/null",
)


class CodeVersion(Struct, frozen=True, kw_only=True):
    """The code a run used: a commit plus the hash of the uncommitted changes on top of it.

    The changes themselves (a patch that ``git apply`` restores onto ``commit``, untracked files
    included) are returned beside this record by :func:`capture_code`, for the blob store.
    """

    commit: str | None
    branch: str | None
    """None when HEAD is detached or there is no repository."""
    dirty: bool
    diff_sha256: str | None
    """SHA-256 of the patch; None when the tree is clean (or has no commit to diff against)."""
    version: str
    """``<commit>``, ``<commit>+dirty.<12 hex of diff_sha256>``, ``no-commit`` or ``no-git``."""
    untracked: list[str] = field(default_factory=list)
    """untracked, not ignored files whose content is in the patch."""
    skipped: list[str] = field(default_factory=list)
    """untracked, not ignored files too large to capture: present, but not in the patch."""


_NO_GIT: Final = CodeVersion(
    commit=None, branch=None, dirty=False, diff_sha256=None, version="no-git"
)


def _git(
    args: Sequence[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    git = shutil.which("git")
    if git is None:  # pragma: no cover - checked by the caller first
        raise StowplanError("git is not installed")
    full_env = dict(os.environ)
    # Read-only: never take index.lock to refresh stat info (a user's git may be running).
    full_env["GIT_OPTIONAL_LOCKS"] = "0"
    full_env["LC_ALL"] = "C"
    if env:
        full_env.update(env)
    try:
        return subprocess.run(
            [git, *args],
            cwd=cwd,
            env=full_env,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StowplanError(
            f"git {' '.join(args[:2])} took more than {GIT_TIMEOUT:.0f} s in {cwd}; "
            "is the repository on a slow or hung file system?"
        ) from None


def _checked(done: subprocess.CompletedProcess[bytes], what: str) -> bytes:
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise StowplanError(f"git {what} failed (exit {done.returncode}): {err}")
    return done.stdout


def capture_code(directory: Path) -> tuple[CodeVersion, bytes]:
    """The code version of the git working tree holding ``directory``, and its patch bytes.

    The patch is what ``git diff HEAD --binary`` prints (staged and unstaged changes to tracked
    files) plus untracked files that ``.gitignore`` does not exclude, as new-file patches, so
    ``git apply`` onto ``commit`` rebuilds the tree. It is computed through a temporary copy of
    the index, so the user's index is left alone and untracked files are not hashed into the
    object database. The patch is ``b""`` when clean.

    Without git, or outside a repository, the version is ``no-git``; in a repository without
    commits it is ``no-commit``. Raises :class:`~stowplan.errors.StowplanError` when git
    itself fails or hangs inside a repository.
    """
    directory = Path(directory)
    if shutil.which("git") is None or not directory.is_dir():
        return _NO_GIT, b""
    top = _git(["rev-parse", "--show-toplevel"], directory)
    if top.returncode != 0:
        stderr = top.stderr.decode(errors="replace").strip()
        if "not a git repository" not in stderr:
            # e.g. "detected dubious ownership": a repository git refuses to read.
            log.warning("git cannot read %s: %s", directory, stderr)
        return _NO_GIT, b""
    root = Path(top.stdout.decode().strip())
    symbolic = _git(["symbolic-ref", "--quiet", "--short", "HEAD"], root)
    branch = (symbolic.stdout.decode().strip() or None) if symbolic.returncode == 0 else None
    head = _git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], root)
    if head.returncode != 0:
        status = _checked(_git(["status", "--porcelain", "-z"], root), "status")
        return (
            CodeVersion(
                commit=None,
                branch=branch,
                dirty=bool(status),
                diff_sha256=None,
                version="no-commit",
            ),
            b"",
        )
    commit = head.stdout.decode().strip()
    untracked, skipped = _untracked(root)
    diff = _diff(root, untracked)
    if not diff and not skipped:
        clean = CodeVersion(
            commit=commit, branch=branch, dirty=False, diff_sha256=None, version=commit
        )
        return clean, b""
    diff_sha = sha256_hex(diff)
    return (
        CodeVersion(
            commit=commit,
            branch=branch,
            dirty=True,
            diff_sha256=diff_sha,
            version=f"{commit}+dirty.{diff_sha[:12]}",
            untracked=untracked,
            skipped=skipped,
        ),
        diff,
    )


def _untracked(root: Path) -> tuple[list[str], list[str]]:
    out = _checked(
        _git(["ls-files", "-z", "--others", "--exclude-standard", "--full-name"], root),
        "ls-files",
    )
    keep: list[str] = []
    skipped: list[str] = []
    total = 0
    for raw in sorted(p for p in out.split(b"\0") if p):
        name = os.fsdecode(raw)
        try:
            size = os.lstat(root / name).st_size
        except OSError:  # removed since git listed it
            continue
        if size > UNTRACKED_MAX_FILE or total + size > UNTRACKED_MAX_TOTAL:
            skipped.append(name)
        else:
            keep.append(name)
            total += size
    if skipped:
        log.warning(
            "%d untracked file(s) too large to record with the code, e.g. %s; commit or "
            "ignore them",
            len(skipped),
            skipped[0],
        )
    return keep, skipped


def _diff(root: Path, untracked: list[str]) -> bytes:
    if not untracked:
        return _checked(_git(_DIFF_ARGS, root), "diff")
    # Intent-to-add entries in a throwaway copy of the index make `git diff HEAD` show the
    # untracked files as new files, without hashing them into the object database.
    git_path = _checked(_git(["rev-parse", "--git-path", "index"], root), "rev-parse --git-path")
    index = Path(os.fsdecode(git_path.strip()))
    if not index.is_absolute():
        index = root / index
    with tempfile.TemporaryDirectory(prefix="stowplan-index-") as tmp:
        tmp_index = Path(tmp) / "index"
        if index.exists():
            # copy2 keeps the mtime: git trusts stat data only for entries older than the
            # index file, so a fresh mtime would hide same-size edits made in its last second.
            shutil.copy2(index, tmp_index)
        env = {"GIT_INDEX_FILE": str(tmp_index)}
        names = b"\0".join(os.fsencode(n) for n in untracked) + b"\0"
        _checked(
            _git(
                ["add", "--intent-to-add", "--pathspec-from-file=-", "--pathspec-file-nul"],
                root,
                env=env,
                stdin=names,
            ),
            "add --intent-to-add",
        )
        return _checked(_git(_DIFF_ARGS, root, env=env), "diff")


def _strip_credentials(url: str) -> str:
    """A remote URL without any user:password@ part (tokens live there in https URLs)."""
    if "://" not in url:
        return url  # scp-like git@host:path: a user name, never a secret
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def code_context(directory: Path, code: CodeVersion) -> dict[str, Any]:
    """What the run record keeps about the code beside :class:`CodeVersion`.

    ``root`` (the working tree) and ``subdir`` (``directory`` inside it, so a replay finds the
    experiment in a fresh worktree), ``remote`` and ``remote_url`` (the upstream of the branch,
    else ``origin``; credentials stripped), and ``skipped_sha256``: the hash of each untracked
    file too large for the patch, so a replay can tell whether the one it finds is the same.
    """
    directory = Path(directory)
    out: dict[str, Any] = {
        "root": None,
        "subdir": None,
        "remote": None,
        "remote_url": None,
        "skipped_sha256": {},
    }
    if code.version == "no-git":
        return out
    top = _git(["rev-parse", "--show-toplevel"], directory)
    if top.returncode != 0:
        return out
    root = Path(top.stdout.decode().strip())
    out["root"] = str(root)
    out["subdir"] = Path(os.path.relpath(directory.resolve(), root.resolve())).as_posix()
    remote = None
    if code.branch:
        got = _git(["config", "--get", f"branch.{code.branch}.remote"], root)
        remote = got.stdout.decode().strip() or None if got.returncode == 0 else None
    if remote is None:
        names = _git(["remote"], root).stdout.decode().split()
        remote = "origin" if "origin" in names else (names[0] if names else None)
    if remote is not None:
        url = _git(["remote", "get-url", remote], root)
        if url.returncode == 0:
            out["remote"] = remote
            out["remote_url"] = _strip_credentials(url.stdout.decode().strip())
    hashes: dict[str, str] = {}
    for name in code.skipped:
        try:
            with open(root / name, "rb") as f:
                hashes[name] = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            continue
    out["skipped_sha256"] = hashes
    return out


# -- environment -------------------------------------------------------------------------------

_NORMALIZE = re.compile(r"[-_.]+")
_DIST_DIR = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+?)(?:-py[^-]*)?\.(?:dist|egg)-info$")


def _normalize(name: str) -> str:
    return _NORMALIZE.sub("-", name).lower()


def _read_name_version(meta_dir: Path) -> tuple[str, str] | None:
    """Name and Version from a METADATA/PKG-INFO header, reading only the header's start."""
    for filename in ("METADATA", "PKG-INFO"):
        try:
            with open(meta_dir / filename, "rb") as f:
                head = f.read(8192)
        except OSError:
            continue
        name = version = None
        for line in head.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            if key == "Name":
                name = value.strip()
            elif key == "Version":
                version = value.strip()
        if name and version:
            return name, version
    return None


def _distributions_on(entry: str) -> Iterator[tuple[str, str]]:
    path = Path(entry or ".")
    if not path.is_dir():
        # A zip or egg file on sys.path: let importlib.metadata read it (rare and small).
        from importlib.metadata import distributions

        for dist in distributions(path=[entry]):
            name = dist.metadata["Name"]
            if name:
                yield name, dist.version
        return
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if not e.name.endswith((".dist-info", ".egg-info")) or not e.is_dir():
            continue
        found = _read_name_version(Path(e.path))
        if found is None:
            m = _DIST_DIR.match(e.name)
            if m is None:
                continue
            found = (m["name"], m["version"])
        yield found


def installed_distributions() -> list[str]:
    """Every distribution importable from ``sys.path``, as sorted ``name==version`` lines.

    Names are normalised (PEP 503); where one name is installed twice, the one that shadows
    the other (earlier on ``sys.path``) counts, as for imports. Reads only metadata headers,
    so it takes milliseconds where ``importlib.metadata`` takes tenths of a second.
    """
    seen: dict[str, str] = {}
    for entry in sys.path:
        for name, version in _distributions_on(entry):
            seen.setdefault(_normalize(name), version)
    return sorted(f"{name}=={version}" for name, version in seen.items())


DEFAULT_ENV_ALLOWLIST: Final = (
    "CUDA_VISIBLE_DEVICES",
    "CUBLAS_WORKSPACE_CONFIG",
    "LANG",
    "LC_ALL",
    "MKL_NUM_THREADS",
    "NCCL_*",
    "NUMEXPR_NUM_THREADS",
    "NVIDIA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "PYTHONHASHSEED",
    "TF_DETERMINISTIC_OPS",
    "TZ",
)
"""Environment variables (``*`` globs) recorded by default: those that change numerics."""

_SECRET = re.compile(r"(TOKEN|SECRET|PASSW|CREDENTIAL|KEY|PRIVATE|AUTH|SESSION|COOKIE)", re.I)
"""Names never recorded, whatever the allowlist says."""

LOCK_FILES: Final = (
    "uv.lock",
    "poetry.lock",
    "pdm.lock",
    "Pipfile.lock",
    "conda-lock.yml",
    "requirements.lock",
    "requirements.txt",
    "environment.yml",
)


def allowed_env(
    environ: dict[str, str] | os._Environ[str], allowlist: Sequence[str] = DEFAULT_ENV_ALLOWLIST
) -> dict[str, str]:
    """The variables of ``environ`` on ``allowlist`` (``fnmatch`` globs), secrets never."""
    import fnmatch

    return {
        k: environ[k]
        for k in sorted(environ)
        if any(fnmatch.fnmatchcase(k, pat) for pat in allowlist) and _SECRET.search(k) is None
    }


def lock_file_hashes(*directories: Path) -> dict[str, str]:
    """SHA-256 of each lock file found in ``directories`` (first one found per name wins)."""
    out: dict[str, str] = {}
    for d in directories:
        for name in LOCK_FILES:
            p = Path(d) / name
            if name not in out and p.is_file():
                with open(p, "rb") as f:
                    out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def distribution_hashes() -> dict[str, str]:
    """``name==version`` -> SHA-256 of the distribution's RECORD (the hash of every file it
    installed), or of its METADATA when it has no RECORD (an egg-info)."""
    out: dict[str, str] = {}
    for entry in sys.path:
        path = Path(entry or ".")
        if not path.is_dir():
            continue
        try:
            dirs = sorted(
                e.path for e in os.scandir(path) if e.name.endswith((".dist-info", ".egg-info"))
            )
        except OSError:
            continue
        for d in dirs:
            found = _read_name_version(Path(d))
            if found is None:
                continue
            key = f"{_normalize(found[0])}=={found[1]}"
            if key in out:
                continue
            for filename in ("RECORD", "METADATA", "PKG-INFO"):
                try:
                    with open(Path(d) / filename, "rb") as f:
                        out[key] = hashlib.file_digest(f, "sha256").hexdigest()
                    break
                except OSError:
                    continue
    return dict(sorted(out.items()))


def capture_environment(
    *,
    lock_dirs: Sequence[Path] = (),
    env_allowlist: Sequence[str] = DEFAULT_ENV_ALLOWLIST,
) -> dict[str, Any]:
    """Python, platform and installed distributions, with ``env_hash`` over what matters.

    ``env_hash`` covers the interpreter (implementation and ``major.minor``) and the
    distributions, not the patch release, path or OS: what would change a result, not what
    merely differs between two machines that would compute the same thing. Beside it: each
    distribution's hash, the lock files found in ``lock_dirs``, and the environment variables
    on ``env_allowlist`` (never one whose name looks like a secret). ``container_image`` is
    None here; a provider that runs in a container reports its digest with the attempt.
    """
    dists = installed_distributions()
    impl = platform.python_implementation()
    v = sys.version_info
    python = f"{impl} {v.major}.{v.minor}"
    env_hash = sha256_hex(canonical_json({"distributions": dists, "python": python}))
    return {
        "python": {
            "implementation": impl,
            "version": platform.python_version(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "distributions": dists,
        "distribution_hashes": distribution_hashes(),
        "lock_files": lock_file_hashes(*lock_dirs),
        "env_vars": allowed_env(os.environ, env_allowlist),
        "container_image": None,
        "env_hash": env_hash,
    }


# -- hardware ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture_hardware() -> dict[str, Any]:
    """OS, host name, CPU model and count, memory, and GPUs (NVML or ``nvidia-smi``)."""
    import psutil

    from stowplan.provenance.nvidia import capture_gpus

    return {
        "os": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "memory_total_bytes": int(psutil.virtual_memory().total),
        "gpus": [msgspec.to_builtins(g) for g in capture_gpus()],
    }


# -- data ------------------------------------------------------------------------------------


def data_version(
    uri: str, pinned: str | None, base_dir: Path, *, cache: HashCache | None = None
) -> str:
    """The version string of a data input, as it goes into run identity.

    ``pinned`` wins when given. A local path (relative ones against ``base_dir``) or
    ``file://`` URI is hashed: a file as ``sha256:<hex>`` of its bytes, a directory as
    ``sha256:<hex>`` of its sorted manifest of ``(relative path, size, sha256)`` (symlinked
    directories enter by their target text, not followed). A remote URI is versioned through
    fsspec (see :mod:`stowplan.provenance.data`), or ``unpinned:<uri>`` when its scheme cannot
    be looked up here: a marker that the run may not be reproducible.
    """
    return capture_data(uri, pinned, base_dir, cache=cache).version
