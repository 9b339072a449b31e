"""A real Slurm cluster for the session (see tests/slurmcluster/), and projects that use it.

Outside CI the cluster is skipped, with the reason, where it cannot start (not root). With
CI=true a missing service fails the tests: they are never skipped there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stowplan.provenance.records import RunRecord
from stowplan.provenance.store import RunStore
from tests.slurmcluster.cluster import ClusterFacts, SlurmCluster

from ..conftest import REPO, wait_for

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INSTALL = REPO / "tests" / "slurmcluster" / "install.sh"


def project_toml(facts: ClusterFacts, workdir: Path, **extra: object) -> str:
    lines = [
        '[project]\nname = "slurm-it"\n',
        "[providers.cluster]",
        'kind = "slurm"',
        'host = "127.0.0.1"',
        f"port = {facts.ssh_port}",
        f'user = "{facts.ssh_user}"',
        f'identity_file = "{facts.identity_file}"',
        f'known_hosts = "{facts.known_hosts}"',
        f'slurm_conf = "{facts.slurm_conf}"',
        f'workdir = "{workdir}"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def write_project(tmp_path: Path, facts: ClusterFacts, experiment: str, **extra: object) -> Path:
    (tmp_path / "stowplan.toml").write_text(project_toml(facts, tmp_path / "remote", **extra))
    # the cluster's workdir and the trials' marker files sit beside the experiment here: outside
    # git they would otherwise count as its code and change every run's identity mid-sweep
    (tmp_path / ".stowplanignore").write_text("remote/\n*.log\n")
    f = tmp_path / "exp.toml"
    f.write_text(experiment)
    return f


def stowplan(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``stowplan ARGS`` as its own process (its own Ray), in the project directory."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "stowplan.cli.main", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def runs_of(tmp_path: Path) -> list[RunRecord]:
    db = tmp_path / ".stowplan" / "stowplan.db"
    if not db.exists():
        return []
    with RunStore(db) as store:
        return [r for e in store.list_experiments() for r in store.runs_for_experiment(e.id)]


def our_elements(cluster: SlurmCluster, workdir: Path, expect: int = 0) -> dict[str, list[str]]:
    """Array elements Slurm ever had for this project's job names: name -> element ids, once
    accounting shows at least ``expect`` of them (up to 60 s): a run that saw its elements end
    in their end records is over before slurmdbd has every record."""
    names = sorted(p.name for p in (workdir / "jobs").glob("*") if p.is_dir())
    if not names:
        return {}
    found: dict[str, list[str]] = {}

    def enough() -> bool:
        nonlocal found
        found = _accounted(cluster, names)
        return sum(len(v) for v in found.values()) >= expect

    wait_for(enough, 60, f"{expect} array elements in accounting")
    return found


def _accounted(cluster: SlurmCluster, names: list[str]) -> dict[str, list[str]]:
    out = cluster.slurm(
        "sacct",
        "-X",
        "-n",
        "-P",
        "-D",
        "-S",
        "now-1days",
        f"--name={','.join(names)}",
        "--format=JobName,JobID",
    )
    elements: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, jid = line.partition("|")
        elements.setdefault(name, []).append(jid)
    return elements


def wait_running(cluster: SlurmCluster, predicate_fmt: str, count: int, what: str) -> None:
    """Wait until ``count`` running jobs show ``predicate_fmt`` in ``squeue -o %j|%T|%l``."""

    def ok() -> bool:
        out = cluster.slurm("squeue", "-h", "-r", "-o", "%j|%T|%l", check=False)
        return sum(1 for ln in out.splitlines() if predicate_fmt in ln) >= count

    wait_for(ok, 90, what)


@pytest.fixture(scope="session")
def slurm_rest(slurm_cluster: SlurmCluster) -> tuple[str, str]:
    """slurmrestd on the session cluster: its URL and a JWT for ``nobody`` (it refuses root)."""
    return slurm_cluster.start_rest("nobody")
