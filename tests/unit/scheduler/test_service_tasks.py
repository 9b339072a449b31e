"""Service tasks in the core: an attempt that ends any way but the user's cancel is restarted
after the service's backoff (10 s doubling to 5 min, reset after a long healthy run), as a new
attempt, never counted against the retry policy; ``CancelRequested`` stops it for good."""

from __future__ import annotations

import msgspec
import pytest

from stowplan.scheduler.events import (
    Cancel,
    CancelRequested,
    ServiceUnhealthy,
    SubmitItem,
    WakeAt,
)
from stowplan.scheduler.reports import ProviderState as P
from stowplan.scheduler.retry import restart_seconds, restarts_after
from stowplan.scheduler.states import TaskState as S
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import FailureClass as F
from stowplan.spec.models import RetryPolicy, ServiceSpec
from tests.unit.scheduler.test_core import Harness, items, of, pool, task, transitions

NOW = 1_000_000.0
SERVICE = ServiceSpec()


def running(h: Harness, run_id: str, at: float) -> None:
    h.report(run_id, P.RUNNING, at=at)
    assert h.states(run_id) == [S.RUNNING]


def restart_wait(h: Harness, run_id: str, since: float) -> float:
    """How long RETRYING ``run_id`` waits to be placed again, found by ticking: still
    RETRYING a moment before the wait its reason names, submitted again at it."""
    reason = [m for m in transitions(h.log) if m.run_id == run_id][-1].reason
    wait = float(reason.split(" in ", 1)[1].split("s:", 1)[0])
    h.tick(since + wait - 0.01)
    assert h.states(run_id) == [S.RETRYING]
    h.tick(since + wait)
    assert h.states(run_id) == [S.SUBMITTING]
    return wait


def harness() -> Harness:
    h = Harness(pool(cpus=4))
    h.now = NOW
    return h


def test_defaults_are_ten_seconds_doubling_to_five_minutes() -> None:
    waits = [restart_seconds(SERVICE, n, seed=0, key="k") for n in range(1, 9)]
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert restarts_after(SERVICE, 5, 599.0) == 6
    assert restarts_after(SERVICE, 5, 600.0) == 1
    assert restarts_after(SERVICE, 5, None) == 6


def test_a_service_that_exits_is_restarted_after_the_backoff_as_a_new_attempt() -> None:
    h = harness()
    h.submit(task("svc", service=SERVICE))
    running(h, "svc", NOW)
    out = h.report("svc", P.FAILED, F.USER_ERROR, at=NOW + 5)
    moves = transitions(out)
    assert [(m.from_state, m.to_state) for m in moves] == [(S.RUNNING, S.RETRYING)]
    assert moves[0].failure is F.USER_ERROR
    assert moves[0].reason.startswith("service restart 1 in 10s")
    assert of(out, WakeAt) == [WakeAt(at=NOW + 15)]
    assert items(h.tick(NOW + 14)) == []
    assert h.states("svc") == [S.RETRYING]
    out = h.tick(NOW + 15)
    assert items(out) == [SubmitItem("svc", 2, attempt_key("svc", 2))]
    assert h.states("svc") == [S.SUBMITTING]
    h.check_counts()


def test_backoff_doubles_and_is_capped_and_never_fails_the_run() -> None:
    """Twelve crashes in a row: far beyond ``max_attempts``, never FAILED; waits double to
    the cap. A normal task with the same policy fails at once (user errors are not retried)."""
    h = harness()
    h.submit(task("svc", service=SERVICE, retry=RetryPolicy(max_attempts=1)))
    at = NOW
    waits = []
    for n in range(1, 13):
        running(h, "svc", at)
        at += 1
        h.report("svc", P.FAILED, F.USER_ERROR, at=at)
        wait = restart_wait(h, "svc", at)
        waits.append(wait)
        at += wait
        assert h.core.attempt("svc") == n + 1
        assert h.core.service_restarts("svc") == n
    assert waits == [10, 20, 40, 80, 160] + [300] * 7
    h.submit(task("plain", retry=RetryPolicy(max_attempts=1)))
    h.report("plain", P.FAILED, F.USER_ERROR, at=at + 1)
    assert h.states("plain") == [S.FAILED]
    h.check_counts()


def test_the_count_starts_over_after_an_attempt_that_ran_long_enough() -> None:
    h = harness()
    h.submit(task("svc", service=ServiceSpec(backoff=1.0, backoff_cap=100.0, reset_after=60.0)))
    at = NOW
    waits = []
    for _ in range(3):  # crash at once, three times
        running(h, "svc", at)
        h.report("svc", P.FAILED, F.USER_ERROR, at=at)
        waits.append(restart_wait(h, "svc", at))
        at += waits[-1]
    assert waits == [1.0, 2.0, 4.0] and h.core.service_restarts("svc") == 3
    running(h, "svc", at)
    h.report("svc", P.FAILED, F.NODE_FAILURE, at=at + 60)  # up for a minute
    assert h.core.service_restarts("svc") == 1
    assert restart_wait(h, "svc", at + 60) == 1.0


