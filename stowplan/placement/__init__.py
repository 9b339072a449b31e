"""Placement: deciding which pool runs which task.

``solve(problem, *, budget, seed)`` is the one entry point: a pure function. It validates the
problem (bad input raises a ``SpecError`` naming the field before any solving), builds the
option table (``table``), places greedily (``greedy``), and returns at once when greedy meets
the capacity-free lower bound, which proves it optimal. Otherwise the CP-SAT count model
(``cpsat``, whose docstring carries the model) improves on the greedy hint within a
deterministic-time budget. If CP-SAT finds nothing, the greedy answer is returned as
GREEDY_FALLBACK. ``explain`` says where a task went and what the alternatives would have cost,
or why it cannot go anywhere.
"""

from __future__ import annotations

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
    import time

    from stowplan.placement.cpsat import solve_cpsat
    from stowplan.placement.greedy import place_greedy
    from stowplan.placement.lp import relax
    from stowplan.placement.problem import PlacementStatus as S
    from stowplan.placement.solution import assemble, objective_int, violations
    from stowplan.placement.table import build, lower_bound

    started = time.perf_counter()
    validate(problem, source=source)
    table = build(problem)
    counts, launched = place_greedy(table)
    best = objective_int(table, counts, launched)
    bound = lower_bound(table)
    support = None
    if best > bound:
        lp = relax(table)
        if lp is not None:
            bound = max(bound, lp.bound)
            support = lp.support
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
            solve_seconds=time.perf_counter() - started,
            deterministic_time=dtime,
        )

    if best <= bound:
        return done(S.OPTIMAL)
    res = solve_cpsat(
        table,
        counts,
        launched,
        support=support,
        budget=DEFAULT_BUDGET if budget is None else budget,
        seed=seed,
        workers=workers,
    )
    if res.status not in ("OPTIMAL", "FEASIBLE"):
        return done(S.GREEDY_FALLBACK, res.deterministic_time)
    if not res.restricted:
        bound = max(bound, res.bound)
    if res.objective < best:
        counts, launched, best = res.counts, res.launched, res.objective
    return done(S.OPTIMAL if best <= bound else S.FEASIBLE, res.deterministic_time)
