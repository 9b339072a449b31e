"""``stowplan replay --server``: the service replays runs from its own store on its control
plane (a real ``stowplan serve``, uvicorn, local Ray, SQLite, git worktrees).

The lab's project is a git repository; an experiment submitted through the service is
recorded at its commit with the workspace's files as the recorded diff. Its trials wait for a
go-file, so the test sees the replay in flight: the recorded code is checked out on the server
while the replay's runs run and the CLI has no verdict yet; once they end the worktree is
gone and the CLI prints REPRODUCED. The ledger names the user who asked; another team's user
and a viewer are refused with nothing recorded."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.scheduler.states import FINAL
from tests.integration.service.conftest import Service, auth, lab, poll

pytestmark = pytest.mark.integration

WAIT_PY = b"""import json, os, sys, time
from pathlib import Path
while not Path(os.environ["GO"]).exists():
    time.sleep(0.05)
json.dump({"i": int(sys.argv[1]), "score": int(sys.argv[1]) ** 2}, open("metrics.json", "w"))
"""


def waiting(go: Path) -> str:
    return f"""
[experiment]
name = "cats"

[[tasks]]
name = "work"
command = ["python", "{{experiment_dir}}/work.py", "{{i}}"]
env = {{ GO = "{go}" }}
outputs = ["metrics.json"]
resources = {{ cpus = 1, memory = "64MiB" }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = 1 }} }} }}
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True, timeout=30)


def cli(tmp: Path, url: str, token: str, *argv: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STOWPLAN_TOKEN": token, "STOWPLAN_SERVER": url}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "stowplan.cli.main", *argv],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def ledger(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / ".stowplan" / "stowplan.db") as db:
        return [(r[0], r[1]) for r in db.execute("SELECT who, action FROM ledger ORDER BY seq")]


@pytest.mark.timeout(900)
def test_replay_through_the_service_holds_the_code_until_its_runs_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "lab"
    root.mkdir()
    tokens = lab(root)
    (root / ".gitignore").write_text(".stowplan/\n__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "lab")
    worktrees = tmp_path / "cache" / "stowplan" / "replays"
    go = tmp_path / "go"
    go.touch()  # the original runs do not wait

    svc = Service(root, read_only=False)
    try:
        svc.wait_healthy(240)
        with httpx.Client(base_url=svc.url, timeout=120, headers=auth(tokens["mona"])) as c:
            r = c.post(
                "/api/v1/experiments",
                json={
                    "request_id": "cats-0000000001",
                    "filename": "exp.toml",
                    "experiment": waiting(go),
                    "files": {"work.py": base64.b64encode(WAIT_PY).decode()},
                },
            )
            assert r.status_code == 201, r.text
            originals = r.json()["run_ids"]

            def all_final(exp: str) -> list[dict[str, Any]] | None:
                rows: list[dict[str, Any]] = c.get(f"/api/v1/experiments/{exp}/status").json()
                return rows if rows and all(row["state"] in FINAL for row in rows) else None

            rows = poll("the original runs to end", 240, lambda: all_final("cats"))
            assert {row["state"] for row in rows} == {"SUCCEEDED"}, rows

        # another team's member and a viewer may not replay the team's runs
        before = ledger(root)
        for user, why in (("nora", "another team's"), ("vera", "a viewer cannot replay")):
            p = cli(tmp_path, svc.url, tokens[user], "replay", "cats")
            out, err = p.communicate(timeout=120)
            assert p.returncode == 2, (out, err)
            assert why in err.decode(), err
        assert ledger(root) == before

        go.unlink()  # the replay's runs wait until the test has looked
        p = cli(tmp_path, svc.url, tokens["mona"], "replay", "cats", "--verify", "--json")
        assert p.stderr is not None
        first = p.stderr.readline().decode()
        assert "replaying 2 runs on the service" in first, first
        with httpx.Client(base_url=svc.url, timeout=120, headers=auth(tokens["mona"])) as c:

            def replay_running() -> bool | None:
                rows = c.get("/api/v1/runs", params={"experiment": "cats"}).json()
                running = [r for r in rows if r["state"] == "RUNNING"]
                return True if len(running) == 2 else None

            poll("the replay's runs to run", 240, replay_running)
        held = [d for d in worktrees.iterdir()] if worktrees.exists() else []
        assert held, "the recorded code is not checked out while the replay runs"
        assert p.poll() is None, "the CLI ended before the replay's runs did"
        go.touch()
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (out, err)
        got = json.loads(out)
        assert got["verdict"] == "REPRODUCED", got
        assert sorted(r["of"] for r in got["replays"]) == sorted(originals)
        assert {r["state"] for r in got["replays"]} == {"SUCCEEDED"}
        assert not worktrees.exists() or not list(worktrees.iterdir()), "worktree kept"
        assert ("mona", "replay") in ledger(root)
    finally:
        go.touch()
        assert svc.stop() == 0, svc.text()
