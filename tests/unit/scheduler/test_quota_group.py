"""Account quotas shared by elastic pools (``Pool.quota``, an EC2 vCPU quota): the core launches
no more instances across a quota group than what is left of it, cut pool by pool in id order,
and the runs that needed the rest stay READY with the quota's reason recorded once; the placer
sees each pool's room cut to the group's; a quota with nothing left holds runs without a solve
loop, and a discovery that shows room again lets them go. Sans-IO, on the core's own clock."""

from __future__ import annotations

from collections.abc import Callable

from stowplan.placement.greedy import solve_greedy
from stowplan.placement.problem import (
    Assignment,
    PlacementProblem,
    PlacementSolution,
    PlacementStatus,
    Pool,
    PoolQuota,
    Shape,
)
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Command,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    Provision,
    SolvePlacement,
    Submit,
    TasksSubmitted,
    Tick,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.states import TaskState
from tests.unit.scheduler.test_budget import held_records
from tests.unit.scheduler.test_elastic import GiB, gpu_task, of

GROUP = "aws:us-east-1:ec2/L-DB2E81BA"
SMALL = "aws/us-east-1/g5.xlarge"
LARGE = "aws/us-east-1/g5.2xlarge"
VCPUS = {SMALL: 4.0, LARGE: 8.0}
WHY = "held: account quota L-DB2E81BA (G and VT on-demand vCPUs) has 0 of 64 left in us-east-1"


def g5(pid: str, left: float, *, quota: bool = True, limit: float = 64.0) -> Pool:
    """A G-family elastic pool of the group: one A10G per instance."""
    cpus = VCPUS[pid]
    return Pool(
        id=pid,
        provider="aws",
        kind="cloud",
        site="us-east-1",
        region="us-east-1",
        node=Shape(cpus=cpus, memory=int(cpus) * 4 * GiB, gpus={"a10g": 1}),
        price_per_hour=1.0,
        max_instances=4,
        boot_s=60.0,
        quota=PoolQuota(
            group=GROUP,
            name="L-DB2E81BA (G and VT on-demand vCPUs)",
            limit=limit,
            left=left,
            per_instance=cpus,
        )
        if quota
        else None,
    )


