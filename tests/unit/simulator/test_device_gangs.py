"""Gangs on pools with ``device_leases``: the core leases a part on each of several nodes, and
the simulated pool holds exactly those devices on each, for the whole run."""

from __future__ import annotations

from pathlib import Path

from stowplan.simulator.cluster import parse_cluster
from stowplan.simulator.provider import SlurmPartition
from stowplan.simulator.shell import SimOptions, Simulation, gang_nodes, gang_width
from stowplan.simulator.workloads import SimJob, Workload

CLUSTER = """\
[cluster]
name = "g"
[[sites]]
name = "s"
[[pools]]
name = "slurm"
site = "s"
kind = "slurm"
nodes = 3
gpus_per_node = 8
gpu_model = "v100"
cpus_per_node = 64
memory_per_node = "512GiB"
device_leases = true
"""


def run(jobs: list[SimJob]) -> Simulation:
    sim = Simulation(
        parse_cluster(CLUSTER, Path("g.toml")),
        Workload(name="gangs", kind="synthetic", jobs=jobs, source="test"),
        SimOptions(seed=1),
    )
    sim.run()
    return sim


def test_a_gang_runs_on_its_leased_devices_on_each_node() -> None:
    jobs = [
        SimJob(id="wide", submit=0.0, duration=100.0, gpus=16, cpus=8.0, memory=8 << 30, nodes=2),
        SimJob(id="one", submit=0.0, duration=50.0, gpus=4, cpus=2.0, memory=4 << 30),
        SimJob(id="next", submit=10.0, duration=50.0, gpus=16, cpus=2.0, memory=1 << 30, nodes=2),
    ]
    sim = run(jobs)
    rows = {r["job"]: r for r in sim.metrics.job_rows()}
    assert {j: r["state"] for j, r in rows.items()} == dict.fromkeys(rows, "SUCCEEDED")
    # the second gang needs two whole nodes: it waits for the first to end
    assert rows["next"]["start"] >= rows["wide"]["end"]
    [pool] = [p for prov in sim.providers.values() for p in prov.pools.values()]
    assert isinstance(pool, SlurmPartition)
    wide = next(
        a for p in sim.providers.values() for a in p.attempts.values() if a.run_id == "wide"
    )
    assert wide.lease is not None and len(wide.lease.parts()) == 2
    assert sorted(n for n, _, _, _ in wide.alloc) == sorted(
        int(name.rsplit("-", 1)[1]) for name, _ in wide.lease.parts()
    )
    assert all(g == 8 and c == 4.0 for _, g, c, _ in wide.alloc)
    # every device is free again at the end
    assert all(not held for node in pool.holder for held in node)


def test_a_job_wider_than_a_node_runs_as_a_gang_of_whole_node_parts() -> None:
    """A trace's job asks for GPUs, not nodes: where every GPU pool leases devices and all
    have 8 per node, 16 GPUs run as 2 nodes of 8, as a counting pool would run them."""
    sim = run([SimJob(id="w", submit=0.0, duration=10.0, gpus=16, cpus=2.0)])
    [row] = sim.metrics.job_rows()
    assert row["state"] == "SUCCEEDED", row
    [att] = [a for p in sim.providers.values() for a in p.attempts.values()]
    assert att.lease is not None and [len(d) for _, d in att.lease.parts()] == [8, 8]
    assert "1 jobs ask for more GPUs than a node has (8)" in " ".join(sim.counters.notes)


def test_a_gang_wider_than_the_pool_fails_and_says_why() -> None:
    sim = run([SimJob(id="w", submit=0.0, duration=10.0, gpus=32, cpus=2.0)])
    [row] = sim.metrics.job_rows()
    assert row["state"] == "FAILED"
    # the job's row says why, not only FAILED
    assert row["reason"].startswith("provider_rejected: no allowed pool offers"), row
    assert row["reason"].endswith("(1 pool: no 32 x GPU there)"), row


def test_gang_sizes_and_where_jobs_become_gangs() -> None:
    assert [gang_nodes(g, 8) for g in (9, 12, 16, 20, 24, 64, 7)] == [3, 2, 2, 4, 3, 8, 1]
    cluster = parse_cluster(CLUSTER, Path("g.toml"))
    assert gang_width(cluster) == 8
    counting = CLUSTER.replace("device_leases = true\n", "")
    assert gang_width(parse_cluster(counting, Path("g.toml"))) == 0
    pool = "[[pools]]\n" + CLUSTER.split("[[pools]]\n", 1)[1]
    mixed = CLUSTER + pool.replace('"slurm"', '"other"', 1)
    assert gang_width(parse_cluster(mixed, Path("g.toml"))) == 8
    narrow = mixed.replace("gpus_per_node = 8", "gpus_per_node = 4", 1)
    assert gang_width(parse_cluster(narrow, Path("g.toml"))) == 0  # two widths
