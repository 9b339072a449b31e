"""The core's backlog at providers that queue work themselves (``Pool.queue_depth``): sized by
the runtime a bucket's runs were seen to take, bounded by ``CoreConfig.backlog_s`` and the
pool's depth, refilled once half of it drained, never read as instances an elastic pool lacks.
Sans-IO: events in, commands out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stowplan.placement.problem import Pool, Shape
from stowplan.scheduler.events import (
    Command,
    PoolsDiscovered,
    ProviderReported,
    Provision,
    Submit,
    TaskInstance,
    TasksSubmitted,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.states import TaskState
from tests.unit.scheduler import test_elastic as elastic

GiB = 1 << 30


def machine(depth: float = 8.0, cpus: float = 2.0) -> Pool:
    return Pool(id="local", provider="local", cpus=cpus, memory=64 * GiB, queue_depth=depth)


def task(run_id: str, **kw: Any) -> TaskInstance:
    return TaskInstance(run_id=run_id, cpus=1.0, memory=GiB, **kw)


def of(cmds: Sequence[Command], kind: Any) -> list[Any]:
    return [c for c in cmds if isinstance(c, kind)]


def submitted(cmds: Sequence[Command]) -> list[str]:
    return [i.run_id for s in of(cmds, Submit) for i in s.items]


class Driver(elastic.Driver):
    """The elastic tests' driver (greedy answers), with runs that succeed in a given time."""

    def succeed(
        self, run_ids: Sequence[str], took: float, provider: str = "local"
    ) -> list[Command]:
        reports = [
            Report(
                key=self.core.key(r),
                state=ProviderState.SUCCEEDED,
                started_at=1000.0,
                ended_at=1000.0 + took,
            )
            for r in run_ids
        ]
        return self.feed(ProviderReported(provider=provider, reports=reports), self.now + 1)


def sweep(n: int) -> list[TaskInstance]:
    return [task(f"t{i:04d}") for i in range(n)]


def test_without_a_runtime_seen_only_what_fits_is_submitted() -> None:
    d = Driver()
    d.feed(PoolsDiscovered(provider="local", pools=[machine()]))
    out = d.feed(TasksSubmitted(tasks=sweep(100)))
    assert submitted(out) == ["t0000", "t0001"]


def test_short_runs_seen_fill_the_backlog_up_to_the_pools_depth() -> None:
    d = Driver()
    d.feed(PoolsDiscovered(provider="local", pools=[machine(depth=8.0)]))
    first = submitted(d.feed(TasksSubmitted(tasks=sweep(100))))
    out = d.succeed(first, took=0.5)  # 30 s / 0.5 s = 60 waves, the depth caps it at 8
    # the two slots freed, plus 8 waves of the machine's 2 CPUs queued behind them
    assert len(submitted(out)) == 2 + 8 * 2
    assert d.core.counts[TaskState.SUBMITTING] == 18


def test_backlog_s_bounds_the_waves_by_the_runtime_seen() -> None:
    d = Driver(backlog_s=30.0)
    d.feed(PoolsDiscovered(provider="local", pools=[machine(depth=32.0)]))
    first = submitted(d.feed(TasksSubmitted(tasks=sweep(100))))
    out = d.succeed(first, took=10.0)  # 30 s of work per slot: 3 waves
    assert len(submitted(out)) == 2 + 3 * 2


def test_runs_longer_than_backlog_s_get_no_backlog() -> None:
    d = Driver(backlog_s=30.0)
    d.feed(PoolsDiscovered(provider="local", pools=[machine(depth=32.0)]))
    first = submitted(d.feed(TasksSubmitted(tasks=sweep(100))))
    out = d.succeed(first, took=600.0)
    assert len(submitted(out)) == 2


def test_a_pool_that_does_not_queue_gets_no_backlog() -> None:
    d = Driver()
    d.feed(PoolsDiscovered(provider="local", pools=[machine(depth=0.0)]))
    first = submitted(d.feed(TasksSubmitted(tasks=sweep(100))))
    assert len(submitted(d.succeed(first, took=0.1))) == 2


def test_the_backlog_is_refilled_once_half_of_it_drained_not_per_run() -> None:
    d = Driver()
    d.feed(PoolsDiscovered(provider="local", pools=[machine(depth=8.0)]))
    first = submitted(d.feed(TasksSubmitted(tasks=sweep(200))))
    live = submitted(d.succeed(first, took=0.5))  # 18 out: 2 running, 16 queued
    # while more than half of the 16 queued remain, runs end without a new submit call
    for i in range(7):
        assert submitted(d.succeed([live[i]], took=0.5)) == [], i
    # the eighth: half has drained, refilled to the full backlog in one call
    out = d.succeed([live[7]], took=0.5)
    assert len(of(out, Submit)) == 1
    assert len(submitted(out)) == 8
    assert d.core.counts[TaskState.SUBMITTING] == 18


