"""``stowplan run --provider cloud`` end to end on the AWS provider against moto's server, through
the real control plane (a ``stowplan`` process of its own: its Ray workers need the endpoint in
their environment). ``Fleet`` (harness.py) stands in for EC2 booting: each instance moto shows
gets its real user-data run locally. The quickstart sweep runs with outputs in S3 and logs read
back with ``stowplan logs``; afterwards every trial ran exactly once and no instance is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stowplan.provenance.store import RunStore
from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.harness import Fleet, instances, project_toml, running
from tests.integration.aws.proxy import LossyProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
N = 24


def quickstart_project(tmp_path: Path, **aws: str) -> Path:
    shutil.copytree(REPO / "examples" / "digits", tmp_path / "examples" / "digits")
    shutil.copy(REPO / "examples" / "quickstart.toml", tmp_path / "examples")
    (tmp_path / "stowplan.toml").write_text(project_toml("aws-e2e", **aws))
    (tmp_path / ".stowplanignore").write_text("instances/\n")
    return tmp_path / "examples" / "quickstart.toml"


def stowplan(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stowplan.cli.main", *args]


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """``stowplan ARGS`` in the project, its output in ``NAME.out``."""
    out = (tmp_path / f"{name}.out").open("wb")
    return subprocess.Popen(
        stowplan(tmp_path, *args), cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT
    )


def finish(tmp_path: Path, name: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for ``proc``; its output. Fails with the output's tail if it fails or hangs."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        rc = None
    text = (tmp_path / f"{name}.out").read_text(errors="replace")
    assert rc == 0, f"stowplan {name}: rc {rc}\n{text[-6000:]}"
    return text


def env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def executions(fleet_root: Path) -> Counter[str]:
    """Attempt directories started on the instances, by run id (``runs/RUN/ATTEMPT``)."""
    return Counter(p.parent.name for p in fleet_root.glob("*/root/runs/*/*") if p.is_dir())


def runs_and_attempts(tmp_path: Path) -> tuple[list[Any], dict[str, Any]]:
    db = tmp_path / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        attempts = store.attempts_for([r.run_id for r in runs])
    return runs, attempts


def test_quickstart_sweep_on_aws(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    proxy, client = aws
    f = quickstart_project(tmp_path)
    with Fleet(tmp_path / "instances", client, moto_url) as fleet:
        run = start(tmp_path, "run", "run", str(f), "--provider", "cloud")
        try:
            rc = run.wait(400)
        finally:
            run.kill()
        fleet.check()
        # nothing left running: the agents idle out and halt their instances
        fleet.wait_all_down(90)
    out = (tmp_path / "run.out").read_text(errors="replace")
    runs, attempts = runs_and_attempts(tmp_path)
    assert len(runs) == N + 1
    trains = [r for r in runs if r.task == "train"]
    assert {r.state for r in trains} == {"SUCCEEDED"}, out[-4000:]
    # every trial once: one attempt each, started once on the instances
    assert {len(a) for a in attempts.values()} == {1}, attempts
    assert all(a[0].provider == "cloud" for a in attempts.values())
    ran = executions(tmp_path / "instances")
    assert set(ran) == {r.run_id for r in runs} and set(ran.values()) == {1}, ran
    # outputs in S3, with the trial's metrics in them
    s3 = client("s3")
    for r in trains:
        obj = f"sp/attempts/{r.run_id}/{attempts[r.run_id][0].key}/outputs/metrics.json"
        body = s3.get_object(Bucket=BUCKET, Key=obj)["Body"].read()
        assert "accuracy" in json.loads(body)
    # logs through `stowplan logs`
    logs = subprocess.run(
        stowplan(tmp_path, "logs", trains[0].run_id[:12]),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert logs.returncode == 0, logs.stderr
    assert '"accuracy"' in logs.stdout, logs.stdout
    launched = instances(client)
    print(
        f"\naws e2e: {N + 1} trials, {len(launched)} instances, "
        f"{len(proxy.seen)} requests at the proxy"
    )
    # the outputs reached the store, fetched from S3, and the select task read them there
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        arts = store.artifacts_for([r.run_id for r in runs])
    for r in trains:
        (a,) = arts[r.run_id]
        assert a.name == "metrics.json" and a.size > 0, a
        assert "accuracy" in json.loads(Path(a.path).read_text())
    (select,) = [r for r in runs if r.task == "select"]
    assert select.state == "SUCCEEDED" and rc == 0, out[-4000:]


CRASH_N = 16
HIGH = CRASH_N - 1
CRASH_SWEEP = f"""
[experiment]
name = "aws-crash"

