"""The lifecycle table: every legal move is listed, everything else raises."""

from __future__ import annotations

import itertools

import pytest

from stowplan.errors import InternalError
from stowplan.scheduler.states import (
    ACTIVE,
    FINAL,
    LEASED,
    TRANSITIONS,
    IllegalTransition,
    TaskState,
    Trigger,
    allowed,
    next_state,
)

S, T = TaskState, Trigger
RUN = "f" * 64

ILLEGAL = [(s, t) for s, t in itertools.product(TaskState, Trigger) if (s, t) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "trigger"), sorted(TRANSITIONS))
def test_legal_transitions(state: TaskState, trigger: Trigger) -> None:
    assert allowed(state, trigger)
    assert next_state(RUN, state, trigger) is TRANSITIONS[state, trigger]


@pytest.mark.parametrize(("state", "trigger"), ILLEGAL)
def test_every_other_pair_raises_naming_both(state: TaskState, trigger: Trigger) -> None:
    assert not allowed(state, trigger)
    with pytest.raises(IllegalTransition) as info:
        next_state(RUN, state, trigger)
    err = info.value
    assert isinstance(err, InternalError)
    assert err.state is state and err.trigger is trigger
    assert str(err) == f"run {RUN[:12]}: no transition from {state} on {trigger}"


def test_illegal_pairs_are_most_of_the_table() -> None:
    assert len(ILLEGAL) + len(TRANSITIONS) == len(TaskState) * len(Trigger)
    assert len(TRANSITIONS) == 38


@pytest.mark.parametrize("state", sorted(FINAL))
def test_final_states_have_no_way_out(state: TaskState) -> None:
    assert [t for t in Trigger if allowed(state, t)] == []


def test_state_sets() -> None:
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} == FINAL
    assert {S.SUBMITTING, S.QUEUED, S.RUNNING, S.LOST} == LEASED
    assert LEASED | {S.PLACED} == ACTIVE


def test_every_state_is_reachable_from_pending() -> None:
    seen = {S.PENDING}
    frontier = [S.PENDING]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(TaskState)


def test_every_non_final_state_can_be_cancelled() -> None:
    for s in TaskState:
        if s not in FINAL:
            assert next_state(RUN, s, T.CANCEL) is S.CANCELLED


def test_lost_is_left_only_by_reconciliation_outcomes() -> None:
    exits = {t: dst for (src, t), dst in TRANSITIONS.items() if src is S.LOST}
    assert exits == {
        T.ACCEPTED: S.QUEUED,
        T.STARTED: S.RUNNING,
        T.SUCCEEDED: S.SUCCEEDED,
        T.FAILED: S.FAILED,
        T.RETRY: S.RETRYING,
        T.CANCEL: S.CANCELLED,
    }


def test_the_happy_path() -> None:
    path = [T.DEPS_MET, T.PLACED, T.SUBMIT, T.ACCEPTED, T.STARTED, T.SUCCEEDED]
    s = S.PENDING
    states = []
    for t in path:
        s = next_state(RUN, s, t)
        states.append(s)
    assert states == [S.READY, S.PLACED, S.SUBMITTING, S.QUEUED, S.RUNNING, S.SUCCEEDED]


def test_states_hash_like_their_strings() -> None:
    assert hash(S.READY) == hash("READY")
    by_name: dict[str, int] = {S.READY: 1}
    assert by_name["READY"] == 1
    assert hash(T.CANCEL) == hash("cancel")
