"""Sharing a lab's GPUs between teams: limits, guarantees, borrowing and GPU-hours. Pure.

The core (``core.SchedulerCore``, module doc: *Sharing*) keeps one ``Ledger``: the GPUs each
team holds by model, and the GPU-seconds each team used in the rolling window. Before each
placement it asks ``Ledger.room`` how many GPUs of each model a team's waiting runs may take:

- **maximum**: ``max_gpus[model]`` (``"*"``: all models together) less what the team holds;
- **guarantee and borrowing**: GPUs the lab has free, less what other teams' guarantees still
  owe them *while those teams have runs waiting for that model*. A team is never held back by
  an idle guarantee (it borrows it), and a team whose guarantee is unmet gets the next free
  GPUs of that model before any borrower starts new work. Borrowed GPUs are reclaimed by not
  starting new borrowed work (nothing is preempted). Guarantees are per model: borrowing
  A100s never touches anyone's H100 guarantee.
- **GPU-hours**: a team that used ``gpu_hours`` in the last ``window_s`` seconds (finished
  attempts, and the running ones so far) starts no new GPU run until older use leaves the
  window.

Each answer carries the reason a run waits, in words ``stowplan status`` shows. Everything is
ordered by name, so the same state gives the same answer.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping

from msgspec import Struct, field

ANY = "*"
"""In ``TeamLimits.max_gpus``: all GPU models together."""


class TeamLimits(Struct, frozen=True, kw_only=True):
    """What one team may use (``[service.teams.NAME]``)."""

    guaranteed_gpus: dict[str, int] = field(default_factory=dict)
    """GPU model -> GPUs the team gets before anyone borrows them."""
    max_gpus: dict[str, int] = field(default_factory=dict)
    """GPU model (or ``"*"``) -> the most GPUs the team may hold at once."""
    gpu_hours: float | None = None
    """GPU-hours the team may use per ``window_s``; None: no limit."""
    window_s: float = 7 * 86400.0
    weight: float = 1.0
    """the team's share in fair-share ordering: usage is divided by it."""
    monthly_usd: float | None = None
    """dollars the team's runs may cost on priced (cloud) pools per calendar month (UTC);
    None: no limit."""


class Approvals(Struct, frozen=True, kw_only=True):
    """Where someone can approve (the shared-lab service): runs a budget would hold, or that
    the placer put on a restricted provider's pool, wait in ``AWAITING_APPROVAL`` with the
    reason instead (core module doc: *Approvals*)."""

    restricted: tuple[str, ...] = ()
    """``[service] restricted``: providers whose pools a run may use only once approved."""


class Room(Struct, frozen=True):
    """GPUs a team may still take, by model (a model absent: no limit from sharing), and why
    it may take none of a model."""

    gpus: dict[str, float]
    why: dict[str, str]


