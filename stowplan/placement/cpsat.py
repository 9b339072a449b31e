"""The CP-SAT count model.

Variables (built in sorted order: classes as given, pools by id, GPU models by name):

    x[c,p,m] in 0..ub[c,p,m]   members of class c placed in pool p on GPU model m
    n[p]     in 0..max_inst[p] instances launched in elastic pool p

Constraints, per pool p and per class c:

    sum_c,m x[c,p,m] * cpu[c]  <= free_cpu[p] + n[p] * node_cpu[p]
    sum_c,m x[c,p,m] * mem[c]  <= free_mem[p] + n[p] * node_mem[p]
    sum_c   x[c,p,m] * gpu[c]  <= free_gpu[p,m] + n[p] * node_gpu[p,m]      for every model m
    sum_c,m x[c,p,m]           <= quota[p]
    sum_p,m x[c,p,m]           <= |c|

Objective (integers; see ``table`` for the cost of one member):

    minimize  sum x[c,p,m] * (cost[c,p,m] - reward[c])  +  sum n[p] * instance_cost[p]

``reward[c]`` exceeds any member's cost, so a member is left queued only when no capacity is
left for it; higher priority earns a larger reward. Each cost carries a small tie-break derived
from the ids, so equal-cost answers are told apart the same way every time.

Determinism: the search is interleaved (``interleave_search``) with a fixed number of workers
and stops on a deterministic-time budget, never on wall time. The greedy answer is the hint.

Size: when the full model would exceed ``MAX_COLUMNS``, a class is offered its ``CHEAPEST``
columns plus those its hint and the linear relaxation use. The proof of optimality then comes
only from the relaxation's bound (``lp``), which covers every column.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from stowplan.placement.greedy import Counts
from stowplan.placement.table import Option, Table

MAX_COLUMNS = 6_000
CHEAPEST = 3


@dataclass(frozen=True, slots=True)
class CpResult:
    status: str
    counts: Counts
    launched: dict[int, int]
    objective: int
    bound: int
    restricted: bool
    seconds: float
    deterministic_time: float


def columns(
    table: Table, hint: Counts, support: set[tuple[int, int, str]] | None = None
) -> tuple[list[Option], bool]:
    """The columns the model gets: all of them when few; otherwise, per class, the cheapest
    ``CHEAPEST`` plus every column the hint or the relaxation uses."""
    total = sum(len(c) for c in table.columns)
    if total <= MAX_COLUMNS:
        return [o for ci in range(len(table.columns)) for o in table.options(ci)], False
    wanted: dict[int, set[tuple[int, int]]] = {}
    models = {m: i for i, m in enumerate(table.models)}
    for ci, j, model in [*hint, *(support or ())]:
        wanted.setdefault(ci, set()).add((j, models[model] if model else -1))
    kept: list[Option] = []
    for ci, cols in enumerate(table.columns):
        ks = set(range(min(CHEAPEST, len(cols))))
        if ci in wanted:
            pairs = wanted[ci]
            for k, (j, m) in enumerate(zip(cols.pool.tolist(), cols.model.tolist(), strict=True)):
                if (j, m) in pairs:
                    ks.add(k)
        kept.extend(table.option(ci, k) for k in sorted(ks))
    return kept, len(kept) < total


def solve_cpsat(
    table: Table,
    hint: Counts,
    hint_launched: dict[int, int],
    *,
    support: set[tuple[int, int, str]] | None = None,
    budget: float,
    seed: int,
    workers: int,
) -> CpResult:
    cols, restricted = columns(table, hint, support)
    m = cp_model.CpModel()
    xs = [m.new_int_var(0, o.ub, "") for o in cols]
    elastic = sorted({o.pool for o in cols if table.node[o.pool] is not None})
    ns = {j: m.new_int_var(0, table.pools[j].max_instances, "") for j in elastic}

    by_pool: dict[int, list[int]] = {}
    by_class: dict[int, list[int]] = {}
    for k, o in enumerate(cols):
        by_pool.setdefault(o.pool, []).append(k)
        by_class.setdefault(o.cls, []).append(k)
    for j in sorted(by_pool):
        ks = by_pool[j]
        cpu, mem, gpus = table.free[j]
        node = table.node[j]
        n = ns.get(j)
        rows: list[tuple[list[int], list[int], int, int]] = [
            ([k for k in ks if table.need[cols[k].cls][0]], [], cpu, node[0] if node else 0),
            ([k for k in ks if table.need[cols[k].cls][1]], [], mem, node[1] if node else 0),
        ]
        rows[0][1].extend(table.need[cols[k].cls][0] for k in rows[0][0])
        rows[1][1].extend(table.need[cols[k].cls][1] for k in rows[1][0])
        for model in sorted({cols[k].model for k in ks if cols[k].model}):
            gk = [k for k in ks if cols[k].model == model and table.need[cols[k].cls][2]]
            rows.append(
                (
                    gk,
                    [table.need[cols[k].cls][2] for k in gk],
                    gpus.get(model, 0),
                    node[2].get(model, 0) if node else 0,
                )
            )
        for vk, coef, cap, per in rows:
            if not vk:
                continue
            if sum(c * cols[k].ub for k, c in zip(vk, coef, strict=True)) <= cap:
                continue  # can never bind
            lhs = cp_model.LinearExpr.weighted_sum([xs[k] for k in vk], coef)
            if n is not None and per:
                m.add(lhs <= cap + per * n)
            else:
                m.add(lhs <= cap)
        quota = table.pools[j].max_tasks
        if quota is not None and sum(cols[k].ub for k in ks) > quota:
            m.add(cp_model.LinearExpr.sum([xs[k] for k in ks]) <= quota)
    for ci in sorted(by_class):
        ks = by_class[ci]
        size = len(table.classes[ci].members)
        if sum(cols[k].ub for k in ks) > size:
            m.add(cp_model.LinearExpr.sum([xs[k] for k in ks]) <= size)

    obj_vars = list(xs) + [ns[j] for j in elastic]
    obj_coef = [o.cost_int - table.reward[o.cls] for o in cols] + [
        table.instance_cost_int[j] for j in elastic
    ]
    m.minimize(cp_model.LinearExpr.weighted_sum(obj_vars, obj_coef))
    for k, o in enumerate(cols):
        m.add_hint(xs[k], hint.get((o.cls, o.pool, o.model), 0))
    for j in elastic:
        m.add_hint(ns[j], hint_launched.get(j, 0))

    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = workers
    p.interleave_search = True
    p.max_deterministic_time = budget
    p.random_seed = seed
    p.log_search_progress = False
    if restricted:
        # a restricted model cannot prove optimality anyway: spend the budget on the LP-guided
        # search, which improves large placements most (measured at 10^5 tasks x 10^3 pools)
        p.subsolvers.append("default_lp")
    started = time.perf_counter()
    status = solver.solve(m)
    seconds = time.perf_counter() - started
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpResult(name, {}, {}, 0, 0, restricted, seconds, solver.deterministic_time)
    counts: Counts = {}
    for k, o in enumerate(cols):
        v = int(solver.value(xs[k]))
        if v:
            counts[(o.cls, o.pool, o.model)] = v
    launched = {j: int(solver.value(ns[j])) for j in elastic if solver.value(ns[j])}
    return CpResult(
        name,
        counts,
        launched,
        int(solver.objective_value),
        int(solver.best_objective_bound),
        restricted,
        seconds,
        solver.deterministic_time,
    )
