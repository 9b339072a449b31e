"""What goes into the scheduler core (events) and what comes out (commands).

Both are tagged unions of msgspec Structs, so a shell can log, persist or ship them as they
are. Events and commands carry batches: one event for 10^5 submitted tasks, one Submit command
per (provider, pool) per step, one Transitioned command per step.
"""

from __future__ import annotations

import hashlib

from msgspec import Struct, field

from stowplan.placement.leases import DeviceLease
from stowplan.placement.problem import Dataset, PlacementProblem, PlacementSolution, Pool
from stowplan.scheduler.reports import Report
from stowplan.scheduler.states import TaskState
from stowplan.spec.models import FailureClass, RetryPolicy, ServiceSpec


class TaskInstance(Struct, frozen=True, kw_only=True, gc=False):
    """One run as the core sees it: identity, dependencies, needs and policy; no command."""

    run_id: str
    project: str = "default"
    group: str = ""
    """runs of one sweep share a group; ``max_concurrent`` limits a group."""
    depends_on: tuple[str, ...] = ()
    cpus: float = 1.0
    memory: int = 1 << 30
    gpus: int = 0
    gpu_types: tuple[str, ...] = ()
    gpu_milli: int = 1000
    """thousandths of each of its GPUs it takes: below 1000 for a share of one GPU (``gpus``
    is then 1), which runs beside other shares on one device where the pool shares its GPUs
    (``PoolDevices.sharing``) and holds the device whole elsewhere."""
    nodes: int = 1
    """a gang: the run spans this many nodes at once. ``cpus``, ``memory`` and ``gpus`` are
    then its totals, each node holding an equal part, so pools count what the run holds; only
    a pool that knows its nodes by shape (``Pool.node_groups``) can hold one."""
    priority: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    allowed_providers: tuple[str, ...] | None = None
    max_concurrent: int | None = None
    datasets: tuple[str, ...] = ()
    """ids of the inputs, as declared in the placement context (see ``CoreConfig.context``)."""
    runtime_s: float = 3600.0
    """estimated runtime, for compute cost: the walltime or timeout when declared."""
    require_sites: tuple[str, ...] = ()
    forbid_sites: tuple[str, ...] = ()
    forbid_pools: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()
    hardware_class: str | None = None
    """a pin: only pools of exactly this hardware class (replays set it)."""
    tolerations: tuple[str, ...] = ()
    """taint keys the run tolerates (``TaskPlacement.tolerations``)."""
    team: str = ""
    """the team that submitted it through the service ("" for a ``stowplan run``): its GPUs
    count against that team's limits (``CoreConfig.teams``) and its usage orders fair share."""
    user: str = ""
    """who submitted it: fair share within the team."""
    service: ServiceSpec | None = None
    """a long-running service: restarted whenever an attempt ends, until cancelled (module
    doc of ``core``: *Services*); None: a normal run."""

    @property
    def gpu_amount(self) -> float:
        """The GPUs it asks for as the spec wrote them: ``0.25`` for a share, else ``gpus``."""
        return self.gpu_milli / 1000 if self.gpus == 1 and self.gpu_milli < 1000 else self.gpus


class RestoredTask(Struct, frozen=True, kw_only=True, gc=False):
    """A run reloaded from the store after a restart, with where it had got to."""

    task: TaskInstance
    state: TaskState
    attempt: int = 0
    provider: str | None = None
    pool: str | None = None
    key: str | None = None
    """the attempt's key as the store has it (None: derived from run id and attempt)."""
    approved: bool = False
    """someone approved it before the restart (the ledger says so): it does not ask again."""
    uncounted: int = 0
    """of its attempts, those that never ran (the pool had no capacity): not counted against
    its retry policy, before the restart as after."""
    lease: DeviceLease | None = None
    """in a pool that knows its devices: the node and devices its live attempt holds, as the
    store recorded them (``AttemptRecord.node`` and ``devices``). The core gives them back to
    the pool's ledger; None (not recorded, or not a device pool): its devices are not known."""


# ---- events -------------------------------------------------------------------------------


class TasksSubmitted(Struct, frozen=True, kw_only=True, tag=True):
    tasks: list[TaskInstance]
    completed: list[str] = field(default_factory=list)
    """upstream run ids that already succeeded outside this core (reused runs)."""
    datasets: list[Dataset] = field(default_factory=list)
    """the inputs these tasks read, with their sizes and sites: added to (or replacing, by id)
    the core's ``CoreConfig.context`` datasets, so a long-lived core places each submission
    with its own data (module doc of ``core``: *Datasets*)."""


class TasksRestored(Struct, frozen=True, kw_only=True, tag=True):
    tasks: list[RestoredTask]
    completed: list[str] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    """as ``TasksSubmitted.datasets``."""


class PoolsDiscovered(Struct, frozen=True, kw_only=True, tag=True):
    """A provider's pools with their total capacity for stowplan (the core subtracts leases)."""

    provider: str
    pools: list[Pool]
    settled: list[str] = field(default_factory=list)
    """tokens of ``Provision``/``Terminate`` commands the provider had answered before this
    discovery began: the pools count (or no longer count) their instances, so the core stops
    adding them itself. A token not listed stays counted by the core."""


