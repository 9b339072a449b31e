"""The service's Prometheus metrics (``GET /metrics``, text exposition format, open like
``/healthz``): what the lab's operators graph and alert on.

Each application has its own ``CollectorRegistry`` (never the process-global one), so two
apps in one process (the tests) count apart. Two kinds of metric live in it:

- read from the run store when scraped, by :class:`StoreCollector` over its own read-only
  SQLite connection (the writer is never blocked): runs by state, queue lengths per team,
  placement solve time and gap, provider errors, lease expiries. The store is the truth the
  control plane's actors write to, so these survive a restart of the service unchanged;
- measured in this process by :class:`MetricsMiddleware`: HTTP requests and their latency.

NOTE: what the control plane's actors measure in their own processes (the latency of each
provider API call, solves that placed nothing) is not recorded anywhere the service can read,
so it is not exported: the provider metric counts attempts that failed with a provider error
class, and solve time covers the decisions that placed at least one run.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from litestar import Request, Response, get
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from stowplan.scheduler import states
from stowplan.service import logs

if TYPE_CHECKING:
    from stowplan.service.app import ServiceState

log = logging.getLogger(__name__)

__all__ = ["Metrics", "MetricsMiddleware", "StoreCollector", "metrics", "metrics_of", "on_shutdown"]

WAITING: Final = tuple(str(s) for s in states.WAITING)
"""States of a run that is in a queue (not yet running, not final)."""
ALL_STATES: Final = (*WAITING, "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
PROVIDER_FAILURES: Final = ("provider_transient", "provider_rejected", "no_capacity")
NO_TEAM: Final = "-"
"""The ``team`` label of runs no team submitted through the service (``stowplan run``)."""
_SOLVES_CACHED: Final = 4096


class StoreCollector(Collector):
    """Reads the run store (and the service's owners table) at every scrape."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._lost_seq = 0
        self._lost = 0
        self._solves: dict[str, tuple[float, float, str]] = {}
        """blob sha -> (solve seconds, gap, status): blobs never change."""

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            path = Path(self.state.store.path).resolve()
            self._conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10.0
            )
        return self._conn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one read of the run store (the dashboard's aggregates)."""
        with self._lock:
            return self._db().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                yield from self._collect()
            except sqlite3.Error as e:  # a scrape must not fail the service
                log.warning("metrics: cannot read the run store: %s", e)
                up = GaugeMetricFamily("stowplan_store_up", "1 when the run store could be read")
                up.add_metric([], 0.0)
                yield up

    def _teams(self) -> dict[str, str]:
        """experiment id -> the team that submitted it (the first, by name)."""
        out: dict[str, str] = {}
        for team in sorted(self.state.config.teams, reverse=True):
            for e in self.state.people.experiments_of({team}):
                out[e] = team
        return out

    def _collect(self) -> Iterator[Metric]:
        db = self._db()
        teams = self._teams()
        rows = db.execute(
            "SELECT experiment_id, state, count(*) FROM runs GROUP BY experiment_id, state"
        ).fetchall()
        up = GaugeMetricFamily("stowplan_store_up", "1 when the run store could be read")
        up.add_metric([], 1.0)
        yield up

        by_state = dict.fromkeys(ALL_STATES, 0)
        queue: dict[tuple[str, str], int] = {}
        running: dict[str, int] = {}
        for experiment_id, state, n in rows:
            by_state[state] = by_state.get(state, 0) + n
            team = teams.get(experiment_id, NO_TEAM)
            if state in WAITING:
                queue[(team, state)] = queue.get((team, state), 0) + n
            elif state == "RUNNING":
                running[team] = running.get(team, 0) + n
        g = GaugeMetricFamily("stowplan_runs", "Runs in the store by state", labels=["state"])
        for state, n in sorted(by_state.items()):
            g.add_metric([state], n)
        yield g

        known = [*sorted(self.state.config.teams), NO_TEAM]
        q = GaugeMetricFamily(
            "stowplan_queue_length",
            "Runs of each team waiting in a queue (not running, not finished), by state",
            labels=["team", "state"],
        )
        for team in known:
            for state in WAITING:
                q.add_metric([team, state], queue.get((team, state), 0))
        yield q
        r = GaugeMetricFamily(
            "stowplan_team_running_runs", "Runs of each team running now", labels=["team"]
        )
        for team in known:
            r.add_metric([team], running.get(team, 0))
        yield r

        yield from self._placement(db)
        yield from self._providers(db)

        n, top = db.execute(
            "SELECT count(*), max(seq) FROM events WHERE seq > ? AND to_state = 'LOST'",
            (self._lost_seq,),
        ).fetchone()
        if n:
            self._lost += int(n)
            self._lost_seq = int(top)
        lost = CounterMetricFamily(
            "stowplan_lease_expiries",
            "Attempts whose capacity lease expired (the run went LOST to be reconciled)",
        )
        lost.add_metric([], self._lost)
        yield lost

    def _placement(self, db: sqlite3.Connection) -> Iterator[Metric]:
        decisions = db.execute(
            "SELECT problem, max(at), max(gap), min(status) FROM placements GROUP BY problem "
            "ORDER BY max(at)"
        ).fetchall()
        count = 0
        total = 0.0
        last: tuple[float, float, str] | None = None
        for sha, _at, gap, status in decisions:
            seconds = self._solve_seconds(str(sha))
            if seconds is None:
                continue
            count += 1
            total += seconds
            last = (seconds, float(gap), str(status))
        s = CounterMetricFamily(
            "stowplan_placement_solve_seconds",
            "Time the placement solver took, over its decisions that placed runs",
        )
        s.add_metric([], total)
        yield s
        c = CounterMetricFamily("stowplan_placement_solves", "Placement decisions that placed runs")
        c.add_metric([], count)
        yield c
        ls = GaugeMetricFamily(
            "stowplan_placement_last_solve_seconds", "Solve time of the newest placement decision"
        )
        lg = GaugeMetricFamily(
            "stowplan_placement_last_gap",
            "Relative optimality gap of the newest placement decision (0: proven optimal)",
        )
        if last is not None:
            ls.add_metric([], last[0])
            lg.add_metric([], last[1])
        yield ls
        yield lg

    def _solve_seconds(self, sha: str) -> float | None:
        hit = self._solves.get(sha)
        if hit is not None:
            return hit[0]
        from stowplan.placement.problem import PlacementProblem, PlacementSolution

        try:
            blob = self.state.store.get_blob(sha)
            _, sol = msgspec.msgpack.decode(blob, type=tuple[PlacementProblem, PlacementSolution])
        except Exception as e:  # a missing or unreadable blob drops one decision, says so
            log.warning("metrics: placement decision %s is unreadable: %s", sha[:12], e)
            return None
        if len(self._solves) >= _SOLVES_CACHED:
            self._solves.pop(next(iter(self._solves)))
        self._solves[sha] = (sol.solve_seconds, sol.gap, str(sol.status))
        return sol.solve_seconds

    def _providers(self, db: sqlite3.Connection) -> Iterator[Metric]:
        marks = ", ".join("?" * len(PROVIDER_FAILURES))
        rows = db.execute(
            f"SELECT provider, failure, count(*) FROM attempts WHERE failure IN ({marks}) "
            "GROUP BY provider, failure",
            PROVIDER_FAILURES,
        ).fetchall()
        counts = {(str(p), str(f)): int(n) for p, f, n in rows}
        for name in self.state.project.config.providers:
            for f in PROVIDER_FAILURES:
                counts.setdefault((name, f), 0)
        e = CounterMetricFamily(
            "stowplan_provider_errors",
            "Attempts a provider failed (its API rejected or lost them, or had no capacity)",
            labels=["provider", "failure"],
        )
        for (p, f), n in sorted(counts.items()):
            e.add_metric([p, f], n)
        yield e
        att = db.execute(
            "SELECT provider, count(*), sum(CASE WHEN started_at IS NOT NULL "
            "THEN started_at - intent_at END), count(started_at) FROM attempts GROUP BY provider"
        ).fetchall()
        a = CounterMetricFamily(
            "stowplan_provider_attempts", "Attempts handed to each provider", labels=["provider"]
        )
        w = SummaryMetricFamily(
            "stowplan_provider_start_seconds",
            "Seconds from an attempt's write-ahead intent until its provider reported it "
            "started, over the attempts that started",
            labels=["provider"],
        )
        for provider, n, waited, started in att:
            a.add_metric([str(provider)], n)
            w.add_metric([str(provider)], count_value=started, sum_value=float(waited or 0.0))
        yield a
        yield w


class Metrics:
    """One application's registry and the metrics measured in this process."""

    def __init__(self, state: ServiceState) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.store = StoreCollector(state)
        self.registry.register(self.store)
        self.requests = Counter(
            "stowplan_http_requests",
            "HTTP requests answered, by method, route and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "stowplan_http_request_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.up_since = time.time()

    def render(self) -> bytes:
        return generate_latest(self.registry)


_lock = threading.Lock()


def metrics_of(app_state: Any) -> Metrics:
    """The application's ``Metrics``, made at first use and kept on ``app.state``."""
    with _lock:
        m: Metrics | None = app_state.get("metrics")
        if m is None:
            m = Metrics(app_state["service"])
            app_state["metrics"] = m
        return m


@get("/metrics", sync_to_thread=True, include_in_schema=False)
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus' text exposition format."""
    body = metrics_of(request.app.state).render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (``/api/v1/runs/{ref:str}``
    rather than each run's path, so labels stay few)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        logged = False

        def log_access() -> None:
            # when the answer starts, as uvicorn's access log did: a followed log (server-sent
            # events) may stream for hours, and its line is wanted when it begins
            nonlocal logged
            logged = True
            client = scope.get("client")
            logs.access(
                str(scope.get("method", "GET")),
                str(scope.get("path", "")),
                scope.get("path_template") or "unmatched",
                status,
                (time.perf_counter() - start) * 1000,
                f"{client[0]}:{client[1]}" if client else "",
            )

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                log_access()
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("path_template") or "unmatched"
            m = metrics_of(scope["litestar_app"].state)
            method = str(scope.get("method", "GET"))
            m.requests.labels(method, route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)
            if not logged:  # no answer was started (the client went away, or a crash)
                log_access()


def on_shutdown(app: Any) -> None:
    """Close the application's read-only connection to the store."""
    m: Metrics | None = app.state.get("metrics")
    if m is not None:
        m.store.close()
