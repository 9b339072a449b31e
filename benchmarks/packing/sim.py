"""The FGD paper's packing protocol, re-implemented from the peer's simulator, with devices exact.

Peer: hkust-adsl/kubernetes-scheduler-simulator ("Beware of Fragmentation", USENIX ATC '23).
Every rule below names the peer file it follows (paths in that repository):

- cluster: the 1,213 GPU nodes of openb (data/prepare_input.sh copies
  node_yaml/openb_node_list_gpu_node.yaml beside every pod list); each node's allocatable CPU,
  memory and GPU count are its capacity (pods cap 1001, never binding).
- pods: data/pod_csv_to_yaml.py: cpu_milli and memory_mib as requests, gpu-milli clipped to
  [0, 1000] per GPU, gpu-count, gpu_spec "A|B" as the allowed card models. Creation and deletion
  times are written as plain seconds, which GetCreationTime/GetDeletionTimeFromPodAnnotation
  (pkg/type/open-gpu-share/utils/pod.go) fail to parse as RFC 3339: so no pod ever departs and
  the event sort of syncClusterResourceList (pkg/simulator/simulator.go) keeps the given order.
- order: pkg/simulator/core.go seeds Go's global math/rand with the tuning seed and draws one
  rand.Int() (a log.Debugf argument); SortClusterPods sorts the pods by name, then rand.Shuffle.
- inflation to 130%: TunePodsByNodeTotalResource/tuneUpPods (pkg/simulator/simulator.go) clone
  workloadPods[rand.Intn(n)] (the original pods sorted by name) and append the clones after the
  shuffled originals, until adding the clone's *per-GPU* milli would pass 1.3 x GPU capacity
  (the test uses MilliGpu, the sum adds MilliGpu x GpuNumber: reproduced as written).
- filters: kube-scheduler's NodeResourcesFit (CPU, memory) and Open-Gpu-Share's Filter
  (pkg/simulator/plugin/open_gpu_share.go, pkg/type/open-gpu-share/cache/gpunodeinfo.go
  AllocateGpuId): a GPU pod needs a node whose model is in its gpu_spec
  (IsNodeAccessibleToPodByType, pkg/utils/utils.go) and one device with >= its milli free
  (1-GPU) or k devices with >= milli free each (k-GPU; milli is 1000 for every k-GPU pod, so k
  whole free devices).
- device choice (Reserve): "best" (allocateGpuIdBasedOnBestFit: the tightest device that fits,
  lowest index on ties) for BestFit; "random" (reservoir over fitting devices) for Random; FGD's
  own (allocateGpuIdBasedOnFGDScore, pkg/simulator/plugin/fgd_score.go); k-GPU pods always take
  the lowest-index free devices (AllocateExclusiveGpuId, pkg/type/resource.go).
- counting: ClusterGpuFragReport (pkg/simulator/analysis.go) logs used GPU milli (sum over nodes
  of GPUs x 1000 - milli left) and arrived GPU milli after every pod (failed pods count as arrived);
  experiments/analysis/merge_alloc_discrete_0920.py turns them into column 130: the mean of
  round(used / total_gpus / 10, 2) over events whose round(arrived / total_gpus / 10) == 130.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks.packing.gorand import GoRand

MILLI = 1000
MAX_DEV = 8
# pkg/type/open-gpu-share/utils/const.go: normalisers of BestFit's score
MAX_SPEC_CPU = 128000.0
MAX_SPEC_GPU = 8000.0
# kube-scheduler GetNonzeroRequests: a container with no CPU request scores as 100m
DEFAULT_MILLI_CPU = 100

I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Nodes:
    names: list[str]
    cpu: I64
    mem: I64
    ngpu: I64
    model: I64  # index into models
    models: list[str]


@dataclass(frozen=True)
class Pods:
    """The trace's pods in name order (where SortClusterPods and SetWorkloadPods both start)."""

    names: list[str]
    cpu: I64  # request as written (NodeResourcesFit)
    cpu_nz: I64  # GetPodResource's non-zero CPU (scores, FGD)
    mem: I64
    num: I64  # GPUs
    milli: I64  # per GPU
    spec: I64  # index into specs ("" = any model)
    specs: list[str]


