"""One command shell: a scripted scenario gives the same run transitions in simulation and in
real time.

The scenario, for four runs of one sweep: arrivals (runs 0, 2 and 3 first, run 1 later), a
lost submit answer (run 1's job starts but the provider's answer is lost: the shell submits
the SAME key again and finds it), a node failure (run 2's first attempt; the core retries it
under a new key) and a cancel (run 3 runs until it is cancelled). The provider is the instant
one, with the faults injected by a test-only subclass (``Scripted``), so both sides see the
same provider: in virtual time it sits directly behind the shell on the simulator's clock
(the discrete-event engine, stepped by ``run_now``); in real time it sits in a provider
actor, behind the queue actor, with the store, the placement actor and Ray in between.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from stowplan.actors.control import QUEUE, ControlPlane, provider_actor_name
from stowplan.actors.provider import ProviderActor
from stowplan.actors.queue import SUBMIT_CHUNK, session_epoch
from stowplan.actors.runtime import owner_identity
from stowplan.errors import ProviderError
from stowplan.placement import solve
from stowplan.placement.problem import (
    PlacementContext,
    PlacementProblem,
    PlacementSolution,
    Pool,
    Shape,
)
from stowplan.provenance.store import RunStore
from stowplan.providers.base import (
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    ProviderRequest,
    ProviderState,
    Report,
    request_name,
)
from stowplan.providers.instant import InstantProvider, InstantRequest
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    CancelRequested,
    SubmitItem,
    TasksSubmitted,
    Transition,
    elastic_token,
)
from stowplan.scheduler.plan import RunPayload
from stowplan.session import launch_spec, prepare, record, submissions
from stowplan.shell import CommandShell, ShellConfig, run_now
from stowplan.simulator.engine import PRIO_ARRIVAL, Engine
from stowplan.simulator.shell import _EngineClock
from stowplan.spec.models import FailureClass, InstantProviderConfig

from .conftest import wait_for

pytestmark = pytest.mark.integration

PLAIN, LOST_ANSWER, NODE_FAILURE, CANCELLED = 0, 1, 2, 3
"""what happens to the run of each sweep index"""

Steps = list[tuple[str, str, str | None]]
"""(from state, to state, failure) of each transition of one run, in order"""


def _index(name: str) -> int:
    return int(name.split("#")[0].rsplit("-", 1)[1])


class Scripted(InstantProvider):
    """The instant provider, with the scenario's faults, decided by sweep index."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers_lost = 0

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        # NOTE: a Struct defined here would lose its fields when Ray pickles this module by
        # value, so the attempt travels in the task's name
        return [
            InstantRequest(
                keys=(la.key,), name=request_name([la.key]), task=f"{la.name}#{la.attempt}"
            )
            for la in launches
        ]

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        out = []
        lose = False
        for req in requests:
            assert isinstance(req, InstantRequest)
            attempt = int(req.task.split("#")[1])
            report = self._reports.get(req.key)
            if report is None:
                i = _index(req.task)
                if i == CANCELLED:
                    report = Report(key=req.key, state=ProviderState.RUNNING, job_id=req.key)
                elif i == NODE_FAILURE and attempt == 1:
                    report = Report(
                        key=req.key,
                        state=ProviderState.FAILED,
                        job_id=req.key,
                        failure=FailureClass.NODE_FAILURE,
                        message="node lost",
                    )
                else:
                    report = Report(
                        key=req.key, state=ProviderState.SUCCEEDED, job_id=req.key, exit_code=0
                    )
                    lose = lose or i == LOST_ANSWER
                self._reports[req.key] = report
            out.append(report)
        if lose:  # the jobs were started; only the answer is lost on its way back
            self.answers_lost += 1
            raise ProviderError("connection reset", provider=self.name, retryable=True)
        return out

    async def cancel(self, keys: Sequence[str]) -> None:
        for k in keys:
            if k in self._reports:
                self._reports[k] = Report(key=k, state=ProviderState.CANCELLED, job_id=k)


