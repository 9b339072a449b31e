"""The simulator's adapter: the one command shell (``stowplan.shell``) in virtual time.

The real ``SchedulerCore`` and the real placement run inside the same ``CommandShell`` that
hosts them in production; this module only supplies its four ports:

- clock: the discrete-event engine (``_EngineClock``); the shell's coroutines are run to their
  end at once (``run_now``), because every simulated port answers at once;
- solver: the chosen policy (a placement function) with the simulation's context;
- providers: one ``SimProvider`` per site, behind the same provider contract as every driver;
  they push their reports and capacity changes to the shell;
- run records: the metrics (the store's job in production).

Retrying a submit whose answer was lost (same keys, only while the core waits on them),
provisioning and terminating cloud instances (the core's ``Provision``/``Terminate``, retried
with the same token; the pools boot, bill and reclaim them), reconcile, batched observation
(one describe per provider every ``heartbeat``, which renews the core's leases; a cut-off site
cannot be described, its leases expire, the core marks those runs LOST and reconciles, and the
answers come once the site is back) and rediscovery when capacity changes are the shell's,
line for line as in production. The simulated and the real control
plane differ only in the clock and the providers.

Budget: ``SimOptions.budget`` is the project's ``[policy] budget``; the core gets it as in
production (``CoreConfig.budget``) and holds what would break it. What was spent is what the
simulated clouds have billed so far (instances stopped, and those still up until now, at their
pool's price): the whole simulation is one experiment, and virtual time 0 is the start of a
calendar month (1970-01, UTC). The shell is given it (``SchedulerCore.set_spending``) when
production's queue refreshes it: before a provider's reports reach the core (an attempt ended:
its cost is recorded first), at least every ``SPENDING_EVERY_S`` of virtual time, and when a
new month begins; these are checked before each of the shell's callbacks and each arrival. The
figure is the instances' whole bill, boot and idle time included, where production records only
the time its attempts ran: a simulation may hold runs a little sooner than production would.
A new month is a ``Tick`` for the core: runs the monthly budget held are placed again. Runs held
for good (``HELD_FOR_GOOD_S``) end a simulation without ``until``; they stay READY in its report.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import msgspec
from msgspec import Struct, field

from stowplan.errors import InternalError, SpecError
from stowplan.placement.leases import DeviceLease
from stowplan.placement.problem import (
    Dataset,
    Link,
    PlacementContext,
    PlacementProblem,
    PlacementSolution,
)
from stowplan.providers.base import LaunchSpec, Report
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    SubmitItem,
    TaskInstance,
    TasksSubmitted,
    Tick,
    Transition,
)
from stowplan.scheduler.retry import Backoff
from stowplan.scheduler.states import TaskState
from stowplan.shell import CommandShell, ShellConfig, Wake, run_now
from stowplan.simulator.cluster import ClusterSpec
from stowplan.simulator.engine import (
    PRIO_ARRIVAL,
    PRIO_INFRA,
    PRIO_PROVIDER,
    PRIO_SAMPLE,
    PRIO_TICK,
    Engine,
)
from stowplan.simulator.faults import ApiFaults, schedule_cutoffs, schedule_node_failures
from stowplan.simulator.metrics import Metrics
from stowplan.simulator.policies import PolicyFn, resolve
from stowplan.simulator.provider import CloudInstanceType, DataNet, SimProvider
from stowplan.simulator.workloads import SimJob, Workload
from stowplan.spec.models import RetryPolicy, SpendBudget

Progress = Callable[[float, float], None]
"""(virtual now, virtual horizon or infinity) -> None; called as simulated time advances."""

SIMULATED_COMMAND = ["simulated"]
"""What a simulated attempt runs, as its launch says: nothing (its job is named by the run)."""

UNBOUNDED_EXTRA_S = 86_400.0
"""without ``until``, a workload with never-ending services stops this long after its last
arrival"""

SPENDING_EVERY_S = 300.0
"""virtual seconds between refreshes of what was spent when no report came meanwhile (as
production's ``actors.queue.SPENDING_EVERY``)"""

HELD_FOR_GOOD_S = 86_400.0
"""with a budget and without ``until``: a simulation whose unfinished runs have all been READY
this long, with no arrival left (and, with a monthly budget, through the start of a new month),
ends; only more budget would place them"""


class SimOptions(Struct, frozen=True, kw_only=True):
    policy: str = "cpsat"
    seed: int = 0
    until: float | None = None
    faults: bool = True
    solve_budget: float | None = None
    samples: int = 400
    budget: SpendBudget | None = None
    """the project's ``[policy] budget`` for runs on priced cloud pools (module doc); None: no
    limit"""


class SimCounters(Struct, kw_only=True):
    events: int = 0
    core_events: int = 0
    solves: int = 0
    submits: int = 0
    submit_retries: int = 0
    describe_retries: int = 0
    reports: int = 0
    heartbeats: int = 0
    provisions: int = 0
    """provision calls (the core's Provision commands, retries included)"""
    terminates: int = 0
    elastic_retries: int = 0
    duplicate_submits_absorbed: int = 0
    keys_executed: int = 0
    api_errors: int = 0
    throttled: int = 0
    lost_answers: int = 0
    unreachable_calls: int = 0
    node_failures: int = 0
    preemptions: int = 0
    backfilled: int = 0
    ignored_reports: int = 0
    spending_refreshes: int = 0
    """times the core was told what was spent (``SchedulerCore.set_spending``)"""
    notes: list[str] = field(default_factory=list)


def placement_context(cluster: ClusterSpec) -> PlacementContext:
    """The network and datasets, as every placement problem of this cluster carries them.

    Pools are given without a node shape: the placement engine would then refuse multi-node
    jobs (it never splits a task across nodes), which Slurm partitions run as whole nodes.
    """
    gib_per_gb = 1e9 / 2**30
    links = []
    for ln in cluster.links:
        a, b = ln.between
        for src, dst in ((a, b), (b, a)):
            links.append(
                Link(
                    src=src,
                    dst=dst,
                    bandwidth=ln.bytes_per_s,
                    egress_per_gb=ln.egress_per_gib * gib_per_gb,
                )
            )
    datasets = [
        Dataset(id=d.name, size=d.size_bytes, sites=tuple(d.sites)) for d in cluster.datasets
    ]
    return PlacementContext(
        links=links, datasets=datasets, objective=cluster.scheduler.device_objective
    )


WAKE_PRIORITY: dict[Wake, int] = {
    Wake.DISCOVER: PRIO_INFRA + 2,
    Wake.REPORTS: PRIO_PROVIDER,
    Wake.RETRY: PRIO_PROVIDER,
    Wake.OBSERVE: PRIO_PROVIDER,
    Wake.TICK: PRIO_TICK,
}
"""the engine priority of each kind of shell callback: the world changes first (node failures,
completions), then capacity is rediscovered, then provider traffic, arrivals, the core's ticks"""


def gang_width(cluster: ClusterSpec) -> int:
    """The GPUs of one node, where every GPU pool of ``cluster`` leases devices and all have
    that many per node; else 0. A job with more GPUs than that (a trace's 16-GPU job on
    8-GPU nodes) is then a gang (``SimJob.nodes``): every pool that may take it places it on
    whole nodes' parts alike. Elsewhere jobs keep their ``nodes``: a counting pool runs a
    wide job on whole nodes itself, and takes no gang."""
    gpu_pools = [p for p in cluster.pools if p.gpus_per_node]
    widths = {p.gpus_per_node for p in gpu_pools}
    if len(widths) != 1 or not all(p.device_leases for p in gpu_pools):
        return 0
    return widths.pop()


def gang_nodes(gpus: int, width: int) -> int:
    """The fewest nodes of ``width`` GPUs that hold ``gpus`` in equal whole parts: 16 on 8 is
    2 x 8, 12 is 2 x 6, 20 is 4 x 5."""
    k = -(-gpus // width)
    while gpus % k:
        k += 1
    return k


class _EngineClock:
    """Virtual time: the engine is the clock, and a coroutine of the shell runs at once.
    ``before``, when given, runs before each callback of the shell (the budget's spending)."""

    __slots__ = ("_at", "before", "engine")

    def __init__(self, engine: Engine, before: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._at = engine.at
        self.before = before

    def now(self) -> float:
        return self.engine.now

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any, wake: Wake) -> None:
        prio = WAKE_PRIORITY[wake]  # total: every Wake is in the table
        if self.before is None:
            self._at(when, fn, arg, prio)
        else:
            self._at(when, self._before_then, (fn, arg), prio)

    def _before_then(self, call: tuple[Callable[[Any], None], Any]) -> None:
        assert self.before is not None
        self.before()
        fn, arg = call
        fn(arg)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        run_now(work)


class _PolicySolver:
    """The chosen policy, given what the simulation knows besides the problem."""

    __slots__ = ("sim",)

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    async def solve(self, problem: PlacementProblem) -> PlacementSolution:
        sim = self.sim
        return sim.policy(
            problem,
            seed=sim.opts.seed,
            pool_order=sim.pool_order,
            rate=sim._rate if sim.workload.throughput else None,
        )


class _MetricsRecords:
    """Run records in simulation: transitions go to the metrics; intents need no disk."""

    __slots__ = ("leases", "metrics")

    def __init__(self, metrics: Metrics, leases: dict[str, DeviceLease]) -> None:
        self.metrics = metrics
        self.leases = leases
        """shared with every ``SimProvider``: the core's device lease of each attempt key"""

    def transitions(self, records: list[Transition], at: float) -> None:
        self.metrics.transitions(records, at)

    def decided(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        del problem, solution  # the metrics read placements from the transitions

    async def launches(
        self, provider: str, pool: str, items: Sequence[SubmitItem]
    ) -> list[LaunchSpec]:
        del provider
        for it in items:
            if it.lease is not None:
                self.leases[it.key] = it.lease
        return [
            LaunchSpec(
                key=it.key,
                run_id=it.run_id,
                attempt=it.attempt,
                pool=pool,
                name=it.run_id,
                argv=SIMULATED_COMMAND,
            )
            for it in items
        ]

    async def intend(self, provider: str, pool: str, items: Sequence[SubmitItem]) -> None:
        del provider, pool, items

    def reported(self, provider: str, reports: list[Report]) -> None:
        del provider, reports


class Simulation:
    """One run of one workload on one cluster with one policy and one seed."""

    def __init__(
        self,
        cluster: ClusterSpec,
        workload: Workload,
        options: SimOptions | None = None,
        *,
        policy_fn: PolicyFn | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.cluster = cluster
        self.workload = workload
        self.opts = options or SimOptions()
        self.policy = policy_fn or resolve(self.opts.policy)
        self.progress = progress
        self.engine = Engine(seed=self.opts.seed)
        sched = cluster.scheduler
        self.budget = self.opts.budget
        self.core = SchedulerCore(
            CoreConfig(
                lease_ttl=sched.lease_ttl_s,
                seed=self.opts.seed,
                context=placement_context(cluster),
                idle_grace=sched.idle_grace_s,
                budget=self.budget,
            )
        )
        self.retry = RetryPolicy(max_attempts=sched.max_attempts, backoff_cap=sched.backoff_cap_s)
        self.jobs: dict[str, SimJob] = {}
        width, ganged = gang_width(cluster), 0
        for j in workload.jobs:
            if j.id in self.jobs:
                raise SpecError(
                    f"job id {j.id!r} appears twice",
                    file=workload.source,
                    hint="every job in a workload needs a unique id",
                )
            if width and j.nodes <= 1 and j.gpus > width:
                j = msgspec.structs.replace(j, nodes=gang_nodes(j.gpus, width))
                ganged += 1
            self.jobs[j.id] = j
        self.data = DataNet(cluster)
        self.providers: dict[str, SimProvider] = {}
        faults = cluster.faults if self.opts.faults else type(cluster.faults)()
        for site in cluster.sites:
            pools = [p for p in cluster.pools if p.site == site.name]
            if not pools:
                continue
            self.providers[site.name] = SimProvider(
                site.name,
                pools,
                self.engine,
                jobs=self.jobs.__getitem__,
                data=self.data,
                faults=ApiFaults(self.engine, site.name, faults),
                throughput=workload.throughput,
                inject=self.opts.faults,
            )
        self.pool_order = [p.name for p in cluster.pools]
        self.leases: dict[str, DeviceLease] = {}
        for prov in self.providers.values():
            prov.leases = self.leases
        self._quotas = {k: tuple(v) for k, v in cluster.scheduler.project_sites.items()}
        self.pool_model = {p.name: (p.gpu_model or "").lower() for p in cluster.pools}
        self.metrics = Metrics(self)
        self.counters = SimCounters()
        self._next_arrival = 0
        self._arrivals = sorted(self.jobs.values(), key=lambda j: (j.submit, j.id))
        if ganged:
            self.counters.notes.append(
                f"{ganged} jobs ask for more GPUs than a node has ({width}): each runs as a gang "
                "of equal parts on as few nodes as hold them (gang_nodes)"
            )
        self._priced = [
            pool
            for prov in self.providers.values()
            for pool in prov.pools.values()
            if isinstance(pool, CloudInstanceType) and pool.spec.price_per_hour > 0
        ]
        self._spent = 0.0
        self._closed = False
        """the books are closed: every instance still up is billed in its pool's ``cost``"""
        self._spending_at = -float("inf")
        self._month = (0.0, 0.0)
        """(the end of the month of the last refresh, what was spent before that month)"""
        self._held_since: tuple[float, float] | None = None
        """(since when every unfinished run is READY with no arrival left, the end of that
        month)"""
        budgeted = self.budget is not None
        self.shell = CommandShell(
            self.core,
            clock=_EngineClock(self.engine, self._spending_due if budgeted else None),
            solver=_PolicySolver(self),
            providers=self.providers,
            records=_MetricsRecords(self.metrics, self.leases),
            config=ShellConfig(
                seed=self.opts.seed,
                provider_backoff=Backoff(
                    base=self.retry.backoff, cap=self.retry.backoff_cap, jitter=self.retry.jitter
                ),
                observe_every=sched.heartbeat_s,
                # every capacity change of a simulated pool is pushed (``capacity_changed``)
                rediscover_every=None,
                submit_chunk=None,
            ),
            busy=self._arrivals_left,
            after_events=self._check_done,
        )
        for prov in self.providers.values():
            prov.sink = self._report if budgeted else self.shell.report
            prov.on_capacity = self.shell.capacity_changed
        self._never_ends = any(j.duration is None and not j.steps for j in workload.jobs)
        self.until = self.opts.until
        if self.until is None and self._never_ends and self._arrivals:
            self.until = self._arrivals[-1].submit + UNBOUNDED_EXTRA_S
            self.counters.notes.append(
                f"the workload has services that never end: stopped {UNBOUNDED_EXTRA_S:g} s "
                "after the last arrival (pass --until to choose)"
            )
        span = (self._arrivals[-1].submit - self._arrivals[0].submit) if self._arrivals else 0.0
        horizon = self.until if self.until is not None else span
        self.sample_every = max(60.0, horizon / max(1, self.opts.samples))
        if self.opts.faults:
            for prov in self.providers.values():
                schedule_node_failures(self.engine, prov)
            schedule_cutoffs(self.engine, faults, self.providers, self.shell.observe_now)

    # ---- running ---------------------------------------------------------------------------

    def run(self) -> Metrics:
        if self.budget is not None:
            self._refresh_spending()
        run_now(self.shell.discover())
        if self._arrivals:
            self.engine.at(self._arrivals[0].submit, self._arrive, None, PRIO_ARRIVAL)
        self.engine.at(0.0, self._sample, None, PRIO_SAMPLE)
        self.shell.start()
        self.engine.run(self.until)
        for prov in self.providers.values():
            for pool in prov.pools.values():
                pool.finish_accounting()
        self._closed = True
        self._collect_counters()
        self.metrics.close(self.engine.now)
        return self.metrics

    def _done(self) -> bool:
        return self._next_arrival >= len(self._arrivals) and self.core.unfinished() == 0

    def _check_done(self) -> None:
        if self._done():
            self.engine.stop()

    def _arrivals_left(self) -> bool:
        return self._next_arrival < len(self._arrivals)

    def _arrive(self, _: object) -> None:
        if self.budget is not None:
            self._spending_due()
        i = self._next_arrival
        arr = self._arrivals
        t = arr[i].submit
        j = i
        tasks = []
        retry = self.retry
        quotas = self._quotas
        while j < len(arr) and arr[j].submit <= t:
            job = arr[j]
            tasks.append(
                TaskInstance(
                    run_id=job.id,
                    project=job.project,
                    cpus=job.cpus,
                    memory=job.memory,
                    gpus=job.gpus,
                    gpu_milli=job.gpu_milli,
                    nodes=job.nodes,
                    gpu_types=job.gpu_types or self._runnable_on(job),
                    retry=retry,
                    allowed_providers=quotas.get(job.project),
                    datasets=job.datasets,
                )
            )
            self.metrics.submitted(job.id, t)
            j += 1
        self._next_arrival = j
        if j < len(arr):
            self.engine.at(arr[j].submit, self._arrive, None, PRIO_ARRIVAL)
        self.shell.feed(TasksSubmitted(tasks=tasks))
        self.shell.observe()

    def _sample(self, _: object) -> None:
        if self.budget is not None:
            self._spending_due()
        self.metrics.sample(self.engine.now)
        if self.progress is not None:
            self.progress(self.engine.now, self.until if self.until is not None else float("inf"))
        if self._done() or self._held_for_good():
            return
        self.engine.after(self.sample_every, self._sample, None, PRIO_SAMPLE)

    # ---- budget ----------------------------------------------------------------------------

    def billed_usd(self) -> float:
        """Dollars the priced cloud pools have billed so far: their stopped instances, and the
        ones still up until now (at least ``min_billed`` each)."""
        now = self.engine.now
        total = 0.0
        for pool in self._priced:
            spec = pool.spec
            total += pool.cost
            if self._closed:
                continue
            for n, iid in enumerate(pool.instance_of):
                if iid is not None:
                    seconds = max(spec.min_billed_s, now - pool.launched_at[n])
                    total += seconds * spec.price_per_hour / 3600.0
        return total

    def _refresh_spending(self) -> None:
        """Tell the core what was spent this month and in all (module doc: *Budget*)."""
        now = self.engine.now
        spent = self.billed_usd()
        month_end, before_month = self._month
        new_month = now >= month_end and month_end > 0
        if now >= month_end:
            # what was billed by the last refresh belongs to the months before
            before_month = self._spent if new_month else 0.0
            self._month = (_month_end(now), before_month)
        self._spent = spent
        self._spending_at = now
        self.counters.spending_refreshes += 1
        self.core.set_spending(
            month_usd=spent - before_month, experiment_usd=spent, budget=self.budget
        )
        if new_month and self.core.unfinished():
            self.shell.feed(Tick())  # room again: what the monthly budget held is placed

    def _held_for_good(self) -> bool:
        """With a budget and no ``until``: whether every unfinished run has been READY for
        ``HELD_FOR_GOOD_S`` with no arrival left (through a new month, with a monthly budget);
        if so the engine stops, with a note."""
        if self.budget is None or self.until is not None:
            return False
        core = self.core
        waiting = core.unfinished()
        if self._arrivals_left() or not waiting or core.counts[TaskState.READY] != waiting:
            self._held_since = None
            return False
        now = self.engine.now
        if self._held_since is None:
            self._held_since = (now, self._month[0])
        since, month_end = self._held_since
        if now - since < HELD_FOR_GOOD_S or (
            self.budget.monthly_usd is not None and now < month_end
        ):
            return False
        self.counters.notes.append(
            f"stopped at {now:,.0f} s: {waiting:,} runs were still waiting, READY since "
            f"{since:,.0f} s with nothing running: only more budget would place them"
        )
        self.engine.stop()
        return True

    def _spending_due(self) -> None:
        """Refresh what was spent if production's queue would have by now."""
        now = self.engine.now
        if now >= self._spending_at + SPENDING_EVERY_S or now >= self._month[0]:
            self._refresh_spending()

    def _report(self, provider: str, report: Report) -> None:
        """A pushed report, with a budget: what was spent first (an attempt that ended is
        billed before the core hears of it, as in production)."""
        self._refresh_spending()
        self.shell.report(provider, report)

    # ---- placement context -----------------------------------------------------------------

    def _rate(self, run_id: str, model: str) -> float | None:
        tp = self.workload.throughput
        job = self.jobs.get(run_id)
        if tp is None or job is None or not job.job_type:
            return None
        return tp.rate(job.job_type, job.gpus, model)

    def _runnable_on(self, job: SimJob) -> tuple[str, ...]:
        """GPU models the throughput table says this job can run on (a feasibility
        constraint, the same for every policy), or () for any."""
        tp = self.workload.throughput
        if tp is None or not job.steps:
            return ()
        row = tp.table.get(tp.key(job.job_type, job.gpus), {})
        ok = tuple(sorted(m for m, r in row.items() if r > 0))
        return () if len(ok) == len(row) else ok

    def _collect_counters(self) -> None:
        c = self.counters
        sc = self.shell.counters
        c.events = self.engine.events_run
        c.core_events = sc.core_events
        c.solves = sc.solves
        c.submits = sc.submits
        c.submit_retries = sc.submit_retries
        c.describe_retries = sc.describe_retries
        c.reports = sc.reports
        c.heartbeats = sc.heartbeats
        c.provisions = sc.provisions
        c.terminates = sc.terminates
        c.elastic_retries = sc.elastic_retries
        c.ignored_reports = self.core.ignored_reports
        for prov in self.providers.values():
            c.duplicate_submits_absorbed += prov.duplicate_submits
            c.keys_executed += len(prov.executed)
            c.api_errors += prov.api.errors
            c.throttled += prov.api.throttled
            c.lost_answers += prov.api.lost_answers
            c.unreachable_calls += prov.api.unreachable_calls
            for pool in prov.pools.values():
                c.node_failures += pool.node_failures
                c.preemptions += pool.preemptions
                c.backfilled += pool.backfilled
        for a in self.providers.values():
            for b in self.providers.values():
                if a is not b and a.executed & b.executed:
                    raise InternalError("an attempt key executed at two providers")


def _month_end(t: float) -> float:
    """The first instant of the calendar month (UTC) after the one of virtual time ``t``."""
    from datetime import UTC, datetime

    d = datetime.fromtimestamp(t, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()
