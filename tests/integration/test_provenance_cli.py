"""Provenance queries and the audit ledger through the real CLI: real Ray, SQLite, git, files."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore

pytestmark = pytest.mark.integration

TRAIN = """\
import json, sys
x, seed, data = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = open(data).read().split()
json.dump({"score": x + len(rows) + seed / 100}, open("metrics.json", "w"))
"""
SELECT = """\
import json, os
ups = json.load(open(os.environ["STOWPLAN_UPSTREAM"]))
best = max(ups, key=lambda u: json.load(open(u["outputs"]["metrics.json"]))["score"])
json.dump({"best": best["run_id"]}, open("best.json", "w"))
"""
EXPERIMENT = """\
[experiment]
name = "tiny"
seed = 3

[[tasks]]
name = "train"
command = ["python", "{experiment_dir}/train.py", "{x}", "{seed}", "{experiment_dir}/data.txt"]
inputs = [{ uri = "data.txt" }]
outputs = ["metrics.json"]
resources = { cpus = 1, memory = "64MiB" }
sweep = { parameters = { x = [1, 2, 3] } }

[[tasks]]
name = "select"
command = ["python", "{experiment_dir}/select.py"]
depends_on = ["train"]
outputs = ["best.json"]
resources = { cpus = 1, memory = "64MiB" }
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lab"
    root.mkdir()
    for k, v in {
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp_path),
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }.items():
        monkeypatch.setenv(k, v)
    (root / "stowplan.toml").write_text(
        '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (root / ".gitignore").write_text(".stowplan/\n")
    (root / "train.py").write_text(TRAIN)
    (root / "select.py").write_text(SELECT)
    (root / "data.txt").write_text("a b c d\n")
    (root / "tiny.toml").write_text(EXPERIMENT)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny")
    monkeypatch.chdir(root)
    return root


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fake_dist(where: Path, version: str) -> Path:
    info = where / f"fancy_pkg-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fancy-pkg\nVersion: {version}\n")
    return where


