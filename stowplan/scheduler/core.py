"""The sans-IO scheduler core: events in, commands out, no I/O, no clock, no Ray.

Theory of operation
-------------------
``SchedulerCore.handle(event, now)`` applies one event and returns the commands the shell must
carry out. ``now`` is the only notion of time (wall clock in the Ray shell, virtual time in the
simulator), so the same sequence of (event, now) pairs yields the same commands on any machine.

- Submitted runs wait in PENDING until every dependency SUCCEEDED, then become READY. A
  dependency that FAILED fails its dependents with the reason; one CANCELLED cancels them.
- READY runs are grouped into demand classes (same project, priority, needs and allowed
  providers) and sent to placement in ONE ``SolvePlacement`` for all of them; one solve is in
  flight at a time, and runs that become READY meanwhile wait for the next.
- The answer is checked against the capacity free when it arrives, not when it was asked for:
  a pool may have shrunk (rediscovered smaller) or lost room to restored leases meanwhile. A
  run that no longer fits stays READY for the next solve; no pool is ever over-committed.
- An answer that placed nothing is not asked again at once (it would be, forever): the core
  waits until something changes that could let a new solve place more (a run became READY,
  capacity was freed, pools were discovered, a run was cancelled or restored). A generation
  counter numbers those changes; only an answer to a request made at the current generation can
  stall the core, so a change that happened while the solver ran is never lost.
- Classes are ordered by priority, then by their project's decayed usage (fair share), then by
  age. A class is cut to what could fit in all free capacity, and to its sweep's
  ``max_concurrent``, so a 10^5-trial sweep on a small machine does not resend 10^5 ids.
- A placed run is submitted at once (PLACED -> SUBMITTING, attempt + 1, a new idempotency key)
  and holds a lease on the pool's capacity until it finishes; provider reports renew the lease.
  A lease that expires without news makes the run LOST and asks the shell to reconcile, and
  again, with capped exponential backoff (``CoreConfig.reconcile_backoff``), until an answer
  comes.
- Failures are classified by the provider; the run's retry policy decides between RETRYING
  (with seeded, capped exponential backoff) and FAILED.
- After a restart, ``TasksRestored`` reloads runs from the store; every run that had an attempt
  out is reconciled by key before its capacity is reused.

No capacity
-----------
A provider reports ``FailureClass.NO_CAPACITY`` when the pool could not start an attempt (a
Kubernetes pod Unschedulable past ``unschedulable_after``, EC2's
``InsufficientInstanceCapacity``): the attempt never ran. That is not the retry policy's
business (``retry.REPLACED``): the core cancels the attempt at the provider (a pod still
waiting for a node must not start later, after the run went elsewhere), records why
(RETRYING with the class, the pool and the provider's message, then READY at once), and places
the run again in the same step's solve, without counting the attempt against
``max_attempts`` (its key is new, as for every attempt). The pool is left out of placements
of that **task shape** (CPUs, memory, GPUs and GPU models) for
``CoreConfig.no_capacity_cooldown`` seconds of the core's clock: a Kubernetes pool too
fragmented for a 4-GPU pod may still start a 1-CPU one, and runs of another shape are not
penalised for what one shape learned; an EC2 pool is one instance type, so every shape that
reaches it needs the same instance, and learns the same within one refusal each. A run
whose only pools are cooling down waits (READY) until the first cool-down ends, then is
offered them again; nothing is failed for it. ``CoreConfig.max_replaces`` bounds the
refusals in a row (reset when an attempt runs, or ends any other way): the next one fails
the run with the pools that refused it. After a restart the refusals are not known: those
attempts count against ``max_attempts`` again (conservative, never more attempts).

Elastic pools
-------------
A pool discovered with a node shape and ``max_instances`` > 0 (or a boot time, at its
maximum) is elastic: the placer may launch instances in it (``PlacementSolution.instances``).
The core acts on that number: it emits ``Provision(provider, pool, count, token)`` (before the
submits that use the new room) and counts the instances as capacity of the pool
(``_launched``) from then on, until a discovery that began after the provider answered
reports them (``PoolsDiscovered.settled``). ``Provisioned`` corrects the count to what the
provider really started; ``ElasticRefused`` drops it and holds the pool's launches until the
provider is discovered again. A pool whose leases exceed its capacity (the provider started
fewer instances than asked, refused some, or lost some) is given a Provision for what it
lacks, within its maximum, so runs already sent there do not wait for instances nobody
launches. An elastic pool with whole idle instances (free capacity of at least one node shape)
that no READY run could use, for ``CoreConfig.idle_grace`` seconds, gets
``Terminate(provider, pool, count, token)``; those instances stop counting at once
(``_terminating``) and the next settled discovery says how many the provider really stopped
(it stops only idle ones). Tokens are ``events.elastic_token(verb, pool, seq, epoch)`` with a
per-pool sequence the core keeps: deterministic, so a retried call and a restarted core carry
the same tokens.

Backlog
-------
A provider that queues work itself (the local driver's FIFO, the AWS driver's queue in front
of its instances) says so with ``Pool.queue_depth``: the core may keep up to that many waves
of the pool's capacity submitted beyond what fits, so the next run starts the moment one ends,
without a report, a solve and a submit in between, and a sweep goes out in a few large submit
calls instead of one per poll. How deep is bounded by time: each bucket keeps the runtime its
successful runs took (a moving average of the provider's start-to-end, ``_learn``), and a
round offers each such pool ``min(queue_depth, backlog_s / runtime)`` waves for the shortest
runtime among the READY buckets (``_backlog_round``); a class counts only on the waves its own
runtime allows (``_with_backlog``), so about ``CoreConfig.backlog_s`` seconds of work per slot
wait at a provider, whatever the shape: thousands of one-second trials, no hour-long ones
(a bucket with no run seen yet gets none). A pool is offered its backlog again only once half
of it has drained, not at every run that ends. The backlog is added to the free capacity the
placer sees and the answer is checked against, never to what an elastic pool may launch:
queued work is not an instance the pool lacks (``_allow``), and an idle instance is still one
with nothing leased. A pool whose discovery already scales its capacity to its queue (Slurm's
queue depth) leaves ``queue_depth`` at 0.

Budget
------
``CoreConfig.budget`` (``[policy] budget``) bounds what runs on priced elastic pools may cost:
this month and per experiment. The shell gives the dollars the store recorded so far
(``set_spending``: finished attempts); the core adds what it has committed and not seen billed
yet, the estimate of every run leased on a priced elastic pool (``_estimate``: the pool's
hourly price x the share of one instance the run takes x its ``runtime_s``, at least 60 s).
Before it orders a Provision the core estimates what the new instances add (count x hourly
price x the longest runtime among the runs placed there, at least 60 s); when
``SpendBudget.exceeded`` says the budget would be broken it provisions only as many as fit
(maybe none), and the runs that needed the rest stay READY, each with the budget's reason
recorded once (a READY -> READY transition, which ``stowplan status`` shows). A run placed on
instances already up is checked alone, with its own estimate: running it keeps an instance
that would otherwise stop when idle, so it adds cost too. A Provision that makes up for
instances an elastic pool lacks (``_make_up``) is never held: its runs were admitted already
and their cost is counted. Held runs are placed again when something changes (a run ends,
spending is refreshed): nothing is failed for the budget.

Account quotas
--------------
Elastic pools may share an account limit (``Pool.quota``: an EC2 vCPU quota covers every
instance type of some families in a region and market). Its pools, the *group*, launch from
one ``left``: what discovery found left, less what the instances the core counts as launched
since (``_launched``) in any pool of the group take (``_quota_left``). The placer sees each
pool's ``max_instances`` cut to what the group has left for it alone; the core cuts the
launches of an answer across the group, pool by pool in id order, to what is left, before
the budget (a launch cannot be bought past a quota), and the runs that needed the rest stay
READY with the quota's reason recorded once ("held: account quota L-DB2E81BA (G and VT
on-demand vCPUs) has 0 of 64 left in us-east-1 ..."), as do the runs no pool could take
while a quota, not the pools' own maximum, is what stops a launch. They are placed again
when a discovery shows more left (instances ended) or runs end on instances already up.

Approvals
---------
``CoreConfig.approvals`` is set where someone can approve (the shared-lab service). Then a
run the budget would hold (above) moves READY -> AWAITING_APPROVAL with the budget's reason
instead of waiting READY, and a run the placer put on a pool of a provider in
``Approvals.restricted`` does the same with that reason (nothing launches there for it). It
takes no capacity and is not placed while it waits. ``ApprovalDecided`` (the service checked
who may decide, and wrote the ledger) moves it back to READY, approved: no budget holds it, a
launch for it is not cut, restricted pools may take it; or, rejected, to CANCELLED with the
reason, its dependents with it. A decision on a run not waiting changes nothing. Without
approvals the budget holds runs READY and no pool is restricted. After a restart a waiting
run starts over from PENDING and asks again; one approved before (``RestoredTask.approved``,
from the ledger) does not.

Datasets
--------
``CoreConfig.context`` holds the datasets the core starts with (a ``stowplan run``'s own
experiment). A long-lived core (the shared-lab service) places submissions of experiments it
never saw at start: ``TasksSubmitted.datasets`` and ``TasksRestored.datasets`` add each
submission's inputs, by id (its URI); a later declaration of an id replaces the earlier one
(the newest knowledge of where a replica is). A residency rule the core's context does not
have (a submitted dataset's or task's) allows no site: its runs fail as any run no pool may
take does, with the rule named, instead of being placed where the rule would forbid. A run
naming a dataset the core
does not know (none was given with it) is placed as if the data were everywhere.

Sharing
-------
Runs submitted through the shared-lab service carry their ``team`` and ``user``.
``CoreConfig.teams`` gives each team's limits (``share.TeamLimits``); ``share.Ledger`` keeps
the GPUs each team holds by model (taken at lease, given back at release) and its GPU-seconds
in the rolling window. Each placement round first orders classes by priority (as stated,
across teams), then by the team's decayed usage over its weight, then by the user's usage
within the team, then by submission; then, for each class of a limited team that asks for
GPUs, ``Ledger.room`` says how many GPUs of each model the team may still take (its
maximum, its GPU-hours, and the GPUs other teams' unmet guarantees reserve while they have
runs waiting: the module doc of ``share``). The class is narrowed to the models with room
and cut to the members that fit the smallest room among them, so no choice of the placer
breaks a limit; what the round offered counts against the next class of the same team.
A class with no room stays READY with the reason recorded once (``held``, shown by
``stowplan status``); nothing is preempted: borrowed GPUs come back as borrowers' runs end.

Services
--------
A run whose task is a service (``TaskInstance.service``, ``spec.models.ServiceSpec``) is kept
running until it is cancelled. Whenever its attempt ends any other way (the provider reports
it succeeded, failed, was cancelled outside stowplan or is unknown; the shell's health checks
give up on it, ``ServiceUnhealthy``, which also cancels the attempt at the provider) the run
moves to RETRYING with the reason and the restart number, and back to READY after the
service's backoff (``retry.restart_seconds``: 10 s doubling to 5 min by default; the count
starts over after an attempt that ran ``reset_after``): the retry heap and its wake-up, as
for retries, and a new attempt with a new key once placed, as for any attempt. Restarts are
not the retry policy's business: they never fail the run. ``CancelRequested`` finishes it
(CANCELLED) in whatever state it is, cancelling a live attempt; a report that comes after is
stale. A service holds its lease, and counts against quotas and shares, while it is leased,
like any run. No run may depend on a service (the loader refuses it): it never SUCCEEDS.
``NO_CAPACITY`` is handled as for any run (*No capacity*).

Devices
-------
A pool discovered with ``Pool.devices`` (its GPUs by node and device) is placed on exactly:
the core keeps a ``placement.devices.DeviceLedger`` per such pool, and applying an answer
takes, for each run the placer put there, a node and device indices by
``PlacementContext.objective`` (``[placement] objective``: ``fgd``, fragmentation-aware, or
``bestfit``). The ``SubmitItem`` carries them (``DeviceLease``): the lease is the placement,
and the provider starts the attempt on those devices. A run that fits the pool's totals but no
node's devices (a k-GPU run needs k free devices on one node) is not placed: it stays READY
with the reason recorded once ("8 GPUs free on 5 nodes, none has 2 free devices"). The
placer sees pool totals, so the core leaves such a pool out of the placements of every
shape no node there holds now (as it leaves out pools cooling down): the run goes to a pool
whose devices hold it, at once, instead of being offered, forever, the pool that cannot;
where none can, it is not offered at all, and the members the left-out pools' totals would
have taken are held with the pool's reason (by pool id). Devices
come back when the run no longer holds its lease, whichever way the attempt ended; a pool
rediscovered with other devices keeps the holds its nodes still carry. The store records each
attempt's node and devices with its intent (``AttemptRecord.devices``); after a restart the
ledger takes each live attempt's back (``RestoredTask.lease``, ``DeviceLedger.hold``, by node
name) when the pool is first seen with its devices, so GPU runs go on the free devices at once.
A provider that binds devices itself (Slurm; ``Report.devices``) is followed: the hold moves
to the devices it names when they are free in the ledger, else the lease stands (the store
keeps what was reported). A restored lease whose node or devices are gone or held by another
run, or one recorded without devices (a store older than schema 8), is not known: while any
such run holds GPUs in the pool, no GPU run is given devices there (never two runs on one
device), and GPU runs' placements leave the pool out the same way, until it ends or a report
names its devices.

A run that asks for a share of one GPU (``TaskInstance.gpu_milli`` below 1000, ``gpus`` 1)
goes beside other shares on one device of a pool that shares its devices
(``PoolDevices.sharing``: the local provider, Kubernetes time-slicing, whose devices are handed
out in slices, so a share holds whole slices: ``PoolDevices.slice_milli``), and holds a whole
device elsewhere. The placer counts a share as one GPU, so ``free_capacity`` offers it such a
pool's room in shares of the smallest one waiting (``DeviceLedger.share_room``; a wholly free
device counts at least one); whole-GPU runs offered more than the wholly free devices hold are
refused there, as fragmented GPUs are. Teams' GPU limits and quotas count a share as one GPU.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any

import msgspec

from stowplan.errors import InternalError
from stowplan.placement.leases import DeviceLease, PoolDevices
from stowplan.placement.problem import (
    Assignment,
    Dataset,
    DemandClass,
    PlacementContext,
    PlacementProblem,
    PlacementSolution,
    Pool,
    Shape,
    expand,
)
from stowplan.scheduler.events import (
    ApprovalDecided,
    Cancel,
    CancelRequested,
    Command,
    ElasticRefused,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    Provision,
    Provisioned,
    Reconcile,
    ServiceUnhealthy,
    SolvePlacement,
    Submit,
    SubmitItem,
    TaskInstance,
    TasksRestored,
    TasksSubmitted,
    Terminate,
    Tick,
    Transition,
    Transitioned,
    WakeAt,
    elastic_token,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.retry import (
    REPLACED,
    Backoff,
    backoff_seconds,
    restart_seconds,
    restarts_after,
    should_retry,
)
from stowplan.scheduler.share import Approvals, Ledger, TeamLimits
from stowplan.scheduler.states import (
    ACTIVE,
    FINAL,
    LEASED,
    TRANSITIONS,
    IllegalTransition,
    TaskState,
    Trigger,
)
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import FailureClass, ServiceSpec, SpendBudget
from stowplan.spec.units import plural

if TYPE_CHECKING:
    from stowplan.placement.devices import DeviceLedger

MIN_RUNTIME_S = 0.1
"""a bucket's runtime counts as at least this when sizing a backlog: runs that end at once
still have their start to wait for."""
MIN_BILLED_S = 60.0
"""the least an instance is billed for (EC2, and the simulator's clouds): a budget estimate of a
run or a launch counts at least this long."""

NOWHERE = "(no site: the rule is not defined in this control plane's stowplan.toml)"
"""the one site a residency rule the core's context lacks allows: no pool is there."""

GPU_CPUS = 8.0
"""in fair-share usage, a GPU-second weighs as much as this many CPU-seconds."""

RECONCILE_BACKOFF = Backoff(base=30.0, cap=600.0)
"""A LOST run is reconciled again after 30 s, 60 s, ... at most every 10 minutes."""

# the hot paths (submit, place, move) look these up per run: a module global is a dict lookup,
# an enum member a metaclass attribute lookup (about 14x slower on Python 3.11)
_PENDING = TaskState.PENDING
_SUCCEEDED = TaskState.SUCCEEDED
_FAILED = TaskState.FAILED
_CANCELLED = TaskState.CANCELLED
_T_DEP_FAILED = Trigger.DEP_FAILED
_T_CANCEL = Trigger.CANCEL
_T_PLACED = Trigger.PLACED
_T_SUBMIT = Trigger.SUBMIT


@dataclass(frozen=True, slots=True)
class CoreConfig:
    lease_ttl: float = 900.0
    """seconds a leased run may go without a provider report before it is LOST."""
    fair_share_half_life: float = 3600.0
    seed: int = 0
    reconcile_backoff: Backoff = RECONCILE_BACKOFF
    """how long to wait for a LOST run's reconcile answer before asking again (and again)."""
    context: PlacementContext = dc_field(default_factory=lambda: PlacementContext())
    """the network, datasets, residency rules and weights every placement problem carries."""
    idle_grace: float = 120.0
    """seconds whole instances of an elastic pool stay idle (no READY run could use them)
    before the core terminates them."""
    token_epoch: str = ""
    """mixed into every provision/terminate token (``events.elastic_token``): two control
    planes with different epochs never share a token; a restarted one keeps its epoch."""
    no_capacity_cooldown: float = 600.0
    """seconds a pool that could not start an attempt (``FailureClass.NO_CAPACITY``) is left
    out of placements of that task shape (module doc: *No capacity*)."""
    max_replaces: int = 8
    """a run is placed again at most this many times in a row after ``NO_CAPACITY``; the next
    refusal fails it."""
    budget: SpendBudget | None = None
    """``[policy] budget``: what runs on priced elastic pools may cost (module doc: *Budget*);
    None: no limit. ``SchedulerCore.set_spending`` replaces it and gives what was spent."""
    teams: Mapping[str, TeamLimits] = dc_field(default_factory=dict)
    """``[service.teams]``: each team's GPU limits, guarantees and GPU-hours (module doc:
    *Sharing*); runs of a team not named here, or of no team, are not limited by sharing."""
    approvals: Approvals | None = None
    """where someone can approve (the service): runs a budget would hold, or placed on a
    restricted provider's pool, wait in AWAITING_APPROVAL (module doc: *Approvals*); None:
    a budget holds them READY and no pool is restricted."""
    backlog_s: float = 30.0
    """the most expected work, in seconds per slot, the core keeps queued at a provider that
    queues work itself (``Pool.queue_depth``; module doc: *Backlog*); 0: none."""


_Free = dict[str, tuple[float, int, dict[str, int]]]
"""pool id -> free (CPUs, memory, GPUs by model)."""
_SharingRound = tuple[Counter[str], dict[str, Counter[str]], dict[str, Counter[str]]]
"""``SchedulerCore._sharing_round``: lab free GPUs, team -> waiting GPUs, team -> offered."""


class _Run:
    __slots__ = (
        "approved",
        "attempt",
        "bucket",
        "dependents",
        "est_usd",
        "gpu_model",
        "held",
        "key",
        "lease_until",
        "pool",
        "provider",
        "ready_at",
        "reconcile_token",
        "reconciles",
        "reconciling",
        "refused_in",
        "replaced",
        "restarts",
        "seq",
        "started_at",
        "state",
        "task",
        "uncounted",
        "waiting",
    )

    def __init__(self, task: TaskInstance, seq: int) -> None:
        self.task = task
        self.seq = seq
        self.state = TaskState.PENDING
        self.attempt = 0
        self.key = ""
        self.pool: str | None = None
        self.provider: str | None = None
        self.gpu_model: str | None = None
        self.waiting = 0
        self.dependents: list[str] | tuple[()] = ()
        """the runs waiting on this one; a list from the first (most runs have none)."""
        self.ready_at = 0.0
        self.lease_until = 0.0
        self.started_at: float | None = None
        self.reconciling = False
        self.reconciles = 0
        """reconciles sent since the run was last found LOST."""
        self.reconcile_token = 0
        """the live entry of the core's reconcile heap for this run (older ones are stale)."""
        self.bucket: tuple[object, ...] | None = None
        self.approved = False
        """someone approved it: no budget holds it, restricted pools may take it."""
        self.replaced = 0
        """NO_CAPACITY refusals in a row (since an attempt last ran or ended otherwise)."""
        self.refused_in: tuple[str, ...] = ()
        """the pools of those refusals, in order."""
        self.uncounted = 0
        """attempts that never ran (NO_CAPACITY): not counted against ``max_attempts``."""
        self.restarts = 0
        """a service's restarts since its count was last reset (module doc: *Services*)."""
        self.est_usd = 0.0
        """while leased on a priced elastic pool: what the attempt is estimated to cost."""
        self.held = ""
        """while READY: why the budget holds it (recorded once per reason)."""


@dataclass(slots=True)
class _Order:
    """A Provision or Terminate the core still counts (until a discovery settles it)."""

    provider: str
    pool: str
    count: int
    provision: bool


_BOUND = (ProviderState.QUEUED, ProviderState.RUNNING)
"""report states in which the attempt still holds devices a provider may name (``_follow``)."""

_NOTHING_USED = (0.0, 0.0)
_MILLI = 1000  # ``placement.leases.MILLI``: one whole GPU in thousandths
_NO_GPUS: Counter[str] = Counter()


class _Room:
    """A pool's free capacity while one placement answer is applied, run by run."""

    __slots__ = ("blocked", "cpus", "devices", "gpus", "memory", "refuse", "tasks")

    def __init__(
        self,
        cpus: float,
        memory: int,
        gpus: dict[str, int],
        tasks: int | None,
        devices: DeviceLedger | None = None,
        refuse: Callable[[TaskInstance, str], None] | None = None,
        blocked: str = "",
    ) -> None:
        self.cpus = cpus
        self.memory = memory
        self.gpus = gpus
        self.tasks = tasks
        self.devices = devices
        """the pool's devices (``Pool.devices``): a run goes on a node's devices or not at all."""
        self.refuse = refuse
        """told why, when a run fits the pool's totals but no node's devices."""
        self.blocked = blocked
        """why no GPU run may take devices here now ("" when it may)."""

    def take(self, t: TaskInstance, gpu_model: str) -> str | None:
        """Take room for one run of ``t`` and return its GPU model ("" without GPUs; the
        placer's choice, else the freest allowed, as ``SchedulerCore._lease`` would pick), or
        None, taking nothing, when it does not fit."""
        if t.cpus > self.cpus + 1e-9 or t.memory > self.memory:
            return None
        if self.tasks is not None and self.tasks < 1:
            return None
        model = ""
        dev = self.devices
        if t.gpus:
            if gpu_model:
                model = gpu_model
            elif dev is None:
                models = t.gpu_types or tuple(self.gpus)
                if not models:
                    return None
                model = max(models, key=lambda m: (self.gpus.get(m, 0), m))
            if model and self.gpus.get(model, 0) < t.gpus:
                return None
        if dev is not None:
            # the devices choose the model where the placer did not: the freest in total may
            # have no node that holds the run
            allowed = (
                (model,)
                if model or not t.gpus
                else tuple(
                    sorted(m for m in t.gpu_types or self.gpus if self.gpus.get(m, 0) >= t.gpus)
                )
            )
            if not allowed:
                return None
            task = dev.task(t.cpus, t.memory, t.gpus, allowed, t.gpu_milli, t.nodes)
            why = self.blocked if task is not None and t.gpus else ""
            if task is not None and not why:
                why = dev.take(t.run_id, task) or ""
            if why:
                if self.refuse is not None:
                    self.refuse(t, why)
                return None
            if task is not None and t.gpus:
                model = dev.model_of(t.run_id)
        if t.gpus:
            self.gpus[model] -= t.gpus
        self.cpus -= t.cpus
        self.memory -= t.memory
        if self.tasks is not None:
            self.tasks -= 1
        return model

    def give_back(self, t: TaskInstance, gpu_model: str) -> None:
        if self.devices is not None:
            self.devices.give(t.run_id)
        self.cpus += t.cpus
        self.memory += t.memory
        if gpu_model:
            self.gpus[gpu_model] += t.gpus
        if self.tasks is not None:
            self.tasks += 1


_Shape = tuple[float, int, int, tuple[str, ...], int, int]


def _shape(t: TaskInstance) -> _Shape:
    """What a pool that could not start ``t`` could not start (module doc: *No capacity*)."""
    return (t.cpus, t.memory, t.gpus, t.gpu_types, t.gpu_milli, t.nodes)


def _device_why(t: TaskInstance, ledger: DeviceLedger | None, blocked: str) -> str:
    """Why no node of ``ledger`` holds a run of ``t``'s shape now ("" when one does, or when
    the ledger does not count what it needs): the reason ``_Room.take`` would record."""
    if ledger is None:
        return ""
    models = t.gpu_types or tuple(ledger.model.models)
    task = ledger.task(t.cpus, t.memory, t.gpus, models, t.gpu_milli, t.nodes)
    if task is None:
        return ""
    if t.gpus and blocked:
        return blocked
    why = ledger.model.why_not_gang(task)
    if why is None:
        return ""
    return _too_wide(t.gpus, t.gpu_types, ledger.spec, t.nodes) or why or "no node can hold it"


def _node_text(node: Shape) -> str:
    """``8 CPUs, 8 GiB, 2 x fake``: one node's shape, as refusals name it."""
    gpus = "".join(f", {n} x {m}" for m, n in sorted(node.gpus.items()) if n)
    return f"{plural(node.cpus, 'CPU')}, {node.memory / 2**30:.3g} GiB{gpus}"


def _too_wide(
    gpus: int, models: tuple[str, ...], devices: PoolDevices | None, nodes: int = 1
) -> str:
    """Why no node of a pool with ``devices`` could ever hold a run of ``gpus`` GPUs of one
    of ``models`` (any: empty), every device free ("" when one could, or the pool does not
    lease devices): a pool that leases devices places a run (a gang: each node's part) on one
    node, so such a run is refused there for good, not held (module doc: *Devices*)."""
    gpus //= max(1, nodes)
    if devices is None or gpus <= 0:
        return ""
    accepted = [n for n in devices.nodes if n.devices and (not models or n.model in models)]
    if not accepted:
        return ""  # no GPU it accepts there: the pool is not eligible, for that reason
    widest = max(accepted, key=lambda n: len(n.devices))  # the first of the widest, by order
    if gpus <= len(widest.devices):
        return ""
    return f"no node has {gpus} GPUs (the widest, {widest.name}, has {len(widest.devices)}): " + (
        "a pool that leases devices places a run on one node"
        if nodes <= 1
        else f"each of the gang's {nodes} nodes holds {gpus}"
    )


def _plus(
    free: tuple[float, int, dict[str, int]], more: tuple[float, int, dict[str, int]] | None
) -> tuple[float, int, dict[str, int]]:
    """Free capacity with ``more`` room added (a backlog), or as it is for None."""
    if more is None:
        return free
    gpus = dict(free[2])
    for m, n in more[2].items():
        gpus[m] = gpus.get(m, 0) + n
    return free[0] + more[0], free[1] + more[1], gpus


def _bucket_key(t: TaskInstance) -> tuple[object, ...]:
    return (
        t.project,
        t.priority,
        t.cpus,
        t.memory,
        t.gpus,
        t.gpu_types,
        t.gpu_milli,
        t.nodes,
        t.allowed_providers,
        t.group if t.max_concurrent else "",
        t.datasets,
        t.runtime_s,
        t.require_sites,
        t.forbid_sites,
        t.forbid_pools,
        t.residency,
        t.hardware_class,
        t.tolerations,
        t.team,
        t.user,
    )


def _runtime(problem: PlacementProblem, solution: PlacementSolution, pool_id: str) -> float:
    """The longest ``runtime_s`` among the classes ``solution`` places in ``pool_id``."""
    runtimes = {c.id: c.runtime_s for c in problem.classes}
    return max(
        (runtimes.get(a.class_id, 3600.0) for a in solution.assignments if a.pool_id == pool_id),
        default=3600.0,
    )


class SchedulerCore:
    def __init__(self, config: CoreConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self._runs: dict[str, _Run] = {}
        self._by_key: dict[str, str] = {}
        self._completed: set[str] = set()
        self._seq = 0
        self._pools: dict[str, Pool] = {}
        self._provider_pools: dict[str, list[str]] = {}
        self._used: dict[str, list[float]] = {}
        self._used_gpus: dict[str, Counter[str]] = {}
        self._ready: dict[tuple[object, ...], dict[str, None]] = {}
        self._buckets: dict[tuple[object, ...], tuple[object, ...]] = {}
        """each ``_bucket_key`` value once (``_Run.bucket`` points at it); as ``_ready``, it
        keeps a key per distinct bucket ever seen."""
        self._group_active: Counter[str] = Counter()
        self._usage: dict[str, tuple[float, float]] = {}
        self._retry_heap: list[tuple[float, int, str]] = []
        self._reconcile_heap: list[tuple[float, int, str]] = []
        """(when, token, run id): LOST runs to reconcile again if no answer came by then."""
        self._reconcile_tokens = 0
        self._next_lease_check = float("inf")
        self._solving: PlacementProblem | None = None
        self._request_id = 0
        self._sent_request = 0
        self._wake: float | None = None
        self.counts: Counter[TaskState] = Counter()
        self.ignored_reports = 0
        # per-handle scratch
        self._out_transitions: list[Transition] = []
        self._out_submits: dict[tuple[str, str, bool], list[SubmitItem]] = {}
        self._out_cancels: dict[str, list[str]] = {}
        self._out_reconcile: dict[str, list[str]] = {}
        self._now = 0.0
        self._generation = 0
        """bumped by every change that could let a new solve place more (see the module doc)."""
        self._solve_generation = 0
        """the generation the request in flight was made at."""
        self._stalled_at = -1
        """an answer to a request made at this generation placed nothing: until the generation
        moves on, a new solve would place nothing either."""
        self._eligible: dict[tuple[object, ...], tuple[list[Pool], bool]] = {}
        """per bucket, the pools that could ever run it (free capacity aside) and whether any of
        them is large enough for one member: pools change only on discovery, which clears it."""
        self._in_pool: Counter[str] = Counter()
        """stowplan's tasks holding a lease in each pool, for pool quotas (max_tasks)."""
        self._launched: Counter[str] = Counter()
        """instances provisioned in elastic pools that no discovery has reported yet."""
        self._terminating: Counter[str] = Counter()
        """idle instances asked to stop that a discovery has not shown gone yet."""
        self._orders: dict[str, _Order] = {}
        """token -> the Provision or Terminate it names, while the core counts it."""
        self._elastic_seq: Counter[str] = Counter()
        """per pool, provisions and terminations decided (the tokens' sequence)."""
        self._elastic: set[str] = set()
        """pools ever discovered elastic: with a node shape and ``max_instances`` or a boot
        time (a pool at its maximum can launch no more, yet its idle instances may stop)."""
        self._refused: set[str] = set()
        """elastic pools whose provider refused an order: no launch nor stop until rediscovered."""
        self._took: dict[tuple[object, ...], float] = {}
        """per bucket, the runtime its successful runs took (a moving average, seconds)."""
        self._offer: _Free = {}
        """per pool, the backlog offered in the solve in flight (module doc: *Backlog*)."""
        self._allow: _Free = {}
        """per pool, the backlog last offered while work is queued there beyond its capacity:
        that queueing is on purpose, not instances the pool lacks."""
        self._idle_since: dict[str, float] = {}
        """elastic pools with whole idle instances, since when."""
        self._node_fit: dict[tuple[tuple[object, ...], str], bool] = {}
        """(bucket, elastic pool) -> whether a run of the bucket could ever use one instance."""
        self._out_elastic: list[Provision | Terminate] = []
        self._cooling: dict[_Shape, dict[str, float]] = {}
        """shape -> pool -> until when it is left out of that shape's placements (NO_CAPACITY)."""
        self._cool_next = float("inf")
        """when the first cool-down ends."""
        self._budget = self.config.budget
        self._share = Ledger(self.config.teams)
        self._spent = (0.0, 0.0)
        """dollars recorded this month and by this experiment (``set_spending``)."""
        self._committed = 0.0
        """estimated dollars of the runs leased on priced elastic pools (module doc: *Budget*)."""
        self._quota_groups: tuple[int, dict[str, list[Pool]]] = (-1, {})
        """(generation, quota group -> its pools by id): ``_groups``, rebuilt when it moved."""
        ctx = self.config.context
        self._datasets: dict[str, Dataset] = {d.id: d for d in ctx.datasets}
        self._residency: dict[str, tuple[str, ...]] = dict(ctx.residency)
        self._context_problem = self._problem([], [])
        self._devices: dict[str, DeviceLedger] = {}
        """per pool that knows its devices, what each run holds there (module doc: *Devices*)."""
        self._restoring: dict[str, dict[str, DeviceLease]] = {}
        """per pool, the leases of restored attempts its ledger has not taken back yet (it is
        built when the pool is first seen with its devices)."""
        self._device_fit: tuple[
            tuple[int, int],
            dict[tuple[str, _Shape], str],
            dict[str, tuple[DeviceLedger | None, str]],
        ] = ((-1, -1), {}, {})
        """((generation, request id), (pool, shape) -> why no node there holds it, pool -> its
        ledger and why it is blocked): ``_device_refusals``' answers, valid while no lease
        moved (a lease taken is a solve answered, one given back a new generation)."""

    # ---- public -------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Command]:
        """Apply one event at time ``now``; return the commands to carry out, in order."""
        self._now = now
        if isinstance(event, TasksSubmitted):
            self._on_submitted(event)
        elif isinstance(event, ProviderReported):
            self._on_reports(event.provider, event.reports)
        elif isinstance(event, PlacementDecided):
            self._on_placement(event.solution)
        elif isinstance(event, PoolsDiscovered):
            self._on_pools(event)
        elif isinstance(event, Tick):
            self._on_tick()
        elif isinstance(event, CancelRequested):
            self._on_cancel(event)
        elif isinstance(event, TasksRestored):
            self._on_restored(event)
        elif isinstance(event, Provisioned):
            self._on_provisioned(event)
        elif isinstance(event, ElasticRefused):
            self._on_refused(event)
        elif isinstance(event, ApprovalDecided):
            self._on_decided(event)
        elif isinstance(event, ServiceUnhealthy):
            self._on_unhealthy(event)
        else:  # pragma: no cover - the union is closed
            raise InternalError(f"unknown event {type(event).__name__}")
        return self._flush()

    def state(self, run_id: str) -> TaskState:
        return self._runs[run_id].state

    def attempt(self, run_id: str) -> int:
        return self._runs[run_id].attempt

    def key(self, run_id: str) -> str:
        return self._runs[run_id].key

    def service(self, run_id: str) -> ServiceSpec | None:
        """The service policy of ``run_id`` (None for a normal run)."""
        return self._runs[run_id].task.service

    def service_restarts(self, run_id: str) -> int:
        """A service's restarts since its count was last reset (0 for a normal run)."""
        return self._runs[run_id].restarts

    def uncounted_attempts(self, run_id: str) -> int:
        """Attempts of ``run_id`` that never ran (NO_CAPACITY): ``attempt`` less these is what
        the retry policy's ``max_attempts`` bounds."""
        return self._runs[run_id].uncounted

    def cooling(self, task: TaskInstance) -> list[str]:
        """The pools left out of placements of ``task``'s shape now (sorted)."""
        pools = self._cooling.get(_shape(task), {})
        return sorted(p for p, until in pools.items() if until > self._now)

    def pool(self, run_id: str) -> str | None:
        return self._runs[run_id].pool

    def held(self, run_id: str) -> str:
        """Why the budget holds READY run ``run_id`` now ("" when it does not)."""
        run = self._runs[run_id]
        return run.held if run.state is TaskState.READY else ""

    def sharing(self) -> dict[str, dict[str, Any]]:
        """Each team of ``CoreConfig.teams``: the GPUs it holds by model, the GPU-hours it
        used in its window, the GPUs its READY runs wait for, and its limits."""
        waiting: dict[str, int] = {}
        for bucket in self._ready.values():
            for run_id in bucket:
                t = self._runs[run_id].task
                if t.team and t.gpus:
                    waiting[t.team] = waiting.get(t.team, 0) + t.gpus
        return {
            team: {
                "holds": dict(sorted(self._share.held.get(team, Counter()).items())),
                "gpu_hours": self._share.gpu_seconds(team, self._now) / 3600,
                "waiting_gpus": waiting.get(team, 0),
                "spent_usd": self._share.spent_usd.get(team, 0.0),
                "running_usd": max(0.0, self._share.committed_usd.get(team, 0.0)),
                "limits": msgspec.to_builtins(limits),
            }
            for team, limits in sorted(self._share.teams.items())
        }

    @property
    def committed_usd(self) -> float:
        """Estimated dollars of the runs leased on priced elastic pools now."""
        return max(0.0, self._committed)

    def set_spending(
        self, *, month_usd: float, experiment_usd: float, budget: SpendBudget | None = None
    ) -> None:
        """What the store recorded as spent on elastic providers (finished attempts), this
        month and by this experiment, and the budget (it replaces ``CoreConfig.budget``). The
        shell calls it between events; more room lets held runs be placed again."""
        before = self._budget, self._spent
        self._budget = budget
        self._spent = (month_usd, experiment_usd)
        if (self._budget, self._spent) != before:
            self._generation += 1

    def run_of_key(self, key: str) -> str | None:
        return self._by_key.get(key)

    def attempt_of_key(self, key: str) -> tuple[str, int, str | None] | None:
        """``(run id, attempt, pool)`` of the run attempt ``key`` was made for, the attempt
        and pool being the run's latest (as ``attempt`` and ``pool`` give them), in one
        lookup; None for a key this core never made."""
        run_id = self._by_key.get(key)
        if run_id is None:
            return None
        run = self._runs[run_id]
        return run_id, run.attempt, run.pool

    def counts_order(self, token: str) -> bool:
        """Whether the core still counts the Provision or Terminate of ``token`` (the shell
        tries a failed call again only while it does)."""
        return token in self._orders

    def launched(self, pool_id: str) -> int:
        """Instances the core counts in ``pool_id`` beyond its last discovery (launched, less
        those being stopped)."""
        return self._launched.get(pool_id, 0) - self._terminating.get(pool_id, 0)

    def run_ids(self) -> Iterable[str]:
        return self._runs.keys()

    def unfinished(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in FINAL)

    def free_capacity(self, pool_id: str) -> tuple[float, int, dict[str, int]]:
        pool = self._pools[pool_id]
        used = self._used.get(pool_id, _NOTHING_USED)
        gpus_used = self._used_gpus.get(pool_id, _NO_GPUS)
        cpus, memory = pool.cpus, pool.memory
        total = pool.gpus
        k = self._launched.get(pool_id, 0) - self._terminating.get(pool_id, 0)
        if k and pool.node is not None:  # instances launched (or stopping) beyond discovery
            cpus += k * pool.node.cpus
            memory += k * pool.node.memory
            total = dict(total)
            for m, n in pool.node.gpus.items():
                total[m] = total.get(m, 0) + k * n
        gpus = {m: total[m] - gpus_used.get(m, 0) for m in sorted(total)}
        if pool.devices is not None and pool.devices.sharing:
            # the placer counts a share as one GPU, and several share a device: the room
            # left on the devices, in shares, is what the pool has (module doc: *Devices*)
            grain = self._share_grain()
            ledger = self._ledger(pool) if grain < _MILLI or gpus_used else None
            if ledger is not None and not self._blocked(pool, ledger):
                room = ledger.share_room(grain)
                gpus = {m: room.get(m, 0) for m in sorted(total)}
        return cpus - used[0], int(memory - used[1]), gpus

    def _share_grain(self) -> int:
        """The smallest share of one GPU a waiting run asks for (``MILLI`` when none asks for
        a share): a pool that shares its devices counts its room in shares of that size."""
        grain = _MILLI
        for key, runs in self._ready.items():
            milli = key[6]  # gpu_milli (``_bucket_key``)
            if runs and isinstance(milli, int) and milli < grain:
                grain = milli
        return grain

    # ---- events -------------------------------------------------------------------------

    def _add(self, task: TaskInstance) -> _Run | None:
        run_id = task.run_id
        runs = self._runs
        if run_id in runs or run_id in self._completed:
            return None  # submitting the same run twice finds the first
        run = runs[run_id] = _Run(task, self._seq)
        self._seq += 1
        self.counts[_PENDING] += 1
        return run

    def _link(self, run: _Run) -> None:
        """Count unfinished dependencies; fail or cancel at once if one already did."""
        depends_on = run.task.depends_on
        if not depends_on:  # most runs (a sweep's trials): ready at once
            self._make_ready(run)
            return
        waiting = 0
        completed, runs = self._completed, self._runs
        for dep in depends_on:
            if dep in completed:
                continue
            d = runs.get(dep)
            if d is None:
                raise InternalError(f"run {run.task.run_id[:12]} depends on unknown run {dep[:12]}")
            state = d.state
            if state is _SUCCEEDED:
                continue
            if state is _FAILED:
                self._move(
                    run,
                    _T_DEP_FAILED,
                    FailureClass.DEPENDENCY_FAILED,
                    f"dependency {dep[:12]} failed",
                )
                return
            if state is _CANCELLED:
                self._move(
                    run,
                    _T_CANCEL,
                    FailureClass.CANCELLED,
                    f"dependency {dep[:12]} was cancelled",
                )
                return
            if isinstance(d.dependents, list):
                d.dependents.append(run.task.run_id)
            else:
                d.dependents = [run.task.run_id]
            waiting += 1
        run.waiting = waiting
        if waiting == 0:
            self._make_ready(run)

    def _on_submitted(self, ev: TasksSubmitted) -> None:
        self._add_datasets(ev.datasets, ev.tasks)
        self._completed.update(ev.completed)
        add, link = self._add, self._link
        added = [r for r in map(add, ev.tasks) if r is not None]
        for run in added:
            link(run)
        self._maybe_solve()

    def _on_restored(self, ev: TasksRestored) -> None:
        self._add_datasets(ev.datasets, (rt.task for rt in ev.tasks))
        self._completed.update(ev.completed)
        self._generation += 1  # restored leases change what an answer in flight may still place
        linked: list[_Run] = []
        for rt in ev.tasks:
            run = self._add(rt.task)
            if run is None:
                continue
            run.attempt = rt.attempt
            run.uncounted = rt.uncounted
            run.approved = rt.approved
            run.key = rt.key or (attempt_key(rt.task.run_id, rt.attempt) if rt.attempt else "")
            state = rt.state
            self.counts[TaskState.PENDING] -= 1
            if state in FINAL:
                run.state = state
                self.counts[state] += 1
                continue
            if state in LEASED:
                if rt.provider is None or rt.pool is None:
                    raise InternalError(f"restored run {rt.task.run_id[:12]} has no provider")
                run.state = state
                self.counts[state] += 1
                run.provider, run.pool = rt.provider, rt.pool
                self._by_key[run.key] = rt.task.run_id
                gpu_model = ""
                if rt.lease is not None:  # its devices go back to the pool's ledger
                    self._restoring.setdefault(rt.pool, {})[rt.task.run_id] = rt.lease
                    gpu_model = self._node_model(rt.pool, rt.lease.node, rt.task)
                self._lease(run, gpu_model)
                if rt.task.max_concurrent:  # _move counts the others; this one bypassed it
                    self._group_active[rt.task.group] += 1
                run.reconciling = True
                if state is TaskState.LOST:
                    self._reconcile_lost(run)
                else:  # if no answer comes, the lease expires and it is reconciled as LOST
                    self._out_reconcile.setdefault(rt.provider, []).append(run.key)
                continue
            # PENDING, READY, PLACED (never submitted) and RETRYING start over from PENDING
            run.state = TaskState.PENDING
            self.counts[TaskState.PENDING] += 1
            linked.append(run)
        for run in linked:
            self._link(run)
        for pool_id in sorted(self._restoring):
            pool = self._pools.get(pool_id)
            if pool is not None:
                self._ledger(pool)  # takes the restored leases back now, if it knows devices
        self._maybe_solve()

    def _node_model(self, pool_id: str, node: str, t: TaskInstance) -> str:
        """The GPU model of the node named ``node`` in the devices of ``pool_id``, where ``t``
        accepts it ("" when not known: the core picks one as for any restored lease)."""
        pool = self._pools.get(pool_id)
        if not t.gpus or pool is None or pool.devices is None:
            return ""
        model = next((n.model for n in pool.devices.nodes if n.name == node), "")
        return model if model in (t.gpu_types or pool.gpus) else ""

    def _on_pools(self, ev: PoolsDiscovered) -> None:
        self._generation += 1
        self._eligible.clear()
        self._node_fit.clear()
        for old in self._provider_pools.get(ev.provider, []):
            self._pools.pop(old, None)
            self._refused.discard(old)
        self._provider_pools[ev.provider] = sorted(p.id for p in ev.pools)
        for p in ev.pools:
            if p.provider != ev.provider:
                raise InternalError(f"pool {p.id} reported by {ev.provider} names {p.provider}")
            self._pools[p.id] = p
            if p.node is not None and (p.max_instances > 0 or p.boot_s > 0):
                self._elastic.add(p.id)  # at its maximum, an elastic pool still boots
        for token in ev.settled:  # the provider now counts what these launched or stopped
            order = self._orders.get(token)
            if order is not None and order.provider == ev.provider:
                self._drop_order(token)
        for p in ev.pools:  # before a solve, which must not count on the missing instances
            if p.id in self._elastic:
                self._make_up(p)
            if p.id in self._restoring:
                self._ledger(p)  # restored leases back in the ledger (module doc: *Devices*)
        self._maybe_solve()

    def _drop_order(self, token: str) -> None:
        order = self._orders.pop(token)
        counter = self._launched if order.provision else self._terminating
        counter[order.pool] -= order.count
        if counter[order.pool] <= 0:
            del counter[order.pool]

    def _on_provisioned(self, ev: Provisioned) -> None:
        order = self._orders.get(ev.token)
        if order is None or not order.provision:
            return  # settled by a discovery already (or not ours)
        n = len(ev.instances)
        if n != order.count:  # fewer (or, for a token reused after a restart, other) instances
            self._launched[order.pool] += n - order.count
            order.count = n
            if n > 0:
                self._generation += 1
            if self._launched[order.pool] <= 0:
                del self._launched[order.pool]
            pool = self._pools.get(order.pool)
            if pool is not None:
                self._make_up(pool)
        self._maybe_solve()

    def _on_refused(self, ev: ElasticRefused) -> None:
        if ev.token not in self._orders:
            return
        pool = self._orders[ev.token].pool
        self._drop_order(ev.token)
        self._refused.add(pool)
        self._idle_since.pop(pool, None)
        self._maybe_solve()

    def _order(self, pool: Pool, count: int, provision: bool) -> None:
        """Decide a Provision (or Terminate) of ``count`` instances of ``pool``."""
        self._elastic_seq[pool.id] += 1
        verb = "provision" if provision else "terminate"
        token = elastic_token(verb, pool.id, self._elastic_seq[pool.id], self.config.token_epoch)
        self._orders[token] = _Order(pool.provider, pool.id, count, provision)
        if provision:
            self._launched[pool.id] += count
            self._out_elastic.append(
                Provision(provider=pool.provider, pool=pool.id, count=count, token=token)
            )
        else:
            self._terminating[pool.id] += count
            self._out_elastic.append(
                Terminate(provider=pool.provider, pool=pool.id, count=count, token=token)
            )

    def _on_placement(self, solution: PlacementSolution) -> None:
        problem = self._solving
        if problem is None or solution.request_id != problem.request_id:
            return  # an answer to a request we no longer wait for
        self._solving = None
        held: dict[str, str] = {}  # elastic pool -> why (some of) its launch was not ordered
        quota_held: dict[str, str] = {}  # the same, for an account quota (never approvable)
        launching: set[str] = set()
        extra = 0.0  # the estimate of the launches ordered so far in this answer
        assigned = list(expand(problem, solution))
        # a launch for an approved run is not held: someone accepted what it costs
        approved = {a.pool_id for a in assigned if self._runs[a.class_id].approved}
        restricted = self.config.approvals.restricted if self.config.approvals else ()
        over_month = self._over_month(assigned)
        needed = {a.pool_id for a in assigned if a.class_id not in over_month}
        for pid, k in sorted(solution.instances.items()):
            p = self._pools.get(pid)
            if p is None or p.node is None or pid in self._refused or k <= 0:
                continue
            if p.provider in restricted and pid not in approved:
                continue  # nothing launches there for runs that must ask first
            if pid not in needed:
                continue  # every run it was for would break its team's month
            k = min(k, p.max_instances - self._launched.get(pid, 0))  # rediscovered smaller?
            quota_room = self._quota_room(p)
            cut = quota_room is not None and k > quota_room
            if quota_room is not None and cut:
                k = quota_room  # an account quota the group's launches share
            if k > 0 and self._budget is not None and p.price_per_hour > 0 and pid not in approved:
                unit = p.price_per_hour * max(_runtime(problem, solution, pid), MIN_BILLED_S)
                unit /= 3600.0
                if self._over_budget(extra + k * unit) is not None:
                    while k > 0 and self._over_budget(extra + k * unit) is not None:
                        k -= 1
                    # each run left waiting is told what its own instance would add
                    held[pid] = self._over_budget(unit, extra + k * unit) or ""
                extra += k * unit
            if k > 0:
                launching.add(pid)
                self._order(p, k, provision=True)
            if cut and pid not in held:
                quota_held[pid] = self._quota_why(p)  # what is left once these launched
        rooms: dict[str, _Room] = {}
        placed = 0
        for a in assigned:  # one per run, in the solution's order
            pool = self._pools.get(a.pool_id)
            if pool is None:
                continue
            room = rooms.get(pool.id)
            if room is None:
                room = rooms[pool.id] = self._room(pool)
            run = self._runs[a.class_id]
            if run.state is not TaskState.READY:
                continue  # cancelled while the solver ran
            if run.task.run_id in over_month:
                self._over(run, over_month[run.task.run_id])
                continue
            if restricted and pool.provider in restricted and not run.approved:
                self._ask(
                    run,
                    f"placed on pool {pool.id}: provider {pool.provider} is "
                    "restricted, a run goes there only once approved",
                )
                continue
            gpu_model = room.take(run.task, a.gpu_model)
            if gpu_model is None:
                if pool.id in held:  # the room it needed was not launched: over budget
                    self._over(run, held[pool.id])
                elif pool.id in quota_held:  # not launched: an account quota
                    self._hold(run, quota_held[pool.id])
                continue  # no room left now (the pool shrank meanwhile): stays READY
            if run.task.max_concurrent and (
                self._group_active[run.task.group] >= run.task.max_concurrent
            ):
                room.give_back(run.task, gpu_model)
                continue
            if pool.id not in launching and self._priced(pool) and not run.approved:
                # on instances already up: it keeps one from stopping, which costs too
                why = self._over_budget(self._estimate(run.task, pool))
                if why is not None:
                    room.give_back(run.task, gpu_model)
                    self._over(run, why)
                    continue
            self._dispatch(run, pool, gpu_model)
            placed += 1
        self._quota_unplaced(problem, assigned)
        if placed == 0 and self._generation == self._solve_generation:
            # asking again would give the same answer, at once, forever: wait for a change
            self._stalled_at = self._generation
        self._maybe_solve()

    def _over_month(self, assigned: list[Assignment]) -> dict[str, str]:
        """Run id -> why, for the runs of an answer that would break their team's monthly
        cloud spend (``TeamLimits.monthly_usd``), counting the team's runs before them."""
        out: dict[str, str] = {}
        extra: dict[str, float] = {}
        for a in assigned:
            run = self._runs[a.class_id]
            team = run.task.team
            pool = self._pools.get(a.pool_id)
            if not team or run.approved or pool is None or not self._priced_pool(pool):
                continue
            if run.state is not TaskState.READY:
                continue
            est = self._estimate(run.task, pool)
            why = self._share.over_month(team, est, extra.get(team, 0.0))
            if why is None:
                extra[team] = extra.get(team, 0.0) + est
            else:
                out[run.task.run_id] = why
        return out

    def _priced(self, pool: Pool) -> bool:
        return self._budget is not None and self._priced_pool(pool)

    def _priced_pool(self, pool: Pool) -> bool:
        return pool.id in self._elastic and pool.price_per_hour > 0

    def set_team_spending(self, spent: Mapping[str, float]) -> None:
        """What each team's attempts cost this month, as the store recorded (the service sums
        them over the team's experiments); more room lets held runs be placed again."""
        before = dict(self._share.spent_usd)
        self._share.set_spent(spent)
        if self._share.spent_usd != before:
            self._generation += 1

    def _over_budget(self, more_usd: float, also_usd: float = 0.0) -> str | None:
        """Why spending ``more_usd`` more now would break the budget (None: it would not);
        ``also_usd`` counts as committed already (launches ordered in this answer)."""
        if self._budget is None:
            return None
        committed = max(0.0, self._committed) + also_usd
        return self._budget.exceeded(
            month_usd=self._spent[0] + committed,
            experiment_usd=self._spent[1] + committed,
            more_usd=more_usd,
        )

    def _estimate(self, t: TaskInstance, pool: Pool) -> float:
        """Dollars a run of ``t`` on elastic ``pool`` is expected to cost: its share of one
        instance (the largest of its CPUs, memory and GPUs over the node's) for ``runtime_s``,
        at least ``MIN_BILLED_S``."""
        node = pool.node
        share = 1.0
        if node is not None:
            k = max(1, t.nodes)  # a gang holds its part of each of its nodes
            parts = []
            if node.cpus > 0:
                parts.append(t.cpus / k / node.cpus)
            if node.memory > 0:
                parts.append(t.memory / k / node.memory)
            if t.gpus and node.gpus:
                parts.append(t.gpus / k / max(node.gpus.values()))
            share = min(1.0, max(parts, default=1.0)) * k
        return pool.price_per_hour * share * max(t.runtime_s, MIN_BILLED_S) / 3600.0

    def _over(self, run: _Run, why: str) -> None:
        """``run`` would break the budget: held READY, or, where someone can approve, waiting
        in AWAITING_APPROVAL."""
        if self.config.approvals is not None:
            self._ask(run, why)
        else:
            self._hold(run, why)

    def _hold(self, run: _Run, why: str) -> None:
        """Keep READY ``run`` waiting (a budget, a team's limit); its reason is recorded once."""
        if run.held == why:
            return
        run.held = why
        self._out_transitions.append(
            Transition(
                run.task.run_id, run.attempt, TaskState.READY, TaskState.READY, None, why, None
            )
        )

    def _room(self, pool: Pool) -> _Room:
        cpus, memory, gpus = _plus(self.free_capacity(pool.id), self._offer.get(pool.id))
        tasks = None if pool.max_tasks is None else pool.max_tasks - self._in_pool[pool.id]
        ledger = self._ledger(pool)
        if ledger is None:
            return _Room(cpus, memory, gpus, tasks)
        return _Room(
            cpus,
            memory,
            gpus,
            tasks,
            ledger,
            lambda t, why: self._refused_devices(pool.id, t, why),
            self._blocked(pool, ledger),
        )

    def _blocked(self, pool: Pool, ledger: DeviceLedger) -> str:
        """Why no GPU run may take devices in ``pool`` now ("" when it may)."""
        unknown = sum(self._used_gpus.get(pool.id, _NO_GPUS).values()) - ledger.held_gpus()
        if unknown <= 0:
            return ""
        return (
            f"{unknown} GPUs of {pool.id} are leased to runs whose devices are not known "
            "(restored after a restart): no device is given out there until they end"
        )

    def _device_refusals(
        self,
        t: TaskInstance,
        pools: list[Pool],
        seen: dict[tuple[str, _Shape], str],
        ledgers: dict[str, tuple[DeviceLedger | None, str]],
    ) -> dict[str, str]:
        """The pools among ``pools`` that lease devices and where no node holds a run of
        ``t``'s shape now, with why (what ``_Room.take`` would say when refusing it there).
        ``seen`` and ``ledgers`` cache the answer per pool and shape, and each pool's ledger
        with why it is blocked, while no lease moves (``_device_fit``; module doc: *Devices*)."""
        out: dict[str, str] = {}
        shape = _shape(t)
        for p in pools:
            if p.devices is None:
                continue
            why = seen.get((p.id, shape))
            if why is None:
                got = ledgers.get(p.id)
                if got is None:
                    ledger = self._ledger(p)
                    got = ledgers[p.id] = (
                        ledger,
                        "" if ledger is None else self._blocked(p, ledger),
                    )
                why = seen[p.id, shape] = _device_why(t, *got)
            if why:
                out[p.id] = why
        return out

    def _ledger(self, pool: Pool) -> DeviceLedger | None:
        """The devices of ``pool`` (None: it counts GPUs only), with what runs that no longer
        hold their lease there held freed (module doc: *Devices*)."""
        spec = pool.devices
        ledger = self._devices.get(pool.id)
        if spec is None:
            if ledger is not None:
                del self._devices[pool.id]
            return None
        if ledger is None:
            from stowplan.placement.devices import DeviceLedger  # numpy: only where needed

            ledger = self._devices[pool.id] = DeviceLedger(
                spec, objective=self.config.context.objective
            )
        elif ledger.spec is not spec:
            if ledger.spec == spec:
                ledger.spec = spec  # the same devices rediscovered: compared once
            else:
                ledger = self._devices[pool.id] = ledger.rebuilt(spec)
        for run_id, held in list(ledger.holds.items()):
            run = self._runs.get(run_id)
            if (
                run is None
                or not held.key
                or run.key != held.key
                or run.state not in LEASED
                or run.pool != pool.id
            ):
                ledger.give(run_id)
        restoring = self._restoring.pop(pool.id, None)
        if restoring:
            for run_id, lease in sorted(restoring.items()):
                run = self._runs.get(run_id)
                if run is None or run.state not in LEASED or run.pool != pool.id:
                    continue
                t = run.task
                task = ledger.task(
                    t.cpus,
                    t.memory,
                    t.gpus,
                    t.gpu_types or ledger.model.models,
                    t.gpu_milli,
                    t.nodes,
                )
                # a lease its node no longer holds (gone, or another run's) is not taken: its
                # devices stay not known, as for a lease restored without them
                if task is not None:
                    ledger.hold(run_id, run.key, task, lease)
        return ledger

    def _hold_refused(
        self,
        bucket: dict[str, None],
        start: int,
        cls: DemandClass,
        refused: dict[str, str],
        free: _Free,
    ) -> None:
        """The members of ``bucket`` after the first ``start`` (those the other pools may
        take) that the totals of the ``refused`` pools would admit, each held with the reason
        of the pool it would go to, pools by id: as applying an answer that put them there
        would record (and never more of them)."""
        runs = (r for i, r in enumerate(bucket) if i >= start)
        for pid in sorted(refused):
            if _too_wide(cls.gpus, cls.gpu_types, self._pools[pid].devices, cls.nodes):
                continue  # no node there ever holds them: they wait for the other pools
            for _ in range(self._fit_bound(cls, [self._pools[pid]], free)):
                run_id = next(runs, None)
                if run_id is None:
                    return
                self._refused_devices(pid, self._runs[run_id].task, refused[pid])

    def _refused_devices(self, pool_id: str, t: TaskInstance, why: str) -> None:
        """``t`` fits the pool's totals, not its devices: it stays READY, saying why."""
        run = self._runs[t.run_id]
        if run.state is TaskState.READY:
            self._hold(run, f"{pool_id}: {why}")

    def lease(self, run_id: str) -> DeviceLease | None:
        """The node and devices the attempt out for ``run_id`` holds (None: its pool does not
        know its devices, or it holds no lease)."""
        run = self._runs.get(run_id)
        if run is None or run.pool is None or run.state not in LEASED:
            return None
        ledger = self._devices.get(run.pool)
        if ledger is None:
            return None
        held = ledger.holds.get(run_id)
        if held is None:  # no device there: CPU-only, or GPUs restored without their devices
            return None if run.task.gpus else ledger.no_devices()
        return ledger.lease(run_id) if held.key == run.key else None

    def _dispatch(self, run: _Run, pool: Pool, gpu_model: str = "") -> None:
        assert run.bucket is not None
        run_id = run.task.run_id
        pool_id, provider = pool.id, pool.provider
        self._ready[run.bucket].pop(run_id, None)
        run.held = ""
        run.pool = pool_id
        run.provider = provider
        self._move(run, _T_PLACED)
        run.attempt = attempt = run.attempt + 1
        run.key = key = attempt_key(run_id, attempt)
        self._by_key[key] = run_id
        self._lease(run, gpu_model)
        self._move(run, _T_SUBMIT)
        ledger = self._devices.get(pool_id) if pool.devices is not None else None
        lease = None
        if ledger is not None:  # a run that took no device there sees none
            lease = ledger.confirm(run_id, key) or ledger.no_devices()
        out = self._out_submits.get((provider, pool_id, False))
        if out is None:
            out = self._out_submits[provider, pool_id, False] = []
        out.append(SubmitItem(run_id, attempt, key, lease))

    def _on_reports(self, provider: str, reports: list[Report]) -> None:
        for rep in reports:
            run_id = self._by_key.get(rep.key)
            run = self._runs.get(run_id) if run_id is not None else None
            # a key is live only while its run holds the lease: a repeated or late report for
            # an attempt already failed over to RETRYING (or READY again) must not move the run
            if run is None or run.key != rep.key or run.state not in LEASED:
                self.ignored_reports += 1
                continue
            self._apply_report(run, rep)
        self._maybe_solve()

    def _apply_report(self, run: _Run, rep: Report) -> None:
        st = rep.state
        reconciling = run.reconciling
        run.reconciling = False
        if rep.devices is not None and st in _BOUND:
            self._follow(run, rep.node, rep.devices)
        if st is ProviderState.QUEUED:
            self._renew(run)
            if run.state in (TaskState.SUBMITTING, TaskState.LOST):
                self._move(run, Trigger.ACCEPTED)
        elif st is ProviderState.RUNNING:
            self._renew(run)
            if run.state in (TaskState.SUBMITTING, TaskState.QUEUED, TaskState.LOST):
                run.started_at = self._now
                self._move(run, Trigger.STARTED)
            run.replaced, run.refused_in = 0, ()  # it ran: a row of refusals ends
        elif st is ProviderState.SUCCEEDED and run.task.service is not None:
            self._restart(run, None, rep.message or "the service exited with status 0")
        elif st is ProviderState.SUCCEEDED:
            self._learn(run, rep)
            self._finish(run, Trigger.SUCCEEDED, None, rep.message)
        elif st is ProviderState.FAILED:
            self._fail(run, rep.failure or FailureClass.USER_ERROR, rep.message)
        elif st is ProviderState.CANCELLED and run.task.service is not None:
            # not the user's cancel (that finishes the run before any report): restart
            self._restart(run, FailureClass.CANCELLED, rep.message or "cancelled at the provider")
        elif st is ProviderState.CANCELLED:
            self._finish(
                run,
                Trigger.CANCEL,
                FailureClass.CANCELLED,
                rep.message or "cancelled at the provider",
            )
        else:  # UNKNOWN: the provider has never heard of this key
            if run.state is TaskState.SUBMITTING and reconciling:
                # the intent was written but the submit may never have gone out: the same key
                # again is safe, because submit is idempotent (on the devices it holds, if
                # the restored lease was taken back)
                assert run.provider is not None and run.pool is not None
                self._renew(run)
                run_id = run.task.run_id
                self._out_submits.setdefault((run.provider, run.pool, True), []).append(
                    SubmitItem(run_id, run.attempt, run.key, self.lease(run_id))
                )
            elif reconciling or run.state is TaskState.LOST:
                self._fail(run, FailureClass.LOST, rep.message or "the provider has no record")
            else:
                self.ignored_reports += 1

    def _follow(self, run: _Run, node: str | None, devices: tuple[int, ...]) -> None:
        """The provider bound ``run``'s attempt to ``devices`` on ``node`` itself (Slurm):
        where the pool knows its devices and they differ from the lease, the ledger follows
        when they are free there; otherwise the lease stands (the store records what was
        reported either way). A restored attempt whose devices were not known gets them."""
        pool = self._pools.get(run.pool) if run.pool is not None else None
        ledger = self._ledger(pool) if pool is not None else None
        if ledger is None:
            return
        run_id, t = run.task.run_id, run.task
        held = ledger.lease(run_id)
        where = node or (held.node if held is not None else ledger.no_devices().node)
        if not where or held == DeviceLease(where, devices):
            return
        task = ledger.task(
            t.cpus, t.memory, t.gpus, t.gpu_types or ledger.model.models, t.gpu_milli, t.nodes
        )
        if task is not None and ledger.follow(run_id, run.key, task, DeviceLease(where, devices)):
            self._generation += 1  # devices freed, or a pool no longer blocked

    def _learn(self, run: _Run, rep: Report) -> None:
        """Keep the runtime of ``run``'s bucket: the provider's own start and end when it
        gives both (a report batch's delay is not runtime), else the core's view since the
        run was seen RUNNING; nothing when neither is known."""
        if rep.started_at is not None and rep.ended_at is not None:
            took = rep.ended_at - rep.started_at
        elif run.started_at is not None:
            took = self._now - run.started_at
        else:
            return
        if run.bucket is None or not math.isfinite(took):
            return
        took = max(0.0, took)
        before = self._took.get(run.bucket)
        self._took[run.bucket] = took if before is None else 0.8 * before + 0.2 * took

    def _on_tick(self) -> None:
        now = self._now
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, _, run_id = heapq.heappop(self._retry_heap)
            run = self._runs[run_id]
            if run.state is TaskState.RETRYING and run.ready_at <= now:
                self._move(run, Trigger.BACKOFF_DONE)
                self._enqueue_ready(run)
        while self._reconcile_heap and self._reconcile_heap[0][0] <= now:
            _, token, run_id = heapq.heappop(self._reconcile_heap)
            run = self._runs[run_id]
            if run.state is TaskState.LOST and run.reconcile_token == token:
                self._reconcile_lost(run)  # no answer yet: ask again
        if now >= self._next_lease_check:
            self._check_leases()
        self._maybe_solve()

    def _check_leases(self) -> None:
        now = self._now
        soonest = float("inf")
        for run in self._runs.values():
            if run.state not in LEASED or run.state is TaskState.LOST:
                continue
            if run.lease_until <= now:
                self._move(run, Trigger.LEASE_EXPIRED, None, "no report before the lease expired")
                run.reconciling = True
                run.reconciles = 0
                self._reconcile_lost(run)
            else:
                soonest = min(soonest, run.lease_until)
        self._next_lease_check = soonest

    def _reconcile_lost(self, run: _Run) -> None:
        """Ask the provider about a LOST run, and plan to ask again if no answer comes."""
        assert run.provider is not None
        self._out_reconcile.setdefault(run.provider, []).append(run.key)
        run.reconciles += 1
        delay = self.config.reconcile_backoff.seconds(
            run.reconciles, seed=self.config.seed, key="reconcile:" + run.key
        )
        self._reconcile_tokens += 1
        run.reconcile_token = self._reconcile_tokens
        heapq.heappush(
            self._reconcile_heap, (self._now + delay, run.reconcile_token, run.task.run_id)
        )

    def _ask(self, run: _Run, why: str) -> None:
        """READY ``run`` waits for someone to approve it (module doc: *Approvals*)."""
        assert run.bucket is not None
        self._ready[run.bucket].pop(run.task.run_id, None)
        self._move(run, Trigger.ASK_APPROVAL, None, why)

    def _on_decided(self, ev: ApprovalDecided) -> None:
        for run_id in ev.run_ids:
            run = self._runs.get(run_id)
            if run is None or run.state is not TaskState.AWAITING_APPROVAL:
                continue
            if ev.approve:
                run.approved = True
                run.held = ""
                self._generation += 1
                self._move(run, Trigger.APPROVED, None, ev.reason)
                self._enqueue_ready(run)
            else:
                self._move(run, Trigger.REJECTED, FailureClass.CANCELLED, ev.reason)
                self._cascade(run)
        self._maybe_solve()

    def _on_cancel(self, ev: CancelRequested) -> None:
        for run_id in ev.run_ids:
            run = self._runs.get(run_id)
            if run is None or run.state in FINAL:
                continue
            # what a cancelled READY run would have taken in the answer in flight is free
            self._generation += 1
            if run.state in LEASED and run.provider is not None:
                self._out_cancels.setdefault(run.provider, []).append(run.key)
            self._finish(run, Trigger.CANCEL, FailureClass.CANCELLED, ev.reason)
        self._maybe_solve()

    # ---- transitions --------------------------------------------------------------------

    def _move(
        self,
        run: _Run,
        trigger: Trigger,
        failure: FailureClass | None = None,
        reason: str = "",
    ) -> None:
        old = run.state
        new = TRANSITIONS.get((old, trigger))
        task = run.task
        if new is None:
            raise IllegalTransition(task.run_id, old, trigger)
        run.state = new
        counts = self.counts
        counts[old] -= 1
        counts[new] += 1
        self._out_transitions.append(
            Transition(task.run_id, run.attempt, old, new, failure, reason, run.pool)
        )
        if task.max_concurrent:
            was = old in ACTIVE  # PLACED or leased
            now_active = new in ACTIVE
            if was != now_active:
                self._group_active[task.group] += 1 if now_active else -1

    def _make_ready(self, run: _Run) -> None:
        self._move(run, Trigger.DEPS_MET)
        self._enqueue_ready(run)

    def _enqueue_ready(self, run: _Run) -> None:
        self._generation += 1
        if run.bucket is None:
            # one tuple per distinct bucket, shared by its runs (not 18 fields per run)
            k = _bucket_key(run.task)
            run.bucket = self._buckets.setdefault(k, k)
        self._ready.setdefault(run.bucket, {})[run.task.run_id] = None

    def _lease(self, run: _Run, gpu_model: str = "") -> None:
        pool_id = run.pool
        assert pool_id is not None
        t = run.task
        used = self._used.get(pool_id)
        if used is None:
            used = self._used[pool_id] = [0.0, 0.0]
        self._in_pool[pool_id] += 1
        used[0] += t.cpus
        used[1] += t.memory
        pool = self._pools.get(pool_id)
        if t.gpus:
            gpus_used = self._used_gpus.setdefault(pool_id, Counter())
            models = t.gpu_types or tuple(sorted(pool.gpus if pool else ()))
            free = {m: (pool.gpus.get(m, 0) if pool else 0) - gpus_used[m] for m in models}
            if gpu_model:
                run.gpu_model = gpu_model  # the placer chose it
            else:
                run.gpu_model = max(models, key=lambda m: (free.get(m, 0), m)) if models else "?"
            gpus_used[run.gpu_model] += t.gpus
            if t.team:
                self._share.take(t.team, run.gpu_model, t.gpus)
                self._share.started(t.team, t.run_id, t.gpus, self._now)
        run.lease_until = until = self._now + self.config.lease_ttl
        if until < self._next_lease_check:  # min(), keeping the first of equals
            self._next_lease_check = until
        if pool is not None and pool.id in self._elastic and pool.price_per_hour > 0:
            run.est_usd = self._estimate(t, pool)
            self._committed += run.est_usd
            if t.team:
                c = self._share.committed_usd
                c[t.team] = c.get(t.team, 0.0) + run.est_usd

    def _renew(self, run: _Run) -> None:
        run.lease_until = self._now + self.config.lease_ttl
        # a LOST run found again was left out of the last lease check: check it again
        self._next_lease_check = min(self._next_lease_check, run.lease_until)

    def _release(self, run: _Run) -> None:
        self._generation += 1
        self._committed -= run.est_usd
        if run.task.team and run.est_usd:
            c = self._share.committed_usd
            c[run.task.team] = c.get(run.task.team, 0.0) - run.est_usd
        run.est_usd = 0.0
        if run.pool is None:
            return
        t = run.task
        used = self._used[run.pool]
        self._in_pool[run.pool] -= 1
        used[0] -= t.cpus
        used[1] -= t.memory
        if t.gpus and run.gpu_model is not None:
            self._used_gpus[run.pool][run.gpu_model] -= t.gpus
            if t.team:
                self._share.give_back(t.team, run.gpu_model, t.gpus)
                self._share.ended(t.team, t.run_id, self._now)
            run.gpu_model = None

    def _finish(
        self, run: _Run, trigger: Trigger, failure: FailureClass | None, reason: str
    ) -> None:
        was = run.state
        if was in LEASED:
            self._release(run)
            self._charge(run)
        elif was is TaskState.READY and run.bucket is not None:
            self._ready[run.bucket].pop(run.task.run_id, None)
        self._move(run, trigger, failure, reason)
        if run.state is TaskState.SUCCEEDED:
            for dep_id in run.dependents:
                dep = self._runs[dep_id]
                if dep.state is TaskState.PENDING:
                    dep.waiting -= 1
                    if dep.waiting == 0:
                        self._make_ready(dep)
        elif run.state in (TaskState.FAILED, TaskState.CANCELLED):
            self._cascade(run)

    def _cascade(self, run: _Run) -> None:
        cancelled = run.state is TaskState.CANCELLED
        stack = [run]
        while stack:
            r = stack.pop()
            for dep_id in r.dependents:
                dep = self._runs[dep_id]
                if dep.state is not TaskState.PENDING:
                    continue
                why = f"dependency {r.task.run_id[:12]} " + (
                    "was cancelled" if cancelled else "failed"
                )
                if cancelled:
                    self._move(dep, Trigger.CANCEL, FailureClass.CANCELLED, why)
                else:
                    self._move(dep, Trigger.DEP_FAILED, FailureClass.DEPENDENCY_FAILED, why)
                stack.append(dep)

    def _fail(self, run: _Run, failure: FailureClass, message: str) -> None:
        if failure in REPLACED:
            self._replace(run, failure, message)
            return
        if run.task.service is not None:
            self._restart(run, failure, message)
            return
        run.replaced, run.refused_in = 0, ()
        counted = run.attempt - run.uncounted
        if should_retry(run.task.retry, failure, counted):
            if run.state in LEASED:
                self._release(run)
                self._charge(run)
            delay = backoff_seconds(run.task.retry, counted, seed=self.config.seed, key=run.key)
            self._move(run, Trigger.RETRY, failure, message)
            run.ready_at = self._now + delay
            heapq.heappush(self._retry_heap, (run.ready_at, run.seq, run.task.run_id))
        else:
            self._finish(run, Trigger.FAILED, failure, message)

    def _restart(self, run: _Run, failure: FailureClass | None, message: str) -> None:
        """A service's attempt ended, not by the user's cancel: RETRYING, then READY again
        after the service's backoff, outside the retry policy (module doc: *Services*)."""
        service = run.task.service
        assert service is not None
        ran = None if run.started_at is None else self._now - run.started_at
        run.restarts = restarts_after(service, run.restarts, ran)
        run.replaced, run.refused_in = 0, ()
        if run.state in LEASED:
            self._release(run)
            self._charge(run)
        delay = restart_seconds(service, run.restarts, seed=self.config.seed, key=run.key)
        self._move(
            run,
            Trigger.RETRY,
            failure,
            f"service restart {run.restarts} in {delay:g}s: {message or 'the attempt ended'}",
        )
        run.ready_at = self._now + delay
        heapq.heappush(self._retry_heap, (run.ready_at, run.seq, run.task.run_id))

    def _on_unhealthy(self, ev: ServiceUnhealthy) -> None:
        """The shell's health checks gave up on a running service's attempt: stop it at the
        provider and restart. News of an attempt that is no longer the live one is stale."""
        run = self._runs.get(ev.run_id)
        if (
            run is None
            or run.task.service is None
            or run.key != ev.key
            or run.state is not TaskState.RUNNING
            or run.provider is None
        ):
            return
        self._out_cancels.setdefault(run.provider, []).append(run.key)
        self._restart(run, FailureClass.UNHEALTHY, ev.reason)
        self._maybe_solve()

    def _replace(self, run: _Run, failure: FailureClass, message: str) -> None:
        """The pool could not start the attempt; it never ran (module doc: *No capacity*)."""
        pool, provider = run.pool, run.provider
        assert pool is not None and provider is not None  # only leased runs get reports
        # the provider may still hold it (a pod waiting for a node): it must never start now
        self._out_cancels.setdefault(provider, []).append(run.key)
        cooldown = self.config.no_capacity_cooldown
        until = self._now + cooldown
        if cooldown > 0:
            cooling = self._cooling.setdefault(_shape(run.task), {})
            cooling[pool] = max(cooling.get(pool, until), until)
            self._cool_next = min(self._cool_next, until)
        run.uncounted += 1
        run.replaced += 1
        run.refused_in = (*run.refused_in, pool)
        what = message or "no capacity"
        if run.replaced > self.config.max_replaces:
            pools = ", ".join(dict.fromkeys(run.refused_in))
            self._finish(
                run,
                Trigger.FAILED,
                failure,
                f"no capacity: {run.replaced} placements in a row could not start it "
                f"(in {pools}; the last said: {what}); not placed again "
                f"(max_replaces = {self.config.max_replaces})",
            )
            return
        self._release(run)
        self._charge(run)
        self._move(
            run,
            Trigger.RETRY,
            failure,
            f"no capacity in {pool}: {what} (it never ran; placed again at once, not counted "
            f"against max_attempts; {pool} is left out for this task shape for {cooldown:g}s)",
        )
        self._move(run, Trigger.BACKOFF_DONE)
        self._enqueue_ready(run)

    def _expire_cooling(self) -> None:
        """End the cool-downs due by now: a new solve may place more in those pools."""
        now, soonest = self._now, float("inf")
        for shape in list(self._cooling):
            pools = self._cooling[shape]
            for pid in [p for p, until in pools.items() if until <= now]:
                del pools[pid]
            if pools:
                soonest = min(soonest, *pools.values())
            else:
                del self._cooling[shape]
        self._cool_next = soonest
        self._generation += 1

    def _charge(self, run: _Run) -> None:
        """Add the finished attempt's CPU-seconds (a GPU counts as ``GPU_CPUS`` CPUs) to its
        project's decayed usage, and its team's and user's."""
        if run.started_at is None:
            return
        t = run.task
        cost = (t.cpus + GPU_CPUS * t.gpus) * max(0.0, self._now - run.started_at)
        keys = [t.project]
        if t.team:
            keys += [f"team\0{t.team}", f"user\0{t.team}\0{t.user}"]
        for key in keys:
            usage, at = self._usage.get(key, (0.0, self._now))
            decay = 0.5 ** ((self._now - at) / self.config.fair_share_half_life)
            self._usage[key] = (usage * decay + cost, self._now)
        run.started_at = None

    def _fair(self, t: TaskInstance) -> tuple[float, float]:
        """Fair-share keys of ``t``'s class: its team's decayed usage over the team's weight,
        then its user's within the team (module doc: *Sharing*); a run of no team: its
        project's."""
        if not t.team:
            return self.usage(t.project), 0.0
        weight = self.config.teams[t.team].weight if t.team in self.config.teams else 1.0
        return (
            self.usage(f"team\0{t.team}") / weight,
            self.usage(f"user\0{t.team}\0{t.user}"),
        )

    def usage(self, project: str) -> float:
        usage, at = self._usage.get(project, (0.0, self._now))
        return usage * float(0.5 ** ((self._now - at) / self.config.fair_share_half_life))

    # ---- placement ----------------------------------------------------------------------

    def _maybe_solve(self) -> None:
        from stowplan.placement.greedy import eligible

        if self._now >= self._cool_next:
            self._expire_cooling()
        if self._solving is not None or not self._pools or self._stalled_at == self._generation:
            return
        buckets = [(k, b) for k, b in self._ready.items() if b]
        if not buckets:
            return
        free = {pid: self.free_capacity(pid) for pid in sorted(self._pools)}
        backlog = self._backlog_round(buckets, free)

        def order(item: tuple[tuple[object, ...], dict[str, None]]) -> tuple[float, ...]:
            _, bucket = item
            first = self._runs[next(iter(bucket))]
            return (-float(first.task.priority), *self._fair(first.task), first.seq)

        classes: list[DemandClass] = []
        offered: Counter[str] = Counter()  # per group, members already in this problem
        pools = sorted(self._pools.values(), key=lambda p: p.id)
        sharing = self._sharing_round(buckets, free) if self._share.teams else None
        if self._device_fit[0] != (self._generation, self._request_id):
            self._device_fit = ((self._generation, self._request_id), {}, {})
        _, device_seen, ledgers = self._device_fit
        for _, bucket in sorted(buckets, key=order):
            t = self._runs[next(iter(bucket))].task
            # zero-padded: placers order classes by id, which keeps this order
            cls = self._demand(t, pools, f"c{len(classes):06d}")
            key = _bucket_key(t)
            cached = self._eligible.get(key)
            if cached is None:
                usable = [p for p in pools if eligible(cls, p, self._context_problem)]
                cached = self._eligible[key] = (usable, self._feasible_somewhere(cls, usable))
            usable, feasible = cached
            if not feasible:
                self._reject(bucket, cls, pools)
                continue
            cooling = self._cooling.get(_shape(t))
            if cooling:  # pools that could not start this shape lately (NO_CAPACITY)
                usable = [p for p in usable if p.id not in cooling]
                cls = msgspec.structs.replace(
                    cls,
                    forbid_pools=tuple(
                        sorted({*cls.forbid_pools, *(p for p in cooling if p in self._pools)})
                    ),
                )
            refused = self._device_refusals(t, usable, device_seen, ledgers)
            if refused:  # no node there holds this shape now (module doc: *Devices*)
                usable = [p for p in usable if p.id not in refused]
                cls = msgspec.structs.replace(
                    cls, forbid_pools=tuple(sorted({*cls.forbid_pools, *refused}))
                )
            room = self._with_backlog(key, free, backlog)
            limit = min(len(bucket), self._fit_bound(cls, usable, room))
            if refused:
                self._hold_refused(bucket, limit, cls, refused, room)
            if limit <= 0:
                self._quota_hold(bucket.keys(), cls, usable)
            if t.max_concurrent:
                # a group's runs may sit in several classes (another priority, say)
                active = self._group_active[t.group] + offered[t.group]
                limit = min(limit, t.max_concurrent - active)
            shared_models: tuple[str, ...] = ()
            if sharing is not None and t.gpus and t.team in self._share.teams and limit > 0:
                cls, limit, shared_models = self._shared(t, cls, usable, bucket, limit, sharing)
            if limit <= 0:
                continue
            members = []
            for run_id in bucket:
                members.append(run_id)
                if len(members) >= limit:
                    break
            if t.max_concurrent:
                offered[t.group] += len(members)
            if sharing is not None and shared_models:
                lab_free, _, taken = sharing
                for m in shared_models:  # at most this many: the placer picks among them
                    lab_free[m] -= len(members) * t.gpus
                    taken.setdefault(t.team, Counter())[m] += len(members) * t.gpus
            classes.append(msgspec.structs.replace(cls, members=members))
        if not classes:
            return
        self._request_id += 1
        self._solve_generation = self._generation
        self._offer = {pid: a for pid, (a, _) in backlog.items()}
        for pid, f in free.items():
            if pid in self._offer:
                self._allow[pid] = self._offer[pid]
            elif f[0] >= 0 and f[1] >= 0 and all(n >= 0 for n in f[2].values()):
                self._allow.pop(pid, None)  # nothing queued beyond capacity there now
        free = {pid: _plus(f, self._offer.get(pid)) for pid, f in free.items()}
        free_pools = [
            msgspec.structs.replace(
                p,
                cpus=max(0.0, free[p.id][0]),
                memory=max(0, free[p.id][1]),
                gpus={m: max(0, n) for m, n in free[p.id][2].items()},
                max_instances=0 if p.id in self._refused else max(0, self._launch_room(p)),
                max_tasks=None
                if p.max_tasks is None
                else max(0, p.max_tasks - self._in_pool[p.id]),
            )
            for p in pools
        ]
        self._solving = self._problem(free_pools, classes, self._request_id)

    def _backlog_round(
        self, buckets: list[tuple[tuple[object, ...], dict[str, None]]], free: _Free
    ) -> dict[str, tuple[tuple[float, int, dict[str, int]], float]]:
        """The backlog each pool that queues work itself is offered this round (module doc:
        *Backlog*): pool id -> (the room added to its free capacity, in waves of its
        capacity), sized for the shortest runtime among the READY buckets."""
        limit = self.config.backlog_s
        if limit <= 0 or not self._took:
            return {}
        took = [self._took[k] for k, _ in buckets if k in self._took]
        if not took:
            return {}
        shortest = max(min(took), MIN_RUNTIME_S)
        offered: dict[str, tuple[tuple[float, int, dict[str, int]], float]] = {}
        for pid in sorted(self._pools):
            p = self._pools[pid]
            if p.queue_depth <= 0:
                continue
            waves = min(p.queue_depth, limit / shortest)
            cpus, memory, gpus = free[pid]
            used = self._used.get(pid, _NOTHING_USED)
            gpus_used = self._used_gpus.get(pid, _NO_GPUS)
            add = (
                waves * (cpus + used[0]),
                int(waves * (memory + used[1])),
                {m: int(waves * (n + gpus_used.get(m, 0))) for m, n in gpus.items()},
            )
            # refill once half of it has drained, not at every run that ends: one submit
            # call for many runs (an API call, a remote command, each)
            queued = [
                -have / room
                for have, room in ((cpus, add[0]), (memory, add[1]))
                if room > 0 and have < 0
            ] + [-gpus[m] / n for m, n in add[2].items() if n > 0 and gpus[m] < 0]
            if max(queued, default=0.0) > 0.5:
                continue
            offered[pid] = (add, waves)
        return offered

    def _with_backlog(
        self,
        key: tuple[object, ...],
        free: _Free,
        offered: dict[str, tuple[tuple[float, int, dict[str, int]], float]],
    ) -> _Free:
        """The free capacity a class of bucket ``key`` may count on: its share of each pool's
        backlog, for as many waves of its own runtime as ``backlog_s`` holds."""
        took = self._took.get(key)
        if not offered or took is None:
            return free
        own = max(took, MIN_RUNTIME_S)
        out = dict(free)
        for pid, (add, waves) in offered.items():
            p = self._pools[pid]
            share = min(waves, p.queue_depth, self.config.backlog_s / own) / waves
            if share <= 0:
                continue
            out[pid] = _plus(
                free[pid],
                (
                    add[0] * share,
                    int(add[1] * share),
                    {m: int(n * share) for m, n in add[2].items()},
                ),
            )
        return out

    def _sharing_round(
        self, buckets: list[tuple[tuple[object, ...], dict[str, None]]], free: _Free
    ) -> _SharingRound:
        """What one placement round checks teams' runs against (module doc: *Sharing*): the
        lab's free GPUs by model, each team's waiting GPUs by model, and what this round has
        offered each team so far."""
        lab_free: Counter[str] = Counter()
        for _, _, gpus in free.values():
            for m, n in gpus.items():
                lab_free[m] += max(0, n)
        for p in self._pools.values():  # what elastic pools may still launch is the lab's too
            room = p.max_instances - self._launched.get(p.id, 0)
            if p.elastic and p.node is not None and room > 0 and p.id not in self._refused:
                for m, n in p.node.gpus.items():
                    lab_free[m] += room * n
        all_models = tuple(
            sorted(
                {
                    m
                    for p in self._pools.values()
                    for m in (*p.gpus, *(p.node.gpus if p.node else ()))
                }
            )
        )
        waiting: dict[str, Counter[str]] = {}
        for _, bucket in buckets:
            t = self._runs[next(iter(bucket))].task
            if t.gpus and t.team in self._share.teams:
                w = waiting.setdefault(t.team, Counter())
                for m in t.gpu_types or all_models:
                    w[m] += len(bucket) * t.gpus
        return lab_free, waiting, {}

    def _shared(
        self,
        t: TaskInstance,
        cls: DemandClass,
        usable: list[Pool],
        bucket: dict[str, None],
        limit: int,
        sharing: _SharingRound,
    ) -> tuple[DemandClass, int, tuple[str, ...]]:
        """``cls`` narrowed to the GPU models its team may take more of, the members it may
        offer, and those models; a bucket that may take none is held with the reason."""
        lab_free, waiting, taken = sharing
        models = t.gpu_types or tuple(sorted({m for p in usable for m in p.gpus}))
        room = self._share.room(t.team, models, lab_free, waiting, self._now, taken)
        allowed = tuple(m for m in models if room.gpus.get(m, math.inf) >= t.gpus)
        cap = min((room.gpus.get(m, math.inf) for m in allowed), default=0.0)
        if cap < math.inf:
            limit = min(limit, int(cap // t.gpus))
        if limit <= 0 or not allowed:
            why = "; ".join(dict.fromkeys(room.why[m] for m in models if m in room.why))
            for run_id in bucket:
                self._hold(self._runs[run_id], why or f"team {t.team}: no GPU it may take")
            return cls, 0, ()
        if len(allowed) < len(models):
            cls = msgspec.structs.replace(cls, gpu_types=allowed)
        return cls, limit, allowed if cap < math.inf else ()

    def _problem(
        self, pools: list[Pool], classes: list[DemandClass], request_id: int = 0
    ) -> PlacementProblem:
        ctx = self.config.context
        return PlacementProblem(
            request_id=request_id,
            pools=pools,
            classes=classes,
            links=ctx.links,
            datasets=[self._datasets[k] for k in sorted(self._datasets)],
            residency=self._residency,
            weights=ctx.weights,
        )

    def _add_datasets(self, datasets: list[Dataset], tasks: Iterable[TaskInstance]) -> None:
        """Merge a submission's inputs (module doc: *Datasets*); a residency rule the context
        lacks (a dataset's or a task's) allows no site."""
        changed = False
        rules = {d.residency for d in datasets if d.residency is not None}
        rules.update(r for t in tasks for r in t.residency)
        for rule in sorted(rules - set(self._residency)):
            self._residency[rule] = (NOWHERE,)
            changed = True
        for d in datasets:
            if self._datasets.get(d.id) != d:
                self._datasets[d.id] = d
                changed = True
        if changed:
            self._context_problem = self._problem([], [])

    def _demand(self, t: TaskInstance, pools: list[Pool], cid: str = "c") -> DemandClass:
        """The demand class of ``t``'s bucket (no members), among ``pools``."""
        allowed = None
        if t.allowed_providers is not None:
            allowed = tuple(p.id for p in pools if p.provider in t.allowed_providers)
        known = self._pools
        return DemandClass(
            id=cid,
            cpus=t.cpus,
            memory=t.memory,
            gpus=t.gpus,
            gpu_types=t.gpu_types,
            gpu_milli=t.gpu_milli,
            nodes=t.nodes,
            allowed_pools=allowed,
            forbid_pools=tuple(x for x in t.forbid_pools if x in known),
            require_sites=t.require_sites,
            forbid_sites=t.forbid_sites,
            residency=t.residency,
            hardware_class=t.hardware_class,
            tolerations=t.tolerations,
            datasets=tuple(d for d in t.datasets if d in self._datasets),
            runtime_s=t.runtime_s,
            priority=t.priority,
        )

    def _fit_bound(
        self,
        cls: DemandClass,
        pools: list[Pool],
        free: dict[str, tuple[float, int, dict[str, int]]],
    ) -> int:
        """At most this many members could be placed now in ``pools`` (those eligible): what
        free capacity holds, plus what the instances elastic pools may still launch would hold."""
        from stowplan.placement.greedy import fits

        total = 0
        for p in pools:
            cpus, mem, gpus = free[p.id]
            n = fits(cls, cpus, mem, gpus)
            room = self._launch_room(p)
            if p.id in self._refused:
                room = 0
            if p.elastic and p.node is not None and room > 0:
                n += room * fits(cls, p.node.cpus, p.node.memory, dict(p.node.gpus))
            if p.max_tasks is not None:
                n = min(n, max(0, p.max_tasks - self._in_pool[p.id]))
            total += n
        return total

    # ---- account quotas (module doc: *Account quotas*) ------------------------------------

    def _groups(self) -> dict[str, list[Pool]]:
        """Quota group -> its pools, by id (pools change only with the generation)."""
        at, groups = self._quota_groups
        if at != self._generation:
            groups = {}
            for pid in sorted(self._pools):
                q = self._pools[pid].quota
                if q is not None:
                    groups.setdefault(q.group, []).append(self._pools[pid])
            self._quota_groups = (self._generation, groups)
        return groups

    def _quota_left(self, group: str) -> float:
        """What is left of ``group``'s quota now: what discovery found left (the least any of
        its pools says), less what the instances launched since in its pools take."""
        pools = self._groups().get(group, [])
        left = min((p.quota.left for p in pools if p.quota is not None), default=0.0)
        for p in pools:
            if p.quota is not None:
                left -= max(0, self._launched.get(p.id, 0)) * p.quota.per_instance
        return max(0.0, left)

    def _quota_room(self, p: Pool) -> int | None:
        """How many more instances of ``p`` its account quota allows now (None: no quota)."""
        q = p.quota
        if q is None or q.per_instance <= 0:
            return None
        return int(self._quota_left(q.group) / q.per_instance + 1e-9)

    def _launch_room(self, p: Pool) -> int:
        """How many more instances ``p`` may launch now: its maximum, less those launched
        since discovery, within what its account quota leaves it."""
        room = p.max_instances - self._launched.get(p.id, 0)
        quota_room = self._quota_room(p)
        return room if quota_room is None else min(room, quota_room)

    def _quota_why(self, p: Pool) -> str:
        q = p.quota
        assert q is not None
        return (
            f"held: account quota {q.name or q.group} has {self._quota_left(q.group):g} of "
            f"{q.limit:g} left in {p.region or p.site}; an instance of {p.id} takes "
            f"{q.per_instance:g} (ask AWS to raise it, or let other pools take these runs)"
        )

    def _quota_bound(self, cls: DemandClass, pools: Iterable[Pool]) -> str | None:
        """Why an account quota keeps ``cls`` from launching in ``pools`` (those eligible): the
        first pool, by id, that one instance would run a member on and whose quota leaves it
        fewer instances than its own maximum would; None when no quota stands in the way."""
        from stowplan.placement.greedy import fits

        for p in sorted(pools, key=lambda p: p.id):
            node = p.node
            if node is None or p.quota is None or p.id in self._refused:
                continue
            quota_room = self._quota_room(p)
            if quota_room is None or quota_room >= p.max_instances - self._launched.get(p.id, 0):
                continue
            if fits(cls, node.cpus, node.memory, dict(node.gpus)) > 0:
                return self._quota_why(p)
        return None

    def _quota_hold(self, run_ids: Iterable[str], cls: DemandClass, pools: list[Pool]) -> None:
        """READY runs no pool can take now: where an account quota is what stops a launch
        for them, they are held with its reason."""
        if not self._groups():
            return
        why = self._quota_bound(cls, pools)
        if why is not None:
            for run_id in run_ids:
                run = self._runs[run_id]
                if run.state is TaskState.READY:
                    self._hold(run, why)

    def _quota_unplaced(self, problem: PlacementProblem, assigned: list[Assignment]) -> None:
        """The members of an answer's classes it did not place, held with an account quota's
        reason where one stopped the launch they needed (the placer saw the cut room)."""
        if not self._groups():
            return
        placed = {a.class_id for a in assigned}
        pools = {p.id: p for p in self._pools.values()}
        for cls in problem.classes:
            left = [r for r in cls.members if r not in placed]
            if not left:
                continue
            usable = self._eligible.get(_bucket_key(self._runs[left[0]].task))
            eligible = usable[0] if usable is not None else []
            self._quota_hold(left, cls, [pools[p.id] for p in eligible if p.id in pools])

    def _feasible_somewhere(self, cls: DemandClass, pools: list[Pool]) -> bool:
        """Whether any of ``pools`` (those eligible) could run one member when empty (on one
        node, where a pool leases devices: ``_too_wide``)."""
        from stowplan.placement.greedy import fits

        return any(
            (
                fits(cls, p.cpus, p.memory, dict(p.gpus)) > 0
                or (
                    p.elastic
                    and p.node is not None
                    and fits(cls, p.node.cpus, p.node.memory, dict(p.node.gpus)) > 0
                )
            )
            and not _too_wide(cls.gpus, cls.gpu_types, p.devices, cls.nodes)
            for p in pools
        )

    def _reject(self, bucket: dict[str, None], cls: DemandClass, pools: list[Pool]) -> None:
        """No pool could run these even when empty: fail them now instead of waiting forever."""
        from stowplan.placement.greedy import why_not
        from stowplan.placement.table import pool_reasons

        why = why_not(cls, pools, self._context_problem).replace(
            "no free capacity now", "no pool is large enough"
        )
        too_few = f"no {cls.gpus} x "
        wide = [
            f"{p.id}: {w}"
            for p in pools
            if (w := _too_wide(cls.gpus, cls.gpu_types, p.devices, cls.nodes))
            # a pool it may use but for its GPUs: how wide its nodes are is the answer
            and all(r.startswith(too_few) for r in pool_reasons(self._context_problem, cls, p))
        ]
        small = [
            f"{p.id}: its largest node has {_node_text(p.node)}"
            for p in pools
            if p.node is not None
            and p.devices is None
            and not p.elastic
            # a pool it may use but for the size of its nodes (a Slurm partition)
            and (reasons := pool_reasons(self._context_problem, cls, p))
            and all(r.startswith((too_few, "its nodes have")) for r in reasons)
        ]
        if wide or small:  # no node of theirs could ever hold it, however their totals look
            why = "; ".join([why, *wide, *small])
        for run_id in list(bucket):
            run = self._runs[run_id]
            self._finish(run, Trigger.FAILED, FailureClass.PROVIDER_REJECTED, why)

    # ---- output -------------------------------------------------------------------------

    def _check_elastic(self) -> float:
        """Launch what an over-committed elastic pool lacks; terminate whole instances idle for
        ``idle_grace``. Return when the next pool's grace ends (infinity: none is idle)."""
        now, grace = self._now, self.config.idle_grace
        soonest = float("inf")
        for pid in sorted(self._elastic):
            p = self._pools.get(pid)
            if p is None or pid in self._refused or self._make_up(p):
                self._idle_since.pop(pid, None)
                continue
            idle = self._idle_instances(p)
            if idle <= 0 or self._solving is not None or self._wanted(p):
                self._idle_since.pop(pid, None)
                continue
            since = self._idle_since.setdefault(pid, now)
            if now >= since + grace:
                del self._idle_since[pid]
                self._order(p, idle, provision=False)
            else:
                soonest = min(soonest, since + grace)
        return soonest

    def _make_up(self, p: Pool) -> bool:
        """Provision what an over-committed elastic pool lacks; True if it lacked any."""
        if p.id in self._refused:
            return False
        short = self._missing_instances(p)
        if short > 0:
            self._order(p, short, provision=True)
        return short > 0

    def _missing_instances(self, p: Pool) -> int:
        """How many instances ``p`` lacks for the runs it holds (its provider started fewer
        than asked, refused some, or lost some), within what it may still launch."""
        node = p.node
        room = self._launch_room(p)
        if node is None or room <= 0:
            return 0
        # work queued at the provider on purpose (the backlog) is no lack of instances
        free = self.free_capacity(p.id)
        cpus, memory, gpus = _plus(free, self._allowance(p, free))
        short = 0
        if cpus < -1e-9 and node.cpus > 0:
            short = math.ceil(-cpus / node.cpus - 1e-9)
        if memory < 0 and node.memory > 0:
            short = max(short, -(memory // node.memory))
        for m, g in node.gpus.items():
            if g > 0 and gpus.get(m, 0) < 0:
                short = max(short, -(gpus[m] // g))
        return min(short, room)

    def _allowance(
        self, p: Pool, free: tuple[float, int, dict[str, int]]
    ) -> tuple[float, int, dict[str, int]] | None:
        """The backlog ``p`` was offered (``_allow``), as far as the capacity it has now can
        still carry it: ``queue_depth`` waves of it at most. Instances that went away since
        (idle, reclaimed, lost) take their share with them, so the work queued for them is
        again work the pool lacks instances for."""
        allow = self._allow.get(p.id)
        if allow is None:
            return None
        used = self._used.get(p.id, _NOTHING_USED)
        gpus_used = self._used_gpus.get(p.id, _NO_GPUS)
        depth = p.queue_depth
        return (
            min(allow[0], depth * max(0.0, free[0] + used[0])),
            min(allow[1], int(depth * max(0, free[1] + used[1]))),
            {
                m: min(n, int(depth * max(0, free[2].get(m, 0) + gpus_used.get(m, 0))))
                for m, n in allow[2].items()
            },
        )

    def _idle_instances(self, p: Pool) -> int:
        """How many whole instances of ``p``'s shape its free capacity holds."""
        node = p.node
        if node is None:
            return 0
        cpus, memory, gpus = self.free_capacity(p.id)
        n = -1
        if node.cpus > 0:
            n = int(cpus / node.cpus + 1e-9)
        if node.memory > 0:
            n = memory // node.memory if n < 0 else min(n, memory // node.memory)
        for m, g in node.gpus.items():
            if g > 0:
                k = gpus.get(m, 0) // g
                n = k if n < 0 else min(n, k)
        return max(0, n)

    def _wanted(self, p: Pool) -> bool:
        """Whether a READY run could use an instance of ``p`` (so its idle ones stay)."""
        from stowplan.placement.greedy import eligible

        node = p.node
        assert node is not None
        for key, bucket in self._ready.items():
            if not bucket:
                continue
            fit = self._node_fit.get((key, p.id))
            if fit is None:
                t = self._runs[next(iter(bucket))].task
                fit = (
                    t.cpus <= node.cpus + 1e-9
                    and t.memory <= node.memory
                    and (
                        not t.gpus
                        or any(node.gpus.get(m, 0) >= t.gpus for m in t.gpu_types or node.gpus)
                    )
                    and eligible(self._demand(t, [p]), p, self._context_problem)
                )
                self._node_fit[key, p.id] = fit
            if fit and not (
                self._priced(p)
                and self._over_budget(self._estimate(self._runs[next(iter(bucket))].task, p))
            ):
                # a run the budget holds back cannot use the instance: it must not keep it
                return True
        return False

    def _flush(self) -> list[Command]:
        out: list[Command] = []
        idle_wake = self._check_elastic() if self._elastic else float("inf")
        if self._out_reconcile:
            for provider in sorted(self._out_reconcile):
                out.append(Reconcile(provider=provider, keys=self._out_reconcile[provider]))
            self._out_reconcile = {}
        if self._out_transitions:
            out.append(Transitioned(records=self._out_transitions))
            self._out_transitions = []
        if self._out_elastic:  # before the submits that use the instances' room
            out.extend(self._out_elastic)
            self._out_elastic = []
        for (provider, pool, resubmit), items in sorted(self._out_submits.items()):
            out.append(Submit(provider=provider, pool=pool, items=items, resubmit=resubmit))
        self._out_submits = {}
        for provider in sorted(self._out_cancels):
            out.append(Cancel(provider=provider, keys=self._out_cancels[provider]))
        self._out_cancels = {}
        if self._solving is not None and self._solving.request_id != self._sent_request:
            self._sent_request = self._solving.request_id
            out.append(SolvePlacement(problem=self._solving))
        heap = self._reconcile_heap
        while heap and (
            self._runs[heap[0][2]].state is not TaskState.LOST
            or self._runs[heap[0][2]].reconcile_token != heap[0][1]
        ):
            heapq.heappop(heap)  # answered or superseded: no reason to wake for it
        wake = min(
            self._retry_heap[0][0] if self._retry_heap else float("inf"),
            heap[0][0] if heap else float("inf"),
            self._next_lease_check,
            idle_wake,
            self._cool_next,
        )
        if wake != float("inf") and wake != self._wake:
            self._wake = wake
            out.append(WakeAt(at=wake))
        return out
