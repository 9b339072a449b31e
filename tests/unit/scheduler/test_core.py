"""The sans-IO scheduler core: feed events, assert commands and states. No mocks, no Ray."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from stowplan.errors import InternalError
from stowplan.placement import solve
from stowplan.placement.problem import (
    Assignment,
    PlacementSolution,
    PlacementStatus,
    Pool,
)
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Cancel,
    CancelRequested,
    Command,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    Reconcile,
    RestoredTask,
    SolvePlacement,
    Submit,
    SubmitItem,
    TaskInstance,
    TasksRestored,
    TasksSubmitted,
    Tick,
    Transition,
    Transitioned,
    WakeAt,
)
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.retry import backoff_seconds
from stowplan.scheduler.states import FINAL, TaskState
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import FailureClass, RetryPolicy

S = TaskState
P = ProviderState
F = FailureClass
GiB = 1 << 30


def pool(
    pid: str = "local/cpu",
    *,
    provider: str = "local",
    cpus: float = 2,
    memory: int = 64 * GiB,
    gpus: dict[str, int] | None = None,
    price: float = 0.0,
) -> Pool:
    return Pool(
        id=pid,
        provider=provider,
        cpus=cpus,
        memory=memory,
        gpus=gpus or {},
        price_per_hour=price,
    )


def task(run_id: str, **kw: Any) -> TaskInstance:
    return TaskInstance(run_id=run_id, **kw)


def of(cmds: Sequence[Command], kind: type[Any]) -> list[Any]:
    return [c for c in cmds if isinstance(c, kind)]


def items(cmds: Sequence[Command], *, resubmit: bool = False) -> list[SubmitItem]:
    return [i for c in of(cmds, Submit) if c.resubmit is resubmit for i in c.items]


def transitions(cmds: Sequence[Command]) -> list[Transition]:
    return [r for c in of(cmds, Transitioned) for r in c.records]


class Harness:
    """Drives one core; places every SolvePlacement with the greedy placer unless told not to."""

    def __init__(self, *pools: Pool, auto_place: bool = True, **config: Any) -> None:
        self.core = SchedulerCore(CoreConfig(**config))
        self.now = 0.0
        self.auto_place = auto_place
        self.log: list[Command] = []
        by_provider: dict[str, list[Pool]] = {}
        for p in pools:
            by_provider.setdefault(p.provider, []).append(p)
        for provider, ps in sorted(by_provider.items()):
            self.send(PoolsDiscovered(provider=provider, pools=ps))

    def send(self, event: Event, at: float | None = None) -> list[Command]:
        if at is not None:
            self.now = at
        out = self.core.handle(event, self.now)
        self.log.extend(out)
        if self.auto_place:
            for sp in of(out, SolvePlacement):
                out += self.send(PlacementDecided(solution=solve(sp.problem)))
        return out

    def submit(self, *tasks: TaskInstance, completed: Sequence[str] = ()) -> list[Command]:
        return self.send(TasksSubmitted(tasks=list(tasks), completed=list(completed)))

    def report(
        self,
        run_id: str,
        state: ProviderState,
        failure: FailureClass | None = None,
        *,
        key: str | None = None,
        at: float | None = None,
        provider: str = "local",
    ) -> list[Command]:
        rep = Report(key=key or self.core.key(run_id), state=state, failure=failure)
        return self.send(ProviderReported(provider=provider, reports=[rep]), at=at)

    def tick(self, at: float) -> list[Command]:
        return self.send(Tick(), at=at)

    def states(self, *run_ids: str) -> list[TaskState]:
        return [self.core.state(r) for r in run_ids]

    def check_counts(self) -> None:
        actual = Counter(self.core.state(r) for r in self.core.run_ids())
        assert +self.core.counts == actual
        assert sum(self.core.counts.values()) == len(list(self.core.run_ids()))


# ---- placement requests ---------------------------------------------------------------------


def test_one_solve_for_many_ready_tasks() -> None:
    h = Harness(pool(cpus=100), auto_place=False)
    ids = [f"r{i:02d}" for i in range(50)]
    out = h.submit(*(task(r) for r in ids))
    solves = of(out, SolvePlacement)
    assert len(solves) == 1
    problem = solves[0].problem
    assert [c.members for c in problem.classes] == [ids]
    assert problem.classes[0].cpus == 1.0 and problem.classes[0].memory == GiB
    assert [p.id for p in problem.pools] == ["local/cpu"]
    assert of(out, Submit) == []
    assert set(h.states(*ids)) == {S.READY}
    out = h.send(PlacementDecided(solution=solve(problem)))
    submits = of(out, Submit)
    assert len(submits) == 1
    assert (submits[0].provider, submits[0].pool, submits[0].resubmit) == (
        "local",
        "local/cpu",
        False,
    )
    assert submits[0].items == [SubmitItem(r, 1, attempt_key(r, 1)) for r in ids]
    assert set(h.states(*ids)) == {S.SUBMITTING}
    moves = [(t.from_state, t.to_state) for t in transitions(out)]
    assert moves == [(S.READY, S.PLACED), (S.PLACED, S.SUBMITTING)] * 50
    h.check_counts()


def test_different_needs_make_different_classes() -> None:
    h = Harness(pool(cpus=100), auto_place=False)
    out = h.submit(task("a"), task("b", cpus=2), task("c"), task("d", memory=2 * GiB))
    (sp,) = of(out, SolvePlacement)
    assert [c.members for c in sp.problem.classes] == [["a", "c"], ["b"], ["d"]]
    assert [c.id for c in sp.problem.classes] == ["c000000", "c000001", "c000002"]


def test_only_one_solve_in_flight() -> None:
    h = Harness(pool(cpus=100), auto_place=False)
    (first,) = of(h.submit(task("a")), SolvePlacement)
    assert of(h.submit(task("b")), SolvePlacement) == []
    assert h.states("a", "b") == [S.READY, S.READY]
    out = h.send(PlacementDecided(solution=solve(first.problem)))
    assert [i.run_id for i in items(out)] == ["a"]
    (second,) = of(out, SolvePlacement)
    assert second.problem.request_id == first.problem.request_id + 1
    assert second.problem.classes[0].members == ["b"]


def test_an_answer_to_an_old_request_is_ignored() -> None:
    h = Harness(pool(cpus=4), auto_place=False)
    (sp,) = of(h.submit(task("a")), SolvePlacement)
    stale = PlacementSolution(
        request_id=sp.problem.request_id + 7,
        status=PlacementStatus.GREEDY,
        assignments=[Assignment("c0", "local/cpu", 1)],
    )
    assert h.send(PlacementDecided(solution=stale)) == []
    assert h.states("a") == [S.READY]
    assert items(h.send(PlacementDecided(solution=solve(sp.problem))))[0].run_id == "a"


def test_no_pools_no_solve() -> None:
    h = Harness(auto_place=False)
    assert of(h.submit(task("a")), SolvePlacement) == []
    out = h.send(PoolsDiscovered(provider="local", pools=[pool()]))
    assert of(out, SolvePlacement)[0].problem.classes[0].members == ["a"]


# ---- capacity -------------------------------------------------------------------------------


def test_capacity_is_respected_and_freed_by_success() -> None:
    h = Harness(pool(cpus=2))
    ids = ["a", "b", "c", "d"]
    out = h.submit(*(task(r) for r in ids))
    assert [i.run_id for i in items(out)] == ["a", "b"]
    assert h.states(*ids) == [S.SUBMITTING, S.SUBMITTING, S.READY, S.READY]
    cpus, mem, _ = h.core.free_capacity("local/cpu")
    assert cpus == 0.0 and mem == 62 * GiB
    h.report("a", P.RUNNING, at=1)
    out = h.report("a", P.SUCCEEDED, at=2)
    assert [i.run_id for i in items(out)] == ["c"]
    assert h.states(*ids) == [S.SUCCEEDED, S.SUBMITTING, S.SUBMITTING, S.READY]
    assert h.core.free_capacity("local/cpu")[0] == 0.0
    out = h.report("b", P.SUCCEEDED, at=3)
    assert [i.run_id for i in items(out)] == ["d"]
    h.check_counts()


def test_the_problem_offers_only_free_capacity() -> None:
    h = Harness(pool(cpus=4, memory=8 * GiB), auto_place=False)
    (sp,) = of(h.submit(task("a", cpus=3, memory=5 * GiB)), SolvePlacement)
    h.send(PlacementDecided(solution=solve(sp.problem)))
    (sp,) = of(h.submit(task("b", cpus=1, memory=GiB)), SolvePlacement)
    (p,) = sp.problem.pools
    assert (p.cpus, p.memory) == (1.0, 3 * GiB)


def test_memory_limits_like_cpus() -> None:
    h = Harness(pool(cpus=16, memory=3 * GiB))
    out = h.submit(*(task(f"m{i}", memory=GiB) for i in range(5)))
    assert len(items(out)) == 3
    assert h.core.free_capacity("local/cpu")[:2] == (13.0, 0)


def test_gpu_leases() -> None:
    h = Harness(pool("gpu", cpus=32, gpus={"A100": 2, "H100": 1}))
    out = h.submit(
        task("h", gpus=1, gpu_types=("H100",)),
        task("a1", gpus=1, gpu_types=("A100",)),
        task("a2", gpus=1, gpu_types=("A100",)),
        task("a3", gpus=1, gpu_types=("A100",)),
    )
    assert sorted(i.run_id for i in items(out)) == ["a1", "a2", "h"]
    assert h.core.free_capacity("gpu")[2] == {"A100": 0, "H100": 0}
    assert h.states("a3") == [S.READY]
    out = h.report("a1", P.SUCCEEDED, at=5)
    assert [i.run_id for i in items(out)] == ["a3"]


def test_allowed_providers_become_allowed_pools() -> None:
    h = Harness(pool("a/x", provider="a"), pool("b/y", provider="b"), auto_place=False)
    (sp,) = of(h.submit(task("t", allowed_providers=("b",))), SolvePlacement)
    assert sp.problem.classes[0].allowed_pools == ("b/y",)
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    (sub,) = of(out, Submit)
    assert (sub.provider, sub.pool) == ("b", "b/y")


# ---- dependencies ---------------------------------------------------------------------------


def test_dependent_waits_for_success() -> None:
    h = Harness(pool(cpus=4))
    out = h.submit(task("a"), task("b", depends_on=("a",)))
    assert [i.run_id for i in items(out)] == ["a"]
    assert h.states("a", "b") == [S.SUBMITTING, S.PENDING]
    h.report("a", P.RUNNING, at=1)
    assert h.states("b") == [S.PENDING]
    out = h.report("a", P.SUCCEEDED, at=2)
    assert [i.run_id for i in items(out)] == ["b"]
    assert (S.PENDING, S.READY) in [(t.from_state, t.to_state) for t in transitions(out)]


def test_dependency_failure_fails_dependents_transitively() -> None:
    h = Harness(pool(cpus=4))
    h.submit(task("a"), task("b", depends_on=("a",)), task("c", depends_on=("b",)))
    out = h.report("a", P.FAILED, F.USER_ERROR, at=1)
    assert h.states("a", "b", "c") == [S.FAILED, S.FAILED, S.FAILED]
    recs = {t.run_id: t for t in transitions(out)}
    assert recs["a"].failure is F.USER_ERROR
    assert recs["b"].failure is F.DEPENDENCY_FAILED
    assert recs["b"].reason == "dependency a failed"
    assert recs["c"].failure is F.DEPENDENCY_FAILED
    assert recs["c"].reason == "dependency b failed"
    h.check_counts()


def test_dependency_cancel_cancels_dependents() -> None:
    h = Harness(pool(cpus=4))
    h.submit(task("a"), task("b", depends_on=("a",)), task("c", depends_on=("b",)))
    h.report("a", P.RUNNING, at=1)
    out = h.send(CancelRequested(run_ids=["a"]), at=2)
    assert h.states("a", "b", "c") == [S.CANCELLED] * 3
    assert of(out, Cancel) == [Cancel(provider="local", keys=[attempt_key("a", 1)])]
    recs = {t.run_id: t for t in transitions(out)}
    assert recs["b"].failure is F.CANCELLED
    assert recs["b"].reason == "dependency a was cancelled"
    assert h.core.free_capacity("local/cpu")[0] == 4.0


def test_provider_cancel_report_cancels_dependents() -> None:
    h = Harness(pool(cpus=4))
    h.submit(task("a"), task("b", depends_on=("a",)))
    h.report("a", P.CANCELLED, at=1)
    assert h.states("a", "b") == [S.CANCELLED, S.CANCELLED]


def test_a_dependent_submitted_after_its_dependency_ended() -> None:
    h = Harness(pool(cpus=4))
    h.submit(task("ok"), task("bad"))
    h.report("ok", P.SUCCEEDED, at=1)
    h.report("bad", P.FAILED, F.USER_ERROR, at=1)
    out = h.submit(
        task("after-ok", depends_on=("ok",)),
        task("after-bad", depends_on=("bad",)),
        task("after-reused", depends_on=("reused",)),
        completed=["reused"],
    )
    assert h.states("after-ok", "after-bad", "after-reused") == [
        S.SUBMITTING,
        S.FAILED,
        S.SUBMITTING,
    ]
    assert sorted(i.run_id for i in items(out)) == ["after-ok", "after-reused"]


def test_unknown_dependency_is_an_internal_error() -> None:
    h = Harness(pool())
    with pytest.raises(InternalError, match="depends on unknown run"):
        h.submit(task("b", depends_on=("nowhere",)))


def test_submitting_the_same_run_twice_finds_the_first() -> None:
    h = Harness(pool(cpus=4))
    h.submit(task("a"))
    out = h.submit(task("a"))
    assert out == [] or items(out) == []
    assert list(h.core.run_ids()) == ["a"]
    h.check_counts()


# ---- failures and retries -------------------------------------------------------------------


def test_node_failure_retries_after_backoff_with_a_new_key() -> None:
    h = Harness(pool(cpus=1), seed=5)
    h.submit(task("a"))
    first = h.core.key("a")
    h.report("a", P.RUNNING, at=10)
    out = h.report("a", P.FAILED, F.NODE_FAILURE, at=20)
    assert h.states("a") == [S.RETRYING]
    (rec,) = transitions(out)
    assert (rec.from_state, rec.to_state, rec.failure) == (S.RUNNING, S.RETRYING, F.NODE_FAILURE)
    assert h.core.free_capacity("local/cpu")[0] == 1.0
    delay = backoff_seconds(RetryPolicy(), 1, seed=5, key=first)
    assert 1.5 <= delay <= 2.5
    assert of(out, WakeAt) == [WakeAt(at=20 + delay)]
    assert items(h.tick(20 + delay / 2)) == []
    assert h.states("a") == [S.RETRYING]
    out = h.tick(20 + delay)
    assert items(out) == [SubmitItem("a", 2, attempt_key("a", 2))]
    assert h.core.key("a") == attempt_key("a", 2) != first
    assert h.core.attempt("a") == 2
    h.report("a", P.SUCCEEDED, at=40)
    assert h.states("a") == [S.SUCCEEDED]


def test_user_error_is_not_retried() -> None:
    h = Harness(pool())
    h.submit(task("a"))
    out = h.report("a", P.FAILED, F.USER_ERROR, at=1)
    assert h.states("a") == [S.FAILED]
    assert transitions(out)[0].failure is F.USER_ERROR
    assert of(h.tick(10_000), Submit) == []


def test_failure_without_a_class_counts_as_user_error() -> None:
    h = Harness(pool())
    h.submit(task("a"))
    out = h.report("a", P.FAILED, None, at=1)
    assert h.states("a") == [S.FAILED]
    assert transitions(out)[0].failure is F.USER_ERROR


def test_user_error_is_retried_when_the_policy_says_so() -> None:
    h = Harness(pool())
    h.submit(task("a", retry=RetryPolicy(on=[F.USER_ERROR], backoff=0)))
    h.report("a", P.FAILED, F.USER_ERROR, at=1)
    assert h.states("a") == [S.RETRYING]
    assert items(h.tick(1))[0] == SubmitItem("a", 2, attempt_key("a", 2))


def test_max_attempts_is_respected() -> None:
    h = Harness(pool())
    h.submit(task("a", retry=RetryPolicy(max_attempts=2, backoff=1, jitter=0)))
    h.report("a", P.FAILED, F.PREEMPTED, at=1)
    assert h.states("a") == [S.RETRYING]
    assert [i.attempt for i in items(h.tick(2))] == [2]
    out = h.report("a", P.FAILED, F.PREEMPTED, at=3)
    assert h.states("a") == [S.FAILED]
    assert transitions(out)[0].failure is F.PREEMPTED
    assert items(h.tick(1000)) == []
    assert h.core.attempt("a") == 2


def test_retry_is_placed_again_behind_other_ready_work() -> None:
    h = Harness(pool(cpus=1))
    h.submit(task("a", retry=RetryPolicy(backoff=1, jitter=0)), task("b"))
    h.report("a", P.FAILED, F.NODE_FAILURE, at=1)  # frees the CPU: b goes first
    assert h.states("a", "b") == [S.RETRYING, S.SUBMITTING]
    h.tick(5)
    assert h.states("a") == [S.READY]
    out = h.report("b", P.SUCCEEDED, at=6)
    assert items(out) == [SubmitItem("a", 2, attempt_key("a", 2))]


# ---- leases and reconciliation --------------------------------------------------------------


def test_lease_expiry_makes_lost_and_asks_to_reconcile() -> None:
    h = Harness(pool(), lease_ttl=100)
    out = h.submit(task("a"))
    assert of(out, WakeAt) == [WakeAt(at=100.0)]
    key = h.core.key("a")
    assert of(h.tick(99), Reconcile) == []
    out = h.tick(100)
    assert h.states("a") == [S.LOST]
    assert of(out, Reconcile) == [Reconcile(provider="local", keys=[key])]
    assert out.index(of(out, Reconcile)[0]) == 0  # reconcile before anything else
    assert h.core.free_capacity("local/cpu")[0] == 1.0  # a LOST run keeps its lease


def test_reports_renew_the_lease() -> None:
    h = Harness(pool(), lease_ttl=100)
    h.submit(task("a"))
    h.report("a", P.QUEUED, at=60)
    h.tick(100)
    assert h.states("a") == [S.QUEUED]
    h.report("a", P.RUNNING, at=150)
    h.tick(200)
    assert h.states("a") == [S.RUNNING]
    h.tick(250)
    assert h.states("a") == [S.LOST]


def test_unknown_while_reconciling_a_lost_run_retries() -> None:
    h = Harness(pool(), lease_ttl=100)
    h.submit(task("a", retry=RetryPolicy(backoff=1, jitter=0)))
    h.tick(100)
    out = h.report("a", P.UNKNOWN, at=101)
    assert h.states("a") == [S.RETRYING]
    (rec,) = transitions(out)
    assert (rec.from_state, rec.failure) == (S.LOST, F.LOST)
    assert h.core.free_capacity("local/cpu")[0] == 2.0
    assert items(h.tick(102)) == [SubmitItem("a", 2, attempt_key("a", 2))]


def test_lost_run_found_running_carries_on() -> None:
    h = Harness(pool(), lease_ttl=100)
    h.submit(task("a"))
    h.tick(100)
    h.report("a", P.RUNNING, at=101)
    assert h.states("a") == [S.RUNNING]
    h.report("a", P.SUCCEEDED, at=150)
    assert h.states("a") == [S.SUCCEEDED]
    assert h.core.attempt("a") == 1


def test_unknown_for_a_healthy_run_is_ignored() -> None:
    h = Harness(pool())
    h.submit(task("a"))
    h.report("a", P.RUNNING, at=1)
    h.report("a", P.UNKNOWN, at=2)
    assert h.states("a") == [S.RUNNING]
    assert h.core.ignored_reports == 1


def restored(run_id: str, state: TaskState, attempt: int = 1, **kw: Any) -> RestoredTask:
    leased = state in (S.SUBMITTING, S.QUEUED, S.RUNNING, S.LOST)
    return RestoredTask(
        task=task(run_id, **kw),
        state=state,
        attempt=attempt,
        provider="local" if leased else None,
        pool="local/cpu" if leased else None,
    )


def test_restored_submitting_is_reconciled_then_resubmitted_with_the_same_key() -> None:
    h = Harness(pool(cpus=2))
    out = h.send(TasksRestored(tasks=[restored("a", S.SUBMITTING, attempt=3)]), at=50)
    key = attempt_key("a", 3)
    assert of(out, Reconcile) == [Reconcile(provider="local", keys=[key])]
    assert of(out, Submit) == []
    assert h.states("a") == [S.SUBMITTING]
    assert h.core.free_capacity("local/cpu")[0] == 1.0
    out = h.report("a", P.UNKNOWN, key=key, at=51)
    assert of(out, Submit) == [
        Submit(provider="local", pool="local/cpu", items=[SubmitItem("a", 3, key)], resubmit=True)
    ]
    assert h.states("a") == [S.SUBMITTING]
    assert h.core.attempt("a") == 3
    # a second UNKNOWN (not reconciling any more) is not a reason to submit again
    assert of(h.report("a", P.UNKNOWN, key=key, at=52), Submit) == []
    h.report("a", P.QUEUED, key=key, at=53)
    assert h.states("a") == [S.QUEUED]


def test_restored_running_success_releases_dependents() -> None:
    h = Harness(pool(cpus=2))
    out = h.send(
        TasksRestored(
            tasks=[
                restored("a", S.RUNNING),
                restored("b", S.PENDING, attempt=0, depends_on=("a",)),
                restored("done", S.SUCCEEDED),
                restored("c", S.READY, attempt=0, depends_on=("done",)),
            ]
        ),
        at=10,
    )
    assert of(out, Reconcile) == [Reconcile(provider="local", keys=[attempt_key("a", 1)])]
    assert h.states("a", "b", "done", "c") == [S.RUNNING, S.PENDING, S.SUCCEEDED, S.SUBMITTING]
    out = h.report("a", P.SUCCEEDED, at=11)
    assert h.states("a", "b") == [S.SUCCEEDED, S.SUBMITTING]
    assert items(out) == [SubmitItem("b", 1, attempt_key("b", 1))]
    h.check_counts()


def test_restored_retrying_run_continues_with_the_next_attempt() -> None:
    h = Harness(pool())
    out = h.send(TasksRestored(tasks=[restored("a", S.RETRYING, attempt=2)]), at=0)
    assert items(out) == [SubmitItem("a", 3, attempt_key("a", 3))]


def test_restored_leased_run_without_a_pool_is_an_internal_error() -> None:
    h = Harness(pool())
    bad = RestoredTask(task=task("a"), state=S.RUNNING, attempt=1)
    with pytest.raises(InternalError, match="has no provider"):
        h.send(TasksRestored(tasks=[bad]))


# ---- queues ---------------------------------------------------------------------------------


def test_max_concurrent_of_a_group() -> None:
    h = Harness(pool(cpus=10))
    ids = [f"t{i}" for i in range(5)]
    out = h.submit(*(task(r, group="sweep1", max_concurrent=2) for r in ids), task("other"))
    assert sorted(i.run_id for i in items(out)) == ["other", "t0", "t1"]
    out = h.report("t0", P.SUCCEEDED, at=1)
    assert [i.run_id for i in items(out)] == ["t2"]
    out = h.report("t1", P.FAILED, F.USER_ERROR, at=2)
    assert [i.run_id for i in items(out)] == ["t3"]
    out = h.report("t2", P.SUCCEEDED, at=3)
    assert [i.run_id for i in items(out)] == ["t4"]
    assert items(h.report("t3", P.SUCCEEDED, at=3)) == []
    assert h.states(*ids) == [S.SUCCEEDED, S.FAILED, S.SUCCEEDED, S.SUCCEEDED, S.SUBMITTING]


def test_max_concurrent_counts_restored_runs() -> None:
    h = Harness(pool(cpus=10))
    h.send(
        TasksRestored(tasks=[restored("r", S.RUNNING, group="g", max_concurrent=2)]),
        at=0,
    )
    out = h.submit(*(task(f"n{i}", group="g", max_concurrent=2) for i in range(3)))
    assert [i.run_id for i in items(out)] == ["n0"]
    out = h.report("r", P.SUCCEEDED, at=1)
    assert [i.run_id for i in items(out)] == ["n1"]
    h.report("n0", P.SUCCEEDED, at=2)
    out = h.report("n1", P.SUCCEEDED, at=3)
    assert [i.run_id for i in items(out)] == []  # n2 went when n0 ended
    assert h.states("n2") == [S.SUBMITTING]


def test_priority_orders_classes() -> None:
    h = Harness(pool(cpus=1), auto_place=False)
    (sp,) = of(h.submit(task("low", priority=0)), SolvePlacement)
    # a class is cut to what fits; hold the CPU with low, then offer both
    h.send(PlacementDecided(solution=solve(sp.problem)))
    assert (
        of(h.submit(task("low2"), task("high", priority=5, memory=2 * GiB)), SolvePlacement) == []
    )
    (sp,) = of(h.report("low", P.SUCCEEDED, at=1), SolvePlacement)
    assert [c.members for c in sp.problem.classes] == [["high"], ["low2"]]
    assert [c.priority for c in sp.problem.classes] == [5, 0]
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    assert [i.run_id for i in items(out)] == ["high"]


def test_fair_share_orders_projects_by_decayed_usage() -> None:
    h = Harness(pool(cpus=4), auto_place=False, fair_share_half_life=100.0)
    (sp,) = of(h.submit(task("heavy-0", project="heavy", cpus=4)), SolvePlacement)
    h.send(PlacementDecided(solution=solve(sp.problem)))
    h.report("heavy-0", P.RUNNING, at=0)
    # both projects now wait; heavy submitted first, equal priority
    h.submit(task("heavy-1", project="heavy"), task("light-1", project="light"))
    (sp,) = of(h.report("heavy-0", P.SUCCEEDED, at=100), SolvePlacement)
    assert h.core.usage("heavy") == pytest.approx(400.0)
    assert h.core.usage("light") == 0.0
    assert [c.members for c in sp.problem.classes] == [["light-1"], ["heavy-1"]]


def test_fair_share_usage_decays() -> None:
    h = Harness(pool(cpus=4), fair_share_half_life=100.0)
    h.submit(task("a", project="p", cpus=2))
    h.report("a", P.RUNNING, at=0)
    h.report("a", P.SUCCEEDED, at=50)
    assert h.core.usage("p") == pytest.approx(100.0)
    h.tick(150)
    assert h.core.usage("p") == pytest.approx(50.0)


def test_without_usage_age_breaks_ties() -> None:
    h = Harness(pool(cpus=8), auto_place=False)
    out = h.submit(task("b1", project="b"), task("a1", project="a", memory=2 * GiB))
    (sp,) = of(out, SolvePlacement)
    assert [c.members for c in sp.problem.classes] == [["b1"], ["a1"]]


# ---- rejection ------------------------------------------------------------------------------


def test_a_task_larger_than_every_pool_is_rejected_naming_the_need() -> None:
    h = Harness(pool(cpus=8), pool("local/big", cpus=16))
    out = h.submit(task("huge", cpus=64), task("after", depends_on=("huge",)), task("fine"))
    assert h.states("huge", "after", "fine") == [S.FAILED, S.FAILED, S.SUBMITTING]
    recs = {t.run_id: t for t in transitions(out)}
    assert recs["huge"].failure is F.PROVIDER_REJECTED
    assert recs["huge"].from_state is S.READY
    assert "64 CPUs" in recs["huge"].reason
    assert "no pool is large enough" in recs["huge"].reason
    assert recs["after"].failure is F.DEPENDENCY_FAILED
    h.check_counts()


def test_a_gpu_model_no_pool_has_is_rejected() -> None:
    h = Harness(pool("gpu", cpus=8, gpus={"A100": 4}))
    out = h.submit(task("x", gpus=1, gpu_types=("H100",)))
    assert h.states("x") == [S.FAILED]
    (rec,) = [t for t in transitions(out) if t.to_state is S.FAILED]
    assert rec.reason == (
        "no allowed pool offers 1 CPU, 1 GiB, 1 x GPU H100 (1 pool: no 1 x H100 there)"
    )


def test_a_pool_discovered_later_is_offered_to_runs_already_waiting() -> None:
    # which pools suit a run is worked out once per kind of run: a discovery must redo it
    a100, h100 = pool("a100", cpus=8, gpus={"A100": 4}), pool("h100", cpus=8, gpus={"H100": 1})
    h = Harness(a100, h100)
    h.submit(task("first", gpus=1, gpu_types=("H100",)))
    h.submit(task("second", gpus=1, gpu_types=("H100",)))
    assert h.states("first", "second") == [S.SUBMITTING, S.READY]
    more = pool("h100-b", cpus=8, gpus={"H100": 1})
    out = h.send(PoolsDiscovered(provider="local", pools=[a100, h100, more]))
    assert h.states("second") == [S.SUBMITTING]
    assert [(c.pool, [i.run_id for i in c.items]) for c in of(out, Submit)] == [
        ("h100-b", ["second"])
    ]


def test_a_busy_pool_is_not_a_rejection() -> None:
    h = Harness(pool(cpus=2))
    h.submit(task("a", cpus=2))
    h.submit(task("b", cpus=2))
    assert h.states("a", "b") == [S.SUBMITTING, S.READY]


# ---- stale and odd reports ------------------------------------------------------------------


def test_stale_reports_for_old_attempt_keys_are_ignored() -> None:
    h = Harness(pool())
    h.submit(task("a", retry=RetryPolicy(backoff=1, jitter=0)))
    old = h.core.key("a")
    h.report("a", P.FAILED, F.NODE_FAILURE, at=1)
    h.tick(2)
    assert h.core.attempt("a") == 2
    for state in (P.SUCCEEDED, P.FAILED, P.RUNNING, P.CANCELLED):
        out = h.report("a", state, F.USER_ERROR, key=old, at=3)
        assert transitions(out) == []
    assert h.states("a") == [S.SUBMITTING]
    assert h.core.ignored_reports == 4


@pytest.mark.parametrize("state", [P.FAILED, P.SUCCEEDED, P.RUNNING, P.QUEUED, P.UNKNOWN])
def test_a_repeated_report_after_a_retryable_failure_is_ignored(state: ProviderState) -> None:
    # the run is RETRYING (then READY) with the same key; a late or repeated report for that
    # key must not move it (it used to raise IllegalTransition)
    h = Harness(pool(), lease_ttl=100)
    h.submit(task("a", retry=RetryPolicy(backoff=10, jitter=0)))
    key = h.core.key("a")
    h.report("a", P.FAILED, F.NODE_FAILURE, at=1)
    assert transitions(h.report("a", state, F.NODE_FAILURE, key=key, at=2)) == []
    assert h.states("a") == [S.RETRYING]
    h.send(CancelRequested(run_ids=[]), at=2)  # any event: nothing due yet
    assert h.core.ignored_reports == 1
    out = h.tick(11)
    assert items(out) == [SubmitItem("a", 2, attempt_key("a", 2))]
    h.check_counts()


def test_reports_after_the_end_and_unknown_keys_are_ignored() -> None:
    h = Harness(pool())
    h.submit(task("a"))
    h.report("a", P.SUCCEEDED, at=1)
    assert transitions(h.report("a", P.FAILED, F.NODE_FAILURE, at=2)) == []
    assert transitions(h.report("a", P.RUNNING, key="nope", at=3)) == []
    assert h.states("a") == [S.SUCCEEDED]
    assert h.core.ignored_reports == 2


# ---- cancel ---------------------------------------------------------------------------------


def test_cancel_in_every_waiting_state() -> None:
    h = Harness(pool(cpus=1), lease_ttl=1000)
    h.submit(
        task("run", retry=RetryPolicy(backoff=100, jitter=0)),
        task("ready"),
        task("pending", depends_on=("ready",)),
    )
    h.report("run", P.FAILED, F.NODE_FAILURE, at=1)  # RETRYING; ready takes the CPU
    h.submit(task("queued-behind"))
    assert h.states("run", "ready", "pending", "queued-behind") == [
        S.RETRYING,
        S.SUBMITTING,
        S.PENDING,
        S.READY,
    ]
    out = h.send(CancelRequested(run_ids=["run", "queued-behind", "nope"]), at=2)
    assert of(out, Cancel) == []  # neither held a job at the provider
    assert h.states("run", "queued-behind") == [S.CANCELLED, S.CANCELLED]
    assert items(h.tick(500)) == []  # the retry timer of a cancelled run does nothing
    h.send(CancelRequested(run_ids=["ready"]), at=3)
    assert h.states("ready", "pending") == [S.CANCELLED, S.CANCELLED]
    h.check_counts()
    assert h.core.unfinished() == 0


def test_cancel_while_the_solver_runs_skips_the_run() -> None:
    h = Harness(pool(cpus=4), auto_place=False)
    (sp,) = of(h.submit(task("a"), task("b")), SolvePlacement)
    h.send(CancelRequested(run_ids=["a"]))
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    assert [i.run_id for i in items(out)] == ["b"]
    assert h.states("a") == [S.CANCELLED]


# ---- whole-core properties on a fixed scenario ----------------------------------------------


def scenario() -> list[Command]:
    h = Harness(pool(cpus=3), pool("cloud/x", provider="cloud", cpus=2, price=1.0), seed=9)
    h.submit(*(task(f"t{i}", retry=RetryPolicy(max_attempts=3)) for i in range(8)))
    for i, k in enumerate(("t0", "t1", "t2")):
        h.report(k, P.FAILED, F.PREEMPTED, at=i + 1)
    for k in ("t3", "t4"):
        h.report(k, P.SUCCEEDED, at=5, provider="cloud")
    h.tick(100)
    return h.log


def test_the_core_is_deterministic() -> None:
    assert scenario() == scenario()


def test_counts_add_up_through_a_scenario() -> None:
    h = Harness(pool(cpus=3), seed=1)
    ids = [f"t{i}" for i in range(6)]
    h.submit(*(task(r) for r in ids))
    h.check_counts()
    h.report("t0", P.FAILED, F.USER_ERROR, at=1)
    h.report("t1", P.FAILED, F.NODE_FAILURE, at=1)
    h.report("t2", P.RUNNING, at=1)
    h.check_counts()
    h.tick(50)
    h.send(CancelRequested(run_ids=["t5"]), at=51)
    h.check_counts()
    while h.core.unfinished():
        for r in ids:
            if h.core.state(r) in (S.SUBMITTING, S.QUEUED, S.RUNNING):
                h.report(r, P.SUCCEEDED, at=h.now + 1)
        h.tick(h.now + 10)
    h.check_counts()
    assert h.core.counts[S.SUCCEEDED] == 4
    assert h.core.counts[S.FAILED] == 1
    assert h.core.counts[S.CANCELLED] == 1
    assert all(h.core.state(r) in FINAL for r in ids)
    assert h.core.free_capacity("local/cpu")[0] == 3.0


def test_a_lost_run_found_again_gets_a_lease_that_can_expire_again() -> None:
    h = Harness(pool(), lease_ttl=100)
    h.submit(task("a"))
    h.tick(100)
    assert h.states("a") == [S.LOST]
    out = h.report("a", P.RUNNING, at=110)
    assert h.states("a") == [S.RUNNING]
    assert of(out, WakeAt) == [WakeAt(at=210.0)]
    out = h.tick(210)  # the provider went quiet again
    assert h.states("a") == [S.LOST]
    assert of(out, Reconcile) == [Reconcile(provider="local", keys=[attempt_key("a", 1)])]


def test_a_wake_already_used_is_asked_for_again() -> None:
    # zero backoff in virtual time: two failures at the same instant, with a Tick between them
    h = Harness(pool(cpus=2))
    no_wait = RetryPolicy(backoff=0.0)
    h.submit(task("a", retry=no_wait), task("b", retry=no_wait))
    out = h.report("a", P.FAILED, F.NODE_FAILURE, at=5)
    assert of(out, WakeAt) == [WakeAt(at=5.0)]
    assert [i.run_id for i in items(h.tick(5))] == ["a"]
    out = h.report("b", P.FAILED, F.NODE_FAILURE, at=5)
    assert of(out, WakeAt) == [WakeAt(at=5.0)]
    assert [i.run_id for i in items(h.tick(5))] == ["b"]


def test_max_concurrent_holds_across_classes_of_one_group() -> None:
    h = Harness(pool(cpus=10))
    out = h.submit(
        task("lo", group="g", max_concurrent=1, priority=0),
        task("hi", group="g", max_concurrent=1, priority=1),
    )
    assert [i.run_id for i in items(out)] == ["hi"]
    out = h.report("hi", P.SUCCEEDED, at=1)
    assert [i.run_id for i in items(out)] == ["lo"]


# ---- placement answers that place nothing; pool quotas ---------------------------------------


def test_an_answer_that_places_nothing_waits_for_a_change_instead_of_asking_again() -> None:
    h = Harness(pool(cpus=8), auto_place=False)
    out = h.submit(task("a"), task("b"))
    (sp,) = of(out, SolvePlacement)
    empty = PlacementSolution(
        request_id=sp.problem.request_id, status=PlacementStatus.FEASIBLE, assignments=[]
    )
    out = h.send(PlacementDecided(solution=empty))
    assert of(out, SolvePlacement) == []  # no spin at one instant
    assert of(h.tick(at=5.0), SolvePlacement) == []  # time alone changes nothing
    out = h.submit(task("c"))  # a new READY run: ask again, with everyone
    (sp2,) = of(out, SolvePlacement)
    assert sorted(m for c in sp2.problem.classes for m in c.members) == ["a", "b", "c"]


def test_a_pool_quota_holds_across_placements() -> None:
    quota = msgspec.structs.replace(pool(cpus=64), max_tasks=2)
    h = Harness(quota)
    h.submit(*(task(f"t{i}") for i in range(5)))
    assert h.states(*(f"t{i}" for i in range(5))).count(S.SUBMITTING) == 2
    h.report("t0", ProviderState.RUNNING, at=1.0)
    out = h.report("t0", ProviderState.SUCCEEDED, at=2.0)
    assert len(items(out)) == 1  # one slot freed, one more placed
    assert [s for s in h.states(*(f"t{i}" for i in range(5))) if s is S.SUBMITTING] == [
        S.SUBMITTING,
        S.SUBMITTING,
    ]
    h.check_counts()


# ---- issue 12: what changes while the solver runs ---------------------------------------------


def empty_answer(sp: SolvePlacement) -> PlacementDecided:
    return PlacementDecided(
        solution=PlacementSolution(
            request_id=sp.problem.request_id, status=PlacementStatus.FEASIBLE, assignments=[]
        )
    )


def offered(sp: SolvePlacement) -> list[str]:
    return sorted(m for c in sp.problem.classes for m in c.members)


def _new_ready_run(h: Harness) -> None:
    h.submit(task("b"))


def _capacity_freed(h: Harness) -> None:
    h.report("x", P.SUCCEEDED, at=1.0)


def _pools_rediscovered(h: Harness) -> None:
    h.send(PoolsDiscovered(provider="local", pools=[pool(cpus=4)]))


def _leased_run_cancelled(h: Harness) -> None:
    h.send(CancelRequested(run_ids=["x"]))


def _placed_run_cancelled(h: Harness) -> None:
    h.send(CancelRequested(run_ids=["a"]))  # the answer had room for it: "b" may use it


@pytest.mark.parametrize(
    "change",
    [
        _new_ready_run,
        _capacity_freed,
        _pools_rediscovered,
        _leased_run_cancelled,
    ],
)
def test_a_change_while_solving_is_not_lost_to_an_answer_that_placed_nothing(change: Any) -> None:
    h = Harness(pool(cpus=4), auto_place=False)
    (sp,) = of(h.submit(task("x", cpus=2)), SolvePlacement)
    h.send(PlacementDecided(solution=solve(sp.problem)))
    (sp,) = of(h.submit(task("a")), SolvePlacement)
    change(h)
    out = h.send(empty_answer(sp))
    (again,) = of(out, SolvePlacement)  # the answer predates the change: ask again
    assert "a" in offered(again)
    if change is _new_ready_run:
        assert offered(again) == ["a", "b"]


def test_a_run_that_became_ready_while_solving_is_not_stranded_by_ticks() -> None:
    h = Harness(pool(cpus=8), auto_place=False)
    (sp,) = of(h.submit(task("a")), SolvePlacement)
    assert of(h.submit(task("b")), SolvePlacement) == []  # one solve in flight
    h.send(empty_answer(sp))
    for i in range(100):
        h.tick(at=float(i + 1))
    solves = of(h.log, SolvePlacement)[1:]
    assert len(solves) == 1 and offered(solves[0]) == ["a", "b"]


def test_an_answer_that_placed_only_runs_cancelled_meanwhile_asks_again() -> None:
    h = Harness(pool(cpus=1), auto_place=False)
    (sp,) = of(h.submit(task("a"), task("b")), SolvePlacement)
    assert offered(sp) == ["a"]  # cut to what fits
    _placed_run_cancelled(h)
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    assert items(out) == []
    (again,) = of(out, SolvePlacement)
    assert offered(again) == ["b"]


def test_a_retry_whose_backoff_ends_after_a_stall_is_offered() -> None:
    h = Harness(pool(cpus=2), auto_place=False)
    x = task("x", cpus=2, retry=RetryPolicy(backoff=10, jitter=0))
    (sp,) = of(h.submit(x), SolvePlacement)
    h.send(PlacementDecided(solution=solve(sp.problem)))
    assert of(h.submit(task("a")), SolvePlacement) == []  # no room: nothing to ask
    (sp,) = of(h.report("x", P.FAILED, F.NODE_FAILURE, at=1.0), SolvePlacement)
    assert offered(sp) == ["a"]
    assert of(h.send(empty_answer(sp)), SolvePlacement) == []  # nothing changed: wait
    (again,) = of(h.tick(at=11.0), SolvePlacement)  # x is READY again: that is a change
    assert offered(again) == ["a", "x"]


# ---- issue 12: a LOST run whose reconcile answer never comes ----------------------------------


def test_a_lost_run_is_reconciled_again_with_capped_backoff_until_answered() -> None:
    from stowplan.scheduler.retry import Backoff

    h = Harness(pool(), lease_ttl=100, reconcile_backoff=Backoff(base=10, cap=40, jitter=0))
    h.submit(task("a"))
    key = h.core.key("a")
    again = Reconcile(provider="local", keys=[key])
    out = h.tick(100)
    assert h.states("a") == [S.LOST]
    assert (of(out, Reconcile), of(out, WakeAt)) == ([again], [WakeAt(at=110.0)])
    assert of(h.tick(109), Reconcile) == []
    asked = []
    for at in (110.0, 130.0, 170.0, 210.0):  # after 10, 20, 40, then 40 s (the cap)
        out = h.tick(at)
        assert of(out, Reconcile) == [again], at
        asked.append(of(out, WakeAt))
    assert asked == [[WakeAt(at=130.0)], [WakeAt(at=170.0)], [WakeAt(at=210.0)], [WakeAt(at=250)]]
    out = h.report("a", P.RUNNING, at=215)  # answered at last
    assert h.states("a") == [S.RUNNING]
    assert of(out, WakeAt) == [WakeAt(at=315.0)]  # the lease, not another reconcile
    assert of(h.tick(250), Reconcile) == []
    # lost again later: the backoff starts over
    out = h.tick(315)
    assert (of(out, Reconcile), of(out, WakeAt)) == ([again], [WakeAt(at=325.0)])


def test_reconcile_backoff_is_the_retry_backoff_seeded_per_key() -> None:
    from stowplan.scheduler.retry import Backoff

    b = Backoff(base=30, cap=600, jitter=0.25)
    h = Harness(pool(), lease_ttl=100, reconcile_backoff=b, seed=7)
    h.submit(task("a"))
    out = h.tick(100)
    delay = b.seconds(1, seed=7, key="reconcile:" + h.core.key("a"))
    assert delay != 30.0 and abs(delay - 30.0) <= 7.5
    assert of(out, WakeAt) == [WakeAt(at=100.0 + delay)]


def test_a_restored_lost_run_is_reconciled_again_until_answered() -> None:
    from stowplan.scheduler.retry import Backoff

    h = Harness(pool(), lease_ttl=100, reconcile_backoff=Backoff(base=10, cap=40, jitter=0))
    out = h.send(TasksRestored(tasks=[restored("a", S.LOST)]), at=5)
    key = attempt_key("a", 1)
    assert of(out, Reconcile) == [Reconcile(provider="local", keys=[key])]
    assert of(h.tick(15), Reconcile) == [Reconcile(provider="local", keys=[key])]


def test_a_cancelled_lost_run_is_not_reconciled_any_more() -> None:
    from stowplan.scheduler.retry import Backoff

    h = Harness(pool(), lease_ttl=100, reconcile_backoff=Backoff(base=10, cap=40, jitter=0))
    h.submit(task("a"))
    h.tick(100)
    h.send(CancelRequested(run_ids=["a"]), at=101)
    assert of(h.tick(110), Reconcile) == []


# ---- issue 12: capacity that shrank while the solver ran --------------------------------------


def test_an_answer_is_checked_against_capacity_that_shrank_while_solving() -> None:
    h = Harness(pool(cpus=4), auto_place=False)
    (sp,) = of(h.submit(*(task(r) for r in "abcd")), SolvePlacement)
    h.send(PoolsDiscovered(provider="local", pools=[pool(cpus=2)]))
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    assert [i.run_id for i in items(out)] == ["a", "b"]
    assert h.states(*"abcd") == [S.SUBMITTING, S.SUBMITTING, S.READY, S.READY]
    assert h.core.free_capacity("local/cpu")[0] == 0.0
    h.check_counts()
    out = h.report("a", P.SUCCEEDED, at=1)
    (sp,) = of(out, SolvePlacement)
    assert offered(sp) == ["c"]


def test_an_answer_is_checked_against_leases_restored_while_solving() -> None:
    h = Harness(pool(cpus=4, gpus={"A100": 2}), auto_place=False)
    (sp,) = of(h.submit(task("a", gpus=1), task("b", gpus=1)), SolvePlacement)
    gpu_run = restored("old", S.RUNNING, gpus=1, gpu_types=("A100",))
    h.send(TasksRestored(tasks=[gpu_run]))
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    assert [i.run_id for i in items(out)] == ["a"]
    assert h.states("b") == [S.READY]
    assert h.core.free_capacity("local/cpu")[2] == {"A100": 0}


def test_what_no_longer_fits_is_offered_again_where_it_still_fits() -> None:
    x = pool("x", provider="px", cpus=2, price=0.0)
    y = pool("y", provider="py", cpus=2, price=5.0)
    h = Harness(x, y, auto_place=False)
    (sp,) = of(h.submit(task("a", cpus=2)), SolvePlacement)
    answer = solve(sp.problem)
    assert [a.pool_id for a in answer.assignments] == ["x"]
    h.send(PoolsDiscovered(provider="px", pools=[pool("x", provider="px", cpus=1)]))
    out = h.send(PlacementDecided(solution=answer))
    assert items(out) == [] and h.states("a") == [S.READY]
    (again,) = of(out, SolvePlacement)
    assert offered(again) == ["a"]
    assert {p.id: p.cpus for p in again.problem.pools} == {"x": 1.0, "y": 2.0}
    out = h.send(PlacementDecided(solution=solve(again.problem)))
    assert [(c.pool, [i.run_id for i in c.items]) for c in of(out, Submit)] == [("y", ["a"])]


def test_a_pool_quota_reached_while_solving_is_respected() -> None:
    quota = msgspec.structs.replace(pool(cpus=8), max_tasks=2)
    h = Harness(quota, auto_place=False)
    (sp,) = of(h.submit(task("a"), task("b")), SolvePlacement)
    h.send(TasksRestored(tasks=[restored("old", S.RUNNING)]))
    out = h.send(PlacementDecided(solution=solve(sp.problem)))
    assert [i.run_id for i in items(out)] == ["a"]
    assert h.states("b") == [S.READY]
