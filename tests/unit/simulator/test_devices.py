"""Pools with ``device_leases``: the core's lease is the placement, and the simulator keeps
per-device accounting (never two attempts on one device; a lease it cannot honour fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import InternalError, SpecError
from stowplan.placement.leases import MILLI, DeviceLease
from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.simulator.cluster import parse_cluster
from stowplan.simulator.provider import KubernetesNodePool, SimRequest, SlurmPartition
from stowplan.simulator.shell import SIMULATED_COMMAND, SimOptions, Simulation
from stowplan.simulator.workloads import SimJob, Workload
from stowplan.spec.models import FailureClass
from tests.unit.simulator.test_provider import Harness as ProviderHarness

CLUSTER = """\
[cluster]
name = "d"
[[sites]]
name = "s"
[[pools]]
name = "k8s"
site = "s"
kind = "kubernetes"
nodes = 3
gpus_per_node = 4
gpu_model = "a100"
cpus_per_node = 32
memory_per_node = "256GiB"
device_leases = true
[[pools]]
name = "slurm"
site = "s"
kind = "slurm"
nodes = 2
gpus_per_node = 8
gpu_model = "v100"
cpus_per_node = 64
memory_per_node = "512GiB"
device_leases = true
"""


def workload(n: int = 200) -> Workload:
    jobs = [
        SimJob(
            id=f"j{i:03d}",
            submit=float(i * 7 % 300),
            duration=float(60 + (i * 37) % 900),
            gpus=(1, 2, 1, 4, 1, 3)[i % 6],
            cpus=2.0,
            memory=4 << 30,
        )
        for i in range(n)
    ]
    return Workload(name="devices", kind="synthetic", jobs=jobs, source="test")


def test_discovery_describes_nodes_and_devices() -> None:
    h = ProviderHarness(CLUSTER)
    pools = {p.id: p for p in h.prov.core_pools()}
    k8s = pools["k8s"].devices
    assert k8s is not None and [n.name for n in k8s.nodes] == ["k8s-0", "k8s-1", "k8s-2"]
    assert {n.devices for n in k8s.nodes} == {(MILLI,) * 4} and k8s.nodes[0].model == "a100"
    assert k8s.nodes[0].cpus == 32 and k8s.nodes[0].memory == 256 << 30
    h.prov.pools["k8s"].node_down(1)
    k8s = {p.id: p for p in h.prov.core_pools()}["k8s"].devices
    assert k8s is not None and [n.name for n in k8s.nodes] == ["k8s-0", "k8s-2"]


def test_a_cloud_pool_cannot_lease_devices() -> None:
    text = CLUSTER.replace('kind = "kubernetes"', 'kind = "cloud"').replace(
        "nodes = 3", "max_instances = 3"
    )
    with pytest.raises(SpecError, match="device_leases"):
        parse_cluster(text, Path("d.toml"))


def test_the_simulation_runs_every_job_on_the_devices_the_core_leased() -> None:
    sim = Simulation(parse_cluster(CLUSTER, Path("d.toml")), workload(), SimOptions(seed=3))
    sim.run()
    rows = sim.metrics.job_rows()
    assert len(rows) == 200 and {r["state"] for r in rows} == {"SUCCEEDED"}
    attempts = [a for p in sim.providers.values() for a in p.attempts.values()]
    assert attempts and all(a.lease is not None for a in attempts)
    for a in attempts:
        assert a.lease is not None
        [(node, gpus, _, _)] = a.alloc
        assert a.lease.node == f"{a.pool.spec.name}-{node}"
        assert a.devices == a.lease.devices and len(a.devices) == gpus == a.job.gpus
    # every device is free again at the end
    for prov in sim.providers.values():
        for pool in prov.pools.values():
            assert isinstance(pool, KubernetesNodePool | SlurmPartition)
            assert all(not held for node in pool.holder for held in node)


def submit(h: ProviderHarness, job: SimJob, lease: DeviceLease, key: str) -> None:
    h.jobs[job.id] = job
    la = LaunchSpec(
        key=key, run_id=job.id, attempt=1, pool="k8s", name=job.id, argv=SIMULATED_COMMAND
    )
    h.prov.leases[key] = lease
    [req] = h.prov.plan([la], Facts())
    assert isinstance(req, SimRequest) and req.lease == lease
    h.prov.submit_now([req])


def test_a_lease_on_a_held_device_waits_for_it() -> None:
    h = ProviderHarness(CLUSTER)
    submit(h, SimJob(id="a", submit=0, duration=100.0, gpus=2), DeviceLease("k8s-1", (0, 1)), "ka")
    # device 1 is still held by "a" (its cancel may still be on the way): "b" waits for it
    submit(h, SimJob(id="b", submit=0, duration=10.0, gpus=1), DeviceLease("k8s-1", (1,)), "kb")
    assert h.state("ka") is ProviderState.RUNNING and h.state("kb") is ProviderState.QUEUED
    pool = h.prov.pools["k8s"]
    assert isinstance(pool, KubernetesNodePool) and pool.device_waits >= 1
    assert pool.holder[1] == [{"ka": MILLI}, {"ka": MILLI}, {}, {}]
    h.engine.run()
    assert h.states("kb") == [(100.0, ProviderState.RUNNING), (110.0, ProviderState.SUCCEEDED)]


def test_a_lease_the_pool_cannot_honour_fails_the_job() -> None:
    h = ProviderHarness(CLUSTER)
    submit(h, SimJob(id="a", submit=0, duration=10.0, gpus=1), DeviceLease("k8s-0", (7,)), "ka")
    submit(h, SimJob(id="b", submit=0, duration=10.0, gpus=2), DeviceLease("k8s-9", (0, 1)), "kb")
    for key in ("ka", "kb"):
        att = h.prov.attempts[key]
        assert att.state is ProviderState.FAILED
        assert att.failure is FailureClass.PROVIDER_REJECTED and "lease" in att.message


def test_over_booking_a_device_is_an_error() -> None:
    h = ProviderHarness(CLUSTER)
    submit(h, SimJob(id="a", submit=0, duration=100.0, gpus=1), DeviceLease("k8s-0", (2,)), "ka")
    pool = h.prov.pools["k8s"]
    assert isinstance(pool, KubernetesNodePool)
    other = h.prov.attempts["ka"]
    intruder = type(other)("kx", "x", other.job, pool, 0.0)
    intruder.node_devices = {0: (2,)}
    with pytest.raises(InternalError, match="over-books"):
        pool._take(0, 1, 1.0, 1, intruder)


def test_the_packing_objective_reaches_the_core() -> None:
    spec = parse_cluster(CLUSTER + '[scheduler]\ndevice_objective = "bestfit"\n', Path("d.toml"))
    sim = Simulation(spec, workload(6), SimOptions(seed=3))
    assert sim.core.config.context.objective == "bestfit"
    plain = Simulation(parse_cluster(CLUSTER, Path("d.toml")), workload(6))
    assert plain.core.config.context.objective == "fgd"
