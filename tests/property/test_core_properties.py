"""Properties of the scheduler core under random event sequences.

A driver plays shell and provider at once: it submits small random DAGs, answers every
``SolvePlacement`` with ``stowplan.placement.solve`` (at once, or a few events later), reports
random provider states for the attempts that are out (and repeats old news, or news for old
attempts), lets time pass, cancels runs, shrinks and restores pools (a node lost, a partition
drained: also while a solve is in flight), and restarts the control plane from what a store
would hold. After every event it checks the invariants the core promises; at the end it stops
injecting failures and checks that everything finishes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stowplan.placement import solve
from stowplan.placement.problem import PlacementProblem, Pool
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    CancelRequested,
    Command,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    RestoredTask,
    SolvePlacement,
    Submit,
    TaskInstance,
    TasksRestored,
    TasksSubmitted,
    Tick,
    Transitioned,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.states import ACTIVE, FINAL, LEASED, TaskState
from stowplan.spec.models import INFRASTRUCTURE_FAILURES, FailureClass, RetryPolicy

GiB = 1 << 30
REPORTED_FAILURES = [
    None,
    *(f for f in FailureClass if f not in (FailureClass.DEPENDENCY_FAILED, FailureClass.CANCELLED)),
]
ACTIONS = [
    "submit",
    "report",
    "report",
    "report",
    "repeat",
    "stale",
    "tick",
    "tick",
    "cancel",
    "place",
    "shrink",
    "restart",
]


@dataclass
class Driver:
    data: Any
    core: SchedulerCore
    pools: list[Pool]
    now: float = 0.0
    tasks: dict[str, TaskInstance] = field(default_factory=dict)
    provider_of: dict[str, str] = field(default_factory=dict)
    """idempotency key -> provider it was submitted to"""
    pool_of: dict[str, str] = field(default_factory=dict)
    """idempotency key -> pool it was submitted to"""
    submitted_keys: set[str] = field(default_factory=set)
    mirror: dict[str, TaskState] = field(default_factory=dict)
    """each run's state as replayed from the Transitioned records alone"""
    known_pools: list[Pool] = field(default_factory=list)
    current: dict[str, Pool] = field(default_factory=dict)
    """each pool as last discovered: smaller than in ``pools`` while shrunk"""
    history: list[tuple[SchedulerCore, Event, float, list[Command]]] = field(default_factory=list)
    pending: PlacementProblem | None = None
    last_report: ProviderReported | None = None
    restoring: bool = False
    batches: int = 0
    actions: list[str] = field(default_factory=lambda: ACTIONS)

    # ---- feeding the core ---------------------------------------------------------------

    def send(self, event: Event, *, place_now: bool | None = None) -> None:
        before = self.free()
        out = self.core.handle(event, self.now)
        self.history.append((self.core, event, self.now, out))
        self.observe(out)
        self.check_invariants()
        if not isinstance(event, PoolsDiscovered | TasksRestored):
            self.check_no_overcommit(before)
        for cmd in out:
            if isinstance(cmd, SolvePlacement):
                assert self.pending is None, "a second solve while one is in flight"
                if place_now is None:
                    place_now = self.data.draw(st.booleans(), label="place now")
                self.pending = cmd.problem
                if place_now:
                    self.deliver(place_now=True)

    def deliver(self, *, place_now: bool | None = None) -> None:
        problem, self.pending = self.pending, None
        if problem is not None:
            self.send(PlacementDecided(solution=solve(problem)), place_now=place_now)

    def observe(self, out: list[Command]) -> None:
        for cmd in out:
            if isinstance(cmd, Submit):
                for item in cmd.items:
                    if not cmd.resubmit:
                        # (1) every attempt's key is submitted once
                        assert item.key not in self.submitted_keys, f"key reused: {item}"
                        self.submitted_keys.add(item.key)
                    self.provider_of[item.key] = cmd.provider
                    self.pool_of[item.key] = cmd.pool
                    assert self.core.key(item.run_id) == item.key
                    assert self.core.attempt(item.run_id) == item.attempt
            elif isinstance(cmd, Transitioned):
                for rec in cmd.records:
                    assert self.mirror[rec.run_id] is rec.from_state, rec
                    assert rec.from_state not in FINAL, rec
                    self.mirror[rec.run_id] = rec.to_state

    def free(self) -> dict[str, tuple[float, int, dict[str, int]]]:
        if self.restoring:
            return {}
        return {p.id: self.core.free_capacity(p.id) for p in self.known_pools}

    def check_no_overcommit(self, before: dict[str, tuple[float, int, dict[str, int]]]) -> None:
        """(5) a lease is taken only where it fits now: no event but a discovery (the pool
        shrank) or a restore (leases the store knew of) takes free capacity below zero, or
        further below where a shrink had left it."""
        for pid, (cpus0, memory0, gpus0) in before.items():
            cpus, memory, gpus = self.core.free_capacity(pid)
            assert cpus >= min(0.0, cpus0) - 1e-9, (pid, cpus0, cpus)
            assert memory >= min(0, memory0), (pid, memory0, memory)
            for m, n in gpus.items():
                assert n >= min(0, gpus0.get(m, 0)), (pid, m, gpus0, gpus)

    def check_invariants(self) -> None:
        if self.restoring:
            return  # the new core does not know the runs yet
        core = self.core
        for run_id, t in self.tasks.items():
            # (3) attempts never exceed the retry policy
            assert core.attempt(run_id) - core.uncounted_attempts(run_id) <= t.retry.max_attempts, (
                run_id
            )
            assert core.state(run_id) is self.mirror[run_id], run_id
        # (4) no pool is leased beyond its capacity, by the core's books...
        for p in self.known_pools:
            if self.current[p.id] != p:
                continue  # shrunk below what it had leased: (5) checks it instead
            cpus, memory, gpus = core.free_capacity(p.id)
            assert cpus >= -1e-9, (p.id, cpus)
            assert memory >= 0, (p.id, memory)
            assert all(n >= 0 for n in gpus.values()), (p.id, gpus)
        # ...and by the driver's own count of what holds a lease where
        held: dict[str, list[float]] = {p.id: [0.0, 0.0, 0.0] for p in self.pools}
        for run_id in self.outstanding():
            t = self.tasks[run_id]
            used = held[self.pool_of[core.key(run_id)]]
            used[0] += t.cpus
            used[1] += t.memory
            used[2] += t.gpus
        for p in self.pools:
            used_cpus, used_memory, used_gpus = held[p.id]
            assert used_cpus <= p.cpus + 1e-9, (p.id, held[p.id])
            assert used_memory <= p.memory, (p.id, held[p.id])
            assert used_gpus <= sum(p.gpus.values()), (p.id, held[p.id])
        # a sweep's max_concurrent holds, across restarts too
        in_flight = Counter(
            t.group for r, t in self.tasks.items() if t.max_concurrent and core.state(r) in ACTIVE
        )
        for t in self.tasks.values():
            if t.max_concurrent:
                assert in_flight[t.group] <= t.max_concurrent, (t.group, in_flight)
        states = Counter(core.state(r) for r in self.tasks)
        assert +core.counts == states
        assert sum(core.counts.values()) == len(self.tasks)

    # ---- the provider and the user --------------------------------------------------------

    def outstanding(self) -> list[str]:
        """Runs whose current attempt is out at a provider (as the provider would see them)."""
        return [r for r in self.tasks if self.core.state(r) in LEASED]

    def report(self, run_id: str, state: ProviderState, failure: FailureClass | None) -> None:
        key = self.core.key(run_id)
        self.report_key(key, state, failure)

    def report_key(self, key: str, state: ProviderState, failure: FailureClass | None) -> None:
        rep = Report(
            key=key, state=state, failure=failure if state is ProviderState.FAILED else None
        )
        self.last_report = ProviderReported(provider=self.provider_of[key], reports=[rep])
        self.send(self.last_report)

    def submit_batch(self) -> None:
        draw = self.data.draw
        self.batches += 1
        group = f"g{self.batches}"
        max_concurrent = draw(st.sampled_from([None, None, 1, 2]), label="max_concurrent")
        new: list[TaskInstance] = []
        for _ in range(draw(st.integers(1, 4), label="batch size")):
            run_id = f"r{len(self.tasks) + len(new)}"
            earlier = sorted(self.tasks) + [t.run_id for t in new]
            deps = (
                draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True), label="deps")
                if earlier
                else []
            )
            on = draw(
                st.just(list(INFRASTRUCTURE_FAILURES))
                | st.lists(
                    st.sampled_from([*INFRASTRUCTURE_FAILURES, FailureClass.USER_ERROR]),
                    unique=True,
                ),
                label="retry on",
            )
            gpus = draw(st.sampled_from([0, 0, 0, 1]), label="gpus")
            new.append(
                TaskInstance(
                    run_id=run_id,
                    project=draw(st.sampled_from(["p", "q"]), label="project"),
                    group=group,
                    depends_on=tuple(deps),
                    cpus=draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 16.0]), label="cpus"),
                    memory=draw(st.sampled_from([GiB, 2 * GiB, 6 * GiB]), label="memory"),
                    gpus=gpus,
                    gpu_types=draw(st.sampled_from([(), ("A100",), ("H100",)])) if gpus else (),
                    priority=draw(st.integers(0, 2), label="priority"),
                    retry=RetryPolicy(
                        max_attempts=draw(st.integers(1, 3), label="max_attempts"),
                        on=on,
                        backoff=draw(st.sampled_from([0.0, 1.0, 5.0]), label="backoff"),
                        backoff_cap=30.0,
                        jitter=draw(st.sampled_from([0.0, 0.5]), label="jitter"),
                    ),
                    max_concurrent=max_concurrent,
                )
            )
        for t in new:
            self.tasks[t.run_id] = t
            self.mirror[t.run_id] = TaskState.PENDING
        self.send(TasksSubmitted(tasks=new))

    def step(self) -> None:
        draw = self.data.draw
        action = draw(st.sampled_from(self.actions), label="action")
        if action == "submit" or not self.tasks:
            self.submit_batch()
        elif action == "report":
            out = self.outstanding()
            if out:
                run_id = draw(st.sampled_from(out), label="report run")
                state = draw(st.sampled_from(list(ProviderState)), label="state")
                failure = draw(
                    st.sampled_from(INFRASTRUCTURE_FAILURES) | st.sampled_from(REPORTED_FAILURES),
                    label="failure",
                )
                self.report(run_id, state, failure)
                if draw(st.booleans(), label="deliver twice"):
                    assert self.last_report is not None
                    self.send(self.last_report)
        elif action == "repeat":
            # pollers and reconciliation deliver the same news twice
            if self.last_report is not None:
                self.send(self.last_report)
        elif action == "stale":
            if self.submitted_keys:
                key = draw(st.sampled_from(sorted(self.submitted_keys)), label="stale key")
                state = draw(st.sampled_from(list(ProviderState)), label="state")
                self.report_key(key, state, draw(st.sampled_from(REPORTED_FAILURES)))
        elif action == "tick":
            self.now += draw(st.sampled_from([0.0, 1.0, 10.0, 40.0, 120.0]), label="dt")
            self.send(Tick())
        elif action == "cancel":
            victims = draw(
                st.lists(st.sampled_from(sorted(self.tasks)), max_size=2, unique=True),
                label="cancel",
            )
            self.send(CancelRequested(run_ids=victims))
        elif action == "restart":
            self.restart()
        elif action == "shrink":
            self.shrink()
        else:
            self.deliver()

    def restart(self) -> None:
        """The control plane crashes and comes back: a fresh core reloads every run, as the
        store has it, after the providers' pools are discovered again."""
        core = self.core
        restored: list[RestoredTask] = []
        for run_id, t in self.tasks.items():
            state = core.state(run_id)
            key = core.key(run_id)
            leased = state in LEASED
            restored.append(
                RestoredTask(
                    task=t,
                    state=state,
                    attempt=core.attempt(run_id),
                    uncounted=core.uncounted_attempts(run_id),  # the store's no-capacity ones
                    provider=self.provider_of[key] if leased else None,
                    pool=self.pool_of[key] if leased else None,
                )
            )
            if state not in LEASED and state not in FINAL:
                self.mirror[run_id] = TaskState.PENDING  # restored runs start over, silently
        self.core = SchedulerCore(core.config)
        self.pending = None  # the old core's solve is answered to nobody
        self.last_report = None
        self.known_pools = []
        self.restoring = True
        self.discover()
        self.restoring = False
        self.send(TasksRestored(tasks=restored))

    def discover(self) -> None:
        by_provider: dict[str, list[Pool]] = {}
        for p in self.pools:
            by_provider.setdefault(p.provider, []).append(p)
        for provider, ps in sorted(by_provider.items()):
            self.send(PoolsDiscovered(provider=provider, pools=ps))
            self.known_pools.extend(ps)
            self.current.update((p.id, p) for p in ps)

    def shrink(self) -> None:
        """One provider's pools are discovered again, each at a random share of its size (all
        of it: the shrink is over)."""
        draw = self.data.draw
        provider = draw(st.sampled_from(sorted({p.provider for p in self.pools})), label="shrink")
        ps = []
        for p in self.pools:
            if p.provider != provider:
                continue
            share = draw(st.sampled_from([0.0, 0.5, 1.0]), label="share")
            ps.append(
                msgspec.structs.replace(
                    p,
                    cpus=p.cpus * share,
                    memory=int(p.memory * share),
                    gpus={m: int(n * share) for m, n in p.gpus.items()},
                )
            )
        self.current.update((p.id, p) for p in ps)
        self.send(PoolsDiscovered(provider=provider, pools=ps))

    def drain(self) -> None:
        """No more failures: place everything, report success for all that is out, let time
        pass; every run must end."""
        if any(self.current[p.id] != p for p in self.pools):
            self.known_pools = []
            self.discover()  # every pool back to its full size
        for _ in range(200):
            if self.core.unfinished() == 0 and self.pending is None:
                return
            self.deliver(place_now=True)
            for run_id in self.outstanding():
                if self.core.state(run_id) in LEASED:
                    self.report(run_id, ProviderState.SUCCEEDED, None)
                    self.deliver(place_now=True)
            self.now += 100.0
            self.send(Tick(), place_now=True)
        raise AssertionError(
            "runs never finished: "
            + repr({r: self.core.state(r) for r in self.tasks if self.core.state(r) not in FINAL})
        )


