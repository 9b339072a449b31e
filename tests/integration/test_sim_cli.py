"""``stowplan sim`` and ``stowplan whatif`` as a user runs them: a real process, real traces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "examples" / "clusters"
# shipped with the repository (examples/traces/): these tests need nothing outside the checkout
TIRESIAS = ROOT / "examples" / "traces" / "tiresias" / "60_job.csv"


def stowplan(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stowplan.cli.main", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture
def trace() -> Path:
    assert TIRESIAS.is_file(), f"{TIRESIAS} is part of the repository"
    return TIRESIAS


def test_the_readme_example_runs_in_a_fresh_clone_without_stowplan_traces(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "STOWPLAN_TRACES"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stowplan.cli.main",
            "sim",
            "examples/clusters/gavel-16-16-16.toml",
            "examples/traces/gavel/103959.trace",
            "--policy",
            "fifo",
            "--no-plots",
            "--json",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"][0]["summary"]["jobs"] == 861


def test_a_file_in_the_wrong_place_gets_a_hint_for_the_right_kind(
    tmp_path: Path, trace: Path
) -> None:
    cluster = CLUSTERS / "university-slurm.toml"
    experiment = ROOT / "examples" / "quickstart.toml"
    r = stowplan("sim", trace, cluster, "--out", "o", cwd=tmp_path)
    assert r.returncode == 2
    assert "60_job.csv: this is a workload, given as CLUSTER" in r.stderr
    assert f"fix: swap the two: stowplan sim {cluster} {trace}" in r.stderr
    for args, role in (((experiment, trace), "CLUSTER"), ((cluster, experiment), "WORKLOAD")):
        r = stowplan("sim", *args, "--out", "o", cwd=tmp_path)
        assert r.returncode == 2
        assert (
            f"quickstart.toml: this is an experiment file (for stowplan run), given as {role}"
            in (r.stderr)
        )
        # the hint names a file of the right kind, never the misused one
        hint = r.stderr.split("fix:", 1)[1]
        assert "quickstart.toml" not in hint, r.stderr
        assert ("university-slurm.toml" if role == "CLUSTER" else "60_job.csv") in hint
    r = stowplan("sim", cluster, cluster, "--out", "o", cwd=tmp_path)
    assert r.returncode == 2 and "this is a cluster file, given as WORKLOAD" in r.stderr
    assert not (tmp_path / "o").exists()


def test_sim_writes_a_byte_identical_report_for_the_same_seed(tmp_path: Path, trace: Path) -> None:
    cluster = CLUSTERS / "university-slurm.toml"
    args = (cluster, trace, "--policy", "fifo", "--policy", "greedy", "--seed", "3")
    a = stowplan("sim", *args, "--out", "a", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    assert "p95" in a.stdout and "fifo" in a.stdout
    b = stowplan("sim", *args, "--out", "b", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {
        "report.json",
        "jobs-fifo.csv",
        "jobs-greedy.csv",
        "queue.png",
        "queue.svg",
        "wait_cdf.png",
        "wait_cdf.svg",
        "pools-fifo.csv",
        "timeseries-greedy.csv",
    } <= set(files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    run = report["runs"][0]
    assert run["summary"]["jobs"] == 60
    assert run["summary"]["states"] == {"SUCCEEDED": 60}
    attempts = sum(int(r["attempts"]) for r in _csv(tmp_path / "a" / "jobs-fifo.csv"))
    assert 60 <= run["idempotency"]["keys_executed"] <= attempts
    c = stowplan("sim", *args[:-1], "4", "--out", "c", cwd=tmp_path)
    assert c.returncode == 0, c.stderr


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    return list(csv.DictReader(path.read_text().splitlines()))


def test_whatif_reports_the_change_in_wait_utilization_and_cost(tmp_path: Path) -> None:
    cluster = CLUSTERS / "university-slurm.toml"
    wl = CLUSTERS / "sweep-workload.toml"
    r = stowplan(
        "whatif",
        cluster,
        wl,
        "--add",
        "pool=gpu-h100,count=8,like=gpu-a100,gpu_model=h100",
        "--policy",
        "greedy",
        "--json",
        "--no-plots",
        "--out",
        "w",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    d = out["whatif"]["delta"]
    assert set(d) >= {"wait_p50_s", "wait_p95_s", "wait_p99_s", "utilization", "cost"}
    assert d["cost"]["variant"] > d["cost"]["baseline"]  # 8 more owned nodes cost money
    assert d["wait_p99_s"]["variant"] <= d["wait_p99_s"]["baseline"]
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["whatif"]["changes"] == ["add 8 x gpu-h100 (like gpu-a100)"]
    placement = report["runs"][0]["workload"]["data_placement"]
    assert placement["seed"] == 5 and placement["datasets"] == ["imagenet"]


def test_bad_cluster_file_exits_2_names_the_line_and_writes_nothing(
    tmp_path: Path, trace: Path
) -> None:
    bad = tmp_path / "c.toml"
    text = (CLUSTERS / "university-slurm.toml").read_text()
    bad.write_text(text.replace('kind = "slurm"\nnodes = 16', 'kind = "slurm"\nnodes = "many"', 1))
    r = stowplan("sim", bad, trace, "--out", "o", cwd=tmp_path)
    assert r.returncode == 2
    assert "c.toml:" in r.stderr and "$.pools[1].nodes" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_bad_trace_and_bad_flags_exit_2(tmp_path: Path) -> None:
    cluster = CLUSTERS / "university-slurm.toml"
    t = tmp_path / "t.csv"
    t.write_text(
        "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n"
        "0,1,0,606,vgg19,164,30\n1,two,30,133,vgg11,147,23\n"
    )
    r = stowplan("sim", cluster, t, "--out", "o", cwd=tmp_path)
    assert r.returncode == 2 and "t.csv:3" in r.stderr and "num_gpu" in r.stderr
    good = CLUSTERS / "sweep-workload.toml"
    r = stowplan("whatif", cluster, good, "--add", "pool=nope,count=2", cwd=tmp_path)
    assert r.returncode == 2 and "no pool 'nope'" in r.stderr.replace('"', "'")
    r = stowplan("sim", cluster, good, "--policy", "bogus", cwd=tmp_path)
    assert r.returncode == 2 and "unknown policy" in r.stderr
    assert not (tmp_path / "o").exists()
