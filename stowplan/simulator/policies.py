"""Placement policies the simulator can compare: each is a placement function.

A policy takes the ``PlacementProblem`` the scheduler core asked for and returns a
``PlacementSolution``; the core expands it to tasks exactly as it does for the Ray shell.

- ``cpsat`` (default): ``stowplan.placement.solve``, the production engine.
- ``greedy``: ``stowplan.placement.greedy.solve_greedy``, cheapest pool first.
- ``fifo``: FIFO first fit, written here: classes in the core's order, each member to the
  first pool in the cluster file's order that has room; the first member that fits nowhere
  blocks everything behind it (head-of-line blocking, as in a plain FIFO queue).
- ``throughput``: heterogeneity-aware (as in Gavel): each (class, pool) pair is scored by the
  class's throughput on that pool's GPU model relative to its slowest model, and pairs are
  filled best score first; needs a throughput table, and is greedy without one.
- ``module:function``: any other placement function with the same signature.

``fifo`` and ``throughput`` launch instances in elastic pools (cloud instance types) when a
pool's free capacity runs out, as the production placers do: as many as the members left
need, up to the pool's ``max_instances``; the solution's ``instances`` says how many, and the
scheduler core provisions them.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from stowplan.errors import SpecError
from stowplan.placement.greedy import eligible, fits, solve_greedy, why_not
from stowplan.placement.problem import (
    Assignment,
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
)

RateOf = Callable[[str, str], float | None]
"""(first member's run id, GPU model) -> throughput of that class on that model, if known."""


class PolicyFn(Protocol):
    def __call__(
        self, problem: PlacementProblem, *, seed: int, pool_order: list[str], rate: RateOf | None
    ) -> PlacementSolution: ...


def _take(
    cls: DemandClass,
    pool: Pool,
    free: dict[str, list[object]],
    left: int,
    launched: Counter[str],
) -> int:
    """Place up to ``left`` members in ``pool``: in its free capacity, then, for an elastic
    pool, on instances launched for them (counted in ``launched``)."""
    n = _take_free(cls, pool, free, left)
    node = pool.node
    room = pool.max_instances - launched[pool.id]
    if n < left and node is not None and room > 0:
        per = fits(cls, node.cpus, node.memory, dict(node.gpus))
        if per > 0:
            k = min(room, math.ceil((left - n) / per))
            launched[pool.id] += k
            slot = free[pool.id]
            gpus = slot[2]
            assert isinstance(slot[0], float | int) and isinstance(slot[1], int)
            assert isinstance(gpus, dict)
            slot[0] = slot[0] + k * node.cpus
            slot[1] = slot[1] + k * node.memory
            for m, g in node.gpus.items():
                gpus[m] = gpus.get(m, 0) + k * g
            n += _take_free(cls, pool, free, left - n)
    return n


def _take_free(cls: DemandClass, pool: Pool, free: dict[str, list[object]], left: int) -> int:
    cpus, memory, gpus = free[pool.id]
    assert isinstance(cpus, float | int) and isinstance(memory, int) and isinstance(gpus, dict)
    n = min(left, fits(cls, float(cpus), memory, gpus))
    if n <= 0:
        return 0
    free[pool.id][0] = cpus - n * cls.cpus
    free[pool.id][1] = memory - n * cls.memory
    if cls.gpus:
        models = cls.gpu_types or tuple(sorted(gpus))
        model = max(models, key=lambda m: (gpus.get(m, 0), m))
        gpus[model] = gpus.get(model, 0) - n * cls.gpus
    return n


def _free(problem: PlacementProblem) -> dict[str, list[object]]:
    return {p.id: [p.cpus, p.memory, dict(p.gpus)] for p in problem.pools}


def fifo_first_fit(
    problem: PlacementProblem, *, seed: int, pool_order: list[str], rate: RateOf | None
) -> PlacementSolution:
    del seed, rate
    rank = {name: i for i, name in enumerate(pool_order)}
    pools = sorted(problem.pools, key=lambda p: (rank.get(p.id, len(rank)), p.id))
    free = _free(problem)
    launched: Counter[str] = Counter()
    out: list[Assignment] = []
    unplaced: dict[str, str] = {}
    blocked = False
    for cls in problem.classes:
        if blocked:
            unplaced[cls.id] = "behind a job that fits nowhere now (FIFO)"
            continue
        left = len(cls.members)
        for pool in pools:
            if left == 0:
                break
            if eligible(cls, pool):
                n = _take(cls, pool, free, left, launched)
                if n:
                    out.append(Assignment(cls.id, pool.id, n))
                    left -= n
        if left:
            unplaced[cls.id] = why_not(cls, problem.pools)
            blocked = True
    return PlacementSolution(
        request_id=problem.request_id,
        status=PlacementStatus.GREEDY,
        assignments=out,
        unplaced=unplaced,
        instances={p: k for p, k in sorted(launched.items()) if k},
    )


def throughput_aware(
    problem: PlacementProblem, *, seed: int, pool_order: list[str], rate: RateOf | None
) -> PlacementSolution:
    if rate is None:
        return greedy(problem, seed=seed, pool_order=pool_order, rate=rate)
    free = _free(problem)
    pairs: list[tuple[float, int, str, DemandClass, Pool]] = []
    for ci, cls in enumerate(problem.classes):
        if not cls.members:
            continue
        rates = {}
        for pool in problem.pools:
            model = pool.hardware_class or next(iter(pool.gpus), "")
            r = rate(cls.members[0], model)
            if r:
                rates[pool.id] = r
        if not rates:
            continue
        # relative to the slowest model anywhere, not just among pools free right now
        slowest = min(rates.values())
        for pool in problem.pools:
            if pool.id in rates and eligible(cls, pool):
                pairs.append((-rates[pool.id] / slowest, ci, pool.id, cls, pool))
    pairs.sort(key=lambda t: (t[0], t[1], t[2]))
    left = {c.id: len(c.members) for c in problem.classes}
    launched: Counter[str] = Counter()
    out: list[Assignment] = []
    # members of a class are taken in order, so one class's assignments stay in pair order
    for _, _, _, cls, pool in pairs:
        if left[cls.id] == 0:
            continue
        n = _take(cls, pool, free, left[cls.id], launched)
        if n:
            out.append(Assignment(cls.id, pool.id, n))
            left[cls.id] -= n
    unplaced = {cid: "no free capacity now" for cid, n in left.items() if n}
    return PlacementSolution(
        request_id=problem.request_id,
        status=PlacementStatus.GREEDY,
        assignments=out,
        unplaced=unplaced,
        instances={p: k for p, k in sorted(launched.items()) if k},
    )


def greedy(
    problem: PlacementProblem, *, seed: int, pool_order: list[str], rate: RateOf | None
) -> PlacementSolution:
    del seed, pool_order, rate
    return solve_greedy(problem)


def cpsat(
    problem: PlacementProblem, *, seed: int, pool_order: list[str], rate: RateOf | None
) -> PlacementSolution:
    from stowplan.placement import solve

    del pool_order, rate
    return solve(problem, seed=seed)


BUILTIN: dict[str, PolicyFn] = {
    "cpsat": cpsat,
    "greedy": greedy,
    "fifo": fifo_first_fit,
    "throughput": throughput_aware,
}


def resolve(name: str) -> PolicyFn:
    """A built-in policy by name, or ``module:function`` taking (problem, *, seed, ...)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise SpecError(
            f"unknown policy {name!r}",
            path="--policy",
            hint=f"use one of {', '.join(sorted(BUILTIN))}, or module:function",
        )
    mod, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(
            f"cannot load policy {name!r}: {e}",
            path="--policy",
            hint="give an importable module:function",
        ) from None
    if not callable(fn):
        raise SpecError(
            f"policy {name!r} is not callable", path="--policy", hint="point at a function"
        )
    return fn  # type: ignore[no-any-return]
