"""Shares of one GPU in the simulator (``SimJob.gpu_milli`` below 1000).

On a pool with ``gpu_sharing`` shares run side by side on one device, up to 1000 thousandths,
and a whole-GPU job waits for a device nothing runs on; the simulated pool accounts each device
in thousandths and never over-commits one, whatever lease it is handed. On a pool that does not
share, a share holds a whole device, as every share did before shares reached the simulator.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from stowplan.errors import InternalError, SpecError
from stowplan.placement.leases import MILLI, DeviceLease
from stowplan.providers.base import ProviderState
from stowplan.simulator.cluster import load_cluster, parse_cluster
from stowplan.simulator.provider import KubernetesNodePool
from stowplan.simulator.shell import SimOptions, Simulation
from stowplan.simulator.workloads import SimJob, Workload, load_workload
from tests.unit.simulator.test_devices import submit
from tests.unit.simulator.test_provider import Harness as ProviderHarness

BOX = """\
[cluster]
name = "g"
[[sites]]
name = "s"
[[pools]]
name = "k8s"
site = "s"
kind = "kubernetes"
nodes = NODES
gpus_per_node = 1
gpu_model = "a100"
cpus_per_node = 32
memory_per_node = "256GiB"
device_leases = true
gpu_sharing = SHARING
"""


def box(sharing: bool, nodes: int = 1) -> str:
    return BOX.replace("SHARING", "true" if sharing else "false").replace("NODES", str(nodes))


def run(text: str, jobs: list[SimJob], policy: str = "cpsat") -> Simulation:
    wl = Workload(name="shares", kind="synthetic", jobs=jobs, source="test")
    sim = Simulation(parse_cluster(text, Path("g.toml")), wl, SimOptions(seed=1, policy=policy))
    sim.run()
    return sim


def spans(sim: Simulation) -> dict[str, tuple[float, float]]:
    rows = sim.metrics.job_rows()
    assert {r["state"] for r in rows} == {"SUCCEEDED"}
    return {r["job"]: (r["start"], r["end"]) for r in rows}


def most_on_one_device(sim: Simulation) -> int:
    """The most attempts that ran on one device at one time (from the attempts' leases)."""
    edges: list[tuple[float, int, tuple[str, int]]] = []
    for prov in sim.providers.values():
        for a in prov.attempts.values():
            assert a.lease is not None and a.started is not None and a.ended is not None
            for d in a.devices:
                edges += [(a.started, 1, (a.lease.node, d)), (a.ended, -1, (a.lease.node, d))]
    live: dict[tuple[str, int], int] = {}
    most = 0
    for _, step, dev in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts
        live[dev] = live.get(dev, 0) + step
        most = max(most, live[dev])
    return most


def shares_and_a_whole_gpu(milli: int = 250) -> list[SimJob]:
    jobs = [
        SimJob(id=f"s{i}", submit=0.0, duration=100.0, gpus=1, gpu_milli=milli) for i in range(4)
    ]
    return [*jobs, SimJob(id="whole", submit=1.0, duration=10.0, gpus=1)]


def test_four_quarters_share_one_device_and_a_whole_gpu_waits_for_it_to_empty() -> None:
    sim = run(box(sharing=True), shares_and_a_whole_gpu())
    at = spans(sim)
    # one device, four quarters on it at once; the whole GPU waits until nothing runs there
    assert [at[f"s{i}"] for i in range(4)] == [(0.0, 100.0)] * 4
    assert at["whole"] == (100.0, 110.0)
    assert most_on_one_device(sim) == 4
    assert {a.lease for p in sim.providers.values() for a in p.attempts.values()} == {
        DeviceLease("k8s-0", (0,))
    }
    # the pool was busy 4 x 0.25 x 100 s + 1 x 10 s: shares count their thousandths
    summary = sim.metrics.summary(sim.metrics.job_rows())
    pool = summary["pools"]["k8s"]
    assert pool["busy_gpu_hours"] == pytest.approx(110.0 / 3600, abs=1e-6)
    assert pool["utilization"] == pytest.approx(1.0, abs=1e-6)
    gpu_h = summary["fairness"]["projects"]["default"]["gpu_hours"]
    assert gpu_h == pytest.approx(110.0 / 3600, abs=1e-6)


def test_half_full_device_offers_half_its_time_to_utilization() -> None:
    jobs = [SimJob(id=f"s{i}", submit=0.0, duration=100.0, gpus=1, gpu_milli=250) for i in (0, 1)]
    sim = run(box(sharing=True), jobs)
    assert spans(sim) == {"s0": (0.0, 100.0), "s1": (0.0, 100.0)}
    pool = sim.metrics.summary(sim.metrics.job_rows())["pools"]["k8s"]
    assert pool["utilization"] == pytest.approx(0.5, abs=1e-6)
    assert max(sim.metrics.util["k8s"]) == pytest.approx(0.5)


def test_a_share_holds_a_whole_device_where_the_pool_does_not_share() -> None:
    for policy in ("fifo", "cpsat"):
        shares = run(box(sharing=False), shares_and_a_whole_gpu(), policy)
        assert most_on_one_device(shares) == 1
        # the shares run one after another, each on the whole device
        ran = sorted(spans(shares).values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ran))
        busy = shares.metrics.summary(shares.metrics.job_rows())["pools"]["k8s"]
        assert busy["busy_gpu_hours"] == pytest.approx(410.0 / 3600, abs=1e-6)
    # the same as when every share asked for a whole GPU (the openb loader's rule before)
    whole = [SimJob(id=j.id, submit=j.submit, duration=j.duration, gpus=1) for j in ran_jobs()]
    for policy in ("fifo", "greedy"):
        a = run(box(sharing=False), ran_jobs(), policy)
        b = run(box(sharing=False), whole, policy)
        assert summary_of(a) == summary_of(b)
        assert a.metrics.job_rows() == b.metrics.job_rows()


