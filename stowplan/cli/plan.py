"""``stowplan plan FILE``: what a run would get, without submitting anything.

The experiment is prepared as ``run`` would (same spec checks, same providers), pools are
discovered, and the real scheduler core builds the placement problem for the runs that are
ready now: those whose upstream runs have all succeeded in the run store (or that have none).
Runs that already succeeded are reused, as ``run`` would; the rest wait, and the command says on
what. The placement engine solves the problem, and its answer is fed back to the same core
(``PlacementDecided``), as ``run`` does: what the core then holds is the plan. The command shows
tasks per pool with cost, data moved and wait, the solver's status, bound and gap, the node and
devices each run gets in a pool that leases devices (``SchedulerCore.lease``), and why anything
stays queued (the placer's reasons and the core's holds, such as GPUs free only in pieces).
The core is pure and lives only in this process: nothing is stored and nothing is submitted.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

from rich.table import Table

from stowplan.cli.common import budget_seconds, make_console, plural, verb

EXIT_OK = 0


def add_parsers(sub: Any) -> None:
    pl = sub.add_parser("plan", help="show where each task would run, at what cost; submit nothing")
    pl.add_argument("file")
    pl.add_argument("--provider", help="plan only on this provider from stowplan.toml")
    pl.add_argument(
        "--budget",
        type=budget_seconds,
        default=None,
        help="deterministic seconds of solver search, 0 or more (default: [placement].budget)",
    )
    pl.add_argument("--explain", metavar="RUN", help="explain one run's placement (id prefix)")
    pl.add_argument("--json", action="store_true")


def cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from stowplan.errors import SpecError
    from stowplan.placement import solve
    from stowplan.placement.context import context_for
    from stowplan.placement.explain import explain
    from stowplan.provenance.query import readiness, store_states
    from stowplan.scheduler.core import CoreConfig, SchedulerCore
    from stowplan.scheduler.events import (
        PlacementDecided,
        PoolsDiscovered,
        SolvePlacement,
        TasksSubmitted,
    )
    from stowplan.session import check_feasible, discover, prepare

    prepared = prepare(Path(args.file), provider=args.provider, rerun=False)
    err = make_console(stderr=True)
    for note in prepared.notes:
        err.print(note, markup=False)
    context = context_for(prepared.project, prepared.loaded)
    pools = discover(prepared)
    check_feasible(prepared, pools)
    planned = prepared.planned
    names = {r.run_id: f"{r.task}[{r.index}]" for r in planned}
    ids = [r.run_id for r in planned]
    upstream = {d for r in planned for d in r.depends_on}
    split = readiness(planned, store_states(prepared.store_path, [*ids, *upstream]))
    waiting = {w.run_id: w for w in split.waiting}
    waits = _waiting_summary(split.waiting)

    hit = None
    if args.explain:
        hits = [r for r in planned if r.run_id.startswith(args.explain)]
        if len(hits) != 1:
            raise SpecError(
                f"--explain {args.explain!r} matches {plural(len(hits), 'run')} of this plan",
                path="--explain",
                hint="give a longer prefix of a run id from `stowplan plan FILE --json`",
            )
        hit = hits[0]
        label = f"{names[hit.run_id]} {hit.run_id[:12]}"
        if hit.run_id in waiting or hit.run_id in split.reused:
            doc = _not_placed(hit.run_id, waiting.get(hit.run_id), names)
            if args.json:
                print(json.dumps(doc, indent=2, sort_keys=True))
            else:
                print(f"{label} {doc['reason']}")
            return EXIT_OK

    core = SchedulerCore(CoreConfig(context=context))
    by_provider: dict[str, list[Any]] = {}
    for p in pools:
        by_provider.setdefault(p.provider, []).append(p)
    for name, ps in sorted(by_provider.items()):
        core.handle(PoolsDiscovered(provider=name, pools=ps), now=0.0)
    ready = set(split.ready)
    # Upstream runs of a ready run have all succeeded: the core need not wait for them.
    tasks = [
        msgspec.structs.replace(r.instance, depends_on=()) for r in planned if r.run_id in ready
    ]
    out = core.handle(TasksSubmitted(tasks=tasks), now=0.0) if tasks else []
    problems = [c.problem for c in out if isinstance(c, SolvePlacement)]
    settings = prepared.project.config.placement
    budget = settings.budget if args.budget is None else args.budget
    ready_ids = [r.run_id for r in planned if r.run_id in ready]
    if not problems:
        failed = [r for r in planned if r.run_id in ready and core.state(r.run_id).name == "FAILED"]
        held = _held(core, ready_ids)
        if hit is not None:  # ready, and no solve was even asked for it
            return _print_unplaced(hit.run_id, names, held, label, as_json=args.json)
        if args.json:
            doc = _empty_doc(prepared, split, waits, len(failed))
            doc["waiting_runs"] = _waiting_runs(split.waiting, names)
            doc["held"] = held
            print(json.dumps(doc, indent=2, sort_keys=True))
            return EXIT_OK
        if not ready:
            print("nothing to place now:" + _counts_text(split, waits).lstrip(","))
        else:
            print(
                "nothing can be placed"
                + (f": {plural(len(failed), 'task')} fit no pool" if failed else "")
            )
        for line in _held_lines(held, task_of_run(planned)):
            print(line)
        for line in _waiting_lines(waits):
            print(line)
        return EXIT_OK
    problem = problems[0]
    started = time.perf_counter()
    sol = solve(problem, budget=budget, seed=0, workers=settings.workers)
    sol = msgspec.structs.replace(sol, solve_seconds=time.perf_counter() - started)
    # what `run` does with the answer: the core checks it against the devices, leases them
    # or holds the run with the reason (its next SolvePlacement, if any, is not followed)
    core.handle(PlacementDecided(solution=sol), now=0.0)
    dispatched = {rid: pid for rid in ready_ids if (pid := core.pool(rid)) is not None}
    leases = {rid: lease for rid in dispatched if (lease := core.lease(rid)) is not None}
    held = _held(core, ready_ids)
    expanded = list(_expand(problem, sol))
    refused = dict(held)
    for t in expanded:
        if t.class_id not in dispatched and t.class_id not in refused:
            refused[t.class_id] = (
                f"the answer put it on {t.pool_id}, which had no room left for it once the runs "
                "before it were placed; it is placed again as capacity frees up"
            )
    queued = len(split.ready) - len(dispatched)

    if hit is not None:
        if not any(hit.run_id in c.members for c in problem.classes):
            return _print_unplaced(hit.run_id, names, held, label, as_json=args.json)
        why = explain(
            problem,
            sol,
            hit.run_id,
            objective=context.objective,
            leases=leases,
            refused=refused,
        )
        if args.json:
            doc = msgspec.to_builtins(why)
            doc["lease"] = _lease_doc(why.devices)  # by name, as in the plan's "runs"
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(why.render().replace(hit.run_id, f"{names[hit.run_id]} {hit.run_id[:12]}"))
            if why.placed:
                for line in _explain_more(problem, hit.run_id, why):
                    print(line)
        return EXIT_OK

    pools_by_id = {p.id: p for p in problem.pools}
    task_of = task_of_run(planned)
    class_task = {c.id: task_of[c.members[0]] for c in problem.classes if c.members}
    class_of = {m: c.id for c in problem.classes for m in c.members}
    # the rows count what the core placed of each assignment, not what the answer proposed
    took = Counter(
        (class_of[t.class_id], t.pool_id, t.gpu_model) for t in expanded if t.class_id in dispatched
    )
    rows: list[dict[str, Any]] = []
    for a, unit in zip(sol.assignments, sol.unit_terms or [{}] * len(sol.assignments), strict=True):
        count = took.pop((a.class_id, a.pool_id, a.gpu_model), 0)
        if not count:
            continue
        p = pools_by_id[a.pool_id]
        rows.append(
            {
                "pool": a.pool_id,
                "provider": p.provider,
                "kind": p.kind,
                "site": p.site,
                "hardware_class": p.hardware_class,
                "gpu_model": a.gpu_model,
                "class": a.class_id,
                "task": class_task.get(a.class_id, ""),
                "tasks": count,
                "cost": count * unit.get("cost", 0.0),
                "data_bytes": count * unit.get("data_bytes", 0.0),
                "wait_s": unit.get("wait_seconds", 0.0),
            }
        )
    if args.json:
        doc = {
            "experiment": prepared.experiment.name,
            "status": str(sol.status),
            "objective": sol.objective,
            "bound": sol.bound,
            "gap": sol.gap,
            "solve_seconds": round(sol.solve_seconds, 4),
            "deterministic_time": sol.deterministic_time,
            "terms": sol.terms,
            "instances": sol.instances,
            "placed": len(dispatched),
            "queued": queued,
            "held": held,
            "reused": len(split.reused),
            "waiting": len(split.waiting),
            "waits": waits,
            "waiting_runs": _waiting_runs(split.waiting, names),
            "unplaced": sol.unplaced,
            "assignments": rows,
            "runs": {
                t.class_id: {
                    "name": names[t.class_id],
                    "pool": t.pool_id,
                    "gpu_model": t.gpu_model,
                    "lease": _lease_doc(leases.get(t.class_id)),
                }
                for t in expanded
                if t.class_id in dispatched
            },
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_OK
    console = make_console()
    table = Table(title=f"plan for {prepared.experiment.name}", title_justify="left")
    for col in ("task", "pool", "kind", "site", "hardware", "tasks", "cost", "data moved", "wait"):
        table.add_column(
            col, justify="right" if col in ("tasks", "cost", "data moved", "wait") else "left"
        )
    for r in rows:
        table.add_row(
            r["task"],
            r["pool"] + (f" ({r['gpu_model']})" if r["gpu_model"] else ""),
            r["kind"],
            r["site"],
            r["hardware_class"] or "-",
            str(r["tasks"]),
            f"{r['cost']:.4g}",
            _bytes(r["data_bytes"]),
            f"{r['wait_s']:.0f} s",
        )
    for w in waits:
        table.add_row(
            w["task"],
            f"waits on {', '.join(sorted(w['on']))}",
            "",
            "",
            "",
            str(w["runs"]),
            "",
            "",
            "",
            style="dim",
        )
    console.print(table)
    proven = sol.gap == 0 and str(sol.status) == "OPTIMAL"
    gap = "proven optimal" if proven else f"gap {sol.gap:.3%}"
    moved = _bytes(sol.terms.get("data_bytes", 0.0))
    console.print(
        f"{len(dispatched)} placed now, {queued} queued"
        + _counts_text(split, waits)
        + f"; status {sol.status} ({gap}); "
        f"cost {sol.terms.get('cost', 0):.4g}, data moved {moved}, "
        f"solved in {sol.solve_seconds:.2f} s",
        markup=False,
    )
    for pid, k in sorted(sol.instances.items()):
        # an elastic pool bills whole instances: its tasks' rows above count no compute
        console.print(
            f"  launches {plural(k, 'instance')} of {pid} at "
            f"${pools_by_id[pid].price_per_hour:.4g}/h each",
            markup=False,
        )
    milli = {m: c.gpu_milli for c in problem.classes if c.gpu_milli < 1000 for m in c.members}
    for line in _lease_lines(leases, dispatched, names, ready_ids, milli):
        console.print(line, markup=False)
    for cid, reason in sorted(sol.unplaced.items()):
        console.print(f"  queued ({class_task.get(cid, cid)}): {reason}", markup=False)
    for line in _held_lines(held, task_of):
        console.print(line, markup=False)
    for line in _waiting_lines(waits):
        console.print(line, markup=False)
    if queued and not sol.unplaced and not held:
        console.print("  the rest wait for capacity and are placed as it frees up")
    return EXIT_OK


LEASE_LINES = 20
"""``plan`` lists at most this many runs' devices; ``--json`` has them all."""


