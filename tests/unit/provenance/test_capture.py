"""Capture of code, environment, hardware and data versions, on real git repositories and files."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import msgspec
import pytest

from stowplan.errors import SpecError
from stowplan.provenance.capture import (
    UNTRACKED_MAX_FILE,
    CodeVersion,
    capture_code,
    capture_environment,
    capture_hardware,
    data_version,
    installed_distributions,
)
from stowplan.provenance.nvidia import capture_gpus
from stowplan.spec.canonical import canonical_json, sha256_hex

# -- code ------------------------------------------------------------------------------------


@pytest.fixture
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Isolate git from the user's and system's configuration, for the tests and the code."""
    home = tmp_path / "home"
    home.mkdir()
    values = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CEILING_DIRECTORIES": str(tmp_path),
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, git_env: dict[str, str]) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "train.py").write_text("print('train')\n")
    (r / ".gitignore").write_text("*.log\n")
    (r / "src").mkdir()
    (r / "src" / "model.py").write_text("W = 1\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "first")
    return r


def test_clean_repository(repo: Path) -> None:
    code, diff = capture_code(repo)
    head = git(repo, "rev-parse", "HEAD")
    assert code == CodeVersion(
        commit=head, branch="main", dirty=False, diff_sha256=None, version=head
    )
    assert diff == b""
    assert capture_code(repo / "src")[0] == code  # any directory inside the tree
    (repo / "run.log").write_text("ignored output\n")
    assert capture_code(repo)[0] == code


def test_dirty_tree_patch_rebuilds_it(repo: Path, tmp_path: Path) -> None:
    (repo / "train.py").write_text("print('train harder')\n")  # unstaged
    (repo / "src" / "model.py").write_text("W = 2\n")
    git(repo, "add", "src/model.py")  # staged
    (repo / "src" / "new.py").write_text("NEW = True\n")  # untracked
    (repo / "blob.bin").write_bytes(bytes(range(256)))  # untracked binary
    (repo / "out.log").write_text("ignored\n")
    status_before = git(repo, "status", "--porcelain")

    code, diff = capture_code(repo)
    head = git(repo, "rev-parse", "HEAD")
    assert code.dirty
    assert code.commit == head
    assert code.diff_sha256 == hashlib.sha256(diff).hexdigest()
    assert code.version == f"{head}+dirty.{code.diff_sha256[:12]}"
    assert code.untracked == ["blob.bin", "src/new.py"]
    assert code.skipped == []
    assert b"out.log" not in diff
    # The user's index is untouched: no intent-to-add entries leak into it.
    assert git(repo, "status", "--porcelain") == status_before

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    patch = tmp_path / "code.patch"
    patch.write_bytes(diff)
    git(clone, "apply", str(patch))
    for name in ("train.py", "src/model.py", "src/new.py", "blob.bin"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name


# A change whose hunks differ between git's diff algorithms (found by a random search).
ALGO_OLD = "{\n}\n}\nb\na\nc\n{\nc\nc\n}\nc\n{\n"
ALGO_NEW = "a\n}\na\na\nc\nc\n{\nc\n}\n}\nc\nb\n"


def test_same_size_edit_in_the_index_second_is_seen(repo: Path) -> None:
    """Git trusts a file's stat data only when it is older than the index ("racy git")."""
    git(repo, "config", "core.trustctime", "false")  # so that only mtime and size can tell
    target = repo / "racy.txt"
    target.write_text("AAAA\n")
    past = target.stat().st_mtime_ns - 100 * 10**9
    os.utime(target, ns=(past, past))  # staged while clearly older than the index
    git(repo, "add", "racy.txt")
    git(repo, "commit", "-q", "-m", "racy")
    target.write_text("BBBB\n")  # same size, and the same mtime as when it was staged
    os.utime(target, ns=(past, past))
    os.utime(repo / ".git" / "index", ns=(past, past))  # as if the index was written then
    (repo / "new.py").write_text("x = 1\n")  # untracked: the diff goes through a copied index
    _, diff = capture_code(repo)
    assert b"+BBBB" in diff


def test_version_ignores_user_diff_settings(repo: Path) -> None:
    (repo / "algo.txt").write_text(ALGO_OLD)
    git(repo, "add", "algo.txt")
    git(repo, "commit", "-q", "-m", "algo")
    (repo / "algo.txt").write_text(ALGO_NEW)
    (repo / "train.py").write_text("a = 1\n\nb = 2\nprint('train')\nc = 3\n")
    (repo / "extra.py").write_text("x = 1\n")
    myers = git(repo, "diff", "--diff-algorithm=myers")
    assert git(repo, "diff", "--diff-algorithm=patience") != myers  # the test means something
    before = capture_code(repo)
    for key, value in [
        ("diff.mnemonicPrefix", "true"),
        ("diff.noprefix", "true"),
        ("diff.algorithm", "patience"),
        ("diff.context", "7"),
        ("color.ui", "always"),
        ("core.abbrev", "5"),
        ("diff.renames", "copies"),
    ]:
        git(repo, "config", key, value)
    assert capture_code(repo) == before


def test_each_change_gives_another_version(repo: Path) -> None:
    clean = capture_code(repo)[0].version
    (repo / "train.py").write_text("print(1)\n")
    one = capture_code(repo)[0].version
    (repo / "train.py").write_text("print(2)\n")
    two = capture_code(repo)[0].version
    assert len({clean, one, two}) == 3
    (repo / "train.py").write_text("print('train')\n")
    assert capture_code(repo)[0].version == clean


def test_large_untracked_files_are_named_not_captured(repo: Path) -> None:
    big = repo / "checkpoint.pt"
    with open(big, "wb") as f:
        f.truncate(UNTRACKED_MAX_FILE + 1)  # sparse: costs no disk
    code, diff = capture_code(repo)
    assert code.dirty
    assert code.skipped == ["checkpoint.pt"]
    assert code.untracked == []
    assert b"checkpoint.pt" not in diff
    assert code.version.endswith(f"+dirty.{sha256_hex(diff)[:12]}")


def test_detached_head_has_no_branch(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    code, _ = capture_code(repo)
    assert code.branch is None
    assert code.commit == git(repo, "rev-parse", "HEAD")


def test_repository_without_commits(tmp_path: Path, git_env: dict[str, str]) -> None:
    r = tmp_path / "fresh"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    assert capture_code(r) == (
        CodeVersion(commit=None, branch="main", dirty=False, diff_sha256=None, version="no-commit"),
        b"",
    )
    (r / "a.py").write_text("a\n")
    code, diff = capture_code(r)
    assert (code.version, code.dirty, diff) == ("no-commit", True, b"")


def test_outside_a_repository_or_without_git(
    tmp_path: Path, git_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.py").write_text("print(1)\n")
    code, diff = capture_code(plain)
    assert diff == b"" and code.commit is None and not code.dirty
    assert code.tree is not None and code.tree.root == str(plain.resolve())
    assert code.version == f"nogit.{code.tree.sha256[:12]}"
    assert (code.tree.files, code.tree.bytes) == (1, len("print(1)\n"))
    no_git = CodeVersion(commit=None, branch=None, dirty=False, diff_sha256=None, version="no-git")
    assert capture_code(tmp_path / "missing") == (no_git, b"")
    r = tmp_path / "r"
    r.mkdir()
    (r / "train.py").write_text("print(1)\n")
    git(r, "init", "-q")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # git is not installed
    # an unreadable repository is hashed as files, like no repository at all
    assert capture_code(r)[0].version == code.version


# -- code outside git --------------------------------------------------------------------------


@pytest.fixture
def plain(tmp_path: Path, git_env: dict[str, str]) -> Path:
    d = tmp_path / "exp"
    (d / "lib").mkdir(parents=True)
    (d / "train.py").write_text("import lib.model\n")
    (d / "lib" / "model.py").write_text("W = 1\n")
    return d


def test_outside_git_an_edit_gives_a_new_version_and_nothing_else_does(plain: Path) -> None:
    first = capture_code(plain)[0].version
    assert first.startswith("nogit.") and len(first) == len("nogit.") + 12
    assert capture_code(plain)[0].version == first  # untouched: the same
    os.utime(plain / "train.py", (1, 1))  # times and stat data never count
    assert capture_code(plain)[0].version == first
    (plain / "lib" / "model.py").write_text("W = 2\n")  # same size, other content
    second = capture_code(plain)[0].version
    assert second != first
    (plain / "lib" / "model.py").write_text("W = 1\n")
    assert capture_code(plain)[0].version == first  # back as it was
    (plain / "new.py").write_text("")
    assert capture_code(plain)[0].version not in (first, second)


def test_outside_git_caches_venvs_and_stowplan_state_do_not_count(plain: Path) -> None:
    first = capture_code(plain)[0]
    for junk in (
        ".stowplan/stowplan.db",
        ".venv/lib/x.py",
        "lib/__pycache__/model.cpython-312.pyc",
        "lib/model.pyc",
        ".git/HEAD",
        ".pytest_cache/v",
    ):
        p = plain / junk
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert capture_code(plain)[0] == first


def test_outside_git_the_ignore_file_leaves_out_what_it_lists(plain: Path) -> None:
    (plain / "results").mkdir()
    (plain / "results" / "a.csv").write_text("1")
    (plain / "notes.txt").write_text("n")
    (plain / "keep.txt").write_text("k")
    before = capture_code(plain)[0]
    (plain / ".stowplanignore").write_text("# outputs\nresults/\n*.txt\n!keep.txt\n/lib/gen_*\n")
    code = capture_code(plain)[0]
    assert code.tree is not None and code.tree.ignore_file == str(plain / ".stowplanignore")
    (plain / "results" / "a.csv").write_text("2")
    (plain / "notes.txt").write_text("changed")
    (plain / "lib" / "gen_1.py").write_text("generated")
    (plain / "gen_1.py").write_text("not anchored: counts")
    after = capture_code(plain)[0]
    assert after.version != before.version
    (plain / "gen_1.py").unlink()
    assert capture_code(plain)[0].version == code.version
    (plain / "keep.txt").write_text("K")  # negated: still counts
    assert capture_code(plain)[0].version != code.version


def test_outside_git_excluded_paths_and_referenced_files(plain: Path, tmp_path: Path) -> None:
    exp_file = plain / "exp.toml"
    exp_file.write_text("[experiment]\n")
    elsewhere = tmp_path / "shared" / "prep.py"
    elsewhere.parent.mkdir()
    elsewhere.write_text("print('prep')\n")
    words = ["python", str(elsewhere), f"--config={plain / 'train.py'}", "/no/such/file", "x"]
    code = capture_code(plain, references=words, exclude=[exp_file])[0]
    assert code.tree is not None and code.tree.referenced == [str(elsewhere.resolve())]
    exp_file.write_text("[experiment]\nname = 'x'\n")  # the spec is in the identity already
    assert capture_code(plain, references=words, exclude=[exp_file])[0] == code
    elsewhere.write_text("print('prep 2')\n")
    assert capture_code(plain, references=words, exclude=[exp_file])[0].version != code.version
    assert capture_code(plain)[0].version != code.version


def test_outside_git_symlinks_are_not_followed_and_large_files_count_by_size(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stowplan.provenance import capture

    secret = tmp_path / "outside.txt"
    secret.write_text("a")
    (plain / "link").symlink_to(secret)
    (plain / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.setattr(capture, "UNTRACKED_MAX_FILE", 20)
    (plain / "big.bin").write_bytes(b"b" * 32)
    code = capture_code(plain)[0]
    assert code.tree is not None and code.tree.skipped == ["big.bin"]
    secret.write_text("b")  # the link's target is not code of this directory
    (plain / "big.bin").write_bytes(b"c" * 32)  # same size: not seen (and said so)
    assert capture_code(plain)[0] == code
    (plain / "big.bin").write_bytes(b"c" * 33)
    assert capture_code(plain)[0].version != code.version
    assert "too large" in code.tree.describe()


def test_code_version_encodes_without_the_patch(repo: Path) -> None:
    (repo / "train.py").write_text("changed\n")
    code, diff = capture_code(repo)
    data = msgspec.to_builtins(code)
    assert set(data) == {
        "commit",
        "branch",
        "dirty",
        "diff_sha256",
        "version",
        "untracked",
        "skipped",
        "tree",
    }
    assert msgspec.convert(data, CodeVersion) == code
    assert len(canonical_json(code)) < len(diff) + 400


# -- environment -----------------------------------------------------------------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_lists_what_importlib_sees() -> None:
    env = capture_environment()
    dists = env["distributions"]
    assert dists == sorted(dists)
    names = [d.split("==")[0] for d in dists]
    assert len(names) == len(set(names))
    assert all(n == _normalize(n) for n in names)
    assert f"msgspec=={metadata.version('msgspec')}" in dists
    assert f"pytest=={metadata.version('pytest')}" in dists
    reference: dict[str, str] = {}
    for dist in metadata.distributions():
        reference.setdefault(_normalize(dist.metadata["Name"]), dist.version)
    assert dists == sorted(f"{n}=={v}" for n, v in reference.items())

    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["python"]["executable"] == sys.executable
    impl = env["python"]["implementation"]
    python = f"{impl} {sys.version_info.major}.{sys.version_info.minor}"
    # the identity covers the interpreter and what is declared, not everything installed
    assert env["env_hash"] == sha256_hex(canonical_json({"declared": {}, "python": python}))
    assert "checked before it is reused" in env["env_basis"]
    assert installed_distributions() == dists
    assert capture_environment()["env_hash"] == env["env_hash"]


def test_environment_sees_a_newly_installed_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    info = site / "Fancy_Pkg-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: Fancy_Pkg\nVersion: 1.2.3\n\nBody")
    before = capture_environment()["env_hash"]
    monkeypatch.syspath_prepend(str(site))
    env = capture_environment()
    assert "fancy-pkg==1.2.3" in env["distributions"]
    # an unrelated install is in the record, not in the identity
    assert env["env_hash"] == before

    # One that shadows an installed distribution replaces it, as it would for imports.
    shadow = tmp_path / "shadow"
    info = shadow / "msgspec-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: msgspec\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(shadow))
    msgspecs = [d for d in capture_environment()["distributions"] if d.startswith("msgspec==")]
    assert msgspecs == ["msgspec==0.0.1"]


def test_environment_identity_follows_the_declared_lock_files(tmp_path: Path) -> None:
    bare = capture_environment(lock_dirs=[tmp_path])
    (tmp_path / "uv.lock").write_text("version = 1\n")
    locked = capture_environment(lock_dirs=[tmp_path])
    assert locked["env_hash"] != bare["env_hash"]
    assert locked["env_basis"].startswith("declared by uv.lock")
    assert capture_environment(lock_dirs=[tmp_path])["env_hash"] == locked["env_hash"]
    (tmp_path / "uv.lock").write_text("version = 2\n")
    assert capture_environment(lock_dirs=[tmp_path])["env_hash"] != locked["env_hash"]


# -- hardware --------------------------------------------------------------------------------


def test_hardware() -> None:
    hw = capture_hardware()
    assert hw["cpu_count"] == os.cpu_count()
    assert hw["memory_total_bytes"] > 0
    assert hw["hostname"]
    assert hw["os"]
    assert hw["cpu_model"]
    assert hw["gpus"] == [msgspec.to_builtins(g) for g in capture_gpus()]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if models:
            assert hw["cpu_model"] == models[0].strip()
    msgspec.json.encode(hw)  # goes into a ProvenanceRecord as is


def test_import_is_cheap() -> None:
    code = (
        "import sys, stowplan.provenance.capture\n"
        "print(sorted(m for m in ('psutil', 'pynvml') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# -- data ------------------------------------------------------------------------------------


def test_data_pinned_wins(tmp_path: Path) -> None:
    assert data_version("missing.csv", "v7", tmp_path) == "v7"
    assert data_version("s3://bucket/train.csv", "3HL4kqtJlcpXroDTDmJ", tmp_path) == (
        "3HL4kqtJlcpXroDTDmJ"
    )


def test_data_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    f = tmp_path / "data" / "train.csv"
    f.write_bytes(b"x,y\n1,2\n")
    want = "sha256:" + hashlib.sha256(b"x,y\n1,2\n").hexdigest()
    assert data_version("data/train.csv", None, tmp_path) == want
    assert data_version(str(f), None, Path("/nonexistent")) == want
    assert data_version(f.as_uri(), None, Path("/nonexistent")) == want
    assert data_version(f"file://localhost{f}", None, tmp_path) == want


def test_data_directory_manifest(tmp_path: Path) -> None:
    def make(root: Path, files: dict[str, bytes]) -> Path:
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        return root

    files = {"a.csv": b"1\n", "sub/b.csv": b"2\n", "sub/deeper/c.bin": b"\x00\x01"}
    one = data_version(str(make(tmp_path / "one", files)), None, tmp_path)
    two = data_version(str(make(tmp_path / "two", dict(reversed(files.items())))), None, tmp_path)
    assert one == two  # same content elsewhere, written in another order
    assert one.startswith("sha256:")
    manifest = [
        ("a.csv", 2, sha256_hex(b"1\n")),
        ("sub/b.csv", 2, sha256_hex(b"2\n")),
        ("sub/deeper/c.bin", 2, sha256_hex(b"\x00\x01")),
    ]
    assert one == "sha256:" + sha256_hex(canonical_json(manifest))

    (tmp_path / "two" / "sub" / "b.csv").write_bytes(b"3\n")
    changed = data_version(str(tmp_path / "two"), None, tmp_path)
    (tmp_path / "two" / "sub" / "b.csv").rename(tmp_path / "two" / "sub" / "b2.csv")
    renamed = data_version(str(tmp_path / "two"), None, tmp_path)
    assert len({one, changed, renamed}) == 3


def test_data_missing_local_path_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        data_version("data/nope.csv", None, tmp_path)
    assert "data/nope.csv" in str(err.value)
    assert err.value.hint
    with pytest.raises(SpecError):
        data_version("file:///definitely/not/here.csv", None, tmp_path)
    with pytest.raises(SpecError, match="another host"):
        data_version("file://fileserver/share/x.csv", None, tmp_path)


def test_data_remote_without_pin_is_marked(tmp_path: Path) -> None:
    # schemes without an fsspec implementation installed here (s3fs is: see test_s3.py)
    for uri in ("gs://b/x", "https://example.org/d.tar", "nosuchscheme://b/x"):
        assert data_version(uri, None, tmp_path) == f"unpinned:{uri}"