pool_sets = st.sampled_from(
    [
        [Pool(id="local/cpu", provider="local", cpus=2, memory=8 * GiB)],
        [
            Pool(id="local/cpu", provider="local", cpus=1, memory=4 * GiB),
            Pool(
                id="cloud/gpu",
                provider="cloud",
                cpus=4,
                memory=16 * GiB,
                gpus={"A100": 2},
                price_per_hour=3.0,
            ),
        ],
        [
            Pool(id="a/x", provider="a", cpus=3, memory=8 * GiB),
            Pool(id="b/y", provider="b", cpus=2.5, memory=6 * GiB, gpus={"A100": 1, "H100": 1}),
        ],
    ]
)


def make_driver(data: Any, actions: list[str] = ACTIONS) -> Driver:
    pools = data.draw(pool_sets, label="pools")
    core = SchedulerCore(
        CoreConfig(
            lease_ttl=data.draw(st.sampled_from([15.0, 60.0, 900.0]), label="lease_ttl"),
            fair_share_half_life=100.0,
            seed=data.draw(st.integers(0, 3), label="seed"),
        )
    )
    driver = Driver(data=data, core=core, pools=pools, actions=actions)
    driver.discover()
    return driver


PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(st.data())
def test_invariants_hold_and_everything_finishes(data: Any) -> None:
    driver = make_driver(data)
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        driver.step()
    driver.drain()
    core = driver.core
    # (2) every run ends in exactly one terminal state, and the counts say so
    assert all(core.state(r) in FINAL for r in driver.tasks)
    assert sum(core.counts[s] for s in FINAL) == len(driver.tasks)
    assert core.unfinished() == 0
    # and every lease is given back
    for p in driver.pools:
        cpus, memory, gpus = core.free_capacity(p.id)
        assert (cpus, memory, gpus) == (p.cpus, p.memory, p.gpus)


@PROPERTY_SETTINGS
@given(st.data())
def test_the_same_events_give_the_same_commands(data: Any) -> None:
    """Determinism: replaying the recorded event sequence into a fresh core gives equal output."""
    driver = make_driver(data)
    for _ in range(data.draw(st.integers(1, 15), label="steps")):
        driver.step()
    replays: dict[int, SchedulerCore] = {}
    for core, event, now, out in driver.history:
        replay = replays.setdefault(id(core), SchedulerCore(core.config))
        assert replay.handle(event, now) == out


@PROPERTY_SETTINGS
@given(st.data())
def test_no_pool_is_over_committed_when_pools_shrink_while_solving(data: Any) -> None:
    """Answers computed for capacity that shrank before they arrived never over-commit a pool
    (the Driver checks (5) after every event), and the runs still all finish."""
    actions = ["submit", "shrink", "shrink", "place", "place", "report", "tick"]
    driver = make_driver(data, actions)
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        driver.step()
    driver.drain()
    assert all(driver.core.state(r) in FINAL for r in driver.tasks)