[[tasks]]
name = "work"
script = 'sleep 5; echo "trial $STOWPLAN_RUN_ID done"'
resources = {{ cpus = 1, memory = "256MiB" }}
timeout = "5m"
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {HIGH} }} }} }}
"""


def succeeded(tmp_path: Path) -> int:
    db = tmp_path / ".stowplan" / "stowplan.db"
    if not db.exists():
        return 0
    with RunStore(db) as store:
        return sum(
            1
            for e in store.list_experiments()
            for r in store.runs_for_experiment(e.id)
            if r.state == "SUCCEEDED"
        )


def test_control_plane_killed_mid_sweep_and_restarted(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    (tmp_path / "stowplan.toml").write_text(project_toml("aws-crash", max_instances="2"))
    (tmp_path / ".stowplanignore").write_text("instances/\n*.out\n")
    f = tmp_path / "sweep.toml"
    f.write_text(CRASH_SWEEP)
    with Fleet(tmp_path / "instances", client, moto_url) as fleet:
        first = start(tmp_path, "first", "run", str(f), "--provider", "cloud")
        try:
            end = time.monotonic() + 300
            while succeeded(tmp_path) < 3 and first.poll() is None:
                assert time.monotonic() < end, "no 3 successes before the kill"
                time.sleep(0.2)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        assert 3 <= succeeded(tmp_path) < CRASH_N, "the sweep finished before the kill"
        assert running(client), "no instance was up at the kill"
        finish(
            tmp_path, "second", start(tmp_path, "second", "run", str(f), "--provider", "cloud"), 300
        )
        fleet.check()
        fleet.wait_all_down(90)
    db = tmp_path / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
    assert len(runs) == CRASH_N and {r.state for r in runs} == {"SUCCEEDED"}
    ran = executions(tmp_path / "instances")
    assert set(ran) == {r.run_id for r in runs} and set(ran.values()) == {1}, ran
    assert not running(client)


NOTICE_SWEEP = """
[experiment]
name = "aws-notice"

[[tasks]]
name = "work"
script = 'if [ "$STOWPLAN_ATTEMPT" = 1 ]; then exec sleep 300; fi; echo "rerun done"'
resources = { cpus = 1, memory = "256MiB" }
timeout = "10m"
"""


def test_a_spot_notice_mid_trial_reruns_it_elsewhere_as_preempted(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    # EC2 posts the two-minute interruption notice while the trial runs (first attempt:
    # it would run for 5 minutes): the agent preempts it, the core retries it as PREEMPTED on
    # another instance, where it succeeds; then EC2 reclaims the noticed instance
    _, client = aws
    (tmp_path / "stowplan.toml").write_text(
        project_toml("aws-notice", spot='"only"', max_instances="2")
    )
    (tmp_path / ".stowplanignore").write_text("instances/\n*.out\n")
    f = tmp_path / "sweep.toml"
    f.write_text(NOTICE_SWEEP)
    fleet_root = tmp_path / "instances"
    with Fleet(fleet_root, client, moto_url) as fleet:
        run = start(tmp_path, "run", "run", str(f), "--provider", "cloud")
        try:
            end = time.monotonic() + 300
            while not list(fleet_root.glob("*/root/runs/*/1")):
                assert run.poll() is None and time.monotonic() < end, "the trial never started"
                time.sleep(0.2)
            (first,) = [p.parents[3].name for p in fleet_root.glob("*/root/runs/*/1")]
            fleet.imds.notice(first)
            status = f"sp/agents/{next(iter(fleet_tags(client, first)))}/status"
            while b"notice" not in s3_body(client, status):
                assert run.poll() is None and time.monotonic() < end, "no notice noted"
                time.sleep(0.2)
            finish(tmp_path, "run", run, 300)
        finally:
            run.kill()
        fleet.reclaim(first)  # the two minutes are up
        fleet.check()
        fleet.wait_all_down(90)
    runs, attempts = runs_and_attempts(tmp_path)
    (r,) = runs
    assert r.state == "SUCCEEDED"
    tried = sorted(attempts[r.run_id], key=lambda a: a.attempt)
    assert [(a.state, a.failure) for a in tried] == [("FAILED", "preempted"), ("SUCCEEDED", None)]
    assert tried[0].job_id == first and tried[1].job_id != first
    ran = sorted(p.parents[3].name for p in fleet_root.glob("*/root/runs/*/*"))
    assert len(ran) == 2 and ran.count(first) == 1  # the rerun went elsewhere, once
    assert not running(client)


def fleet_tags(client: Any, iid: str) -> list[str]:
    """The ``stowplan:agent`` tag of instance ``iid``."""
    got = client("ec2").describe_instances(InstanceIds=[iid])
    tags = got["Reservations"][0]["Instances"][0]["Tags"]
    return [t["Value"] for t in tags if t["Key"] == "stowplan:agent"]


def s3_body(client: Any, key: str) -> bytes:
    try:
        return bytes(client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except client("s3").exceptions.NoSuchKey:
        return b""