def task_of_run(planned: Any) -> dict[str, str]:
    return {r.run_id: r.task for r in planned}


def _held(core: Any, run_ids: list[str]) -> dict[str, str]:
    """Why the core keeps each READY run of ``run_ids`` from being placed, where it says
    (GPUs free only in pieces, a budget, a quota); run id -> reason."""
    return {rid: why for rid in run_ids if (why := core.held(rid))}


def _lease_doc(lease: Any) -> dict[str, Any] | None:
    if lease is None:
        return None
    doc: dict[str, Any] = {"node": lease.node, "devices": list(lease.devices)}
    if lease.others:  # a gang: its other nodes and their devices
        doc["others"] = [{"node": n, "devices": list(d)} for n, d in lease.others]
    return doc


def _lease_lines(
    leases: dict[str, Any],
    pools: dict[str, str],
    names: dict[str, str],
    order: list[str],
    milli: dict[str, int],
) -> list[str]:
    """``  train[0] -> local: node myhost, GPUs 0,1``, for the runs leased devices, in plan
    order, at most ``LEASE_LINES`` of them (``0.5 of GPU 0`` for a share, by ``milli``)."""
    from stowplan.placement.explain import lease_text

    ids = [rid for rid in order if rid in leases]
    out = [
        f"  {names[rid]} -> {pools[rid]}: {lease_text(leases[rid], milli.get(rid, 1000))}"
        for rid in ids[:LEASE_LINES]
    ]
    if len(ids) > LEASE_LINES:
        out.append(f"  and {plural(len(ids) - LEASE_LINES, 'more run')} on devices (see --json)")
    return out