@pytest.mark.parametrize(
    ("state", "failure"),
    [(P.SUCCEEDED, None), (P.CANCELLED, None), (P.FAILED, F.LOST), (P.FAILED, F.TIMEOUT)],
)
def test_every_end_of_an_attempt_restarts_it(state: P, failure: F | None) -> None:
    h = harness()
    h.submit(task("svc", service=SERVICE))
    running(h, "svc", NOW)
    out = h.report("svc", state, failure, at=NOW + 1)
    assert h.states("svc") == [S.RETRYING]
    assert transitions(out)[0].reason.startswith("service restart 1 in 10s")
    assert of(out, WakeAt) == [WakeAt(at=NOW + 11)]


def test_unhealthy_cancels_the_attempt_and_restarts() -> None:
    h = harness()
    h.submit(task("svc", service=SERVICE))
    running(h, "svc", NOW)
    first = h.core.key("svc")
    out = h.send(ServiceUnhealthy(run_id="svc", key=first, reason="3 probes failed"), at=NOW + 30)
    assert of(out, Cancel) == [Cancel(provider="local", keys=[first])]
    (move,) = transitions(out)
    assert (move.from_state, move.to_state, move.failure) == (S.RUNNING, S.RETRYING, F.UNHEALTHY)
    assert "3 probes failed" in move.reason
    # the cancelled attempt's late report is stale: nothing moves
    assert transitions(h.report("svc", P.CANCELLED, key=first, at=NOW + 31)) == []
    h.tick(NOW + 40)
    assert h.core.attempt("svc") == 2 and h.states("svc") == [S.SUBMITTING]
    # news about the old attempt is stale too
    assert h.send(ServiceUnhealthy(run_id="svc", key=first, reason="late"), at=NOW + 41) == []
    h.check_counts()


def test_cancel_stops_a_service_for_good() -> None:
    h = harness()
    h.submit(task("svc", service=SERVICE))
    running(h, "svc", NOW)
    key = h.core.key("svc")
    out = h.send(CancelRequested(run_ids=["svc"], reason="done"), at=NOW + 5)
    assert of(out, Cancel) == [Cancel(provider="local", keys=[key])]
    assert h.states("svc") == [S.CANCELLED]
    # the attempt's report of its end changes nothing; no restart is ever due
    h.report("svc", P.CANCELLED, key=key, at=NOW + 6)
    assert items(h.tick(NOW + 1000)) == []
    assert h.states("svc") == [S.CANCELLED] and h.core.unfinished() == 0


def test_cancel_while_waiting_to_restart_stops_it_too() -> None:
    h = harness()
    h.submit(task("svc", service=SERVICE))
    running(h, "svc", NOW)
    h.report("svc", P.FAILED, F.USER_ERROR, at=NOW + 1)
    out = h.send(CancelRequested(run_ids=["svc"]), at=NOW + 2)
    assert of(out, Cancel) == []  # no attempt is out
    assert h.states("svc") == [S.CANCELLED]
    assert items(h.tick(NOW + 100)) == []
    assert h.states("svc") == [S.CANCELLED]


def test_a_service_stays_unfinished_and_holds_its_lease_while_it_runs() -> None:
    h = Harness(pool(cpus=1))
    h.submit(task("svc", service=SERVICE), task("b"))
    running(h, "svc", 0.0)
    assert h.states("b") == [S.READY]  # the service holds the only CPU
    assert h.core.free_capacity("local/cpu")[0] == 0.0
    assert h.core.unfinished() == 2
    h.report("svc", P.FAILED, F.USER_ERROR, at=1.0)
    # its CPU is free while it waits to restart: b takes it
    assert h.states("b") == [S.SUBMITTING]


def test_a_normal_task_is_unchanged_by_services() -> None:
    """Same events, no service: success is final, a user error is not retried."""
    h = harness()
    h.submit(task("a"), task("b"))
    running(h, "a", NOW)
    running(h, "b", NOW)
    h.report("a", P.SUCCEEDED, at=NOW + 1)
    h.report("b", P.FAILED, F.USER_ERROR, at=NOW + 1)
    assert h.states("a", "b") == [S.SUCCEEDED, S.FAILED]
    assert h.core.attempt("a") == h.core.attempt("b") == 1


def test_service_tasks_survive_the_wire() -> None:
    """TaskInstance goes to the queue actor as msgspec: the service policy comes back equal."""
    t = task("svc", service=ServiceSpec(port=8888))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=type(t))
    assert back == t and back.service is not None and back.service.port == 8888
