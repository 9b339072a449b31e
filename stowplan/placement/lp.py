"""The linear relaxation of the count model: a valid bound and a warm start.

The same rows as the CP-SAT model (``cpsat``), packing cuts included, with counts and
instances allowed to be fractional, solved by GLOP's dual simplex (OR-Tools; deterministic,
single-threaded).

Small tables are relaxed whole. A large one (more than ``FULL_COLUMNS`` columns) is relaxed
over a subset: per class its ``START_CHEAPEST`` cheapest columns, per pool the
``START_PER_POOL`` classes it suits best (cheapest relative to each class's own best), and every
column the hint uses. Each further round (column generation, up to ``rounds``) adds, per class,
the ``ADD_PER_CLASS`` columns left out that price most negative under the last duals.

The bound never depends on the LP being solved exactly. For any row prices ``y >= 0`` on the
capacity, quota and packing-cut rows, keeping each class's own row ``sum_k x[c,k] <= |c|`` and
the column bounds,

    L(y) = -y.b + sum over classes c of  min { sum_k rc[k] x[k] : sum_k x[k] <= |c|, 0 <= x <= ub }
                + sum over elastic pools p of  max_inst[p] * min(0, rc[n_p])

(``rc`` the reduced cost ``cost + y.A`` over *every* column of the table, a fractional
knapsack per class) bounds every placement from below. It is evaluated with the duals of each
LP solved, and the best value is kept. When no column left out prices negative it equals the
relaxation's optimum.

Rounding the LP counts down keeps every capacity row satisfied (all coefficients are
non-negative on the task side); rounding instances up only adds capacity. ``greedy.place_greedy``
then fills what rounding left, and the better of that and pure greedy is CP-SAT's hint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from ortools.linear_solver.python import model_builder_helper as mbh

from stowplan.placement.greedy import Counts
from stowplan.placement.solution import PackingCut, packing_cuts
from stowplan.placement.table import Table

FULL_COLUMNS = 12_000
"""Up to this many columns the relaxation is solved whole, in one round."""
START_CHEAPEST = 60
START_PER_POOL = 5
ADD_PER_CLASS = 20
GLOP_PARAMETERS = "use_dual_simplex:true, solution_feasibility_tolerance:1e-3"
"""Dual simplex: much faster than primal here. The tolerance is absolute and the objective's
coefficients are around 1e9 (the reward for placing a member), so the default of 1e-6 reports
solved problems as imprecise; the bound does not rely on the LP's accuracy anyway (see above)."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Relaxation:
    bound: int
    """A valid lower bound on every placement, in the integer units of the objective."""
    counts: Counts
    """The LP counts rounded down."""
    launched: dict[int, int]
    """The LP instances rounded up."""
    values: dict[tuple[int, int, str], float]
    """Every column with a positive LP count, and that count."""
    objective: float
    """The optimum of the last LP solved, over its columns only: no placement within those
    columns does better."""
    rounds: int
    columns: int
    """Columns in the last LP solved."""


@dataclass(frozen=True, slots=True)
class _Rows:
    """Row layout: CPUs and memory per pool, GPUs per (model, pool), members per class, quotas."""

    npool: int
    nmodel: int
    ncls: int
    quota_row: IntArray
    """Per pool, its quota row, or -1."""
    elastic: list[int]
    cuts: list[PackingCut]
    """The packing cuts, in rows after the quotas."""

    @property
    def cut_base(self) -> int:
        return (2 + self.nmodel) * self.npool + self.ncls + int((self.quota_row >= 0).sum())

    @property
    def count(self) -> int:
        return self.cut_base + len(self.cuts)

    def mem(self, pool: IntArray) -> IntArray:
        return self.npool + pool

    def gpu(self, model: IntArray, pool: IntArray) -> IntArray:
        return 2 * self.npool + model * self.npool + pool

    def cls(self, cls: IntArray) -> IntArray:
        return (2 + self.nmodel) * self.npool + cls