class Provisioned(Struct, frozen=True, kw_only=True, tag=True):
    """A provider answered a ``Provision``: these instances exist (booting or up) under the
    token. Fewer than asked (a quota, a retried token that started fewer) is the truth."""

    provider: str
    pool: str
    token: str
    instances: list[str]


class ElasticRefused(Struct, frozen=True, kw_only=True, tag=True):
    """A provider refused a ``Provision`` or ``Terminate`` (not retryable: no capacity left,
    no permission, not an elastic provider). The core stops counting the token's instances
    and launches nor stops nothing more in that pool until the provider is discovered again."""

    provider: str
    pool: str
    token: str
    reason: str = ""


class PlacementDecided(Struct, frozen=True, kw_only=True, tag=True):
    solution: PlacementSolution


class ProviderReported(Struct, frozen=True, kw_only=True, tag=True):
    provider: str
    reports: list[Report]


class CancelRequested(Struct, frozen=True, kw_only=True, tag=True):
    run_ids: list[str]
    reason: str = "cancelled by user"


class ApprovalDecided(Struct, frozen=True, kw_only=True, tag=True):
    """Someone allowed to (the service checked who) approved or rejected runs waiting in
    AWAITING_APPROVAL: approved ones are placed again and may exceed the budget and use
    restricted pools; rejected ones are CANCELLED with ``reason``. Runs in any other state
    are left alone."""

    run_ids: list[str]
    approve: bool
    reason: str = ""


class ServiceUnhealthy(Struct, frozen=True, kw_only=True, tag=True):
    """The shell's health checks of a service's attempt ``key`` failed ``failures`` times in
    a row past its start period: the core stops the attempt and restarts the service."""

    run_id: str
    key: str
    reason: str


class Tick(Struct, frozen=True, kw_only=True, tag=True):
    """Time has passed: due retries become READY, expired leases become LOST."""


Event = (
    TasksSubmitted
    | TasksRestored
    | PoolsDiscovered
    | PlacementDecided
    | ProviderReported
    | CancelRequested
    | Tick
    | Provisioned
    | ElasticRefused
    | ApprovalDecided
    | ServiceUnhealthy
)


# ---- commands -----------------------------------------------------------------------------


class SolvePlacement(Struct, frozen=True, kw_only=True, tag=True):
    problem: PlacementProblem


class SubmitItem(Struct, frozen=True, array_like=True, gc=False):
    run_id: str
    attempt: int
    key: str
    lease: DeviceLease | None = None
    """In a pool that knows its devices (``Pool.devices``): the node and device indices the
    attempt holds, which the provider must start it on (the lease is the placement)."""


class Submit(Struct, frozen=True, kw_only=True, tag=True):
    provider: str
    pool: str
    items: list[SubmitItem]
    resubmit: bool = False
    """True only after a restore, for keys the provider has never heard of."""


class Cancel(Struct, frozen=True, kw_only=True, tag=True):
    provider: str
    keys: list[str]


class Reconcile(Struct, frozen=True, kw_only=True, tag=True):
    """Describe these keys at the provider and report back before anything new is dispatched."""

    provider: str
    keys: list[str]


class Provision(Struct, frozen=True, kw_only=True, tag=True):
    """Start ``count`` instances in elastic pool ``pool`` (``Provider.provision``), idempotent
    by ``token`` (see ``elastic_token``): the shell retries a transient error with the same
    token and answers with ``Provisioned`` or ``ElasticRefused``."""

    provider: str
    pool: str
    count: int
    token: str


class Terminate(Struct, frozen=True, kw_only=True, tag=True):
    """Stop up to ``count`` idle instances of elastic pool ``pool`` (``Provider.terminate``),
    idempotent by ``token``; the provider stops none that runs an attempt."""

    provider: str
    pool: str
    count: int
    token: str


def elastic_token(verb: str, pool: str, seq: int, epoch: str = "") -> str:
    """The idempotency token of the ``seq``-th ``verb`` ("provision" or "terminate") the core
    decided for ``pool``: a function of those and the core's ``epoch`` alone, so a retried call
    carries the same token, and a core restarted with the same epoch derives the same tokens in
    the same order (a provision in flight at the crash is answered by the provider, not
    repeated under a new token; at worst the restarted core is told of fewer instances than it
    asked for, which discovery shows and the next solve makes up). ``verb[0]`` and 30 hex
    characters: a DNS label, well within an EC2 ``ClientToken`` (64) and a Kubernetes label."""
    digest = hashlib.sha256(f"{epoch}\0{verb}\0{pool}\0{seq}".encode()).hexdigest()[:30]
    return f"{verb[0]}-{digest}"


class Transition(Struct, frozen=True, array_like=True, gc=False):
    run_id: str
    attempt: int
    from_state: TaskState
    to_state: TaskState
    failure: FailureClass | None
    reason: str
    pool: str | None


class Transitioned(Struct, frozen=True, kw_only=True, tag=True):
    records: list[Transition]


class WakeAt(Struct, frozen=True, kw_only=True, tag=True):
    """Feed a Tick at (or after) this time."""

    at: float


Command = (
    SolvePlacement | Submit | Cancel | Reconcile | Transitioned | WakeAt | Provision | Terminate
)
