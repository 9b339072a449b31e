"""The Slurm state table and its one total lookup function."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stowplan.providers.slurm.states import SLURM_STATES, normalize_state, slurm_state
from stowplan.scheduler.reports import ProviderState
from stowplan.spec.models import FailureClass


def test_failure_classes() -> None:
    expect = {
        "PREEMPTED": (ProviderState.FAILED, FailureClass.PREEMPTED),
        "NODE_FAIL": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
        "BOOT_FAIL": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
        "OUT_OF_MEMORY": (ProviderState.FAILED, FailureClass.OUT_OF_MEMORY),
        "TIMEOUT": (ProviderState.FAILED, FailureClass.TIMEOUT),
        "DEADLINE": (ProviderState.FAILED, FailureClass.TIMEOUT),
        "FAILED": (ProviderState.FAILED, FailureClass.USER_ERROR),
        "CANCELLED": (ProviderState.CANCELLED, None),
        "COMPLETED": (ProviderState.SUCCEEDED, None),
        "PENDING": (ProviderState.QUEUED, None),
        "RUNNING": (ProviderState.RUNNING, None),
        "COMPLETING": (ProviderState.RUNNING, None),
    }
    for raw, mapped in expect.items():
        assert slurm_state(raw) == mapped, raw


def test_spellings_from_squeue_and_sacct() -> None:
    assert normalize_state("CANCELLED by 0") == "CANCELLED"
    assert normalize_state("COMPLETING+") == "COMPLETING"
    assert normalize_state("oom") == "OUT_OF_MEMORY"
    assert normalize_state("TO") == "TIMEOUT"
    assert slurm_state("CANCELLED by 1234") == (ProviderState.CANCELLED, None)


def test_completed_with_nonzero_exit_is_a_user_error() -> None:
    assert slurm_state("COMPLETED", 2) == (ProviderState.FAILED, FailureClass.USER_ERROR)
    assert slurm_state("COMPLETED", 0) == (ProviderState.SUCCEEDED, None)


def test_unknown_states_are_unknown() -> None:
    assert slurm_state("SOME_FUTURE_STATE") == (ProviderState.UNKNOWN, None)
    assert slurm_state("") == (ProviderState.UNKNOWN, None)


def test_every_failed_state_has_a_failure_class() -> None:
    for raw, (state, failure) in SLURM_STATES.items():
        assert (state is ProviderState.FAILED) == (failure is not None), raw


@given(st.text(max_size=30), st.one_of(st.none(), st.integers(-300, 300)))
def test_total(raw: str, code: int | None) -> None:
    state, failure = slurm_state(raw, code)
    assert isinstance(state, ProviderState)
    assert failure is None or isinstance(failure, FailureClass)
