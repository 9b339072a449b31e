"""The option table: every (class, pool, GPU model) a class may use, with its cost, in one pass.

Both placers (greedy and CP-SAT), the lower bound and ``explain`` read this table, so they agree
on what is eligible and what it costs. Eligibility is computed per class over all pools at once
with numpy; ``pool_reasons`` is the scalar reference that says *why* a pool is out, and the
tests check that the two agree.

Integer units, shared by every placer so a greedy answer is always a valid CP-SAT hint: CPUs in
thousandths (needs rounded up, capacities down), memory in MiB (the same), GPUs whole. Costs are
scaled so the dearest option is ``PRICE_UNITS``; the reward for placing a member exceeds the
cost of any whole placement, so the priority-weighted count of placed members comes first.

Per-task cost of class c in pool p (weighted, in the currency of the prices):

    data    = w.data * sum over inputs not at p's site, from the replica that is cheapest to
              reach: (bytes / bandwidth) / 3600 * hour_value + bytes / 1e9 * egress_per_gb
    compute = w.cost * runtime_h * price(p) * share * (1 + interruption_rate * runtime_h / 2)
    wait    = w.wait * expected_wait_s(p) / 3600 * hour_value

``share`` is the task's largest fraction of one node (CPUs, memory or GPUs) when the node shape
is known, else 1; the spot factor is the expected work redone after an interruption. An elastic
pool bills whole instances, not tasks: its tasks' compute is 0 (the capacity of an instance
already running is paid for), and each instance it launches costs, whatever share of it its
tasks use, w.cost * price * (boot_h + run_h * (1 + interruption_rate * run_h / 2)) +
w.wait * boot_h * hour_value, where run_h is the longest runtime among the classes that may go
there. Capacity is counted per pool; the packing cuts of ``solution.packing_cuts`` and greedy's
instance-by-instance fill keep members that cannot share an instance apart.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stowplan.placement.problem import Demand, DemandClass, PlacementProblem, Pool
from stowplan.spec.units import plural

MIB = 1 << 20
PRICE_UNITS = 1_000
"""The most expensive option or instance is scaled to this many integer units."""
TIE_UNITS = 16
"""Each cost unit is split this many ways so ids can break ties without changing the optimum.
For a class that asks for no GPU, pools with GPUs take the upper half (``build``)."""

IntArray = npt.NDArray[np.int64]
_BIG = int(np.iinfo(np.int64).max) // 4
FloatArray = npt.NDArray[np.float64]


def cpu_need(cpus: float) -> int:
    return math.ceil(cpus * 1000 - 1e-6)


def cpu_free(cpus: float) -> int:
    return max(0, math.floor(cpus * 1000 + 1e-6))


def mem_need(memory: int) -> int:
    return -(-memory // MIB)


def mem_free(memory: int) -> int:
    return max(0, memory // MIB)


def node_need(cls: Demand) -> tuple[int, int, int]:
    """What one node must hold of ``cls`` (CPU thousandths, memory units, GPUs): all of it,
    or a gang's part on each of its ``nodes``."""
    k = max(1, cls.nodes)
    return cpu_need(cls.cpus / k), mem_need(cls.memory // k), cls.gpus // k


def holding(p: Pool, need: tuple[int, int, int], models: Sequence[str]) -> int:
    """How many of ``p``'s nodes (``node_groups``) each hold ``need`` on one GPU model of
    ``models``."""
    c_cpu, c_mem, c_gpu = need
    return sum(
        g.count
        for g in p.node_groups
        if cpu_free(g.shape.cpus) >= c_cpu
        and mem_free(g.shape.memory) >= c_mem
        and (not c_gpu or any(g.shape.gpus.get(m, 0) >= c_gpu for m in models))
    )


def spans(p: Pool, cls: Demand, need: tuple[int, int, int], model: str) -> bool:
    """Whether ``p`` has ``cls.nodes`` nodes that each hold ``need`` (on GPU ``model``): any
    run where the pool does not know its nodes by shape, if it spans one node."""
    if not p.node_groups:
        return cls.nodes <= 1
    return holding(p, need, (model,)) >= cls.nodes


@dataclass(frozen=True, slots=True)
class Option:
    """One column: tasks of ``cls`` in ``pool`` on GPU ``model`` ("" for none)."""

    cls: int
    pool: int
    model: str
    ub: int
    """At most this many members fit: free capacity plus every instance the pool may launch."""
    unit_cost: float
    data_bytes: float
    data_seconds: float
    egress_cost: float
    compute_cost: float
    wait_seconds: float
    cost_int: int
    """unit_cost in integer units times TIE_UNITS, plus a tie-break derived from the ids."""


@dataclass(slots=True)
class Columns:
    """A class's usable columns as arrays, sorted by (cost_int, pool id, model)."""

    pool: IntArray
    model: IntArray
    """Index into ``Table.models``; -1 for CPU-only classes."""
    ub: IntArray
    unit: FloatArray
    terms: FloatArray
    """Rows: data_bytes, data_seconds, egress_cost, compute_cost, wait_seconds."""
    cost_int: IntArray

    def __len__(self) -> int:
        return len(self.pool)


@dataclass(slots=True)
class Table:
    problem: PlacementProblem
    pools: list[Pool]
    """Sorted by id: the order in which the model is built."""
    classes: list[DemandClass]
    """Sorted by id."""
    columns: list[Columns]
    eligible_full: list[int]
    """Per class, how many (pool, model) pairs it may ever use, free or not."""
    reward: list[int]
    """Per class, the integer reward for placing one member."""
    models: list[str]
    need: list[tuple[int, int, int]]
    """Per class: (milli-CPUs, MiB, GPUs)."""
    free: list[tuple[int, int, dict[str, int]]]
    """Per pool: free (milli-CPUs, MiB, GPUs by model)."""
    node: list[tuple[int, int, dict[str, int]] | None]
    """Per pool: the instance shape of elastic pools, None for the others."""
    instance_cost: list[float]
    instance_cost_int: list[int]
    scale: float
    """Integer units per currency unit (before TIE_UNITS)."""
    instance_hours: list[float] = field(default_factory=list)
    """Per pool: the hours one launched instance is billed for its tasks (elastic pools)."""
    memo: dict[str, object] = field(default_factory=dict)
    """What is derived from the table once and read often (``solution.packing_cuts``)."""
    _index: dict[int, dict[int, int] | tuple[IntArray, IntArray]] = field(default_factory=dict)
    _model_index: dict[str, int] = field(default_factory=dict)

    def option(self, ci: int, k: int) -> Option:
        c = self.columns[ci]
        mi = int(c.model[k])
        t = c.terms[:, k]
        return Option(
            cls=ci,
            pool=int(c.pool[k]),
            model=self.models[mi] if mi >= 0 else "",
            ub=int(c.ub[k]),
            unit_cost=float(c.unit[k]),
            data_bytes=float(t[0]),
            data_seconds=float(t[1]),
            egress_cost=float(t[2]),
            compute_cost=float(t[3]),
            wait_seconds=float(t[4]),
            cost_int=int(c.cost_int[k]),
        )

    def options(self, ci: int) -> list[Option]:
        return [self.option(ci, k) for k in range(len(self.columns[ci]))]

    def column(self, ci: int, pool: int, model: str) -> int | None:
        """The index within class ``ci``'s columns of (pool, model), or None."""
        if not self._model_index:
            self._model_index.update({m: i for i, m in enumerate(self.models)})
        mi = self._model_index.get(model, -2) if model else -1
        if mi == -2:
            return None
        key = pool * (len(self.models) + 1) + mi + 1
        index = self._index.get(ci)
        if index is None:
            c = self.columns[ci]
            keys = c.pool * (len(self.models) + 1) + c.model + 1
            if len(keys) <= 256:  # a dict is cheaper to build and to ask, when small
                index = dict(zip(keys.tolist(), range(len(keys)), strict=True))
            else:
                order = np.argsort(keys, kind="stable")
                index = (keys[order], order)
            self._index[ci] = index
        if isinstance(index, dict):
            return index.get(key)
        keys, order = index
        i = int(np.searchsorted(keys, key))
        if i < len(keys) and int(keys[i]) == key:
            return int(order[i])
        return None

    def find(self, ci: int, pool: int, model: str) -> Option | None:
        k = self.column(ci, pool, model)
        return None if k is None else self.option(ci, k)

    def cost_of(self, ci: int, pool: int, model: str) -> int | None:
        """The integer cost of one member in that column, or None if there is no such column."""
        k = self.column(ci, pool, model)
        return None if k is None else int(self.columns[ci].cost_int[k])


def _mix(hc: np.uint64, hp: npt.NDArray[np.uint64], hm: int) -> IntArray:
    """A tie-break in [0, TIE_UNITS) from the ids of class, pool and model: not separable into
    a class part plus a pool part, so swapping two classes' pools changes it."""
    # uint64 array arithmetic wraps silently, which is what the mix wants
    h = (hp ^ hc) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(hm)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return (h % np.uint64(TIE_UNITS)).astype(np.int64)


def _site_costs(
    problem: PlacementProblem, cls: DemandClass, sites: list[str]
) -> list[tuple[float, float, float] | None]:
    """Per site: (bytes, seconds, egress) to bring the class's inputs there, None if no route."""
    data = {d.id: d for d in problem.datasets}
    links = {(lk.src, lk.dst): lk for lk in problem.links}
    w = problem.weights
    out: list[tuple[float, float, float] | None] = []
    for site in sites:
        total_b = total_s = total_e = 0.0
        ok = True
        for did in cls.datasets:
            d = data.get(did)
            if d is None or not d.sites or site in d.sites:
                continue  # no known replica (treated as everywhere), or already here
            best: tuple[float, float, float, float] | None = None
            for src in sorted(d.sites):
                lk = links.get((src, site))
                if lk is None:
                    continue
                secs = d.size / lk.bandwidth
                egress = d.size / 1e9 * lk.egress_per_gb
                score = secs / 3600 * w.hour_value + egress
                if best is None or score < best[3]:
                    best = (float(d.size), secs, egress, score)
            if best is None:
                ok = False
                break
            total_b += best[0]
            total_s += best[1]
            total_e += best[2]
        out.append((total_b, total_s, total_e) if ok else None)
    return out


def _rules(problem: PlacementProblem, cls: DemandClass) -> list[tuple[str, frozenset[str]]]:
    data = {d.id: d for d in problem.datasets}
    names = set(cls.residency)
    for did in cls.datasets:
        d = data.get(did)
        if d is not None and d.residency is not None:
            names.add(d.residency)
    return [(n, frozenset(problem.residency.get(n, ()))) for n in sorted(names)]


def _levels(classes: list[DemandClass]) -> dict[int, int]:
    return {p: i for i, p in enumerate(sorted({c.priority for c in classes}))}


def _raw_vector(
    problem: PlacementProblem,
    pools: list[Pool],
    classes: list[DemandClass],
    models: list[str],
    sites: list[str],
) -> tuple[list[Raw], list[int], list[tuple[int, int, int]]]:
    """Every class's columns, computed over all pools at once (numpy)."""
    npool = len(pools)
    midx = {m: i for i, m in enumerate(models)}
    site_of = np.array([sites.index(p.site) for p in pools], dtype=np.int64)
    pool_idx = {p.id: j for j, p in enumerate(pools)}
    f_cpu = np.array([cpu_free(p.cpus) for p in pools], dtype=np.int64)
    f_mem = np.array([mem_free(p.memory) for p in pools], dtype=np.int64)
    f_gpu = np.zeros((len(models), npool), dtype=np.int64)
    n_cpu = np.zeros(npool, dtype=np.int64)
    n_mem = np.zeros(npool, dtype=np.int64)
    n_gpu = np.zeros((len(models), npool), dtype=np.int64)
    has_node = np.array([p.node is not None for p in pools], dtype=bool)
    for j, p in enumerate(pools):
        for m, k in p.gpus.items():
            f_gpu[midx[m], j] = max(0, k)
        if p.node is not None:
            n_cpu[j] = cpu_free(p.node.cpus)
            n_mem[j] = mem_free(p.node.memory)
            for m, k in p.node.gpus.items():
                n_gpu[midx[m], j] = k
    max_inst = np.array([p.max_instances if p.elastic else 0 for p in pools], dtype=np.int64)
    big = _BIG
    quota = np.array(
        [p.max_tasks if p.max_tasks is not None else big for p in pools], dtype=np.int64
    )
    # an elastic pool bills whole instances (``build``), not its tasks
    price = np.array([0.0 if p.elastic else p.price_per_hour for p in pools])
    rate = np.array([p.interruption_rate if p.spot else 0.0 for p in pools])
    wait_s = np.array([p.expected_wait_s for p in pools])
    hw = np.array([p.hardware_class for p in pools], dtype=object)
    place_names = sorted({x for p in pools for x in (p.site, p.region) if x})
    at_place = {
        x: np.array([x in (p.site, p.region) for p in pools], dtype=bool) for x in place_names
    }
    nowhere = np.zeros(npool, dtype=bool)
    any_taints = any(p.taints for p in pools)

    def anywhere(names: Iterable[str]) -> npt.NDArray[np.bool_]:
        out = nowhere.copy()
        for x in names:
            out |= at_place.get(x, nowhere)
        return out

    w = problem.weights
    raw: list[tuple[IntArray, IntArray, IntArray, FloatArray, FloatArray]] = []
    eligible_full: list[int] = []
    need: list[tuple[int, int, int]] = []
    grouped = any(p.node_groups for p in pools)
    for cls in classes:
        c_cpu, c_mem, c_gpu = cpu_need(cls.cpus), mem_need(cls.memory), cls.gpus
        need.append((c_cpu, c_mem, c_gpu))
        n_need = node_need(cls)
        u_cpu, u_mem, u_gpu = n_need  # what one node holds of it
        check_spans = grouped or cls.nodes > 1
        mask = quota > 0
        if cls.allowed_pools is not None:
            on = np.zeros(npool, dtype=bool)
            on[[pool_idx[x] for x in cls.allowed_pools if x in pool_idx]] = True
            mask &= on
        if cls.forbid_pools:
            mask[[pool_idx[x] for x in cls.forbid_pools if x in pool_idx]] = False
        if cls.require_sites:
            mask &= anywhere(cls.require_sites)
        if cls.forbid_sites:
            mask &= ~anywhere(cls.forbid_sites)
        for _, allowed_sites in _rules(problem, cls):
            mask &= anywhere(allowed_sites)
        if cls.hardware_class is not None:
            mask &= hw == cls.hardware_class
        if any_taints:
            mask &= np.array([tolerates(cls, p) for p in pools], dtype=bool)
        mask &= ~has_node | ((n_cpu >= u_cpu) & (n_mem >= u_mem))
        site_cost = _site_costs(problem, cls, sites)
        reach = np.array([sc is not None for sc in site_cost], dtype=bool)
        mask &= reach[site_of]
        per_site = np.array([sc if sc else (0.0, 0.0, 0.0) for sc in site_cost]).reshape(-1, 3)
        d_b, d_s, d_e = (per_site[:, k][site_of] for k in range(3))
        hours = cls.runtime_s / 3600.0
        spot = 1.0 + rate * hours / 2.0
        wait_cost = w.wait * wait_s / 3600.0 * w.hour_value
        data_cost = w.data * (d_s / 3600.0 * w.hour_value + d_e)
        cpu_fit = f_cpu // c_cpu if c_cpu else np.full(npool, big)
        mem_fit = f_mem // c_mem if c_mem else np.full(npool, big)
        ncpu_fit = n_cpu // u_cpu if u_cpu else np.full(npool, big)
        nmem_fit = n_mem // u_mem if u_mem else np.full(npool, big)
        share_cpu = np.where(n_cpu > 0, u_cpu / np.maximum(n_cpu, 1), 1.0)
        share_mem = np.where(n_mem > 0, u_mem / np.maximum(n_mem, 1), 1.0)
        n = len(cls.members)
        full = 0
        variants: list[tuple[int, npt.NDArray[np.bool_], IntArray, IntArray, FloatArray]] = []
        if c_gpu:
            wanted = cls.gpu_types or tuple(models)
            for m in sorted(set(wanted)):
                if m not in midx:
                    continue
                k = midx[m]
                ok = mask & ((f_gpu[k] >= c_gpu) | ((max_inst > 0) & (n_gpu[k] >= u_gpu)))
                ok &= ~has_node | (n_gpu[k] >= u_gpu)
                if check_spans:
                    ok &= np.array([spans(p, cls, n_need, m) for p in pools], dtype=bool)
                warm = np.minimum(np.minimum(cpu_fit, mem_fit), f_gpu[k] // c_gpu)
                per = np.minimum(np.minimum(ncpu_fit, nmem_fit), n_gpu[k] // u_gpu)
                share_gpu = np.where(n_gpu[k] > 0, u_gpu / np.maximum(n_gpu[k], 1), 1.0)
                share = np.maximum(np.maximum(share_cpu, share_mem), share_gpu)
                variants.append((k, ok, warm, per, share))
        else:
            warm = np.minimum(cpu_fit, mem_fit)
            per = np.minimum(ncpu_fit, nmem_fit)
            ok = mask
            if check_spans:
                ok = mask & np.array([spans(p, cls, n_need, "") for p in pools], dtype=bool)
            variants.append((-1, ok, warm, per, np.maximum(share_cpu, share_mem)))
        parts: list[tuple[IntArray, IntArray, IntArray, FloatArray, FloatArray]] = []
        by_gpu = dict(cls.runtime_by_gpu)
        for k, ok, warm, per, share in variants:
            # a gang holds its part of each of its nodes
            share = np.where(has_node, np.minimum(share, 1.0), 1.0) * cls.nodes
            if k >= 0 and models[k] in by_gpu:
                h = by_gpu[models[k]] / 3600.0
                compute = h * price * share * (1.0 + rate * h / 2.0)
            else:
                compute = hours * price * share * spot
            unit = data_cost + w.cost * compute + wait_cost
            ub = np.minimum(np.minimum(warm + max_inst * per, quota), n)
            full += int(ok.sum())
            js = np.nonzero(ok & (ub > 0))[0]
            terms = np.vstack([d_b[js], d_s[js], d_e[js], compute[js], wait_s[js]])
            parts.append((js, np.full(len(js), k, dtype=np.int64), ub[js], unit[js], terms))
        if parts:
            raw.append(
                (
                    np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]),
                    np.concatenate([p[2] for p in parts]),
                    np.concatenate([p[3] for p in parts]),
                    np.hstack([p[4] for p in parts]),
                )
            )
        else:
            empty = np.zeros(0, dtype=np.int64)
            raw.append((empty, empty, empty, np.zeros(0), np.zeros((5, 0))))
        eligible_full.append(full)

    return raw, eligible_full, need


def _raw_small(
    problem: PlacementProblem,
    pools: list[Pool],
    classes: list[DemandClass],
    models: list[str],
    sites: list[str],
) -> tuple[list[Raw], list[int], list[tuple[int, int, int]]]:
    """The same columns as ``_raw_vector``, one (class, pool) at a time in plain Python, in the
    same order and with the same floating-point operations, so the results are identical."""
    midx = {m: i for i, m in enumerate(models)}
    w = problem.weights
    info = []
    for p in pools:
        node = p.node
        info.append(
            (
                cpu_free(p.cpus),
                mem_free(p.memory),
                {m: max(0, k) for m, k in p.gpus.items()},
                node is not None,
                cpu_free(node.cpus) if node else 0,
                mem_free(node.memory) if node else 0,
                dict(node.gpus) if node else {},
                p.max_instances if p.elastic else 0,
                p.max_tasks if p.max_tasks is not None else _BIG,
                {p.site, p.region} - {""},
                sites.index(p.site),
            )
        )
    raw: list[Raw] = []
    eligible_full: list[int] = []
    need: list[tuple[int, int, int]] = []
    for cls in classes:
        c_cpu, c_mem, c_gpu = cpu_need(cls.cpus), mem_need(cls.memory), cls.gpus
        need.append((c_cpu, c_mem, c_gpu))
        n_need = node_need(cls)
        u_cpu, u_mem, u_gpu = n_need  # what one node holds of it
        allowed = None if cls.allowed_pools is None else set(cls.allowed_pools)
        forbid = set(cls.forbid_pools)
        require, forbid_sites = set(cls.require_sites), set(cls.forbid_sites)
        rules = [set(a) for _, a in _rules(problem, cls)]
        site_cost = _site_costs(problem, cls, sites)
        hours = cls.runtime_s / 3600.0
        by_gpu = dict(cls.runtime_by_gpu)
        n = len(cls.members)
        gpu_models = sorted(set(cls.gpu_types or models))
        wanted = [m for m in gpu_models if m in midx] if c_gpu else [""]
        full = 0
        rows: list[tuple[int, int, int, float, tuple[float, ...]]] = []
        for m in wanted:
            k = midx[m] if m else -1
            for j, p in enumerate(pools):
                f_cpu, f_mem, f_gpu, has_node, n_cpu, n_mem, n_gpu, max_inst, quota, place, si = (
                    info[j]
                )
                if quota <= 0 or (allowed is not None and p.id not in allowed):
                    continue
                if p.id in forbid or (require and not place & require):
                    continue
                if place & forbid_sites or any(not place & a for a in rules):
                    continue
                if cls.hardware_class is not None and p.hardware_class != cls.hardware_class:
                    continue
                if p.taints and not tolerates(cls, p):
                    continue
                if has_node and (n_cpu < u_cpu or n_mem < u_mem):
                    continue
                sc = site_cost[si]
                if sc is None:
                    continue
                if (p.node_groups or cls.nodes > 1) and not spans(p, cls, n_need, m):
                    continue
                cpu_fit = f_cpu // c_cpu if c_cpu else _BIG
                mem_fit = f_mem // c_mem if c_mem else _BIG
                ncpu_fit = n_cpu // u_cpu if u_cpu else _BIG
                nmem_fit = n_mem // u_mem if u_mem else _BIG
                share = max(
                    u_cpu / max(n_cpu, 1) if n_cpu > 0 else 1.0,
                    u_mem / max(n_mem, 1) if n_mem > 0 else 1.0,
                )
                if c_gpu:
                    fg, ng = f_gpu.get(m, 0), n_gpu.get(m, 0)
                    if not (fg >= c_gpu or (max_inst > 0 and ng >= u_gpu)):
                        continue
                    if has_node and ng < u_gpu:
                        continue
                    warm = min(cpu_fit, mem_fit, fg // c_gpu)
                    per = min(ncpu_fit, nmem_fit, ng // u_gpu)
                    share = max(share, u_gpu / max(ng, 1) if ng > 0 else 1.0)
                else:
                    warm = min(cpu_fit, mem_fit)
                    per = min(ncpu_fit, nmem_fit)
                full += 1
                share = (min(share, 1.0) if has_node else 1.0) * cls.nodes
                price = 0.0 if p.elastic else p.price_per_hour
                rate = p.interruption_rate if p.spot else 0.0
                if m and m in by_gpu:
                    h = by_gpu[m] / 3600.0
                    compute = h * price * share * (1.0 + rate * h / 2.0)
                else:
                    compute = hours * price * share * (1.0 + rate * hours / 2.0)
                d_b, d_s, d_e = sc
                data_cost = w.data * (d_s / 3600.0 * w.hour_value + d_e)
                wait_cost = w.wait * p.expected_wait_s / 3600.0 * w.hour_value
                unit = data_cost + w.cost * compute + wait_cost
                ub = min(warm + max_inst * per, quota, n)
                if ub > 0:
                    rows.append((j, k, ub, unit, (d_b, d_s, d_e, compute, p.expected_wait_s)))
        eligible_full.append(full)
        raw.append(
            (
                np.array([r[0] for r in rows], dtype=np.int64),
                np.array([r[1] for r in rows], dtype=np.int64),
                np.array([r[2] for r in rows], dtype=np.int64),
                np.array([r[3] for r in rows], dtype=np.float64),
                np.array([r[4] for r in rows], dtype=np.float64).reshape(-1, 5).T,
            )
        )
    return raw, eligible_full, need


SMALL_POOLS = 16
"""Up to this many pools the table is built with plain Python numbers: numpy's per-call cost
dominates tiny problems (one pool, one class: 400 us vectorized, a tenth of that in Python).
Both builders give identical tables; a property test holds them to it."""

Raw = tuple[IntArray, IntArray, IntArray, FloatArray, FloatArray]
"""One class's columns before sorting: pool, model, ub, unit cost, terms (5 rows)."""


def build(problem: PlacementProblem) -> Table:
    """The option table of a validated problem (see ``problem.validate``)."""
    pools = sorted(problem.pools, key=lambda p: p.id)
    classes = sorted(problem.classes, key=lambda c: c.id)
    npool = len(pools)
    models = sorted(
        {m for p in pools for m in p.gpus}
        | {m for p in pools if p.node is not None for m in p.node.gpus}
    )
    sites = sorted({p.site for p in pools})
    pool_hash = np.array([zlib.crc32(p.id.encode()) for p in pools], dtype=np.uint64)
    model_hash = [zlib.crc32(m.encode()) for m in models]
    columns_of = _raw_small if npool <= SMALL_POOLS else _raw_vector
    raw, eligible_full, need = columns_of(problem, pools, classes, models, sites)
    w = problem.weights
    if any(p.max_instances > 0 and p.node is not None for p in pools):  # elastic
        inst_hours = _instance_hours(pools, classes, models, raw)
        inst_cost = [
            w.cost * instance_dollars(p, h) + w.wait * w.hour_value * p.boot_s / 3600.0
            if p.elastic
            else 0.0
            for p, h in zip(pools, inst_hours, strict=True)
        ]
    else:
        inst_hours, inst_cost = [0.0] * npool, [0.0] * npool
    top = max([float(r[3].max()) for r in raw if len(r[3])] + inst_cost + [0.0])
    scale = PRICE_UNITS / top if top > 0 else 1.0
    columns: list[Columns] = []
    with_gpus: npt.NDArray[np.bool_] | None = None
    for ci, (js, ks, ub, unit, terms) in enumerate(raw):
        hc = np.uint64(zlib.crc32(classes[ci].id.encode()))
        hm = np.array([model_hash[k] if k >= 0 else 0 for k in ks.tolist()], dtype=np.uint64)
        tie = _mix(hc, pool_hash[js] ^ hm, 0)
        if not need[ci][2]:
            # at equal cost, a task that asks for no GPU takes a pool without GPUs first,
            # leaving GPUs to the tasks that need them; the hash orders within each half
            if with_gpus is None:
                with_gpus = np.array(
                    [bool(p.gpus) or (p.node is not None and bool(p.node.gpus)) for p in pools],
                    dtype=bool,
                )
            tie = (tie % (TIE_UNITS // 2)) + (TIE_UNITS // 2) * with_gpus[js]
        cost_int = np.rint(unit * scale).astype(np.int64) * TIE_UNITS + tie
        order = np.lexsort((ks, js, cost_int))
        columns.append(
            Columns(
                pool=js[order],
                model=ks[order],
                ub=ub[order],
                unit=unit[order],
                terms=terms[:, order],
                cost_int=cost_int[order],
            )
        )

    levels = _levels(classes)
    # a member placed must outweigh every cost the whole placement could incur, so the count
    # of placed members (weighted by priority) comes first and cost only decides among equals
    tasks = sum(len(c.members) for c in classes)
    instances = sum(p.max_instances if p.elastic else 0 for p in pools)
    unit_reward = (tasks + instances + 1) * (PRICE_UNITS + 1) * TIE_UNITS
    reward = [
        round(unit_reward * (1.0 + w.priority * levels[c.priority])) + (len(classes) - i)
        for i, c in enumerate(classes)
    ]
    free = [
        (
            cpu_free(p.cpus),
            mem_free(p.memory),
            {m: p.gpus[m] for m in models if p.gpus.get(m, 0) > 0},
        )
        for p in pools
    ]
    nodes: list[tuple[int, int, dict[str, int]] | None] = [
        (
            cpu_free(p.node.cpus),
            mem_free(p.node.memory),
            {m: p.node.gpus[m] for m in models if p.node.gpus.get(m, 0)},
        )
        if p.elastic and p.node is not None
        else None
        for p in pools
    ]
    return Table(
        problem=problem,
        pools=pools,
        classes=classes,
        columns=columns,
        eligible_full=eligible_full,
        reward=reward,
        models=models,
        need=need,
        free=free,
        node=nodes,
        instance_cost=inst_cost,
        instance_cost_int=[round(c * scale) * TIE_UNITS for c in inst_cost],
        scale=scale,
        instance_hours=inst_hours,
    )


def instance_dollars(pool: Pool, hours: float) -> float:
    """What one instance of elastic ``pool`` costs: its boot, then ``hours`` of tasks, with
    the work a spot interruption makes it redo."""
    rate = pool.interruption_rate if pool.spot else 0.0
    return pool.price_per_hour * (pool.boot_s / 3600.0 + hours * (1.0 + rate * hours / 2.0))


def _instance_hours(
    pools: list[Pool], classes: list[DemandClass], models: list[str], raw: list[Raw]
) -> list[float]:
    """Per elastic pool, the hours one instance runs: the longest estimated runtime among the
    classes that may go there (0 for the other pools)."""
    hours = np.zeros(len(pools))
    for cls, (js, ks, *_) in zip(classes, raw, strict=True):
        if not len(js):
            continue
        by_gpu = dict(cls.runtime_by_gpu)
        secs = np.array(
            [by_gpu.get(models[k], cls.runtime_s) if k >= 0 else cls.runtime_s for k in ks]
            if by_gpu
            else np.full(len(js), cls.runtime_s)
        )
        np.maximum.at(hours, js, secs / 3600.0)
    return [float(h) if p.elastic else 0.0 for p, h in zip(pools, hours.tolist(), strict=True)]


# ---- the scalar reference: why a pool is out ----------------------------------------------


def tolerates(cls: DemandClass, pool: Pool) -> bool:
    """Whether ``cls`` tolerates every taint ``pool`` requires (the one definition)."""
    return not pool.taints or set(pool.taints) <= set(cls.tolerations)


def pool_reasons(problem: PlacementProblem, cls: DemandClass, pool: Pool) -> list[str]:
    """Every reason ``pool`` can never take a member of ``cls``; empty when it may.

    Capacity that is merely in use now is not a reason: that is "full", not "ineligible".
    """
    out: list[str] = []
    place = {pool.site, pool.region} - {""}
    if cls.allowed_pools is not None and pool.id not in cls.allowed_pools:
        out.append("not among the allowed pools")
    if pool.id in cls.forbid_pools:
        out.append("forbidden by the task")
    if cls.require_sites and not place & set(cls.require_sites):
        out.append(f"site {pool.site} is not among the required sites")
    if place & set(cls.forbid_sites):
        out.append(f"site {pool.site} is forbidden")
    for name, allowed in _rules(problem, cls):
        if not place & allowed:
            out.append(f"site {pool.site} is not allowed by residency rule {name}")
    if cls.hardware_class is not None and pool.hardware_class != cls.hardware_class:
        out.append(f"hardware class {pool.hardware_class or '?'} is not the pinned one")
    if pool.max_tasks == 0:
        out.append("its quota is 0")
    untolerated = sorted(set(pool.taints) - set(cls.tolerations))
    if untolerated:
        out.append(
            f"its nodes are tainted {', '.join(untolerated)} (to use it, add the keys to the "
            "task's placement.tolerations)"
        )
    n_need = node_need(cls)
    u_cpu, u_mem, u_gpu = n_need
    too_big = pool.node is not None and (
        cpu_free(pool.node.cpus) < u_cpu or mem_free(pool.node.memory) < u_mem
    )
    if too_big and pool.node is not None:
        cpus = plural(float(pool.node.cpus), "CPU")
        out.append(f"its nodes have {cpus} and {pool.node.memory / 2**30:.3g} GiB")
    usable = [""]
    if cls.gpus:
        wanted = cls.gpu_types or tuple(
            sorted(set(pool.gpus) | set(pool.node.gpus if pool.node else {}))
        )
        usable = []
        for m in wanted:
            have = pool.gpus.get(m, 0) >= cls.gpus or (
                pool.elastic and pool.node is not None and pool.node.gpus.get(m, 0) >= u_gpu
            )
            per_node = pool.node is None or pool.node.gpus.get(m, 0) >= u_gpu
            if have and per_node:
                usable.append(m)
        if not usable:
            out.append(f"no {cls.gpus} x {'/'.join(cls.gpu_types) or 'GPU'} there")
    if cls.nodes > 1 and not pool.node_groups:
        out.append(f"its runs do not span nodes (the task asks for nodes = {cls.nodes})")
    elif (
        (pool.node_groups or cls.nodes > 1)
        and usable
        and not too_big
        and not any(spans(pool, cls, n_need, m) for m in usable)
    ):
        out.append(_span_reason(pool, cls, n_need))
    site_cost = _site_costs(problem, cls, [pool.site])[0]
    if site_cost is None:
        out.append(f"an input cannot reach site {pool.site} (no network link)")
    return out


def _span_reason(pool: Pool, cls: Demand, need: tuple[int, int, int]) -> str:
    """Why ``pool``'s nodes cannot hold ``cls`` (``spans`` says no): no one node holds what a
    node must, or too few do for a gang."""
    u_cpu, u_mem, u_gpu = need
    what = f"{plural(u_cpu / 1000, 'CPU')}, {u_mem * MIB / 2**30:.3g} GiB"
    if u_gpu:
        what += f" and {u_gpu} x {'/'.join(cls.gpu_types) or 'GPU'}"
    models = cls.gpu_types or sorted({m for g in pool.node_groups for m in g.shape.gpus})
    held = holding(pool, need, models)
    if cls.nodes <= 1 or held == 0:
        return f"no node of it has {what} together"
    verb = "has" if held == 1 else "have"
    return f"{plural(held, 'node')} of it {verb} {what}: the task spans {cls.nodes}"


def lower_bound(table: Table) -> int:
    """A bound no placement can beat: every class at its cheapest option, capacity shared by
    nobody, as many members placed as that class alone could place."""
    total = 0
    for ci, cols in enumerate(table.columns):
        if not len(cols):
            continue
        n = len(table.classes[ci].members)
        reachable = min(n, int(cols.ub.sum()))
        total += reachable * (int(cols.cost_int[0]) - table.reward[ci])
    return total
