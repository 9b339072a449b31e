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
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from msgspec import Struct, field

from stowplan.errors import InternalError, SpecError
from stowplan.placement.problem import (
    Dataset,
    Link,
    PlacementContext,
    PlacementProblem,
    PlacementSolution,
)
from stowplan.providers.base import LaunchSpec, Report
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import SubmitItem, TaskInstance, TasksSubmitted, Transition
from stowplan.scheduler.retry import Backoff
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
from stowplan.simulator.provider import DataNet, SimProvider
from stowplan.simulator.workloads import SimJob, Workload
from stowplan.spec.models import RetryPolicy

Progress = Callable[[float, float], None]
"""(virtual now, virtual horizon or infinity) -> None; called as simulated time advances."""

SIMULATED_COMMAND = ["simulated"]
"""What a simulated attempt runs, as its launch says: nothing (its job is named by the run)."""

UNBOUNDED_EXTRA_S = 86_400.0
"""without ``until``, a workload with never-ending services stops this long after its last
arrival"""


class SimOptions(Struct, frozen=True, kw_only=True):
    policy: str = "cpsat"
    seed: int = 0
    until: float | None = None
    faults: bool = True
    solve_budget: float | None = None
    samples: int = 400


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
    return PlacementContext(links=links, datasets=datasets)


WAKE_PRIORITY: dict[Wake, int] = {
    Wake.DISCOVER: PRIO_INFRA + 2,
    Wake.REPORTS: PRIO_PROVIDER,
    Wake.RETRY: PRIO_PROVIDER,
    Wake.OBSERVE: PRIO_PROVIDER,
    Wake.TICK: PRIO_TICK,
}
"""the engine priority of each kind of shell callback: the world changes first (node failures,
completions), then capacity is rediscovered, then provider traffic, arrivals, the core's ticks"""


class _EngineClock:
    """Virtual time: the engine is the clock, and a coroutine of the shell runs at once."""

    __slots__ = ("_at", "engine")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._at = engine.at

    def now(self) -> float:
        return self.engine.now

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any, wake: Wake) -> None:
        self._at(when, fn, arg, WAKE_PRIORITY[wake])  # total: every Wake is in the table

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

    __slots__ = ("metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def transitions(self, records: list[Transition], at: float) -> None:
        self.metrics.transitions(records, at)

    def decided(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        del problem, solution  # the metrics read placements from the transitions

    async def launches(
        self, provider: str, pool: str, items: Sequence[SubmitItem]
    ) -> list[LaunchSpec]:
        del provider
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
        self.core = SchedulerCore(
            CoreConfig(
                lease_ttl=sched.lease_ttl_s,
                seed=self.opts.seed,
                context=placement_context(cluster),
                idle_grace=sched.idle_grace_s,
            )
        )
        self.retry = RetryPolicy(max_attempts=sched.max_attempts, backoff_cap=sched.backoff_cap_s)
        self.jobs: dict[str, SimJob] = {}
        for j in workload.jobs:
            if j.id in self.jobs:
                raise SpecError(
                    f"job id {j.id!r} appears twice",
                    file=workload.source,
                    hint="every job in a workload needs a unique id",
                )
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
        self._quotas = {k: tuple(v) for k, v in cluster.scheduler.project_sites.items()}
        self.pool_model = {p.name: (p.gpu_model or "").lower() for p in cluster.pools}
        self.metrics = Metrics(self)
        self.counters = SimCounters()
        self._next_arrival = 0
        self._arrivals = sorted(workload.jobs, key=lambda j: (j.submit, j.id))
        self.shell = CommandShell(
            self.core,
            clock=_EngineClock(self.engine),
            solver=_PolicySolver(self),
            providers=self.providers,
            records=_MetricsRecords(self.metrics),
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
            prov.sink = self.shell.report
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
        run_now(self.shell.discover())
        if self._arrivals:
            self.engine.at(self._arrivals[0].submit, self._arrive, None, PRIO_ARRIVAL)
        self.engine.at(0.0, self._sample, None, PRIO_SAMPLE)
        self.shell.start()
        self.engine.run(self.until)
        for prov in self.providers.values():
            for pool in prov.pools.values():
                pool.finish_accounting()
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
        self.metrics.sample(self.engine.now)
        if self.progress is not None:
            self.progress(self.engine.now, self.until if self.until is not None else float("inf"))
        if not self._done():
            self.engine.after(self.sample_every, self._sample, None, PRIO_SAMPLE)

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
