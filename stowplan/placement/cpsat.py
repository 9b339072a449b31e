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

and, per elastic pool and per dimension where it has no free capacity, the packing cuts of
``solution.packing_cuts`` (sum_c,m x[c,p,m] * k*u_k(need[c]) <= n[p] * k*node[p], for k = 1..3):
the rows above add up capacity over a pool's instances, and the cuts keep members that cannot
share one instance from being counted into the gaps between them.

Objective (integers; see ``table`` for the cost of one member):

    minimize  sum x[c,p,m] * (cost[c,p,m] - reward[c])  +  sum n[p] * instance_cost[p]

An elastic pool bills whole instances: ``instance_cost`` is an instance's price for its boot and
its tasks' runtime, and its columns carry no compute cost of their own (see ``table``).

``reward[c]`` exceeds any member's cost, so a member is left queued only when no capacity is
left for it; higher priority earns a larger reward. Each cost carries a small tie-break derived
from the ids, so equal-cost answers are told apart the same way every time.

Determinism: the search is interleaved (``interleave_search``) with a fixed number of workers
and stops on a deterministic-time budget, never on wall time. The greedy answer is the hint.

Size: when the full model would exceed ``MAX_COLUMNS``, CP-SAT searches the neighbourhood the
linear relaxation points at (RINS: relaxation-induced neighbourhood search). The classes whose
relaxed counts are fractional, or differ from the hint, keep their hint's columns, the
relaxation's and their ``CHEAPEST``; every other class stays exactly where the hint put it,
its usage taken off the capacity the model sees. Classes enter in order of fractional mass
until ``MAX_COLUMNS`` is reached. The proof of optimality then comes only from the relaxation's
bound (``lp``), which covers every column.
"""

from __future__ import annotations

from dataclasses import dataclass

from ortools.sat.python import cp_model

from stowplan.placement.greedy import Counts
from stowplan.placement.solution import objective_int, packing_cuts
from stowplan.placement.table import Table

MAX_COLUMNS = 6_000
CHEAPEST = 3


@dataclass(frozen=True, slots=True)
class CpResult:
    status: str
    counts: Counts
    launched: dict[int, int]
    objective: int
    """Of the whole placement, fixed part included."""
    bound: int
    """CP-SAT's bound on the model it saw: a bound on the problem only when not restricted."""
    restricted: bool
    deterministic_time: float


def neighbourhood(
    table: Table, hint: Counts, values: dict[tuple[int, int, str], float] | None
) -> list[list[int]] | None:
    """Per class, the column indices CP-SAT may change; None for the whole model. Classes with
    an empty list stay at the hint."""
    total = sum(len(c) for c in table.columns)
    if total <= MAX_COLUMNS:
        return None
    values = values or {}
    mass = [0.0] * len(table.classes)
    for (ci, _, _), v in values.items():
        mass[ci] += abs(v - round(v))
    floor = {k: int(v + 1e-7) for k, v in values.items() if int(v + 1e-7)}
    for key in set(hint) | set(floor):
        if hint.get(key, 0) != floor.get(key, 0):
            mass[key[0]] += 1e-3
    wanted: dict[int, set[tuple[int, str]]] = {}
    for ci, j, model in [*hint, *values]:
        wanted.setdefault(ci, set()).add((j, model))
    free: list[list[int]] = [[] for _ in table.classes]
    size = 0
    for ci in sorted(range(len(mass)), key=lambda c: (-mass[c], c)):
        if mass[ci] <= 0:
            break
        ks = set(range(min(CHEAPEST, len(table.columns[ci]))))
        for j, model in wanted.get(ci, ()):
            k = table.column(ci, j, model)
            if k is not None:
                ks.add(k)
        if size + len(ks) > MAX_COLUMNS:
            break
        free[ci] = sorted(ks)
        size += len(ks)
    return free


