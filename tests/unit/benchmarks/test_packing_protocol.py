"""The packing benchmark's device accounting and its BestFit / FGD choices on tiny clusters."""

from __future__ import annotations

import numpy as np

from benchmarks.packing import policies, sim
from benchmarks.packing.gorand import GoRand


def _nodes(gpus: list[int], cpu: int = 64000) -> sim.Nodes:
    n = len(gpus)
    return sim.Nodes(
        names=[f"n{i}" for i in range(n)],
        cpu=np.full(n, cpu, dtype=np.int64),
        mem=np.full(n, 262144, dtype=np.int64),
        ngpu=np.array(gpus, dtype=np.int64),
        model=np.zeros(n, dtype=np.int64),
        models=["T4"],
    )


def _pods(rows: list[tuple[int, int, int]]) -> sim.Pods:
    """(cpu_milli, num_gpu, gpu_milli) per pod."""
    cpu = np.array([r[0] for r in rows], dtype=np.int64)
    return sim.Pods(
        names=[f"p{i:02d}" for i in range(len(rows))],
        cpu=cpu,
        cpu_nz=cpu,
        mem=np.full(len(rows), 1024, dtype=np.int64),
        num=np.array([r[1] for r in rows], dtype=np.int64),
        milli=np.array([r[2] for r in rows], dtype=np.int64),
        spec=np.zeros(len(rows), dtype=np.int64),
        specs=[""],
    )


def test_go_rand_matches_go_for_seed_1() -> None:
    # Go: rand.Seed(1); rand.Int() x3 and rand.Intn(100) x5 (the classic playground outputs)
    r = GoRand(1)
    assert [r.go_int() for _ in range(3)] == [
        5577006791947779410,
        8674665223082153551,
        6129484611666145821,
    ]
    r = GoRand(1)
    assert [r.intn(100) for _ in range(5)] == [81, 87, 47, 59, 81]


def test_shares_fit_one_device_and_whole_gpus_need_free_devices() -> None:
    nodes = _nodes([2])
    pods = _pods([(1000, 1, 600), (1000, 1, 600), (1000, 1, 600), (1000, 2, 1000)])
    allows = sim.spec_allows(pods, nodes)
    cl = sim.Cluster(nodes)
    # two 0.6 shares: 1.2 GPUs pooled would still leave 0.8, but no device has 0.6 after them
    for i, dev in ((0, 0), (1, 1)):
        p = sim.pod_req(pods, allows, i)
        assert cl.feasible(p)[0]
        assert sim.best_fit_device(cl, 0, p.milli) == dev
        cl.apply(p, 0, (dev,))
    assert not cl.feasible(sim.pod_req(pods, allows, 2))[0]
    assert not cl.feasible(sim.pod_req(pods, allows, 3))[0]
    assert cl.used_gpu_milli() == 1200


def test_audit_counts_impossible_placements() -> None:
    nodes = _nodes([2])
    pods = _pods([(1000, 1, 600), (1000, 1, 600), (1000, 1, 1000)])
    allows = sim.spec_allows(pods, nodes)
    audit = sim.Audit(nodes)
    audit.record(sim.pod_req(pods, allows, 0), 0, (0,))
    audit.record(sim.pod_req(pods, allows, 1), 0, (0,))  # 1.2 on one device
    audit.record(sim.pod_req(pods, allows, 2), 0, (0,))  # whole GPU on a shared device
    audit.record(sim.pod_req(pods, allows, 2), 0, (5,))  # no such device
    assert audit.impossible == 3
    assert audit.reasons == {
        "share exceeds device": 1,
        "whole GPU not free": 1,
        "no such device": 1,
    }


def test_best_fit_takes_the_tightest_node_and_device() -> None:
    # node 0: devices [1000, 300]; node 1: [1000, 1000]; a 0.25 share goes to node 0, device 1
    nodes = _nodes([2, 2])
    pods = _pods([(8000, 1, 700), (8000, 1, 250)])
    allows = sim.spec_allows(pods, nodes)
    cl = sim.Cluster(nodes)
    cl.apply(sim.pod_req(pods, allows, 0), 0, (1,))
    rank = np.array([1, 0], dtype=np.int64)  # node 1 would win any tie
    choose = policies.best_fit(rank)
    p = sim.pod_req(pods, allows, 1)
    assert choose(cl, p, cl.feasible(p)) == (0, (1,))


def test_best_fit_ties_go_to_the_smallest_name_rank() -> None:
    nodes = _nodes([2, 2, 2])
    pods = _pods([(1000, 1, 500)])
    allows = sim.spec_allows(pods, nodes)
    cl = sim.Cluster(nodes)
    p = sim.pod_req(pods, allows, 0)
    choose = policies.best_fit(np.array([2, 0, 1], dtype=np.int64))
    assert choose(cl, p, cl.feasible(p)) == (1, (0,))


def test_run_places_online_and_audits_zero_for_best_fit() -> None:
    nodes = _nodes([1, 2])
    pods = _pods([(1000, 1, 500), (1000, 2, 1000), (1000, 1, 500), (1000, 1, 1000)])
    order = np.arange(4, dtype=np.int64)
    r = sim.run(nodes, pods, order, policies.best_fit(np.array([0, 1], dtype=np.int64)))
    # 0.5 -> node 0; 2 GPUs -> node 1; 0.5 -> node 0 (tightest); the last whole GPU fits nowhere
    assert (r.placed, r.failed, r.impossible) == (3, 1, 0)
    assert r.alloc_final == 100.0


def test_fgd_prefers_the_placement_that_strands_less() -> None:
    # typical pods are 0.5 shares: a 0.5 share on a half-used device strands nothing,
    # on a fresh device it leaves 0.5 that a 0.5 share still fits; a 0.7 share strands 0.3
    nodes = _nodes([1, 1])
    pods = _pods([(1000, 1, 500)] * 4 + [(1000, 1, 300)])
    allows = sim.spec_allows(pods, nodes)
    cl = sim.Cluster(nodes)
    cl.apply(sim.pod_req(pods, allows, 4), 1, (0,))  # node 1 keeps 0.7 free
    choose = policies.fgd(pods, allows, np.array([1, 0], dtype=np.int64))  # ties: node 1
    p = sim.pod_req(pods, allows, 0)
    assert choose(cl, p, cl.feasible(p)) == (0, (0,))
