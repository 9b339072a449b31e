"""The service on a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``):
``stowplan serve --address ... --spread`` places some of its control-plane actors on the
second node; that node is then killed mid-sweep. The service keeps answering, the actors that
lived there are restarted on the head, and every run still ends SUCCEEDED at its first
attempt: each trial's marker line is written once and the launcher launched each attempt
once (nothing lost, nothing run twice)."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.provenance.store import RunStore
from stowplan.scheduler.states import FINAL
from tests.integration.conftest import launches_per_key
from tests.integration.service.conftest import Service, auth, lab, poll

pytestmark = pytest.mark.integration

N = 4
TRIAL_PY = b"""import os, sys, time
from pathlib import Path
go = Path(os.environ["GO"])
while not go.exists():
    time.sleep(0.05)
with open(os.environ["MARKER"], "a") as f:
    f.write(os.environ["STOWPLAN_RUN_ID"] + "\\n")
"""


def sweep(marker: Path, go: Path) -> str:
    return f"""
[experiment]
name = "spread"

[[tasks]]
name = "trial"
command = ["python", "{{experiment_dir}}/trial.py", "{{i}}"]
env = {{ MARKER = "{marker}", GO = "{go}" }}
resources = {{ cpus = 1, memory = "64MiB" }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {N - 1} }} }} }}
"""


def actors_by_name(cluster: Any) -> dict[str, dict[str, Any]]:
    """The cluster's live named actors (Ray's GCS actor table): the control plane's."""
    return {
        a["Name"]: a
        for a in cluster.global_state.actor_table(None).values()
        if a["Name"] and a["State"] == "ALIVE"
    }


@pytest.mark.timeout(900)
def test_service_places_actors_on_a_second_node_and_survives_its_loss(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    tokens = lab(lab_dir)
    marker, go = tmp_path / "executions.log", tmp_path / "go"
    cluster: Any = Cluster(  # Ray's test helper, untyped
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    svc: Service | None = None
    try:
        second = cluster.add_node(num_cpus=1)
        head_id, second_id = cluster.head_node.node_id, second.node_id
        svc = Service(lab_dir, read_only=False, args=["--address", cluster.address, "--spread"])
        svc.wait_healthy(240)

        placed = actors_by_name(cluster)
        assert {"store", "queue", "placement", "provider:local"} <= set(placed), placed
        on_second = sorted(n for n, a in placed.items() if a["Address"]["NodeID"] == second_id)
        assert on_second, f"no control-plane actor was placed on the second node: {placed}"

        with httpx.Client(base_url=svc.url, timeout=120, headers=auth(tokens["mona"])) as c:
            r = c.post(
                "/api/v1/experiments",
                json={
                    "request_id": "spread-00000001",
                    "filename": "sweep.toml",
                    "experiment": sweep(marker, go),
                    "files": {"trial.py": base64.b64encode(TRIAL_PY).decode()},
                },
            )
            assert r.status_code == 201, r.text
            run_ids: list[str] = r.json()["run_ids"]
            assert len(run_ids) == N

            def two_running() -> bool | None:
                rows = c.get("/api/v1/experiments/spread/status").json()
                return True if sum(row["state"] == "RUNNING" for row in rows) == 2 else None

            poll("two trials to run (the local provider has 2 CPUs)", 180, two_running)

            # the second node dies with the actors on it, mid-sweep
            cluster.remove_node(second, allow_graceful=False)
            assert c.get("/healthz").status_code == 200
            assert c.get("/api/v1/experiments/spread/status").status_code == 200

            def restarted_on_head() -> dict[str, dict[str, Any]] | None:
                now = actors_by_name(cluster)
                ok = all(n in now and now[n]["Address"]["NodeID"] == head_id for n in on_second)
                return now if ok else None

            moved = poll("the lost node's actors to restart on the head", 180, restarted_on_head)
            assert all(moved[n]["NumRestarts"] >= 1 for n in on_second), moved

            go.touch()

            def all_final() -> list[dict[str, Any]] | None:
                r = c.get("/api/v1/experiments/spread/status")
                assert r.status_code == 200, r.text
                rows: list[dict[str, Any]] = r.json()
                return rows if all(row["state"] in FINAL for row in rows) else None

            rows = poll("every trial to end", 300, all_final)
        assert sorted(row["run_id"] for row in rows) == sorted(run_ids)
        assert {row["state"] for row in rows} == {"SUCCEEDED"}, rows
        assert svc.stop() == 0, svc.text()
    finally:
        go.touch()  # a failure above must not leave trials waiting for it
        if svc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        cluster.shutdown()

    # nothing lost, nothing run twice
    with RunStore(lab_dir / ".stowplan" / "stowplan.db") as store:
        runs = store.get_runs(run_ids)
        attempts = store.attempts_for(run_ids)
    assert {rid: r.attempts for rid, r in runs.items()} == dict.fromkeys(run_ids, 1)
    assert {rid: [(a.attempt, a.exit_code) for a in attempts[rid]] for rid in run_ids} == (
        {rid: [(1, 0)] for rid in run_ids}
    )
    assert Counter(marker.read_text().split()) == Counter(run_ids)
    launches = launches_per_key(lab_dir / ".stowplan")
    assert len(launches) == N and set(launches.values()) == {1}, launches
