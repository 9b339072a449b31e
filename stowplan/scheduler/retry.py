"""Retry decisions: which failures are retried, and after how long.

Backoff is capped exponential with jitter. The jitter is a hash of (seed, key), not a draw from
a shared random stream, so it does not depend on the order in which failures arrive: the
simulator and a replay see the same delays.
"""

from __future__ import annotations

import hashlib

from stowplan.spec.models import FailureClass, RetryPolicy

NEVER_RETRIED = frozenset({FailureClass.DEPENDENCY_FAILED, FailureClass.CANCELLED})


def should_retry(policy: RetryPolicy, failure: FailureClass, attempt: int) -> bool:
    """True when attempt ``attempt`` (1-based) failed with ``failure`` and another is allowed."""
    if failure in NEVER_RETRIED:
        return False
    return failure in policy.on and attempt < policy.max_attempts


def backoff_seconds(policy: RetryPolicy, attempt: int, *, seed: int, key: str) -> float:
    """Delay before attempt ``attempt + 1``: base * 2^(attempt-1), capped, +/- jitter."""
    # the exponent is clamped so that a large attempt number cannot overflow a float
    base = min(policy.backoff_cap, policy.backoff * 2.0 ** min(64, max(0, attempt - 1)))
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    return max(0.0, base * (1.0 + policy.jitter * (2.0 * u - 1.0)))
