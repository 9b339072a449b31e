"""The placement problem and its solution, as plain data.

Tasks with identical needs are grouped into demand classes before they reach a placer, so a
sweep of 10^5 trials is a handful of classes, not 10^5 rows. A solution assigns counts per
(class, pool); the scheduler core expands counts back to task ids in the class's own order.
"""

from __future__ import annotations

import enum

from msgspec import Struct, field


class Pool(Struct, frozen=True, kw_only=True):
    """Somewhere tasks can run: a local machine, a Slurm partition, a node pool, an instance type.

    Capacities are what is free for stowplan now; ``gpus`` maps GPU model to count.
    """

    id: str
    provider: str
    kind: str = "local"
    site: str = "local"
    cpus: float = 0.0
    memory: int = 0
    gpus: dict[str, int] = field(default_factory=dict)
    price_per_hour: float = 0.0
    expected_wait_s: float = 0.0
    hardware_class: str = ""


class DemandClass(Struct, frozen=True, kw_only=True):
    """Tasks that need the same thing and may go to the same pools, in dispatch order."""

    id: str
    cpus: float
    memory: int
    gpus: int = 0
    gpu_types: tuple[str, ...] = ()
    allowed_pools: tuple[str, ...] | None = None
    priority: int = 0
    members: list[str] = field(default_factory=list)


class PlacementProblem(Struct, frozen=True, kw_only=True):
    request_id: int
    pools: list[Pool]
    classes: list[DemandClass]


class PlacementStatus(enum.StrEnum):
    OPTIMAL = "OPTIMAL"
    FEASIBLE = "FEASIBLE"
    GREEDY = "GREEDY"
    GREEDY_FALLBACK = "GREEDY_FALLBACK"
    INFEASIBLE = "INFEASIBLE"


class Assignment(Struct, frozen=True, array_like=True):
    class_id: str
    pool_id: str
    count: int


class PlacementSolution(Struct, frozen=True, kw_only=True):
    request_id: int
    status: PlacementStatus
    assignments: list[Assignment]
    objective: float = 0.0
    bound: float = 0.0
    solve_seconds: float = 0.0
    unplaced: dict[str, str] = field(default_factory=dict)
    """class id -> why none (or not all) of its members could be placed now."""
