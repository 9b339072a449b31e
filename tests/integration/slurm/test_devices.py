"""GPUs on the real cluster: Slurm binds the devices itself (``--gres``), and the driver
reports the indices it bound and the node; a run that no node of any partition can hold is
refused by ``stowplan plan`` and ``stowplan run`` before anything is written or submitted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stowplan.placement.problem import Shape
from stowplan.provenance.store import RunStore
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    ProviderState,
    Report,
)
from stowplan.providers.slurm import SlurmProvider
from tests.slurmcluster.cluster import GPU_NODES, GPU_TYPE, GPUS_PER_NODE, SlurmCluster

from .conftest import finish, runs_of, stowplan, write_project
from .test_driver import _config

pytestmark = pytest.mark.integration

GIB = 1 << 30
LARGEST = Shape(cpus=8.0, memory=8 * GIB, gpus={GPU_TYPE: GPUS_PER_NODE})
"""n3 (and n4): the node of the test cluster that holds every other."""


def _gpu_launch(i: int, gpus: int) -> LaunchSpec:
    # what the element itself saw: the node and the indices slurmd bound
    seen = 'printf "%s %s\\n" "$SLURMD_NODENAME" "$SLURM_JOB_GPUS" > bound.txt'
    return LaunchSpec(
        key=f"g{i:061x}",
        run_id=f"gpu-{i}",
        attempt=1,
        pool="cluster/gpu",
        name="gpu",
        argv=["sh", "-c", seen],
        memory=32 << 20,
        gpus=gpus,
        gpu_types=(GPU_TYPE,),
        outputs=["bound.txt"],
    )


async def _until_final(driver: SlurmProvider, keys: list[str]) -> list[Report]:
    for _ in range(900):
        reports = await driver.describe(keys)
        if all(r.state in TERMINAL_PROVIDER_STATES for r in reports):
            return reports
        await asyncio.sleep(0.1)
    raise AssertionError(f"not final: {reports}")


def test_a_gpu_run_reports_the_devices_and_node_slurm_bound(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    config = _config(slurm_cluster, tmp_path / "remote")
    launches = [_gpu_launch(0, 1), _gpu_launch(1, 1), _gpu_launch(2, 2)]

    async def scenario() -> tuple[list[Report], dict[str, Shape | None]]:
        async with SlurmProvider("cluster", config, state_dir=tmp_path / "state") as driver:
            pools = await driver.discover()
            requests = driver.plan(launches, Facts.of(pools))
            assert len(requests) == 2  # one array per shape
            await driver.submit(requests)
            final = await _until_final(driver, [x.key for x in launches])
        return final, {p.id: p.node for p in pools}

    final, nodes = asyncio.run(scenario())
    # every partition's largest node, from the discovery that already ran
    assert nodes == {"cluster/cpu": LARGEST, "cluster/gpu": LARGEST}
    for launch, report in zip(launches, final, strict=True):
        assert report.state is ProviderState.SUCCEEDED, report.message
        node, indices = Path(report.outputs["bound.txt"]).read_text().split()
        assert report.node == node and node in GPU_NODES
        assert report.devices == tuple(int(d) for d in indices.split(","))
        assert len(report.devices) == launch.gpus
        assert set(report.devices) <= set(range(GPUS_PER_NODE))
    assert final[2].devices == (0, 1)


TOO_BIG = """
[experiment]
name = "too-big"

[[tasks]]
name = "huge"
command = ["true"]
resources = {{ {resources} }}
"""


@pytest.mark.parametrize(
    ("resources", "named"),
    [
        (f'cpus = 1, memory = "64MiB", gpus = 3, gpu_type = "{GPU_TYPE}"', "2 x fake"),
        ('cpus = 9, memory = "64MiB"', "8 CPUs"),
    ],
    ids=["gpus", "cpus"],
)
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_run_no_node_holds_is_refused(
    slurm_cluster: SlurmCluster, tmp_path: Path, command: str, resources: str, named: str
) -> None:
    """The partitions' totals (4 fake GPUs, 32 CPUs) hold it; none of their nodes does:
    refused at once, naming the largest node, instead of queued where it never starts."""
    assert slurm_cluster.facts is not None
    write_project(tmp_path, slurm_cluster.facts, TOO_BIG.format(resources=resources))
    rc, out, err = finish(stowplan(tmp_path, command, "exp.toml"), 180)
    assert rc == 2, out + err
    said = " ".join(err.split())
    assert "$.tasks[0].resources" in said and "huge" in said
    # both partitions hold n3 and n4, the largest node there
    assert all(f"cluster/{p}: its largest node has 8 CPUs" in said for p in ("cpu", "gpu")), said
    assert named in said, said
    assert not (tmp_path / "remote").exists()  # nothing submitted


GANG = """
[experiment]
name = "gang"

[[tasks]]
name = "dist"
# the script runs once, on the first node; srun starts one task on each of the gang's nodes
script = 'srun bash -c "echo \\$SLURMD_NODENAME \\$SLURM_CPUS_ON_NODE" > nodes.txt'
outputs = ["nodes.txt"]
resources = {{ cpus = 2, memory = "64MiB", nodes = {nodes} }}
"""


def test_a_gang_runs_once_on_that_many_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    assert slurm_cluster.facts is not None
    write_project(tmp_path, slurm_cluster.facts, GANG.format(nodes=3))
    rc, out, err = finish(stowplan(tmp_path, "run", "exp.toml"), 240)
    assert rc == 0, out + err[-3000:]
    [run] = runs_of(tmp_path)
    assert run.state == "SUCCEEDED" and run.attempts == 1
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        [art] = store.artifacts_for([run.run_id])[run.run_id]
    seen = [line.split() for line in Path(art.path).read_text().splitlines()]
    # three distinct nodes of the cluster, each giving the task its part: 2 CPUs
    assert len(seen) == 3 and len({node for node, _ in seen}) == 3, seen
    assert {node for node, _ in seen} <= {"n1", "n2", "n3", "n4"}
    assert all(cpus == "2" for _, cpus in seen), seen


def test_a_gang_wider_than_the_cluster_is_refused(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    assert slurm_cluster.facts is not None
    write_project(tmp_path, slurm_cluster.facts, GANG.format(nodes=5))
    rc, out, err = finish(stowplan(tmp_path, "plan", "exp.toml"), 180)
    assert rc == 2, out + err
    said = " ".join(err.split())
    assert "$.tasks[0].resources" in said and "5 nodes of 2 CPUs" in said, said
    # the cpu partition has 4 nodes, the gpu partition 2: too few for 5 either way
    assert "4 nodes of it have 2 CPUs, 0.0625 GiB: the task spans 5" in said, said
    assert "2 nodes of it have 2 CPUs, 0.0625 GiB: the task spans 5" in said, said
    assert not (tmp_path / "remote").exists()  # nothing submitted