def load_nodes(path: Path) -> Nodes:
    rows = list(csv.DictReader(path.open()))
    rows.sort(key=lambda r: r["sn"])
    models = sorted({r["model"] for r in rows})
    return Nodes(
        names=[r["sn"] for r in rows],
        cpu=np.array([int(r["cpu_milli"]) for r in rows], dtype=np.int64),
        mem=np.array([int(r["memory_mib"]) for r in rows], dtype=np.int64),
        ngpu=np.array([int(r["gpu"]) for r in rows], dtype=np.int64),
        model=np.array([models.index(r["model"]) for r in rows], dtype=np.int64),
        models=models,
    )


def load_pods(path: Path) -> Pods:
    rows = list(csv.DictReader(path.open()))
    rows.sort(key=lambda r: r["name"])
    specs = [""]
    spec_idx: list[int] = []
    milli: list[int] = []
    for r in rows:
        num = int(r["num_gpu"])
        m = int(float(r["gpu_milli"])) if r["gpu_milli"] else 0
        m = 0 if num == 0 else (m if 0 < m <= MILLI else (MILLI if m > MILLI else 0))
        if num > 1 and m < MILLI:
            raise ValueError(f"{r['name']}: a multi-GPU pod sharing GPUs (the peer panics too)")
        milli.append(m)
        s = "|".join(x for x in (r.get("gpu_spec") or "").split("|") if x) if num else ""
        if s not in specs:
            specs.append(s)
        spec_idx.append(specs.index(s))
    cpu = np.array([int(r["cpu_milli"]) for r in rows], dtype=np.int64)
    return Pods(
        names=[r["name"] for r in rows],
        cpu=cpu,
        cpu_nz=np.where(cpu == 0, DEFAULT_MILLI_CPU, cpu),
        mem=np.array([int(r["memory_mib"]) for r in rows], dtype=np.int64),
        num=np.array([int(r["num_gpu"]) for r in rows], dtype=np.int64),
        milli=np.array(milli, dtype=np.int64),
        spec=np.array(spec_idx, dtype=np.int64),
        specs=specs,
    )


def spec_allows(pods: Pods, nodes: Nodes) -> BOOL:
    """[spec, model] -> may a pod with that gpu_spec run on that card model."""
    out = np.ones((len(pods.specs), len(nodes.models)), dtype=bool)
    for i, s in enumerate(pods.specs):
        if s:
            allowed = set(s.split("|"))
            out[i] = [m in allowed for m in nodes.models]
    return out


# Between tuneUpPods and rand.Perm the peer starts the scheduler's informers (runScheduler); each
# client-go reflector draws rand.Float64() (one Int63) for its watch timeout from the same global
# source. That count is not in the peer's code; 10 is measured: it is the only value in 0..20 that
# reproduces the published BestFit figure of seeds 42, 43 and 44 exactly (see bench_packing.py).
REFLECTOR_DRAWS = 10


@dataclass(frozen=True)
class Workload:
    order: I64  # pod indices in arrival order: shuffled originals, then clones
    node_rank: I64  # per node (name order): the rand.Perm prefix of its simulated name
    rng: GoRand  # Go's global source where the peer's is when scheduling starts


