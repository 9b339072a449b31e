from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.simulator.cluster import load_cluster, parse_cluster
from stowplan.simulator.shell import SimOptions, Simulation
from stowplan.simulator.whatif import apply, compare, parse_change
from stowplan.simulator.workloads import SimJob, Workload

from .conftest import CLUSTERS


def test_changes_grow_add_shrink_and_remove_pools() -> None:
    spec = load_cluster(CLUSTERS / "university-slurm.toml").spec
    out = apply(
        spec,
        [
            parse_change("pool=gpu-a100,count=4", "add"),
            parse_change("pool=gpu-h100,count=16,like=gpu-a100,gpu_model=h100", "add"),
            parse_change("pool=cpu,count=60", "remove"),
            parse_change("pool=gpu-v100", "remove"),
        ],
    )
    pools = {p.name: p for p in out.pools}
    assert pools["gpu-a100"].nodes == 20
    assert pools["gpu-h100"].nodes == 16 and pools["gpu-h100"].gpu_model == "h100"
    assert pools["gpu-h100"].gpus_per_node == 8
    assert pools["cpu"].nodes == 4
    assert "gpu-v100" not in pools
    assert {p.name for p in spec.pools} == {"cpu", "gpu-a100", "gpu-v100"}  # input untouched


@pytest.mark.parametrize(
    ("text", "op", "why"),
    [
        ("pool=gpu-a100", "add", "how many"),
        ("pool=gpu-a100,count=-1", "add", "positive"),
        ("pool=gpu-a100,cuont=2", "add", "unknown key"),
        ("count=2", "add", "no pool="),
        ("pool=x,like=y", "remove", "unknown key"),
    ],
)
def test_bad_changes_say_what_to_write(text: str, op: str, why: str) -> None:
    with pytest.raises(SpecError, match=why) as info:
        parse_change(text, op)
    assert info.value.path == f"--{op}" and info.value.hint


def test_unknown_pools_are_refused() -> None:
    spec = load_cluster(CLUSTERS / "university-slurm.toml").spec
    with pytest.raises(SpecError, match="there is no pool"):
        apply(spec, [parse_change("pool=gpu-h100,count=2", "add")])
    with pytest.raises(SpecError, match="no pool 'x' to remove"):
        apply(spec, [parse_change("pool=x", "remove")])


QUOTA = """\
[cluster]
name = "q"
[[sites]]
name = "a"
[[sites]]
name = "b"
[[pools]]
name = "a"
site = "a"
kind = "slurm"
nodes = 1
gpus_per_node = 1
gpu_model = "x"
[[pools]]
name = "b"
site = "b"
kind = "slurm"
nodes = 4
gpus_per_node = 1
gpu_model = "x"
[scheduler.project_sites]
small = ["a"]
"""


def test_project_quotas_keep_a_project_on_its_sites_and_more_capacity_cuts_waits() -> None:
    jobs = [
        SimJob(id=f"j{i}", submit=0.0, duration=100.0, gpus=1, project="small") for i in range(4)
    ]
    wl = Workload(name="w", kind="synthetic", source="t", jobs=jobs)
    spec = parse_cluster(QUOTA, Path("q.toml"))
    sim = Simulation(spec, wl, SimOptions(policy="fifo"))
    sim.run()
    base = sim.metrics.job_rows()
    assert {r["pool"] for r in base} == {"a"}  # b is idle but not small's
    assert sorted(r["wait"] for r in base) == [0.0, 100.0, 200.0, 300.0]
    bigger = apply(spec, [parse_change("pool=a,count=3", "add")])
    sim2 = Simulation(bigger, wl, SimOptions(policy="fifo"))
    sim2.run()
    from stowplan.simulator.report import run_record

    d = compare(run_record(sim), run_record(sim2))
    assert d["wait_p95_s"]["baseline"] > 0 and d["wait_p95_s"]["variant"] == 0.0
    assert d["wait_p95_s"]["change"] < 0
