"""RetryPolicy checks and sorts its failure classes once per distinct list (a cache, since a
sweep decodes one policy per run): each policy still gets its own list, of its own types."""

from __future__ import annotations

import msgspec
import pytest

from stowplan.spec.models import FailureClass, RetryPolicy


def test_on_is_checked_sorted_and_keeps_its_types_whatever_came_first() -> None:
    as_str = RetryPolicy(on=["timeout", "preempted", "timeout"])  # type: ignore[list-item]
    decoded = msgspec.json.decode(b'{"on": ["timeout", "preempted", "timeout"]}', type=RetryPolicy)
    again = RetryPolicy(on=["timeout", "preempted", "timeout"])  # type: ignore[list-item]
    assert decoded.on == [FailureClass.PREEMPTED, FailureClass.TIMEOUT]
    assert all(type(c) is FailureClass for c in decoded.on)
    assert as_str.on == again.on == ["preempted", "timeout"]
    assert all(type(c) is str for c in as_str.on + again.on)
    assert decoded.on is not msgspec.json.decode(msgspec.json.encode(decoded), type=RetryPolicy).on


def test_a_policy_never_retried_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(msgspec.ValidationError, match="no_capacity is not for the retry"):
            msgspec.json.decode(b'{"on": ["no_capacity"]}', type=RetryPolicy)
