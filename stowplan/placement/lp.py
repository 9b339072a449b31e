"""The linear relaxation of the count model: a valid bound and a warm start.

The same rows as the CP-SAT model (``cpsat``), with counts and instances allowed to be
fractional, solved by HiGHS' dual simplex (deterministic, single-threaded) through scipy. Its
optimum bounds every integer placement from below, so the gap reported against it is real.
Rounding its counts down keeps every capacity row satisfied (all coefficients are non-negative
on the task side); rounding instances up only adds capacity. ``greedy.place_greedy`` then fills
what rounding left, and the better of that and pure greedy is CP-SAT's hint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from stowplan.placement.greedy import Counts
from stowplan.placement.table import Table

MAX_COLUMNS = 40_000
"""Beyond this many columns the relaxation is skipped (it would take seconds on a laptop)."""


@dataclass(frozen=True, slots=True)
class Relaxation:
    bound: int
    """ceil of the LP optimum, in the integer units of the objective."""
    counts: Counts
    launched: dict[int, int]
    support: set[tuple[int, int, str]]
    """Columns with a positive fractional count."""


def relax(table: Table) -> Relaxation | None:
    sizes = [len(c) for c in table.columns]
    k_total = sum(sizes)
    if k_total == 0 or k_total > MAX_COLUMNS:
        return None
    npool, nmodel, ncls = len(table.pools), len(table.models), len(table.classes)
    cls = np.concatenate([np.full(n, ci, dtype=np.int64) for ci, n in enumerate(sizes)])
    pool = np.concatenate([c.pool for c in table.columns])
    model = np.concatenate([c.model for c in table.columns])
    ub = np.concatenate([c.ub for c in table.columns]).astype(float)
    cost = np.concatenate(
        [c.cost_int - table.reward[ci] for ci, c in enumerate(table.columns)]
    ).astype(float)
    need = np.array(table.need, dtype=float).reshape(-1, 3)
    elastic = [j for j in range(npool) if table.node[j] is not None]
    quota_pools = [j for j in range(npool) if table.pools[j].max_tasks is not None]

    cols = np.arange(k_total)
    rows = [pool, npool + pool, (2 + nmodel) * npool + cls]
    idx = [cols, cols, cols]
    vals = [need[cls, 0], need[cls, 1], np.ones(k_total)]
    g = model >= 0
    rows.append(2 * npool + model[g] * npool + pool[g])
    idx.append(cols[g])
    vals.append(need[cls[g], 2])
    quota_row = {j: (2 + nmodel) * npool + ncls + i for i, j in enumerate(quota_pools)}
    if quota_pools:
        q = np.isin(pool, quota_pools)
        rows.append(np.array([quota_row[j] for j in pool[q].tolist()], dtype=np.int64))
        idx.append(cols[q])
        vals.append(np.ones(int(q.sum())))
    nrow = (2 + nmodel) * npool + ncls + len(quota_pools)
    b = np.zeros(nrow)
    for j in range(npool):
        cpu, mem, gpus = table.free[j]
        b[j], b[npool + j] = cpu, mem
        for m, v in gpus.items():
            b[2 * npool + table.models.index(m) * npool + j] = v
    for ci, klass in enumerate(table.classes):
        b[(2 + nmodel) * npool + ci] = len(klass.members)
    for j in quota_pools:
        b[quota_row[j]] = table.pools[j].max_tasks or 0
    for i, j in enumerate(elastic):
        node = table.node[j]
        assert node is not None
        r = [j, npool + j] + [2 * npool + table.models.index(m) * npool + j for m in node[2]]
        rows.append(np.array(r, dtype=np.int64))
        idx.append(np.full(len(r), k_total + i, dtype=np.int64))
        vals.append(-np.array([node[0], node[1], *node[2].values()], dtype=float))
    a = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(idx))),
        shape=(nrow, k_total + len(elastic)),
    )
    obj = np.concatenate([cost, [float(table.instance_cost_int[j]) for j in elastic]])
    upper = np.concatenate([ub, [float(table.pools[j].max_instances) for j in elastic]])
    bounds = np.vstack([np.zeros(len(obj)), upper]).T
    res = linprog(obj, A_ub=a, b_ub=b, bounds=bounds, method="highs-ds")
    if res.status != 0:
        return None
    x = res.x
    counts: Counts = {}
    support: set[tuple[int, int, str]] = set()
    for k in np.nonzero(x[:k_total] > 1e-7)[0].tolist():
        mi = int(model[k])
        key = (int(cls[k]), int(pool[k]), table.models[mi] if mi >= 0 else "")
        support.add(key)
        n = math.floor(x[k] + 1e-7)
        if n:
            counts[key] = n
    launched = {
        j: math.ceil(x[k_total + i] - 1e-7) for i, j in enumerate(elastic) if x[k_total + i] > 1e-7
    }
    # a tolerance on the LP side must never make the bound claim too much
    bound = math.ceil(res.fun - max(1.0, 1e-9 * abs(res.fun)))
    return Relaxation(bound=bound, counts=counts, launched=launched, support=support)