def workload(
    pods: Pods,
    n_nodes: int,
    total_gpu_milli: int,
    ratio: float,
    seed: int,
    *,
    draws_before_perm: int = REFLECTOR_DRAWS,
) -> Workload:
    """The peer's arrival order and node names for one seed, drawn from Go's math/rand.

    core.go: rand.Seed(seed); rand.Int(); SortClusterPods (sort by name, rand.Shuffle);
    TunePodsByNodeTotalResource -> tuneUpPods; then syncClusterResourceList renames the nodes,
    sorted by name, to fmt.Sprintf("%04d-", rand.Perm(n)[i]) + name. Ties between equal scores go
    to the smallest name (the peer's kube-scheduler fork, see policies.py): node_rank decides them.
    """
    rng = GoRand(seed)
    rng.go_int()
    order = list(range(len(pods.names)))  # already sorted by name

    def swap(i: int, j: int) -> None:
        order[i], order[j] = order[j], order[i]

    rng.shuffle(len(order), swap)
    total = int((pods.milli * pods.num).sum())
    target = ratio * float(total_gpu_milli)
    n = len(pods.names)
    if total < target:
        while True:
            idx = rng.intn(n)
            if float(total + int(pods.milli[idx])) > target:
                break
            total += int(pods.milli[idx] * pods.num[idx])
            order.append(idx)
    elif total > target:
        raise NotImplementedError("tuneDownPods: not needed for openb at 130%")
    for _ in range(draws_before_perm):
        rng.int63()
    rank = np.array(rng.perm(n_nodes), dtype=np.int64)
    return Workload(order=np.array(order, dtype=np.int64), node_rank=rank, rng=rng)


@dataclass
class Cluster:
    """Per-device free capacity; padding devices hold -1 so that nothing ever fits them."""

    nodes: Nodes
    cpu_free: I64 = field(init=False)
    mem_free: I64 = field(init=False)
    dev_free: I64 = field(init=False)  # (nodes, MAX_DEV)

    def __post_init__(self) -> None:
        n = len(self.nodes.names)
        self.cpu_free = self.nodes.cpu.copy()
        self.mem_free = self.nodes.mem.copy()
        dev = np.full((n, MAX_DEV), -1, dtype=np.int64)
        for i, g in enumerate(self.nodes.ngpu):
            dev[i, :g] = MILLI
        self.dev_free = dev

    def gpu_left(self) -> I64:
        out: I64 = np.maximum(self.dev_free, 0).sum(axis=1)
        return out

    def used_gpu_milli(self) -> int:
        return int(self.nodes.ngpu.sum()) * MILLI - int(self.gpu_left().sum())

    def feasible(self, p: PodReq) -> BOOL:
        ok: BOOL = (self.cpu_free >= p.cpu) & (self.mem_free >= p.mem)
        if p.milli > 0:
            ok &= p.model_ok[self.nodes.model]
            ok &= (self.dev_free >= p.milli).sum(axis=1) >= p.num
        return ok

    def apply(self, p: PodReq, node: int, devs: tuple[int, ...]) -> None:
        self.cpu_free[node] -= p.cpu
        self.mem_free[node] -= p.mem
        for d in devs:
            self.dev_free[node, d] -= p.milli


@dataclass(frozen=True)
class PodReq:
    index: int
    cpu: int
    cpu_nz: int
    mem: int
    num: int
    milli: int
    spec: int
    model_ok: BOOL  # by model index

    @property
    def share(self) -> bool:
        return self.num == 1 and self.milli < MILLI

    @property
    def total_milli(self) -> int:
        return self.num * self.milli


def pod_req(pods: Pods, allows: BOOL, i: int) -> PodReq:
    return PodReq(
        index=i,
        cpu=int(pods.cpu[i]),
        cpu_nz=int(pods.cpu_nz[i]),
        mem=int(pods.mem[i]),
        num=int(pods.num[i]),
        milli=int(pods.milli[i]),
        spec=int(pods.spec[i]),
        model_ok=allows[pods.spec[i]],
    )


def lowest_free_devices(cl: Cluster, node: int, k: int) -> tuple[int, ...]:
    """AllocateExclusiveGpuId: the k lowest-index fully free devices."""
    free = np.flatnonzero(cl.dev_free[node] == MILLI)
    return tuple(int(d) for d in free[:k])


def best_fit_device(cl: Cluster, node: int, milli: int) -> int:
    """allocateGpuIdBasedOnBestFit: the device with the least free milli that fits, lowest index."""
    free = cl.dev_free[node]
    cand = np.where(free >= milli, free, np.iinfo(np.int64).max)
    return int(np.argmin(cand))


