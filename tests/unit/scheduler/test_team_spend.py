"""A team's monthly cloud spend (``TeamLimits.monthly_usd``) in the core: what the store
recorded this month (``set_team_spending``) plus the estimates of the team's runs leased on
priced pools now; a run that would exceed it is held (READY with the reason), or waits for
approval where someone can approve; other teams and unpriced pools are not touched. Sans-IO."""

from __future__ import annotations

from stowplan.scheduler.events import Provision, Submit, TasksSubmitted
from stowplan.scheduler.reports import ProviderState
from stowplan.scheduler.share import Approvals, TeamLimits
from stowplan.scheduler.states import TaskState
from tests.unit.scheduler.test_budget import priced
from tests.unit.scheduler.test_elastic import Driver, gpu_task, of

HOUR = 3600.0


def started(cmds: list[object]) -> list[str]:
    return [it.run_id for s in of(cmds, Submit) for it in s.items]  # type: ignore[arg-type]


def lab(**config: object) -> Driver:
    d = Driver(teams={"vision": TeamLimits(monthly_usd=10.0), "nlp": TeamLimits()}, **config)
    d.discover(priced(4.0))  # one GPU per instance, $4 an hour
    return d


def test_runs_go_until_the_teams_month_would_be_exceeded() -> None:
    d = lab()
    d.core.set_team_spending({"vision": 1.0})
    runs = [gpu_task(r, runtime_s=HOUR, team="vision", user="mona") for r in "abc"]
    cmds = d.feed(TasksSubmitted(tasks=runs))
    # $1 spent + $4 + $4 = $9 fits in $10; a third $4 does not
    assert started(cmds) == ["a", "b"]
    assert d.core.state("c") is TaskState.READY
    why = d.core.held("c")
    assert why.startswith("held: team vision's monthly cloud spend of $10.00 would be exceeded")
    assert "$1.00 spent this month, $8.00 running, this run $4.00 more" in why
    assert d.core.sharing()["vision"]["running_usd"] == 8.0
    # another team's run is not held by vision's month
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("n", runtime_s=HOUR, team="nlp", user="nora")]))
    assert started(cmds) == ["n"]


def test_a_run_that_ends_gives_its_estimate_back_and_the_recorded_cost_counts() -> None:
    d = lab()
    runs = [gpu_task(r, runtime_s=HOUR, team="vision", user="mona") for r in "abc"]
    d.feed(TasksSubmitted(tasks=runs))
    assert d.core.state("c") is TaskState.READY
    # a ends; the service's next sum has its cost: $3 recorded + $4 running + $4 = $11 > $10
    d.core.set_team_spending({"vision": 3.0})
    cmds = d.report("a", ProviderState.SUCCEEDED, at=10.0)
    assert started(cmds) == [] and d.core.state("c") is TaskState.READY
    # a new month (the sum starts from nothing): it goes
    d.core.set_team_spending({"vision": 0.0})
    cmds = d.report("b", ProviderState.RUNNING, at=20.0)
    assert started(cmds) == ["c"]


def test_where_someone_can_approve_it_waits_for_approval_and_approved_it_goes() -> None:
    from stowplan.scheduler.events import ApprovalDecided

    d = lab(approvals=Approvals())
    d.core.set_team_spending({"vision": 9.0})
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR, team="vision")]))
    assert started(cmds) == [] and of(cmds, Provision) == []
    assert d.core.state("a") is TaskState.AWAITING_APPROVAL
    cmds = d.feed(ApprovalDecided(run_ids=["a"], approve=True, reason="ok"))
    assert started(cmds) == ["a"]


def test_a_limited_team_may_burst_to_instances_not_launched_yet_within_its_maximum() -> None:
    # the lab's free GPUs include what elastic pools may still launch: before, a team under
    # [service.teams] limits saw "no a10g GPU free" and never launched anything
    d = Driver(teams={"vision": TeamLimits(max_gpus={"*": 1})})
    d.discover(priced(4.0))
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task(r, team="vision") for r in "ab"]))
    assert started(cmds) == ["a"] and [p.count for p in of(cmds, Provision)] == [1]
    assert d.core.held("b") == "team vision holds 1 GPUs, its maximum (max_gpus.*)"