def test_a_class_with_a_longer_runtime_takes_only_its_own_share_of_the_backlog() -> None:
    d = Driver(backlog_s=30.0)
    d.feed(PoolsDiscovered(provider="local", pools=[machine(depth=32.0, cpus=2.0)]))
    long = [task(f"l{i:03d}", priority=2) for i in range(2)]
    short = [task(f"s{i:03d}", priority=1) for i in range(100)]
    assert submitted(d.feed(TasksSubmitted(tasks=long + short))) == ["l000", "l001"]
    assert submitted(d.succeed(["l000", "l001"], took=15.0)) == ["s000", "s001"]
    out = submitted(d.succeed(["s000", "s001"], took=0.5))
    assert len(out) == 2 + 32 * 2  # 30 s / 0.5 s = 60 waves, the depth caps it at 32
    d.feed(TasksSubmitted(tasks=[task(f"l{i:03d}", priority=2) for i in range(2, 100)]))
    out = submitted(d.succeed(out, took=0.5))
    # both classes wait, the pool is empty: the long class counts on 2 waves of the 2 CPUs
    # (30 s / 15 s), not on the 32 waves the short one's runtime sized; the short class
    # takes all 32 it has left
    assert len([r for r in out if r.startswith("l")]) == 2 + 2 * 2
    assert len([r for r in out if r.startswith("s")]) == 32


NODE = Shape(cpus=2.0, memory=8 * GiB)


def test_a_backlog_on_an_elastic_pool_launches_no_make_up_instances() -> None:
    pool = Pool(
        id="cloud",
        provider="aws",
        kind="cloud",
        cpus=2.0,
        memory=8 * GiB,
        node=NODE,
        max_instances=3,
        boot_s=60.0,
        queue_depth=4.0,
    )
    d = Driver()
    d.feed(PoolsDiscovered(provider="aws", pools=[pool]))
    tasks = [TaskInstance(run_id=f"t{i:03d}", cpus=1.0, memory=GiB) for i in range(200)]
    out = d.feed(TasksSubmitted(tasks=tasks))
    [prov] = of(out, Provision)
    first = submitted(out)
    assert len(first) == 2 + prov.count * 2  # the instance up, and those launched
    out = d.succeed(first, took=1.0, provider="aws")
    assert len(submitted(out)) > len(first)  # the backlog: more than the instances hold
    # a discovery (the instances now settled) sees more work than capacity: queued on purpose
    up = Pool(
        id="cloud",
        provider="aws",
        kind="cloud",
        cpus=2.0 * (1 + prov.count),
        memory=8 * GiB * (1 + prov.count),
        node=NODE,
        max_instances=3 - prov.count,
        boot_s=60.0,
        queue_depth=4.0,
    )
    cmds = d.feed(PoolsDiscovered(provider="aws", pools=[up], settled=[prov.token]))
    assert of(cmds, Provision) == []


def test_work_queued_for_instances_that_went_away_launches_new_ones() -> None:
    """The backlog was offered while instances were up; they idle out (or are reclaimed) with
    work still queued for them at the provider: that work now lacks instances, and the core
    launches them again instead of waiting forever."""
    pool = Pool(
        id="cloud",
        provider="aws",
        kind="cloud",
        cpus=2.0,
        memory=8 * GiB,
        node=NODE,
        max_instances=3,
        boot_s=60.0,
        queue_depth=4.0,
    )
    d = Driver()
    d.feed(PoolsDiscovered(provider="aws", pools=[pool]))
    tasks = [TaskInstance(run_id=f"t{i:03d}", cpus=1.0, memory=GiB) for i in range(40)]
    out = d.feed(TasksSubmitted(tasks=tasks))
    [prov] = of(out, Provision)
    first = submitted(out)
    out = d.succeed(first, took=1.0, provider="aws")
    queued = submitted(out)
    assert len(queued) > 2 * (1 + prov.count)  # a backlog beyond what the instances hold
    up = 1 + prov.count
    settled = Pool(
        id="cloud",
        provider="aws",
        kind="cloud",
        cpus=2.0 * up,
        memory=8 * GiB * up,
        node=NODE,
        max_instances=3 - prov.count,
        boot_s=60.0,
        queue_depth=4.0,
    )
    assert (
        of(
            d.feed(PoolsDiscovered(provider="aws", pools=[settled], settled=[prov.token])),
            Provision,
        )
        == []
    )
    # every instance went away with the queued runs not started: none is left to run them
    gone = Pool(
        id="cloud",
        provider="aws",
        kind="cloud",
        cpus=0.0,
        memory=0,
        node=NODE,
        max_instances=3,
        boot_s=60.0,
        queue_depth=4.0,
    )
    cmds = d.feed(PoolsDiscovered(provider="aws", pools=[gone]))
    launch = of(cmds, Provision)
    assert launch and sum(p.count for p in launch) >= 1, cmds
