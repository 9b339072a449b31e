"""``stowplan run --provider k8s`` end to end on the emulated cluster, through the real control
plane (Ray actors: provider actor -> driver watch -> queue).

The emulator's kubelet does not run containers: a test decides what happens to each pod
(``KubeCluster.set_pod_behaviour``). Here every pod succeeds and writes one log line naming its
completion index. The trials declare no outputs (nothing can come back from an emulated pod).
Afterwards: every trial SUCCEEDED exactly once (one attempt, one pod per index, one Job per
request, no key in two Jobs), and the kubeconfig's token is in no store row, log or output.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore
from tests.kubecluster import KubeCluster, PodOutcome

from .conftest import write_project

pytestmark = pytest.mark.integration

C = [0.1, 1, 10, 100]
GAMMA = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03]
N = len(C) * len(GAMMA)

SWEEP = """
[experiment]
name = "digits-svm-k8s"
seed = 7

[[tasks]]
name = "train"
command = ["python", "train.py", "--C", "{C}", "--gamma", "{gamma}", "--seed", "{seed}"]
resources = { cpus = 1, memory = "512MiB" }
timeout = "5m"

[tasks.sweep]
method = "grid"
parameters = { C = [0.1, 1, 10, 100], gamma = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03] }

[[tasks]]
name = "select"
command = ["python", "select_best.py"]
depends_on = ["train"]
resources = { cpus = 1, memory = "256MiB" }
"""


def succeed_all(pod: dict[str, Any]) -> PodOutcome:
    idx = pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]
    return PodOutcome("succeed", log=f"trial index {idx} done\n")


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_quickstart_sweep_on_kubernetes(
    ray_session: None,
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = write_project(tmp_path, kubeconfig, SWEEP)
    os.chdir(tmp_path)
    kube_cluster.set_pod_behaviour(succeed_all)

    assert main(["run", str(f), "--provider", "k8s"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()

    db = tmp_path / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        attempts = store.attempts_for([r.run_id for r in runs])
    assert len(runs) == N + 1
    assert {r.state for r in runs} == {"SUCCEEDED"}, Counter(r.state for r in runs)
    trains = [r for r in runs if r.task == "train"]
    assert {(r.params["C"], r.params["gamma"]) for r in trains} == {
        (c, g) for c in C for g in GAMMA
    }
    assert {len(a) for a in attempts.values()} == {1}, attempts
    assert len(attempts) == N + 1

    # on the cluster: each request one Indexed Job, each attempt one pod, no key twice
    jobs = kube_cluster.objects("jobs", group="batch")
    keys = [k for j in jobs for k in json.loads(j["metadata"]["annotations"]["stowplan.io/keys"])]
    assert sorted(keys) == sorted(a[0].key for a in attempts.values())
    pods = Counter(
        (p["metadata"]["labels"]["batch.kubernetes.io/job-name"], pod_index(p))
        for p in kube_cluster.pods()
    )
    assert sum(pods.values()) == N + 1 and set(pods.values()) == {1}, pods
    creates = Counter(
        r.path.rsplit("/", 1)[-1]
        for r in kube_cluster.requests
        if r.method == "POST" and r.status == 201
    )
    assert creates == {"jobs": len(jobs), "configmaps": len(jobs)}, creates
    assert all(a[0].provider == "k8s" for a in attempts.values())
    # select ran after every train trial ended: its Job was created after theirs finished
    (select,) = [r for r in runs if r.task == "select"]
    select_job = next(
        j
        for j in jobs
        if attempts[select.run_id][0].key in j["metadata"]["annotations"]["stowplan.io/keys"]
    )
    train_done = max(j["status"]["completionTime"] for j in jobs if j is not select_job)
    assert select_job["metadata"]["creationTimestamp"] >= train_done
    with capsys.disabled():  # the figures, shown with -s
        print(
            f"\nk8s e2e: {N + 1} trials, {len(jobs)} Jobs, {len(kube_cluster.requests)} API "
            f"requests ({len(kube_cluster.requests) / (N + 1):.2f} per trial)"
        )

    # the token: in no store row, log, state file or output
    token = kube_cluster.token.encode()
    leaks = [p for p in files_under(tmp_path / ".stowplan") if token in p.read_bytes()]
    assert not leaks, leaks
    assert token in kubeconfig.read_bytes()  # the scan can see it where it is
    # the trial's log, read back through the driver (pod log by completion index)
    first = trains[0]
    assert main(["logs", first.run_id[:12]]) == 0
    logged = capsys.readouterr()
    assert "trial index" in logged.out and kube_cluster.token not in logged.out + logged.err
    # the Ray workers' logs (the provider actor's driver logs there)
    ray_logs = [p for p in files_under(ray_session_dir() / "logs") if p.stat().st_size < 50 << 20]
    assert ray_logs
    assert not [p for p in ray_logs if token in p.read_bytes()]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = "\n".join(conn.iterdump())  # every row of every table, as SQL text
    assert "INSERT INTO" in rows and kube_cluster.token not in rows
    assert kube_cluster.token not in out + err
    assert kube_cluster.token not in caplog.text


def ray_session_dir() -> Path:
    import ray

    # NOTE: no public API names the session directory
    node: Any = ray._private.worker._global_node
    return Path(node.get_session_dir_path())


def pod_index(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])