def _held_lines(held: dict[str, str], task_of: dict[str, str]) -> list[str]:
    """``  queued (train, 2 runs): k8s: 8 GPUs free on 5 nodes, none has 2 free devices ...``:
    the runs the core holds, by task and reason."""
    groups: Counter[tuple[str, str]] = Counter((task_of[rid], why) for rid, why in held.items())
    return [
        f"  queued ({task}, {plural(n, 'run')}): {why}" for (task, why), n in sorted(groups.items())
    ]


def _print_unplaced(
    run_id: str, names: dict[str, str], held: dict[str, str], label: str, *, as_json: bool
) -> int:
    """Print why the run asked about (``--explain RUN``) is not placed; the exit code."""
    doc = _unplaced(run_id, names, held.get(run_id, ""))
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(f"{label} not placed: {doc['reason']}")
    return EXIT_OK


def _unplaced(run_id: str, names: dict[str, str], why: str) -> dict[str, Any]:
    """--explain of a ready run that no placement request of this round carries."""
    return {
        "task": run_id,
        "name": names[run_id],
        "placed": False,
        "reused": False,
        "waits_on": {},
        "reason": why
        or "queued: the free capacity of its pools holds the runs placed before it; it is "
        "placed as capacity frees up",
    }


def _explain_more(problem: Any, run_id: str, why: Any) -> list[str]:
    """For ``--explain`` of a placed run: the data each alternative would move, and every pool
    the run could never use with the placer's reasons (a GPU model it lacks, an input's site it
    cannot reach), so the choice reads as a choice."""
    from stowplan.placement.table import pool_reasons

    out = [
        f"  {a.pool} would move {a.data_bytes / 1e9:.3g} GB of inputs"
        for a in why.alternatives
        if why.chosen is not None and a.data_bytes > why.chosen.data_bytes
    ]
    cls = next((c for c in problem.classes if run_id in c.members), None)
    if cls is None:
        return out
    for p in problem.pools:
        reasons = pool_reasons(problem, cls, p)
        if reasons:
            out.append(f"  not {p.id}: {'; '.join(reasons)}")
    return out


