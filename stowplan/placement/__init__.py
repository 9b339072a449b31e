"""Placement: deciding which pool runs which task.

``solve(problem, *, budget, seed)`` is the one entry point. Today it is the greedy placer; the
CP-SAT engine will take its place behind the same call, with greedy kept as hint and fallback.
"""

from __future__ import annotations

from stowplan.placement.greedy import solve_greedy
from stowplan.placement.problem import (
    Assignment,
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
)

__all__ = [
    "Assignment",
    "DemandClass",
    "PlacementProblem",
    "PlacementSolution",
    "PlacementStatus",
    "Pool",
    "solve",
]


def solve(
    problem: PlacementProblem, *, budget: float | None = None, seed: int = 0
) -> PlacementSolution:
    """Place as many members of each demand class as free capacity allows.

    ``budget`` and ``seed`` are accepted for the solver that replaces this; greedy needs neither.
    """
    del budget, seed
    return solve_greedy(problem)