def half_and_half(problem: PlacementProblem) -> PlacementSolution:
    """A placer that puts the first half of each class on the small instances, the rest on
    the large ones, one run per instance, launching all of them."""
    assignments: list[Assignment] = []
    instances: dict[str, int] = {}
    for c in problem.classes:
        n = len(c.members)
        for pid, k in ((SMALL, n - n // 2), (LARGE, n // 2)):
            if k:
                assignments.append(Assignment(c.id, pid, k))
                instances[pid] = instances.get(pid, 0) + k
    return PlacementSolution(
        request_id=problem.request_id,
        status=PlacementStatus.FEASIBLE,
        assignments=assignments,
        instances=instances,
    )


class Driver:
    """Feeds one core; answers every SolvePlacement with ``placer``."""

    def __init__(self, placer: Callable[[PlacementProblem], PlacementSolution]) -> None:
        self.core = SchedulerCore(CoreConfig())
        self.placer = placer
        self.now = 0.0
        self.problems: list[PlacementProblem] = []

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
                pending.append(PlacementDecided(solution=self.placer(c.problem)))
        return out

    def discover(self, *pools: Pool, settled: tuple[str, ...] = ()) -> list[Command]:
        return self.feed(PoolsDiscovered(provider="aws", pools=list(pools), settled=list(settled)))


def vcpus_launched(cmds: list[Command]) -> float:
    return float(sum(p.count * VCPUS[p.pool] for p in of(cmds, Provision)))


def submitted(cmds: list[Command]) -> list[str]:
    return [it.run_id for s in of(cmds, Submit) for it in s.items]


def runs(n: int) -> TasksSubmitted:
    return TasksSubmitted(tasks=[gpu_task(f"r{i}", runtime_s=600.0) for i in range(n)])


def test_launches_across_the_group_are_cut_to_what_the_quota_leaves() -> None:
    d = Driver(half_and_half)
    d.discover(g5(SMALL, 16.0), g5(LARGE, 16.0))
    cmds = d.feed(runs(6))
    # asked: 3 small (12 vCPUs) + 3 large (24): 16 left; in id order the large pool first
    assert [(p.pool, p.count) for p in of(cmds, Provision)] == [(LARGE, 2)]
    assert vcpus_launched(cmds) == 16.0
    assert sorted(submitted(cmds)) == ["r3", "r4"]  # the large half: r3, r4 (r5 cut)
    waiting = [r for r in (f"r{i}" for i in range(6)) if d.core.state(r) is TaskState.READY]
    assert waiting == ["r0", "r1", "r2", "r5"]
    held = dict(held_records(cmds))
    assert set(held) == set(waiting)
    assert all(why.startswith(WHY) for why in held.values()), held
    assert d.core.held("r0").startswith(WHY)


def test_the_placer_sees_each_pool_cut_to_the_group_and_launches_count_until_settled() -> None:
    d = Driver(half_and_half)
    d.discover(g5(SMALL, 12.0), g5(LARGE, 12.0))
    d.feed(runs(2))
    problem_pools = {p.id: p.max_instances for p in d.problems[0].pools}
    assert problem_pools == {SMALL: 3, LARGE: 1}  # 12 vCPUs: 3 of 4, 1 of 8
    # r0 on a small instance (4), r1 on a large one (8): 12, all of it
    assert d.core.launched(SMALL) == 1 and d.core.launched(LARGE) == 1
    more = d.feed(runs(3))  # r0..r2: r2 is new; nothing left to launch it on
    assert of(more, Provision) == [] and d.core.state("r2") is TaskState.READY
    assert d.core.held("r2").startswith(WHY)


def test_a_quota_with_nothing_left_holds_runs_without_solving_again_and_again() -> None:
    d = Driver(half_and_half)
    d.discover(g5(SMALL, 0.0), g5(LARGE, 0.0))
    cmds = d.feed(runs(2))
    assert of(cmds, Provision) == [] and d.problems == []  # nothing could be placed: no solve
    assert [why for _, why in held_records(cmds)] == [
        f"{WHY}; an instance of {LARGE} takes 8 (ask AWS to raise it, or let other pools take "
        "these runs)"
    ] * 2
    # time passes: the same reason is not recorded again, nothing is asked
    again = d.feed(Tick(), at=60.0)
    assert held_records(again) == [] and of(again, SolvePlacement) == []
    # instances elsewhere in the account ended: discovery shows 8 vCPUs left
    cmds = d.discover(g5(SMALL, 8.0), g5(LARGE, 8.0))
    assert vcpus_launched(cmds) <= 8.0 and len(submitted(cmds)) == 1
    assert [(p.pool, p.count) for p in of(cmds, Provision)] == [(LARGE, 1)]


def test_runs_held_by_the_quota_go_when_a_run_ends_on_an_instance_up() -> None:
    d = Driver(solve_greedy)
    d.discover(g5(SMALL, 8.0), g5(LARGE, 8.0))
    cmds = d.feed(runs(3))
    assert vcpus_launched(cmds) == 8.0
    [first] = submitted(cmds)
    waiting = sorted(r for r in ("r0", "r1", "r2") if d.core.state(r) is TaskState.READY)
    assert len(waiting) == 2 and all(d.core.held(r).startswith(WHY) for r in waiting)
    key = d.core.key(first)
    cmds = d.feed(
        ProviderReported(provider="aws", reports=[Report(key=key, state=ProviderState.SUCCEEDED)]),
        at=30.0,
    )
    # its instance is free: one held run goes there, no launch past the quota
    assert of(cmds, Provision) == [] and len(submitted(cmds)) == 1


def test_the_cut_is_deterministic() -> None:
    def play() -> list[Command]:
        d = Driver(half_and_half)
        out = d.discover(g5(SMALL, 20.0), g5(LARGE, 20.0))
        out += d.feed(runs(7))
        out += d.discover(g5(SMALL, 4.0), g5(LARGE, 4.0))
        return out

    first, second = play(), play()
    assert first == second
    assert vcpus_launched(first) <= 20.0


def test_without_a_quota_nothing_is_cut() -> None:
    d = Driver(half_and_half)
    d.discover(g5(SMALL, 0.0, quota=False), g5(LARGE, 0.0, quota=False))
    cmds = d.feed(runs(6))
    assert [(p.pool, p.count) for p in of(cmds, Provision)] == [(LARGE, 3), (SMALL, 3)]
    assert held_records(cmds) == [] and len(submitted(cmds)) == 6
