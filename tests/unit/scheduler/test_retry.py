"""Retry decisions and seeded backoff."""

from __future__ import annotations

import itertools

import pytest
from msgspec.structs import force_setattr

from stowplan.scheduler.retry import NEVER_RETRIED, backoff_seconds, should_retry
from stowplan.spec.models import INFRASTRUCTURE_FAILURES, FailureClass, RetryPolicy

F = FailureClass
DEFAULT = RetryPolicy()


@pytest.mark.parametrize("failure", INFRASTRUCTURE_FAILURES)
def test_infrastructure_failures_retry_by_default(failure: FailureClass) -> None:
    assert should_retry(DEFAULT, failure, 1)
    assert should_retry(DEFAULT, failure, 2)
    assert not should_retry(DEFAULT, failure, 3)  # max_attempts = 3: no fourth attempt


@pytest.mark.parametrize(
    "failure",
    [F.USER_ERROR, F.OUT_OF_MEMORY, F.TIMEOUT, F.PROVIDER_REJECTED, *sorted(NEVER_RETRIED)],
)
def test_other_failures_do_not_retry_by_default(failure: FailureClass) -> None:
    assert not should_retry(DEFAULT, failure, 1)


def test_policy_can_retry_user_errors() -> None:
    policy = RetryPolicy(on=[F.USER_ERROR], max_attempts=2)
    assert should_retry(policy, F.USER_ERROR, 1)
    assert not should_retry(policy, F.USER_ERROR, 2)
    assert not should_retry(policy, F.NODE_FAILURE, 1)  # not listed any more


def test_never_retried_even_if_a_policy_were_built_around_the_check() -> None:
    # RetryPolicy refuses these classes; a hand-built one still does not retry them
    policy = RetryPolicy()
    force_setattr(policy, "on", [F.CANCELLED, F.DEPENDENCY_FAILED])
    assert not should_retry(policy, F.CANCELLED, 1)
    assert not should_retry(policy, F.DEPENDENCY_FAILED, 1)


def test_max_attempts_one_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1)
    assert not any(should_retry(policy, f, 1) for f in FailureClass)


def no_jitter(**kw: float) -> RetryPolicy:
    return RetryPolicy(jitter=0.0, **kw)  # type: ignore[arg-type]


def test_backoff_doubles_until_the_cap() -> None:
    policy = no_jitter(backoff=2.0, backoff_cap=20.0)
    delays = [backoff_seconds(policy, a, seed=0, key="k") for a in range(1, 7)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_backoff_of_attempt_zero_is_the_base() -> None:
    assert backoff_seconds(no_jitter(backoff=3.0), 0, seed=0, key="k") == 3.0


def test_backoff_never_overflows() -> None:
    policy = RetryPolicy(backoff=1.0, backoff_cap=60.0, jitter=0.0)
    assert backoff_seconds(policy, 5000, seed=1, key="k") == 60.0


def test_zero_backoff_is_zero() -> None:
    assert backoff_seconds(RetryPolicy(backoff=0.0), 3, seed=1, key="k") == 0.0


def test_jitter_stays_within_plus_minus_jitter() -> None:
    policy = RetryPolicy(backoff=10.0, backoff_cap=1000.0, jitter=0.25)
    delays = [
        backoff_seconds(policy, 1, seed=s, key=f"key{i}") for s in range(5) for i in range(200)
    ]
    assert all(7.5 <= d <= 12.5 for d in delays)
    # the jitter spreads: both halves of the band are used, and the values differ
    assert min(delays) < 8.5 and max(delays) > 11.5
    assert len(set(delays)) > 900


def test_jitter_is_deterministic_per_seed_and_key() -> None:
    policy = RetryPolicy(backoff=10.0, jitter=0.5)
    a = backoff_seconds(policy, 2, seed=7, key="abc")
    assert a == backoff_seconds(policy, 2, seed=7, key="abc")
    assert a != backoff_seconds(policy, 2, seed=8, key="abc")
    assert a != backoff_seconds(policy, 2, seed=7, key="abd")


def test_jitter_keeps_growth_between_attempts_for_one_key() -> None:
    policy = RetryPolicy(backoff=1.0, backoff_cap=1e9, jitter=0.25)
    delays = [backoff_seconds(policy, a, seed=3, key="same") for a in range(1, 10)]
    # same key: the same jitter factor, so each delay is exactly twice the last
    assert all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(delays))
