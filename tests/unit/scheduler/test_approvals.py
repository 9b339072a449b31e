"""Approvals in the core (``CoreConfig.approvals``, the service's): a run a budget would hold,
or that the placer put on a restricted provider's pool, waits in AWAITING_APPROVAL with the
reason; approved, it is placed again and neither holds it; rejected, it is CANCELLED with the
reason, and its dependents with it. Without approvals nothing changes: the budget holds runs
READY. Sans-IO."""

from __future__ import annotations

from stowplan.placement.problem import Pool
from stowplan.scheduler.events import (
    ApprovalDecided,
    CancelRequested,
    PoolsDiscovered,
    Provision,
    Submit,
    TaskInstance,
    TasksSubmitted,
    Transitioned,
)
from stowplan.scheduler.share import Approvals
from stowplan.scheduler.states import TaskState
from stowplan.spec.models import FailureClass, SpendBudget
from tests.unit.scheduler.test_budget import priced
from tests.unit.scheduler.test_elastic import Driver, gpu_task, of

HOUR = 3600.0
GiB = 1 << 30


def started(cmds: list[object]) -> list[str]:
    return [it.run_id for s in of(cmds, Submit) for it in s.items]  # type: ignore[arg-type]


def over_budget(**config: object) -> Driver:
    budget = SpendBudget(monthly_usd=10.0)
    d = Driver(budget=budget, **config)
    d.discover(priced(4.0))
    d.core.set_spending(month_usd=7.0, experiment_usd=0.0, budget=budget)
    return d


def test_a_run_over_budget_waits_for_approval_with_the_budgets_reason() -> None:
    d = over_budget(approvals=Approvals())
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    assert of(cmds, Provision) == [] and started(cmds) == []
    assert d.core.state("a") is TaskState.AWAITING_APPROVAL
    [rec] = [t for c in of(cmds, Transitioned) for t in c.records if t.run_id == "a"][-1:]
    assert rec.to_state is TaskState.AWAITING_APPROVAL
    assert rec.reason.startswith("held: the monthly budget of $10.00 would be exceeded")
    # nothing asks again while it waits: more events place nothing and record nothing for it
    more = d.feed(TasksSubmitted(tasks=[]))
    assert [t for c in of(more, Transitioned) for t in c.records if t.run_id == "a"] == []


def test_without_approvals_the_budget_holds_it_ready_as_before() -> None:
    d = over_budget()
    d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    assert d.core.state("a") is TaskState.READY
    assert d.core.held("a").startswith("held: the monthly budget")


def test_an_approved_run_launches_past_the_budget() -> None:
    d = over_budget(approvals=Approvals())
    d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR), gpu_task("b", runtime_s=HOUR)]))
    assert {d.core.state(r) for r in "ab"} == {TaskState.AWAITING_APPROVAL}
    cmds = d.feed(ApprovalDecided(run_ids=["a"], approve=True, reason="paper deadline"))
    [prov] = of(cmds, Provision)
    assert prov.count == 1 and started(cmds) == ["a"]
    assert d.core.state("a") is TaskState.SUBMITTING
    assert d.core.state("b") is TaskState.AWAITING_APPROVAL  # approving one approves one
    recs = [(t.from_state, t.to_state, t.reason) for c in of(cmds, Transitioned)
            for t in c.records if t.run_id == "a"]  # fmt: skip
    assert recs[0] == (TaskState.AWAITING_APPROVAL, TaskState.READY, "paper deadline")


def test_a_rejected_run_is_cancelled_with_the_reason_and_its_dependents_too() -> None:
    d = over_budget(approvals=Approvals())
    d.feed(
        TasksSubmitted(
            tasks=[
                gpu_task("a", runtime_s=HOUR),
                TaskInstance(run_id="after", cpus=1.0, memory=GiB, depends_on=["a"]),
            ]
        )
    )
    assert d.core.state("a") is TaskState.AWAITING_APPROVAL
    cmds = d.feed(ApprovalDecided(run_ids=["a"], approve=False, reason="rejected by pi: too dear"))
    assert d.core.state("a") is TaskState.CANCELLED
    assert d.core.state("after") is TaskState.CANCELLED
    [rec] = [t for c in of(cmds, Transitioned) for t in c.records if t.run_id == "a"]
    assert rec.failure is FailureClass.CANCELLED and rec.reason == "rejected by pi: too dear"


def test_a_decision_on_a_run_not_waiting_changes_nothing() -> None:
    d = over_budget(approvals=Approvals())
    d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    d.feed(CancelRequested(run_ids=["a"]))
    assert d.core.state("a") is TaskState.CANCELLED
    cmds = d.feed(ApprovalDecided(run_ids=["a", "nope"], approve=True))
    assert d.core.state("a") is TaskState.CANCELLED and started(cmds) == []


def campus() -> Pool:
    return Pool(id="campus", provider="slurm", cpus=2.0, memory=8 * GiB)


def test_a_run_placed_on_a_restricted_provider_waits_and_goes_once_approved() -> None:
    d = Driver(approvals=Approvals(restricted=("aws",)))
    d.feed(PoolsDiscovered(provider="slurm", pools=[campus()]))
    d.discover(priced(1.0))  # the elastic pool, provider "aws": the only one with GPUs
    cmds = d.feed(TasksSubmitted(tasks=[gpu_task("g"), TaskInstance(run_id="c", cpus=1.0)]))
    # the CPU run goes to the campus; the GPU run could only go to aws: it asks
    assert started(cmds) == ["c"] and of(cmds, Provision) == []
    assert d.core.state("g") is TaskState.AWAITING_APPROVAL
    [rec] = [t for c in of(cmds, Transitioned) for t in c.records if t.run_id == "g"][-1:]
    assert "provider aws is restricted" in rec.reason and "pool cloud" in rec.reason
    cmds = d.feed(ApprovalDecided(run_ids=["g"], approve=True, reason="ok"))
    assert started(cmds) == ["g"] and len(of(cmds, Provision)) == 1


def test_cancel_while_awaiting_approval_cancels() -> None:
    d = over_budget(approvals=Approvals())
    d.feed(TasksSubmitted(tasks=[gpu_task("a", runtime_s=HOUR)]))
    d.feed(CancelRequested(run_ids=["a"], reason="never mind"))
    assert d.core.state("a") is TaskState.CANCELLED
    assert d.core.counts[TaskState.AWAITING_APPROVAL] == 0


def test_a_run_approved_before_a_restart_does_not_ask_again() -> None:
    from stowplan.scheduler.events import RestoredTask, TasksRestored

    for approved, state in ((False, TaskState.AWAITING_APPROVAL), (True, TaskState.SUBMITTING)):
        d = over_budget(approvals=Approvals())
        task = gpu_task("a", runtime_s=HOUR)
        d.feed(
            TasksRestored(
                tasks=[RestoredTask(task=task, state=TaskState.PENDING, approved=approved)]
            )
        )
        assert d.core.state("a") is state, approved