def _layout(table: Table) -> _Rows:
    npool, nmodel, ncls = len(table.pools), len(table.models), len(table.classes)
    quota_row = np.full(npool, -1, dtype=np.int64)
    base = (2 + nmodel) * npool + ncls
    for i, j in enumerate(j for j in range(npool) if table.pools[j].max_tasks is not None):
        quota_row[j] = base + i
    elastic = [j for j in range(npool) if table.node[j] is not None]
    return _Rows(npool, nmodel, ncls, quota_row, elastic, packing_cuts(table))


def _rhs(table: Table, rows: _Rows) -> FloatArray:
    b = np.zeros(rows.count)
    midx = {m: i for i, m in enumerate(table.models)}
    for j in range(rows.npool):
        cpu, mem, gpus = table.free[j]
        b[j], b[rows.npool + j] = cpu, mem
        for m, v in gpus.items():
            b[2 * rows.npool + midx[m] * rows.npool + j] = v
    b[rows.cls(np.arange(rows.ncls))] = [len(c.members) for c in table.classes]
    for j in range(rows.npool):
        if rows.quota_row[j] >= 0:
            b[rows.quota_row[j]] = table.pools[j].max_tasks or 0
    return b


def _start(table: Table, hint: Counts) -> list[IntArray]:
    """The first restricted column set, per class (sorted column indices)."""
    used: dict[int, list[int]] = {}
    for ci, j, model in hint:
        k = table.column(ci, j, model)
        if k is not None:
            used.setdefault(ci, []).append(k)
    sizes = [len(c) for c in table.columns]
    cls_all = np.repeat(np.arange(len(sizes)), sizes)
    k_all = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, np.int64)
    pool_all = np.concatenate([c.pool for c in table.columns]) if sizes else k_all
    rel = (
        np.concatenate([c.cost_int - c.cost_int[0] for c in table.columns if len(c)])
        if any(sizes)
        else k_all
    )
    order = np.lexsort((k_all, cls_all, rel, pool_all))
    ps = pool_all[order]
    first = np.r_[0, np.nonzero(np.diff(ps))[0] + 1] if len(ps) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    pick = order[rank < START_PER_POOL]
    keep = []
    for ci, c in enumerate(table.columns):
        ks = [np.arange(min(START_CHEAPEST, len(c))), k_all[pick[cls_all[pick] == ci]]]
        if ci in used:
            ks.append(np.array(used[ci], dtype=np.int64))
        keep.append(np.unique(np.concatenate(ks)).astype(np.int64))
    return keep


