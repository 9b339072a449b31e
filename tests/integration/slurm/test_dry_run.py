"""``stowplan run --dry-run`` on the real cluster changes nothing, here or on the cluster, and
plans offline from the facts a real discovery saved when the login node cannot be reached."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from stowplan.cli.control import discover, save_discovered
from stowplan.providers.facts import facts_path
from stowplan.session import prepare
from tests.slurmcluster.cluster import ClusterFacts, SlurmCluster

from .conftest import finish, stowplan, write_project
from .test_ssh_drop import CuttingProxy

pytestmark = pytest.mark.integration

EXPERIMENT = (
    '[experiment]\nname = "dry"\n[[tasks]]\nname = "t"\ncommand = ["true"]\n'
    'resources = { cpus = 1, memory = "16MiB" }\n'
    'sweep = { parameters = { i = { type = "int", low = 0, high = 4 } } }\n'
)


def tree(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ""
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def test_a_dry_run_asks_the_cluster_and_writes_nothing(
    tmp_path: Path, slurm_cluster: SlurmCluster, facts: ClusterFacts
) -> None:
    write_project(tmp_path, facts, EXPERIMENT)
    before = tree(tmp_path)
    commands_before, _ = slurm_cluster.ssh_sessions()
    rc, out, err = finish(stowplan(tmp_path, "run", "exp.toml", "--dry-run"), 180)
    assert rc == 0, err
    assert "#SBATCH" in out and "unreachable" not in err
    # it did discover, over SSH (counted by the login node's sshd) ...
    assert slurm_cluster.ssh_sessions()[0] > commands_before
    # ... and wrote nothing: no .stowplan/ (no stats, no facts, no index), no remote workdir
    assert tree(tmp_path) == before
    assert not (tmp_path / "remote").exists()


def test_an_unreachable_cluster_dry_runs_from_the_facts_a_real_discovery_saved(
    tmp_path: Path, facts: ClusterFacts
) -> None:
    proxy = CuttingProxy(facts.ssh_port)
    # known_hosts names sshd's port; the proxy's port is another host entry
    known = tmp_path / "known_hosts"
    line = Path(facts.known_hosts).read_text().split(" ", 1)[1]
    known.write_text(f"[127.0.0.1]:{proxy.port} {line}")
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "slurm-dry"\n[providers.campus]\nkind = "slurm"\n'
        f'host = "127.0.0.1"\nport = {proxy.port}\nuser = "{facts.ssh_user}"\n'
        f'identity_file = "{facts.identity_file}"\nknown_hosts = "{known}"\n'
        f'slurm_conf = "{facts.slurm_conf}"\nworkdir = "{tmp_path / "remote"}"\n'
    )
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    try:
        prepared = prepare(tmp_path / "exp.toml")
        pools = discover(prepared)  # what a real run does first, then it saves the facts
        save_discovered(prepared, pools)
        assert pools and facts_path(Path(prepared.state_dir), "campus").is_file()
    finally:
        proxy.close()  # the login node is gone: connections are refused
    before = tree(tmp_path)
    rc, out, err = finish(stowplan(tmp_path, "run", "exp.toml", "--dry-run"), 180)
    assert rc == 0, err
    assert "campus: unreachable (" in err and "using facts discovered" in err, err
    assert "#SBATCH" in out and "5 runs" in out
    assert tree(tmp_path) == before


GPU_EXPERIMENT = (
    '[experiment]\nname = "dry-gpu"\n[[tasks]]\nname = "g"\ncommand = ["true"]\n'
    'resources = { cpus = 1, memory = "16MiB", gpus = 1, gpu_type = ["a100", "fake"] }\n'
)


def dry_run_then_run(tmp_path: Path, facts: ClusterFacts, **extra: object) -> tuple[str, str]:
    """The request ``stowplan run --dry-run`` shows, and the job script the run then submits
    (read back from the cluster's workdir)."""
    write_project(tmp_path, facts, GPU_EXPERIMENT, **extra)
    rc, out, err = finish(stowplan(tmp_path, "run", "exp.toml", "--dry-run"), 180)
    assert rc == 0, err
    shown_at = re.search(r"\(first trial\) on provider cluster, pool (\S+):\n", out)
    assert shown_at, f"the dry run showed no request:\n{out}"
    shown = out[shown_at.end() :].rstrip("\n")
    rc, _, err = finish(stowplan(tmp_path, "run", "exp.toml", "--json"), 180)
    assert rc == 0, err[-3000:]
    (script,) = (tmp_path / "remote" / "jobs").glob("*/job.sh")
    return shown, script.read_text().rstrip("\n")


def test_a_dry_run_prints_exactly_the_job_script_the_run_submits(
    tmp_path: Path, slurm_cluster: SlurmCluster, facts: ClusterFacts
) -> None:
    """A task that accepts a100 or fake GPUs, on the gpu partition: the dry run and the real
    submit render with the same discovered facts, so both name the cluster's type
    (``gpu:fake:1``; it was ``gpu:1`` in the dry run when the types came from ``discover``)."""
    shown, submitted = dry_run_then_run(tmp_path, facts, partitions='["gpu"]')
    assert "#SBATCH --gres=gpu:fake:1\n" in shown
    assert shown == submitted


def test_a_dry_run_shows_the_pool_the_run_is_placed_on(
    tmp_path: Path, slurm_cluster: SlurmCluster, facts: ClusterFacts
) -> None:
    """With both partitions offered (the cpu one holds the GPU nodes too), the dry run shows
    the pool the placer gives the first trial, as the real run's core does."""
    shown, submitted = dry_run_then_run(tmp_path, facts)
    assert "#SBATCH --gres=gpu:fake:1\n" in shown and "#SBATCH --gres=gpu:fake:1\n" in submitted
    assert shown == submitted
