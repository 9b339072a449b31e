"""The one command shell: feeds events to the sans-IO core and carries out its commands.

Theory of operation
-------------------
``SchedulerCore`` decides; this shell does, through four ports (``stowplan.shell.ports``):
a clock, a placement solver, providers and run records. It holds no scheduling policy and no
event-loop policy: it awaits its ports and asks the clock for callbacks. The Ray actors
supply real time and remote calls; the simulator supplies virtual time and ``SimProvider``s
whose answers are complete when returned. Everything below therefore runs line for line the
same in production and in simulation.

- One feed loop. ``feed`` hands events to the core one at a time, in arrival order, and
  carries out every command of one event, in order, before the next event. An event made while
  carrying them out (a submit's answer in virtual time, say) waits its turn.
- ``Transitioned`` goes to the records. ``SolvePlacement`` goes to the solver; its answer,
  whatever it placed, is fed back (the core itself stalls on an empty answer until something
  changes). ``WakeAt`` becomes one Tick at that time.
- ``Submit``: what to launch comes from the records, the intent is written ahead (durable
  before the provider hears of the attempt), then the provider plans and submits.
  *Same key or new attempt*: a transient error (``ProviderError.retryable``: throttled,
  unreachable, an answer lost on the way back) is tried again with the SAME keys, after capped
  seeded backoff, and only while the core still waits on those very keys (the run holds its
  lease under that key); the provider's de-duplication by key makes a retry find the first job,
  never start a second. A refusal (not retryable) is reported as FAILED with
  ``PROVIDER_REJECTED``, and the run's retry policy in the core decides on a new attempt, with
  a new key. The shell never makes a new key itself.
- ``Reconcile``: the keys are described (tried again the same way while they are live) and the
  answers fed back; live keys found are watched from then on. ``Cancel``: passed on, tried
  again on transient errors.
- Observation is batched: reports a provider pushes are delivered per provider per instant as
  one ``ProviderReported``; every ``observe_every`` seconds ONE ``describe`` per provider covers
  every key the shell is still waiting on, which renews the core's leases. A key is watched from
  its submit until a terminal report, or until the core no longer holds it.
- Rediscovery: a provider that says its capacity changed is rediscovered at once (coalesced per
  instant) and the pools fed to the core; every ``rediscover_every`` seconds each provider is
  rediscovered too, and fed only if its pools differ from the last ones fed (or it settles an
  elastic order, below).
- Elastic capacity: ``Provision`` and ``Terminate`` go to the provider's ``provision`` and
  ``terminate`` with the core's token, only where the provider has ``Capability.ELASTIC``.
  A transient error is tried again with the SAME token, after the same backoff, while the core
  still counts the order (``SchedulerCore.counts_order``); a refusal, or a provider that is not
  elastic, is fed back as ``ElasticRefused`` (the core stops counting those instances). A
  provision's answer is fed back as ``Provisioned``; after any answer the provider is
  rediscovered, and that discovery lists the tokens answered before it began
  (``PoolsDiscovered.settled``), so the core stops counting what the pools now show.

Invariants: a key is submitted only after its intent is durable; a key is submitted again only
while the core waits on it, and a job that a submit started after the core gave up on its
key is cancelled; every provider call that failed transiently is tried again with
backoff (``scheduler.retry.Backoff``, jitter fixed by seed and key) until it succeeds or no
longer matters; the core is only ever called from ``feed``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from msgspec import Struct

from stowplan.errors import InternalError, ProviderError
from stowplan.placement.problem import PlacementProblem, Pool
from stowplan.providers.base import Capability, Facts, LaunchSpec, ProviderState, Report
from stowplan.scheduler.core import SchedulerCore
from stowplan.scheduler.events import (
    Cancel,
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
    Terminate,
    Tick,
    Transitioned,
    WakeAt,
)
from stowplan.scheduler.reports import TERMINAL_PROVIDER_STATES
from stowplan.scheduler.retry import Backoff
from stowplan.scheduler.states import LEASED, TaskState
from stowplan.shell.health import LOOPBACK, PROBES, HealthCount, HealthProbe, endpoint_host
from stowplan.shell.ports import Clock, ProviderPort, RunRecords, Solver, Wake
from stowplan.spec.models import FailureClass

PROVIDER_BACKOFF = Backoff(base=2.0, cap=300.0)
"""A provider call that failed transiently is tried again after 2 s, 4 s, ... at most 5 min."""


@dataclass(frozen=True, slots=True)
class ShellConfig:
    seed: int = 0
    """fixes the jitter of every backoff (with the key it is for)."""
    provider_backoff: Backoff = PROVIDER_BACKOFF
    observe_every: float | None = 60.0
    """seconds between batched describes of the keys waited on; None: the providers' own
    watches renew the leases."""
    rediscover_every: float | None = 300.0
    """seconds between periodic rediscoveries; None: providers push every capacity change."""
    submit_chunk: int | None = 10_000
    """at most this many attempts per provider call (bounds what one call holds in memory)."""


class ShellCounters(Struct, kw_only=True):
    core_events: int = 0
    solves: int = 0
    submits: int = 0
    """provider submit calls, retries included."""
    submit_retries: int = 0
    describe_retries: int = 0
    cancel_retries: int = 0
    reports: int = 0
    heartbeats: int = 0
    observe_failures: int = 0
    discover_failures: int = 0
    provisions: int = 0
    """provider provision calls, retries included."""
    terminates: int = 0
    elastic_retries: int = 0
    elastic_refusals: int = 0


T = TypeVar("T")

_Attempts = tuple[str, str, list[SubmitItem], list[LaunchSpec], int]
"""(provider, pool, items, their launches, try number) of a submit to try again."""


class CommandShell:
    """Carries out a ``SchedulerCore``'s commands through the given ports (module doc)."""

    def __init__(
        self,
        core: SchedulerCore,
        *,
        clock: Clock,
        solver: Solver,
        providers: Mapping[str, ProviderPort],
        records: RunRecords,
        config: ShellConfig | None = None,
        busy: Callable[[], bool] | None = None,
        after_events: Callable[[], None] | None = None,
        health: HealthProbe | None = PROBES,
    ) -> None:
        """``busy``: while it is true, observation goes on even with no key out (more work
        is coming). ``after_events``: called each time the feed loop has drained.
        ``health``: probes service tasks' health checks (``stowplan.shell.health``; the real
        probes by default); None: no checks (a virtual-time adapter without them)."""
        self.core = core
        self.clock = clock
        self.solver = solver
        self.providers = providers
        self.records = records
        self.config = config or ShellConfig()
        self.counters = ShellCounters()
        self.outstanding: dict[str, dict[str, str]] = {n: {} for n in providers}
        """per provider, key -> run id of every attempt waited on, in submit order."""
        self.halted = False
        self._busy = busy
        self._after_events = after_events
        self._pending: deque[Event] = deque()
        self._inbox: dict[str, list[Report]] = {}
        self._discover_due: set[str] = set()
        self._pools: dict[str, list[Pool]] = {}
        self._facts: dict[str, Facts] = {}
        self._wakes: set[float] = set()
        self._observing = False
        self._answered: dict[str, set[str]] = {}
        """per provider, tokens of elastic orders answered since its last discovery began."""
        self.health = health
        self._health: dict[str, HealthCount] = {}
        """key -> the probe count of each RUNNING service attempt with a health check."""
        self._nodes: dict[str, str] = {}
        """key -> the node a service attempt's provider said it runs on."""

    # ---- inputs ---------------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Hand one event to the core and carry out every command that follows, in order."""
        if self.halted:
            return
        pending = self._pending
        pending.append(event)
        if len(pending) > 1:
            return  # already inside the loop below
        now = self.clock.now()
        handle = self.core.handle
        do = self._do
        try:
            while pending and not self.halted:
                self.counters.core_events += 1
                for cmd in handle(pending[0], now):
                    do(cmd, now)
                pending.popleft()
        finally:
            pending.clear()  # an exception leaves nothing half-fed behind
        if self._after_events is not None:
            self._after_events()

    async def discover(self, providers: Iterable[str] | None = None) -> None:
        """Discover providers (all by default, in name order) and feed their pools. Errors
        propagate: at boot a provider that cannot say what it has is the caller's to report."""
        for name in sorted(self.providers if providers is None else providers):
            settled = self._answered.pop(name, set())
            try:
                pools = await self.providers[name].discover()
            except BaseException:
                self._answered.setdefault(name, set()).update(settled)
                raise
            self._pools[name] = pools
            self._facts.pop(name, None)
            self.feed(PoolsDiscovered(provider=name, pools=pools, settled=sorted(settled)))

    def start(self) -> None:
        """Start the periodic rediscovery and the observation (after ``discover``)."""
        every = self.config.rediscover_every
        if every is not None:
            self.clock.call_at(self.clock.now() + every, self._rediscover_all, None, Wake.DISCOVER)
        self.observe()

    def facts(self, provider: str) -> Facts:
        """The facts of ``provider``'s last discovery, as its ``plan`` is given them."""
        facts = self._facts.get(provider)
        if facts is None:
            facts = self._facts[provider] = Facts.of(self._pools.get(provider, []))
        return facts

    def halt(self) -> None:
        """Act no more: events are dropped and timers lapse (a failed control plane)."""
        self.halted = True

    def report(self, provider: str, report: Report) -> None:
        """A report the provider pushed; delivered with the others of this instant."""
        box = self._inbox.get(provider)
        if box is None:
            self._inbox[provider] = [report]
            self.clock.call_at(self.clock.now(), self._flush_inbox, provider, Wake.REPORTS)
        else:
            box.append(report)

    def capacity_changed(self, provider: str) -> None:
        """The provider's pools changed (a node lost or back, an instance reclaimed): they are
        rediscovered and fed to the core, once per instant however many changes there were."""
        if provider not in self._discover_due:
            self._discover_due.add(provider)
            self.clock.call_at(self.clock.now(), self._rediscover_due, provider, Wake.DISCOVER)

    def observe(self) -> None:
        """Make sure the batched observation runs (it stops when nothing is waited on)."""
        every = self.config.observe_every
        if self._observing or every is None:
            return
        self._observing = True
        self.clock.call_at(self.clock.now() + every, self._heartbeat, None, Wake.OBSERVE)

    def observe_now(self, provider: str) -> None:
        """Describe every key waited on at ``provider`` now (it became reachable again)."""
        self._observe_one(provider)

    # ---- carrying out commands ----------------------------------------------------------------

    def _do(self, cmd: Command, now: float) -> None:
        spawn = self.clock.spawn
        if isinstance(cmd, Transitioned):
            self.records.transitions(cmd.records, now)
            self._forget(cmd)
            self._watch_services(cmd, now)
        elif isinstance(cmd, Submit):
            items = cmd.items
            step = self.config.submit_chunk
            if step is None or len(items) <= step:
                spawn(self._submit(cmd.provider, cmd.pool, items))
            else:
                for start in range(0, len(items), step):
                    spawn(self._submit(cmd.provider, cmd.pool, items[start : start + step]))
        elif isinstance(cmd, SolvePlacement):
            spawn(self._solve(cmd.problem))
        elif isinstance(cmd, Reconcile):
            spawn(self._reconcile(cmd.provider, cmd.keys, 1))
        elif isinstance(cmd, Cancel):
            out = self.outstanding[cmd.provider]
            for k in cmd.keys:  # the core gave up on them: wait on them no more
                out.pop(k, None)
            spawn(self._cancel(cmd.provider, cmd.keys, 1))
        elif isinstance(cmd, Provision | Terminate):
            spawn(self._elastic(cmd, 1))
        elif isinstance(cmd, WakeAt):
            at = max(cmd.at, now)
            if at not in self._wakes:
                self._wakes.add(at)
                self.clock.call_at(at, self._tick, at, Wake.TICK)
        else:  # pragma: no cover - the union is closed
            raise InternalError(f"unknown command {type(cmd).__name__}")

    def _forget(self, cmd: Transitioned) -> None:
        """Stop waiting on the attempts of runs that left a leased state (finished, failed
        over to a retry, cancelled): without a heartbeat nothing else would prune them."""
        core = self.core
        for r in cmd.records:
            if r.from_state not in LEASED or r.to_state in LEASED:
                continue
            key = core.key(r.run_id)
            for out in self.outstanding.values():
                if out.get(key) == r.run_id:
                    del out[key]

    def _tick(self, at: float) -> None:
        self._wakes.discard(at)
        self.feed(Tick())

    async def _solve(self, problem: PlacementProblem) -> None:
        self.counters.solves += 1
        solution = await self.solver.solve(problem)
        self.records.decided(problem, solution)
        self.feed(PlacementDecided(solution=solution))

    async def _submit(self, provider: str, pool: str, items: list[SubmitItem]) -> None:
        launches = await self.records.launches(provider, pool, items)
        if len(launches) != len(items):
            raise InternalError(f"{len(items)} attempts to submit but {len(launches)} launches")
        await self.records.intend(provider, pool, items)
        await self._send(provider, pool, items, launches, 1)

    async def _send(
        self,
        provider: str,
        pool: str,
        items: list[SubmitItem],
        launches: list[LaunchSpec],
        tries: int,
    ) -> None:
        """Submit the attempts of one batch (again, when ``tries`` > 1)."""
        if tries > 1:
            keep = [i for i, it in enumerate(items) if self._waiting(it)]
            if not keep:
                return
            if len(keep) < len(items):
                items = [items[i] for i in keep]
                launches = [launches[i] for i in keep]
        prov = self.providers[provider]
        requests = prov.plan(launches, self.facts(provider))
        out = self.outstanding[provider]
        for it in items:
            out[it.key] = it.run_id
        if not self._observing:
            self.observe()
        self.counters.submits += 1
        try:
            reports = await prov.submit(requests)
        except ProviderError as e:
            if e.retryable:  # the answer may be lost: the SAME keys again, later
                self.counters.submit_retries += 1
                self._again(
                    self._retry_submit,
                    (provider, pool, items, launches, tries + 1),
                    tries,
                    "submit:" + items[0].key,
                    e.retry_after,
                )
                return
            reports = [
                Report(
                    key=it.key,
                    state=ProviderState.FAILED,
                    failure=FailureClass.PROVIDER_REJECTED,
                    message=str(e),
                )
                for it in items
            ]
        # the core may have given up on a key while its submit was in flight (the run was
        # cancelled, or it moved on to a new attempt): a job started under it is nobody's,
        # and the core's own Cancel may have reached the provider first: stop it
        waiting = {it.key for it in items if self._waiting(it)}
        stray = [
            r.key
            for r in reports
            if r.key not in waiting and r.state not in TERMINAL_PROVIDER_STATES
        ]
        if stray:
            self.clock.spawn(self._cancel(provider, stray, 1))
        await self._deliver(provider, reports)

    def _retry_submit(self, batch: _Attempts) -> None:
        self.clock.spawn(self._send(*batch))

    async def _reconcile(self, provider: str, keys: Sequence[str], tries: int) -> None:
        if tries > 1:
            keys = [k for k in keys if self._live(k)]
            if not keys:
                return
        try:
            reports = await self.providers[provider].describe(keys)
        except ProviderError as e:
            self.counters.describe_retries += 1
            arg = (provider, list(keys), tries + 1)
            self._again(self._retry_reconcile, arg, tries, "describe:" + keys[0], e.retry_after)
            return
        out = self.outstanding[provider]
        watch = False
        for r in reports:
            if r.state in TERMINAL_PROVIDER_STATES or r.state is ProviderState.UNKNOWN:
                continue
            run_id = self.core.run_of_key(r.key)
            if run_id is not None and r.key not in out:
                out[r.key] = run_id  # found again (after a restart): watch it from now on
                watch = True
        if watch:
            self.observe()
        await self._deliver(provider, reports)

    def _retry_reconcile(self, arg: tuple[str, list[str], int]) -> None:
        self.clock.spawn(self._reconcile(*arg))

    async def _cancel(self, provider: str, keys: Sequence[str], tries: int) -> None:
        try:
            await self.providers[provider].cancel(keys)
        except ProviderError as e:
            if not e.retryable:
                raise
            self.counters.cancel_retries += 1
            arg = (provider, list(keys), tries + 1)
            self._again(self._retry_cancel, arg, tries, "cancel:" + keys[0], e.retry_after)

    def _retry_cancel(self, arg: tuple[str, list[str], int]) -> None:
        self.clock.spawn(self._cancel(*arg))

    async def _elastic(self, cmd: Provision | Terminate, tries: int) -> None:
        """Carry out a Provision or Terminate (module doc: *Elastic capacity*)."""
        if tries > 1 and not self.core.counts_order(cmd.token):
            return  # settled or refused meanwhile: nothing to try again
        prov = self.providers[cmd.provider]
        provision = isinstance(cmd, Provision)
        verb = "provision" if provision else "terminate"
        caps = prov.capabilities
        if Capability.ELASTIC not in caps:
            self.counters.elastic_refusals += 1
            self.feed(
                ElasticRefused(
                    provider=cmd.provider,
                    pool=cmd.pool,
                    token=cmd.token,
                    reason=f"cannot {verb} instances: {caps.reason(Capability.ELASTIC)}",
                )
            )
            return
        instances: list[str] = []
        try:
            if provision:
                self.counters.provisions += 1
                instances = await prov.provision(cmd.pool, cmd.count, cmd.token)
            else:
                self.counters.terminates += 1
                await prov.terminate(cmd.pool, cmd.count, cmd.token)
        except ProviderError as e:
            if e.retryable:  # the answer may be lost: the SAME token again, later
                self.counters.elastic_retries += 1
                arg = (cmd, tries + 1)
                self._again(self._retry_elastic, arg, tries, f"{verb}:{cmd.token}", e.retry_after)
                return
            self.counters.elastic_refusals += 1
            self.feed(
                ElasticRefused(provider=cmd.provider, pool=cmd.pool, token=cmd.token, reason=str(e))
            )
            return
        self._answered.setdefault(cmd.provider, set()).add(cmd.token)
        if provision:
            self.feed(
                Provisioned(
                    provider=cmd.provider, pool=cmd.pool, token=cmd.token, instances=instances
                )
            )
        self.capacity_changed(cmd.provider)  # the discovery that settles the token

    def _retry_elastic(self, arg: tuple[Provision | Terminate, int]) -> None:
        self.clock.spawn(self._elastic(*arg))

    def _again(
        self,
        fn: Callable[[T], None],
        arg: T,
        tries: int,
        key: str,
        retry_after: float | None = None,
    ) -> None:
        """Call ``fn(arg)`` again after the backoff for try ``tries`` of ``key``, and no sooner
        than the provider asked (``ProviderError.retry_after``)."""
        delay = self.config.provider_backoff.seconds(tries, seed=self.config.seed, key=key)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if not self.halted:
            self.clock.call_at(self.clock.now() + delay, fn, arg, Wake.RETRY)

    def _waiting(self, item: SubmitItem) -> bool:
        """True while the core still waits on this very attempt (its run leased under it)."""
        core = self.core
        return core.key(item.run_id) == item.key and core.state(item.run_id) in LEASED

    def _live(self, key: str) -> bool:
        run_id = self.core.run_of_key(key)
        return (
            run_id is not None
            and self.core.key(run_id) == key
            and self.core.state(run_id) in LEASED
        )

    async def _deliver(self, provider: str, reports: list[Report]) -> None:
        if not reports:
            return
        out = self.outstanding[provider]
        for r in reports:
            if r.state in TERMINAL_PROVIDER_STATES:
                out.pop(r.key, None)
            elif r.node and self.health is not None:
                run_id = self.core.run_of_key(r.key)
                if run_id is not None and self.core.service(run_id) is not None:
                    self._nodes[r.key] = r.node
        self.counters.reports += len(reports)
        recorded = self.records.reported(provider, reports)
        if recorded is not None:
            reports = await recorded
        self.feed(ProviderReported(provider=provider, reports=reports))

    # ---- service health ------------------------------------------------------------------------

    def _watch_services(self, cmd: Transitioned, now: float) -> None:
        """Start probing service attempts that began RUNNING (``stowplan.shell.health``); stop
        for those that left it (their next probe finds them gone)."""
        if self.health is None:
            return
        core = self.core
        for r in cmd.records:
            if r.to_state is TaskState.RUNNING and r.from_state is not TaskState.RUNNING:
                service = core.service(r.run_id)
                if service is None or service.health is None:
                    continue
                key = core.key(r.run_id)
                count = HealthCount(check=service.health, since=now)
                self._health[key] = count
                self.clock.call_at(
                    count.next_probe(now), self._probe_due, (key, count), Wake.OBSERVE
                )
            elif r.from_state is TaskState.RUNNING and self._health:
                # the attempt ended (or was lost): stop probing it
                for k in [k for k in self._health if not self._running(k)]:
                    self._health.pop(k, None)
                    self._nodes.pop(k, None)

    def _running(self, key: str) -> bool:
        run_id = self.core.run_of_key(key)
        return (
            run_id is not None
            and self.core.key(run_id) == key
            and self.core.state(run_id) is TaskState.RUNNING
        )

    def _probe_due(self, due: tuple[str, HealthCount]) -> None:
        key, count = due
        if self.halted or self._health.get(key) is not count:
            return  # the attempt was lost and found again: its new count probes
        if not self._running(key):
            self._health.pop(key, None)
            self._nodes.pop(key, None)
            return
        self.clock.spawn(self._probe(key, count))

    async def _probe(self, key: str, count: HealthCount) -> None:
        health, run_id = self.health, self.core.run_of_key(key)
        service = self.core.service(run_id) if run_id is not None else None
        if health is None or run_id is None or service is None:
            return
        host = endpoint_host(self._nodes.get(key)) or LOOPBACK
        try:
            why = await health.probe(count.check, host, service.port)
        except Exception as e:  # a probe's own bug must not end the control plane
            why = f"the probe failed: {type(e).__name__}: {e}"
        now = self.clock.now()
        if self._health.get(key) is not count or not self._running(key):
            return  # the attempt ended while it was probed
        if count.record(why, now):
            del self._health[key]
            self._nodes.pop(key, None)
            self.feed(ServiceUnhealthy(run_id=run_id, key=key, reason=count.reason()))
        else:
            self.clock.call_at(count.next_probe(now), self._probe_due, (key, count), Wake.OBSERVE)

    # ---- observation and rediscovery ---------------------------------------------------------

    def _flush_inbox(self, provider: str) -> None:
        self.clock.spawn(self._deliver(provider, self._inbox.pop(provider, [])))

    def _heartbeat(self, _: object) -> None:
        every = self.config.observe_every
        if self.halted or every is None:
            self._observing = False
            return
        self.counters.heartbeats += 1
        for name in sorted(self.providers):
            self._observe_one(name)
        if any(self.outstanding.values()) or (self._busy is not None and self._busy()):
            self.clock.call_at(self.clock.now() + every, self._heartbeat, None, Wake.OBSERVE)
        else:
            self._observing = False

    def _observe_one(self, provider: str) -> None:
        out = self.outstanding[provider]
        for k in [k for k in out if not self._live(k)]:
            del out[k]
        if out:
            self.clock.spawn(self._observe_keys(provider, list(out)))

    async def _observe_keys(self, provider: str, keys: list[str]) -> None:
        try:
            reports = await self.providers[provider].describe(keys)
        except ProviderError:
            # counted here and by the driver; the next beat asks again, the lease decides
            self.counters.observe_failures += 1
            return
        await self._deliver(provider, reports)

    def _rediscover_due(self, provider: str) -> None:
        self._discover_due.discard(provider)
        self.clock.spawn(self._rediscover(provider, pushed=True))

    def _rediscover_all(self, _: object) -> None:
        every = self.config.rediscover_every
        if self.halted or every is None:
            return
        for name in sorted(self.providers):
            self.clock.spawn(self._rediscover(name, pushed=False))
        self.clock.call_at(self.clock.now() + every, self._rediscover_all, None, Wake.DISCOVER)

    async def _rediscover(self, provider: str, *, pushed: bool) -> None:
        settled = self._answered.pop(provider, set())  # answered before this discovery began
        try:
            pools = await self.providers[provider].discover()
        except ProviderError:
            self.counters.discover_failures += 1  # the next push or period tries again
            self._answered.setdefault(provider, set()).update(settled)
            return
        if not pushed and not settled and self._pools.get(provider) == pools:
            return  # nothing changed: a PoolsDiscovered would only make the core solve again
        self._pools[provider] = pools
        self._facts.pop(provider, None)
        self.feed(PoolsDiscovered(provider=provider, pools=pools, settled=sorted(settled)))