def solve_cpsat(
    table: Table,
    hint: Counts,
    hint_launched: dict[int, int],
    *,
    free: list[list[int]] | None = None,
    budget: float,
    seed: int,
    workers: int,
) -> CpResult:
    """Improve on ``hint``. With ``free`` (see ``neighbourhood``) only those columns may change;
    every other count and every elastic pool none of them touches stays at the hint."""
    if free is None:
        cols = [o for ci in range(len(table.columns)) for o in table.options(ci)]
    else:
        cols = [table.option(ci, k) for ci, ks in enumerate(free) for k in ks]
    in_model = {(o.cls, o.pool, o.model) for o in cols}
    fixed = {k: n for k, n in hint.items() if k not in in_model and n}
    # what the fixed counts already use, per pool and per class
    used_cpu: dict[int, int] = {}
    used_mem: dict[int, int] = {}
    used_gpu: dict[tuple[int, str], int] = {}
    used_tasks: dict[int, int] = {}
    used_cls: dict[int, int] = {}
    for (ci, j, model), count in fixed.items():
        c_cpu, c_mem, c_gpu = table.need[ci]
        used_cpu[j] = used_cpu.get(j, 0) + count * c_cpu
        used_mem[j] = used_mem.get(j, 0) + count * c_mem
        if c_gpu:
            used_gpu[(j, model)] = used_gpu.get((j, model), 0) + count * c_gpu
        used_tasks[j] = used_tasks.get(j, 0) + count
        used_cls[ci] = used_cls.get(ci, 0) + count

    fixed_models: dict[int, set[str]] = {}
    for j, model in used_gpu:
        fixed_models.setdefault(j, set()).add(model)
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
            (
                [k for k in ks if table.need[cols[k].cls][0]],
                [],
                cpu - used_cpu.get(j, 0),
                node[0] if node else 0,
            ),
            (
                [k for k in ks if table.need[cols[k].cls][1]],
                [],
                mem - used_mem.get(j, 0),
                node[1] if node else 0,
            ),
        ]
        rows[0][1].extend(table.need[cols[k].cls][0] for k in rows[0][0])
        rows[1][1].extend(table.need[cols[k].cls][1] for k in rows[1][0])
        # every model this pool's fixed counts use too: the instances they need must stay
        models = {cols[k].model for k in ks if cols[k].model} | fixed_models.get(j, set())
        for model in sorted(models):
            gk = [k for k in ks if cols[k].model == model and table.need[cols[k].cls][2]]
            rows.append(
                (
                    gk,
                    [table.need[cols[k].cls][2] for k in gk],
                    gpus.get(model, 0) - used_gpu.get((j, model), 0),
                    node[2].get(model, 0) if node else 0,
                )
            )
        for vk, coef, cap, per in rows:
            if not vk:
                if cap < 0 and n is not None and per:
                    m.add(per * n >= -cap)  # instances the fixed counts need
                continue
            if cap >= 0 and sum(c * cols[k].ub for k, c in zip(vk, coef, strict=True)) <= cap:
                continue  # can never bind
            lhs = cp_model.LinearExpr.weighted_sum([xs[k] for k in vk], coef)
            if n is not None and per:
                m.add(lhs <= cap + per * n)
            else:
                m.add(lhs <= cap)
        quota = table.pools[j].max_tasks
        if quota is not None:
            left = quota - used_tasks.get(j, 0)
            if sum(cols[k].ub for k in ks) > left:
                m.add(cp_model.LinearExpr.sum([xs[k] for k in ks]) <= left)
    fixed_at: dict[int, list[tuple[int, str, int]]] = {}
    for (ci, j, model), count in fixed.items():
        fixed_at.setdefault(j, []).append((ci, model, count))
    for cut in packing_cuts(table):
        n = ns.get(cut.pool)
        if n is None:
            continue  # every count there is fixed, and so are its instances
        ks = [
            k
            for k in by_pool.get(cut.pool, ())
            if cols[k].cls in cut.coef and (cut.model is None or cols[k].model == cut.model)
        ]
        held = sum(
            count * cut.coef.get(ci, 0)
            for ci, model, count in fixed_at.get(cut.pool, ())
            if cut.model is None or model == cut.model
        )
        lhs = cp_model.LinearExpr.weighted_sum(
            [xs[k] for k in ks], [cut.coef[cols[k].cls] for k in ks]
        )
        m.add(lhs + held <= cut.per_instance * n)
    for ci in sorted(by_class):
        ks = by_class[ci]
        size = len(table.classes[ci].members) - used_cls.get(ci, 0)
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

    restricted = free is not None
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = workers
    p.interleave_search = True
    p.max_deterministic_time = budget
    p.random_seed = seed
    p.log_search_progress = False
    status = solver.solve(m)
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpResult(name, {}, {}, 0, 0, restricted, solver.deterministic_time)
    counts: Counts = dict(fixed)
    for k, o in enumerate(cols):
        v = int(solver.value(xs[k]))
        if v:
            counts[(o.cls, o.pool, o.model)] = v
    launched = {j: n for j, n in hint_launched.items() if j not in ns and n}
    launched.update({j: int(solver.value(ns[j])) for j in elastic if solver.value(ns[j])})
    return CpResult(
        name,
        counts,
        launched,
        objective_int(table, counts, launched),
        int(solver.best_objective_bound),
        restricted,
        solver.deterministic_time,
    )
