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

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from stowplan.actors.control import QUEUE, ControlPlane
from stowplan.actors.provider import ProviderActor
from stowplan.actors.queue import SUBMIT_CHUNK, SubmitRun, launch_spec
from stowplan.actors.session import prepare, record, submissions
from stowplan.errors import ProviderError
from stowplan.placement import solve
from stowplan.placement.problem import PlacementContext, PlacementProblem, PlacementSolution
from stowplan.provenance.store import RunStore
from stowplan.providers.base import (
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
)
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

    def __init__(self, runs: dict[str, SubmitRun]) -> None:
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
            launch_spec(self.runs[it.run_id].payload, it.run_id, it.attempt, it.key, pool)
            for it in items
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


def _simulate(runs: dict[str, SubmitRun], first: list[str], later: list[str], cancel: str) -> Any:
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
        shell.feed(TasksSubmitted(tasks=[runs[r].payload.instance for r in ids]))

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
    role = {_index(s.payload.name): s.run_id for s in items.values()}
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