class Ledger:
    """What each team holds and has used (see the module doc)."""

    def __init__(self, teams: Mapping[str, TeamLimits]) -> None:
        self.teams = dict(teams)
        self.held: dict[str, Counter[str]] = {}
        """team -> model -> GPUs its leased runs hold."""
        self._used: dict[str, deque[tuple[float, float]]] = {}
        """team -> (when an attempt ended, its GPU-seconds), oldest first."""
        self._running: dict[str, dict[str, tuple[float, int]]] = {}
        """team -> run id -> (when it started, GPUs): counted into the window as it runs."""
        self.spent_usd: dict[str, float] = {}
        """team -> dollars recorded for its attempts this month (``set_spent``)."""
        self.committed_usd: dict[str, float] = {}
        """team -> estimated dollars of its runs leased on priced pools now."""

    # -- bookkeeping ----------------------------------------------------------------------

    def take(self, team: str, model: str, gpus: int) -> None:
        self.held.setdefault(team, Counter())[model] += gpus

    def give_back(self, team: str, model: str, gpus: int) -> None:
        held = self.held.get(team)
        if held is not None:
            held[model] -= gpus
            if held[model] <= 0:
                del held[model]

    def started(self, team: str, run_id: str, gpus: int, now: float) -> None:
        if gpus and self.teams.get(team, TeamLimits()).gpu_hours is not None:
            self._running.setdefault(team, {})[run_id] = (now, gpus)

    def ended(self, team: str, run_id: str, now: float) -> None:
        running = self._running.get(team)
        if running is None or run_id not in running:
            return
        since, gpus = running.pop(run_id)
        self._used.setdefault(team, deque()).append((now, gpus * max(0.0, now - since)))

    def gpu_seconds(self, team: str, now: float) -> float:
        """GPU-seconds ``team`` used in its window up to ``now``."""
        limits = self.teams.get(team)
        if limits is None:
            return 0.0
        used = self._used.get(team)
        start = now - limits.window_s
        while used and used[0][0] < start:
            used.popleft()
        done = sum(s for _, s in used) if used else 0.0
        live = sum(
            g * max(0.0, now - max(since, start))
            for since, g in self._running.get(team, {}).values()
        )
        return done + live

    def set_spent(self, spent: Mapping[str, float]) -> None:
        """What the store recorded as spent this month, per team (the service sums it); a
        team left out spent nothing."""
        self.spent_usd = {t: float(v) for t, v in spent.items()}

    # -- decisions ------------------------------------------------------------------------

    def over_month(self, team: str, more_usd: float, also_usd: float = 0.0) -> str | None:
        """Why ``more_usd`` more for ``team`` would break its ``monthly_usd``; None if not.
        ``also_usd``: what the team's runs placed before this one in the same answer add."""
        limits = self.teams.get(team)
        if limits is None or limits.monthly_usd is None:
            return None
        spent = self.spent_usd.get(team, 0.0)
        running = max(0.0, self.committed_usd.get(team, 0.0)) + also_usd
        if spent + running + more_usd <= limits.monthly_usd + 1e-9:
            return None
        return (
            f"held: team {team}'s monthly cloud spend of ${limits.monthly_usd:,.2f} would be "
            f"exceeded (${spent:,.2f} spent this month, ${running:,.2f} running, this run "
            f"${more_usd:,.2f} more); raise [service.teams.{team}] monthly_usd, or a team admin "
            "approves it"
        )

    def room(
        self,
        team: str,
        models: Iterable[str],
        free: Mapping[str, int],
        waiting: Mapping[str, Counter[str]],
        now: float,
        offered: Mapping[str, Counter[str]] | None = None,
    ) -> Room:
        """GPUs of each of ``models`` that ``team`` may take now. ``free``: the lab's free
        GPUs by model; ``waiting``: team -> model -> GPUs its READY runs could use;
        ``offered``: team -> GPUs by model already offered to it in this placement round."""
        limits = self.teams.get(team)
        if limits is None:
            return Room({}, {})
        offered = offered or {}

        def holds(t: str) -> Counter[str]:
            return self.held.get(t, Counter()) + offered.get(t, Counter())

        held = holds(team)
        gpus: dict[str, float] = {}
        why: dict[str, str] = {}
        if limits.gpu_hours is not None:
            used_h = self.gpu_seconds(team, now) / 3600
            if used_h >= limits.gpu_hours:
                text = (
                    f"team {team} used {used_h:.1f} of its {limits.gpu_hours:g} GPU-hours "
                    f"in the last {span_text(limits.window_s)}"
                )
                return Room({m: 0.0 for m in models}, {m: text for m in models})
        total_left = math.inf
        if ANY in limits.max_gpus:
            total_left = limits.max_gpus[ANY] - sum(held.values())
        for m in sorted(set(models)):
            left = total_left
            reason = f"team {team} holds {sum(held.values())} GPUs, its maximum (max_gpus.*)"
            if m in limits.max_gpus and limits.max_gpus[m] - held[m] < left:
                left = limits.max_gpus[m] - held[m]
                reason = f"team {team} holds {held[m]} {m} GPUs, its maximum"
            owed = {
                other: min(
                    max(0, lim.guaranteed_gpus.get(m, 0) - holds(other)[m]),
                    waiting.get(other, Counter())[m],
                )
                for other, lim in sorted(self.teams.items())
                if other != team
            }
            reserved = sum(owed.values())
            mine = max(0, limits.guaranteed_gpus.get(m, 0) - held[m])
            lendable = free.get(m, 0) - reserved
            if reserved and lendable < mine:
                lendable = min(free.get(m, 0), mine)
            if lendable < left:
                left = lendable
                owners = ", ".join(f"{o} ({n})" for o, n in owed.items() if n)
                reason = (
                    f"{m} GPUs free: {free.get(m, 0)}, of which {reserved} are guaranteed to "
                    f"teams with runs waiting: {owners}"
                    if reserved
                    else f"no {m} GPU free"
                )
            if left < math.inf:
                gpus[m] = max(0.0, float(left))
                if gpus[m] <= 0:
                    why[m] = reason
        return Room(gpus, why)


def span_text(seconds: float) -> str:
    """``86400`` -> ``1d``, ``7200`` -> ``2h``, ``90`` -> ``90s``: a window for people."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
