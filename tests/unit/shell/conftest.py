"""In-memory ports for the command shell: a fake clock, a provider, a solver and records.

No Ray and no event loop: the ports answer at once, as in the simulator, and the clock runs
callbacks only when a test advances it."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from stowplan.errors import ProviderError
from stowplan.placement.greedy import solve_greedy
from stowplan.placement.problem import PlacementProblem, PlacementSolution, Pool, Shape
from stowplan.providers.base import (
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    ProviderRequest,
    ProviderState,
    Report,
    SingleRequest,
)
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import SubmitItem, TaskInstance, Transition
from stowplan.shell import CommandShell, ShellConfig, Wake, run_now

GIB = 1 << 30


class FakeClock:
    """Virtual time that moves only when a test says so."""

    def __init__(self) -> None:
        self.t = 0.0
        self.heap: list[tuple[float, int, Callable[[Any], None], Any, Wake]] = []
        self.seq = 0

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any, wake: Wake) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (max(when, self.t), self.seq, fn, arg, wake))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        run_now(work)

    def due(self, wake: Wake) -> list[float]:
        return sorted(w for w, _, _, _, k in self.heap if k is wake)

    def advance(self, until: float) -> None:
        while self.heap and self.heap[0][0] <= until:
            when, _, fn, arg, _ = heapq.heappop(self.heap)
            self.t = when
            fn(arg)
        self.t = until


class Req(SingleRequest, frozen=True, kw_only=True):
    run_id: str

    def render(self) -> str:
        return f"run {self.run_id} as {self.key}"


NODE = Shape(cpus=4.0, memory=16 * GIB, gpus={"a10g": 1})


class FakeProvider:
    """One pool; submit is idempotent by key. ``errors[verb]`` is a queue of errors the next
    calls raise before doing anything; ``lose`` answers that are lost AFTER the submit went
    through (the job exists, the caller hears an error).

    ``elastic``: a second pool, ``<name>-cloud``, of instances of shape ``NODE`` (at most
    ``max_instances``), which ``provision`` starts and ``terminate`` stops, idempotent by
    token; ``lose_provision`` answers are lost after the instances started. With
    ``elastic="pools"`` it reports the pool but lacks ``Capability.ELASTIC``."""

    def __init__(
        self, name: str, log: list[str], cpus: float = 8.0, elastic: bool | str = False
    ) -> None:
        self.elastic = bool(elastic)
        self.capabilities = (
            Capabilities(has=frozenset({Capability.ELASTIC}))
            if elastic is True
            else Capabilities(why_not={Capability.ELASTIC: "it has fixed nodes"})
        )
        self.max_instances = 4
        self.instances: list[str] = []
        self.started: dict[str, list[str]] = {}
        self.stopped: set[str] = set()
        self.serial = 0
        self.lose_provision = 0
        self.name = name
        self.log = log
        self.cpus = cpus
        self.jobs: dict[str, ProviderState] = {}
        self.created: Counter[str] = Counter()
        self.errors: dict[str, list[ProviderError]] = {}
        self.lose = 0
        self.calls: list[tuple[str, float, tuple[str, ...]]] = []
        self.clock: FakeClock | None = None

    def pools(self) -> list[Pool]:
        pools = [Pool(id=f"{self.name}-p", provider=self.name, cpus=self.cpus, memory=64 * GIB)]
        if self.elastic:
            n = len(self.instances)
            pools.append(
                Pool(
                    id=f"{self.name}-cloud",
                    provider=self.name,
                    kind="cloud",
                    cpus=n * NODE.cpus,
                    memory=n * NODE.memory,
                    gpus={"a10g": n},
                    node=NODE,
                    price_per_hour=1.0,
                    max_instances=self.max_instances - n,
                    boot_s=60.0,
                )
            )
        return pools

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        self._check("provision", (token,))
        if token not in self.started:
            k = min(count, self.max_instances - len(self.instances))
            if k <= 0:
                raise ProviderError("instance quota reached", provider=self.name, retryable=False)
            ids = [f"i-{self.serial + i}" for i in range(k)]
            self.serial += k
            self.instances.extend(ids)
            self.started[token] = ids
        if self.lose_provision:
            self.lose_provision -= 1
            raise ProviderError("connection reset", provider=self.name, retryable=True)
        return self.started[token]

    async def terminate(self, pool: str, count: int, token: str) -> None:
        self._check("terminate", (token,))
        if token not in self.stopped:  # the fake's instances are idle when asked
            self.stopped.add(token)
            del self.instances[len(self.instances) - min(count, len(self.instances)) :]

    def _check(self, verb: str, keys: Sequence[str]) -> None:
        self.calls.append((verb, self.clock.t if self.clock else 0.0, tuple(keys)))
        self.log.append(f"{verb} {','.join(keys)}")
        queue = self.errors.get(verb)
        if queue:
            raise queue.pop(0)

    async def discover(self) -> list[Pool]:
        self._check("discover", ())
        return self.pools()

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return [Req(keys=(la.key,), name=la.key, run_id=la.run_id) for la in launches]

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        reqs = [r for r in requests if isinstance(r, Req)]
        self._check("submit", [r.key for r in reqs])
        for r in reqs:
            if r.key not in self.jobs:
                self.jobs[r.key] = ProviderState.QUEUED
                self.created[r.key] += 1
        if self.lose:
            self.lose -= 1
            raise ProviderError("connection reset", provider=self.name, retryable=True)
        return [Report(key=r.key, state=self.jobs[r.key]) for r in reqs]

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        self._check("describe", keys)
        return [Report(key=k, state=self.jobs.get(k, ProviderState.UNKNOWN)) for k in keys]

    async def cancel(self, keys: Sequence[str]) -> None:
        self._check("cancel", keys)
        for k in keys:
            if self.jobs.get(k) in (ProviderState.QUEUED, ProviderState.RUNNING):
                self.jobs[k] = ProviderState.CANCELLED


class GreedySolver:
    def __init__(self) -> None:
        self.problems: list[PlacementProblem] = []

    async def solve(self, problem: PlacementProblem) -> PlacementSolution:
        self.problems.append(problem)
        return solve_greedy(problem)


class Records:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.transitions_seen: list[tuple[float, Transition]] = []
        self.reported_batches: list[tuple[str, list[Report]]] = []

    def transitions(self, records: list[Transition], at: float) -> None:
        self.transitions_seen.extend((at, r) for r in records)

    def decided(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        self.log.append(f"decided {problem.request_id}")

    async def launches(
        self, provider: str, pool: str, items: Sequence[SubmitItem]
    ) -> list[LaunchSpec]:
        return [
            LaunchSpec(key=i.key, run_id=i.run_id, attempt=i.attempt, pool=pool, name=i.run_id)
            for i in items
        ]

    async def intend(self, provider: str, pool: str, items: Sequence[SubmitItem]) -> None:
        self.log.append("intend " + ",".join(i.key for i in items))

    def reported(self, provider: str, reports: list[Report]) -> None:
        self.reported_batches.append((provider, reports))

    def states(self, run_id: str) -> list[str]:
        return [t.to_state.value for _, t in self.transitions_seen if t.run_id == run_id]


class Harness:
    def __init__(
        self,
        *,
        lease_ttl: float = 900.0,
        idle_grace: float = 120.0,
        elastic: bool | str = False,
        **config: Any,
    ) -> None:
        self.log: list[str] = []
        self.clock = FakeClock()
        self.core = SchedulerCore(CoreConfig(lease_ttl=lease_ttl, seed=7, idle_grace=idle_grace))
        self.prov = FakeProvider("p", self.log, elastic=elastic)
        self.prov.clock = self.clock
        self.solver = GreedySolver()
        self.records = Records(self.log)
        opts: dict[str, Any] = {"seed": 7, "observe_every": None, "rediscover_every": None}
        opts.update(config)
        self.shell = CommandShell(
            self.core,
            clock=self.clock,
            solver=self.solver,
            providers={"p": self.prov},
            records=self.records,
            config=ShellConfig(**opts),
        )

    def boot(self) -> None:
        run_now(self.shell.discover())
        self.shell.start()

    def task(self, run_id: str, **kw: Any) -> TaskInstance:
        return TaskInstance(run_id=run_id, cpus=1.0, memory=GIB, **kw)


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
