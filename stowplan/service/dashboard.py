"""The lab's web dashboard, served by the service's own app under ``/ui``.

Server-rendered (Litestar's Jinja2 templates in ``templates/``; no JavaScript build step).
A page works without JavaScript; a few lines of plain JS poll a JSON twin of the page to
update states, reasons and logs in place. Plots are SVG drawn here, on the server.

Pages: ``/ui/login`` (a token, kept in an HttpOnly cookie), ``/ui/`` (the lab: capacity,
utilisation over time, queues per team and why each waiting run waits, experiments),
``/ui/experiments/{ref}`` (its runs, live), ``/ui/runs/{ref}`` (state, why it waits, logs that
follow, attempts, events, provenance and lineage). JSON twins: ``.../runs.json``,
``.../state.json``, ``.../log.json``.

Authorised like the API, by the same table: the token comes from the ``Authorization``
header or the cookie; a page of another team's experiment or run answers 403 (its logs too),
and the lab-wide figures (capacity, utilisation, queue lengths per team) name no run.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.params import Body, FromPath, FromQuery
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.template.config import TemplateConfig
from markupsafe import Markup

from stowplan.errors import SpecError
from stowplan.provenance.records import RunRecord
from stowplan.scheduler.states import FINAL
from stowplan.service import views
from stowplan.service.api import EXPERIMENT_REF_PATTERN, RUN_REF_PATTERN
from stowplan.service.auth import Action, Principal, Scope, allowed, principal_of, scope_of
from stowplan.service.metrics import NO_TEAM, WAITING, metrics_of

__all__ = ["COOKIE", "ROUTES", "TEMPLATES", "waiting_reason"]

COOKIE: Final = "stowplan_token"
PREFIX: Final = "/ui"
LOG_LIMIT: Final = 256 * 1024
"""The most log bytes one ``log.json`` answer carries (the page asks again for the rest)."""
WAITING_SHOWN: Final = 100
"""Waiting runs listed with their reasons on the lab's page (the counts cover all)."""
UTIL_WINDOW_S: Final = 3600.0
UTIL_MIN_WINDOW_S: Final = 300.0
UTIL_BUCKETS: Final = 60


def when(ts: float | None) -> str:
    """A Unix time as UTC text, to the second (the templates' ``when``)."""
    if not ts:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _globals(engine: JinjaTemplateEngine) -> None:
    engine.engine.globals["when"] = when


TEMPLATES: Final = TemplateConfig(
    directory=Path(__file__).parent / "templates",
    engine=JinjaTemplateEngine,
    engine_callback=_globals,
)
"""The app's ``template_config``."""


# -- who is looking ---------------------------------------------------------------------------


def _token(request: Request[Any, Any, Any]) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.cookies.get(COOKIE, "").strip()


def _who(request: Request[Any, Any, Any]) -> tuple[Principal | None, str]:
    """The person behind the request, or None and why not."""
    state = request.app.state["service"]
    token = _token(request)
    if not token:
        return None, "log in with an API token (an admin creates one with `stowplan token create`)"
    user, why = state.people.check_token(token)
    if user is None:
        return None, why
    who = principal_of(state.config, user)
    if who is None:
        return None, f"user {user!r} is not configured under [service.users] any more"
    return who, ""


def _need(request: Request[Any, Any, Any]) -> Principal:
    """For the JSON twins: the person, or 401."""
    who, why = _who(request)
    if who is None:
        raise NotAuthorizedException(why, headers={"WWW-Authenticate": "Bearer"})
    return who


def _login_redirect(request: Request[Any, Any, Any]) -> Redirect:
    return Redirect(f"{PREFIX}/login?next={quote(request.url.path)}")


def _may_read(state: Any, who: Principal, experiment_id: str) -> bool:
    return allowed(who.role, Action.READ, scope_of(who, state.people.owners(experiment_id)))


def _denied(who: Principal, what: str) -> Template:
    return Template(
        template_name="denied.html",
        context={"who": who, "what": what, "prefix": PREFIX},
        status_code=403,
    )


# -- why a run waits --------------------------------------------------------------------------


