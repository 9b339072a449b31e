"""Capturing what determines a run's result: code version, environment, hardware, data.

Everything here reads the machine it runs on (git, installed distributions, /proc, NVML); the
pure identity hashing it feeds lives in ``stowplan.spec.canonical``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from msgspec import Struct, field

from stowplan.errors import SpecError
from stowplan.spec.canonical import canonical_json, sha256_hex

GIT_TIMEOUT_S = 10


class CodeVersion(Struct, frozen=True, kw_only=True):
    version: str
    """commit, commit+dirty.<diff hash>, "no-commit" or "no-git"."""
    commit: str | None = None
    branch: str | None = None
    dirty: bool = False
    diff_sha256: str | None = None
    diff: bytes = field(default=b"")
    """the uncommitted diff itself (stored as a blob by the caller, not in the record)."""


def _git(directory: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        return subprocess.run(
            [git, "-C", str(directory), *args],
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def capture_code(directory: Path) -> CodeVersion:
    inside = _git(directory, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode != 0:
        return CodeVersion(version="no-git")
    head = _git(directory, "rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return CodeVersion(version="no-commit", dirty=True)
    commit = head.stdout.decode().strip()
    br = _git(directory, "rev-parse", "--abbrev-ref", "HEAD")
    branch = br.stdout.decode().strip() if br is not None and br.returncode == 0 else None
    diff_run = _git(directory, "diff", "HEAD", "--binary")
    diff = diff_run.stdout if diff_run is not None and diff_run.returncode == 0 else b""
    if not diff:
        return CodeVersion(version=commit, commit=commit, branch=branch)
    digest = sha256_hex(diff)
    return CodeVersion(
        version=f"{commit}+dirty.{digest[:12]}",
        commit=commit,
        branch=branch,
        dirty=True,
        diff_sha256=digest,
        diff=diff,
    )


def capture_environment() -> dict[str, Any]:
    from importlib import metadata

    dists: set[str] = set()
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if not name:
            continue
        norm = name.lower().replace("_", "-").replace(".", "-")
        dists.add(f"{norm}=={d.version}")
    ordered = sorted(dists)
    return {
        "python_version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "distributions": ordered,
        "env_hash": sha256_hex(canonical_json(ordered)),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture_hardware() -> dict[str, Any]:
    import msgspec
    import psutil

    from stowplan.provenance.nvidia import capture_gpus

    return {
        "os": platform.platform(),
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "gpus": msgspec.to_builtins(capture_gpus()),
    }


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_version(uri: str, pinned: str | None, base_dir: Path) -> str:
    """The version of one input: pinned, a content hash for local files, else unpinned."""
    if pinned:
        return pinned
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if path.is_file():
            return "sha256:" + _hash_file(path)
        if path.is_dir():
            manifest = [
                (str(p.relative_to(path)), p.stat().st_size, _hash_file(p))
                for p in sorted(path.rglob("*"))
                if p.is_file()
            ]
            return "sha256:" + sha256_hex(canonical_json(manifest))
        raise SpecError(
            f"input {uri!r} does not exist (looked at {path})",
            hint="fix the path, or pin a version for data that lives elsewhere",
        )
    return "unpinned:" + uri
