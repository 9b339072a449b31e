"""The burst project of ``examples/burst/`` (the real Slurm test cluster over SSH, the AWS provider
on moto's server) through ``stowplan plan``: with the campus GPU partition taken by other users'
jobs and more waiting in its queue, the sweep's trials that the partition holds stay there and
the excess bursts to spot g5 instances; the plan's table and JSON say so, and planning writes,
submits and launches nothing.

The example's ``stowplan.toml`` is used as shipped, with only its connection fields pointed at
the two test services.

"Full", as Slurm discovery reads it (``providers/slurm/capacity.py``): the partition's queue
holds more than the planning horizon (an hour) of other users' work, so the partition is offered
only its own GPUs, at that expected wait. Here every GPU node runs another user's ``sleep`` and
a three-hour job waits behind them; the example values a trial-hour of waiting at $0.10, less
than a spot g5 instance-hour, so what the partition holds stays there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stowplan.cli.main import main
from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.harness import instances
from tests.integration.aws.proxy import LossyProxy
from tests.integration.conftest import wait_for
from tests.slurmcluster.cluster import GPU_NODES, GPUS_PER_NODE, ClusterFacts, SlurmCluster

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "burst"
TRIALS = 12
HELD = len(GPU_NODES) * GPUS_PER_NODE
"""Trials the campus partition holds at once: one GPU each."""


def project_for(tmp_path: Path, facts: ClusterFacts) -> Path:
    """The example copied into ``tmp_path``, its connection fields pointed at the services."""
    shutil.copy(EXAMPLE / "experiment.toml", tmp_path / "experiment.toml")
    text = (EXAMPLE / "stowplan.toml").read_text()
    for old, new in {
        'host = "login.campus.example.org"': f'host = "127.0.0.1"\nport = {facts.ssh_port}\n'
        f'known_hosts = "{facts.known_hosts}"\nslurm_conf = "{facts.slurm_conf}"',
        'user = "alice"': f'user = "{facts.ssh_user}"',
        'identity_file = "~/.ssh/id_ed25519"': f'identity_file = "{facts.identity_file}"',
        'workdir = "stowplan"': f'workdir = "{tmp_path / "remote"}"',
        # moto's credentials come from the environment (the ``aws`` fixture)
        'profile = "lab"': "",
        'bucket = "s3://lab-stowplan/burst"': f'bucket = "s3://{BUCKET}/burst"',
    }.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "stowplan.toml").write_text(text)
    (tmp_path / ".stowplanignore").write_text("remote/\n")
    return tmp_path / "experiment.toml"


def fill_partition(cluster: SlurmCluster) -> list[str]:
    """Other users' work on the GPU partition: every node taken whole by a running ``sleep``
    and one more job of three hours waiting behind them. Returns the job ids (the caller
    cancels them)."""

    def sbatch(*extra: str) -> str:
        out = cluster.slurm(
            "sbatch",
            "--parsable",
            "-p",
            "gpu",
            "-J",
            "someone-else",
            "-N",
            "1",
            "-c",
            "8",
            "--mem=1G",
            f"--gres=gpu:{GPUS_PER_NODE}",
            "-o",
            "/dev/null",
            "--chdir=/tmp",
            *extra,
            "--wrap",
            "sleep 3600",
        )
        return out.strip().split(";")[0]

    ids = [sbatch("-t", "2:00:00") for _ in GPU_NODES]

    def running() -> bool:
        out = cluster.slurm("squeue", "-h", "-j", ",".join(ids), "-o", "%T", check=False)
        return out.split() == ["RUNNING"] * len(ids)

    try:
        wait_for(running, 60, "the filler jobs to run on every GPU node")
        # waits: its CPU-seconds over the partition's CPUs are the queue's wait, 1.5 h
        ids.append(sbatch("-t", "3:00:00"))
        wait_for(
            lambda: "PENDING" in cluster.slurm("squeue", "-h", "-j", ids[-1], "-o", "%T"),
            30,
            "the waiting job to queue",
        )
    except BaseException:
        cluster.slurm("scancel", *ids, check=False)
        raise
    return ids


def test_full_partition_bursts_the_excess_to_spot_g5(
    facts: ClusterFacts,
    slurm_cluster: SlurmCluster,
    aws: tuple[LossyProxy, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, client = aws
    f = project_for(tmp_path, facts)
    monkeypatch.chdir(tmp_path)
    fillers = fill_partition(slurm_cluster)
    try:
        assert main(["plan", str(f), "--json"]) == 0, capsys.readouterr().err
        doc = json.loads(capsys.readouterr().out)
        assert main(["plan", str(f)]) == 0, capsys.readouterr().err
        table = capsys.readouterr().out
    finally:
        slurm_cluster.slurm("scancel", *fillers, check=False)

    assert doc["placed"] == TRIALS and doc["queued"] == 0 and doc["unplaced"] == {}, doc
    by_pool: dict[str, int] = {}
    for a in doc["assignments"]:
        by_pool[a["pool"]] = by_pool.get(a["pool"], 0) + a["tasks"]
    # what the partition holds stays there, behind the queue's wait
    slurm = [a for a in doc["assignments"] if a["provider"] == "campus"]
    assert [a["pool"] for a in slurm] == ["campus/gpu"], doc["assignments"]
    assert by_pool["campus/gpu"] == HELD, by_pool
    assert slurm[0]["gpu_model"] == "fake" and slurm[0]["wait_s"] >= 3600, slurm
    # the excess goes to spot g5 instances, one trial per A10G
    cloud = [a for a in doc["assignments"] if a["provider"] == "cloud"]
    assert cloud and sum(a["tasks"] for a in cloud) == TRIALS - HELD, doc["assignments"]
    for a in cloud:
        region, itype, market = a["pool"].split("/")[1:]
        assert (region, market, a["gpu_model"]) == ("us-east-1", "spot", "a10g"), a
        assert itype.startswith("g5."), a
    launched = {p: n for p, n in doc["instances"].items() if n}
    assert set(launched) == {a["pool"] for a in cloud}, doc["instances"]
    assert sum(launched.values()) >= 1

    # the table says so: a row per pool, with its GPU model
    rows = [line for line in table.splitlines() if " train " in f" {line} "]
    assert any("campus/gpu (fake)" in r for r in rows), table
    for a in cloud:
        assert any(f"{a['pool']} (a10g)" in r for r in rows), table
    assert f"{TRIALS} placed now, 0 queued" in table, table

    # planning wrote nothing: no store, no sbatch, no instance, no object in the bucket
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()
    assert not (tmp_path / "remote" / "jobs").exists()
    assert instances(client) == []
    assert client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
