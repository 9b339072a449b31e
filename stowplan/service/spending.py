"""Each team's cloud spend this month, summed from the run store for the control plane.

The store records dollars per attempt on priced (cloud) pools; which team an experiment
belongs to is the service's to know (``People.experiments_of``). ``TeamSpending`` sums, per
team, the dollars of the attempts of its experiments that started this calendar month (UTC),
and hands them to the core (``ControlPlane.set_team_spending``) at start and every
``every_s`` seconds, so ``[service.teams.NAME] monthly_usd`` holds a team's runs once its
month is spent and a new month starts from nothing. What the core adds on top, the estimates
of runs leased now, is its own (``share.Ledger.over_month``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stowplan.actors.store import month_start

__all__ = ["EVERY_S", "TeamSpending", "month_start", "team_spending"]

log = logging.getLogger(__name__)

EVERY_S = 60.0
"""Seconds between sums: a cloud attempt's cost is recorded when it ends."""


def team_spending(store: Any, people: Any, teams: Sequence[str], now: float) -> dict[str, float]:
    """Team -> dollars its experiments' attempts cost since this month began."""
    since = month_start(now)
    out = {}
    for team in sorted(teams):
        experiments = sorted(people.experiments_of({team}))
        costs = store.cost_by_experiment(experiments, since=since) if experiments else {}
        out[team] = round(sum(costs.values()), 6)
    return out


class TeamSpending:
    """A daemon thread that keeps the core's team spending current."""

    def __init__(
        self, store_path: Path, people: Any, plane: Any, teams: Sequence[str], every_s: float
    ) -> None:
        self.store_path = store_path
        self.people = people
        self.plane = plane
        self.teams = list(teams)
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="team-spending", daemon=True)

    def start(self) -> None:
        self.push()  # before the first request: a team over its month is held from the start
        self._thread.start()

    def push(self) -> None:
        from stowplan.provenance.store import RunStore

        with RunStore(self.store_path) as store:
            spent = team_spending(store, self.people, self.teams, time.time())
        self.plane.set_team_spending(spent)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.push()
            except Exception:  # the next round tries again; the service goes on
                log.exception("could not sum the teams' cloud spend")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
