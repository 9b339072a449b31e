"""What ``ls``, ``status``, ``show``, ``find``, ``lineage`` and ``audit log`` answer, as
Structs: read once from the run store, then rendered by the CLI or sent by the service
(``--server`` reads them back, the same types).

Nothing here prints; every function takes an open ``RunStore``. ``visible`` narrows what a
caller may see to experiments it returns True for (the service's team rule); None sees all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from stowplan.errors import SpecError
from stowplan.provenance.query import LineageGraph
from stowplan.provenance.records import (
    ArtifactRecord,
    AttemptRecord,
    ExperimentRecord,
    LedgerEntry,
    PlacementRecord,
    ProvenanceRecord,
    ReplayRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.provenance.store import RunStore

Visible = Callable[[str], bool] | None
"""experiment id -> may the caller see it (None: everything)."""

__all__ = [
    "ExperimentSummary",
    "RunDetail",
    "RunStatus",
    "ServiceView",
    "experiment_runs",
    "list_experiments",
    "run_cost",
    "run_detail",
    "service_view",
    "status_rows",
    "visible_ledger",
    "visible_lineage",
    "visible_runs",
]


class ExperimentSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``stowplan ls``."""

    id: str
    name: str
    project: str
    created_at: float
    description: str
    counts: dict[str, int]
    """runs by state."""
    usd: float | None = None
    """recorded cost of its runs; None when nothing was priced."""


class RunStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One run of ``stowplan status``: the newest replicate of each trial."""

    run_id: str
    experiment: str
    task: str
    index: int
    params: dict[str, Any]
    state: str
    attempts: int
    failure: str | None
    reason: str | None
    replicate: int
    cost: dict[str, float] | None = None
    service: ServiceView | None = None
    """set for a service task (``[tasks.service]``): where it answers, and its restarts."""


class ServiceView(msgspec.Struct, frozen=True, kw_only=True):
    """A service task's run as a person wants to find it."""

    port: int | None
    endpoint: str | None
    """``HOST:PORT`` of the attempt running now (127.0.0.1 when it runs on this host); None
    while no attempt runs, or the service has no port."""
    restarts: int
    """attempts after the first: every restart, whatever ended the attempt before."""
    health: str | None
    """what the health check probes ("GET /healthz", "command: curl ..."), or None."""


def service_view(run: RunRecord, attempts: list[AttemptRecord]) -> ServiceView | None:
    """The service part of ``run`` (None for a normal task), from the task as the queue got
    it and the run's attempts (``shell.health.endpoint``)."""
    from stowplan.shell.health import endpoint

    spec = run.task_spec.get("payload", {}).get("instance", {}).get("service")
    if not isinstance(spec, dict):
        return None
    port = spec.get("port")
    port = port if isinstance(port, int) else None
    health = spec.get("health") or {}
    probe = None
    if health.get("http"):
        probe = f"GET {health['http']}"
    elif health.get("command"):
        probe = "command: " + " ".join(str(a) for a in health["command"])
    live = [a for a in attempts if a.state == "RUNNING"] if run.state == "RUNNING" else []
    return ServiceView(
        port=port,
        endpoint=endpoint(live[-1].node, port) if live else None,
        restarts=max(0, max((a.attempt for a in attempts), default=0) - 1),
        health=probe,
    )


def run_cost(attempts: list[AttemptRecord]) -> dict[str, float] | None:
    """A run's recorded cost over its attempts (dollars and billed seconds); None when none
    of them was priced."""
    priced = [a for a in attempts if a.usd is not None]
    if not priced:
        return None
    return {
        "usd": round(sum(a.usd or 0.0 for a in priced), 6),
        "billed_s": round(sum(a.billed_s or 0.0 for a in priced), 3),
    }


def list_experiments(store: RunStore, *, visible: Visible = None) -> list[ExperimentSummary]:
    """Every experiment the caller may see, newest first, with its runs counted by state."""
    exps = [e for e in store.list_experiments() if visible is None or visible(e.id)]
    spent = store.cost_by_experiment([e.id for e in exps])
    states = store.state_counts([e.id for e in exps])
    out = []
    for e in exps:
        counts = dict(sorted(states.get(e.id, {}).items()))
        out.append(
            ExperimentSummary(
                id=e.id,
                name=e.name,
                project=e.project,
                created_at=e.created_at,
                description=e.description,
                counts=counts,
                usd=spent.get(e.id),
            )
        )
    return out


def experiment_runs(
    store: RunStore, experiment: str | None, *, visible: Visible = None
) -> list[RunRecord]:
    """The runs ``status`` shows: of every experiment called ``experiment`` (or whose id it
    starts), or of the newest experiment's name when None. SpecError when there is none;
    ``PermissionError`` when there are some but the caller may see none of them."""
    if experiment:
        runs = store.runs_by_name(experiment)
        if not runs:
            found = store.find_experiment(experiment)
            if not found:
                raise SpecError(f"no experiment named {experiment!r}", hint="see stowplan ls")
            runs = store.runs_for_experiment(found[0].id)
    else:
        exps = [e for e in store.list_experiments() if visible is None or visible(e.id)]
        runs = store.runs_by_name(exps[0].name) if exps else []
    if visible is not None and runs:
        mine = [r for r in runs if visible(r.experiment_id)]
        if not mine:
            raise PermissionError(f"experiment {experiment!r} belongs to another team")
        runs = mine
    return runs


