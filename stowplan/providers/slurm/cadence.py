"""When the Slurm driver looks again: polls spaced by what is expected to change.

Every poll is one remote command (the elements' end records, ``squeue``, and ``sacct`` only
when an element left the queue without an end record), so a poll that sees nothing new is
pure cost, and a poll long after the last element ended is pure delay. (Over SSH the driver
also waits the last seconds of each delay on the cluster, answering as soon as every element
has ended, so the delay bounds the cost more than the latency.) A sweep of N elements ends
when its last element ends, so the poll that matters most is the one just after that; the
others only pass completions on early (to dependents and retries) and renew leases.
``next_poll`` picks the delay from what was seen:

- a completion rate ``r`` (elements per second over the recent polls): the live elements are
  expected to end in ``eta = live / r``; poll after ``ETA_SHARE x eta``. The delays shrink
  geometrically as the end nears, so a sweep of T seconds costs about
  ``log(T / poll_min) / log(1 / (1 - ETA_SHARE))`` polls (about 15 for T = 220 s) and its end
  is seen within ``poll_min`` or a small share of T.
- no rate yet, but elements running and a runtime seen (the mean of ended elements): poll when
  the first running element is expected to end.
- nothing known: back off from ``poll_min``, doubling per quiet poll, to ``poll_max``.

Predicted delays may exceed ``poll_max`` up to ``cap`` (the watch passes half the lease
renewal period, so leases stay fresh); the blind backoff never does. ``Progress`` keeps what
the rate and the runtime are computed from; it is fed the reports of each describe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from stowplan.providers.base import TERMINAL_PROVIDER_STATES, ProviderState, Report

ETA_SHARE = 0.3
"""Of the expected time until every live element has ended, the share to wait."""
RATE_WINDOW_S = 60.0
"""Completions over about this many recent seconds give the rate."""


def next_poll(
    *,
    live: int,
    rate: float | None,
    first_end_s: float | None,
    quiet: int,
    poll_min: float,
    poll_max: float,
    cap: float,
) -> float:
    """Seconds until the next poll (module doc). ``live``: elements not yet ended; ``rate``:
    elements ending per second lately (``None``: none ended lately); ``first_end_s``: seconds
    until the first running element is expected to end (``None``: unknown); ``quiet``: polls
    in a row that saw no change."""
    cap = max(cap, poll_min)
    if live <= 0:
        return poll_max
    if rate is not None and rate > 0:
        return min(cap, max(poll_min, ETA_SHARE * live / rate))
    if first_end_s is not None:
        return min(cap, max(poll_min, first_end_s))
    return min(poll_max, poll_min * 2.0 ** max(0, quiet))


class Progress:
    """What ``next_poll`` needs, from the reports of successive describes (one watch's)."""

    def __init__(self) -> None:
        self.ended = 0
        """elements seen ending, in all"""
        self.quiet = 0
        self._marks: deque[tuple[float, int]] = deque()
        """(poll time, ``ended`` then), recent polls only"""
        self._runtime_sum = 0.0
        self._runtimes = 0
        self._last: dict[str, ProviderState] = {}

    def observe(self, reports: Sequence[Report], now: float) -> None:
        """Count the changes ``reports`` (one describe, at ``now`` on a monotonic clock) show."""
        changed = False
        ended = 0
        for r in reports:
            prev = self._last.get(r.key)
            if r.state is prev:
                continue
            changed = True
            if r.state in TERMINAL_PROVIDER_STATES:
                ended += 1
                self._last.pop(r.key, None)
                if r.started_at is not None and r.ended_at is not None:
                    self._runtime_sum += max(0.0, r.ended_at - r.started_at)
                    self._runtimes += 1
            else:
                self._last[r.key] = r.state
        self.ended += ended
        self.quiet = 0 if changed else self.quiet + 1
        marks = self._marks
        marks.append((now, self.ended))
        while len(marks) > 2 and now - marks[1][0] >= RATE_WINDOW_S:
            marks.popleft()

    def forget(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._last.pop(k, None)

    def rate(self) -> float | None:
        """Elements ending per second over the recent polls; ``None`` if none ended there."""
        if len(self._marks) < 2:
            return None
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        if n1 <= n0 or t1 <= t0:
            return None
        return (n1 - n0) / (t1 - t0)

    @property
    def runtime_s(self) -> float | None:
        """The mean runtime of the elements seen ending with both times known."""
        return self._runtime_sum / self._runtimes if self._runtimes else None

    def first_end_s(self, reports: Sequence[Report], wall_now: float) -> float | None:
        """Seconds until the first running element of ``reports`` is expected to end (its
        start plus the mean runtime; ``wall_now`` on the epoch clock, as Slurm's times)."""
        runtime = self.runtime_s
        if runtime is None:
            return None
        starts = [
            r.started_at
            for r in reports
            if r.state is ProviderState.RUNNING and r.started_at is not None
        ]
        if not starts:
            return None
        return max(0.0, min(starts) + runtime - wall_now)
