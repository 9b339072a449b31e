"""Baseline placement policies of the FGD paper, as the peer's score plugins compute them.

kube-scheduler filters, scores each feasible node with the one enabled score plugin (weight 1000;
scripts/generate_config_and_run.py disables every default score plugin) and selectHost keeps a
maximum-score node. The peer builds against a fork (go.mod: k8s.io/kubernetes =>
github.com/mental2008/kubernetes v1.20.5-minor) whose selectHost
(pkg/scheduler/core/generic_scheduler.go) replaces the random reservoir by "the smallest
lexicographical order if the score remains the same"; node names are "%04d-" + rand.Perm rank,
so a tie goes to the tied node of smallest rank (Workload.node_rank). BestFit and FGD are thus
deterministic given the seed, and reproduced decision for decision (up to float rounding).
Random alone still draws from Go's global source in the parallel filter's completion order,
which nothing can replay: it uses a seeded numpy generator (same distribution).
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from benchmarks.packing.sim import (
    BOOL,
    I64,
    MAX_SPEC_CPU,
    MAX_SPEC_GPU,
    MILLI,
    Cluster,
    Decision,
    Nodes,
    PodReq,
    Pods,
    Policy,
    best_fit_device,
    lowest_free_devices,
)
from stowplan.placement.devices import DeviceModel, DeviceNode, DeviceTask, Objective, ShapeMix


def pick_max(scores: I64, ok: BOOL, rank: I64) -> int:
    """selectHost of the peer's scheduler fork: max score, then the smallest name (rank)."""
    cand = np.flatnonzero(ok)
    s = scores[cand]
    top = cand[s == s.max()]
    return int(top[np.argmin(rank[top])])


def best_fit_scores(cl: Cluster, p: PodReq) -> I64:
    """getBestFitScore (pkg/simulator/plugin/best_fit_score.go), same float operations in order.

    score = int64((1 - [(cpu_free - cpu_req) / 128000 * 0.5 + (gpu_free - gpu_req) / 8000 * 0.5])
    * 100), free GPU being the node's total milli left (pooled: BestFit ignores devices here).
    NormalizeScore then maps [min, max] onto [0, 100] with integer arithmetic; a map that is
    strictly increasing (the range is at most 100), so the argmax set is unchanged: not redone.
    """
    score = np.zeros(len(cl.cpu_free))
    score = score + (cl.cpu_free - p.cpu_nz).astype(np.float64) / MAX_SPEC_CPU * 0.5
    score = score + (cl.gpu_left() - p.total_milli).astype(np.float64) / MAX_SPEC_GPU * 0.5
    out: I64 = np.trunc((1.0 - score) * 100.0).astype(np.int64)
    return out


def best_fit(rank: I64) -> Policy:
    def choose(cl: Cluster, p: PodReq, ok: BOOL) -> Decision:
        node = pick_max(best_fit_scores(cl, p), ok, rank)
        return node, _devices_best(cl, p, node)

    return choose


def _devices_best(cl: Cluster, p: PodReq, node: int) -> tuple[int, ...]:
    if p.milli == 0:
        return ()
    if p.share:
        return (best_fit_device(cl, node, p.milli),)
    return lowest_free_devices(cl, node, p.num)


def random_policy(seed: int) -> Policy:
    """random_score.go: PreScore picks rand.Intn(len(feasible)); gpusel "random" (reservoir)."""
    rng = np.random.default_rng(seed)

    def choose(cl: Cluster, p: PodReq, ok: BOOL) -> Decision:
        cand = np.flatnonzero(ok)
        node = int(cand[rng.integers(len(cand))])
        if p.milli == 0:
            return node, ()
        if p.share:
            fits = np.flatnonzero(cl.dev_free[node] >= p.milli)
            return node, (int(fits[rng.integers(len(fits))]),)
        return node, lowest_free_devices(cl, node, p.num)

    return choose


