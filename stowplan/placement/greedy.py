"""The greedy placer: a fast, deterministic baseline, the CP-SAT engine's hint and its fallback.

Classes are taken by priority, then in the order given (the scheduler core orders them by fair
share). Each class fills its options cheapest first (see ``table``), placing as many members
as the pool's remaining CPUs, memory, GPUs of that model and quota allow, and launching
instances in elastic pools when free capacity runs out. Pure: it never mutates its input.

``eligible``, ``fits`` and ``why_not`` are the scalar checks the scheduler core uses before it
builds a problem.
"""

from __future__ import annotations

import math

import numpy as np

from stowplan.placement.problem import (
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
)
from stowplan.placement.table import Table, build, pool_reasons
from stowplan.spec.units import plural

_EMPTY = PlacementProblem(pools=[], classes=[])

Counts = dict[tuple[int, int, str], int]
"""(class index, pool index, GPU model) -> members placed."""

_UNLIMITED = int(np.iinfo(np.int64).max) // 4


def eligible(cls: DemandClass, pool: Pool, problem: PlacementProblem | None = None) -> bool:
    """Whether ``pool`` could ever run a member of ``cls`` (free capacity aside)."""
    return not pool_reasons(problem or _EMPTY, cls, pool)


def fits(cls: DemandClass, cpus: float, memory: int, gpus: dict[str, int]) -> int:
    """How many members of ``cls`` fit in the given free capacity."""
    n = math.floor(cpus / cls.cpus + 1e-9) if cls.cpus > 0 else len(cls.members)
    if cls.memory > 0:
        n = min(n, memory // cls.memory)
    if cls.gpus:
        models = cls.gpu_types or tuple(sorted(gpus))
        n = min(n, max((gpus.get(m, 0) // cls.gpus for m in models), default=0))
    return max(0, n)


def why_not(cls: DemandClass, pools: list[Pool], problem: PlacementProblem | None = None) -> str:
    need = f"{plural(float(cls.cpus), 'CPU')}, {cls.memory / 2**30:.3g} GiB"
    if cls.gpus:
        need += f", {cls.gpus} x GPU {'/'.join(cls.gpu_types) or 'any'}"
    usable = [p for p in pools if eligible(cls, p, problem)]
    if not usable:
        return f"no allowed pool offers {need}" + _first_reason(cls, pools, problem)
    return f"no free capacity now for {need} in " + ", ".join(sorted(p.id for p in usable))


def _first_reason(cls: DemandClass, pools: list[Pool], problem: PlacementProblem | None) -> str:
    reasons: dict[str, int] = {}
    for p in pools:
        for r in pool_reasons(problem or _EMPTY, cls, p):
            reasons[r] = reasons.get(r, 0) + 1
    if not reasons:
        return ""
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    return " (" + "; ".join(f"{plural(n, 'pool')}: {r}" for r, n in top) + ")"


def place_greedy(
    table: Table, start: Counts | None = None, start_launched: dict[int, int] | None = None
) -> tuple[Counts, dict[int, int]]:
    """Counts per option and instances launched per elastic pool.

    With ``start`` (a feasible partial placement, such as a rounded relaxation), only what it
    left unplaced is placed, in the capacity it left free.
    """
    npool, models = len(table.pools), table.models
    midx = {m: i for i, m in enumerate(models)}
    cpu = np.array([f[0] for f in table.free], dtype=np.int64)
    mem = np.array([f[1] for f in table.free], dtype=np.int64)
    gpu = np.zeros((max(1, len(models)), npool), dtype=np.int64)
    for j, f in enumerate(table.free):
        for m, g in f[2].items():
            gpu[midx[m], j] = g
    unlimited = _UNLIMITED
    quota = np.array(
        [p.max_tasks if p.max_tasks is not None else unlimited for p in table.pools],
        dtype=np.int64,
    )
    room = np.array(
        [p.max_instances if table.node[j] is not None else 0 for j, p in enumerate(table.pools)],
        dtype=np.int64,
    )
    launched: dict[int, int] = {}
    counts: Counts = {}
    placed = [0] * len(table.classes)

    def launch(j: int, k: int) -> None:
        node = table.node[j]
        assert node is not None
        cpu[j] += k * node[0]
        mem[j] += k * node[1]
        for m, g in node[2].items():
            gpu[midx[m], j] += k * g
        room[j] -= k
        launched[j] = launched.get(j, 0) + k

    def take(ci: int, j: int, mi: int, n: int) -> None:
        c_cpu, c_mem, c_gpu = table.need[ci]
        cpu[j] -= n * c_cpu
        mem[j] -= n * c_mem
        if c_gpu:
            gpu[mi, j] -= n * c_gpu
        quota[j] -= n
        key = (ci, j, models[mi] if mi >= 0 else "")
        counts[key] = counts.get(key, 0) + n
        placed[ci] += n

    for j, k in sorted((start_launched or {}).items()):
        launch(j, k)
    for (ci, j, model), n in sorted((start or {}).items()):
        take(ci, j, midx[model] if model else -1, n)

    def fit(ci: int, j: int, mi: int, left: int) -> int:
        c_cpu, c_mem, c_gpu = table.need[ci]
        n = min(left, int(quota[j]))
        if c_cpu:
            n = min(n, int(cpu[j]) // c_cpu)
        if c_mem:
            n = min(n, int(mem[j]) // c_mem)
        if c_gpu:
            n = min(n, int(gpu[mi, j]) // c_gpu)
        return max(0, n)

    order = sorted(range(len(table.classes)), key=lambda i: (-table.classes[i].priority, i))
    for ci in order:
        left = len(table.classes[ci].members) - placed[ci]
        cols = table.columns[ci]
        if left <= 0 or not len(cols):
            continue
        c_cpu, c_mem, c_gpu = table.need[ci]
        # skip at once the columns with neither free room nor instances to launch
        warm = (cpu[cols.pool] >= c_cpu) & (mem[cols.pool] >= c_mem)
        if c_gpu:
            warm &= gpu[np.maximum(cols.model, 0), cols.pool] >= c_gpu
        alive = (quota[cols.pool] > 0) & ((room[cols.pool] > 0) | warm)
        for k in np.nonzero(alive)[0].tolist():
            if left == 0:
                break
            j, mi = int(cols.pool[k]), int(cols.model[k])
            n = fit(ci, j, mi, left)
            node = table.node[j]
            if n < left and node is not None and room[j] > 0:
                per = _per_instance(table, ci, node, models[mi] if mi >= 0 else "")
                if per > 0:
                    launch(j, min(int(room[j]), math.ceil((left - n) / per)))
                    n = fit(ci, j, mi, left)
            if n > 0:
                take(ci, j, mi, n)
                left -= n
    return {k: v for k, v in counts.items() if v}, {j: k for j, k in launched.items() if k}


def _per_instance(table: Table, ci: int, node: tuple[int, int, dict[str, int]], model: str) -> int:
    c_cpu, c_mem, c_gpu = table.need[ci]
    n = 1 << 62
    if c_cpu:
        n = min(n, node[0] // c_cpu)
    if c_mem:
        n = min(n, node[1] // c_mem)
    if c_gpu:
        n = min(n, node[2].get(model, 0) // c_gpu)
    return n


def solve_greedy(problem: PlacementProblem) -> PlacementSolution:
    from stowplan.placement.solution import assemble

    table = build(problem)
    counts, launched = place_greedy(table)
    return assemble(table, counts, launched, status=PlacementStatus.GREEDY, bound=None)
