"""The greedy placer: a fast, deterministic baseline, the CP-SAT engine's hint and its fallback.

Classes are taken by priority, then in the order given (the scheduler core orders them by fair
share). Each class fills its options cheapest first (see ``table``), placing as many members
as the pool's remaining CPUs, memory, GPUs of that model and quota allow, and launching
instances in elastic pools when free capacity runs out. In an elastic pool, members are placed
instance by instance (first fit), so they share an instance only when they fit on it together,
and a class launches where an instance costs least per member it holds. Pure: it never mutates
its input.

``eligible``, ``fits`` and ``why_not`` are the scalar checks the scheduler core uses before it
builds a problem.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from stowplan.placement.problem import (
    DemandClass,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
)
from stowplan.placement.table import Columns, Table, build, pool_reasons
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
    # an elastic pool's capacity, instance by instance, so that members share an instance
    # only when they fit on it together
    bins = {j: _Bins(table.free[j], node) for j, node in enumerate(table.node) if node is not None}
    if bins:
        shapes = (
            np.array([n[0] if n else -1 for n in table.node], dtype=np.int64),
            np.array([n[1] if n else 0 for n in table.node], dtype=np.int64),
            np.zeros_like(gpu),
        )
        for j, b in bins.items():
            for m, g in b.node[2]:
                shapes[2][midx[m], j] = g

    def launch(j: int, k: int) -> None:
        node = table.node[j]
        assert node is not None
        cpu[j] += k * node[0]
        mem[j] += k * node[1]
        for m, g in node[2].items():
            gpu[midx[m], j] += k * g
        room[j] -= k
        launched[j] = launched.get(j, 0) + k
        bins[j].launch(k)

    def take(ci: int, j: int, mi: int, n: int, packed: bool = False) -> None:
        c_cpu, c_mem, c_gpu = table.need[ci]
        cpu[j] -= n * c_cpu
        mem[j] -= n * c_mem
        if c_gpu:
            gpu[mi, j] -= n * c_gpu
        quota[j] -= n
        key = (ci, j, models[mi] if mi >= 0 else "")
        counts[key] = counts.get(key, 0) + n
        placed[ci] += n
        if j in bins and not packed:
            bins[j].take(table.need[ci], key[2], n)

    def fit(ci: int, j: int, mi: int, left: int) -> int:
        c_cpu, c_mem, c_gpu = table.need[ci]
        n = min(left, int(quota[j]))
        if c_cpu:
            n = min(n, int(cpu[j]) // c_cpu)
        if c_mem:
            n = min(n, int(mem[j]) // c_mem)
        if c_gpu:
            n = min(n, int(gpu[mi, j]) // c_gpu)
        if n > 0 and j in bins:
            n = bins[j].fit(table.need[ci], models[mi] if mi >= 0 else "", n)
        return max(0, n)

    for j, k in sorted(start_launched.items()) if start_launched else ():
        launch(j, k)
    # a start in an elastic pool (a rounded relaxation: counts per pool, not per instance):
    # each class's share into the pool's free part (as much of it as the free part is of the
    # pool's capacity), the rest spread evenly over the instances launched, then first fit,
    # largest members first; what does not pack is left for the fill below
    by_pool: dict[int, list[tuple[int, int, int]]] = {}
    for (ci, j, model), n in sorted(start.items()) if start else ():
        by_pool.setdefault(j, []).append((ci, midx[model] if model else -1, n))
    for j, items in sorted(by_pool.items()):
        if j in bins:
            items.sort(key=lambda it: (_size(table, it[0], j), it[0], it[1]))
            rest = []
            w = bins[j].free_weight()
            allowed = int(quota[j])
            for ci, mi, n in items:
                n = min(n, allowed)
                allowed -= n
                got = bins[j].take_free(table.need[ci], models[mi] if mi >= 0 else "", int(n * w))
                take(ci, j, mi, got, packed=True)
                rest.append((ci, mi, n - got))
            spread = bins[j].spread(
                [(table.need[ci], models[mi] if mi >= 0 else "", n) for ci, mi, n in rest]
            )
            items = []
            for (ci, mi, n), got in zip(rest, spread, strict=True):
                take(ci, j, mi, got, packed=True)
                items.append((ci, mi, n - got))
        for ci, mi, n in items:
            n = min(n, fit(ci, j, mi, n))
            if n > 0:
                take(ci, j, mi, n)

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
        ks = np.flatnonzero(alive)
        for k in _launch_order(table, ci, cols, ks, warm, left, shapes) if bins else ks.tolist():
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
    for j, b in bins.items():  # instances nothing was placed on (a start's, or spare)
        if launched.get(j):
            launched[j] -= min(launched[j], b.idle())
    return {k: v for k, v in counts.items() if v}, {j: k for j, k in launched.items() if k}


Shape = tuple[int, int, tuple[tuple[str, int], ...]]
"""What is left on one instance: CPUs, memory, GPUs per model (sorted), in table units."""


class _Bins:
    """An elastic pool's capacity, instance by instance: its free part (one bin: the pool does
    not say how it is split), then the instances launched, grouped by what is left on them (a
    count per distinct remainder, so thousands of alike instances cost one entry). Members go
    first fit, in a fixed order: the free part, then the groups in the order they arose."""

    __slots__ = ("free", "groups", "node")

    def __init__(
        self, free: tuple[int, int, dict[str, int]], node: tuple[int, int, dict[str, int]]
    ) -> None:
        self.free: Shape = (free[0], free[1], tuple(sorted(free[2].items())))
        self.node: Shape = (node[0], node[1], tuple(sorted(node[2].items())))
        self.groups: dict[Shape, int] = {}

    def launch(self, k: int) -> None:
        self.groups[self.node] = self.groups.get(self.node, 0) + k

    def idle(self) -> int:
        """Instances launched that hold nothing."""
        return self.groups.get(self.node, 0)

    def fit(self, need: tuple[int, int, int], model: str, most: int) -> int:
        """How many members (at most ``most``) fit, each on one bin."""
        n = _fits(self.free, need, model)
        for shape, count in self.groups.items():
            if n >= most:
                break
            n += count * _fits(shape, need, model)
        return min(n, most)

    def free_weight(self) -> float:
        """The free part's share of the capacity of the free part and the idle instances, in
        the dimension where that share is smallest."""
        k = self.groups.get(self.node, 0)
        free = [
            self.free[0],
            self.free[1],
            *(dict(self.free[2]).get(m, 0) for m, _ in self.node[2]),
        ]
        node = [self.node[0], self.node[1], *(g for _, g in self.node[2])]
        return min(
            [f / (f + k * n) for f, n in zip(free, node, strict=True) if n > 0 and f + k * n > 0]
            + [1.0]
        )

    def take_free(self, need: tuple[int, int, int], model: str, most: int) -> int:
        """Place as many members as fit (at most ``most``) on the free part; how many."""
        f = min(most, _fits(self.free, need, model))
        if f:
            self.free = _less(self.free, need, model, f)
        return f

    def spread(self, items: list[tuple[tuple[int, int, int], str, int]]) -> list[int]:
        """Spread each item's members as evenly as they go over the instances that hold
        nothing yet (remainders rotating, so no instance gets every odd one), each instance
        taking what fits of its share; how many of each item were placed."""
        k = self.groups.pop(self.node, 0)
        if not k:
            return [0] * len(items)
        models = [m for m, _ in self.node[2]]
        left = np.array(
            [[self.node[0], self.node[1], *(g for _, g in self.node[2])]] * k, dtype=np.int64
        )
        at = np.arange(k)
        offset = 0
        out = []
        for (c_cpu, c_mem, c_gpu), model, n in items:
            q, r = divmod(n, k)
            share = q + ((at - offset) % k < r)
            offset = (offset + r) % k
            if c_cpu:
                share = np.minimum(share, left[:, 0] // c_cpu)
            if c_mem:
                share = np.minimum(share, left[:, 1] // c_mem)
            if c_gpu:
                g = 2 + models.index(model) if model in models else -1
                share = np.minimum(share, left[:, g] // c_gpu) if g >= 0 else share * 0
            share = np.maximum(share, 0)
            left[:, 0] -= share * c_cpu
            left[:, 1] -= share * c_mem
            if c_gpu and share.any():
                left[:, 2 + models.index(model)] -= share * c_gpu
            out.append(int(share.sum()))
        shapes, counts = np.unique(left, axis=0, return_counts=True)
        for row, count in zip(shapes.tolist(), counts.tolist(), strict=True):
            self._add((row[0], row[1], tuple(zip(models, row[2:], strict=True))), count)
        return out

    def take(self, need: tuple[int, int, int], model: str, n: int) -> None:
        """Place ``n`` members first fit (``fit`` said they fit)."""
        f = min(n, _fits(self.free, need, model))
        if f:
            self.free = _less(self.free, need, model, f)
            n -= f
        for shape in list(self.groups):
            if n <= 0:
                break
            per = _fits(shape, need, model)
            if not per:
                continue
            t = min(n, per * self.groups[shape])
            full, rest = divmod(t, per)
            self._add(shape, -(full + (1 if rest else 0)))
            if full:
                self._add(_less(shape, need, model, per), full)
            if rest:
                self._add(_less(shape, need, model, rest), 1)
            n -= t

    def _add(self, shape: Shape, k: int) -> None:
        k += self.groups.get(shape, 0)
        if k:
            self.groups[shape] = k
        else:
            del self.groups[shape]


def _fits(shape: Shape, need: tuple[int, int, int], model: str) -> int:
    c_cpu, c_mem, c_gpu = need
    n = _UNLIMITED
    if c_cpu:
        n = shape[0] // c_cpu
    if c_mem:
        n = min(n, shape[1] // c_mem)
    if c_gpu:
        n = min(n, dict(shape[2]).get(model, 0) // c_gpu)
    return max(0, n)


def _less(shape: Shape, need: tuple[int, int, int], model: str, n: int) -> Shape:
    gpus = shape[2]
    if need[2]:
        gpus = tuple((m, g - n * need[2] if m == model else g) for m, g in gpus)
    return (shape[0] - n * need[0], shape[1] - n * need[1], gpus)


def _size(table: Table, ci: int, j: int) -> float:
    """Minus the largest share of one instance of pool ``j`` a member of ``ci`` takes (0 where
    the pool is not elastic): sorting by it puts the largest first."""
    node = table.node[j]
    if node is None:
        return 0.0
    c_cpu, c_mem, c_gpu = table.need[ci]
    share = max(c_cpu / max(1, node[0]), c_mem / max(1, node[1]))
    if c_gpu:
        share = max(share, c_gpu / max(1, max(node[2].values(), default=1)))
    return -share


def _launch_order(
    table: Table,
    ci: int,
    cols: Columns,
    ks: npt.NDArray[np.int64],
    warm: npt.NDArray[np.bool_],
    left: int,
    shapes: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]],
) -> list[int]:
    """``ks`` cheapest first, where a column with no free room now also pays its share of the
    instance it would launch, shared by the ``left`` members at most (an elastic pool bills
    instances, not tasks: see ``table``). ``shapes``: per pool, its instance's CPUs, memory,
    and GPUs per model (rows); CPUs -1 where not elastic."""
    n_cpu, n_mem, n_gpu = shapes
    js = cols.pool[ks]
    cold = (n_cpu[js] >= 0) & ~warm[ks]
    if not cold.any():
        return [int(k) for k in ks]
    c_cpu, c_mem, c_gpu = table.need[ci]
    jc = js[cold]
    per = np.full(len(jc), _UNLIMITED, dtype=np.int64)
    if c_cpu:
        per = np.minimum(per, n_cpu[jc] // c_cpu)
    if c_mem:
        per = np.minimum(per, n_mem[jc] // c_mem)
    if c_gpu:
        per = np.minimum(per, n_gpu[np.maximum(cols.model[ks][cold], 0), jc] // c_gpu)
    cost = np.array(table.instance_cost_int, dtype=np.int64)[jc]
    extra = np.where(per > 0, -(-cost // np.maximum(1, np.minimum(per, left))), _UNLIMITED)
    key = cols.cost_int[ks].astype(np.int64)
    key[cold] += extra
    return [int(k) for k in ks[np.lexsort((ks, key))]]


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
