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
    "CODE_IGNORE_FILE",
    "DEFAULT_CODE_IGNORE",
    "DEFAULT_ENV_ALLOWLIST",
    "CodeVersion",
    "TreeHash",
    "allowed_env",
    "capture_code",
    "capture_environment",
    "capture_hardware",
    "code_context",
    "data_version",
    "distributions_on",
    "hash_tree",
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


class TreeHash(Struct, frozen=True, kw_only=True):
    """What a code version outside git was computed from (see :func:`hash_tree`)."""

    root: str
    """the directory hashed: the experiment's directory."""
    sha256: str
    """SHA-256 of the manifest: every hashed file's path, size and SHA-256, sorted."""
    files: int
    bytes: int
    ignore_file: str | None = None
    """the ``.stowplanignore`` whose patterns applied, if there is one."""
    referenced: list[str] = field(default_factory=list)
    """files outside ``root`` named by a task's command or script, hashed too."""
    skipped: list[str] = field(default_factory=list)
    """files too large (or past the limits) to hash: in the manifest by size only."""

    def describe(self) -> str:
        """One line for people: what the version covers."""
        out = f"no git: {self.files} files ({self.bytes} bytes) under {self.root}, hashed" + (
            f", ignoring what {self.ignore_file} lists" if self.ignore_file else ""
        )
        if self.referenced:
            out += f", and {len(self.referenced)} referenced outside it"
        if self.skipped:
            out += f"; {len(self.skipped)} too large, by size only"
        return out


class CodeVersion(Struct, frozen=True, kw_only=True):
    """The code a run used: a commit plus the hash of the uncommitted changes on top of it.

    The changes themselves (a patch that ``git apply`` restores onto ``commit``, untracked files
    included) are returned beside this record by :func:`capture_code`, for the blob store.
    Outside git, ``tree`` says which files ``version`` hashes.
    """

    commit: str | None
    branch: str | None
    """None when HEAD is detached or there is no repository."""
    dirty: bool
    diff_sha256: str | None
    """SHA-256 of the patch; None when the tree is clean (or has no commit to diff against)."""
    version: str
    """``<commit>``, ``<commit>+dirty.<12 hex of diff_sha256>``, ``no-commit``, outside git
    ``nogit.<12 hex of tree.sha256>``, or ``no-git`` when there is no directory to hash."""
    untracked: list[str] = field(default_factory=list)
    """untracked, not ignored files whose content is in the patch."""
    skipped: list[str] = field(default_factory=list)
    """untracked, not ignored files too large to capture: present, but not in the patch."""
    tree: TreeHash | None = None
    """outside git: the files ``version`` hashes."""


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


def capture_code(
    directory: Path,
    *,
    references: Sequence[str] = (),
    exclude: Sequence[Path] = (),
    cache: HashCache | None = None,
) -> tuple[CodeVersion, bytes]:
    """The code version of the git working tree holding ``directory``, and its patch bytes.

    The patch is what ``git diff HEAD --binary`` prints (staged and unstaged changes to tracked
    files) plus untracked files that ``.gitignore`` does not exclude, as new-file patches, so
    ``git apply`` onto ``commit`` rebuilds the tree. It is computed through a temporary copy of
    the index, so the user's index is left alone and untracked files are not hashed into the
    object database. The patch is ``b""`` when clean.

    Without git, or outside a repository, the version is ``nogit.<12 hex>``: a hash of the
    files under ``directory`` and of the files outside it that ``references`` (the tasks'
    command words) name, minus ``exclude`` (see :func:`hash_tree`); ``no-git`` only when
    ``directory`` does not exist. In a repository without commits it is ``no-commit``. Raises
    :class:`~stowplan.errors.StowplanError` when git itself fails or hangs inside a repository.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return _NO_GIT, b""

    def no_git() -> tuple[CodeVersion, bytes]:
        tree = hash_tree(directory, references=references, exclude=exclude, cache=cache)
        version = f"nogit.{tree.sha256[:12]}"
        return msgspec.structs.replace(_NO_GIT, version=version, tree=tree), b""

    if shutil.which("git") is None:
        return no_git()
    top = _git(["rev-parse", "--show-toplevel"], directory)
    if top.returncode != 0:
        stderr = top.stderr.decode(errors="replace").strip()
        if "not a git repository" not in stderr:
            # e.g. "detected dubious ownership": a repository git refuses to read.
            log.warning("git cannot read %s: %s", directory, stderr)
        return no_git()
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


# -- code outside git --------------------------------------------------------------------------

CODE_IGNORE_FILE: Final = ".stowplanignore"
"""In the experiment's directory: gitignore-style patterns of files a code version outside git
leaves out (``#`` comments, ``!`` negation, ``dir/`` for directories only, a ``/`` anchors to
the directory, ``*``, ``?``, ``[...]`` and ``**``)."""
DEFAULT_CODE_IGNORE: Final = (
    ".stowplan/",
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.py[cod]",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".ipynb_checkpoints/",
    ".tox/",
    ".nox/",
    "node_modules/",
    "*.egg-info/",
    ".DS_Store",
    CODE_IGNORE_FILE,
)
"""Left out of every code version outside git, before the ignore file's own patterns."""
CODE_MAX_FILES: Final = 20_000
"""Files hashed at most; past it (or past ``UNTRACKED_MAX_TOTAL`` bytes) files count by size."""


