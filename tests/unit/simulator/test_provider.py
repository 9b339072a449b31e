from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import ProviderError
from stowplan.placement.problem import Shape
from stowplan.providers.base import Capability, Facts, LaunchSpec, ProviderState, Report
from stowplan.shell import run_now
from stowplan.simulator.cluster import ClusterSpec, FaultsSpec, parse_cluster
from stowplan.simulator.engine import Engine
from stowplan.simulator.faults import ApiFaults
from stowplan.simulator.provider import CloudInstanceType, DataNet, SimProvider
from stowplan.simulator.shell import SIMULATED_COMMAND
from stowplan.simulator.workloads import SimJob
from stowplan.spec.models import FailureClass

CLUSTER = """\
[cluster]
name = "t"
[[sites]]
name = "s"
[[pools]]
name = "slurm"
site = "s"
kind = "slurm"
nodes = 1
gpus_per_node = 8
gpu_model = "a100"
cpus_per_node = 64
memory_per_node = "512GiB"
[[pools]]
name = "k8s"
site = "s"
kind = "kubernetes"
nodes = 2
cpus_per_node = 8
memory_per_node = "32GiB"
[[pools]]
name = "cloud"
site = "s"
kind = "cloud"
max_instances = 2
gpus_per_node = 1
gpu_model = "a10g"
cpus_per_node = 4
memory_per_node = "16GiB"
price_per_hour = 3.6
boot = "100s"
"""


class Harness:
    def __init__(self, text: str = CLUSTER, faults: FaultsSpec | None = None) -> None:
        self.spec: ClusterSpec = parse_cluster(text, Path("t.toml"))
        self.engine = Engine(seed=1)
        self.jobs: dict[str, SimJob] = {}
        self.reports: list[tuple[float, Report]] = []
        self.capacity_changes: list[float] = []
        self.prov = SimProvider(
            "s",
            self.spec.pools,
            self.engine,
            jobs=self.jobs.__getitem__,
            data=DataNet(self.spec),
            faults=ApiFaults(self.engine, "s", faults or FaultsSpec()),
            sink=lambda _, r: self.reports.append((self.engine.now, r)),
            on_capacity=lambda _: self.capacity_changes.append(self.engine.now),
        )

    def submit(self, pool: str, job: SimJob, key: str | None = None) -> Report:
        self.jobs[job.id] = job
        req = self.prov.plan(
            [
                LaunchSpec(
                    key=key or f"k-{job.id}",
                    run_id=job.id,
                    attempt=1,
                    pool=pool,
                    name=job.id,
                    argv=SIMULATED_COMMAND,
                )
            ],
            Facts(),
        )
        return self.prov.submit_now(req)[0]

    def provision(self, pool: str, count: int, token: str) -> list[str]:
        """The provider's ``provision``, awaited as the shell does in virtual time."""
        out: list[str] = []

        async def go() -> None:
            out.extend(await self.prov.provision(pool, count, token))

        run_now(go())
        return out

    def terminate(self, pool: str, count: int, token: str) -> None:
        run_now(self.prov.terminate(pool, count, token))

    def cloud(self, name: str = "cloud") -> CloudInstanceType:
        pool = self.prov.pools[name]
        assert isinstance(pool, CloudInstanceType)
        return pool

    def state(self, key: str) -> ProviderState:
        """A call, not an attribute read: mypy would narrow the state across the actions."""
        return self.prov.attempts[key].state

    def states(self, key: str) -> list[tuple[float, ProviderState]]:
        return [(t, r.state) for t, r in self.reports if r.key == key]


def test_submit_is_idempotent_by_key() -> None:
    h = Harness()
    job = SimJob(id="a", submit=0, duration=10.0, gpus=1)
    first = h.submit("slurm", job)
    again = h.submit("slurm", job)
    assert first.state is again.state is ProviderState.RUNNING
    assert h.prov.duplicate_submits == 1
    assert len(h.prov.attempts) == 1
    h.engine.run()
    assert h.states("k-a") == [(10.0, ProviderState.SUCCEEDED)]
    assert h.prov.executed == {"k-a"}
    assert h.prov.describe_now(["k-a", "nope"])[1].state is ProviderState.UNKNOWN