def _waiting_summary(waiting: list[Any]) -> list[dict[str, Any]]:
    """Waiting runs by task: how many, and on which upstream task's runs (distinct, counted)."""
    by_task: dict[str, dict[str, Any]] = {}
    for w in waiting:
        g = by_task.setdefault(w.task, {"task": w.task, "runs": 0, "on": {}})
        g["runs"] += 1
        for up, rids in w.on.items():
            g["on"].setdefault(up, set()).update(rids)
    return [
        {**g, "on": {up: len(rids) for up, rids in sorted(g["on"].items())}}
        for g in by_task.values()
    ]


def _waiting_lines(waits: list[dict[str, Any]]) -> list[str]:
    """``1 run waits on train (24 runs not yet succeeded)``, one line per waiting task."""
    out = []
    for w in waits:
        on = ", ".join(f"{up} ({plural(n, 'run')} not yet succeeded)" for up, n in w["on"].items())
        out.append(
            f"  {w['task']}: {plural(w['runs'], 'run')} {verb(w['runs'], 'waits', 'wait')} on {on}"
        )
    return out


def _counts_text(split: Any, waits: list[dict[str, Any]]) -> str:
    out = ""
    if split.waiting:
        out += f", {len(split.waiting)} waiting on upstream runs"
    if split.reused:
        out += f", {len(split.reused)} already succeeded (reused)"
    return out


def _waiting_runs(waiting: list[Any], names: dict[str, str]) -> dict[str, Any]:
    return {
        w.run_id: {"name": names[w.run_id], "waits_on": {up: len(r) for up, r in w.on.items()}}
        for w in waiting
    }


def _not_placed(run_id: str, w: Any, names: dict[str, str]) -> dict[str, Any]:
    """--explain of a run the plan does not place: it waits on upstream runs, or is reused."""
    if w is None:
        return {
            "task": run_id,
            "name": names[run_id],
            "placed": False,
            "reused": True,
            "waits_on": {},
            "reason": "already succeeded: `stowplan run` reuses it and places nothing",
        }
    parts = []
    order = {rid: i for i, rid in enumerate(names)}
    for up, rids in w.on.items():
        rids = sorted(rids, key=lambda r: (order.get(r, len(order)), r))
        shown = ", ".join(names.get(r, r[:12]) for r in rids[:5])
        more = f" and {len(rids) - 5} more" if len(rids) > 5 else ""
        parts.append(f"{up} ({plural(len(rids), 'run')} not yet succeeded: {shown}{more})")
    return {
        "task": run_id,
        "name": names[run_id],
        "placed": False,
        "reused": False,
        "waits_on": {up: sorted(rids) for up, rids in w.on.items()},
        "reason": "waits on " + "; ".join(parts) + "; it is placed once they have all succeeded",
    }


def _empty_doc(
    prepared: Any, split: Any, waits: list[dict[str, Any]], failed: int
) -> dict[str, Any]:
    return {
        "experiment": prepared.experiment.name,
        "status": None,
        "placed": 0,
        "queued": len(split.ready),
        "fit_no_pool": failed,
        "reused": len(split.reused),
        "waiting": len(split.waiting),
        "waits": waits,
        "assignments": [],
        "runs": {},
    }


def _expand(problem: Any, sol: Any) -> Any:
    from stowplan.placement import expand

    return expand(problem, sol)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.3g} TB"