class TypicalPods:
    """GetTypicalPods (pkg/utils/frag.go) with the run scripts' config: CPU pods included,
    popularity threshold 95%, step 1, no GPU weight; built from the original pods (SetTypicalPods
    runs on sim.workloadPods before tuning, pkg/simulator/core.go)."""

    def __init__(self, pods: Pods, allows: BOOL, *, threshold: float = 95.0) -> None:
        counts: dict[tuple[int, int, int, str], int] = {}
        for i in range(len(pods.names)):
            key = (
                int(pods.cpu_nz[i]),
                int(pods.milli[i]),
                int(pods.num[i]),
                pods.specs[int(pods.spec[i])],
            )
            counts[key] = counts.get(key, 0) + 1
        total = float(len(pods.names))
        # sort.Sort(sort.Reverse(TargetPodList)): count descending, then Less (cpu, milli, num,
        # type) descending; keys are unique so the order is total
        items = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
        chosen: list[tuple[tuple[int, int, int, str], float]] = []
        cum = 0.0
        for key, cnt in items:
            if cum >= threshold * total / 100.0:
                break
            cum += cnt
            chosen.append((key, cnt / total))
        norm = cum / total
        self.cpu = np.array([k[0] for k, _ in chosen], dtype=np.int64)
        self.milli = np.array([k[1] for k, _ in chosen], dtype=np.int64)
        self.num = np.array([k[2] for k, _ in chosen], dtype=np.int64)
        spec_index = {s: j for j, s in enumerate(pods.specs)}
        self.access = np.array(
            [allows[spec_index[k[3]]] if k[3] in spec_index else allows[0] for k, _ in chosen]
        )  # (T, models)
        self.p = np.array([f / norm for _, f in chosen])
        self.thresholds = np.unique(self.milli[self.milli > 0])
        self.m_idx = np.searchsorted(self.thresholds, self.milli)  # valid where milli > 0
        self.gpu_t = self.milli > 0


def frag_amount(
    tp: TypicalPods,
    model: I64,
    cpu_left: I64,
    gpu_left: I64,
    cnt_ge: I64,
    big: I64,
) -> npt.NDArray[np.float64]:
    """NodeGpuShareFragAmountScore for many node states at once (pkg/utils/frag.go).

    For each typical pod t (share p_t): if t fits the node (Q3: model allowed, enough devices with
    >= t's milli, enough CPU), the devices with less than t's milli free are fragment; otherwise
    (CPU-only t, wrong model, lacking GPU or CPU) all free GPU milli is. So
    frag = gpu_left * sum(p) - sum_{t in Q3} p_t * (milli free on devices with >= t's milli).
    cnt_ge/big: per threshold, count and sum of device milli free at or above it.
    """
    mi = np.where(tp.gpu_t, tp.m_idx, 0)
    q3 = (
        tp.gpu_t[None, :]
        & tp.access[:, model].T
        & (cnt_ge[:, mi] >= tp.num[None, :])
        & (cpu_left[:, None] >= tp.cpu[None, :])
    )
    out: npt.NDArray[np.float64] = gpu_left * tp.p.sum() - (q3 * tp.p[None, :] * big[:, mi]).sum(1)
    return out


def _sigmoid_score(before: npt.NDArray[np.float64], after: npt.NDArray[np.float64]) -> I64:
    # int64(sigmoid((before - after) / 1000) * 100), fgd_score.go
    x = (before - after) / 1000.0
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-x))
    out: I64 = np.trunc(s * 100.0).astype(np.int64)
    return out