def _matrix(
    table: Table, rows: _Rows, keep: list[IntArray]
) -> tuple[sp.csr_matrix, FloatArray, FloatArray, IntArray, IntArray, IntArray]:
    """A, cost and upper bound of the LP over ``keep`` (task columns, then one column per elastic
    pool), and the class, pool and model of each task column."""
    need = np.array(table.need, dtype=np.float64).reshape(-1, 3)
    cls = np.concatenate([np.full(len(ks), ci, dtype=np.int64) for ci, ks in enumerate(keep)])
    pool = np.concatenate([table.columns[ci].pool[ks] for ci, ks in enumerate(keep)])
    model = np.concatenate([table.columns[ci].model[ks] for ci, ks in enumerate(keep)])
    ub = np.concatenate([table.columns[ci].ub[ks] for ci, ks in enumerate(keep)])
    reward = np.array(table.reward, dtype=np.int64)
    cost = np.concatenate(
        [table.columns[ci].cost_int[ks] - reward[ci] for ci, ks in enumerate(keep)]
    )
    n = len(cls)
    cols = np.arange(n)
    r_idx = [pool, rows.mem(pool), rows.cls(cls)]
    c_idx = [cols, cols, cols]
    vals = [need[cls, 0], need[cls, 1], np.ones(n)]
    g = model >= 0
    r_idx.append(rows.gpu(model[g], pool[g]))
    c_idx.append(cols[g])
    vals.append(need[cls[g], 2])
    q = rows.quota_row[pool] >= 0
    r_idx.append(rows.quota_row[pool[q]])
    c_idx.append(cols[q])
    vals.append(np.ones(int(q.sum())))
    midx = {m: i for i, m in enumerate(table.models)}
    inst_col = {j: n + i for i, j in enumerate(rows.elastic)}
    for row, cut in enumerate(rows.cuts, start=rows.cut_base):
        on = pool == cut.pool
        if cut.model is not None:
            on &= model == midx[cut.model]
        ks = np.nonzero(on)[0]
        coef = np.array([cut.coef.get(int(c), 0) for c in cls[ks].tolist()], dtype=np.float64)
        r_idx += [np.full(len(ks) + 1, row, dtype=np.int64)]
        c_idx += [np.r_[ks, inst_col[cut.pool]].astype(np.int64)]
        vals += [np.r_[coef, -float(cut.per_instance)]]
    inst_cost, inst_ub = [], []
    for i, j in enumerate(rows.elastic):
        node = table.node[j]
        assert node is not None
        mi = np.array([midx[m] for m in node[2]], dtype=np.int64)
        r = np.concatenate([[j, rows.npool + j], rows.gpu(mi, np.full(len(mi), j))])
        r_idx.append(r.astype(np.int64))
        c_idx.append(np.full(len(r), n + i, dtype=np.int64))
        vals.append(-np.array([node[0], node[1], *node[2].values()], dtype=np.float64))
        inst_cost.append(float(table.instance_cost_int[j]))
        inst_ub.append(float(table.pools[j].max_instances))
    a = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))),
        shape=(rows.count, n + len(rows.elastic)),
    )
    a.eliminate_zeros()
    obj = np.concatenate([cost.astype(np.float64), inst_cost])
    upper = np.concatenate([ub.astype(np.float64), inst_ub])
    return a, obj, upper, cls, pool, model


