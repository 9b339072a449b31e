"""Turning counts per option into a ``PlacementSolution``: objective, terms, reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from stowplan.placement.problem import Assignment, PlacementSolution, PlacementStatus
from stowplan.placement.table import Option, Table, instance_dollars, pool_reasons
from stowplan.spec.units import plural

Counts = dict[tuple[int, int, str], int]


def _options(table: Table, counts: Counts) -> dict[tuple[int, int, str], Option]:
    out = {}
    for key in counts:
        o = table.find(*key)
        if o is None:
            raise KeyError(f"no column {key}")
        out[key] = o
    return out


def objective_int(table: Table, counts: Counts, launched: dict[int, int]) -> int:
    total = 0
    for key, n in counts.items():
        cost = table.cost_of(*key)
        if cost is None:
            raise KeyError(f"no column {key}")
        total += n * (cost - table.reward[key[0]])
    total += sum(k * table.instance_cost_int[j] for j, k in launched.items())
    return total


DFF_KS = (1, 2, 3)
"""The Fekete-Schepers dual feasible functions u_k whose packing cuts the count model carries."""


@dataclass(frozen=True, slots=True)
class PackingCut:
    """``sum coef[c] * x[c, pool, m] <= per_instance * n[pool]`` (over every model m, or only
    ``model`` for a GPU row): valid for every placement whose members of ``pool`` fit
    instance by instance, not only in total. ``coef`` is k * u_k(need) (see ``packing_cuts``)."""

    pool: int
    model: str | None
    """None: a CPU or memory row, over every model; else the GPU row of that model."""
    coef: dict[int, int]
    per_instance: int


def _dff(w: int, cap: int, k: int) -> int:
    """k * u_k(w) for a capacity ``cap``: u_k(w) = w when (k+1)w/cap is whole, else
    floor((k+1)w/cap) * cap/k (Fekete and Schepers, 2001). ``packing_cuts`` computes the
    same on arrays."""
    q = (k + 1) * w
    return k * w if q % cap == 0 else (q // cap) * cap


def packing_cuts(table: Table) -> list[PackingCut]:
    """Cuts that make the count model respect instance packing, not only pool totals.

    The count model adds up an elastic pool's capacity over its instances, so by itself it
    would place a 6-CPU and a 3-CPU member on two 8-CPU instances that already hold 6 CPUs
    each (15 <= 16). A dual feasible function u maps needs so that whatever fits one instance
    still fits after mapping (sum u(need) <= capacity), and u(6) = u(3) + ... grows the needs
    of members that cannot share: with k = 2, u(6) = 8 and u(3) = 4, so 20 > 16 is cut. The
    cuts are necessary, not sufficient, for packing; greedy (``place_greedy``) packs instance
    by instance. Only rows where the pool has no free capacity of its own are cut (capacity
    already free is fragmented in ways the problem does not say)."""
    memo = table.memo.get("packing_cuts")
    if memo is not None:
        return cast("list[PackingCut]", memo)
    out: list[PackingCut] = []
    table.memo["packing_cuts"] = out
    elastic = np.array([n is not None for n in table.node], dtype=bool)
    if not elastic.any():
        return out
    # every (pool, class) pair with a column in an elastic pool, by pool then class
    pairs = [
        (c.pool[elastic[c.pool]], np.full(int(elastic[c.pool].sum()), ci, dtype=np.int64))
        for ci, c in enumerate(table.columns)
    ]
    if not pairs:
        return out
    pool = np.concatenate([p for p, _ in pairs])
    cls = np.concatenate([c for _, c in pairs])
    if not len(pool):
        return out
    key = np.unique(pool.astype(np.int64) * len(table.classes) + cls)
    pool, cls = key // len(table.classes), key % len(table.classes)
    need = np.array(table.need, dtype=np.int64).reshape(-1, 3)[cls]
    starts = np.flatnonzero(np.r_[True, pool[1:] != pool[:-1]])
    ends = np.r_[starts[1:], len(pool)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        j = int(pool[a])
        node = table.node[j]
        assert node is not None
        free = table.free[j]
        dims: list[tuple[str | None, int, int, int]] = [
            (None, 0, node[0], free[0]),
            (None, 1, node[1], free[1]),
        ]
        dims += [(m, 2, g, free[2].get(m, 0)) for m, g in sorted(node[2].items())]
        for model, d, cap, have in dims:
            if have or cap <= 0:
                continue
            w = need[a:b, d]
            on = w > 0
            if not on.any():
                continue
            w, cs = np.minimum(w[on], cap), cls[a:b][on]
            for k in DFF_KS:
                q = (k + 1) * w
                coef = np.where(q % cap == 0, k * w, (q // cap) * cap)
                if (coef != k * need[a:b, d][on]).any():
                    out.append(
                        PackingCut(
                            j, model, dict(zip(cs.tolist(), coef.tolist(), strict=True)), k * cap
                        )
                    )
    return out


def violations(table: Table, counts: Counts, launched: dict[int, int]) -> list[str]:
    """Every capacity, quota, class-size or instance limit these counts break; empty if none."""
    out = []
    used: dict[int, list[int]] = {}
    gpu: dict[tuple[int, str], int] = {}
    tasks: dict[int, int] = {}
    per_class = [0] * len(table.classes)
    for (ci, j, model), n in counts.items():
        if n < 0:
            out.append(f"negative count for class {table.classes[ci].id} in {table.pools[j].id}")
        if table.column(ci, j, model) is None:
            out.append(f"class {table.classes[ci].id} may not use {table.pools[j].id}/{model}")
        c_cpu, c_mem, c_gpu = table.need[ci]
        u = used.setdefault(j, [0, 0])
        u[0] += n * c_cpu
        u[1] += n * c_mem
        if c_gpu:
            gpu[(j, model)] = gpu.get((j, model), 0) + n * c_gpu
        tasks[j] = tasks.get(j, 0) + n
        per_class[ci] += n
    for j, (cpu, mem) in sorted(used.items()):
        node = table.node[j]
        k = launched.get(j, 0)
        if k and (node is None or k > table.pools[j].max_instances):
            out.append(f"{table.pools[j].id}: {k} instances is over its limit")
        cap_cpu = table.free[j][0] + (k * node[0] if node else 0)
        cap_mem = table.free[j][1] + (k * node[1] if node else 0)
        if cpu > cap_cpu or mem > cap_mem:
            out.append(f"{table.pools[j].id}: CPUs or memory over capacity")
        quota = table.pools[j].max_tasks
        if quota is not None and tasks[j] > quota:
            out.append(f"{table.pools[j].id}: {tasks[j]} tasks over its quota of {quota}")
    for (j, model), g in sorted(gpu.items()):
        node = table.node[j]
        k = launched.get(j, 0)
        cap = table.free[j][2].get(model, 0) + (k * node[2].get(model, 0) if node else 0)
        if g > cap:
            out.append(f"{table.pools[j].id}: {g} x {model} over capacity {cap}")
    cuts = packing_cuts(table)
    at: dict[int, list[tuple[int, str, int]]] = {}
    for (ci, j, model), n in counts.items() if cuts else ():
        at.setdefault(j, []).append((ci, model, n))
    for cut in cuts:
        lhs = sum(
            n * cut.coef.get(ci, 0)
            for ci, model, n in at.get(cut.pool, ())
            if cut.model is None or model == cut.model
        )
        if lhs > cut.per_instance * launched.get(cut.pool, 0):
            out.append(f"{table.pools[cut.pool].id}: its members do not pack onto its instances")
    for ci, n in enumerate(per_class):
        if n > len(table.classes[ci].members):
            out.append(
                f"class {table.classes[ci].id}: {n} placed of {len(table.classes[ci].members)}"
            )
    return out


def gap(objective: int, bound: int) -> float:
    return max(0.0, (objective - bound) / max(1.0, abs(objective)))


def assemble(
    table: Table,
    counts: Counts,
    launched: dict[int, int],
    *,
    status: PlacementStatus,
    bound: int | None,
    deterministic_time: float = 0.0,
    objective: int | None = None,
) -> PlacementSolution:
    """The solution for these counts. ``bound`` None means "no proof": the bound is then the
    objective itself for greedy answers (reported as such, with gap 0 only when proven)."""
    opts = _options(table, counts)
    terms = {
        "placed": 0.0,
        "wanted": float(sum(len(c.members) for c in table.classes)),
        "data_bytes": 0.0,
        "data_seconds": 0.0,
        "egress_cost": 0.0,
        "compute_cost": 0.0,
        "wait_seconds": 0.0,
        "instances": float(sum(launched.values())),
        "cost": 0.0,
    }
    placed_per_class = [0] * len(table.classes)
    assignments = []
    unit_terms: list[dict[str, float]] = []
    for key in sorted(counts, key=lambda k: (k[0], table.pools[k[1]].id, k[2])):
        n = counts[key]
        if n <= 0:
            continue
        o = opts[key]
        placed_per_class[key[0]] += n
        terms["placed"] += n
        terms["data_bytes"] += n * o.data_bytes
        terms["data_seconds"] += n * o.data_seconds
        terms["egress_cost"] += n * o.egress_cost
        terms["compute_cost"] += n * o.compute_cost
        terms["wait_seconds"] += n * o.wait_seconds
        terms["cost"] += n * o.unit_cost
        assignments.append(Assignment(table.classes[key[0]].id, table.pools[key[1]].id, n, key[2]))
        unit_terms.append(
            {
                "cost": round(o.unit_cost, 9),
                "compute_cost": round(o.compute_cost, 9),
                "data_bytes": o.data_bytes,
                "data_seconds": round(o.data_seconds, 9),
                "egress_cost": round(o.egress_cost, 9),
                "wait_seconds": round(o.wait_seconds, 9),
            }
        )
    for j, k in launched.items():
        p = table.pools[j]
        terms["wait_seconds"] += k * p.boot_s
        terms["compute_cost"] += k * instance_dollars(p, table.instance_hours[j])
        terms["cost"] += k * table.instance_cost[j]
    obj = objective_int(table, counts, launched) if objective is None else objective
    proven = bound if bound is not None else obj
    unplaced = {}
    for ci, cls in enumerate(table.classes):
        if placed_per_class[ci] < len(cls.members):
            unplaced[cls.id] = why_unplaced(table, ci, placed_per_class[ci])
    return PlacementSolution(
        request_id=table.problem.request_id,
        status=status,
        assignments=assignments,
        instances={table.pools[j].id: k for j, k in sorted(launched.items()) if k},
        unit_terms=unit_terms,
        objective=float(obj),
        bound=float(proven),
        gap=round(gap(obj, proven), 9) if bound is not None else 0.0,
        terms={k: round(v, 9) for k, v in terms.items()},
        deterministic_time=round(deterministic_time, 6),
        unplaced=unplaced,
    )


def why_unplaced(table: Table, ci: int, placed: int) -> str:
    cls = table.classes[ci]
    need = f"{plural(float(cls.cpus), 'CPU')}, {cls.memory / 2**30:.3g} GiB"
    if cls.gpus:
        need += f", {cls.gpus} x {'/'.join(cls.gpu_types) or 'GPU'}"
    left = len(cls.members) - placed
    if table.eligible_full[ci] == 0:
        reasons: dict[str, int] = {}
        for p in table.pools:
            for r in pool_reasons(table.problem, cls, p):
                reasons[r] = reasons.get(r, 0) + 1
        top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        detail = "; ".join(f"{r} ({n} pool{'s' if n > 1 else ''})" for r, n in top)
        return f"no pool offers {need}" + (f": {detail}" if detail else ": there are no pools")
    usable = sorted({table.pools[j].id for j in table.columns[ci].pool.tolist()})
    if not usable:
        return f"{left} waiting: every pool that can run {need} is full now"
    shown = ", ".join(usable[:5]) + (f" and {len(usable) - 5} more" if len(usable) > 5 else "")
    return f"{left} waiting: no free capacity left for {need} in {shown}"
