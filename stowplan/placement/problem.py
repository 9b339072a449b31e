"""The placement problem and its solution, as plain data.

Tasks with identical needs are grouped into demand classes before they reach a placer, so a
sweep of 10^5 trials is a handful of classes, not 10^5 rows. A solution assigns counts per
(class, pool, GPU model); the scheduler core expands counts back to task ids in the class's own
order (``expand``).

Units: CPUs as floats, memory and sizes in bytes, times in seconds, bandwidth in bytes per
second, prices in the user's currency (dollars, say): per hour for compute, per GB (10^9 bytes)
for egress.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Iterator
from typing import Final, Literal

import msgspec
from msgspec import Struct, field

from stowplan.errors import SpecError
from stowplan.placement.leases import PoolDevices
from stowplan.spec.units import (
    MAX_BYTES,
    MAX_COUNT,
    MAX_CPUS,
    MAX_DURATION_S,
    MAX_GPUS,
    MAX_WEIGHT,
)

POOL_KINDS = ("local", "slurm", "kubernetes", "cloud", "instant", "sim")


class Shape(Struct, frozen=True, kw_only=True):
    """One node or instance: a task must fit on one of these, it is never split across two."""

    cpus: float = 0.0
    memory: int = 0
    gpus: dict[str, int] = field(default_factory=dict)


class NodeGroup(Struct, frozen=True, kw_only=True):
    """``count`` nodes of one ``shape`` (a Slurm partition's nodes, by shape)."""

    shape: Shape
    count: int = 1


class PoolQuota(Struct, frozen=True, kw_only=True):
    """An account limit shared by several pools (an EC2 vCPU quota covers every instance type
    of some families in a region, per market): all pools naming the same ``group`` launch
    from one ``left``, each instance taking ``per_instance`` of it."""

    group: str
    """Who shares it, e.g. ``aws:us-east-1:ec2/L-DB2E81BA``: pools of one group share ``left``."""
    name: str = ""
    """For people: ``L-DB2E81BA (G and VT on-demand vCPUs)``."""
    limit: float = 0.0
    """The quota's value (vCPUs)."""
    left: float = 0.0
    """What was left of it at discovery (the account's running use subtracted, whoever
    launched it); the same on every pool of the group."""
    per_instance: float = 0.0
    """What one more instance of this pool takes from it (its vCPUs)."""


class Pool(Struct, frozen=True, kw_only=True):
    """Somewhere tasks can run: a local machine, a Slurm partition, a node pool, an instance type.

    ``cpus``, ``memory`` and ``gpus`` (model -> count) are what is free for stowplan now. An
    elastic pool (``max_instances`` > 0, a cloud instance type) can also launch up to that many
    more instances of shape ``node``. ``price_per_hour`` is per instance-hour for elastic pools;
    for other pools it is per task-hour, scaled by the task's share of ``node`` when the node shape
    is known. ``expected_wait_s`` is the queue wait a batch scheduler predicts; elastic pools add
    ``boot_s``. Spot pools are interrupted ``interruption_rate`` times per instance-hour, which
    inflates the expected compute cost by the work redone.
    """

    id: str
    provider: str
    kind: str = "local"
    site: str = "local"
    region: str = ""
    cpus: float = 0.0
    memory: int = 0
    gpus: dict[str, int] = field(default_factory=dict)
    node: Shape | None = None
    price_per_hour: float = 0.0
    spot: bool = False
    interruption_rate: float = 0.0
    max_instances: int = 0
    boot_s: float = 0.0
    expected_wait_s: float = 0.0
    hardware_class: str = ""
    max_tasks: int | None = None
    """A quota: at most this many stowplan tasks at once in this pool."""
    taints: tuple[str, ...] = ()
    """Taint keys a task must tolerate to run here (a Kubernetes node pool tainted
    ``NoSchedule``/``NoExecute``): only classes whose ``tolerations`` hold every one may go."""
    queue_depth: float = 0.0
    """How much work beyond its free capacity the provider takes and queues itself (the local
    driver's FIFO, the AWS driver's queue), as a multiple of the capacity it runs now (for an
    elastic pool, of the instances it has): the core may keep that much more submitted, so the
    next wave starts when room frees, without a round trip to the control plane. 0: only what
    fits now (the core's own queue holds the rest). A batch scheduler whose discovery already
    scales its capacity (Slurm's queue depth) leaves it 0."""
    quota: PoolQuota | None = None
    """An account limit this elastic pool's launches share with other pools (an EC2 vCPU
    quota): the core launches no more instances across the group than its ``left`` allows.
    None: no known limit (a refused launch is how one is learned)."""
    devices: PoolDevices | None = None
    """The pool's GPUs by node and device, where the provider knows them: the core then places
    each run on a node and device indices (``DeviceLease``) and never on a device that cannot
    hold it. None: GPUs are counted per pool (``gpus``)."""
    node_groups: tuple[NodeGroup, ...] = ()
    """The pool's usable nodes by shape, where a batch scheduler places runs on them itself
    (Slurm): a run goes here only if one node holds it (``node`` is then their bounding
    shape), and a gang of n nodes only if n nodes each hold its part. (): runs never span
    nodes here, and ``node`` alone bounds a run."""

    @property
    def elastic(self) -> bool:
        return self.max_instances > 0 and self.node is not None


class Link(Struct, frozen=True, kw_only=True):
    """The network from one site to another: bytes per second, and price per GB sent."""

    src: str
    dst: str
    bandwidth: float
    egress_per_gb: float = 0.0


class Dataset(Struct, frozen=True, kw_only=True):
    """An input and the sites holding a replica. ``residency`` names a rule of the problem: the
    tasks reading this dataset may only run at the sites or regions that rule allows."""

    id: str
    size: int
    sites: tuple[str, ...] = ()
    residency: str | None = None


class Demand(Struct, frozen=True, kw_only=True):
    """What one task needs and where it may go; identical demands form one class."""

    cpus: float = 1.0
    memory: int = 1 << 30
    gpus: int = 0
    gpu_types: tuple[str, ...] = ()
    gpu_milli: int = 1000
    """thousandths of each GPU (below 1000: a share of one GPU, ``gpus`` 1). The count model
    counts a share as one GPU; a pool that shares its devices places shares exactly
    (``devices.DeviceLedger``)."""
    nodes: int = 1
    """a gang spanning this many nodes: ``cpus``, ``memory`` and ``gpus`` are its totals, and
    each node must hold ``1/nodes`` of them. Only pools with ``node_groups`` holding that many
    such nodes are eligible."""
    allowed_pools: tuple[str, ...] | None = None
    forbid_pools: tuple[str, ...] = ()
    require_sites: tuple[str, ...] = ()
    forbid_sites: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()
    hardware_class: str | None = None
    """Pin: only pools of exactly this hardware class (replays use it)."""
    datasets: tuple[str, ...] = ()
    runtime_s: float = 3600.0
    """Estimated runtime, for compute cost and spot rework."""
    runtime_by_gpu: tuple[tuple[str, float], ...] = ()
    """(GPU model, estimated runtime there) where it differs from ``runtime_s``: a throughput
    table (Gavel's, say) turned into times makes placement heterogeneity-aware."""
    priority: int = 0
    tolerations: tuple[str, ...] = ()
    """Taint keys the task tolerates: it may go to a pool only if it tolerates all its
    ``taints``."""


class TaskDemand(Demand, frozen=True, kw_only=True):
    id: str


class DemandClass(Demand, frozen=True, kw_only=True):
    """Tasks that need the same thing and may go to the same pools, in dispatch order."""

    id: str
    members: list[str] = field(default_factory=list)


class Weights(Struct, frozen=True, kw_only=True):
    """How the objective weighs its terms. ``hour_value`` prices one task-hour of delay (waiting,
    or moving data) in the currency of ``price_per_hour``, so all terms add up."""

    data: float = 1.0
    cost: float = 1.0
    wait: float = 1.0
    priority: float = 1.0
    hour_value: float = 1.0


class PlacementContext(Struct, frozen=True, kw_only=True):
    """What every problem of one deployment shares: the network, the datasets, the residency
    rules and the weights. The scheduler core stamps it on each problem it builds."""

    links: list[Link] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    residency: dict[str, tuple[str, ...]] = field(default_factory=dict)
    weights: Weights = field(default_factory=Weights)
    objective: Literal["fgd", "bestfit"] = "fgd"
    """``[placement] objective``: how the core packs runs onto the devices of a pool that
    describes them (``Pool.devices``): ``fgd`` (fragmentation-aware) or ``bestfit``."""


class PlacementProblem(Struct, frozen=True, kw_only=True):
    request_id: int = 0
    pools: list[Pool]
    classes: list[DemandClass]
    links: list[Link] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    residency: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Rule name -> the sites or regions where data under that rule may be processed."""
    weights: Weights = field(default_factory=Weights)


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
    gpu_model: str = ""


class PlacementSolution(Struct, frozen=True, kw_only=True):
    request_id: int
    status: PlacementStatus
    assignments: list[Assignment]
    instances: dict[str, int] = field(default_factory=dict)
    """Elastic pool -> instances to launch for this placement."""
    unit_terms: list[dict[str, float]] = field(default_factory=list)
    """Per assignment, what one of its tasks costs there: cost (weighted), compute_cost,
    data_bytes, data_seconds, egress_cost, wait_seconds."""
    objective: float = 0.0
    """In the solver's integer units (see ``placement.table``): minus a priority-weighted reward
    per placed task, plus costs. Lower is better; comparable between solutions of one problem."""
    bound: float = 0.0
    gap: float = 0.0
    """(objective - bound) / max(1, |objective|); 0 when proven optimal."""
    terms: dict[str, float] = field(default_factory=dict)
    """The objective's parts, unweighted: placed, wanted, data_bytes, data_seconds, egress_cost,
    compute_cost, wait_seconds, instances."""
    solve_seconds: float = 0.0
    deterministic_time: float = 0.0
    unplaced: dict[str, str] = field(default_factory=dict)
    """class id -> why none (or not all) of its members could be placed now."""

    def fingerprint(self) -> str:
        """SHA-256 of the decision: everything but the measured times."""
        body = msgspec.structs.replace(self, solve_seconds=0.0, deterministic_time=0.0)
        return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()

    def placed(self) -> int:
        return sum(a.count for a in self.assignments)


def expand(problem: PlacementProblem, solution: PlacementSolution) -> Iterator[Assignment]:
    """Yield one ``Assignment`` of count 1 per placed task, with the task id as ``class_id``.

    Members of a class are handed out in the class's order across its assignments in the order
    the solution lists them (sorted by pool id), so the same solution always maps the same task
    to the same pool.
    """
    classes = {c.id: c for c in problem.classes}
    taken: dict[str, int] = {}
    for a in solution.assignments:
        cls = classes[a.class_id]
        start = taken.get(a.class_id, 0)
        for task_id in cls.members[start : start + a.count]:
            yield Assignment(task_id, a.pool_id, 1, a.gpu_model)
        taken[a.class_id] = start + a.count


def group(tasks: Iterable[TaskDemand]) -> list[DemandClass]:
    """Group identical demands into classes, in order of first appearance."""
    classes: dict[Demand, list[str]] = {}
    for t in tasks:
        key = Demand(**{f: getattr(t, f) for f in Demand.__struct_fields__})
        classes.setdefault(key, []).append(t.id)
    out = []
    for i, (d, members) in enumerate(classes.items()):
        fields = {f: getattr(d, f) for f in Demand.__struct_fields__}
        out.append(DemandClass(id=f"c{i}", members=members, **fields))
    return out


# ---- validation ---------------------------------------------------------------------------


def _bad(source: str, path: str, message: str, hint: str) -> SpecError:
    return SpecError(message, file=source, path=path, hint=hint)


POOL_CPUS: Final = 2**40
"""A pool's free CPUs: a whole cluster, still exact in the option table's int64 thousandths."""
POOL_BYTES: Final = 2**80
POOL_GPUS: Final = 2**40


def _finite(
    value: float, source: str, path: str, *, positive: bool = False, most: float = math.inf
) -> None:
    if not math.isfinite(value):
        raise _bad(source, path, f"must be a finite number, got {value}", "give a real number")
    if value < 0 or (positive and value == 0):
        need = "greater than 0" if positive else "0 or more"
        raise _bad(source, path, f"must be {need}, got {value:g}", f"use a value {need}")
    if value > most:
        raise _bad(
            source,
            path,
            f"must be at most {most:,.0f}, got {value:g}",
            "this is more than stowplan can represent; use a smaller value",
        )


def _fine(*values: float) -> bool:
    """All finite and non-negative: the fast check, before any path string is built. A NaN or
    an infinity makes the sum non-finite; a sum that overflows only sends valid numbers down
    the slow path, which checks each one."""
    return not values or (min(values) >= 0 and math.isfinite(sum(values)))


def _within(most: float, *values: float) -> bool:
    return not values or max(values) <= most


def validate(problem: PlacementProblem, *, source: str = "placement problem") -> None:
    """Reject bad input before any solving, naming the field (``$.pools[3].cpus``) and a fix."""
    pool_ids: set[str] = set()
    classes_hw = {c.hardware_class for c in problem.classes if c.hardware_class is not None}
    for i, p in enumerate(problem.pools):
        at = f"$.pools[{i}]"
        if not p.id:
            raise _bad(source, f"{at}.id", "a pool needs an id", "name every pool")
        if p.id in pool_ids:
            raise _bad(source, f"{at}.id", f"pool id {p.id!r} appears twice", "make ids unique")
        pool_ids.add(p.id)
        if p.kind not in POOL_KINDS:
            raise _bad(
                source, f"{at}.kind", f"unknown pool kind {p.kind!r}", f"use one of {POOL_KINDS}"
            )
        numbers = (p.price_per_hour, p.interruption_rate, p.boot_s, p.expected_wait_s)
        if not (
            _fine(p.cpus, p.memory, *p.gpus.values(), *numbers)
            and p.cpus <= POOL_CPUS
            and p.memory <= POOL_BYTES
            and _within(POOL_GPUS, *p.gpus.values())
        ):
            _finite(p.cpus, source, f"{at}.cpus", most=POOL_CPUS)
            _finite(float(p.memory), source, f"{at}.memory", most=POOL_BYTES)
            for m, n in sorted(p.gpus.items()):
                _finite(float(n), source, f"{at}.gpus.{m}", most=POOL_GPUS)
            for name in ("price_per_hour", "interruption_rate", "boot_s", "expected_wait_s"):
                _finite(getattr(p, name), source, f"{at}.{name}")
        if not 0 <= p.max_instances <= MAX_COUNT:
            _finite(p.max_instances, source, f"{at}.max_instances", most=MAX_COUNT)
        if p.max_tasks is not None and not 0 <= p.max_tasks <= MAX_COUNT:
            _finite(p.max_tasks, source, f"{at}.max_tasks", most=MAX_COUNT)
        if p.node is not None and not (
            _fine(p.node.cpus, p.node.memory, *p.node.gpus.values())
            and p.node.cpus <= MAX_CPUS
            and p.node.memory <= POOL_BYTES
            and _within(MAX_GPUS, *p.node.gpus.values())
        ):
            _finite(p.node.cpus, source, f"{at}.node.cpus", most=MAX_CPUS)
            _finite(float(p.node.memory), source, f"{at}.node.memory", most=POOL_BYTES)
            for m, n in sorted(p.node.gpus.items()):
                _finite(float(n), source, f"{at}.node.gpus.{m}", most=MAX_GPUS)
        if p.node is None and p.max_instances > 0:
            raise _bad(
                source,
                f"{at}.node",
                "an elastic pool (max_instances > 0) needs its instance shape",
                "give node = {cpus, memory, gpus} for the instance type",
            )
    sites = {p.site for p in problem.pools} | {p.region for p in problem.pools if p.region}
    for i, link in enumerate(problem.links):
        if not (_fine(link.bandwidth, link.egress_per_gb) and link.bandwidth > 0):
            _finite(link.bandwidth, source, f"$.links[{i}].bandwidth", positive=True)
            _finite(link.egress_per_gb, source, f"$.links[{i}].egress_per_gb")
    data_ids: set[str] = set()
    for i, d in enumerate(problem.datasets):
        if d.id in data_ids:
            raise _bad(source, f"$.datasets[{i}].id", f"dataset {d.id!r} appears twice", "merge")
        data_ids.add(d.id)
        _finite(float(d.size), source, f"$.datasets[{i}].size", most=POOL_BYTES)
        if d.residency is not None and d.residency not in problem.residency:
            raise _bad(
                source,
                f"$.datasets[{i}].residency",
                f"unknown residency rule {d.residency!r}",
                f"define it under residency, or use one of {sorted(problem.residency)}",
            )
    for name, allowed in sorted(problem.residency.items()):
        if not allowed:
            raise _bad(
                source, f"$.residency.{name}", "a residency rule allows no site", "list sites"
            )
    w = problem.weights
    for name in ("data", "cost", "wait", "priority", "hour_value"):
        _finite(getattr(w, name), source, f"$.weights.{name}", most=MAX_WEIGHT)
    class_ids: set[str] = set()
    for i, c in enumerate(problem.classes):
        at = f"$.classes[{i}]"
        if c.id in class_ids:
            raise _bad(source, f"{at}.id", f"class id {c.id!r} appears twice", "make ids unique")
        class_ids.add(c.id)
        runtimes = (c.runtime_s, *(secs for _, secs in c.runtime_by_gpu))
        if not (
            _fine(c.cpus, c.memory, *runtimes)
            and c.cpus <= MAX_CPUS
            and c.memory <= MAX_BYTES
            and _within(MAX_DURATION_S, *runtimes)
        ):
            _finite(c.cpus, source, f"{at}.cpus", most=MAX_CPUS)
            _finite(float(c.memory), source, f"{at}.memory", most=MAX_BYTES)
            _finite(c.runtime_s, source, f"{at}.runtime_s", most=MAX_DURATION_S)
            for j, (_, secs) in enumerate(c.runtime_by_gpu):
                _finite(secs, source, f"{at}.runtime_by_gpu[{j}]", most=MAX_DURATION_S)
        if not 0 <= c.gpus <= MAX_GPUS:
            _finite(float(c.gpus), source, f"{at}.gpus", most=MAX_GPUS)
        for j, did in enumerate(c.datasets):
            if did not in data_ids:
                raise _bad(
                    source,
                    f"{at}.datasets[{j}]",
                    f"unknown dataset {did!r}",
                    "declare it under datasets with its size and sites",
                )
        for j, r in enumerate(c.residency):
            if r not in problem.residency:
                raise _bad(
                    source,
                    f"{at}.residency[{j}]",
                    f"unknown residency rule {r!r}",
                    f"define it under residency, or use one of {sorted(problem.residency)}",
                )
        for name in ("allowed_pools", "forbid_pools"):
            for j, pid in enumerate(getattr(c, name) or ()):
                if pid not in pool_ids:
                    raise _bad(
                        source,
                        f"{at}.{name}[{j}]",
                        f"unknown pool {pid!r}",
                        f"use one of {sorted(pool_ids)[:8]}",
                    )
        for j, s in enumerate(c.require_sites):
            if s not in sites:
                raise _bad(
                    source,
                    f"{at}.require_sites[{j}]",
                    f"no pool is at site {s!r}",
                    f"use one of {sorted(sites)[:8]}",
                )
    for hw in sorted(classes_hw):
        if not any(p.hardware_class == hw for p in problem.pools):
            i = next(i for i, c in enumerate(problem.classes) if c.hardware_class == hw)
            raise _bad(
                source,
                f"$.classes[{i}].hardware_class",
                f"no pool has hardware class {hw!r}",
                "replay on a provider that offers this hardware, or drop the pin "
                "(classes here: "
                + ", ".join(sorted({p.hardware_class for p in problem.pools if p.hardware_class}))
                + ")",
            )