def test_slurm_backfills_only_jobs_that_end_before_the_head_can_start() -> None:
    h = Harness()
    h.submit("slurm", SimJob(id="a", submit=0, duration=100.0, gpus=4))
    assert (
        h.submit("slurm", SimJob(id="b", submit=0, duration=10.0, gpus=8)).state
        is ProviderState.QUEUED
    )  # the head: waits for a
    h.submit("slurm", SimJob(id="c", submit=0, duration=50.0, gpus=2))  # ends before 100
    h.submit("slurm", SimJob(id="d", submit=0, duration=500.0, gpus=2))  # would delay b
    h.engine.run()
    start = {k: t for k, a in h.prov.attempts.items() if (t := a.started) is not None}
    assert start == {"k-a": 0.0, "k-c": 0.0, "k-b": 100.0, "k-d": 110.0}
    assert h.prov.pools["slurm"].backfilled == 1


def test_kubernetes_honours_the_per_node_cap_of_a_service() -> None:
    h = Harness()
    for i in range(3):
        h.submit(
            "k8s",
            SimJob(
                id=f"svc{i}",
                submit=0,
                duration=None,
                cpus=1,
                memory=2**30,
                service="app",
                max_per_node=1,
            ),
        )
    states = {k: a.state for k, a in h.prov.attempts.items()}
    assert sorted(states.values()) == [
        ProviderState.QUEUED,
        ProviderState.RUNNING,
        ProviderState.RUNNING,
    ]
    nodes = {a.alloc[0][0] for a in h.prov.attempts.values() if a.alloc}
    assert nodes == {0, 1}


def test_a_failed_node_fails_its_jobs_and_leaves_the_pool() -> None:
    h = Harness()
    h.submit("slurm", SimJob(id="a", submit=0, duration=100.0, gpus=2))
    h.engine.at(10.0, lambda _: h.prov.pools["slurm"].node_down(0))
    h.engine.run()
    assert h.states("k-a")[-1] == (10.0, ProviderState.FAILED)
    assert h.prov.attempts["k-a"].failure is FailureClass.NODE_FAILURE
    [slurm] = [p for p in h.prov.core_pools() if p.id.endswith("slurm")]
    assert slurm.gpus == {"a100": 0}
    h.submit("slurm", SimJob(id="b", submit=0, duration=1.0, gpus=1))
    assert h.state("k-b") is ProviderState.QUEUED
    h.prov.pools["slurm"].node_up(0)
    h.engine.run()
    assert h.state("k-b") is ProviderState.SUCCEEDED


def test_a_cut_off_site_refuses_calls_and_holds_reports_until_it_is_back() -> None:
    h = Harness()
    h.submit("slurm", SimJob(id="a", submit=0, duration=10.0, gpus=1))
    h.prov.set_reachable(False)
    with pytest.raises(ProviderError) as info:
        h.submit("slurm", SimJob(id="b", submit=0, duration=1.0, gpus=1))
    assert info.value.retryable
    h.engine.run()
    assert h.reports == []  # finished while cut off: nobody heard
    h.prov.set_reachable(True)
    assert [r.state for _, r in h.reports] == [ProviderState.SUCCEEDED]


def test_a_lost_answer_still_made_the_job_and_a_retry_finds_it() -> None:
    h = Harness(faults=FaultsSpec(lost_answer_rate=1.0))
    job = SimJob(id="a", submit=0, duration=5.0, gpus=1)
    with pytest.raises(ProviderError):
        h.submit("slurm", job)
    assert "k-a" in h.prov.attempts
    h.prov.api.spec = FaultsSpec()
    assert h.submit("slurm", job).state is ProviderState.RUNNING
    assert len(h.prov.attempts) == 1 and h.prov.duplicate_submits == 1


def test_a_key_never_executes_twice() -> None:
    h = Harness()
    h.submit("slurm", SimJob(id="a", submit=0, duration=5.0, gpus=1))
    att = h.prov.attempts["k-a"]
    with pytest.raises(Exception, match="executed twice"):
        h.prov.started(att)


def test_pending_pods_start_on_the_nodes_that_free_up() -> None:
    h = Harness()
    for i, dur in enumerate((10.0, 20.0, 5.0, 5.0, 5.0)):
        h.submit("k8s", SimJob(id=f"p{i}", submit=0, duration=dur, cpus=6, memory=2**30))
    h.engine.run()
    start = {k: a.started for k, a in h.prov.attempts.items()}
    node = {k: a.alloc[0][0] for k, a in h.prov.attempts.items()}
    # p0 on node 0 ends at 10, p1 on node 1 at 20: p2 takes node 0 at 10, p3 node 0 at 15,
    # p4 node 1 at 20 (or node 0 at 20: the lower index wins a tie)
    assert start == {"k-p0": 0.0, "k-p1": 0.0, "k-p2": 10.0, "k-p3": 15.0, "k-p4": 20.0}
    assert node["k-p2"] == 0 and node["k-p3"] == 0


