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
from urllib.parse import unquote, urlsplit

import msgspec
from msgspec import Struct, field

from stowplan.errors import SpecError, StowplanError
from stowplan.spec.canonical import canonical_json, sha256_hex

__all__ = [
    "CodeVersion",
    "capture_code",
    "capture_environment",
    "capture_hardware",
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


def capture_environment() -> dict[str, Any]:
    """Python, platform and installed distributions, with ``env_hash`` over what matters.

    ``env_hash`` covers the interpreter (implementation and ``major.minor``) and the
    distributions, not the patch release, path or OS: what would change a result, not what
    merely differs between two machines that would compute the same thing.
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


# -- data --------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local_path(uri: str, base_dir: Path) -> Path | None:
    """The local path a URI names, or None for a remote scheme (s3://, https://, ...)."""
    if "://" not in uri:
        path = Path(uri).expanduser()
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


def data_version(uri: str, pinned: str | None, base_dir: Path) -> str:
    """The version string of a data input, as it goes into run identity.

    ``pinned`` wins when given. A local path (relative ones against ``base_dir``) or
    ``file://`` URI is hashed: a file as ``sha256:<hex>`` of its bytes, a directory as
    ``sha256:<hex>`` of its sorted manifest of ``(relative path, size, sha256)`` (symlinked
    directories enter by their target text, not followed). A remote URI without a pin is
    ``unpinned:<uri>``, a marker that the run may not be reproducible.
    """
    if pinned is not None:
        return pinned
    path = _local_path(uri, base_dir)
    if path is None:
        return f"unpinned:{uri}"
    if path.is_file():
        return f"sha256:{_file_sha256(path)}"
    if path.is_dir():
        return f"sha256:{sha256_hex(canonical_json(_manifest(path)))}"
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


def _manifest(root: Path) -> list[tuple[str, int, str]]:
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
            entries.append((rel, p.stat().st_size, _file_sha256(p)))
    entries.sort()
    return entries