def status_rows(store: RunStore, runs: list[RunRecord]) -> list[RunStatus]:
    """The newest replicate of each trial of ``runs``, by experiment, task and index."""
    attempts = store.attempts_for([r.run_id for r in runs])
    latest: dict[tuple[str, str, int], RunRecord] = {}
    for r in runs:
        k = (r.experiment, r.task, r.index)
        if k not in latest or r.replicate > latest[k].replicate:
            latest[k] = r
    shown = sorted(latest.values(), key=lambda r: (r.experiment, r.task, r.index))
    return [
        RunStatus(
            run_id=r.run_id,
            experiment=r.experiment,
            task=r.task,
            index=r.index,
            params=r.params,
            state=r.state,
            attempts=r.attempts,
            failure=r.failure,
            reason=r.reason,
            replicate=r.replicate,
            cost=run_cost(attempts.get(r.run_id, [])),
            service=service_view(r, attempts.get(r.run_id, [])),
        )
        for r in shown
    ]


class RunDetail(msgspec.Struct, kw_only=True):
    """Everything recorded about one run (``stowplan show``)."""

    run: RunRecord
    experiment: ExperimentRecord | None
    attempts: list[AttemptRecord]
    artifacts: list[ArtifactRecord]
    events: list[TransitionRecord]
    provenance: ProvenanceRecord
    placements: list[PlacementRecord]
    replay_of: ReplayRecord | None
    replays: list[ReplayRecord]
    ledger: list[LedgerEntry]
    used: dict[str, str] | None
    """what the run imported, as captured where it ran; None when nothing was captured."""
    service: ServiceView | None = None
    """set for a service task: its endpoint and restarts (the dashboard's run page)."""


def run_detail(
    store: RunStore, run_id: str, *, providers: dict[str, Any], state_dir: Path
) -> RunDetail:
    """Everything recorded about ``run_id`` (a full id: resolve a prefix first)."""
    from stowplan.provenance.imports import used_records

    run = store.get_runs([run_id])[run_id]
    record = used_records(store, [run_id], providers, state_dir).get(run_id)
    attempts = store.attempts_for([run_id]).get(run_id, [])
    return RunDetail(
        run=run,
        experiment=store.get_experiment(run.experiment_id),
        attempts=attempts,
        artifacts=store.artifacts_for([run_id]).get(run_id, []),
        events=store.events_for(run_id),
        provenance=store.get_provenance(run.provenance),
        placements=store.placements_for(run_id),
        replay_of=store.replay_source(run_id),
        replays=store.replays_of(run_id),
        ledger=[
            e
            for e in store.ledger()
            if e.target in (run_id, run.experiment_id)
            and (e.target == run_id or run_id in e.details.get("run_ids", [run_id]))
        ],
        used=record.distributions() if record is not None else None,
        service=service_view(run, attempts),
    )


def visible_runs(runs: list[RunRecord], visible: Visible) -> list[RunRecord]:
    """``runs`` of experiments the caller may see (``find``)."""
    return runs if visible is None else [r for r in runs if visible(r.experiment_id)]


def visible_ledger(
    store: RunStore, entries: list[LedgerEntry], visible: Visible
) -> list[LedgerEntry]:
    """The entries on an experiment, or a run of one, that the caller may see.

    NOTE: an entry whose target is an experiment's *name* (``cancel NAME`` run on the server)
    names no id to decide by, so only those who see everything see it."""
    if visible is None:
        return entries
    runs = store.get_runs(sorted({e.target for e in entries}))
    return [
        e
        for e in entries
        if visible(e.target) or (e.target in runs and visible(runs[e.target].experiment_id))
    ]


def visible_lineage(store: RunStore, graph: LineageGraph, visible: Visible) -> LineageGraph:
    """``graph`` without the runs the caller may not see, and without what only they lead to.

    ``PermissionError`` when the root itself is another team's: a run of an experiment the
    caller may not see, or an artifact that only such runs produced."""
    if visible is None:
        return graph
    kind, _, key = graph.root.partition(":")
    if kind == "artifact" and not any(
        r.experiment_id and visible(r.experiment_id)
        for r in store.get_runs(store.runs_producing(key)).values()
    ):
        raise PermissionError("the artifact was produced by another team's runs")
    ids = [n.id.removeprefix("run:") for n in graph.nodes.values() if n.kind == "run"]
    runs = store.get_runs(ids)
    hidden = {f"run:{i}" for i in ids if i not in runs or not visible(runs[i].experiment_id)}
    if graph.root in hidden:
        raise PermissionError("the run belongs to another team")
    edges = [e for e in graph.edges if e.src not in hidden and e.dst not in hidden]
    touched = {graph.root} | {e.src for e in edges} | {e.dst for e in edges}
    return LineageGraph(
        root=graph.root,
        direction=graph.direction,
        depth=graph.depth,
        nodes={k: n for k, n in graph.nodes.items() if k in touched},
        edges=edges,
    )