def ran_jobs() -> list[SimJob]:
    """Shares of several sizes and whole GPUs over two one-GPU nodes."""
    return [
        SimJob(
            id=f"j{i:02d}",
            submit=float(i * 13 % 50),
            duration=float(30 + i * 17 % 70),
            gpus=1,
            gpu_milli=(250, 500, 1000, 100)[i % 4],
        )
        for i in range(24)
    ]


def summary_of(sim: Simulation) -> dict[str, Any]:
    out = sim.metrics.summary(sim.metrics.job_rows())
    assert isinstance(out, dict)
    return out


def test_shares_on_a_sharing_pool_never_overfill_a_device() -> None:
    sim = run(box(sharing=True, nodes=2), ran_jobs())
    spans(sim)
    attempts = [a for p in sim.providers.values() for a in p.attempts.values()]
    # sweep every start and end: the milli on each device never passes 1000, and a whole GPU
    # never runs beside anything
    edges = []
    for a in attempts:
        assert a.lease is not None and a.started is not None and a.ended is not None
        [d] = a.devices
        edges += [(a.started, 1, a, (a.lease.node, d)), (a.ended, 0, a, (a.lease.node, d))]
    live: dict[tuple[str, int], dict[str, int]] = {}
    for _, start, a, dev in sorted(edges, key=lambda e: (e[0], e[1], e[2].key)):
        on = live.setdefault(dev, {})
        if start:
            on[a.key] = a.job.gpu_milli
            assert sum(on.values()) <= MILLI, (dev, on)
        else:
            del on[a.key]
    assert most_on_one_device(sim) > 1  # some shares did share a device
    for prov in sim.providers.values():
        for pool in prov.pools.values():
            assert isinstance(pool, KubernetesNodePool)
            assert all(not held for node in pool.holder for held in node)
            assert pool.free_g == [1, 1] and pool.used_milli == 0


# ---- the provider's per-device accounting ---------------------------------------------------


def provider(sharing: bool) -> tuple[ProviderHarness, KubernetesNodePool]:
    h = ProviderHarness(box(sharing))
    pool = h.prov.pools["k8s"]
    assert isinstance(pool, KubernetesNodePool)
    return h, pool


def share(job_id: str, milli: int, duration: float) -> SimJob:
    return SimJob(id=job_id, submit=0, duration=duration, gpus=1, gpu_milli=milli)


def test_a_lease_that_would_over_commit_a_device_waits_for_room() -> None:
    h, pool = provider(sharing=True)
    dev = DeviceLease("k8s-0", (0,))
    submit(h, share("a", 500, 100.0), dev, "ka")
    submit(h, share("b", 400, 50.0), dev, "kb")
    # 900 of 1000 taken: a 250 share and a whole GPU leased there both wait
    submit(h, share("c", 250, 10.0), dev, "kc")
    submit(h, SimJob(id="w", submit=0, duration=10.0, gpus=1), dev, "kw")
    assert [h.state(k) for k in ("ka", "kb", "kc", "kw")] == [
        ProviderState.RUNNING,
        ProviderState.RUNNING,
        ProviderState.QUEUED,
        ProviderState.QUEUED,
    ]
    assert pool.holder[0] == [{"ka": 500, "kb": 400}] and pool.device_waits >= 2
    assert pool.free_g == [0] and pool.used_milli == 900
    h.engine.run()
    # "b" ends at 50: the quarter goes beside the half; the whole GPU waits until the device
    # holds nothing (100 for "a", 60 for "c")
    assert h.states("kc") == [(50.0, ProviderState.RUNNING), (60.0, ProviderState.SUCCEEDED)]
    assert h.states("kw") == [(100.0, ProviderState.RUNNING), (110.0, ProviderState.SUCCEEDED)]
    assert pool.holder[0] == [{}] and pool.free_g == [1] and pool.used_milli == 0
    assert pool.busy_g_s == pytest.approx(0.5 * 100 + 0.4 * 50 + 0.25 * 10 + 10)


