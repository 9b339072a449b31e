"""Placement: deciding which pool runs which task.

``solve(problem, *, budget, seed)`` is the one entry point: a pure function. It validates the
problem (bad input raises a ``SpecError`` naming the field before any solving), builds the
option table (``table``), places greedily (``greedy``), and returns at once when greedy meets
the capacity-free lower bound, which proves it optimal. Otherwise the linear relaxation
(``lp``: GLOP, whole or by column generation) gives a valid bound and a rounded start that
greedy completes. The CP-SAT count model (``cpsat``, whose docstring carries the model) then
improves on the better start within a deterministic-time budget: the whole model when it is
small enough, else the neighbourhood the relaxation points at, and only when that could gain
more than ``RINS_MIN_GAIN``. The relaxation and CP-SAT count an elastic pool's capacity over
its instances together (with packing cuts, which are necessary, not sufficient), so their
answers are repacked by greedy instance by instance before they are kept: a solution's
instances always hold what it puts on them. If CP-SAT finds nothing, the best start is
returned as GREEDY_FALLBACK. ``explain`` says where a task went and what the alternatives would
have cost, or why it cannot go anywhere.
"""

from __future__ import annotations

import math

from stowplan.placement.problem import (
    Assignment,
    Dataset,
    Demand,
    DemandClass,
    Link,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
    Shape,
    TaskDemand,
    Weights,
    expand,
    group,
    validate,
)

__all__ = [
    "Assignment",
    "Dataset",
    "Demand",
    "DemandClass",
    "Link",
    "PlacementProblem",
    "PlacementSolution",
    "PlacementStatus",
    "Pool",
    "Shape",
    "TaskDemand",
    "Weights",
    "expand",
    "group",
    "solve",
    "validate",
]

DEFAULT_BUDGET = 0.1
"""Deterministic seconds of CP-SAT search (an abstract work unit, not wall time)."""


RINS_MIN_GAIN = 1e-3
"""A large placement is searched by CP-SAT (``cpsat.neighbourhood``) only when the relaxation
over the columns it would see leaves more than this share of the objective to gain. At 10^5
tasks x 10^3 pools that search took 0.5 to 1 s and gained 0.002%."""


def lp_rounds(budget: float | None) -> int:
    """Rounds of column generation a large relaxation gets: one per default budget spent."""
    return max(1, math.ceil((DEFAULT_BUDGET if budget is None else budget) / DEFAULT_BUDGET))


def solve(
    problem: PlacementProblem,
    *,
    budget: float | None = None,
    seed: int = 0,
    workers: int = 1,
    source: str = "placement problem",
) -> PlacementSolution:
    """Place as many tasks as free capacity allows, at the least weighted cost.

    Same problem, budget, seed and workers: the same solution, byte for byte (compare
    ``PlacementSolution.fingerprint()``). When the status is OPTIMAL the answer does not depend
    on ``workers`` either: the tie-break makes the optimum unique.
    """
    from stowplan.placement.greedy import place_greedy
    from stowplan.placement.problem import PlacementStatus as S
    from stowplan.placement.solution import assemble, objective_int, violations
    from stowplan.placement.table import build, lower_bound

    validate(problem, source=source)
    table = build(problem)
    counts, launched = place_greedy(table)
    best = objective_int(table, counts, launched)
    bound = lower_bound(table)
    values = None
    lp_value: float | None = None
    if best > bound:
        from stowplan.placement.lp import relax  # SciPy's HiGHS, imported only when needed

        lp = relax(table, counts, rounds=lp_rounds(budget))
        if lp is not None:
            bound = max(bound, lp.bound)
            values = lp.values
            lp_value = lp.objective
            r_counts, r_launched = place_greedy(table, lp.counts, lp.launched)
            if not violations(table, r_counts, r_launched):
                r_obj = objective_int(table, r_counts, r_launched)
                if r_obj < best:
                    counts, launched, best = r_counts, r_launched, r_obj

    def done(status: S, dtime: float = 0.0) -> PlacementSolution:
        return assemble(
            table,
            counts,
            launched,
            status=status,
            bound=min(bound, best),
            deterministic_time=dtime,
            objective=best,
        )

    if best <= bound:
        return done(S.OPTIMAL)
    # CP-SAT (0.3 s to import: ortools brings pandas) only for what the greedy left open
    from stowplan.placement.cpsat import neighbourhood, solve_cpsat

    free = neighbourhood(table, counts, values)
    if free is not None and lp_value is not None and best - lp_value <= RINS_MIN_GAIN * abs(best):
        # the neighbourhood lies within the relaxation's columns, whose optimum is lp_value:
        # searching it cannot gain enough to pay for itself
        return done(S.FEASIBLE)
    res = solve_cpsat(
        table,
        counts,
        launched,
        free=free,
        budget=DEFAULT_BUDGET if budget is None else budget,
        seed=seed,
        workers=workers,
    )
    if res.status not in ("OPTIMAL", "FEASIBLE"):
        return done(S.GREEDY_FALLBACK, res.deterministic_time)
    if not res.restricted:
        bound = max(bound, res.bound)
    r_counts, r_launched, r_obj = res.counts, res.launched, res.objective
    if r_obj < best and any(node is not None for node in table.node):
        # the model counts an elastic pool's capacity in total (its packing cuts are necessary,
        # not sufficient): greedy repacks the answer instance by instance, adding instances or
        # moving what does not fit, and drops instances left empty
        r_counts, r_launched = place_greedy(table, r_counts, r_launched)
        r_obj = objective_int(table, r_counts, r_launched)
    if r_obj < best and not violations(table, r_counts, r_launched):
        counts, launched, best = r_counts, r_launched, r_obj
    return done(S.OPTIMAL if best <= bound else S.FEASIBLE, res.deterministic_time)