class _IgnoreRules:
    """A gitignore subset: the last pattern that matches a path decides."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.rules: list[tuple[re.Pattern[str], bool, bool, bool]] = []
        for raw in lines:
            line = raw.rstrip("\n").rstrip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.strip("/") if dir_only else line
            anchored = "/" in line
            line = line.lstrip("/")
            if line:
                self.rules.append((re.compile(_glob_regex(line)), negate, dir_only, anchored))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        out = False
        name = rel.rsplit("/", 1)[-1]
        for pattern, negate, dir_only, anchored in self.rules:
            if dir_only and not is_dir:
                continue
            if pattern.fullmatch(rel if anchored else name):
                out = not negate
        return out


def _glob_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            body = glob[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def referenced_files(words: Sequence[str], root: Path) -> list[Path]:
    """Existing regular files outside ``root`` that command words name by absolute path
    (``/x/train.py``, ``--config=/x/c.yaml``); placeholders must be filled first."""
    out: set[Path] = set()
    root = root.resolve()
    for word in words:
        for part in (word, word.partition("=")[2]):
            if not part.startswith("/") or "\0" in part:
                continue
            try:
                p = Path(part).resolve()
                if p.is_file() and not p.is_relative_to(root):
                    out.add(p)
            except (OSError, ValueError, RuntimeError):
                continue
    return sorted(out)


def hash_tree(
    root: Path,
    *,
    references: Sequence[str] = (),
    exclude: Sequence[Path] = (),
    cache: HashCache | None = None,
) -> TreeHash:
    """The code version of a directory outside git: a hash over its files.

    The manifest lists each file under ``root`` as (path, size, SHA-256), symlinks by their
    target text (never followed), minus :data:`DEFAULT_CODE_IGNORE`, the patterns of
    ``root/.stowplanignore`` and the paths in ``exclude`` (the experiment file, the store, data
    inputs: what other parts of a run's identity already cover). Files outside ``root`` that
    ``references`` name by absolute path are added under their absolute path. Files over
    ``UNTRACKED_MAX_FILE`` bytes, or past ``CODE_MAX_FILES`` files or ``UNTRACKED_MAX_TOTAL``
    bytes, enter by size only and are listed in ``skipped``. Stat data, owners and times never
    enter, so a copy of the directory has the same version.
    """
    root = Path(root).resolve()
    lines = list(DEFAULT_CODE_IGNORE)
    ignore_file = root / CODE_IGNORE_FILE
    used_ignore: str | None = None
    if ignore_file.is_file():
        try:
            lines += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
            used_ignore = str(ignore_file)
        except OSError as e:
            log.warning("cannot read %s: %s", ignore_file, e)
    rules = _IgnoreRules(lines)
    excluded = set()
    for p in exclude:
        try:
            excluded.add(Path(p).resolve())
        except (OSError, RuntimeError):
            continue
    manifest: list[tuple[str, int, str]] = []
    skipped: list[str] = []
    total = 0

    def add(path: Path, name: str, size: int) -> None:
        nonlocal total
        if (
            size > UNTRACKED_MAX_FILE
            or len(manifest) >= CODE_MAX_FILES
            or total + size > UNTRACKED_MAX_TOTAL
        ):
            skipped.append(name)
            manifest.append((name, size, "skipped"))
            return
        try:
            if cache is not None:
                digest = cache.sha256(path)
            else:
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return  # removed, or unreadable: not code this run can use either
        total += size
        manifest.append((name, size, digest))

    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda x: x.name)
        except OSError:
            continue
        subdirs = []
        for ent in entries:
            path = Path(ent.path)
            rel = path.relative_to(root).as_posix()
            try:
                is_dir = ent.is_dir(follow_symlinks=False)
                if rules.ignored(rel, is_dir) or path in excluded:
                    continue
                if ent.is_symlink():
                    target = os.readlink(path)
                    manifest.append((rel, len(target), "symlink:" + target))
                elif is_dir:
                    subdirs.append(path)
                elif ent.is_file(follow_symlinks=False):
                    add(path, rel, ent.stat(follow_symlinks=False).st_size)
            except OSError:
                continue
        stack.extend(reversed(subdirs))
    outside = [p for p in referenced_files(references, root) if p not in excluded]
    for p in outside:
        try:
            add(p, str(p), p.stat().st_size)
        except OSError:
            continue
    if skipped:
        log.warning(
            "%d file(s) under %s too large to hash into the code version, e.g. %s; list them "
            "in %s or use git",
            len(skipped),
            root,
            skipped[0],
            ignore_file,
        )
    manifest.sort()
    return TreeHash(
        root=str(root),
        sha256=sha256_hex(canonical_json(manifest)),
        files=len(manifest) - len(skipped),
        bytes=total,
        ignore_file=used_ignore,
        referenced=[str(p) for p in outside],
        skipped=skipped,
    )


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
    if code.commit is None and code.version != "no-commit":
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
    return sorted(f"{name}=={version}" for name, version in distributions_on(sys.path).items())


def distributions_on(path: Sequence[str]) -> dict[str, str]:
    """Normalised name -> version of every distribution on ``path`` (directories, or zip
    files, as on ``sys.path``); the first one found wins, as for imports."""
    seen: dict[str, str] = {}
    for entry in path:
        for name, version in _distributions_on(entry):
            seen.setdefault(_normalize(name), version)
    return seen


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
    """Python, platform and installed distributions, with ``env_hash`` over what is declared.

    ``env_hash``, the environment in a run's identity, covers the interpreter (implementation
    and ``major.minor``) and the environment as declared: the lock files found in
    ``lock_dirs``. It does not cover every distribution installed here: installing a tool the
    tasks never import must not re-run them, and for a task that runs elsewhere this machine's
    packages are the wrong ones anyway. What a task did import is captured where it runs and
    checked before its result is reused (:mod:`stowplan.provenance.imports`). ``env_basis``
    says which of the two applies. The full list stays in the record (``distributions``,
    each one's hash), with the environment variables on ``env_allowlist`` (never one whose
    name looks like a secret). ``container_image`` is None here; a provider that runs in a
    container reports its digest with the attempt.
    """
    dists = installed_distributions()
    impl = platform.python_implementation()
    v = sys.version_info
    python = f"{impl} {v.major}.{v.minor}"
    locks = lock_file_hashes(*lock_dirs)
    env_hash = sha256_hex(canonical_json({"declared": locks, "python": python}))
    basis = (
        "declared by " + ", ".join(sorted(locks)) + " and " + python
        if locks
        else python + "; what each run imports is checked before it is reused"
    )
    return {
        "python": {
            "implementation": impl,
            "version": platform.python_version(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "distributions": dists,
        "distribution_hashes": distribution_hashes(),
        "lock_files": locks,
        "env_vars": allowed_env(os.environ, env_allowlist),
        "container_image": None,
        "env_hash": env_hash,
        "env_basis": basis,
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