def waiting_reason(run: RunRecord, upstream: dict[str, RunRecord]) -> str:
    """Why ``run`` is not running (yet), in the scheduler's words where it gave any.

    ``upstream``: the records of the runs ``run`` depends on (those found)."""
    state = run.state
    if state == "PENDING":
        todo = [upstream[d] for d in run.depends_on if d in upstream]
        todo = [u for u in todo if u.state != "SUCCEEDED"]
        if todo:
            by_task: dict[str, int] = {}
            for u in todo:
                by_task[u.task] = by_task.get(u.task, 0) + 1
            parts = ", ".join(
                f"{n} run{'s' if n != 1 else ''} of {task}" for task, n in sorted(by_task.items())
            )
            return f"waits on upstream {parts} not yet succeeded"
        return "recorded; waits for the queue to take it"
    if state == "READY":
        if run.reason:
            return run.reason  # the scheduler's reason: the budget holds it
        return (
            "waits for capacity: the last placement found no pool with room for it now; "
            "it is placed as runs finish"
        )
    if state == "AWAITING_APPROVAL":
        return (
            f"waits for a team admin to approve it ({run.reason})"
            if run.reason
            else ("waits for a team admin to approve it")
        )
    if state in ("PLACED", "SUBMITTING"):
        return f"placed on {run.pool or 'a pool'}; being handed to the provider"
    if state == "QUEUED":
        return f"queued by the provider on {run.pool or 'its pool'}; waits for it to start"
    if state == "RETRYING":
        return (
            f"attempt {run.attempts} failed ({run.failure or 'infrastructure'})"
            + (f": {run.reason}" if run.reason else "")
            + "; waits to be placed again"
        )
    if state == "LOST":
        return "its capacity lease expired; being reconciled with the provider"
    return ""


def _upstream_of(store: Any, runs: Iterable[RunRecord]) -> dict[str, RunRecord]:
    wanted = sorted({d for r in runs if r.state == "PENDING" for d in r.depends_on})
    return store.get_runs(wanted) if wanted else {}


# -- plots ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]
    css: str