def test_a_job_no_node_can_ever_hold_is_rejected_not_left_pending() -> None:
    h = Harness()
    r = h.submit("k8s", SimJob(id="big", submit=0, duration=5.0, cpus=12, memory=2**30))
    assert r.state is ProviderState.FAILED and r.failure is FailureClass.PROVIDER_REJECTED
    assert "can ever hold" in r.message


WIDE = """\
[cluster]
name = "t"
[[sites]]
name = "s"
[[pools]]
name = "slurm"
site = "s"
kind = "slurm"
nodes = 2
gpus_per_node = 4
gpu_model = "a100"
cpus_per_node = 32
memory_per_node = "256GiB"
backfill_depth = 1
[[pools]]
name = "k8s"
site = "s"
kind = "kubernetes"
nodes = 3
gpus_per_node = 4
gpu_model = "t4"
cpus_per_node = 16
memory_per_node = "64GiB"
[[pools]]
name = "cloud"
site = "s"
kind = "cloud"
max_instances = 3
gpus_per_node = 2
gpu_model = "a10g"
cpus_per_node = 8
memory_per_node = "32GiB"
price_per_hour = 7.2
boot = "60s"
min_billed = "10m"
"""


def started(h: Harness) -> dict[str, float]:
    return {k: t for k, a in h.prov.attempts.items() if (t := a.started) is not None}


def test_slurm_multi_node_jobs_take_whole_nodes() -> None:
    h = Harness(WIDE)
    h.submit("slurm", SimJob(id="a", submit=0, duration=10.0, gpus=1))
    # 6 GPUs need two whole nodes; node 0 is not whole while a runs
    assert h.submit("slurm", SimJob(id="b", submit=0, duration=10.0, gpus=6, cpus=8)).state is (
        ProviderState.QUEUED
    )
    h.engine.run()
    assert started(h) == {"k-a": 0.0, "k-b": 10.0}
    alloc = h.prov.attempts["k-b"].alloc
    assert sorted(n for n, *_ in alloc) == [0, 1]
    assert all(g == 4 and c == 4.0 for _, g, c, _ in alloc)  # whole nodes; CPUs split


@pytest.mark.parametrize(("depth", "d_starts", "backfilled"), [(1, 120.0, 0), (2, 0.0, 1)])
def test_slurm_backfill_looks_only_backfill_depth_behind_the_head(
    depth: int, d_starts: float, backfilled: int
) -> None:
    h = Harness(WIDE.replace("backfill_depth = 1", f"backfill_depth = {depth}"))
    h.submit("slurm", SimJob(id="a", submit=0, duration=100.0, gpus=4))
    h.submit("slurm", SimJob(id="head", submit=0, duration=10.0, gpus=8))  # waits for a
    h.submit("slurm", SimJob(id="x", submit=0, duration=10.0, gpus=6))  # does not fit now
    h.submit("slurm", SimJob(id="d", submit=0, duration=50.0, gpus=2))  # fits, ends in time
    h.engine.run()
    s = started(h)
    assert (s["k-a"], s["k-head"], s["k-x"]) == (0.0, 100.0, 110.0)
    assert s["k-d"] == d_starts
    assert h.prov.pools["slurm"].backfilled == backfilled


def test_slurm_head_of_line_blocks_what_would_delay_the_head() -> None:
    h = Harness(WIDE)
    h.submit("slurm", SimJob(id="a", submit=0, duration=100.0, gpus=4))
    h.submit("slurm", SimJob(id="head", submit=0, duration=10.0, gpus=8))
    h.submit("slurm", SimJob(id="long", submit=0, duration=101.0, gpus=1))  # ends after 100
    h.engine.run()
    assert started(h) == {"k-a": 0.0, "k-head": 100.0, "k-long": 110.0}
    assert h.prov.pools["slurm"].backfilled == 0


