"""``[policy] budget`` in the core: a launch on a priced elastic pool that would break the budget is
not ordered (or only as far as it fits), and the runs it was for stay READY with the budget's
reason recorded once; runs on instances already up are checked alone; spending recorded since
and runs that end give the room back. Sans-IO, on the core's own clock."""

from __future__ import annotations

from stowplan.placement.problem import Pool
from stowplan.scheduler.events import (
    Command,
    Provision,
    Submit,
    TasksSubmitted,
    Transitioned,
)
from stowplan.scheduler.reports import ProviderState
from stowplan.scheduler.states import TaskState
from stowplan.spec.models import SpendBudget
from tests.unit.scheduler.test_elastic import NODE, Driver, cloud, gpu_task, of

HOUR = 3600.0


def held_records(cmds: list[Command]) -> list[tuple[str, str]]:
    return [
        (t.run_id, t.reason)
        for c in of(cmds, Transitioned)
        for t in c.records
        if t.from_state is TaskState.READY and t.to_state is TaskState.READY
    ]


def priced(price: float, **kw: object) -> Pool:
    pool = cloud(**kw)  # type: ignore[arg-type]
    return Pool(
        **{**{f: getattr(pool, f) for f in pool.__struct_fields__}, "price_per_hour": price}
    )


def test_a_launch_over_the_monthly_budget_is_not_ordered_and_its_runs_are_held() -> None:
    d = Driver(budget=SpendBudget(monthly_usd=10.0))
    d.discover(priced(4.0))
    d.core.set_spending(month_usd=7.0, experiment_usd=0.0, budget=SpendBudget(monthly_usd=10.0))
    # one GPU per run, one GPU per instance: one instance each for an hour, $4 each
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    assert of(cmds, Provision) == [] and of(cmds, Submit) == []
    assert d.core.state("a") is TaskState.READY
    why = d.core.held("a")
    assert why.startswith("held: the monthly budget of $10.00 would be exceeded ($7.00 spent")
    assert "this launch $4.00 more" in why and "raise policy.budget" in why
    assert held_records(cmds) == [("a", why)]
    # asked again (anything changed), the same reason is not recorded twice
    more = d.feed(TasksSubmitted(tasks=[gpu_task("b", runtime_s=HOUR)]))
    assert held_records(more) == [("b", d.core.held("b"))]
    assert of(more, Provision) == []


def test_a_launch_is_cut_to_what_the_budget_allows_and_only_the_rest_waits() -> None:
    budget = SpendBudget(per_experiment_usd=9.0)
    d = Driver(budget=budget)
    d.discover(priced(4.0))
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task(r, runtime_s=HOUR) for r in "abc"]))
    [prov] = of(cmds, Provision)
    assert prov.count == 2  # $8 fits in $9, $12 does not
    started = {it.run_id for s in of(cmds, Submit) for it in s.items}
    assert started == {"a", "b"}
    assert d.core.state("c") is TaskState.READY
    assert d.core.held("c").startswith("held: the per-experiment budget of $9.00")
    assert d.core.committed_usd == 8.0
    # a run ends; the shell has the store's figure first (as the queue does): its estimate
    # leaves the committed sum, its recorded cost counts instead
    d.core.set_spending(month_usd=4.0, experiment_usd=4.0, budget=budget)
    cmds = d.report("a", ProviderState.SUCCEEDED, at=HOUR)
    assert d.core.committed_usd == 4.0
    # $4 spent + $4 running + $4 more > $9: c still waits, though a's instance is idle
    assert d.core.state("c") is TaskState.READY and of(cmds, Submit) == []
    # without the recorded cost it would have gone (nothing counted what a cost)
    d.core.set_spending(month_usd=0.0, experiment_usd=0.0, budget=budget)
    cmds = d.report("b", ProviderState.RUNNING, at=HOUR + 1)
    assert [it.run_id for s in of(cmds, Submit) for it in s.items] == ["c"]


def test_a_run_on_an_instance_already_up_is_checked_with_its_own_estimate() -> None:
    # two instances up already, nothing more may launch: a run adds its share of one
    budget = SpendBudget(monthly_usd=5.0)
    d = Driver(budget=budget)
    d.discover(priced(4.0, instances=2, room=0))
    assert NODE.gpus == {"a10g": 1}
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task(r, runtime_s=HOUR) for r in "ab"]))
    started = [it.run_id for s in of(cmds, Submit) for it in s.items]
    assert started == ["a"]  # $4; a second $4 would make $8 > $5
    assert d.core.held("b").startswith("held: the monthly budget of $5.00")
    # raising the budget lets it go at the next change, with no new provision
    d.core.set_spending(month_usd=0.0, experiment_usd=0.0, budget=SpendBudget(monthly_usd=50.0))
    cmds = d.report("a", ProviderState.RUNNING, at=10.0)
    assert [it.run_id for s in of(cmds, Submit) for it in s.items] == ["b"]
    assert d.core.held("b") == ""


def test_short_runs_are_estimated_at_the_billing_minimum() -> None:
    budget = SpendBudget(monthly_usd=0.05)
    d = Driver(budget=budget)
    d.discover(priced(3.6))  # $0.001 per second: a minute is $0.06
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=1.0)]))
    assert of(cmds, Provision) == []
    assert "this launch $0.06 more" in d.core.held("a")


def test_without_a_budget_or_on_unpriced_pools_nothing_is_held() -> None:
    d = Driver()
    d.discover(priced(400.0))
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    assert [p.count for p in of(cmds, Provision)] == [1] and held_records(cmds) == []
    d = Driver(budget=SpendBudget(monthly_usd=1.0))
    d.discover(priced(0.0))
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    assert [p.count for p in of(cmds, Provision)] == [1] and held_records(cmds) == []
