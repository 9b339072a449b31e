"""The simulator's shell: drives the real ``SchedulerCore`` and the real placement in virtual time.

This is the second shell around the sans-IO core (the Ray actors are the first); it carries out
the core's commands inline, exactly as ``stowplan.actors.queue`` does in real time:

- ``Transitioned``: recorded for the metrics (the store's job in production);
- ``SolvePlacement``: the chosen policy (a placement function) solves it at once;
- ``Submit``: ``SimProvider.submit_now``; a failed call (API error, throttling, lost answer, a
  site cut off) is retried with capped, seeded exponential backoff with the SAME keys, and only
  while the core still waits on those keys, so a retry can never run an attempt twice;
- ``Reconcile``: the provider describes the keys (retried the same way);
- ``Cancel``: passed to the provider; ``WakeAt``: a Tick is scheduled then.

Providers report state changes as they happen (a watch); reports of one provider at one virtual
time are delivered as one ``ProviderReported``. Every ``heartbeat`` the shell also describes all
keys it is waiting on, in one batched call per provider, which renews the core's leases; a site
that is cut off cannot be described, its leases expire, the core marks those runs LOST and asks
for reconciliation, and the answers come once the site is back.

There is no scheduling logic here: the simulated and the real control plane differ only in the
clock and the providers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from msgspec import Struct, field

from stowplan.errors import InternalError, ProviderError, SpecError
from stowplan.placement.problem import Dataset, Link, PlacementContext, PlacementSolution
from stowplan.providers.base import TERMINAL_PROVIDER_STATES, LaunchSpec, Report
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Cancel,
    Command,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    Reconcile,
    SolvePlacement,
    Submit,
    SubmitItem,
    TaskInstance,
    TasksSubmitted,
    Tick,
    Transitioned,
    WakeAt,
)
from stowplan.scheduler.states import LEASED
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
                lease_ttl=sched.lease_ttl_s, seed=self.opts.seed, context=placement_context(cluster)
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
                sink=self._on_report,
                on_capacity=self._on_capacity,
                inject=self.opts.faults,
            )
        self.pool_order = [p.name for p in cluster.pools]
        self._quotas = {k: tuple(v) for k, v in cluster.scheduler.project_sites.items()}
        self.pool_model = {p.name: (p.gpu_model or "").lower() for p in cluster.pools}
        self.metrics = Metrics(self)
        self.counters = SimCounters()
        self._pending: deque[Event] = deque()
        self._idle: PlacementSolution | None = None
        self._inbox: dict[str, list[Report]] = {}
        self._capacity_due: set[str] = set()
        self._wakes: set[float] = set()
        self._outstanding: dict[str, dict[str, str]] = {n: {} for n in self.providers}
        self._retry_rng = self.engine.rng("shell/retry")
        self._next_arrival = 0
        self._arrivals = sorted(workload.jobs, key=lambda j: (j.submit, j.id))
        self._heartbeat_on = False
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
            schedule_cutoffs(self.engine, faults, self.providers, self._on_restore)

    # ---- running ---------------------------------------------------------------------------

    def run(self) -> Metrics:
        for name in sorted(self.providers):
            self._feed(PoolsDiscovered(provider=name, pools=self.providers[name].core_pools()))
        if self._arrivals:
            self.engine.at(self._arrivals[0].submit, self._arrive, None, PRIO_ARRIVAL)
        self.engine.at(0.0, self._sample, None, PRIO_SAMPLE)
        self._start_heartbeat()
        self.engine.run(self.until)
        for prov in self.providers.values():
            for pool in prov.pools.values():
                pool.finish_accounting()
        self._collect_counters()
        self.metrics.close(self.engine.now)
        return self.metrics

    def _done(self) -> bool:
        return self._next_arrival >= len(self._arrivals) and self.core.unfinished() == 0

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
        self._feed(TasksSubmitted(tasks=tasks))
        self._start_heartbeat()

    def _feed(self, event: Event) -> None:
        """Hand one event to the core and carry out every command that follows, in order."""
        pending = self._pending
        pending.append(event)
        if len(pending) > 1:
            return  # already inside the loop below
        now = self.engine.now
        core = self.core
        retried = False
        while pending:
            ev = pending[0]
            self.counters.core_events += 1
            for cmd in core.handle(ev, now):
                self._do(cmd)
            pending.popleft()
            if not pending and self._idle is not None and not retried:
                # something changed since the policy placed nothing: let the core ask again
                # (once per outside event, so a policy that keeps waiting cannot spin)
                retried = True
                pending.append(PlacementDecided(solution=self._idle))
                self._idle = None
        if self._done():
            self.engine.stop()

    def _do(self, cmd: Command) -> None:
        if isinstance(cmd, Transitioned):
            self.metrics.transitions(cmd.records, self.engine.now)
        elif isinstance(cmd, SolvePlacement):
            self.counters.solves += 1
            sol = self.policy(
                cmd.problem,
                seed=self.opts.seed,
                pool_order=self.pool_order,
                rate=self._rate if self.workload.throughput else None,
            )
            if sol.assignments:
                self._pending.append(PlacementDecided(solution=sol))
            else:
                # NOTE: the core asks again at once after an answer that placed nothing, if its
                # capacity bound says something fits; a policy that chose to wait (FIFO behind a
                # blocked head, or one that keeps fast GPUs free) would spin at this instant.
                # The answer is held until the next outside event instead.
                self._idle = sol
        elif isinstance(cmd, Submit):
            self._submit(cmd.provider, cmd.pool, cmd.items, 0)
        elif isinstance(cmd, Reconcile):
            self._reconcile(cmd.provider, cmd.keys, 0)
        elif isinstance(cmd, Cancel):
            self._cancel(cmd.provider, cmd.keys, 0)
        elif isinstance(cmd, WakeAt):
            at = max(cmd.at, self.engine.now)
            if at not in self._wakes:
                self._wakes.add(at)
                self.engine.at(at, self._tick, at, PRIO_TICK)
        else:  # pragma: no cover - the union is closed
            raise InternalError(f"unknown command {type(cmd).__name__}")

    def _tick(self, at: float) -> None:
        self._wakes.discard(at)
        self._feed(Tick())

    # ---- provider calls ----------------------------------------------------------------------

    def _backoff(self, tries: int) -> float:
        base = min(self.retry.backoff_cap, self.retry.backoff * 2.0 ** min(30, tries))
        return base * (1.0 + 0.25 * (2.0 * self._retry_rng.random() - 1.0))

    def _still_waiting(self, item: SubmitItem) -> bool:
        """True while the core still waits for this very attempt to be submitted."""
        core = self.core
        return core.key(item.run_id) == item.key and core.state(item.run_id) in LEASED

    def _submit(self, provider: str, pool: str, items: Sequence[SubmitItem], tries: int) -> None:
        prov = self.providers[provider]
        if tries:
            items = [it for it in items if self._still_waiting(it)]
            if not items:
                return
        out = self._outstanding[provider]
        requests = prov.plan(
            [
                LaunchSpec(
                    key=it.key, run_id=it.run_id, attempt=it.attempt, pool=pool, name=it.run_id
                )
                for it in items
            ]
        )
        for it in items:
            out[it.key] = it.run_id
        self.counters.submits += 1
        try:
            reports = prov.submit_now(requests)
        except ProviderError as e:
            if not e.retryable:
                raise InternalError(f"simulated submit refused: {e}") from e
            self.counters.submit_retries += 1
            self.engine.after(
                self._backoff(tries),
                self._retry_submit,
                (provider, pool, list(items), tries + 1),
                PRIO_PROVIDER,
            )
            return
        self._deliver(provider, reports)

    def _retry_submit(self, arg: tuple[str, str, list[SubmitItem], int]) -> None:
        self._submit(*arg)

    def _reconcile(self, provider: str, keys: Sequence[str], tries: int) -> None:
        prov = self.providers[provider]
        if tries:
            keys = [k for k in keys if self._key_live(k)]
            if not keys:
                return
        try:
            reports = prov.describe_now(keys)
        except ProviderError:
            self.counters.describe_retries += 1
            self.engine.after(
                self._backoff(tries),
                self._retry_reconcile,
                (provider, list(keys), tries + 1),
                PRIO_PROVIDER,
            )
            return
        self._deliver(provider, reports)

    def _retry_reconcile(self, arg: tuple[str, list[str], int]) -> None:
        self._reconcile(*arg)

    def _key_live(self, key: str) -> bool:
        run_id = self.core.run_of_key(key)
        return (
            run_id is not None
            and self.core.key(run_id) == key
            and self.core.state(run_id) in LEASED
        )

    def _cancel(self, provider: str, keys: Sequence[str], tries: int) -> None:
        try:
            self.providers[provider].cancel_now(keys)
        except ProviderError:
            self.engine.after(
                self._backoff(tries),
                self._retry_cancel,
                (provider, list(keys), tries + 1),
                PRIO_PROVIDER,
            )

    def _retry_cancel(self, arg: tuple[str, list[str], int]) -> None:
        self._cancel(*arg)

    def _deliver(self, provider: str, reports: list[Report]) -> None:
        if not reports:
            return
        out = self._outstanding[provider]
        for r in reports:
            if r.state in TERMINAL_PROVIDER_STATES:
                out.pop(r.key, None)
        self.counters.reports += len(reports)
        self._feed(ProviderReported(provider=provider, reports=reports))

    # ---- what providers say on their own -------------------------------------------------

    def _on_report(self, provider: str, rep: Report) -> None:
        box = self._inbox.get(provider)
        if box is None:
            self._inbox[provider] = [rep]
            self.engine.at(self.engine.now, self._flush_inbox, provider, PRIO_PROVIDER)
        else:
            box.append(rep)

    def _flush_inbox(self, provider: str) -> None:
        reports = self._inbox.pop(provider, [])
        self._deliver(provider, reports)

    def _on_capacity(self, provider: str) -> None:
        if provider not in self._capacity_due:
            self._capacity_due.add(provider)
            self.engine.at(self.engine.now, self._rediscover, provider, PRIO_INFRA + 2)

    def _rediscover(self, provider: str) -> None:
        self._capacity_due.discard(provider)
        self._feed(PoolsDiscovered(provider=provider, pools=self.providers[provider].core_pools()))

    def _on_restore(self, provider: str) -> None:
        self._heartbeat_one(provider)

    # ---- heartbeat (batched observation) and sampling ----------------------------------------

    def _start_heartbeat(self) -> None:
        if not self._heartbeat_on:
            self._heartbeat_on = True
            self.engine.after(
                self.cluster.scheduler.heartbeat_s, self._heartbeat, None, PRIO_PROVIDER
            )

    def _heartbeat(self, _: object) -> None:
        self.counters.heartbeats += 1
        for name in sorted(self.providers):
            self._heartbeat_one(name)
        if any(self._outstanding.values()) or self._next_arrival < len(self._arrivals):
            self.engine.after(
                self.cluster.scheduler.heartbeat_s, self._heartbeat, None, PRIO_PROVIDER
            )
        else:
            self._heartbeat_on = False

    def _heartbeat_one(self, provider: str) -> None:
        out = self._outstanding[provider]
        for k in [k for k in out if not self._key_live(k)]:
            del out[k]
        if not out:
            return
        try:
            reports = self.providers[provider].describe_now(list(out))
        except ProviderError:
            return  # counted by the provider; the lease decides what happens next
        self._deliver(provider, reports)

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
        c.events = self.engine.events_run
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
