"""The greedy placer: a fast, deterministic baseline and the fallback of the CP-SAT engine.

Classes are taken in the order given (the scheduler core orders them by priority and fair
share). Each class fills the pools it may use, cheapest first (price, then expected wait, then
id), placing as many members as the pool's remaining CPUs, memory and GPUs allow. Pure: it
never mutates its input.
"""

from __future__ import annotations

import math

from stowplan.placement.problem import (
    Assignment,
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
)


def eligible(cls: DemandClass, pool: Pool) -> bool:
    if cls.allowed_pools is not None and pool.id not in cls.allowed_pools:
        return False
    if cls.gpus:
        models = cls.gpu_types or tuple(pool.gpus)
        if not any(pool.gpus.get(m, 0) >= cls.gpus for m in models):
            return False
    return True


def fits(cls: DemandClass, cpus: float, memory: int, gpus: dict[str, int]) -> int:
    """How many members of ``cls`` fit in the given free capacity."""
    n = math.floor(cpus / cls.cpus + 1e-9) if cls.cpus > 0 else len(cls.members)
    if cls.memory > 0:
        n = min(n, memory // cls.memory)
    if cls.gpus:
        models = cls.gpu_types or tuple(sorted(gpus))
        n = min(n, max((gpus.get(m, 0) // cls.gpus for m in models), default=0))
    return max(0, n)


def why_not(cls: DemandClass, pools: list[Pool]) -> str:
    need = f"{cls.cpus:g} CPUs, {cls.memory / 2**30:.3g} GiB"
    if cls.gpus:
        need += f", {cls.gpus} x GPU {'/'.join(cls.gpu_types) or 'any'}"
    usable = [p for p in pools if eligible(cls, p)]
    if not usable:
        return f"no allowed pool offers {need}"
    return f"no free capacity now for {need} in " + ", ".join(sorted(p.id for p in usable))


def solve_greedy(problem: PlacementProblem) -> PlacementSolution:
    pools = sorted(problem.pools, key=lambda p: (p.price_per_hour, p.expected_wait_s, p.id))
    free = {p.id: [p.cpus, p.memory, dict(p.gpus)] for p in pools}
    assignments: list[Assignment] = []
    unplaced: dict[str, str] = {}
    objective = 0.0
    for cls in problem.classes:
        left = len(cls.members)
        for pool in pools:
            if left == 0:
                break
            if not eligible(cls, pool):
                continue
            cpus, memory, gpus = free[pool.id]
            assert isinstance(cpus, float | int) and isinstance(memory, int)
            assert isinstance(gpus, dict)
            n = min(left, fits(cls, cpus, memory, gpus))
            if n <= 0:
                continue
            free[pool.id][0] = cpus - n * cls.cpus
            free[pool.id][1] = memory - n * cls.memory
            if cls.gpus:
                models = cls.gpu_types or tuple(sorted(gpus))
                model = max(models, key=lambda m: (gpus.get(m, 0), m))
                gpus[model] = gpus.get(model, 0) - n * cls.gpus
            assignments.append(Assignment(cls.id, pool.id, n))
            objective += n * (pool.price_per_hour + pool.expected_wait_s / 3600.0)
            left -= n
        if left:
            unplaced[cls.id] = why_not(cls, problem.pools)
    return PlacementSolution(
        request_id=problem.request_id,
        status=PlacementStatus.GREEDY,
        assignments=assignments,
        objective=objective,
        bound=0.0,
        unplaced=unplaced,
    )