def _glop(
    a: sp.csr_matrix, obj: FloatArray, upper: FloatArray, b: FloatArray
) -> tuple[FloatArray, FloatArray] | None:
    """Primal values and row duals (<= 0 on binding rows), or None."""
    model = mbh.ModelBuilderHelper()
    fill: Any = model.fill_model_from_sparse_data  # its stubs mistype numpy arrays
    fill(np.zeros(len(obj)), upper, obj, np.full(len(b), -np.inf), b, a)
    solver = mbh.ModelSolverHelper("glop")
    solver.set_solver_specific_parameters(GLOP_PARAMETERS)
    solver.solve(model)
    if solver.status() not in (mbh.SolveStatus.OPTIMAL, mbh.SolveStatus.FEASIBLE):
        return None
    if not solver.has_solution():
        return None
    x = np.asarray(solver.variable_values(), dtype=np.float64)
    y = np.asarray(solver.dual_values(), dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    return x, y


def _price(
    table: Table, rows: _Rows, b: FloatArray, y: FloatArray
) -> tuple[float, list[FloatArray]]:
    """L(y) (see the module docstring) and, per class, every column's reduced cost without the
    class row's price."""
    y = np.maximum(y, 0.0)
    class_rows = rows.cls(np.arange(rows.ncls))
    y_cap = y.copy()
    y_cap[class_rows] = 0.0
    bound = -float(y_cap @ b)
    need = np.array(table.need, dtype=np.float64).reshape(-1, 3)
    reduced: list[FloatArray] = []
    binding = [
        (cut, float(y_cap[r]))
        for r, cut in enumerate(rows.cuts, start=rows.cut_base)
        if y_cap[r] > 0
    ]
    midx = {m: i for i, m in enumerate(table.models)}
    for ci, c in enumerate(table.columns):
        rc = (c.cost_int - table.reward[ci]).astype(np.float64)
        rc += need[ci, 0] * y_cap[c.pool] + need[ci, 1] * y_cap[rows.mem(c.pool)]
        g = c.model >= 0
        if need[ci, 2]:
            rc[g] += need[ci, 2] * y_cap[rows.gpu(c.model[g], c.pool[g])]
        qr = rows.quota_row[c.pool]
        rc[qr >= 0] += y_cap[qr[qr >= 0]]
        for cut, price in binding:
            if ci in cut.coef:
                on = c.pool == cut.pool
                if cut.model is not None:
                    on &= c.model == midx[cut.model]
                rc[on] += cut.coef[ci] * price
        reduced.append(rc)
        neg = np.nonzero(rc < 0)[0]
        if len(neg):
            order = neg[np.argsort(rc[neg], kind="stable")]
            ub = c.ub[order].astype(np.float64)
            before = np.cumsum(ub) - ub
            take = np.clip(len(table.classes[ci].members) - before, 0.0, ub)
            bound += float(rc[order] @ take)
    for j in rows.elastic:
        node = table.node[j]
        assert node is not None
        rc_n = table.instance_cost_int[j] - node[0] * y_cap[j] - node[1] * y_cap[rows.npool + j]
        for m, v in node[2].items():
            rc_n -= v * y_cap[2 * rows.npool + midx[m] * rows.npool + j]
        for r, cut in enumerate(rows.cuts, start=rows.cut_base):
            if cut.pool == j and y_cap[r] > 0:
                rc_n -= cut.per_instance * y_cap[r]
        bound += min(0.0, rc_n) * table.pools[j].max_instances
    return bound, reduced


def relax(table: Table, hint: Counts, *, rounds: int = 1) -> Relaxation | None:
    """The relaxation, whole or restricted with up to ``rounds`` rounds of column generation.
    None when there is nothing to relax or GLOP does not answer."""
    sizes = [len(c) for c in table.columns]
    if sum(sizes) == 0:
        return None
    whole = sum(sizes) <= FULL_COLUMNS
    keep = [np.arange(n, dtype=np.int64) for n in sizes] if whole else _start(table, hint)
    rows = _layout(table)
    b = _rhs(table, rows)
    best = -math.inf
    lp_value = 0.0
    solved: tuple[FloatArray, IntArray, IntArray, IntArray, int] | None = None
    done = 0
    for _ in range(max(1, rounds)):
        a, obj, upper, cls, pool, model = _matrix(table, rows, keep)
        answer = _glop(a, obj, upper, b)
        if answer is None:
            break
        done += 1
        x, y = answer
        solved = (x, cls, pool, model, len(cls))
        lp_value = float(obj @ x)
        bound, reduced = _price(table, rows, b, -y)
        best = max(best, bound)
        if whole:
            break
        y_cls = np.maximum(-y[rows.cls(np.arange(rows.ncls))], 0.0)
        added = 0
        for ci, rc in enumerate(reduced):
            out = np.ones(len(rc), dtype=bool)
            out[keep[ci]] = False
            cand = np.nonzero(out & (rc + y_cls[ci] < 0))[0]
            if len(cand):
                pick = cand[np.argsort(rc[cand], kind="stable")[:ADD_PER_CLASS]]
                keep[ci] = np.union1d(keep[ci], pick)
                added += len(pick)
        if not added:
            break
    if solved is None:
        return None
    x, cls, pool, model, n = solved
    counts: Counts = {}
    values: dict[tuple[int, int, str], float] = {}
    for k in np.nonzero(x[:n] > 1e-7)[0].tolist():
        mi = int(model[k])
        key = (int(cls[k]), int(pool[k]), table.models[mi] if mi >= 0 else "")
        values[key] = float(x[k])
        whole_part = math.floor(x[k] + 1e-7)
        if whole_part:
            counts[key] = whole_part
    launched = {
        j: math.ceil(x[n + i] - 1e-7) for i, j in enumerate(rows.elastic) if x[n + i] > 1e-7
    }
    # float sums of numbers near 1e14: never let rounding make the bound claim too much
    bound = math.ceil(best - max(1.0, 1e-9 * abs(best)))
    return Relaxation(
        bound=bound,
        counts=counts,
        launched=launched,
        values=values,
        objective=lp_value,
        rounds=done,
        columns=n,
    )
