"""``stowplan run --dry-run`` on the real cluster changes nothing, here or on the cluster, and
plans offline from the facts a real discovery saved when the login node cannot be reached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from stowplan.actors.session import prepare
from stowplan.cli.control import discover, save_discovered
from stowplan.providers.facts import facts_path
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
