"""Retry decisions: which failures are retried, and after how long.

Backoff is capped exponential with jitter. The jitter is a hash of (seed, key), not a draw from
a shared random stream, so it does not depend on the order in which failures arrive: the
simulator and a replay see the same delays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stowplan.spec.models import FailureClass, RetryPolicy, ServiceSpec

NEVER_RETRIED = frozenset({FailureClass.DEPENDENCY_FAILED, FailureClass.CANCELLED})
REPLACED = frozenset({FailureClass.NO_CAPACITY})
"""Failures of attempts that never ran (the pool could not start them): not the retry
policy's business. The core places the run again at once, in another pool, without counting
the attempt (``SchedulerCore``, *No capacity*)."""


def should_retry(policy: RetryPolicy, failure: FailureClass, attempt: int) -> bool:
    """True when attempt ``attempt`` (1-based, counting only attempts that ran) failed with
    ``failure`` and another is allowed. ``REPLACED`` failures are never the policy's to retry."""
    if failure in NEVER_RETRIED or failure in REPLACED:
        return False
    return failure in policy.on and attempt < policy.max_attempts


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with seeded jitter: the one definition every wait-and-try-again
    in stowplan uses (a run's retry policy, the core's repeated reconciles)."""

    base: float
    """seconds before the second try."""
    cap: float
    """no wait is longer than this (before jitter)."""
    jitter: float = 0.25
    """the wait is scaled by a factor in [1 - jitter, 1 + jitter], fixed by (seed, key)."""

    def seconds(self, tries: int, *, seed: int, key: str) -> float:
        """Wait after try ``tries`` (1-based): base * 2^(tries-1), capped, +/- jitter."""
        # the exponent is clamped so that a large number of tries cannot overflow a float
        base = min(self.cap, self.base * 2.0 ** min(64, max(0, tries - 1)))
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        return max(0.0, base * (1.0 + self.jitter * (2.0 * u - 1.0)))


def backoff_seconds(policy: RetryPolicy, attempt: int, *, seed: int, key: str) -> float:
    """Delay before attempt ``attempt + 1`` under ``policy``."""
    return Backoff(policy.backoff, policy.backoff_cap, policy.jitter).seconds(
        attempt, seed=seed, key=key
    )


def restart_seconds(service: ServiceSpec, restarts: int, *, seed: int, key: str) -> float:
    """Delay before a service's restart number ``restarts`` (1-based, since the count was last
    reset): ``service.backoff`` doubling up to ``service.backoff_cap`` (10 s, 20 s, ... 5 min
    by default), as Kubernetes' CrashLoopBackOff, with no jitter: a service restarts alone,
    and its user should be able to predict when."""
    return Backoff(service.backoff_s, service.backoff_cap_s, jitter=0.0).seconds(
        restarts, seed=seed, key=key
    )


def restarts_after(service: ServiceSpec, restarts: int, ran_s: float | None) -> int:
    """The restart count once an attempt that ran ``ran_s`` seconds (None: it never started)
    ended: the count plus one, or one when the attempt had run for ``service.reset_after``
    (it was up long enough that its failure is news, not the same crash loop)."""
    if ran_s is not None and ran_s >= service.reset_after_s:
        return 1
    return restarts + 1
