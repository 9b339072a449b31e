"""The command shell with in-memory ports: no Ray, no event loop, time moved by the test."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from stowplan.errors import InternalError, ProviderError
from stowplan.providers.base import ProviderRequest, ProviderState, Report
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    CancelRequested,
    RestoredTask,
    TasksRestored,
    TasksSubmitted,
)
from stowplan.scheduler.retry import Backoff
from stowplan.scheduler.states import TaskState
from stowplan.shell import PROVIDER_BACKOFF, AsyncioClock, CommandShell, ShellConfig, Wake, run_now
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import FailureClass, RetryPolicy

from .conftest import FakeProvider, GreedySolver, Harness, Records


def transient(msg: str = "throttled (429)") -> ProviderError:
    return ProviderError(msg, provider="p", retryable=True)


def calls(h: Harness, verb: str) -> list[tuple[str, float, tuple[str, ...]]]:
    return [c for c in h.prov.calls if c[0] == verb]


def test_a_lost_submit_answer_is_retried_with_the_same_key_and_never_runs_twice(
    h: Harness,
) -> None:
    h.boot()
    h.prov.lose = 1  # the job is made, the answer never arrives
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    assert h.prov.created == {key: 1}
    assert h.core.state("a") is TaskState.SUBMITTING
    (at,) = h.clock.due(Wake.RETRY)
    assert at == PROVIDER_BACKOFF.seconds(1, seed=7, key="submit:" + key)
    h.clock.advance(at)
    assert calls(h, "submit") == [("submit", 0.0, (key,)), ("submit", at, (key,))]
    assert h.prov.created == {key: 1}  # the retry found the first job
    assert h.core.state("a") is TaskState.QUEUED and h.core.attempt("a") == 1
    assert h.shell.counters.submit_retries == 1


def test_transient_submit_errors_back_off_capped_and_seeded_with_the_same_keys() -> None:
    backoff = Backoff(base=1.0, cap=4.0)
    h = Harness(provider_backoff=backoff)
    h.boot()
    h.prov.errors["submit"] = [transient() for _ in range(4)]
    h.shell.feed(TasksSubmitted(tasks=[h.task("a"), h.task("b")]))
    h.clock.advance(100.0)
    submits = calls(h, "submit")
    keys = submits[0][2]
    assert len(keys) == 2 and [c[2] for c in submits] == [keys] * 5
    times = [0.0]
    for tries in range(1, 5):
        times.append(times[-1] + backoff.seconds(tries, seed=7, key="submit:" + keys[0]))
    assert [c[1] for c in submits] == pytest.approx(times)
    waits = [b - a for a, b in itertools.pairwise(times)]
    assert waits[3] == pytest.approx(waits[2])  # capped: 1, 2, 4, 4 (times the same jitter)
    assert {h.core.state(r) for r in ("a", "b")} == {TaskState.QUEUED}
    assert sum(h.prov.created.values()) == 2


def test_a_provider_s_retry_after_is_waited_out_before_the_same_keys_go_again() -> None:
    """A throttled provider (HTTP 429 with Retry-After: 90) is not called again sooner than it
    asked, though the backoff alone would call after 1 s."""
    h = Harness(provider_backoff=Backoff(base=1.0, cap=4.0))
    h.boot()
    throttled = transient()
    throttled.retry_after = 90.0
    h.prov.errors["submit"] = [throttled]
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    h.clock.advance(200.0)
    submits = calls(h, "submit")
    assert [c[1] for c in submits] == [0.0, 90.0]
    assert submits[0][2] == submits[1][2]
    assert h.core.state("a") is TaskState.QUEUED


def test_a_retry_stops_once_the_core_no_longer_waits_on_the_key(h: Harness) -> None:
    h.boot()
    h.prov.errors["submit"] = [transient()]
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    h.shell.feed(CancelRequested(run_ids=["a"]))
    assert h.core.state("a") is TaskState.CANCELLED
    h.clock.advance(1000.0)
    assert calls(h, "submit") == [("submit", 0.0, (key,))]
    assert calls(h, "cancel") == [("cancel", 0.0, (key,))]
    assert h.prov.created == {}


def test_a_refusal_is_a_failed_attempt_and_the_core_decides_on_a_new_key(h: Harness) -> None:
    h.boot()
    h.prov.errors["submit"] = [ProviderError("quota exceeded", provider="p", retryable=False)]
    retry = RetryPolicy(on=[FailureClass.PROVIDER_REJECTED], backoff=5.0, backoff_cap=5.0)
    h.shell.feed(TasksSubmitted(tasks=[h.task("a", retry=retry), h.task("b")]))
    first = h.core.key("a")
    assert h.core.state("a") is TaskState.RETRYING
    assert h.core.state("b") is TaskState.FAILED  # its policy does not retry refusals
    failed = [t for _, t in h.records.transitions_seen if t.to_state is TaskState.FAILED]
    assert failed[0].failure is FailureClass.PROVIDER_REJECTED
    assert "quota exceeded" in failed[0].reason
    # the core's WakeAt became one Tick at that time; the retry is a new attempt, a new key
    wake = h.clock.due(Wake.TICK)[0]  # the next is the lease check
    assert 3.75 <= wake <= 6.25 and h.shell.counters.submit_retries == 0
    h.clock.advance(wake)
    second = h.core.key("a")
    assert h.core.state("a") is TaskState.QUEUED and h.core.attempt("a") == 2
    assert second != first and h.prov.created == {second: 1}


def test_transitions_then_the_intent_then_the_provider(h: Harness) -> None:
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    assert h.log[h.log.index("decided 1") :] == [
        "decided 1",
        f"intend {key}",
        f"submit {key}",
    ]
    assert h.records.states("a")[:4] == ["READY", "PLACED", "SUBMITTING", "QUEUED"]


def test_a_restored_run_is_reconciled_until_the_provider_answers_and_then_watched() -> None:
    h = Harness(observe_every=30.0)
    h.boot()
    key = attempt_key("a", 1)
    h.prov.jobs[key] = ProviderState.RUNNING
    h.prov.errors["describe"] = [transient("unreachable")]
    restored = RestoredTask(
        task=h.task("a"), state=TaskState.QUEUED, attempt=1, provider="p", pool="p-p"
    )
    h.shell.feed(TasksRestored(tasks=[restored]))
    assert h.core.state("a") is TaskState.QUEUED
    (at,) = h.clock.due(Wake.RETRY)
    h.clock.advance(at)
    assert calls(h, "describe") == [("describe", 0.0, (key,)), ("describe", at, (key,))]
    assert h.core.state("a") is TaskState.RUNNING
    assert h.shell.outstanding["p"] == {key: "a"}
    h.prov.jobs[key] = ProviderState.SUCCEEDED
    h.clock.advance(at + 30.0)
    assert h.core.state("a") is TaskState.SUCCEEDED
    assert h.shell.outstanding["p"] == {}


def test_batched_observation_renews_leases_and_stops_when_nothing_is_out() -> None:
    h = Harness(observe_every=10.0, lease_ttl=15.0)
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    h.clock.advance(100.0)
    assert h.core.state("a") is TaskState.QUEUED  # never LOST: each describe renewed it
    assert [c[1] for c in calls(h, "describe")] == [10.0 * i for i in range(1, 11)]
    h.prov.jobs[key] = ProviderState.SUCCEEDED
    h.clock.advance(200.0)
    assert h.core.state("a") is TaskState.SUCCEEDED
    assert len(calls(h, "describe")) == 11 and h.clock.due(Wake.OBSERVE) == []


def test_without_observation_an_expired_lease_is_reconciled(h: Harness) -> None:
    h = Harness(lease_ttl=15.0)
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    h.clock.advance(14.0)
    assert calls(h, "describe") == []
    h.clock.advance(20.0)  # the core's WakeAt for the lease check became a Tick at 15
    assert calls(h, "describe") == [("describe", 15.0, (key,))]
    assert h.core.state("a") is TaskState.QUEUED  # LOST, then found again by key


def test_pushed_reports_of_one_instant_reach_the_core_as_one_batch(h: Harness) -> None:
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a"), h.task("b")]))
    ka, kb = h.core.key("a"), h.core.key("b")
    before = h.shell.counters.core_events
    h.shell.report("p", Report(key=ka, state=ProviderState.RUNNING))
    h.shell.report("p", Report(key=kb, state=ProviderState.RUNNING))
    assert h.core.state("a") is TaskState.QUEUED  # not inside the provider's call
    h.clock.advance(0.0)
    assert h.shell.counters.core_events == before + 1
    assert [r.key for r in h.records.reported_batches[-1][1]] == [ka, kb]
    assert {h.core.state("a"), h.core.state("b")} == {TaskState.RUNNING}


def test_a_capacity_change_is_rediscovered_once_per_instant_and_fed(h: Harness) -> None:
    h.boot()
    assert len(calls(h, "discover")) == 1
    h.prov.cpus = 2.0
    h.shell.capacity_changed("p")
    h.shell.capacity_changed("p")
    h.clock.advance(0.0)
    assert len(calls(h, "discover")) == 2
    assert h.core.free_capacity("p-p")[0] == 2.0


def test_periodic_rediscovery_feeds_the_core_only_what_changed() -> None:
    h = Harness(rediscover_every=50.0)
    h.boot()
    events = h.shell.counters.core_events
    h.clock.advance(50.0)
    assert len(calls(h, "discover")) == 2 and h.shell.counters.core_events == events
    h.prov.cpus = 3.0
    h.prov.errors["discover"] = [transient()]
    h.clock.advance(100.0)  # failed: counted, tried again next period
    assert h.shell.counters.discover_failures == 1
    h.clock.advance(150.0)
    assert h.shell.counters.core_events == events + 1
    assert h.core.free_capacity("p-p")[0] == 3.0


def test_a_cancel_that_fails_transiently_is_sent_again(h: Harness) -> None:
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    h.prov.errors["cancel"] = [transient()]
    h.shell.feed(CancelRequested(run_ids=["a"]))
    assert h.core.state("a") is TaskState.CANCELLED
    (at,) = h.clock.due(Wake.RETRY)
    h.clock.advance(at)
    assert [c[1] for c in calls(h, "cancel")] == [0.0, at]
    assert h.prov.jobs[key] is ProviderState.CANCELLED


def test_a_halted_shell_acts_no_more(h: Harness) -> None:
    h.boot()
    h.shell.halt()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    assert list(h.core.run_ids()) == [] and calls(h, "submit") == []


def test_run_now_refuses_a_port_that_waits() -> None:
    async def waits() -> None:
        await asyncio.sleep(0)

    with pytest.raises(InternalError, match="waited on a port in virtual time"):
        run_now(waits())


class SlowProvider(FakeProvider):
    """Answers after a real wait, as a remote driver does."""

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        await asyncio.sleep(0.01)
        return await super().submit(requests)


@pytest.mark.anyio
async def test_the_same_shell_runs_in_real_time_on_an_event_loop() -> None:
    errors: list[BaseException] = []
    clock = AsyncioClock(errors.append)
    log: list[str] = []
    prov = SlowProvider("p", log)
    prov.errors["submit"] = [transient()]
    core = SchedulerCore(CoreConfig(seed=7))
    shell = CommandShell(
        core,
        clock=clock,
        solver=GreedySolver(),
        providers={"p": prov},
        records=Records(log),
        config=ShellConfig(
            seed=7,
            provider_backoff=Backoff(base=0.01, cap=0.01),
            observe_every=None,
            rediscover_every=None,
        ),
    )
    await shell.discover()
    shell.feed(TasksSubmitted(tasks=[Harness().task("a")]))
    with anyio.fail_after(5):
        while core.state("a") is not TaskState.QUEUED:
            await anyio.sleep(0.005)
    assert [c[0] for c in prov.calls] == ["discover", "submit", "submit"]
    assert errors == []
    await clock.aclose()


class CancelledWhileSubmitting(FakeProvider):
    """The run is cancelled while a retried submit is on its way: the core's Cancel reaches
    the provider first (nothing to cancel yet), then the submit starts the job."""

    shell: CommandShell | None = None

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        if self.shell is not None and len([c for c in self.calls if c[0] == "submit"]) == 1:
            self.shell.feed(CancelRequested(run_ids=["a"]))
        return await super().submit(requests)


def test_a_job_a_submit_started_after_the_core_gave_up_on_its_key_is_cancelled() -> None:
    h = Harness()
    prov = CancelledWhileSubmitting("p", h.log)
    prov.clock = h.clock
    h.prov = prov
    h.shell.providers = {"p": prov}
    prov.shell = h.shell
    h.boot()
    prov.errors["submit"] = [transient()]
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    key = h.core.key("a")
    h.clock.advance(1000.0)
    assert h.core.state("a") is TaskState.CANCELLED
    assert [c[0] for c in prov.calls if c[0] != "discover"] == [
        "submit",
        "cancel",  # the core's, before the job exists
        "submit",
        "cancel",  # the shell's, for the job the retry started
    ]
    assert prov.created == {key: 1} and prov.jobs[key] is ProviderState.CANCELLED


class StoringRecords(Records):
    """Records that must wait before the core hears of a success, and may refuse it (the
    store could not keep its outputs)."""

    async def _kept(self, reports: list[Report]) -> list[Report]:
        return [
            Report(key=r.key, state=ProviderState.FAILED, failure=FailureClass.NODE_FAILURE)
            if r.state is ProviderState.SUCCEEDED
            else r
            for r in reports
        ]

    def reported(self, provider: str, reports: list[Report]) -> Any:
        super().reported(provider, reports)
        return self._kept(reports)


def test_the_core_hears_the_reports_as_the_records_answer_them() -> None:
    h = Harness()
    h.records = StoringRecords(h.log)
    h.shell.records = h.records
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a")]))
    h.shell.report("p", Report(key=h.core.key("a"), state=ProviderState.SUCCEEDED))
    h.clock.advance(0.0)
    failed = [t for _, t in h.records.transitions_seen if t.run_id == "a"][-1]
    assert failed.failure is FailureClass.NODE_FAILURE
    assert h.core.state("a") is not TaskState.SUCCEEDED


def test_without_a_heartbeat_the_shell_forgets_the_keys_the_core_gave_up_on(h: Harness) -> None:
    """observe_every=None (real time: the provider actors' watches renew the leases): only the
    heartbeat pruned ``outstanding``, so a cancelled or failed-over attempt stayed in it."""
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[h.task("a"), h.task("b")]))
    ka, kb = h.core.key("a"), h.core.key("b")
    assert h.shell.outstanding["p"] == {ka: "a", kb: "b"}
    h.shell.feed(CancelRequested(run_ids=["a"]))
    assert h.shell.outstanding["p"] == {kb: "b"}
    # the provider loses b: its lease expires (LOST, still leased: waited on), the reconcile
    # answers UNKNOWN (not terminal) and the core fails it over: the old key is forgotten
    del h.prov.jobs[kb]
    h.clock.advance(1000.0)
    assert h.core.attempt("b") == 2 and h.core.key("b") != kb  # a new attempt, a new key
    assert h.shell.outstanding["p"] == {h.core.key("b"): "b"}