def fgd(pods: Pods, allows: BOOL, rank: I64) -> Policy:
    """FGDScore (pkg/simulator/plugin/fgd_score.go) with its own GPU choice; no NormalizeScore."""
    tp = TypicalPods(pods, allows)
    thr = tp.thresholds

    def features(dev: I64) -> tuple[I64, I64]:
        ge = dev[..., None] >= thr  # (..., D, M)
        cnt: I64 = ge.sum(axis=-2)
        big: I64 = (np.where(ge, dev[..., None], 0)).sum(axis=-2)
        return cnt, big

    def choose(cl: Cluster, p: PodReq, ok: BOOL) -> Decision:
        cand = np.flatnonzero(ok)
        model = cl.nodes.model[cand]
        dev = cl.dev_free[cand]
        cpu = cl.cpu_free[cand]
        gl = np.maximum(dev, 0).sum(axis=1)
        cnt, big = features(dev)
        before = frag_amount(tp, model, cpu, gl, cnt, big)
        if p.share:
            rows, ds = np.nonzero(dev >= p.milli)
            old = dev[rows, ds]
            new = old - p.milli
            cnt2 = cnt[rows] - (old[:, None] >= thr) + (new[:, None] >= thr)
            big2 = (
                big[rows]
                - np.where(old[:, None] >= thr, old[:, None], 0)
                + np.where(new[:, None] >= thr, new[:, None], 0)
            )
            after = frag_amount(
                tp, model[rows], cpu[rows] - p.cpu_nz, gl[rows] - p.milli, cnt2, big2
            )
            sc = _sigmoid_score(before[rows], after)
            # per node: the max over its devices, the first device (index order) reaching it
            node_score = np.full(len(cand), np.iinfo(np.int64).min, dtype=np.int64)
            np.maximum.at(node_score, rows, sc)
            full = np.full(len(cl.cpu_free), np.iinfo(np.int64).min, dtype=np.int64)
            full[cand] = node_score
            node = pick_max(full, ok, rank)
            r = int(np.searchsorted(cand, node))
            mine = rows == r
            best = sc[mine].max()
            dev_id = int(ds[mine][sc[mine] == best][0])
            return node, (dev_id,)
        k = p.num if p.milli > 0 else 0
        take = k * MILLI
        cnt2 = cnt - k * (thr <= MILLI)[None, :]
        big2 = big - take * (thr <= MILLI)[None, :]
        after = frag_amount(tp, model, cpu - p.cpu_nz, gl - take, cnt2, big2)
        sc = _sigmoid_score(before, after)
        full = np.full(len(cl.cpu_free), np.iinfo(np.int64).min, dtype=np.int64)
        full[cand] = sc
        node = pick_max(full, ok, rank)
        return node, (lowest_free_devices(cl, node, k) if k else ())

    return choose


class EnginePolicy:
    """stowplan's online placement (stowplan/placement/devices.py) as a policy of the run loop.

    The engine keeps its own device state (the run loop's Cluster is not read): each pod becomes
    a DeviceTask, ``DeviceModel.place`` picks the node and devices, and the run loop audits them
    on real devices as it audits the baselines. Ties go to the smallest node index (name order),
    not to the peer's random name ranks. ``latencies_ns``: each decision's wall time.
    """

    def __init__(
        self,
        pods: Pods,
        nodes: Nodes,
        *,
        objective: Objective = "fgd",
        shapes: Literal["trace", "online"] = "trace",
    ) -> None:
        self.pods = pods
        self.tasks = [
            DeviceTask(
                cpu=int(pods.cpu[i]),
                memory=int(pods.mem[i]),
                gpus=int(pods.num[i]),
                milli=int(pods.milli[i]) if pods.num[i] else MILLI,
                models=frozenset(pods.specs[int(pods.spec[i])].split("|"))
                if pods.specs[int(pods.spec[i])] and pods.num[i]
                else None,
            )
            for i in range(len(pods.names))
        ]
        dnodes = [
            DeviceNode(
                name=nodes.names[i],
                cpu=int(nodes.cpu[i]),
                memory=int(nodes.mem[i]),
                gpus=int(nodes.ngpu[i]),
                model=nodes.models[int(nodes.model[i])],
            )
            for i in range(len(nodes.names))
        ]
        # the peer's typical pods: every original pod, CPU requests as GetPodResource reads them
        mix = (
            ShapeMix.from_tasks(
                msgspec.structs.replace(t, cpu=int(pods.cpu_nz[i]))
                for i, t in enumerate(self.tasks)
            )
            if shapes == "trace"
            else None
        )
        self.model = DeviceModel(dnodes, objective=objective, shapes=mix)
        self.latencies_ns: list[int] = []

    def __call__(self, cl: Cluster, p: PodReq, ok: BOOL) -> Decision:
        task = self.tasks[p.index]
        t0 = time.perf_counter_ns()
        got = self.model.place(task)
        self.latencies_ns.append(time.perf_counter_ns() - t0)
        if got is None:
            raise RuntimeError(f"pod {self.pods.names[p.index]}: the engine finds no node")
        return got.node, got.devices


def engine_policy(
    pods: Pods,
    nodes: Nodes,
    *,
    objective: Objective = "fgd",
    shapes: Literal["trace", "online"] = "trace",
) -> EnginePolicy:
    """Where stowplan's online placement plugs in: one pod at a time, (node, device indices)."""
    return EnginePolicy(pods, nodes, objective=objective, shapes=shapes)
