"""The mixed project of ``examples/mixed/`` (a local provider, the real Slurm test cluster over
SSH, the emulated Kubernetes cluster) through ``stowplan plan`` and ``stowplan plan --explain``:
each task lands on the one pool that has its GPU model or sits at its data's site, and the
explanation says so.

The example's ``stowplan.toml`` is used as shipped, with only its connection fields pointed at
the two test clusters.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from stowplan.cli.main import main
from tests.kubecluster import KubeCluster
from tests.slurmcluster.cluster import ClusterFacts

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mixed"

# task -> (the pools at the right site or with the GPU model, GPU model, what the explanation's
# first line must say). A CPU task may take either pool of its data's site: both cost the same.
WHERE = {
    "tokenize": ({"campus/cpu", "campus/gpu"}, "", "0 GB moved"),
    "finetune": ({"gke/a100"}, "a100", "on a100"),
    "ablate": ({"campus/gpu"}, "fake", "on fake"),
    "embed": ({"gke/cpu", "gke/a100"}, "", "0 GB moved"),
    "report": ({"laptop"}, "", "0 GB moved"),
}
# why the pools a task did not get are not for it, as --explain names them: (the start of the
# line, what it says)
NOT_FOR = {
    "finetune": ("not campus/gpu", "no 1 x a100 there"),
    "ablate": ("not gke/a100", "no 1 x fake there"),
    "tokenize": ("gke/", "would move 200 GB"),
    "embed": ("campus/", "would move 120 GB"),
    "report": ("not gke/cpu", "cannot reach site europe-west4"),
}


def project_for(tmp_path: Path, facts: ClusterFacts, kubeconfig: Path) -> Path:
    """The example copied into ``tmp_path``, its connection fields pointed at the clusters."""
    for name in ("experiment.toml", "notes.md"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    text = (EXAMPLE / "stowplan.toml").read_text()
    for old, new in {
        'host = "login.campus.example.org"': f'host = "127.0.0.1"\nport = {facts.ssh_port}\n'
        f'known_hosts = "{facts.known_hosts}"\nslurm_conf = "{facts.slurm_conf}"',
        'user = "alice"': f'user = "{facts.ssh_user}"',
        'identity_file = "~/.ssh/id_ed25519"': f'identity_file = "{facts.identity_file}"',
        'workdir = "stowplan"': f'workdir = "{tmp_path / "remote"}"',
        'kubeconfig = "~/.kube/config"': f'kubeconfig = "{kubeconfig}"',
    }.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "stowplan.toml").write_text(text)
    (tmp_path / ".stowplanignore").write_text("kubeconfig\nremote/\n")
    return tmp_path / "experiment.toml"


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(["plan", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_mixed_project_places_by_gpu_model_and_data_site(
    facts: ClusterFacts,
    kube_cluster: KubeCluster,
    kubeconfig: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    f = project_for(tmp_path, facts, kubeconfig)
    os.chdir(tmp_path)

    doc = plan_json(capsys, str(f))
    assert doc["unplaced"] == {} and doc["queued"] == 0, doc
    runs = doc["runs"]
    placed: dict[str, set[tuple[str, str]]] = {}
    first: dict[str, str] = {}
    for run_id, r in runs.items():
        task = r["name"].split("[")[0]
        placed.setdefault(task, set()).add((r["pool"], r["gpu_model"]))
        if r["name"].endswith("[0]"):
            first[task] = run_id
    assert set(placed) == set(WHERE), placed
    for task, (pools, gpu, _) in WHERE.items():
        ((pool, model),) = placed[task]  # every trial of a task in the same place
        assert pool in pools and model == gpu, (task, placed[task])
    assert {p["provider"] for p in doc["assignments"]} == {"laptop", "campus", "gke"}

    # the table names each task's pool, GPU model and site
    assert main(["plan", str(f)]) == 0
    table = capsys.readouterr().out
    for task, (_, gpu, _) in WHERE.items():
        ((pool, _),) = placed[task]
        row = next(line for line in table.splitlines() if f" {task} " in f" {line} ")
        assert pool in row and (not gpu or f"({gpu})" in row), row
    assert "europe-west4" in table and "campus" in table

    for task, (_, gpu, why) in WHERE.items():
        ((pool, _),) = placed[task]
        assert main(["plan", str(f), "--explain", first[task][:12]]) == 0
        text = capsys.readouterr().out
        head = text.splitlines()[0]
        assert head.startswith(f"{task}[0] {first[task][:12]} -> {pool}"), text
        assert why in head, text
        if task in NOT_FOR:
            other, because = NOT_FOR[task]
            lines = [x for x in text.splitlines() if x.startswith(f"  {other}")]
            assert any(because in x for x in lines), text
        why_json = plan_json(capsys, str(f), "--explain", first[task][:12])
        assert why_json["placed"] and why_json["pool"] == pool
        assert why_json["gpu_model"] == gpu

    # planning wrote nothing: no store, no Job, no sbatch
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()
    assert not kube_cluster.objects("jobs", group="batch")
    assert not (tmp_path / "remote" / "jobs").exists()