class ScriptedActor(ProviderActor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.driver = Scripted(self.name, InstantProviderConfig())


@pytest.fixture(autouse=True)
def _by_value() -> None:
    """Ray workers unpickle these classes without importing this test module."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]


def _project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "one"\n[providers.instant]\nkind = "instant"\n'
    )
    f = tmp_path / "one.toml"
    f.write_text(
        '[experiment]\nname = "one"\n[[tasks]]\nname = "t"\ncommand = ["true", "{i}"]\n'
        'resources = { cpus = 1, memory = "1MiB" }\n'
        "sweep = { parameters = { i = [0, 1, 2, 3] } }\n"
    )
    return f


# ---- virtual time -------------------------------------------------------------------------


class _Records:
    """Run records kept in memory, launches made as the queue actor makes them."""

    def __init__(self, runs: dict[str, RunPayload]) -> None:
        self.runs = runs
        self.steps: dict[str, Steps] = {}

    def transitions(self, records: list[Transition], at: float) -> None:
        for t in records:
            self.steps.setdefault(t.run_id, []).append(_step(t.from_state, t.to_state, t.failure))

    def decided(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        pass

    async def launches(
        self, provider: str, pool: str, items: Sequence[SubmitItem]
    ) -> list[LaunchSpec]:
        return [
            launch_spec(self.runs[it.run_id], it.run_id, it.attempt, it.key, pool) for it in items
        ]

    async def intend(self, provider: str, pool: str, items: Sequence[SubmitItem]) -> None:
        pass

    def reported(self, provider: str, reports: list[Report]) -> None:
        pass


class _Placement:
    async def solve(self, problem: PlacementProblem) -> PlacementSolution:
        return solve(problem, seed=0)


def _step(from_state: Any, to_state: Any, failure: Any) -> tuple[str, str, str | None]:
    def text(x: Any) -> str:
        return str(getattr(x, "value", x))

    return (text(from_state), text(to_state), None if failure is None else text(failure))


def _simulate(runs: dict[str, RunPayload], first: list[str], later: list[str], cancel: str) -> Any:
    engine = Engine(seed=0)
    records = _Records(runs)
    provider = Scripted("instant", InstantProviderConfig())
    shell = CommandShell(
        SchedulerCore(CoreConfig(lease_ttl=900.0, seed=0, context=PlacementContext())),
        clock=_EngineClock(engine),
        solver=_Placement(),
        providers={"instant": provider},
        records=records,
        config=ShellConfig(
            seed=0, observe_every=None, rediscover_every=300.0, submit_chunk=SUBMIT_CHUNK
        ),
    )

    def arrive(ids: list[str]) -> None:
        shell.feed(TasksSubmitted(tasks=[runs[r].instance for r in ids]))

    run_now(shell.discover())
    shell.start()
    engine.at(0.0, arrive, first, PRIO_ARRIVAL)
    engine.at(100.0, arrive, later, PRIO_ARRIVAL)
    engine.at(200.0, lambda _: shell.feed(CancelRequested(run_ids=[cancel], reason="test")), None)
    engine.run(250.0)
    return records.steps, provider.answers_lost, shell.counters.submit_retries


# ---- the scenario, both ways --------------------------------------------------------------


def test_the_simulator_and_the_actors_make_the_same_transitions(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    import stowplan.actors.provider

    monkeypatch.setattr(stowplan.actors.provider, "ProviderActor", ScriptedActor)
    prepared = prepare(_project(tmp_path))
    with RunStore(prepared.store_path) as store:
        recorded = record(prepared, store)
    ids = [r.run_id for r in recorded]
    items = {s.run_id: s for s in submissions(prepared, set(ids))}
    role = {_index(s.name): s.run_id for s in items.values()}
    assert sorted(role) == [PLAIN, LOST_ANSWER, NODE_FAILURE, CANCELLED]
    first = [role[PLAIN], role[NODE_FAILURE], role[CANCELLED]]
    later = [role[LOST_ANSWER]]

    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        poll_max=0.5,
    )
    plane.start()
    try:

        def states() -> dict[str, str]:
            with RunStore(prepared.store_path) as store:
                return {r.run_id: r.state for r in store.get_runs(ids).values()}

        def settled(want: dict[str, str]) -> bool:
            info = plane.progress(ids)
            assert info["fatal"] is None, info
            ray.get(plane.actors[QUEUE].drain.remote())  # the store has every transition
            now = states()
            return all(now.get(r) == s for r, s in want.items())

        def wait(want: dict[str, str], what: str) -> None:
            try:
                wait_for(lambda: settled(want), 60, what)
            except AssertionError as e:
                raise AssertionError(f"{e}: {states()} {plane.progress(ids)}") from None

        plane.submit([items[r] for r in first], [])
        want = {role[PLAIN]: "SUCCEEDED", role[NODE_FAILURE]: "SUCCEEDED"}
        want[role[CANCELLED]] = "RUNNING"
        wait(want, "the first arrivals to settle")
        plane.submit([items[r] for r in later], [])
        want[role[LOST_ANSWER]] = "SUCCEEDED"
        wait(want, "the lost answer to be found again")
        assert plane.cancel([role[CANCELLED]], "test") == 1
        want[role[CANCELLED]] = "CANCELLED"
        wait(want, "the cancel")
        info = plane.progress(ids)
        assert info["fatal"] is None, info
    finally:
        plane.stop()
    with RunStore(prepared.store_path) as store:
        real = {
            r: [_step(e.from_state, e.to_state, e.failure) for e in store.events_for(r)]
            for r in ids
        }
        attempts = {r.run_id: r.attempts for r in store.get_runs(ids).values()}

    simulated, lost, retries = _simulate(items, first, later, role[CANCELLED])
    assert lost == 1 and retries == 1
    assert simulated == real
    # the lost answer was found again under the same key; the node failure made a new attempt
    assert attempts == {
        role[PLAIN]: 1,
        role[LOST_ANSWER]: 1,
        role[NODE_FAILURE]: 2,
        role[CANCELLED]: 1,
    }
    assert ("RUNNING", "CANCELLED", "cancelled") in real[role[CANCELLED]]
    assert any(f == "node_failure" for _, _, f in real[role[NODE_FAILURE]])


# ---- the elastic path, both ways ------------------------------------------------------------


class Elastic(InstantProvider):
    """The instant provider behind one elastic pool: no capacity until ``provision`` starts
    instances (two CPUs each, at most four), which it pushes as a capacity change. Every call
    is written down, so both sides can be compared."""

    capabilities = Capabilities(
        has=InstantProvider.capabilities.has | {Capability.ELASTIC},
        why_not={
            c: r for c, r in InstantProvider.capabilities.why_not.items() if c != Capability.ELASTIC
        },
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str, int, str]] = []
        self.started: dict[str, list[str]] = {}
        self._changes: asyncio.Queue[str] | None = None

    async def discover(self) -> list[Pool]:
        n = sum(len(ids) for ids in self.started.values())
        return [
            Pool(
                id=self.name,
                provider=self.name,
                kind="cloud",
                cpus=2.0 * n,
                memory=n << 30,
                node=Shape(cpus=2.0, memory=1 << 30),
                max_instances=4 - n,
                boot_s=1.0,
            )
        ]

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        self.calls.append(("provision", pool, count, token))
        if token not in self.started:
            n = sum(len(ids) for ids in self.started.values())
            self.started[token] = [f"i-{n + i}" for i in range(count)]
            if self._changes is not None:
                self._changes.put_nowait("instances started")
        return self.started[token]

    async def capacity_changes(self) -> AsyncIterator[str]:
        self._changes = asyncio.Queue()
        while True:
            yield await self._changes.get()


class ElasticActor(ProviderActor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.driver = Elastic(self.name, InstantProviderConfig())

    async def elastic_calls(self) -> list[tuple[str, str, int, str]]:
        assert isinstance(self.driver, Elastic)
        return self.driver.calls


def test_the_elastic_path_is_the_same_in_simulation_and_in_real_time(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core's Provision, carried out by the one shell: through the provider actor's
    ``provision`` (and its pushed capacity change) in real time, straight to the driver in
    virtual time; the same token, the same instances, the same transitions."""
    import ray

    import stowplan.actors.provider

    monkeypatch.setattr(stowplan.actors.provider, "ProviderActor", ElasticActor)
    prepared = prepare(_project(tmp_path))
    with RunStore(prepared.store_path) as store:
        ids = [r.run_id for r in record(prepared, store)]
    items = {s.run_id: s for s in submissions(prepared, set(ids))}

    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        poll_max=0.5,
    )
    plane.start()
    try:

        def done() -> bool:
            info = plane.progress(ids)
            assert info["fatal"] is None, info
            ray.get(plane.actors[QUEUE].drain.remote())
            with RunStore(prepared.store_path) as store:
                return {r.state for r in store.get_runs(ids).values()} == {"SUCCEEDED"}

        plane.submit([items[r] for r in ids], [])
        wait_for(done, 60, "every run to succeed on the instances it launched")
        actor = plane.actors[provider_actor_name("instant")]
        real_calls = ray.get(actor.elastic_calls.remote())
    finally:
        plane.stop()
    with RunStore(prepared.store_path) as store:
        real = {
            r: [_step(e.from_state, e.to_state, e.failure) for e in store.events_for(r)]
            for r in ids
        }

    # the same session epoch as the control plane this process started
    epoch = session_epoch(owner_identity())
    engine = Engine(seed=0)
    records = _Records(items)
    provider = Elastic("instant", InstantProviderConfig())
    shell = CommandShell(
        SchedulerCore(
            CoreConfig(lease_ttl=900.0, seed=0, context=PlacementContext(), token_epoch=epoch)
        ),
        clock=_EngineClock(engine),
        solver=_Placement(),
        providers={"instant": provider},
        records=records,
        config=ShellConfig(seed=0, observe_every=None, rediscover_every=300.0),
    )
    run_now(shell.discover())
    shell.start()
    engine.at(0.0, lambda _: shell.feed(TasksSubmitted(tasks=[items[r].instance for r in ids])))
    engine.run(60.0)

    # four one-CPU runs: two two-CPU instances, under the core's first token for the pool
    token = elastic_token("provision", "instant", 1, epoch)
    assert [tuple(c) for c in real_calls] == provider.calls == [("provision", "instant", 2, token)]
    assert records.steps == real
    assert {s[-1][1] for s in real.values()} == {"SUCCEEDED"}