def svg_plot(
    series: Sequence[Series],
    *,
    title: str,
    unit: str,
    t0: float,
    t1: float,
    width: int = 640,
    height: int = 180,
) -> Markup:
    """A line plot over time, as inline SVG (one ``<polyline>`` per series)."""
    left, right, top, bottom = 44, 10, 22, 24
    ymax = max([1.0, *(y for s in series for _, y in s.points)])
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return left + (t - t0) / span * (width - left - right)

    def y(v: float) -> float:
        return top + (1 - v / ymax) * (height - top - bottom)

    out = [
        f'<svg class="plot" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{left}" y="14" class="ptitle">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y(0):.1f}" class="axis"/>',
        f'<text x="{left - 4}" y="{y(ymax) + 4:.1f}" text-anchor="end">{ymax:g}</text>',
        f'<text x="{left - 4}" y="{y(0) + 4:.1f}" text-anchor="end">0</text>',
        f'<text x="{left}" y="{height - 6}">-{span / 60:.0f} min</text>',
        f'<text x="{width - right}" y="{height - 6}" text-anchor="end">now ({unit})</text>',
    ]
    for i, s in enumerate(series):
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
        out.append(
            f'<polyline class="{html.escape(s.css)}" fill="none" points="{pts}">'
            f"<title>{html.escape(s.label)}</title></polyline>"
        )
        out.append(
            f'<text x="{width - right - 4}" y="{top + 12 * (i + 1)}" text-anchor="end" '
            f'class="{html.escape(s.css)}-label">{html.escape(s.label)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def svg_lineage(
    upstream: Sequence[tuple[str, str]],
    this: str,
    downstream: Sequence[tuple[str, str]],
) -> Markup:
    """Upstream runs, this run, downstream runs in three columns with arrows; each item is
    (label, href or "" when the viewer may not open it)."""
    rows = max(len(upstream), len(downstream), 1)
    h = 30 * rows + 20
    w, bw = 720, 200
    cols = (10, (w - bw) // 2, w - bw - 10)

    def box(col: int, i: int, n: int, label: str, href: str, cls: str) -> tuple[str, float]:
        yy = 10 + (h - 20) * (i + 0.5) / max(n, 1) - 11
        text = html.escape(label if len(label) <= 30 else label[:29] + "…")
        rect = (
            f'<rect x="{cols[col]}" y="{yy:.1f}" width="{bw}" height="22" rx="4" class="{cls}"/>'
            f'<text x="{cols[col] + 6}" y="{yy + 15:.1f}">{text}</text>'
        )
        if href:
            rect = f'<a href="{html.escape(href)}">{rect}</a>'
        return rect, yy + 11

    parts = [
        f'<svg class="lineage" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        'xmlns="http://www.w3.org/2000/svg"><title>lineage</title>'
    ]
    mid, my = box(1, 0, 1, this, "", "this")
    parts.append(mid)
    for i, (label, href) in enumerate(upstream):
        b, yy = box(0, i, len(upstream), label, href, "node")
        parts.append(
            f'<line x1="{cols[0] + bw}" y1="{yy:.1f}" x2="{cols[1]}" y2="{my:.1f}" class="edge"/>'
        )
        parts.append(b)
    for i, (label, href) in enumerate(downstream):
        b, yy = box(2, i, len(downstream), label, href, "node")
        parts.append(
            f'<line x1="{cols[1] + bw}" y1="{my:.1f}" x2="{cols[2]}" y2="{yy:.1f}" class="edge"/>'
        )
        parts.append(b)
    parts.append("</svg>")
    return Markup("".join(parts))


# -- the lab ----------------------------------------------------------------------------------


def _resources(run: RunRecord) -> tuple[float, int]:
    inst = run.task_spec.get("payload", {}).get("instance", {})
    return float(inst.get("cpus", 1.0) or 0.0), int(inst.get("gpus", 0) or 0)


def _capacity(state: Any) -> dict[str, Any]:
    """The lab's pools as last discovered (saved with each submission), summed."""
    from stowplan.providers.facts import load_facts

    pools = []
    notes = []
    for name, cfg in sorted(state.project.config.providers.items()):
        rec, why = load_facts(Path(state.state_dir), name, cfg)
        if rec is None:
            notes.append(f"{name}: not discovered yet ({why})")
            continue
        pools.extend(rec.pools)
    gpus: dict[str, int] = {}
    for p in pools:
        for model, n in p.gpus.items():
            gpus[model] = gpus.get(model, 0) + n
    return {
        "pools": pools,
        "cpus": sum(p.cpus for p in pools),
        "gpus": gpus,
        "notes": notes,
    }


def _utilisation(
    state: Any, reader: Any, now: float, capacity: dict[str, Any]
) -> tuple[Markup, float, int]:
    """A plot of the CPUs and GPUs in use (from the attempts' start and end times) over the
    last hour, or since the first attempt when that is sooner (5 minutes at least); and the
    CPUs and GPUs in use now."""
    rows = reader.query(
        "SELECT run_id, started_at, ended_at FROM attempts WHERE started_at IS NOT NULL "
        "AND (ended_at IS NULL OR ended_at >= ?)",
        (now - UTIL_WINDOW_S,),
    )
    first = min((float(r[1]) for r in rows), default=now)
    window = min(UTIL_WINDOW_S, max(UTIL_MIN_WINDOW_S, (now - first) * 1.1))
    since = now - window
    runs = state.store.get_runs(sorted({r[0] for r in rows})) if rows else {}
    step = window / UTIL_BUCKETS
    cpu = [0.0] * (UTIL_BUCKETS + 1)
    gpu = [0.0] * (UTIL_BUCKETS + 1)
    cpu_now, gpu_now = 0.0, 0
    for run_id, start, end in rows:
        run = runs.get(run_id)
        if run is None:
            continue
        if end is None:
            end = run.updated_at if run.state in FINAL else now
        c, g = _resources(run)
        if end >= now and run.state not in FINAL:
            cpu_now += c
            gpu_now += g
        for i in range(UTIL_BUCKETS):  # each point: the mean over the step before it
            b1 = since + (i + 1) * step
            overlap = max(0.0, min(end, b1) - max(start, b1 - step)) / step
            cpu[i + 1] += c * overlap
            gpu[i + 1] += g * overlap
    cpu[-1], gpu[-1] = cpu_now, float(gpu_now)  # the last point: now, exactly
    ts = [since + i * step for i in range(UTIL_BUCKETS + 1)]
    series = [Series("CPUs in use", list(zip(ts, cpu, strict=True)), "cpu")]
    gpus = sum(capacity["gpus"].values())
    if gpus or any(gpu):
        series.append(Series("GPUs in use", list(zip(ts, gpu, strict=True)), "gpu"))
    if capacity["cpus"]:
        series.append(
            Series("CPU capacity", [(since, capacity["cpus"]), (now, capacity["cpus"])], "cap")
        )
    if gpus:
        series.append(Series("GPU capacity", [(since, gpus), (now, gpus)], "gcap"))
    plot = svg_plot(
        series,
        title=f"Utilisation, last {window / 60:.0f} min",
        unit="CPUs, GPUs",
        t0=since,
        t1=now,
    )
    return plot, cpu_now, gpu_now


def _teams_of(state: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for team in sorted(state.config.teams, reverse=True):
        for e in state.people.experiments_of({team}):
            out[e] = team
    return out


def _queues(
    state: Any, reader: Any, who: Principal
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Queue lengths per team (every team: counts name no run), and the waiting runs the
    viewer may see, oldest first, each with why it waits."""
    teams = _teams_of(state)
    marks = ", ".join("?" * len(WAITING))
    rows = reader.query(
        f"SELECT experiment_id, state, count(*) FROM runs WHERE state IN ({marks}, 'RUNNING') "
        "GROUP BY experiment_id, state",
        tuple(WAITING),
    )
    per: dict[str, dict[str, int]] = {t: {} for t in sorted(state.config.teams)}
    for exp, st, n in rows:
        team = teams.get(exp, NO_TEAM)
        d = per.setdefault(team, {})
        key = "running" if st == "RUNNING" else "waiting"
        d[key] = d.get(key, 0) + n
        d[st] = d.get(st, 0) + n
    # what each team holds now: running runs are bounded by the lab's capacity, so few
    running = [r[0] for r in reader.query("SELECT run_id FROM runs WHERE state = 'RUNNING'")]
    held: dict[str, list[float]] = {}
    for run in state.store.get_runs(running).values():
        c, g = _resources(run)
        h = held.setdefault(teams.get(run.experiment_id, NO_TEAM), [0.0, 0.0])
        h[0] += c
        h[1] += g
    queues = [
        {
            "team": t,
            "waiting": d.get("waiting", 0),
            "running": d.get("running", 0),
            "cpus": held.get(t, [0.0, 0.0])[0],
            "gpus": int(held.get(t, [0.0, 0.0])[1]),
            "states": {s: d[s] for s in WAITING if d.get(s)},
        }
        for t, d in per.items()
    ]
    see_all = allowed(who.role, Action.READ, Scope.OTHER)
    mine = None if see_all else state.people.experiments_of({who.team})
    if mine is not None and not mine:
        return queues, []
    sql = f"SELECT run_id FROM runs WHERE state IN ({marks})"
    args: list[Any] = list(WAITING)
    if mine is not None:
        ids = sorted(mine)[:900]
        sql += f" AND experiment_id IN ({', '.join('?' * len(ids))})"
        args.extend(ids)
    sql += f" ORDER BY created_at, run_id LIMIT {WAITING_SHOWN}"
    ids = [r[0] for r in reader.query(sql, tuple(args))]
    runs = state.store.get_runs(ids)
    upstream = _upstream_of(state.store, runs.values())
    waiting = [
        {
            "run": runs[i],
            "team": teams.get(runs[i].experiment_id, NO_TEAM),
            "why": waiting_reason(runs[i], upstream),
        }
        for i in ids
        if i in runs
    ]
    return queues, waiting


# -- pages ------------------------------------------------------------------------------------


def _quotas(state: Any, who: Principal) -> list[dict[str, Any]]:
    """Each limited team's use against its limits (``QueueActor.sharing``, what ``stowplan
    quota`` shows): the viewer's own team, every team for an admin. Each row carries the
    share of each limit in use (0-100) for its bar."""
    from stowplan.scheduler.share import ANY, span_text

    rows = []
    for team, use in state.sharing(who):
        limits = use["limits"]
        holds: dict[str, int] = use["holds"]
        bars = []
        for model, most in sorted(limits["max_gpus"].items()):
            held = sum(holds.values()) if model == ANY else holds.get(model, 0)
            bars.append(
                {
                    "what": f"{'all' if model == ANY else model} GPUs held, of at most {most}",
                    "used": held,
                    "limit": most,
                    "pct": min(100, round(100 * held / most)) if most else 100,
                }
            )
        if limits["gpu_hours"] is not None:
            used, most = use["gpu_hours"], limits["gpu_hours"]
            bars.append(
                {
                    "what": f"GPU-hours per {span_text(limits['window_s'])}, of {most:g}",
                    "used": round(used, 2),
                    "limit": most,
                    "pct": min(100, round(100 * used / most)) if most else 100,
                }
            )
        rows.append(
            {
                "team": team,
                "holds": holds,
                "guaranteed": limits["guaranteed_gpus"],
                "waiting_gpus": use["waiting_gpus"],
                "weight": limits["weight"],
                "bars": bars,
            }
        )
    return rows


def _base(who: Principal | None, title: str) -> dict[str, Any]:
    return {"who": who, "title": title, "prefix": PREFIX}


@get(f"{PREFIX}/login", sync_to_thread=False, include_in_schema=False)
def login_page(next: FromQuery[str] = f"{PREFIX}/") -> Template:
    return Template(
        template_name="login.html", context={**_base(None, "Log in"), "next": _safe_next(next)}
    )


def _safe_next(target: str) -> str:
    """Only a path of this dashboard: never another site."""
    if target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"


@post(f"{PREFIX}/login", sync_to_thread=True, include_in_schema=False, status_code=303)
def login(
    request: Request[Any, Any, Any],
    data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)],
) -> Response[Any]:
    state = request.app.state["service"]
    token = str(data.get("token", "")).strip()
    target = _safe_next(str(data.get("next", f"{PREFIX}/")))
    user, why = state.people.check_token(token) if token else (None, "give a token")
    if user is not None and principal_of(state.config, user) is None:
        user, why = None, f"user {user!r} is not configured under [service.users] any more"
    if user is None:
        return Template(
            template_name="login.html",
            context={**_base(None, "Log in"), "next": target, "error": why},
            status_code=401,
        )
    secure = state.config.tls is not None
    return Redirect(
        target,
        status_code=303,
        cookies=[
            Cookie(
                key=COOKIE,
                value=token,
                httponly=True,
                samesite="strict",
                secure=secure,
                path="/",
            )
        ],
    )


@post(f"{PREFIX}/logout", sync_to_thread=False, include_in_schema=False, status_code=303)
def logout() -> Redirect:
    return Redirect(
        f"{PREFIX}/login",
        status_code=303,
        cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/", httponly=True)],
    )


@get([PREFIX, f"{PREFIX}/"], sync_to_thread=True, include_in_schema=False)
def lab_page(request: Request[Any, Any, Any]) -> Response[Any]:
    who, _ = _who(request)
    if who is None:
        return _login_redirect(request)
    state = request.app.state["service"]
    reader = metrics_of(request.app.state).store  # its read-only connection to the store
    now = time.time()
    cap = _capacity(state)
    plot, cpu_now, gpu_now = _utilisation(state, reader, now, cap)
    queues, waiting = _queues(state, reader, who)
    exps = views.list_experiments(state.store, visible=state.visible(who))
    return Template(
        template_name="lab.html",
        context={
            **_base(who, "The lab"),
            "capacity": cap,
            "plot": plot,
            "cpu_now": cpu_now,
            "gpu_now": gpu_now,
            "queues": queues,
            "quotas": _quotas(state, who),
            "waiting": waiting,
            "waiting_shown": WAITING_SHOWN,
            "experiments": exps[:50],
            "now": now,
        },
    )


def _experiment_rows(state: Any, who: Principal, ref: str) -> list[dict[str, Any]]:
    import re

    if not re.match(EXPERIMENT_REF_PATTERN, ref):
        raise NotFoundException(f"{ref[:80]!r} is not an experiment name or id")
    try:
        runs = views.experiment_runs(state.store, ref, visible=state.visible(who))
    except SpecError as e:
        raise NotFoundException(e.message) from None
    rows = views.status_rows(state.store, runs)
    records = {r.run_id: r for r in runs}
    upstream = _upstream_of(state.store, records.values())
    return [
        {
            "run_id": s.run_id,
            "task": s.task,
            "index": s.index,
            "params": s.params,
            "state": s.state,
            "attempts": s.attempts,
            "why": waiting_reason(records[s.run_id], upstream)
            if s.state in WAITING
            else (f"{s.failure}: {s.reason}" if s.failure else ""),
        }
        for s in rows
    ]


@get(f"{PREFIX}/experiments/{{ref:str}}", sync_to_thread=True, include_in_schema=False)
def experiment_page(request: Request[Any, Any, Any], ref: FromPath[str]) -> Response[Any]:
    who, _ = _who(request)
    if who is None:
        return _login_redirect(request)
    state = request.app.state["service"]
    try:
        rows = _experiment_rows(state, who, ref)
    except PermissionError:
        return _denied(who, f"experiment {ref}")
    return Template(
        template_name="experiment.html",
        context={**_base(who, f"Experiment {ref}"), "ref": ref, "rows": rows},
    )


@get(f"{PREFIX}/experiments/{{ref:str}}/runs.json", sync_to_thread=True, include_in_schema=False)
def experiment_json(request: Request[Any, Any, Any], ref: FromPath[str]) -> list[dict[str, Any]]:
    from litestar.exceptions import PermissionDeniedException

    who = _need(request)
    state = request.app.state["service"]
    try:
        rows = _experiment_rows(state, who, ref)
    except PermissionError as e:
        raise PermissionDeniedException(str(e)) from None
    return [{k: v for k, v in r.items() if k != "params"} for r in rows]


def _run(state: Any, ref: str) -> RunRecord:
    import re

    if not re.match(RUN_REF_PATTERN, ref):
        raise NotFoundException(f"{ref[:80]!r} is not a run id: give 6 to 64 hex digits")
    try:
        run_id = state.store.resolve_run(ref)
    except (KeyError, ValueError):
        raise NotFoundException(f"no run {ref!r}") from None
    run: RunRecord = state.store.get_runs([run_id])[run_id]
    return run


def _run_state(state: Any, run: RunRecord) -> dict[str, Any]:
    upstream = _upstream_of(state.store, [run])
    return {
        "run_id": run.run_id,
        "state": run.state,
        "attempts": run.attempts,
        "final": run.state in FINAL,
        "why": waiting_reason(run, upstream)
        if run.state in WAITING
        else (f"{run.failure}: {run.reason}" if run.failure else ""),
    }


@get(f"{PREFIX}/runs/{{ref:str}}", sync_to_thread=True, include_in_schema=False)
def run_page(request: Request[Any, Any, Any], ref: FromPath[str]) -> Response[Any]:
    who, _ = _who(request)
    if who is None:
        return _login_redirect(request)
    state = request.app.state["service"]
    run = _run(state, ref)
    if not _may_read(state, who, run.experiment_id):
        return _denied(who, f"run {ref}")
    detail = views.run_detail(
        state.store,
        run.run_id,
        providers=dict(state.project.config.providers),
        state_dir=state.state_dir,
    )
    ups = state.store.get_runs(run.depends_on) if run.depends_on else {}
    downs = [
        r for r in state.store.runs_for_experiment(run.experiment_id) if run.run_id in r.depends_on
    ]

    def item(r: RunRecord) -> tuple[str, str]:
        href = f"{PREFIX}/runs/{r.run_id}" if _may_read(state, who, r.experiment_id) else ""
        return f"{r.task}[{r.index}] {r.state}", href

    lineage = svg_lineage(
        [item(ups[d]) for d in run.depends_on if d in ups],
        f"{run.task}[{run.index}] {run.run_id[:12]}",
        [item(r) for r in downs[:40]],
    )
    return Template(
        template_name="run.html",
        context={
            **_base(who, f"Run {run.run_id[:12]}"),
            "run": run,
            "d": detail,
            "live": _run_state(state, run),
            "lineage": lineage,
            "provenance": _provenance_rows(detail.provenance),
            "upstream": [ups[d] for d in run.depends_on if d in ups],
            "downstream": downs,
        },
    )


def _provenance_rows(rec: Any) -> list[tuple[str, list[tuple[str, str, bool]]]]:
    """Each part of the provenance record as (key, text, long?) rows; a long value (a whole
    package list) is folded away on the page."""
    import json

    out = []
    for part in ("code", "environment", "hardware", "data"):
        value = getattr(rec, part) or {}
        rows = []
        for k, v in sorted(value.items()):
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            rows.append((str(k), text, len(text) > 160))
        out.append((part, rows))
    return out


@get(f"{PREFIX}/runs/{{ref:str}}/state.json", sync_to_thread=True, include_in_schema=False)
def run_state_json(request: Request[Any, Any, Any], ref: FromPath[str]) -> dict[str, Any]:
    who = _need(request)
    state = request.app.state["service"]
    run = _run(state, ref)
    state.check(who, Action.READ, run.experiment_id)
    return _run_state(state, run)


@get(f"{PREFIX}/runs/{{ref:str}}/log.json", sync_to_thread=True, include_in_schema=False)
def run_log_json(
    request: Request[Any, Any, Any],
    ref: FromPath[str],
    offset: FromQuery[int] = 0,
    stream: FromQuery[str] = "stdout",
) -> dict[str, Any]:
    """The newest attempt's log from byte ``offset`` (at most ``LOG_LIMIT`` bytes); ``final``
    once the run is over and all of it was sent."""
    from stowplan.providers.registry import make_provider

    who = _need(request)
    state = request.app.state["service"]
    run = _run(state, ref)
    state.check(who, Action.READ, run.experiment_id)  # never another team's logs
    if stream not in ("stdout", "stderr"):
        raise NotFoundException("stream is stdout or stderr")
    offset = max(0, offset)
    attempts = state.store.attempts_for([run.run_id]).get(run.run_id, [])
    final = run.state in FINAL
    if not attempts:
        return {"offset": 0, "text": "", "final": final, "attempt": 0}
    att = attempts[-1]
    cfg = state.project.config.providers.get(att.provider)
    if cfg is None:
        return {"offset": offset, "text": "", "final": True, "attempt": att.attempt}

    async def read() -> bytes:
        out = bytearray()
        async with make_provider(att.provider, cfg, state_dir=Path(state.state_dir)) as drv:
            async for chunk in drv.logs(att.key, stream=stream, follow=False):  # type: ignore[arg-type]
                out += chunk
        return bytes(out)

    data = anyio.run(read)
    piece = data[offset : offset + LOG_LIMIT]
    end = offset + len(piece)
    return {
        "offset": end,
        "text": piece.decode("utf-8", errors="replace"),
        "final": final and end >= len(data),
        "attempt": att.attempt,
    }


# -- the simulator's reports: what `stowplan sim` and `stowplan whatif` wrote ----------------

REPORT_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A report's folder, and a plot's file name: nothing that could climb out of the folder."""
SUMMARY: Final = (
    ("jobs", "jobs", "{:,.0f}"),
    ("wait_mean_s", "mean wait", "dur"),
    ("wait_p99_s", "p99 wait", "dur"),
    ("completion_mean_s", "mean completion", "dur"),
    ("utilization", "GPU utilisation", "{:.1%}"),
    ("cost", "cost", "${:,.2f}"),
)


def _reports_dir(state: Any) -> Path:
    root = Path(state.project.root)
    return (root / Path(state.config.reports).expanduser()).resolve()


def _report_dir(state: Any, name: str) -> Path:
    """The folder of report ``name`` (a ``report.json`` in it), or 404."""
    base = _reports_dir(state)
    d = base / name
    if not REPORT_NAME.match(name) or d.parent != base or not (d / "report.json").is_file():
        raise NotFoundException(f"no report {name!r} under {base}")
    return d


def _fmt(kind: str, v: Any) -> str:
    if v is None:
        return "–"
    if kind == "dur":
        v = float(v)
        return f"{v / 3600:.2f} h" if v >= 3600 else f"{v:.1f} s"
    return kind.format(v)


def _summary_of(run: dict[str, Any]) -> dict[str, Any]:
    s = run.get("summary", {})
    out = dict(s)
    wait, done = s.get("wait_s") or {}, s.get("completion_s") or {}
    out.setdefault("wait_mean_s", wait.get("mean"))
    out.setdefault("wait_p99_s", wait.get("p99"))
    out.setdefault("completion_mean_s", done.get("mean"))
    return out


def _read_report(d: Path) -> dict[str, Any] | None:
    try:
        doc = msgspec.json.decode(
            (d / "report.json").read_bytes(), type=dict[str, Any], strict=False
        )
    except (OSError, msgspec.DecodeError):
        return None
    return doc if isinstance(doc.get("runs"), list) else None


@get(f"{PREFIX}/reports", sync_to_thread=True, include_in_schema=False)
def reports_page(request: Request[Any, Any, Any]) -> Response[Any]:
    """Every report under ``[service] reports``, newest first: the lab's capacity planning is
    everyone's to read."""
    who, _ = _who(request)
    if who is None:
        return _login_redirect(request)
    state = request.app.state["service"]
    base = _reports_dir(state)
    rows = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not REPORT_NAME.match(d.name) or not (d / "report.json").is_file():
            continue
        doc = _read_report(d)
        if doc is None:
            continue
        whatif = doc.get("whatif") or {}
        rows.append(
            {
                "name": d.name,
                "kind": "what-if" if whatif else "simulation",
                "at": (d / "report.json").stat().st_mtime,
                "cluster": Path(str(doc.get("cluster", ""))).name,
                "workload": Path(str(doc.get("workload", ""))).name,
                "policies": [str(r.get("policy", "")) for r in doc["runs"]],
                "changes": whatif.get("changes", []),
            }
        )
    rows.sort(key=lambda r: (-r["at"], r["name"]))
    return Template(
        template_name="reports.html",
        context={**_base(who, "Reports"), "reports": rows, "where": str(base)},
    )


@get(f"{PREFIX}/reports/{{name:str}}", sync_to_thread=True, include_in_schema=False)
def report_page(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    """One report: each run's summary, the what-if's changes and deltas, and its plots."""
    who, _ = _who(request)
    if who is None:
        return _login_redirect(request)
    state = request.app.state["service"]
    d = _report_dir(state, name)
    doc = _read_report(d)
    if doc is None:
        raise NotFoundException(f"report {name!r} cannot be read: {d / 'report.json'}")
    runs = []
    for r in doc["runs"]:
        s = _summary_of(r)
        runs.append(
            {
                "policy": str(r.get("policy", "")),
                "cells": [_fmt(kind, s.get(key)) for key, _, kind in SUMMARY],
            }
        )
    whatif = doc.get("whatif") or {}
    deltas = []
    for metric, dv in sorted((whatif.get("delta") or {}).items()):
        kind = (
            "dur" if metric.endswith("_s") else ("{:.1%}" if metric == "utilization" else "{:,.2f}")
        )
        change = dv.get("change")
        sign = "+" if change is not None and change > 0 else ""
        deltas.append(
            {
                "metric": metric,
                "baseline": _fmt(kind, dv.get("baseline")),
                "variant": _fmt(kind, dv.get("variant")),
                "change": "–" if change is None else sign + _fmt(kind, change),
            }
        )
    plots = sorted(p.name for p in d.glob("*.svg") if REPORT_NAME.match(p.name))
    return Template(
        template_name="report.html",
        context={
            **_base(who, f"Report {name}"),
            "name": name,
            "kind": "what-if" if whatif else "simulation",
            "cluster": str(doc.get("cluster", "")),
            "workload": str(doc.get("workload", "")),
            "columns": [label for _, label, _ in SUMMARY],
            "runs": runs,
            "changes": whatif.get("changes", []),
            "deltas": deltas,
            "plots": plots,
        },
    )


@get(f"{PREFIX}/reports/{{name:str}}/{{plot:str}}", sync_to_thread=True, include_in_schema=False)
def report_plot(
    request: Request[Any, Any, Any], name: FromPath[str], plot: FromPath[str]
) -> Response[Any]:
    """A report's SVG plot (only ``*.svg`` files of the report's own folder)."""
    who, _ = _who(request)
    if who is None:
        return _login_redirect(request)
    d = _report_dir(request.app.state["service"], name)
    f = d / plot
    if not REPORT_NAME.match(plot) or not plot.endswith(".svg") or not f.is_file():
        raise NotFoundException(f"report {name!r} has no plot {plot!r}")
    return Response(
        f.read_bytes(),
        media_type="image/svg+xml",
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
    )


ROUTES: Final = [
    login_page,
    login,
    logout,
    lab_page,
    reports_page,
    report_page,
    report_plot,
    experiment_page,
    experiment_json,
    run_page,
    run_state_json,
    run_log_json,
]
"""What ``create_app`` registers."""