def test_a_share_holds_its_device_whole_where_the_pool_does_not_share() -> None:
    h, pool = provider(sharing=False)
    dev = DeviceLease("k8s-0", (0,))
    submit(h, share("a", 250, 100.0), dev, "ka")
    submit(h, share("b", 250, 10.0), dev, "kb")
    assert h.state("ka") is ProviderState.RUNNING and h.state("kb") is ProviderState.QUEUED
    assert pool.holder[0] == [{"ka": MILLI}] and pool.device_waits >= 1
    h.engine.run()
    assert h.states("kb") == [(100.0, ProviderState.RUNNING), (110.0, ProviderState.SUCCEEDED)]
    assert pool.busy_g_s == pytest.approx(110.0)


def test_taking_more_than_a_device_has_left_is_an_error() -> None:
    h, pool = provider(sharing=True)
    submit(h, share("a", 750, 100.0), DeviceLease("k8s-0", (0,)), "ka")
    other = h.prov.attempts["ka"]
    intruder = type(other)("kx", "x", share("x", 500, 1.0), pool, 0.0)
    intruder.node_devices = {0: (0,)}
    with pytest.raises(InternalError, match="over-books"):
        pool._take(0, 1, 1.0, 1, intruder)
    whole = type(other)("kw", "w", SimJob(id="w", submit=0, gpus=1), pool, 0.0)
    whole.node_devices = {0: (0,)}
    with pytest.raises(InternalError, match="over-books"):
        pool._take(0, 1, 1.0, 1, whole)
    assert pool.holder[0] == [{"ka": 750}]


def test_discovery_says_the_pool_shares_its_devices() -> None:
    for sharing in (True, False):
        h, _ = provider(sharing)
        [pool] = h.prov.core_pools()
        assert pool.devices is not None and pool.devices.sharing is sharing


# ---- the cluster file and the openb loader --------------------------------------------------


def test_gpu_sharing_needs_device_leases_and_gpus(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    for text, words in (
        (box(True).replace("device_leases = true\n", ""), "device_leases = true"),
        (box(True).replace("gpu_sharing = true", 'gpu_sharing = "yes"'), "bool"),
    ):
        f.write_text(text)
        with pytest.raises(SpecError) as info:
            load_cluster(f)
        e = info.value
        assert e.file is not None and e.file.endswith("c.toml")
        line = 1 + [ln.split(" ")[0] for ln in text.splitlines()].index("gpu_sharing")
        assert e.path == "$.pools[0].gpu_sharing" and e.line == line
        assert words in e.message
    f.write_text(box(True).replace("gpus_per_node = 1\n", "").replace('gpu_model = "a100"\n', ""))
    with pytest.raises(SpecError, match="no GPUs to share") as info:
        load_cluster(f)
    assert info.value.path == "$.pools[0].gpu_sharing"
    assert parse_cluster(box(False), Path("c.toml")).pools[0].gpu_sharing is False


OPENB = """\
name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time
openb-pod-0000,4000,8192,1,500,,LS,Running,0,100,0
openb-pod-0001,4000,8192,1,500,,LS,Running,0,100,0
openb-pod-0002,4000,8192,1,1000,,LS,Running,0,100,0
openb-pod-0003,4000,8192,2,1000,,BE,Running,10,110,10
openb-pod-0004,2000,4096,0,0,,BE,Running,20,120,20
"""


def test_openb_pods_keep_their_share(tmp_path: Path) -> None:
    f = tmp_path / "openb_pod_list_test.csv"
    f.write_text(OPENB)
    wl = load_workload(f)
    assert [(j.id[-4:], j.gpus, j.gpu_milli) for j in wl.jobs] == [
        ("0000", 1, 500),
        ("0001", 1, 500),
        ("0002", 1, 1000),
        ("0003", 2, 1000),
        ("0004", 0, 1000),
    ]
    [note] = wl.notes
    assert note.startswith("2 pods ask for a fraction of a GPU")
    assert "gpu_sharing" in note and "whole GPU" in note


def test_openb_halves_run_together_on_a_sharing_pool_and_apart_elsewhere(tmp_path: Path) -> None:
    f = tmp_path / "openb_pod_list_test.csv"
    f.write_text(OPENB.splitlines()[0] + "\n" + "\n".join(OPENB.splitlines()[1:3]) + "\n")
    wl = load_workload(f)
    for sharing, second in ((True, (0.0, 100.0)), (False, (100.0, 200.0))):
        cluster = parse_cluster(box(sharing), Path("g.toml"))
        sim = Simulation(cluster, wl, SimOptions(seed=1))
        sim.run()
        at = spans(sim)
        assert sorted(at.values()) == [(0.0, 100.0), second]
