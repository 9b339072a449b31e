"""The inspection and planning commands on real runs in a real store: dependencies in `plan`,
`diff` of unlike runs, tables that are not cut when piped, and Ctrl-C on `logs -f`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore

from .conftest import wait_for

pytestmark = pytest.mark.integration

TRAIN = """\
import json, sys
x = float(sys.argv[1])
json.dump({"score": x * 2, "optimizer_learning_rate_schedule": "cosine"}, open("m.json", "w"))
"""
SELECT = """\
import json, os, sys
ups = json.load(open(os.environ["STOWPLAN_UPSTREAM"]))
if os.path.exists(os.path.join(os.path.dirname(__file__), "..", "fail-select")):
    sys.exit(3)
json.dump({"n": len(ups)}, open("best.json", "w"))
"""
EXPERIMENT = """\
[experiment]
name = "a-rather-long-experiment-name-for-wide-tables"

[[tasks]]
name = "train"
command = ["python", "{experiment_dir}/train.py", "{learning_rate_for_the_optimizer}"]
inputs = [{ uri = "data.txt" }]
outputs = ["m.json"]
resources = { cpus = 1, memory = "64MiB" }
sweep = { parameters = { learning_rate_for_the_optimizer = [0.125, 0.25, 0.5] } }

[[tasks]]
name = "select"
command = ["python", "{experiment_dir}/select.py"]
depends_on = ["train"]
outputs = ["best.json"]
resources = { cpus = 1, memory = "64MiB" }
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lab"
    root.mkdir()
    (root / "stowplan.toml").write_text(
        '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (root / "train.py").write_text(TRAIN)
    (root / "select.py").write_text(SELECT)
    (root / "data.txt").write_text("a b c\n")
    (root / "exp.toml").write_text(EXPERIMENT)
    monkeypatch.chdir(root)
    monkeypatch.delenv("COLUMNS", raising=False)
    return root


def plan_json(capsys: pytest.CaptureFixture[str], file: str, *more: str) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert main(["plan", file, "--json", *more]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_plan_places_only_ready_runs_and_says_what_the_rest_wait_on(
    ray_session: None, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # nothing has run: the three trials are placed, select waits on all three
    doc = plan_json(capsys, "exp.toml")
    assert {r["name"] for r in doc["runs"].values()} <= {"train[0]", "train[1]", "train[2]"}
    assert doc["placed"] + doc["queued"] == 3 and doc["reused"] == 0
    assert doc["waiting"] == 1
    assert doc["waits"] == [{"task": "select", "runs": 1, "on": {"train": 3}}]
    (select_id,) = doc["waiting_runs"]
    assert doc["waiting_runs"][select_id] == {"name": "select[0]", "waits_on": {"train": 3}}
    assert main(["plan", "exp.toml"]) == 0
    text = capsys.readouterr().out
    assert "select: 1 run waits on train (3 runs not yet succeeded)" in text
    assert main(["plan", "exp.toml", "--explain", select_id[:16]]) == 0
    text = capsys.readouterr().out
    assert "select[0]" in text and "waits on train (3 runs not yet succeeded: train[0]" in text
    assert not (project / ".stowplan" / "stowplan.db").exists()  # plan wrote nothing

    # the trials succeed, select fails (outside the experiment directory: same identities)
    (project.parent / "fail-select").touch()
    assert main(["run", "exp.toml"]) == 1
    capsys.readouterr()
    doc = plan_json(capsys, "exp.toml")
    assert doc["reused"] == 3 and doc["waiting"] == 0 and doc["placed"] == 1
    assert [r["name"] for r in doc["runs"].values()] == ["select[0]"]
    (project.parent / "fail-select").unlink()
    assert main(["run", "exp.toml"]) == 0
    doc = plan_json(capsys, "exp.toml")
    assert doc["reused"] == 4 and doc["waiting"] == 0 and doc["placed"] == 0

    # diff of a trial against select: empty sides shown as they are, not as missing fields
    with RunStore(project / ".stowplan" / "stowplan.db") as store:
        runs = {(r.task, r.index): r for r in store.all_runs()}
    train0, select = runs[("train", 0)], runs[("select", 0)]
    assert main(["diff", train0.run_id[:12], select.run_id[:12]]) == 0
    text = capsys.readouterr().out
    assert 'params: {"learning_rate_for_the_optimizer": 0.125} -> {}' in text
    assert "$.task.inputs: [{" in text and "-> []" in text
    assert "null ->" not in text and "-> null" not in text
    assert "$.task.inputs[0]" not in text and "params.learning_rate" not in text

    # piped (pytest captures stdout): rows are whole, not cut at 80 columns
    assert main(["find"]) == 0
    text = capsys.readouterr().out
    assert "learning_rate_for_the_optimizer=0.125" in text
    assert "a-rather-long-experiment-name-for-wide-tables" in text
    assert text.rstrip().endswith("4 runs")
    assert main(["find", "--task", "select"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("1 run")
    assert main(["status"]) == 0
    assert "a-rather-long-experiment-name-for-wide-tables" in capsys.readouterr().out
    assert main(["lineage", select.run_id[:12]]) == 0
    assert "1 data input" in capsys.readouterr().out


SLOW = """
[experiment]
name = "slow"
[[tasks]]
name = "nap"
script = "echo started; exec sleep 300"
resources = { cpus = 1, memory = "64MiB" }
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stowplan.cli.main", *args]


def test_ctrl_c_on_logs_follow_ends_quietly(tmp_path: Path) -> None:
    # a project of its own: `python -m` puts the working directory first on sys.path, where
    # the other project's select.py would shadow the standard library's select
    project = tmp_path
    (project / "stowplan.toml").write_text(
        '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (project / "slow.toml").write_text(SLOW)
    db = project / ".stowplan" / "stowplan.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def running() -> bool:
        if not db.exists():
            return False
        with RunStore(db) as store:
            return [r.state for r in store.runs_by_name("slow")] == ["RUNNING"]

    run_err = project / "run.err"
    with run_err.open("wb") as e:
        run = subprocess.Popen(
            _cli("run", "slow.toml"), cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=e
        )
    try:
        wait_for(lambda: running() or run.poll() is not None, 120, "the nap to run")
        assert run.poll() is None, run_err.read_text()
    finally:
        run.send_signal(signal.SIGKILL)  # the task outlives the driver; logs follow it still
        run.wait(30)
    with RunStore(db) as store:
        (nap,) = store.runs_by_name("slow")
    out, err = project / "logs.out", project / "logs.err"
    with out.open("wb") as o, err.open("wb") as e:
        logs = subprocess.Popen(
            _cli("logs", "-f", nap.run_id[:12]), cwd=project, env=env, stdout=o, stderr=e
        )
        try:
            wait_for(lambda: b"started" in out.read_bytes(), 60, "the log's first line")
            assert logs.poll() is None  # following, not finished
            logs.send_signal(signal.SIGINT)
            assert logs.wait(30) == 130
        finally:
            if logs.poll() is None:
                logs.kill()
    assert err.read_text() == ""  # no traceback, no noise
    done = subprocess.run(
        _cli("cancel", "slow"), cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "cancelled 1 run" in done.stdout and "run(s)" not in done.stdout


def _opened(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open now."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def test_ctrl_c_while_a_command_works_ends_it_quietly(tmp_path: Path) -> None:
    """Ctrl-C while `run` hashes a large data input (a sparse file: 64 GiB of zeros, long to
    read, nothing on disk): exit 130 and nothing on stderr, not a KeyboardInterrupt traceback.
    No Ray: the interrupt comes before anything starts."""
    project = tmp_path / "p"
    project.mkdir()
    big = tmp_path / "data" / "big.bin"  # outside the experiment: data, not its code
    big.parent.mkdir()
    with big.open("wb") as f:
        f.truncate(64 << 30)
    (project / "stowplan.toml").write_text(
        '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 1\n'
    )
    (project / "big.toml").write_text(
        f"""
[experiment]
name = "big"
[[tasks]]
name = "t"
script = "true"
inputs = [{{ uri = "{big}" }}]
resources = {{ cpus = 1, memory = "64MiB" }}
"""
    )
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # no hash of it cached from elsewhere
        "GIT_CEILING_DIRECTORIES": str(tmp_path),
    }
    err = tmp_path / "run.err"
    with err.open("wb") as e:
        run = subprocess.Popen(
            _cli("run", "big.toml", "--dry-run"),
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=e,
        )
        try:
            wait_for(
                lambda: _opened(run.pid, big) or run.poll() is not None, 60, "the data's hashing"
            )
            assert run.poll() is None, err.read_text()
            run.send_signal(signal.SIGINT)
            assert run.wait(30) == 130
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(30)
    assert err.read_text() == ""
    assert not (project / ".stowplan").exists()
