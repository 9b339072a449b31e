"""When the Slurm driver polls: ``cadence.next_poll`` and the ``Progress`` it reads."""

from __future__ import annotations

import math

import pytest

from stowplan.providers.base import ProviderState, Report
from stowplan.providers.slurm.cadence import ETA_SHARE, Progress, next_poll

LIMITS = {"poll_min": 1.0, "poll_max": 30.0, "cap": 112.5}


def test_nothing_known_backs_off_to_poll_max() -> None:
    delays = [next_poll(live=10, rate=None, first_end_s=None, quiet=q, **LIMITS) for q in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_rate_waits_a_share_of_the_expected_end() -> None:
    # 900 elements left at 4.5 a second: they end in 200 s; wait a share (within the cap)
    assert next_poll(live=900, rate=4.5, first_end_s=None, quiet=0, **LIMITS) == pytest.approx(
        ETA_SHARE * 200.0
    )
    # far ends are looked at by the cap (half the lease renewal), not the blind poll_max
    assert next_poll(live=5000, rate=1.0, first_end_s=None, quiet=0, **LIMITS) == 112.5
    # the last few: at the floor
    assert next_poll(live=2, rate=4.5, first_end_s=None, quiet=0, **LIMITS) == 1.0


def test_a_sweep_costs_about_the_log_of_its_length_in_polls() -> None:
    """A steady array of 1,000 elements ending 4.5 a second (220 s, as the raw array on the
    test cluster): polls by the cadence see its end within poll_min, in few polls."""
    rate, total, t, polls = 4.5, 1000, 0.0, 0
    while True:
        live = max(0, total - math.floor(t * rate))
        if live == 0:
            break
        t += next_poll(live=live, rate=rate, first_end_s=None, quiet=0, **LIMITS)
        polls += 1
    end = total / rate
    assert t - end <= LIMITS["poll_min"]
    assert polls <= 18  # with discovery and the submit: at most 0.02 commands per trial


def test_an_expected_end_is_waited_for_when_no_rate_is_known() -> None:
    assert next_poll(live=32, rate=None, first_end_s=600.0, quiet=3, **LIMITS) == 112.5
    assert next_poll(live=32, rate=None, first_end_s=40.0, quiet=3, **LIMITS) == 40.0
    assert next_poll(live=32, rate=None, first_end_s=0.0, quiet=3, **LIMITS) == 1.0
    assert next_poll(live=0, rate=None, first_end_s=None, quiet=0, **LIMITS) == 30.0


def report(
    key: str, state: ProviderState, start: float | None = None, end: float | None = None
) -> Report:
    return Report(key=key, state=state, started_at=start, ended_at=end)


def test_progress_measures_the_rate_and_the_runtime() -> None:
    p = Progress()
    running = [report(f"k{i}", ProviderState.RUNNING, start=1000.0) for i in range(4)]
    p.observe(running, 0.0)
    assert p.rate() is None and p.runtime_s is None and p.quiet == 0
    p.observe(running, 5.0)  # nothing changed
    assert p.quiet == 1 and p.rate() is None
    done = [report("k0", ProviderState.SUCCEEDED, 1000.0, 1030.0)]
    done.append(report("k1", ProviderState.FAILED, 1000.0, 1050.0))
    p.observe([*done, *running[2:]], 10.0)
    assert p.ended == 2 and p.quiet == 0
    assert p.rate() == pytest.approx(2 / 10.0)
    assert p.runtime_s == pytest.approx(40.0)
    # the first running element started at 1000 and elements take 40 s: it ends at 1040
    assert p.first_end_s(running[2:], 1030.0) == pytest.approx(10.0)
    assert p.first_end_s([], 1030.0) is None


def test_the_rate_follows_recent_polls_only() -> None:
    p = Progress()
    p.observe([], 0.0)
    p.observe([report(f"a{i}", ProviderState.SUCCEEDED) for i in range(100)], 10.0)
    assert p.rate() == pytest.approx(10.0)
    for t in (80.0, 150.0, 220.0):  # nothing more ends: the old burst leaves the window
        p.observe([], t)
    assert p.rate() is None


def test_accounting_is_needed_once_an_element_waited_on_leaves_pending_or_running() -> None:
    from stowplan.providers.slurm.parse import JobRow, all_active

    rows = [
        JobRow(job_id="7", index=0, name="a", state="RUNNING"),
        JobRow(job_id="7", index=1, name="a", state="PENDING"),
        JobRow(job_id="7", index=2, name="a", state="COMPLETING"),
    ]
    assert all_active(rows, ["7_0", "7_1"])
    assert not all_active(rows, ["7_0", "7_2"])  # ending: its final state is in sacct
    assert not all_active(rows, ["7_0", "7_3"])  # gone from the queue
