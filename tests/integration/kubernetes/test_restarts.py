"""The control plane SIGKILLed mid-sweep on the emulated cluster and started again: every trial
SUCCEEDED exactly once (one attempt each, one Indexed Job per request, one pod per index).

The emulator's kubelet runs no containers; the test ends pods: some while the first control
plane watches, some while none runs, the rest under the second one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stowplan.provenance.store import RunStore
from tests.kubecluster import KubeCluster, PodOutcome

from ..conftest import wait_for
from .conftest import write_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 12
SWEEP = f"""
[experiment]
name = "k8s-restarts"

[[tasks]]
name = "work"
command = ["python", "work.py", "--i", "{{i}}"]
resources = {{ cpus = 1, memory = "256MiB" }}
sweep = {{ parameters = {{ i = {{ type = "int", low = 0, high = {N - 1} }} }} }}
"""
INDEX = "batch.kubernetes.io/job-completion-index"
JOB = "batch.kubernetes.io/job-name"


def stowplan(tmp_path: Path, log: str, *args: str) -> subprocess.Popen[bytes]:
    """``stowplan ARGS`` as its own process (its own Ray); output to ``log`` in the project."""
    with (tmp_path / log).open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stowplan.cli.main", *args],
            cwd=tmp_path,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def succeeded(db: Path) -> int:
    if not db.exists():
        return 0
    with RunStore(db) as store:
        return sum(
            r.state == "SUCCEEDED"
            for e in store.list_experiments()
            for r in store.runs_for_experiment(e.id)
        )


def running(cluster: KubeCluster) -> list[dict[str, Any]]:
    pods = [p for p in cluster.pods() if p.get("status", {}).get("phase") == "Running"]
    return sorted(
        pods, key=lambda p: (p["metadata"]["labels"][JOB], int(p["metadata"]["labels"][INDEX]))
    )


def end(cluster: KubeCluster, pods: list[dict[str, Any]]) -> None:
    for p in pods:
        cluster.succeed_pod(p["metadata"]["name"])


def test_control_plane_killed_and_restarted(
    kube_cluster: KubeCluster, kubeconfig: Path, tmp_path: Path
) -> None:
    f = write_project(tmp_path, kubeconfig, SWEEP)
    db = tmp_path / ".stowplan" / "stowplan.db"
    kube_cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    first = stowplan(tmp_path, "first.log", "run", str(f), "--provider", "k8s")
    try:
        wait_for(lambda: len(running(kube_cluster)) == N, 120, "every trial's pod to run")
        end(kube_cluster, running(kube_cluster)[:4])  # while the first control plane watches
        wait_for(lambda: succeeded(db) >= 2, 60, "successes recorded by the first plane")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    before = succeeded(db)
    assert before < N, "the sweep finished before the kill"
    end(kube_cluster, running(kube_cluster)[:4])  # while no control plane runs
    second = stowplan(tmp_path, "second.log", "run", str(f), "--provider", "k8s")
    try:
        # the second plane found what ended meanwhile, then the rest end under its watch
        wait_for(lambda: succeeded(db) >= 8, 120, "the second plane to reconcile")
        end(kube_cluster, running(kube_cluster))
        rc = second.wait(120)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(30)
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]

    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        attempts = store.attempts_for([r.run_id for r in runs])
    assert len(runs) == N and {r.state for r in runs} == {"SUCCEEDED"}
    assert all(len(a) == 1 for a in attempts.values()) and len(attempts) == N, attempts
    jobs = kube_cluster.objects("jobs", group="batch")
    keys = [k for j in jobs for k in json.loads(j["metadata"]["annotations"]["stowplan.io/keys"])]
    assert sorted(keys) == sorted(a[0].key for a in attempts.values())
    creates = sum(
        1
        for r in kube_cluster.requests
        if r.method == "POST" and r.status == 201 and r.path.endswith("/jobs")
    )
    assert creates == len(jobs)
    pods = Counter(
        (p["metadata"]["labels"][JOB], p["metadata"]["labels"][INDEX]) for p in kube_cluster.pods()
    )
    assert sum(pods.values()) == N and set(pods.values()) == {1}, pods
    token = kube_cluster.token
    for log in ("first.log", "second.log"):
        assert token not in (tmp_path / log).read_text()