def test_kubernetes_anti_affinity_cap_allows_that_many_per_node() -> None:
    h = Harness(WIDE)
    for i in range(7):
        h.submit(
            "k8s",
            SimJob(id=f"r{i}", submit=0, duration=None, cpus=1, service="app", max_per_node=2),
        )
    per_node: dict[int, int] = {}
    for a in h.prov.attempts.values():
        if a.alloc:
            per_node[a.alloc[0][0]] = per_node.get(a.alloc[0][0], 0) + 1
    assert per_node == {0: 2, 1: 2, 2: 2}
    assert h.state("k-r6") is ProviderState.QUEUED
    h.prov.cancel_now(["k-r3"])  # frees a slot on its node: the pending replica takes it
    node = h.prov.attempts["k-r3"].alloc[0][0]
    h.engine.run(until=1.0)
    assert h.state("k-r6") is ProviderState.RUNNING
    assert h.prov.attempts["k-r6"].alloc[0][0] == node


def test_kubernetes_puts_a_pod_on_the_node_with_the_fewest_free_gpus_that_suffice() -> None:
    h = Harness(WIDE)
    h.submit("k8s", SimJob(id="a", submit=0, duration=100.0, gpus=3))  # node 0: 1 free
    h.submit("k8s", SimJob(id="b", submit=0, duration=100.0, gpus=2))  # node 1: 2 free
    h.submit("k8s", SimJob(id="c", submit=0, duration=100.0, gpus=2))  # best fit: node 1
    h.submit("k8s", SimJob(id="d", submit=0, duration=100.0, gpus=1))  # best fit: node 0
    node = {k: a.alloc[0][0] for k, a in h.prov.attempts.items()}
    assert node == {"k-a": 0, "k-b": 1, "k-c": 1, "k-d": 0}


def test_every_pool_kind_has_one_discipline_class() -> None:
    from stowplan.errors import InternalError
    from stowplan.simulator.cluster import PoolKind
    from stowplan.simulator.provider import (
        POOL_CLASSES,
        CloudInstanceType,
        KubernetesNodePool,
        SlurmPartition,
        pool_class,
    )

    assert set(POOL_CLASSES) == set(PoolKind)
    assert all(cls.kind is kind for kind, cls in POOL_CLASSES.items())
    h = Harness(WIDE)
    assert [type(p) for p in h.prov.pools.values()] == [
        SlurmPartition,
        KubernetesNodePool,
        CloudInstanceType,
    ]
    with pytest.raises(InternalError, match="no simulated pool discipline for kind 'pbs'"):
        pool_class("pbs")  # type: ignore[arg-type]
    with pytest.raises(InternalError, match="no nodes"):
        h.prov.pools["cloud"].node_down(0)


def test_cloud_instances_boot_run_work_and_are_billed_per_second_until_terminated() -> None:
    h = Harness()
    assert Capability.ELASTIC in h.prov.capabilities
    [i1] = h.provision("cloud", 1, "p-1")
    cloud = h.cloud()
    assert h.capacity_changes == [0.0] and cloud.instances == 1
    r = h.submit("cloud", SimJob(id="a", submit=0, duration=30.0, gpus=1))
    assert r.state is ProviderState.QUEUED  # its instance boots
    h.engine.run()
    assert h.states("k-a") == [(100.0, ProviderState.RUNNING), (130.0, ProviderState.SUCCEEDED)]
    assert cloud.cost == 0.0  # billed when it stops (or at the end)
    h.engine.at(400.0, lambda _: h.terminate("cloud", 1, "t-1"))
    h.engine.run()
    assert cloud.instances == 0 and h.capacity_changes == [0.0, 400.0]
    assert cloud.cost == pytest.approx(400.0 * 3.6 / 3600) and cloud.instance_s == 400.0
    # an instance stopped soon after its boot is billed the minimum (60 s)
    h.provision("cloud", 1, "p-2")
    h.engine.at(h.engine.now, lambda _: None)
    h.engine.run(until=450.0)  # still booting: a terminate leaves it alone
    h.terminate("cloud", 1, "t-2")
    assert h.cloud().instances == 1
    h.engine.run(until=500.0)  # up at 500
    h.terminate("cloud", 1, "t-3")
    assert cloud.cost == pytest.approx((400.0 + 100.0) * 3.6 / 3600)
    assert cloud.launches == 2 and i1 == "cloud-i1"


