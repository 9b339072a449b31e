"""The slurmrestd transport's pure parts, on JSON captured from the real test cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stowplan.placement.problem import Shape
from stowplan.providers.base import LaunchSpec
from stowplan.providers.slurm.parse import NodeShape, pools_of
from stowplan.providers.slurm.render import plan_arrays, sbatch_options
from stowplan.providers.slurm.rest import (
    API,
    RestBackend,
    job_properties,
    rows_of_db_jobs,
    rows_of_jobs,
)
from stowplan.spec.models import SlurmProviderConfig

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "slurm"


def _launch(i: int, **kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "key": f"{i:032x}",
        "run_id": f"run{i}",
        "attempt": 1,
        "pool": "c/gpu",
        "name": "t",
        "argv": ["true"],
        "cpus": 2,
        "memory": 100 << 20,
        "gpus": 1,
        "gpu_types": ("fake",),
        "timeout_s": 90.0,
    }
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def test_job_properties_follow_the_rendered_options() -> None:
    (req,) = plan_arrays(
        [_launch(0), _launch(1)],
        provider="c",
        workdir="/w",
        max_concurrent=1,
        qos="high",
        self_logging=True,
    )
    opts = sbatch_options(req.script)
    assert opts["array"] == "0-1%1" and opts["mem"] == "100M"
    job = job_properties(req)
    assert job["name"] == req.name and job["array"] == "0-1%1"
    assert job["partition"] == "gpu" and job["qos"] == "high"
    assert job["cpus_per_task"] == 2 and job["memory_per_node"] == 100
    assert job["gpus_per_node"] == "fake:1"
    assert job["time_limit"] == 2  # 90 s -> 2 minutes
    assert job["requeue"] is False
    # the script opens its own logs: slurmrestd cannot create the directory
    assert "mkdir -p -- /w/jobs/" in req.script and "exec >>" in req.script


def test_self_logging_is_only_for_rest() -> None:
    (req,) = plan_arrays([_launch(0)], provider="c", workdir="/w")
    assert "exec >>" not in req.script


def test_rows_of_live_jobs() -> None:
    jobs = json.loads((FIX / "rest-jobs.json").read_text())["jobs"]
    rows = {r.element_id: r for r in rows_of_jobs(jobs, {"restpend", "restfail"})}
    assert rows["4_0"].state == "RUNNING" and rows["4_0"].node == "n1"
    assert {rows[f"4_{i}"].state for i in (1, 2, 3)} == {"PENDING"}
    assert rows["4_1"].reason == "JobArrayTaskLimit" and rows["4_1"].started_at is None
    assert rows["6_0"].state == "FAILED" and rows["6_0"].exit_code == 3
    assert rows_of_jobs(jobs, {"other"}) == []


def test_rows_of_accounting() -> None:
    jobs = json.loads((FIX / "rest-dbjobs.json").read_text())["jobs"]
    rows = {r.element_id: r for r in rows_of_db_jobs(jobs)}
    assert set(rows) == {"6_0", "6_1"}
    assert all(r.state == "FAILED" and r.ended_at is not None for r in rows.values())


class _Recorded(RestBackend):
    """The REST backend with its HTTP calls recorded and answered from a script."""

    def __init__(self, answers: dict[tuple[str, str], dict[str, Any]]) -> None:
        super().__init__(
            "c",
            SlurmProviderConfig(host="h", transport="rest", rest_url="http://x", workdir="/w"),
        )
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        self.calls.append((method, path.split("?")[0]))
        return self.answers.get((method, path.split("?")[0]), {"jobs": []})


SUBMIT = ("POST", f"/slurm/{API}/job/submit")


@pytest.mark.anyio
async def test_a_first_submit_is_one_request() -> None:
    """A request the driver never tried goes out as one POST: no lookup of live jobs and
    accounting first (the driver looks the name up itself before a retry)."""
    (req,) = plan_arrays([_launch(0)], provider="c", workdir="/w", self_logging=True)
    rest = _Recorded({SUBMIT: {"job_id": 7}})
    assert await rest.submit(req, first=True) == "7"
    assert rest.calls == [SUBMIT]


@pytest.mark.anyio
async def test_a_submit_tried_before_finds_the_earlier_job() -> None:
    (req,) = plan_arrays([_launch(0)], provider="c", workdir="/w", self_logging=True)
    jobs = json.loads((FIX / "rest-jobs.json").read_text())["jobs"]
    for j in jobs:
        j["name"] = req.name
    rest = _Recorded({("GET", f"/slurm/{API}/jobs"): {"jobs": jobs}, SUBMIT: {"job_id": 7}})
    assert await rest.submit(req) != "7"
    assert SUBMIT not in rest.calls


@pytest.mark.anyio
async def test_discovery_knows_each_partitions_node_shapes() -> None:
    """The nodes slurmrestd lists (its ``/nodes`` answer, read already for the totals) give
    each partition its node shapes; a drained node is none of them."""

    def node(name: str, cpus: int, gres: str, flags: list[str] | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "cpus": cpus,
            "real_memory": 8192,
            "gres": gres,
            "state": "idle",
            "state_flags": flags or [],
        }

    rest = _Recorded(
        {
            ("GET", f"/slurm/{API}/partitions"): {
                "partitions": [{"name": "mixed", "nodes": "n[1-3]", "state": "UP"}]
            },
            ("GET", f"/slurm/{API}/nodes"): {
                "nodes": [
                    node("n1", 64, ""),
                    node("n2", 8, "gpu:fake:2(S:0)"),
                    node("n3", 128, "gpu:fake:8", ["DRAIN"]),
                ]
            },
        }
    )
    _, (part,), _ = await rest.discover()
    assert part.node_shapes == [
        NodeShape(cpus=8, memory=8 << 30, gpus={"fake": 2}),
        NodeShape(cpus=64, memory=8 << 30),
    ]
    (pool,) = pools_of("c", "site", [part], {})
    assert pool.node == Shape(cpus=64.0, memory=8 << 30, gpus={"fake": 2})