def test_audit_lineage_find_replicates(
    ray_session: None, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "tiny.toml", "--why", "first look"]) == 0
    db = project / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        runs = store.runs_by_name("tiny")
        train = sorted((r for r in runs if r.task == "train"), key=lambda r: r.index)
        (select,) = [r for r in runs if r.task == "select"]
        (best,) = store.artifacts_for([select.run_id])[select.run_id]
        data_version = train[0].identity["data_versions"]["data.txt"]
        prov = store.get_provenance(train[0].provenance)
    assert prov.data["data.txt"]["size"] == len("a b c d\n")
    assert prov.code["experiment_file"] == "tiny.toml"

    # the ledger names who submitted what, and why
    (entry,) = cli_json(capsys, "audit", "log")  # type: ignore[misc]
    assert entry["action"] == "submit" and entry["why"] == "first look"
    assert entry["details"]["runs"] == 4 and entry["who"]

    # show prints the whole record: data versions, environment, audit trail
    capsys.readouterr()
    assert main(["show", train[0].run_id[:10]]) == 0
    shown = capsys.readouterr().out
    assert f"data data.txt: {data_version}, 8 B" in shown
    assert "#1 submit by" in shown and ": first look" in shown
    assert "0.0 GiB" not in shown  # memory is read from the key capture writes
    full = cli_json(capsys, "show", train[0].run_id[:10])
    assert isinstance(full, dict)
    assert [e["action"] for e in full["ledger"]] == ["submit"]
    # the queue records the placement decision of every attempt
    assert [p["attempt"] for p in full["placements"]] == [1]
    assert full["placements"][0]["pool"] and full["replay_of"] is None

    # lineage of the best artifact reaches every trial and the dataset
    graph = cli_json(capsys, "lineage", best.sha256[:12])
    assert isinstance(graph, dict)
    reached = graph["reaches"]
    assert set(reached["run"]) == {f"run:{r.run_id}" for r in [*train, select]}
    assert reached["data"] == [f"data:data.txt@{data_version}"]
    assert len(reached["artifact"]) == 4  # best.json and the three metrics.json
    capsys.readouterr()
    assert main(["lineage", select.run_id[:10], "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph lineage") and f"run:{train[2].run_id}" in dot
    # an output's name means the newest run's output of that name
    by_name = cli_json(capsys, "lineage", "best.json")
    assert isinstance(by_name, dict) and by_name["root"] == f"artifact:{best.sha256}"
    svg = project.parent / "lineage.svg"  # not in the tree: that would make it dirty
    capsys.readouterr()
    if shutil.which("dot"):
        assert main(["lineage", "best.json", "--format", "svg", "-o", str(svg)]) == 0
        assert "<svg" in svg.read_text() and select.run_id[:12] in svg.read_text()
    else:  # Graphviz is not installed: said so, exit 2
        assert main(["lineage", "best.json", "--format", "svg", "-o", str(svg)]) == 2
        assert "Graphviz" in capsys.readouterr().err and not svg.exists()
    # down from the dataset's first trial: its metrics, then select, then best.json
    down = cli_json(capsys, "lineage", train[0].run_id, "--down")
    assert isinstance(down, dict)
    assert f"artifact:{best.sha256}" in down["reaches"]["artifact"]
    assert f"run:{train[1].run_id}" not in down["reaches"]["run"]

    # find by parameter, data hash, code commit and artifact
    commit = git(project, "rev-parse", "HEAD")
    found = cli_json(capsys, "find", "--param", "x>1", "--code", commit[:8])
    assert {f["run_id"] for f in found} == {train[1].run_id, train[2].run_id}  # type: ignore[index]
    found = cli_json(capsys, "find", "--data", data_version.removeprefix("sha256:")[:10])
    assert {f["run_id"] for f in found} == {r.run_id for r in train}  # type: ignore[index]
    found = cli_json(capsys, "find", "--artifact", best.sha256[:10])
    assert [f["run_id"] for f in found] == [select.run_id]  # type: ignore[index]
    assert main(["find", "--param", "x>>1"]) == 2  # a bad filter is bad input

    # replicates: 3 seeds of every trial, mean and std of each metric
    status = cli_json(capsys, "run", "tiny.toml", "--replicates", "3")
    assert isinstance(status, dict)
    assert status["counts"] == {"SUCCEEDED": 12} and status["reused"] == 4
    rows = {(s["task"], s["index"]): s for s in status["replicates"]}
    x2 = rows[("train", 1)]
    assert x2["seeds"] == [3, 4, 5] and len(set(x2["run_ids"])) == 3
    scores = [2 + 4 + s / 100 for s in (3, 4, 5)]
    assert x2["metrics"]["score"]["mean"] == pytest.approx(statistics.fmean(scores))
    assert x2["metrics"]["score"]["std"] == pytest.approx(statistics.stdev(scores))

    # the chain verifies; an edit made straight in the file is named
    capsys.readouterr()
    assert main(["audit", "verify"]) == 0
    assert "OK: 2 entries" in capsys.readouterr().out
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("DROP TRIGGER ledger_no_update")
    c.execute("UPDATE ledger SET why = 'nothing to see' WHERE seq = 1")
    c.close()
    assert main(["audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert "TAMPERED" in err and "entry 1" in err and "edited" in err


def test_diff_of_runs_that_differ_in_one_package_names_it(
    ray_session: None,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with monkeypatch.context() as m:
        m.syspath_prepend(str(fake_dist(tmp_path / "v1", "1.0.0")))
        assert main(["run", "tiny.toml"]) == 0
    with monkeypatch.context() as m:
        # The tasks never import fancy-pkg, so it is not part of their identity: the plain
        # run would reuse; a new replicate records the new environment.
        m.syspath_prepend(str(fake_dist(tmp_path / "v2", "1.1.0")))
        assert main(["run", "tiny.toml", "--rerun"]) == 0
    with RunStore(project / ".stowplan" / "stowplan.db") as store:
        first = [r for r in store.runs_by_name("tiny") if r.task == "train" and r.index == 0]
    a, b = sorted(first, key=lambda r: r.replicate)

    d = cli_json(capsys, "diff", a.run_id[:10], b.run_id[:10])
    assert isinstance(d, dict)
    assert d["packages"] == {
        "added": [],
        "removed": [],
        "changed": [{"package": "fancy-pkg", "a": "1.0.0", "b": "1.1.0"}],
    }
    for group in ("spec", "data", "environment", "hardware", "placement"):
        assert d[group] == [], group
    assert d["params"] == [{"field": "seed", "a": a.seed, "b": b.seed}]  # the replicate's
    assert d["code"]["fields"] == []
    capsys.readouterr()
    assert main(["diff", a.run_id[:10], b.run_id[:10]]) == 0
    text = capsys.readouterr().out
    assert "~ fancy-pkg 1.0.0 -> 1.1.0" in text and "spec:" not in text


def test_cancel_is_in_the_ledger_with_its_reason(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stowplan.session import prepare, record

    prepared = prepare(project / "tiny.toml")
    with RunStore(prepared.store_path) as store:
        record(prepared, store)  # recorded, never dispatched: PENDING
    assert main(["cancel", "tiny", "--why", "wrong dataset"]) == 0
    (entry,) = cli_json(capsys, "audit", "log")  # type: ignore[misc]
    assert entry["action"] == "cancel" and entry["why"] == "wrong dataset"
    assert entry["details"]["runs"] == 4 and entry["target"] == "tiny"
    assert sorted(entry["details"]["run_ids"]) == sorted(r.run_id for r in prepared.planned)
    assert os.environ.get("STOWPLAN_SECRET") is None or "STOWPLAN_SECRET" not in str(entry)


IMPORTS = """\
import json, fancy
json.dump({"ok": 1}, open("out.json", "w"))
"""


def test_replay_compares_what_the_run_imported_with_what_is_there_now(
    ray_session: None,
    project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The run imports fancy-pkg from a site directory on its own PYTHONPATH (so this process,
    and the environment stowplan records, never see it); after an upgrade there, replay names
    the change, and --strict-env refuses it."""
    from tests.unit.provenance.test_capture_used import make_dist

    site = tmp_path / "site"
    make_dist(site, "fancy-pkg", "1.0", "fancy", top_level=True)
    (project / "imp.py").write_text(IMPORTS)
    (project / "imp.toml").write_text(
        f"""
[experiment]
name = "imp"
[[tasks]]
name = "t"
command = ["python", "{{experiment_dir}}/imp.py"]
env = {{ PYTHONPATH = "{site}" }}
outputs = ["out.json"]
resources = {{ cpus = 1, memory = "64MiB" }}
"""
    )
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "imp")
    assert main(["run", "imp.toml"]) == 0
    with RunStore(project / ".stowplan" / "stowplan.db") as store:
        (run,) = store.runs_by_name("imp")
    make_dist(site, "fancy-pkg", "2.0", "fancy", top_level=True)

    capsys.readouterr()
    assert main(["replay", run.run_id[:12], "--strict-env"]) == 2
    err = capsys.readouterr().err
    assert "--strict-env" in err and "used package changed: fancy-pkg 1.0 -> 2.0" in err
    with RunStore(project / ".stowplan" / "stowplan.db") as store:
        assert len(store.all_runs()) == 1  # refused: nothing submitted

    out = cli_json(capsys, "replay", run.run_id[:12], "--verify")
    assert isinstance(out, dict)
    assert "used package changed: fancy-pkg 1.0 -> 2.0" in out["environment_differences"]
    assert out["verdict"] == "REPRODUCED"  # the output does not depend on the version
