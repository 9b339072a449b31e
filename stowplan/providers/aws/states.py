"""EC2 instance states, state reasons, exit records and API error codes -> our states. Pure.

Theory of operation: an attempt runs on an instance that claimed it (several may share one).
Its exit record (a small JSON object the attempt script uploads to S3 when it ends) is the
truth about how the attempt ended, whatever the instance's state; without one, the state and
state reason of the instance that claimed it say what happened to it. Every lookup goes
through a total function: anything not in a table is ``UNKNOWN`` (states) or
``ErrorKind.UNKNOWN`` (error codes).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import msgspec
from msgspec import Struct

from stowplan.scheduler.reports import ProviderState
from stowplan.spec.models import FailureClass

INSTANCE_STATES: dict[str, ProviderState] = {
    "pending": ProviderState.QUEUED,
    "running": ProviderState.RUNNING,
    # gone or going without an exit record: the state reason decides (``gone_reason``)
    "shutting-down": ProviderState.FAILED,
    "terminated": ProviderState.FAILED,
    "stopping": ProviderState.FAILED,
    "stopped": ProviderState.FAILED,
}

STATE_REASONS: dict[str, tuple[ProviderState, FailureClass | None]] = {
    "Server.SpotInstanceTermination": (ProviderState.FAILED, FailureClass.PREEMPTED),
    "Server.SpotInstanceShutdown": (ProviderState.FAILED, FailureClass.PREEMPTED),
    # the launch found no capacity: the instance never started, nor anything on it; the core
    # places the attempt again elsewhere and leaves the pool out for a while
    "Server.InsufficientInstanceCapacity": (ProviderState.FAILED, FailureClass.NO_CAPACITY),
    "Server.InternalError": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "Server.ScheduledStop": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "Client.InternalError": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "Client.InstanceInitiatedShutdown": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "Client.VolumeLimitExceeded": (ProviderState.FAILED, FailureClass.PROVIDER_REJECTED),
    "Client.InvalidSnapshot.NotFound": (ProviderState.FAILED, FailureClass.PROVIDER_REJECTED),
    # stowplan cancels an attempt through the agent, never by stopping its instance: one
    # stopped under a claimed attempt by anyone (a person, a stray sweep) lost the attempt
    "Client.UserInitiatedShutdown": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
}
"""Why an instance went away when no exit record says how its attempt ended."""

EXIT_REASONS: dict[str, FailureClass] = {
    "exit": FailureClass.USER_ERROR,
    "outputs": FailureClass.USER_ERROR,
    "timeout": FailureClass.TIMEOUT,
    "setup": FailureClass.NODE_FAILURE,
    "preempted": FailureClass.PREEMPTED,
}
"""The ``reason`` of a non-zero exit record (what the user-data script writes)."""


class ExitRecord(Struct, frozen=True, kw_only=True):
    """What the instance uploads when its attempt ended."""

    key: str
    exit_code: int
    reason: str = "exit"
    started_at: float | None = None
    ended_at: float | None = None


def exit_state(record: ExitRecord) -> tuple[ProviderState, FailureClass | None]:
    if record.exit_code == 0 and record.reason == "exit":
        return ProviderState.SUCCEEDED, None
    return ProviderState.FAILED, EXIT_REASONS.get(record.reason, FailureClass.USER_ERROR)


class AgentStatus(Struct, kw_only=True):
    """An agent's status object (``agents/AGENT/status``), parsed: what it did with the
    attempts sent to it, as far as it uploaded."""

    claimed: set[str] = msgspec.field(default_factory=set)
    refused: set[str] = msgspec.field(default_factory=set)
    """claims S3 refused it (another instance has the attempt)"""
    ended: set[str] = msgspec.field(default_factory=set)
    """attempts whose process ended without recording an exit"""
    exits: dict[str, ExitRecord] = msgspec.field(default_factory=dict)
    noticed: bool = False
    """the spot interruption notice came: it takes nothing new"""


def parse_status(text: str) -> AgentStatus:
    """The lines ``claimed KEY``, ``refused KEY``, ``ended KEY``, ``notice`` and
    ``exit KEY CODE REASON STARTED ENDED``; anything else (a partial last line) is skipped."""
    out = AgentStatus()
    for line in text.splitlines():
        f = line.split()
        if f == ["notice"]:
            out.noticed = True
        elif len(f) == 2 and f[0] in ("claimed", "refused", "ended"):
            getattr(out, f[0]).add(f[1])
        elif len(f) == 6 and f[0] == "exit":
            try:
                code, began, done = int(f[2]), float(f[4]), float(f[5])
            except ValueError:
                continue
            out.exits[f[1]] = ExitRecord(
                key=f[1], exit_code=code, reason=f[3], started_at=began, ended_at=done
            )
    return out


def gone_reason(code: str) -> tuple[ProviderState, FailureClass | None]:
    """An instance gone (or going) without an exit record, by its ``StateReason.Code``: lost
    under its attempt (node failure) unless the code says otherwise."""
    return STATE_REASONS.get(code, (ProviderState.FAILED, FailureClass.NODE_FAILURE))


def instance_state(
    instance: Mapping[str, Any], record: ExitRecord | None
) -> tuple[ProviderState, FailureClass | None, str]:
    """(state, failure class, message) of an attempt from its instance (a ``describe_instances``
    entry) and its exit record, if any. Total."""
    iid = str(instance.get("InstanceId") or "?")
    if record is not None:
        state, failure = exit_state(record)
        how = f"exit code {record.exit_code}" + (
            f" ({record.reason})" if record.reason != "exit" else ""
        )
        return state, failure, f"instance {iid}: {how}"
    name = str((instance.get("State") or {}).get("Name") or "")
    state = INSTANCE_STATES.get(name, ProviderState.UNKNOWN)
    if state is ProviderState.FAILED:
        reason = instance.get("StateReason") or {}
        code = str(reason.get("Code") or "")
        state, failure = gone_reason(code)
        return state, failure, f"instance {iid} {name} without an exit record: {code or '?'}"
    return state, None, f"instance {iid} {name or 'in an unknown state'}"


class ErrorKind(enum.Enum):
    """What an EC2 or S3 error code means for the call that got it."""

    THROTTLED = "throttled"
    """try the same call later (the shell backs off): retryable ``ProviderError``."""
    TRANSIENT = "transient"
    """the service failed this time: retryable ``ProviderError``."""
    NO_CAPACITY = "no_capacity"
    """this (type, zone, market) has no capacity now: mark it unavailable, fail the attempt as
    ``FailureClass.NO_CAPACITY`` (``error_failure``) so the core re-places it with what was
    learned (that pool is left out of the shape's placements for a cool-down)."""
    QUOTA = "quota"
    """the account's quota for the family and market is reached: learn it, fail the attempt as
    ``FailureClass.NO_CAPACITY``: it never ran, and the core places it elsewhere, never
    blindly in the same pool again during the cool-down."""
    UNSUPPORTED = "unsupported"
    """the type cannot run in that zone: never try it there again (an attempt that could go
    nowhere else in the pool: ``FailureClass.NO_CAPACITY``)."""
    ALREADY = "already"
    """the ClientToken was used before: the instance exists; look it up by tag."""
    REJECTED = "rejected"
    """the request itself is wrong (an AMI, a subnet, permissions): ``PROVIDER_REJECTED``."""
    UNKNOWN = "unknown"
    """anything else: the submit's outcome is UNKNOWN (reconciliation finds out)."""


EC2_ERRORS: dict[str, ErrorKind] = {
    "RequestLimitExceeded": ErrorKind.THROTTLED,
    "Throttling": ErrorKind.THROTTLED,
    "ThrottlingException": ErrorKind.THROTTLED,
    "SlowDown": ErrorKind.THROTTLED,
    "InternalError": ErrorKind.TRANSIENT,
    "InternalFailure": ErrorKind.TRANSIENT,
    "ServiceUnavailable": ErrorKind.TRANSIENT,
    "Unavailable": ErrorKind.TRANSIENT,
    "InsufficientInstanceCapacity": ErrorKind.NO_CAPACITY,
    "InsufficientHostCapacity": ErrorKind.NO_CAPACITY,
    "InsufficientCapacity": ErrorKind.NO_CAPACITY,
    "SpotMaxPriceTooLow": ErrorKind.NO_CAPACITY,
    "VcpuLimitExceeded": ErrorKind.QUOTA,
    "MaxSpotInstanceCountExceeded": ErrorKind.QUOTA,
    "InstanceLimitExceeded": ErrorKind.QUOTA,
    "Unsupported": ErrorKind.UNSUPPORTED,
    "IdempotentParameterMismatch": ErrorKind.ALREADY,
    "UnauthorizedOperation": ErrorKind.REJECTED,
    "AuthFailure": ErrorKind.REJECTED,
    "InvalidAMIID.Malformed": ErrorKind.REJECTED,
    "InvalidAMIID.NotFound": ErrorKind.REJECTED,
    "InvalidParameterValue": ErrorKind.REJECTED,
    "InvalidParameterCombination": ErrorKind.REJECTED,
    "InvalidSubnetID.NotFound": ErrorKind.REJECTED,
    "InvalidGroup.NotFound": ErrorKind.REJECTED,
    "InvalidParameter": ErrorKind.REJECTED,
    "MissingParameter": ErrorKind.REJECTED,
    "OptInRequired": ErrorKind.REJECTED,
    "AccessDenied": ErrorKind.REJECTED,
    "NoSuchBucket": ErrorKind.REJECTED,
}


def ec2_error(code: str) -> ErrorKind:
    """What an error code means. Total: an unlisted code is ``ErrorKind.UNKNOWN``."""
    return EC2_ERRORS.get(code, ErrorKind.UNKNOWN)


ERROR_FAILURES: dict[ErrorKind, FailureClass | None] = {
    ErrorKind.THROTTLED: FailureClass.PROVIDER_TRANSIENT,
    ErrorKind.TRANSIENT: FailureClass.PROVIDER_TRANSIENT,
    ErrorKind.NO_CAPACITY: FailureClass.NO_CAPACITY,
    ErrorKind.QUOTA: FailureClass.NO_CAPACITY,
    ErrorKind.UNSUPPORTED: FailureClass.NO_CAPACITY,
    ErrorKind.ALREADY: None,
    ErrorKind.REJECTED: FailureClass.PROVIDER_REJECTED,
    ErrorKind.UNKNOWN: None,
}
"""The class of an attempt whose launch failed with an error of that kind, reported FAILED;
None: not a failure of the attempt (ALREADY: it exists; UNKNOWN: reconciliation finds out)."""


def error_failure(code: str) -> FailureClass | None:
    """The failure class of an attempt whose launch got EC2 error ``code``. Total."""
    return ERROR_FAILURES[ec2_error(code)]
