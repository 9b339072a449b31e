"""The CLI on a small real project: dry run, bad input, failures, inspection commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore

pytestmark = pytest.mark.integration

PROJECT = """
[project]
name = "cli"
[providers.local]
kind = "local"
cpus = 2
"""

EXPERIMENT = """
[experiment]
name = "small"
description = "three echoes, one failure, one dependent of the failure"

[[tasks]]
name = "echo"
script = 'echo "{{\\"word\\": \\"{word}\\"}}" > out.json'
outputs = ["out.json"]
resources = { cpus = 1, memory = "64MiB" }
sweep = { parameters = { word = ["a", "b", "c"] } }

[[tasks]]
name = "broken"
command = ["sh", "-c", "echo doomed >&2; exit 3"]
resources = { cpus = 1, memory = "64MiB" }

[[tasks]]
name = "after"
command = ["true"]
depends_on = ["broken", "echo"]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    f = tmp_path / "small.toml"
    f.write_text(EXPERIMENT)
    os.chdir(tmp_path)
    return f


def test_dry_run_shows_commands_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(project), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 runs" in out
    assert "exit 3" in out  # the rendered command of the broken task
    assert not (project.parent / ".stowplan" / "stowplan.db").exists()


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "[experiment]\nname='x'\n[[tasks]]\nname='a'\ncommand=['true']\nresources={cpus=0}\n",
            "$.tasks[0].resources.cpus",
        ),
        (
            "[experiment]\nname='x'\n[[tasks]]\nname='a'\ncommand=['true']\ndepends_on=['b']\n",
            "$.tasks[0].depends_on[0]",
        ),
        (
            "[experiment]\nname='x'\n[[tasks]]\nname='a'\ncommand=['true']\nresources={cpus=64}\n",
            "bad.toml:6 at $.tasks[0].resources: task 'a' asks for 64 CPUs",
        ),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], text: str, expect: str
) -> None:
    bad = project.parent / "bad.toml"
    bad.write_text(text)
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "bad.toml" in err and "Traceback" not in err
    assert not (project.parent / ".stowplan").exists()


def test_failures_and_inspection(
    ray_session: None, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(project)]) == 1
    capsys.readouterr()
    db = project.parent / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = {(r.task, r.index): r for r in store.runs_for_experiment(exp.id)}
        attempts = store.attempts_for([r.run_id for r in runs.values()])
    broken, after = runs[("broken", 0)], runs[("after", 0)]
    assert broken.state == "FAILED" and broken.failure == "user_error"
    assert "exit code 3" in broken.reason and "doomed" in broken.reason
    assert len(attempts[broken.run_id]) == 1  # user errors are not retried
    assert after.state == "FAILED" and after.failure == "dependency_failed"
    assert after.run_id not in attempts  # never submitted
    assert all(runs[("echo", i)].state == "SUCCEEDED" for i in range(3))

    assert main(["status", "small", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sorted(s["state"] for s in status) == [
        "FAILED",
        "FAILED",
        "SUCCEEDED",
        "SUCCEEDED",
        "SUCCEEDED",
    ]
    assert main(["ls", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["name"] == "small" and listed["counts"] == {"FAILED": 2, "SUCCEEDED": 3}

    echo_b = runs[("echo", 1)]
    assert main(["show", echo_b.run_id[:8], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["params"] == {"word": "b"}
    assert shown["run"]["identity"]["params"] == {"word": "b"}
    assert [a["state"] for a in shown["attempts"]] == ["SUCCEEDED"]
    assert [a["name"] for a in shown["artifacts"]] == ["out.json"]
    assert shown["provenance"]["environment"]["env_hash"]

    assert main(["logs", broken.run_id[:10], "--stderr"]) == 0
    assert "doomed" in capsys.readouterr().out
    assert main(["show", "zzzz"]) == 2
    assert "zzzz" in capsys.readouterr().err

    # the failed runs are tried again (new attempts), the succeeded ones reused
    assert main(["run", str(project)]) == 1
    assert "3 of 5 runs reused" in capsys.readouterr().err
    with RunStore(db) as store:
        again = store.attempts_for([broken.run_id])[broken.run_id]
    assert [a.attempt for a in again] == [1, 2]
    assert again[0].key != again[1].key


def test_address_joins_an_existing_ray_cluster(ray_session: None, tmp_path: Path) -> None:
    """`--address` runs the control plane on a cluster that outlives the command."""
    import subprocess
    import sys

    import ray

    (tmp_path / "stowplan.toml").write_text(PROJECT)
    (tmp_path / "one.toml").write_text(
        '[experiment]\nname = "one"\n[[tasks]]\nname = "t"\ncommand = ["true"]\n'
    )
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "stowplan.cli.main", "run", "one.toml", "--address", address],
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    # the cluster is still up, and the command's actors are gone from it
    assert ray.is_initialized()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert "queue" not in names
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        assert [r.state for r in store.runs_by_name("one")] == ["SUCCEEDED"]


def test_rerun_makes_new_replicates(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    f = tmp_path / "two.toml"
    f.write_text(
        '[experiment]\nname = "two"\n[[tasks]]\nname = "t"\ncommand = ["echo", "{seed}"]\n'
        "sweep = { parameters = { i = [1, 2] } }\n"
    )
    os.chdir(tmp_path)
    assert main(["run", str(f)]) == 0
    assert main(["run", str(f), "--rerun"]) == 0
    assert main(["run", str(f)]) == 0
    assert "2 of 2 runs reused" in capsys.readouterr().err
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        runs = store.runs_by_name("two")
    assert sorted((r.index, r.replicate) for r in runs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r.run_id for r in runs}) == 4
    # a replicate is the same spec with the next seed, so {seed} differs between them
    assert sorted({r.seed for r in runs}) == [0, 1]
