"""``stowplan plan FILE``: what a run would get, without submitting anything.

The experiment is prepared as ``run`` would (same spec checks, same providers), pools are
discovered, and the real scheduler core builds the placement problem, with every task treated as
ready at once. The placement engine solves it and the command shows tasks per pool with cost,
data moved and wait, the solver's status, bound and gap, and why anything stays queued.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

EXIT_OK = 0


def add_parsers(sub: Any) -> None:
    pl = sub.add_parser("plan", help="show where each task would run, at what cost; submit nothing")
    pl.add_argument("file")
    pl.add_argument("--provider", help="plan only on this provider from stowplan.toml")
    pl.add_argument(
        "--budget",
        type=float,
        default=None,
        help="deterministic seconds of solver search (default: [placement].budget)",
    )
    pl.add_argument("--explain", metavar="RUN", help="explain one run's placement (id prefix)")
    pl.add_argument("--json", action="store_true")


def cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from stowplan.actors.session import check_feasible, prepare
    from stowplan.cli.run import _discover
    from stowplan.errors import SpecError
    from stowplan.placement import solve
    from stowplan.placement.context import context_for
    from stowplan.placement.explain import explain
    from stowplan.scheduler.core import CoreConfig, SchedulerCore
    from stowplan.scheduler.events import PoolsDiscovered, SolvePlacement, TasksSubmitted

    prepared = prepare(Path(args.file), provider=args.provider, rerun=False)
    context = context_for(prepared.project, prepared.loaded)
    pools = _discover(prepared)
    check_feasible(prepared, pools)
    core = SchedulerCore(CoreConfig(context=context))
    by_provider: dict[str, list[Any]] = {}
    for p in pools:
        by_provider.setdefault(p.provider, []).append(p)
    for name, ps in sorted(by_provider.items()):
        core.handle(PoolsDiscovered(provider=name, pools=ps), now=0.0)
    tasks = [msgspec.structs.replace(r.instance, depends_on=()) for r in prepared.planned]
    out = core.handle(TasksSubmitted(tasks=tasks), now=0.0)
    problems = [c.problem for c in out if isinstance(c, SolvePlacement)]
    names = {r.run_id: f"{r.task}[{r.index}]" for r in prepared.planned}
    settings = prepared.project.config.placement
    budget = settings.budget if args.budget is None else args.budget
    if not problems:
        failed = [r for r in prepared.planned if core.state(r.run_id).name == "FAILED"]
        print("nothing can be placed" + (f": {len(failed)} tasks fit no pool" if failed else ""))
        return EXIT_OK
    problem = problems[0]
    sol = solve(problem, budget=budget, seed=0, workers=settings.workers)
    queued = len(prepared.planned) - sol.placed()

    if args.explain:
        hits = [r for r in prepared.planned if r.run_id.startswith(args.explain)]
        if len(hits) != 1:
            raise SpecError(
                f"--explain {args.explain!r} matches {len(hits)} runs of this plan",
                path="--explain",
                hint="give a longer prefix of a run id from `stowplan plan FILE --json`",
            )
        why = explain(problem, sol, hits[0].run_id)
        if args.json:
            print(json.dumps(msgspec.to_builtins(why), indent=2, sort_keys=True))
        else:
            print(
                why.render().replace(
                    hits[0].run_id, f"{names[hits[0].run_id]} {hits[0].run_id[:12]}"
                )
            )
        return EXIT_OK

    pools_by_id = {p.id: p for p in problem.pools}
    task_of = {r.run_id: r.task for r in prepared.planned}
    class_task = {c.id: task_of[c.members[0]] for c in problem.classes if c.members}
    rows: list[dict[str, Any]] = []
    for a, unit in zip(sol.assignments, sol.unit_terms or [{}] * len(sol.assignments), strict=True):
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
                "tasks": a.count,
                "cost": a.count * unit.get("cost", 0.0),
                "data_bytes": a.count * unit.get("data_bytes", 0.0),
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
            "placed": sol.placed(),
            "queued": queued,
            "unplaced": sol.unplaced,
            "assignments": rows,
            "runs": {
                t.class_id: {"name": names[t.class_id], "pool": t.pool_id, "gpu_model": t.gpu_model}
                for t in _expand(problem, sol)
            },
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_OK
    console = Console(highlight=False)
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
    console.print(table)
    proven = sol.gap == 0 and str(sol.status) == "OPTIMAL"
    gap = "proven optimal" if proven else f"gap {sol.gap:.3%}"
    moved = _bytes(sol.terms.get("data_bytes", 0.0))
    console.print(
        f"{sol.placed()} placed now, {queued} queued; status {sol.status} ({gap}); "
        f"cost {sol.terms.get('cost', 0):.4g}, data moved {moved}, "
        f"solved in {sol.solve_seconds:.2f} s"
    )
    for cid, reason in sorted(sol.unplaced.items()):
        console.print(f"  queued ({class_task.get(cid, cid)}): {reason}")
    if queued and not sol.unplaced:
        console.print(
            "  the rest wait for capacity (or for their dependencies) and are placed as it frees up"
        )
    return EXIT_OK


def _expand(problem: Any, sol: Any) -> Any:
    from stowplan.placement import expand

    return expand(problem, sol)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.3g} TB"