def test_cloud_discovery_reports_an_elastic_pool_and_provision_is_idempotent_by_token() -> None:
    h = Harness(WIDE)
    [pool] = [p for p in h.prov.core_pools() if p.id == "cloud"]
    assert pool.elastic and pool.max_instances == 3 and pool.boot_s == 60.0
    assert pool.node == Shape(cpus=8.0, memory=32 * 2**30, gpus={"a10g": 2})
    assert (pool.cpus, pool.gpus) == (0.0, {"a10g": 0})
    ids = h.provision("cloud", 2, "tok")
    assert h.provision("cloud", 2, "tok") == ids  # the same token: the same instances
    [pool] = [p for p in h.prov.core_pools() if p.id == "cloud"]
    # booting instances are capacity (work may be sent for them), less room to launch
    assert (pool.cpus, pool.gpus, pool.max_instances) == (16.0, {"a10g": 4}, 1)
    assert h.provision("cloud", 5, "more") == ["cloud-i3"]  # what the maximum leaves
    with pytest.raises(ProviderError) as e:
        h.provision("cloud", 1, "full")
    assert not e.value.retryable and "max_instances" in str(e.value)
    with pytest.raises(ProviderError) as e:
        h.provision("slurm", 1, "x")
    assert not e.value.retryable


def test_a_lost_provision_answer_is_found_again_by_its_token() -> None:
    h = Harness(WIDE, FaultsSpec(lost_answer_rate=1.0))
    with pytest.raises(ProviderError) as e:
        h.provision("cloud", 1, "tok")
    assert e.value.retryable
    h.prov.api.spec = FaultsSpec()
    assert h.provision("cloud", 1, "tok") == ["cloud-i1"] and h.cloud().instances == 1


def test_jobs_share_instances_and_wide_jobs_take_whole_ones() -> None:
    h = Harness(WIDE)
    h.provision("cloud", 3, "tok")
    h.submit("cloud", SimJob(id="a", submit=0, duration=1000.0, gpus=4))  # 2 whole instances
    h.submit("cloud", SimJob(id="b", submit=0, duration=1000.0, gpus=1))
    h.submit("cloud", SimJob(id="c", submit=0, duration=1000.0, gpus=1))  # best fit: b's
    h.submit("cloud", SimJob(id="d", submit=0, duration=1000.0, gpus=4))  # waits for a
    h.engine.run()
    assert started(h) == {"k-a": 60.0, "k-b": 60.0, "k-c": 60.0, "k-d": 1060.0}
    node = {k: a.alloc[0][0] for k, a in h.prov.attempts.items()}
    assert node["k-b"] == node["k-c"] and node["k-b"] not in {
        n for n, *_ in h.prov.attempts["k-a"].alloc
    }


def test_terminate_stops_only_idle_instances_once_per_token() -> None:
    h = Harness(WIDE)
    h.provision("cloud", 3, "tok")
    h.engine.run(until=60.0)
    h.submit("cloud", SimJob(id="a", submit=0, duration=1000.0, gpus=1))
    h.terminate("cloud", 3, "t")
    cloud = h.cloud()
    assert cloud.instances == 1 and h.state("k-a") is ProviderState.RUNNING
    h.terminate("cloud", 3, "t")  # the same token again: nothing more
    assert cloud.instances == 1
    # each stopped instance ran 60 s and is billed the minimum (10 min)
    assert cloud.cost == pytest.approx(2 * 600.0 * 7.2 / 3600)
    cloud.finish_accounting()  # what still runs at the end is billed until then
    assert cloud.cost == pytest.approx((2 * 600.0 + 600.0) * 7.2 / 3600)


def test_spot_instances_are_reclaimed_their_jobs_preempted_and_capacity_pushed() -> None:
    text = CLUSTER.replace(
        'boot = "100s"', 'boot = "0"\nspot = true\ninterruptions_per_hour = 3600'
    )
    h = Harness(text)
    [pool] = [p for p in h.prov.core_pools() if p.id == "cloud"]
    assert pool.spot and pool.interruption_rate == 3600.0
    h.provision("cloud", 1, "tok")
    h.submit("cloud", SimJob(id="a", submit=0, duration=3600.0, gpus=1))
    h.engine.run()
    [(t, rep)] = [(t, r) for t, r in h.reports if r.state is ProviderState.FAILED]
    assert rep.failure is FailureClass.PREEMPTED and t < 3600.0
    cloud = h.cloud()
    assert cloud.instances == 0 and cloud.preemptions == 1
    assert h.capacity_changes == [0.0, t]
    assert cloud.cost == pytest.approx(max(60.0, t) * 3.6 / 3600)
