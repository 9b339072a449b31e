"""The core's elastic path: the instances a placement launches become Provision commands with
deterministic tokens, count as capacity until a discovery settles them, and idle instances are
terminated after a grace. Sans-IO: events in, commands out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from stowplan.placement.greedy import solve_greedy
from stowplan.placement.problem import Pool, Shape
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Command,
    ElasticRefused,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    Provision,
    Provisioned,
    SolvePlacement,
    Submit,
    TaskInstance,
    TasksSubmitted,
    Terminate,
    Tick,
    WakeAt,
    elastic_token,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.states import TaskState

GiB = 1 << 30
NODE = Shape(cpus=4.0, memory=16 * GiB, gpus={"a10g": 1})


def cloud(instances: int = 0, *, room: int = 4, pid: str = "cloud") -> Pool:
    """An elastic pool with ``instances`` up and ``room`` more it may launch."""
    return Pool(
        id=pid,
        provider="aws",
        kind="cloud",
        cpus=instances * NODE.cpus,
        memory=instances * NODE.memory,
        gpus={"a10g": instances},
        node=NODE,
        price_per_hour=1.0,
        max_instances=room,
        boot_s=60.0,
    )


def gpu_task(run_id: str, **kw: Any) -> TaskInstance:
    return TaskInstance(run_id=run_id, cpus=2.0, memory=4 * GiB, gpus=1, **kw)


def of(cmds: Sequence[Command], kind: Any) -> list[Any]:
    return [c for c in cmds if isinstance(c, kind)]


class Driver:
    """Feeds one core; answers every SolvePlacement with the greedy placer."""

    def __init__(self, **config: Any) -> None:
        self.core = SchedulerCore(CoreConfig(**config))
        self.now = 0.0
        self.problems: list[Any] = []

    def feed(self, event: Event, at: float | None = None) -> list[Command]:
        if at is not None:
            self.now = at
        out: list[Command] = []
        pending = [event]
        while pending:
            cmds = self.core.handle(pending.pop(0), self.now)
            out.extend(cmds)
            for c in of(cmds, SolvePlacement):
                self.problems.append(c.problem)
                pending.append(PlacementDecided(solution=solve_greedy(c.problem)))
        return out

    def discover(self, *pools: Pool, settled: Sequence[str] = ()) -> list[Command]:
        return self.feed(PoolsDiscovered(provider="aws", pools=list(pools), settled=list(settled)))

    def report(self, run_id: str, state: ProviderState, at: float) -> list[Command]:
        key = self.core.key(run_id)
        return self.feed(
            ProviderReported(provider="aws", reports=[Report(key=key, state=state)]), at
        )


def test_instances_the_placement_launches_are_provisioned_before_the_submits_use_them() -> None:
    d = Driver()
    d.discover(cloud())
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a"), gpu_task("b")]))
    kinds = [type(c).__name__ for c in cmds if isinstance(c, Provision | Submit)]
    assert kinds == ["Provision", "Submit"]
    [prov] = of(cmds, Provision)
    assert prov == Provision(
        provider="aws", pool="cloud", count=2, token=elastic_token("provision", "cloud", 1)
    )
    assert {d.core.state(r) for r in "ab"} == {TaskState.SUBMITTING}
    assert d.core.launched("cloud") == 2
    assert d.core.free_capacity("cloud") == (4.0, 24 * GiB, {"a10g": 0})
    assert d.core.counts_order(prov.token)


def test_launched_instances_count_until_a_discovery_that_began_after_the_answer() -> None:
    d = Driver()
    d.discover(cloud())
    [prov] = of(d.feed(TasksSubmitted(tasks=[gpu_task("a")])), Provision)
    # a discovery that began before the provider answered does not show the instance yet
    d.discover(cloud())
    assert d.core.launched("cloud") == 1 and d.core.free_capacity("cloud")[2] == {"a10g": 0}
    # another run does not fit the counted instance: a second one is launched, not a third
    [again] = of(d.feed(TasksSubmitted(tasks=[gpu_task("b")])), Provision)
    assert again.count == 1 and again.token == elastic_token("provision", "cloud", 2)
    assert d.problems[-1].pools[0].max_instances == 3  # 4 less the one still counted
    # the provider answered both; a discovery that began after shows them: counted once
    d.feed(Provisioned(provider="aws", pool="cloud", token=prov.token, instances=["i-1"]))
    d.discover(cloud(2, room=2), settled=[prov.token, again.token])
    assert d.core.launched("cloud") == 0 and not d.core.counts_order(prov.token)
    assert d.core.free_capacity("cloud") == (4.0, 24 * GiB, {"a10g": 0})


def test_fewer_instances_than_asked_are_what_counts_and_what_is_missing_is_asked_again() -> None:
    d = Driver()
    d.discover(cloud())
    [prov] = of(d.feed(TasksSubmitted(tasks=[gpu_task("a"), gpu_task("b")])), Provision)
    assert prov.count == 2
    cmds = d.feed(Provisioned(provider="aws", pool="cloud", token=prov.token, instances=["i-1"]))
    # a and b were sent to the pool for two instances: the one missing is launched again
    [more] = of(cmds, Provision)
    assert more.count == 1 and more.token == elastic_token("provision", "cloud", 2)
    assert d.core.launched("cloud") == 2
    assert not of(d.feed(Tick(), at=10.0), Provision)  # asked once


def test_a_refusal_stops_counting_and_holds_the_pool_until_it_is_rediscovered() -> None:
    d = Driver()
    d.discover(cloud())
    [prov] = of(d.feed(TasksSubmitted(tasks=[gpu_task("a")])), Provision)
    d.feed(ElasticRefused(provider="aws", pool="cloud", token=prov.token, reason="quota"))
    assert d.core.launched("cloud") == 0 and not d.core.counts_order(prov.token)
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("b")]))
    assert not of(cmds, Provision | SolvePlacement)  # no launch into a pool that refused one
    assert d.core.state("b") is TaskState.READY
    # the provider was looked at again: launches resume, first the instance a still lacks
    # (it was sent to the pool for the refused one), then one for b
    cmds = d.discover(cloud())
    assert [(c.count, c.token) for c in of(cmds, Provision)] == [
        (1, elastic_token("provision", "cloud", 2)),
        (1, elastic_token("provision", "cloud", 3)),
    ]
    assert d.core.state("b") is TaskState.SUBMITTING


def test_idle_instances_are_terminated_after_the_grace_and_stop_counting_at_once() -> None:
    d = Driver(idle_grace=300.0)
    d.discover(cloud(2, room=2))
    d.feed(TasksSubmitted(tasks=[gpu_task("a")]))
    d.report("a", ProviderState.RUNNING, at=10.0)
    # one instance runs a, the other is idle from the start: its grace ends at 300
    cmds = d.report("a", ProviderState.SUCCEEDED, at=100.0)
    assert not of(cmds, Terminate)
    assert of(cmds, WakeAt) == [] or of(cmds, WakeAt)[-1].at == 300.0
    cmds = d.feed(Tick(), at=300.0)
    [term] = of(cmds, Terminate)
    assert term == Terminate(
        provider="aws", pool="cloud", count=2, token=elastic_token("terminate", "cloud", 1)
    )
    assert d.core.free_capacity("cloud") == (0.0, 0, {"a10g": 0})
    assert not of(d.feed(Tick(), at=900.0), Terminate)  # asked once
    d.discover(cloud(0, room=4), settled=[term.token])
    assert d.core.launched("cloud") == 0 and not d.core.counts_order(term.token)


def test_idle_instances_stay_while_ready_work_could_use_them_and_a_new_idle_spell_restarts() -> (
    None
):
    d = Driver(idle_grace=300.0)
    d.discover(cloud(1, room=0))
    d.feed(TasksSubmitted(tasks=[gpu_task("a"), gpu_task("b")]))  # one instance: b waits
    d.report("a", ProviderState.RUNNING, at=10.0)
    assert d.core.state("b") is TaskState.READY
    d.report("a", ProviderState.SUCCEEDED, at=500.0)  # b takes the instance
    assert d.core.state("b") is TaskState.SUBMITTING
    cmds = d.report("b", ProviderState.SUCCEEDED, at=600.0)
    assert not of(cmds, Terminate)
    assert not of(d.feed(Tick(), at=899.0), Terminate)
    [term] = of(d.feed(Tick(), at=900.0), Terminate)
    assert term.count == 1


def test_a_pool_of_fixed_nodes_is_never_terminated() -> None:
    d = Driver(idle_grace=0.0)
    fixed = Pool(id="slurm", provider="aws", cpus=8, memory=64 * GiB, node=NODE)
    d.discover(fixed)
    assert not of(d.feed(Tick(), at=1000.0), Terminate)


@pytest.mark.parametrize("epoch", ["", "session-2"])
def test_tokens_are_a_function_of_pool_sequence_and_epoch(epoch: str) -> None:
    def first_token(epoch: str) -> str:
        d = Driver(token_epoch=epoch)
        d.discover(cloud())
        [prov] = of(d.feed(TasksSubmitted(tasks=[gpu_task("a")])), Provision)
        return str(prov.token)

    # a restarted core (a fresh one, the same epoch) derives the same token again
    assert first_token(epoch) == first_token(epoch) == elastic_token("provision", "cloud", 1, epoch)
    assert first_token(epoch) != first_token(epoch + "x")
    token = first_token(epoch)
    assert len(token) <= 63 and token.replace("-", "").isalnum() and token == token.lower()
