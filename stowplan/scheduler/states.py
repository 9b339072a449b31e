"""The task lifecycle, as a table.

Theory of operation
-------------------
A run moves through these states; each arrow is one (state, trigger) entry in ``TRANSITIONS``,
and nothing else moves it. An event that has no entry for the run's state raises
``IllegalTransition`` naming both, so a bug shows up where it happens instead of as a wrong
count later::

    PENDING -> READY -> PLACED -> SUBMITTING -> QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
                 ^                     |            |         |
                 +---- RETRYING <------+------------+---------+   (infrastructure failures)
    SUBMITTING | QUEUED | RUNNING --lease expired--> LOST --reconciled--> RUNNING | ... | RETRYING
    READY --asks--> AWAITING_APPROVAL --approved--> READY    (--rejected--> CANCELLED)

Invariants the core keeps (and the property tests check):

- a run is in exactly one state; SUCCEEDED, FAILED and CANCELLED are final;
- a run holds a capacity lease exactly while it is SUBMITTING, QUEUED, RUNNING or LOST;
- every attempt has its own idempotency key, used for exactly one Submit (a resubmit of the
  same key happens only after a restore, when the provider has never heard of it);
- attempts that ran never exceed the retry policy's ``max_attempts`` (``no_capacity`` attempts,
  which never ran, are bounded by ``CoreConfig.max_replaces`` instead).
"""

from __future__ import annotations

import enum

from stowplan.errors import InternalError


class TaskState(enum.StrEnum):
    # the core hashes states millions of times; Enum's own __hash__ is Python-level
    __hash__ = str.__hash__

    PENDING = "PENDING"
    READY = "READY"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    PLACED = "PLACED"
    SUBMITTING = "SUBMITTING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    LOST = "LOST"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class Trigger(enum.StrEnum):
    __hash__ = str.__hash__

    DEPS_MET = "deps_met"
    DEP_FAILED = "dep_failed"
    PLACED = "placed"
    SUBMIT = "submit"
    ACCEPTED = "accepted"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"
    BACKOFF_DONE = "backoff_done"
    LEASE_EXPIRED = "lease_expired"
    CANCEL = "cancel"
    ASK_APPROVAL = "ask_approval"
    APPROVED = "approved"
    REJECTED = "rejected"


FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
LEASED = frozenset({TaskState.SUBMITTING, TaskState.QUEUED, TaskState.RUNNING, TaskState.LOST})
ACTIVE = LEASED | {TaskState.PLACED}
WAITING = (
    TaskState.PENDING,
    TaskState.READY,
    TaskState.AWAITING_APPROVAL,
    TaskState.PLACED,
    TaskState.SUBMITTING,
    TaskState.QUEUED,
    TaskState.RETRYING,
    TaskState.LOST,
)
"""States of a run that is not running yet and not final (in this order, for tables)."""

S, T = TaskState, Trigger
TRANSITIONS: dict[tuple[TaskState, Trigger], TaskState] = {
    (S.PENDING, T.DEPS_MET): S.READY,
    (S.PENDING, T.DEP_FAILED): S.FAILED,
    (S.PENDING, T.CANCEL): S.CANCELLED,
    (S.READY, T.PLACED): S.PLACED,
    (S.READY, T.CANCEL): S.CANCELLED,
    (S.READY, T.FAILED): S.FAILED,  # no pool can ever run it
    (S.READY, T.ASK_APPROVAL): S.AWAITING_APPROVAL,  # a budget, a restricted pool
    (S.AWAITING_APPROVAL, T.APPROVED): S.READY,
    (S.AWAITING_APPROVAL, T.REJECTED): S.CANCELLED,
    (S.AWAITING_APPROVAL, T.CANCEL): S.CANCELLED,
    (S.PLACED, T.SUBMIT): S.SUBMITTING,
    (S.PLACED, T.CANCEL): S.CANCELLED,
    (S.SUBMITTING, T.ACCEPTED): S.QUEUED,
    (S.SUBMITTING, T.STARTED): S.RUNNING,
    (S.SUBMITTING, T.SUCCEEDED): S.SUCCEEDED,
    (S.SUBMITTING, T.FAILED): S.FAILED,
    (S.SUBMITTING, T.RETRY): S.RETRYING,
    (S.SUBMITTING, T.LEASE_EXPIRED): S.LOST,
    (S.SUBMITTING, T.CANCEL): S.CANCELLED,
    (S.QUEUED, T.STARTED): S.RUNNING,
    (S.QUEUED, T.SUCCEEDED): S.SUCCEEDED,
    (S.QUEUED, T.FAILED): S.FAILED,
    (S.QUEUED, T.RETRY): S.RETRYING,
    (S.QUEUED, T.LEASE_EXPIRED): S.LOST,
    (S.QUEUED, T.CANCEL): S.CANCELLED,
    (S.RUNNING, T.SUCCEEDED): S.SUCCEEDED,
    (S.RUNNING, T.FAILED): S.FAILED,
    (S.RUNNING, T.RETRY): S.RETRYING,
    (S.RUNNING, T.LEASE_EXPIRED): S.LOST,
    (S.RUNNING, T.CANCEL): S.CANCELLED,
    (S.LOST, T.ACCEPTED): S.QUEUED,
    (S.LOST, T.STARTED): S.RUNNING,
    (S.LOST, T.SUCCEEDED): S.SUCCEEDED,
    (S.LOST, T.FAILED): S.FAILED,
    (S.LOST, T.RETRY): S.RETRYING,
    (S.LOST, T.CANCEL): S.CANCELLED,
    (S.RETRYING, T.BACKOFF_DONE): S.READY,
    (S.RETRYING, T.CANCEL): S.CANCELLED,
}
del S, T


class IllegalTransition(InternalError):
    def __init__(self, run_id: str, state: TaskState, trigger: Trigger) -> None:
        self.state = state
        self.trigger = trigger
        super().__init__(f"run {run_id[:12]}: no transition from {state} on {trigger}")


def next_state(run_id: str, state: TaskState, trigger: Trigger) -> TaskState:
    try:
        return TRANSITIONS[state, trigger]
    except KeyError:
        raise IllegalTransition(run_id, state, trigger) from None


def allowed(state: TaskState, trigger: Trigger) -> bool:
    return (state, trigger) in TRANSITIONS
