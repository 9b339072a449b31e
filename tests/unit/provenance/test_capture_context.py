"""What the run record keeps beside the code version and env hash: remote, lock files, env."""

from __future__ import annotations

import hashlib
from pathlib import Path

from stowplan.provenance.capture import (
    allowed_env,
    capture_code,
    capture_environment,
    code_context,
    lock_file_hashes,
)
from tests.unit.provenance.test_capture import git, git_env, repo

__all__ = ["git_env", "repo"]


def test_context_names_root_subdir_and_remote_without_credentials(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://alice:ghp_secret123@git.example.org/lab/x.git")
    code, _ = capture_code(repo / "src")
    ctx = code_context(repo / "src", code)
    assert ctx["root"] == str(repo) and ctx["subdir"] == "src"
    assert ctx["remote"] == "origin"
    assert ctx["remote_url"] == "https://git.example.org/lab/x.git"
    assert "secret" not in str(ctx)


def test_context_hashes_untracked_files_too_large_for_the_patch(repo: Path) -> None:
    from stowplan.provenance import capture

    big = repo / "weights.bin"
    big.write_bytes(b"w" * (capture.UNTRACKED_MAX_FILE + 1))
    code, _ = capture_code(repo)
    assert code.skipped == ["weights.bin"]
    ctx = code_context(repo, code)
    assert ctx["skipped_sha256"] == {"weights.bin": hashlib.sha256(big.read_bytes()).hexdigest()}
    assert ctx["remote_url"] is None


def test_context_outside_git(tmp_path: Path) -> None:
    code, _ = capture_code(tmp_path)
    assert code_context(tmp_path, code)["root"] is None


def test_env_allowlist_never_lets_a_secret_through() -> None:
    environ = {
        "OMP_NUM_THREADS": "4",
        "NCCL_DEBUG": "INFO",
        "NCCL_AUTH_TOKEN": "x",
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": "k",
    }
    assert allowed_env(environ) == {"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "4"}
    assert allowed_env(environ, ["*"]) == {"HOME": "/root", "NCCL_DEBUG": "INFO",
                                           "OMP_NUM_THREADS": "4"}  # fmt: skip


def test_lock_files_are_hashed(tmp_path: Path) -> None:
    (tmp_path / "uv.lock").write_text("version = 1\n")
    assert lock_file_hashes(tmp_path, tmp_path / "missing") == {
        "uv.lock": hashlib.sha256(b"version = 1\n").hexdigest()
    }
    env = capture_environment(lock_dirs=[tmp_path])
    assert set(env["lock_files"]) == {"uv.lock"}
    assert env["distribution_hashes"]
    assert all(k in env["distributions"] for k in env["distribution_hashes"])
