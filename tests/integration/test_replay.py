"""`stowplan replay` end to end: real git worktrees, real Ray, real SQLite, real files.

The acceptance cases of issue 6: the quickstart sweep replayed in a fresh clone reproduces every
trial bit for bit; a dirty-tree run replays with its diff applied; replay refuses (exit 2,
nothing submitted) when the commit is gone, the data version is gone, the record was tampered
with, or (with --strict-env) the environment differs.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.provenance.data import default_cache_path
from stowplan.provenance.store import RunStore

from .test_provenance_cli import cli_json, fake_dist, git, project

pytestmark = pytest.mark.integration
__all__ = ["project"]


def _store(root: Path) -> RunStore:
    return RunStore(root / ".stowplan" / "stowplan.db")


def _replay_dirs() -> list[Path]:
    d = default_cache_path().parent / "replays"
    return sorted(d.iterdir()) if d.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(900)  # two 25-run sweeps on two shared cores
def test_quickstart_replayed_in_a_fresh_clone_reproduces_every_trial(
    ray_session: None,
    quickstart: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = quickstart.parent.parent
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for k, v in {
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(elsewhere),
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }.items():
        monkeypatch.setenv(k, v)
    (repo / ".gitignore").write_text(".stowplan/\n__pycache__/\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "quickstart")
    monkeypatch.chdir(repo)
    assert main(["run", "examples/quickstart.toml"]) == 0

    clone = elsewhere / "clone"
    git(elsewhere, "clone", "-q", str(repo), str(clone))
    # the records travel; the code comes from the clone's own git objects
    shutil.copytree(repo / ".stowplan" / "blobs", clone / ".stowplan" / "blobs")
    # SQLite's online backup: a plain copy of the file could miss what is still in its WAL
    src = sqlite3.connect(repo / ".stowplan" / "stowplan.db")
    dst = sqlite3.connect(clone / ".stowplan" / "stowplan.db")
    src.backup(dst)
    src.close()
    dst.close()
    shutil.rmtree(repo)  # nothing of the original tree is left to read by accident
    monkeypatch.chdir(clone)

    out = cli_json(capsys, "replay", "digits-svm", "--verify")
    assert isinstance(out, dict)
    assert out["verdict"] == "REPRODUCED" and out["diff_applied"] is False
    replays = out["replays"]
    assert len(replays) == 25
    assert {r["task"] for r in replays} == {"train", "select"}
    for r in replays:
        assert r["state"] == "SUCCEEDED" and r["verdict"] == "REPRODUCED", r
        assert [o["how"] for o in r["outputs"]] == ["identical"], r
        assert r["run_id"] != r["of"]
    with _store(clone) as store:
        for r in replays:
            rec = store.replay_source(r["run_id"])
            assert rec is not None and rec.of_run_id == r["of"] and rec.verdict == "REPRODUCED"
        (entry,) = [e for e in store.ledger() if e.action == "replay"]
        assert entry.details["runs"] == 25
    assert _replay_dirs() == []  # the worktree is gone again
    assert "worktree" not in git(clone, "worktree", "list").split("\n", 1)[-1]


def test_a_dirty_tree_run_replays_with_its_diff(
    ray_session: None, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # uncommitted: an edit to train.py and a new untracked module it imports
    (project / "bonus.py").write_text("BONUS = 100\n")
    train = (project / "train.py").read_text()
    (project / "train.py").write_text(
        train.replace("import json, sys", "import json, sys\nfrom bonus import BONUS").replace(
            "x + len(rows)", "x + BONUS + len(rows)"
        )
    )
    assert main(["run", "tiny.toml"]) == 0
    with _store(project) as store:
        runs = store.runs_by_name("tiny")
        first = next(r for r in runs if r.task == "train" and r.index == 0)
        (art,) = store.artifacts_for([first.run_id])[first.run_id]
        assert json.loads(Path(art.path).read_text())["score"] == pytest.approx(1 + 100 + 4.03)
        assert "+dirty." in first.identity["code_version"]
    # back to the clean tree: only the record still knows the change
    git(project, "checkout", "--", "train.py")
    (project / "bonus.py").unlink()

    out = cli_json(capsys, "replay", first.run_id[:12], "--verify")
    assert isinstance(out, dict)
    assert out["diff_applied"] is True and out["verdict"] == "REPRODUCED"
    (r,) = out["replays"]
    assert r["of"] == first.run_id and r["outputs"][0]["how"] == "identical"


def test_replay_refusals_submit_nothing(
    ray_session: None,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outside = tmp_path / "external.txt"
    outside.write_text("w x y z\n")
    exp = (project / "tiny.toml").read_text()
    (project / "ext.toml").write_text(
        exp.replace('name = "tiny"', 'name = "ext"')
        .replace('inputs = [{ uri = "data.txt" }]', f'inputs = [{{ uri = "{outside}" }}]')
        .replace("{experiment_dir}/data.txt", str(outside))
    )
    git(project, "add", "ext.toml")
    git(project, "commit", "-q", "-m", "ext")
    assert main(["run", "ext.toml"]) == 0
    with _store(project) as store:
        runs = store.runs_by_name("ext")
        target = next(r for r in runs if r.task == "train" and r.index == 1)
        select = next(r for r in runs if r.task == "select")

    def refused(*argv: str, says: str) -> None:
        with _store(project) as store:
            before = (len(store.all_runs()), len(store.ledger()))
        capsys.readouterr()
        assert main(["replay", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
        with _store(project) as store:
            assert (len(store.all_runs()), len(store.ledger())) == before
        assert _replay_dirs() == []

    # the environment differs and --strict-env is given
    with monkeypatch.context() as m:
        m.syspath_prepend(str(fake_dist(tmp_path / "site", "9.9.9")))
        refused(target.run_id, "--strict-env", says="package added: fancy-pkg==9.9.9")

    # the data version is gone
    outside.write_text("changed\n")
    refused(target.run_id, says="data input")
    outside.write_text("w x y z\n")

    # the record was tampered with: the seed in the run's body
    db = project / ".stowplan" / "stowplan.db"
    c = sqlite3.connect(db, isolation_level=None)
    (body,) = c.execute(
        "SELECT b.body FROM run_bodies b JOIN runs r ON r.rid = b.rid WHERE r.run_id = ?",
        (target.run_id,),
    ).fetchone()
    edited = json.loads(body)
    edited["identity"]["seed"] += 1
    c.execute(
        "UPDATE run_bodies SET body = ? WHERE rid = (SELECT rid FROM runs WHERE run_id = ?)",
        (json.dumps(edited), target.run_id),
    )
    refused(target.run_id, says="record was changed")
    c.execute(
        "UPDATE run_bodies SET body = ? WHERE rid = (SELECT rid FROM runs WHERE run_id = ?)",
        (body, target.run_id),
    )
    c.close()
    # ... or an output of an upstream run that the replay would read
    with _store(project) as store:
        (art,) = store.artifacts_for([target.run_id])[target.run_id]
    blob = Path(art.path)
    original = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(b'{"score": 1e9}')
    refused(select.run_id, says="was changed")
    blob.write_bytes(original)

    # the commit is gone (rewritten away and collected)
    git(project, "commit", "-q", "--amend", "-m", "rewritten")
    git(project, "reflog", "expire", "--expire=now", "--all")
    git(project, "gc", "-q", "--prune=now")
    refused(target.run_id, says=f"commit {target.identity['code_version'][:40]}")
    assert subprocess.run(["git", "-C", str(project), "worktree", "prune"], check=True)
