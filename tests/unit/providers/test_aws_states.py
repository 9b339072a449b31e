"""EC2 states, state reasons, exit records and error codes -> our states: total functions."""

from __future__ import annotations

import pytest

from stowplan.providers.aws.states import (
    EC2_ERRORS,
    ERROR_FAILURES,
    ErrorKind,
    ExitRecord,
    ec2_error,
    error_failure,
    exit_state,
    gone_reason,
    instance_state,
    parse_status,
)
from stowplan.scheduler.reports import ProviderState as S
from stowplan.spec.models import FailureClass as F


def inst(state: str, reason: str = "") -> dict[str, object]:
    out: dict[str, object] = {"InstanceId": "i-1", "State": {"Name": state}}
    if reason:
        out["StateReason"] = {"Code": reason, "Message": reason}
    return out


@pytest.mark.parametrize(
    ("state", "reason", "want"),
    [
        ("pending", "", (S.QUEUED, None)),
        ("running", "", (S.RUNNING, None)),
        ("terminated", "Server.SpotInstanceTermination", (S.FAILED, F.PREEMPTED)),
        ("shutting-down", "Server.SpotInstanceTermination", (S.FAILED, F.PREEMPTED)),
        ("terminated", "Server.InternalError", (S.FAILED, F.NODE_FAILURE)),
        ("terminated", "Server.InsufficientInstanceCapacity", (S.FAILED, F.NO_CAPACITY)),
        ("terminated", "Client.InstanceInitiatedShutdown", (S.FAILED, F.NODE_FAILURE)),
        ("terminated", "Client.UserInitiatedShutdown", (S.FAILED, F.NODE_FAILURE)),
        ("terminated", "Something.New", (S.FAILED, F.NODE_FAILURE)),
        ("terminated", "", (S.FAILED, F.NODE_FAILURE)),
        ("rebooting-into-the-future", "", (S.UNKNOWN, None)),
    ],
)
def test_instances_without_an_exit_record(
    state: str, reason: str, want: tuple[S, F | None]
) -> None:
    got = instance_state(inst(state, reason), None)
    assert got[:2] == want and "i-1" in got[2]


@pytest.mark.parametrize(
    ("code", "reason", "want"),
    [
        (0, "exit", (S.SUCCEEDED, None)),
        (3, "exit", (S.FAILED, F.USER_ERROR)),
        (1, "outputs", (S.FAILED, F.USER_ERROR)),
        (124, "timeout", (S.FAILED, F.TIMEOUT)),
        (70, "setup", (S.FAILED, F.NODE_FAILURE)),
        (0, "preempted", (S.FAILED, F.PREEMPTED)),
        (9, "a-reason-of-a-later-script", (S.FAILED, F.USER_ERROR)),
    ],
)
def test_the_exit_record_decides_whatever_the_instance_state(
    code: int, reason: str, want: tuple[S, F | None]
) -> None:
    record = ExitRecord(key="k", exit_code=code, reason=reason)
    for state in ("running", "shutting-down", "terminated"):
        assert instance_state(inst(state, "Server.SpotInstanceTermination"), record)[:2] == want


def test_error_codes_map_totally() -> None:
    assert ec2_error("RequestLimitExceeded") is ErrorKind.THROTTLED
    assert ec2_error("InsufficientInstanceCapacity") is ErrorKind.NO_CAPACITY
    assert ec2_error("VcpuLimitExceeded") is ErrorKind.QUOTA
    assert ec2_error("Unsupported") is ErrorKind.UNSUPPORTED
    assert ec2_error("IdempotentParameterMismatch") is ErrorKind.ALREADY
    assert ec2_error("Whatever.Next") is ErrorKind.UNKNOWN
    assert all(isinstance(v, ErrorKind) for v in EC2_ERRORS.values())


@pytest.mark.parametrize(
    ("code", "want"),
    [
        ("InsufficientInstanceCapacity", F.NO_CAPACITY),
        ("InsufficientCapacity", F.NO_CAPACITY),
        ("SpotMaxPriceTooLow", F.NO_CAPACITY),
        ("VcpuLimitExceeded", F.NO_CAPACITY),  # never ran: placed elsewhere, not blindly again
        ("Unsupported", F.NO_CAPACITY),
        ("RequestLimitExceeded", F.PROVIDER_TRANSIENT),
        ("InvalidAMIID.NotFound", F.PROVIDER_REJECTED),
        ("IdempotentParameterMismatch", None),
        ("Whatever.Next", None),
    ],
)
def test_launch_errors_give_the_attempts_failure_class(code: str, want: F | None) -> None:
    assert error_failure(code) is want


def test_every_error_kind_has_a_failure_class_entry() -> None:
    assert set(ERROR_FAILURES) == set(ErrorKind)


def test_insufficient_capacity_is_no_capacity_not_a_node_failure() -> None:
    # the issue: InsufficientInstanceCapacity -> that pool is unavailable for a while and the
    # core re-places (a node failure would be counted against the retry policy instead)
    assert gone_reason("Server.InsufficientInstanceCapacity") == (S.FAILED, F.NO_CAPACITY)


def test_an_agent_status_parses_and_skips_what_is_not_a_line_of_it() -> None:
    text = "\n".join(
        [
            "claimed aaaa",
            "claimed bbbb",
            "exit aaaa 0 exit 100 160",
            "refused cccc",
            "ended dddd",
            "exit bbbb 143 preempted 100 170",
            "exit eeee zero exit 1 2",  # not a number
            "claimed",  # too short
            "$(touch PWNED) x",
            "notice",
            "exit ffff 0 ex",  # a partial last line
        ]
    )
    st = parse_status(text)
    assert st.claimed == {"aaaa", "bbbb"} and st.refused == {"cccc"} and st.ended == {"dddd"}
    assert st.noticed and set(st.exits) == {"aaaa", "bbbb"}
    assert exit_state(st.exits["aaaa"]) == (S.SUCCEEDED, None)
    assert exit_state(st.exits["bbbb"]) == (S.FAILED, F.PREEMPTED)
    assert (st.exits["bbbb"].started_at, st.exits["bbbb"].ended_at) == (100.0, 170.0)
    assert parse_status("") == parse_status("\n\n")
    assert not parse_status("").noticed