class Audit:
    """An independent per-device ledger: counts decisions that real devices could not host."""

    def __init__(self, nodes: Nodes) -> None:
        n = len(nodes.names)
        self.nodes = nodes
        self.cpu = np.zeros(n, dtype=np.int64)
        self.mem = np.zeros(n, dtype=np.int64)
        self.dev = np.zeros((n, MAX_DEV), dtype=np.int64)
        self.impossible = 0
        self.reasons: dict[str, int] = {}

    def _bad(self, why: str) -> None:
        self.impossible += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1

    def record(self, p: PodReq, node: int, devs: tuple[int, ...]) -> None:
        before = self.impossible
        ng = int(self.nodes.ngpu[node])
        if self.cpu[node] + p.cpu > self.nodes.cpu[node]:
            self._bad("cpu")
        if self.mem[node] + p.mem > self.nodes.mem[node]:
            self._bad("memory")
        if p.milli > 0:
            if not p.model_ok[self.nodes.model[node]]:
                self._bad("gpu model")
            if len(devs) != p.num or len(set(devs)) != len(devs):
                self._bad("device count")
            for d in devs:
                if not 0 <= d < ng:
                    self._bad("no such device")
                elif p.share and self.dev[node, d] + p.milli > MILLI:
                    self._bad("share exceeds device")
                elif not p.share and self.dev[node, d] != 0:
                    self._bad("whole GPU not free")
        elif devs:
            self._bad("devices for a CPU pod")
        if self.impossible == before:
            self.cpu[node] += p.cpu
            self.mem[node] += p.mem
            for d in devs:
                self.dev[node, d] += p.milli


Decision = tuple[int, tuple[int, ...]]
# A policy sees the cluster, the pod and the feasible nodes (non-empty) and returns (node, devices).
Policy = Callable[[Cluster, PodReq, BOOL], Decision]


@dataclass
class RunResult:
    alloc_final: float  # % of GPU milli capacity allocated after the last pod
    alloc_col130: float  # the peer's column 130 (see module docstring)
    failed: int
    placed: int
    impossible: int
    reasons: dict[str, int]
    arrival_curve: dict[int, float]  # peer's columns 0..130 computed on our run


def run(
    nodes: Nodes,
    pods: Pods,
    order: I64,
    policy: Policy,
    *,
    audit_every: bool = True,
) -> RunResult:
    allows = spec_allows(pods, nodes)
    cl = Cluster(nodes)
    audit = Audit(nodes)
    total_gpus = int(nodes.ngpu.sum())
    arrived = 0
    used = 0
    failed = placed = 0
    arr_ratio = np.empty(len(order))
    alloc_ratio = np.empty(len(order))
    for k, i in enumerate(order):
        p = pod_req(pods, allows, int(i))
        arrived += p.total_milli
        ok = cl.feasible(p)
        if not ok.any():
            failed += 1
        else:
            node, devs = policy(cl, p, ok)
            if audit_every:
                audit.record(p, node, devs)
            cl.apply(p, node, devs)
            used += p.total_milli
            placed += 1
        arr_ratio[k] = arrived / total_gpus / 10
        alloc_ratio[k] = used / total_gpus / 10
    if used != cl.used_gpu_milli():
        raise RuntimeError("GPU ledger drifted from the device state")
    curve = peer_columns(arr_ratio, alloc_ratio)
    return RunResult(
        alloc_final=100.0 * used / (total_gpus * MILLI),
        alloc_col130=curve.get(130, float("nan")),
        failed=failed,
        placed=placed,
        impossible=audit.impossible,
        reasons=audit.reasons,
        arrival_curve=curve,
    )


def peer_columns(arr: npt.NDArray[np.float64], alloc: npt.NDArray[np.float64]) -> dict[int, float]:
    """merge_alloc_discrete_0920.py: per integer arrival %, the mean alloc % (pandas rounding)."""
    arr_r = np.round(arr, 0)
    alloc_r = np.round(alloc, 2)
    out: dict[int, float] = {}
    for col in range(131):
        sel = arr_r == col
        if not sel.any():
            sel = (arr_r >= col - 1) & (arr_r <= col + 1)
            if not sel.any():
                continue
        out[col] = round(float(alloc_r[sel].mean()), 2)
    return out
