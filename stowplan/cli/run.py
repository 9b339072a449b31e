"""``stowplan run``: plan, reuse, record, dispatch through the control plane, watch, report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from stowplan.cli.common import make_console, plural
from stowplan.provenance.query import output_values, replicate_summary
from stowplan.provenance.records import RunRecord
from stowplan.provenance.store import RunStore
from stowplan.scheduler.states import FINAL

EXIT_OK, EXIT_FAILED = 0, 1


DRY_RUN_DISCOVER_S = 10.0
"""How long a dry run waits for a provider's discovery before it uses the saved facts."""


def _discover(
    prepared: Any, *, dry_run: bool = False, timeout_s: float = DRY_RUN_DISCOVER_S
) -> list[Any]:
    """Every configured provider's pools; writes nothing.

    A real run saves them with ``save_discovered`` once the experiment is known to be
    feasible, for later dry runs. A dry run waits at most ``timeout_s`` per provider and, where
    one cannot be reached, plans with its saved facts and says so on stderr, or fails with a
    ``SpecError`` (exit 2) when there are none.
    """
    from stowplan.errors import ProviderError, SpecError
    from stowplan.providers.facts import load_facts
    from stowplan.providers.registry import make_provider

    state_dir = Path(prepared.state_dir)

    async def one(name: str, cfg: Any) -> list[Any]:
        async with make_provider(name, cfg, state_dir=state_dir) as drv:
            if not dry_run:
                return await drv.discover()
            with anyio.fail_after(timeout_s):
                return await drv.discover()

    async def go() -> list[Any]:
        pools: list[Any] = []
        for name, cfg in sorted(prepared.providers.items()):
            try:
                pools.extend(await one(name, cfg))
            except (ProviderError, TimeoutError) as e:
                if not dry_run:
                    raise
                why = (
                    f"no answer within {timeout_s:g} s"
                    if isinstance(e, TimeoutError)
                    else str(e).removeprefix(f"{name}: ")
                )
                cached, missing = load_facts(state_dir, name, cfg)
                if cached is None:
                    raise SpecError(
                        f"provider {name!r} is unreachable ({why}), and a dry run has no facts "
                        f"from an earlier discovery to plan with: {missing}",
                        file=prepared.project.file,
                        path=f"$.providers.{name}",
                        hint="make the cluster reachable (host, port, network, keys) and try "
                        "again; a real run that reaches it saves its facts for offline dry runs",
                    ) from None
                print(
                    f"{name}: unreachable ({why}); using facts discovered {cached.when()}",
                    file=sys.stderr,
                    flush=True,
                )
                pools.extend(cached.pools)
        return pools

    return anyio.run(go)


def save_discovered(prepared: Any, pools: list[Any]) -> None:
    """Save each provider's discovered pools (``.stowplan/facts/``) for offline dry runs."""
    from stowplan.providers.facts import save_facts

    for name, cfg in sorted(prepared.providers.items()):
        save_facts(Path(prepared.state_dir), name, cfg, [p for p in pools if p.provider == name])


def cmd_run(args: argparse.Namespace) -> int:
    from stowplan.actors.session import check_feasible, prepare, record

    console = make_console()
    err = make_console(stderr=True)
    prepared = prepare(
        args.file,
        provider=args.provider,
        rerun=args.rerun,
        replicates=getattr(args, "replicates", 1),
    )
    for note in prepared.notes:  # e.g. stored runs not reused, and why
        err.print(note, markup=False)
    from stowplan.placement.context import context_for

    context_for(prepared.project, prepared.loaded)  # unknown residency rules: exit 2 now
    pools = _discover(prepared, dry_run=args.dry_run)
    check_feasible(prepared, pools)
    planned = prepared.planned
    ids = [r.run_id for r in planned]

    if args.dry_run:
        _print_dry_run(console, prepared)
        return EXIT_OK
    save_discovered(prepared, pools)

    store_path = Path(prepared.store_path)
    with RunStore(store_path) as store:
        existing = store.get_runs(ids)
        reused = [i for i in ids if existing.get(i) and existing[i].state == "SUCCEEDED"]
        todo = [i for i in ids if i not in set(reused)]
        seen_before = [i for i in todo if i in existing]
        if not todo:
            record(prepared, store)
    name = prepared.experiment.name
    if reused:
        err.print(f"{len(reused)} of {plural(len(ids), 'run')} reused")
    if todo:
        _dispatch(args, prepared, todo, reused, err, seen_before=seen_before)
    with RunStore(store_path) as store:
        final = store.get_runs(ids)
        artifacts = store.artifacts_for(ids)
    ordered = [final[i] for i in ids if i in final]
    summary = replicate_summary(ordered, artifacts) if prepared.replicates > 1 else None
    if args.json:
        status = _status_json(name, ordered, set(reused))
        if summary is not None:
            status["replicates"] = summary
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        render_results(console, ordered, artifacts, set(reused))
        if summary is not None:
            render_replicates(console, summary)
    failed = [r for r in ordered if r.state != "SUCCEEDED"]
    return EXIT_FAILED if failed else EXIT_OK


def _dispatch(
    args: argparse.Namespace,
    prepared: Any,
    todo: list[str],
    reused: list[str],
    err: Console,
    *,
    seen_before: list[str] | None = None,
    after_record: Callable[[RunStore], None] | None = None,
) -> None:
    """Start (or join) the control plane, record the runs, hand them over, watch them.

    The control plane boots first, so what it restores from the store is what earlier,
    interrupted invocations left unfinished, not the runs about to be submitted.
    ``after_record`` writes the ledger entry (and any links) instead of a plain submit entry.
    """
    from stowplan.actors.control import ControlPlane
    from stowplan.actors.session import record, record_submission, submissions
    from stowplan.placement.context import context_for

    settings = prepared.project.config.placement
    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        address=args.address,
        poll_max=1.0,
        context=context_for(prepared.project, prepared.loaded),
        budget=settings.budget,
        workers=settings.workers,
    )
    ids = list(todo)
    total = len(ids)
    started = time.monotonic()
    plane.start()
    failed = True
    try:
        with RunStore(Path(prepared.store_path)) as store:
            record(prepared, store)
            if after_record is not None:
                after_record(store)
            else:
                record_submission(
                    prepared,
                    store,
                    todo,
                    seen_before=seen_before or [],
                    why=getattr(args, "why", None) or "",
                    provider=args.provider,
                )
        plane.submit(submissions(prepared, set(todo)), reused)
        watch(plane, ids, total, started, err)
        failed = False
    except KeyboardInterrupt:
        err.print("interrupted: cancelling unfinished runs")
        plane.cancel(ids, "interrupted from the terminal")
        watch(plane, ids, total, started, err)
        failed = False
    finally:
        # after a failure, only stop: draining would wait on the actor that failed
        plane.stop(drain=not failed)


def watch(plane: Any, ids: list[str], total: int, started: float, err: Console) -> None:
    """Poll the queue until every run is final; a live bar on a terminal, lines otherwise.

    Raises ``ControlPlaneError`` as soon as the queue reports a fatal error: a failed actor
    ends the run instead of leaving it waiting."""
    from rich.text import Text

    live = err.is_terminal
    progress = (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        if live
        else None
    )
    task_id = progress.add_task("starting", total=total) if progress else None
    last_line = ""
    last_print = 0.0
    shown_errors = 0
    if progress:
        progress.start()
    try:
        while True:
            info = plane.progress(ids)
            counts: dict[str, int] = info["counts"]
            done = sum(counts.get(s, 0) for s in FINAL)
            queued = sum(
                counts.get(s, 0)
                for s in ("PENDING", "READY", "PLACED", "SUBMITTING", "QUEUED", "RETRYING")
            )
            line = (
                f"queued {queued}  running {counts.get('RUNNING', 0)}  "
                f"succeeded {counts.get('SUCCEEDED', 0)}  failed {counts.get('FAILED', 0)}"
                + (f"  cancelled {counts['CANCELLED']}" if counts.get("CANCELLED") else "")
                + (f"  lost {counts['LOST']}" if counts.get("LOST") else "")
            )
            if progress is not None and task_id is not None:
                progress.update(task_id, completed=done, description=line)
            else:
                now = time.monotonic()
                if line != last_line and (now - last_print >= 2.0 or done == total):
                    elapsed = now - started
                    eta = ""
                    if 0 < done < total:
                        eta = f"  eta {elapsed / done * (total - done):.0f}s"
                    print(f"[{elapsed:6.1f}s] {line}{eta}", file=sys.stderr, flush=True)
                    last_line, last_print = line, now
            for e in info["errors"][shown_errors:]:
                # Ray's messages carry colour codes: rich keeps them on a terminal, drops them
                # in a pipe or file
                err.print(Text.from_ansi(f"control plane error: {e}", style="red"))
            shown_errors = len(info["errors"])
            if info.get("fatal"):
                raise plane.failure(info["fatal"])
            if done >= total:
                return
            time.sleep(0.2)
    finally:
        if progress:
            progress.stop()


def _print_dry_run(console: Console, prepared: Any) -> None:
    from stowplan.actors.queue import launch_spec
    from stowplan.actors.session import payload
    from stowplan.providers.registry import make_provider
    from stowplan.spec.canonical import attempt_key

    planned = prepared.planned
    console.print(
        f"[bold]{prepared.experiment.name}[/]: {plural(len(planned), 'run')} "
        f"(experiment {prepared.experiment.id[:12]}, replicate {prepared.replicate})"
    )
    table = Table(show_edge=False)
    for col in ("run", "task", "trial", "params", "needs", "after"):
        table.add_column(col)
    for r in planned[:50]:
        needs = f"{r.launch.cpus:g} cpu, {r.launch.memory / 2**30:.2g} GiB"
        if r.launch.gpus:
            needs += f", {r.launch.gpus} gpu"
        table.add_row(
            r.run_id[:12],
            r.task,
            str(r.index),
            " ".join(f"{k}={v}" for k, v in r.params.items()),
            needs,
            str(len(r.depends_on)) if r.depends_on else "",
        )
    console.print(table)
    if len(planned) > 50:
        console.print(f"... and {len(planned) - 50} more")
    seen: set[str] = set()
    name = next(iter(sorted(prepared.providers)))
    driver = make_provider(name, prepared.providers[name], state_dir=Path(prepared.state_dir))
    for r in planned:
        if r.task in seen:
            continue
        seen.add(r.task)
        spec = launch_spec(payload(prepared, r), r.run_id, 1, attempt_key(r.run_id, 1), name)
        console.print(f"\n[bold]{r.task}[/] (first trial) on provider {name}:")
        console.print(driver.plan([spec])[0].render(), markup=False, soft_wrap=True)


def render_replicates(console: Console, summary: list[dict[str, Any]]) -> None:
    names = sorted({m for s in summary for m in s["metrics"]})
    table = Table(title="replicates: mean ± std", show_edge=False, title_justify="left")
    for col in ("task", "trial", "params", "n"):
        table.add_column(col)
    for m in names:
        table.add_column(m, justify="right")
    for s in summary[:40]:
        table.add_row(
            s["task"],
            str(s["index"]),
            " ".join(f"{k}={v}" for k, v in s["params"].items()),
            f"{s['succeeded']}/{s['replicates']}",
            *(
                f"{s['metrics'][m]['mean']:.4g} ± {s['metrics'][m]['std']:.2g}"
                if m in s["metrics"]
                else ""
                for m in names
            ),
        )
    console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_results(
    console: Console, runs: list[RunRecord], artifacts: dict[str, list[Any]], reused: set[str]
) -> None:
    by_task: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_task.setdefault(r.task, []).append(r)
    for task, rs in by_task.items():
        params = sorted({k for r in rs for k in r.params})
        metrics_of = {r.run_id: output_values(artifacts.get(r.run_id, [])) for r in rs}
        metric_names = sorted({k for m in metrics_of.values() for k in m})
        table = Table(title=f"{task}", show_edge=False, title_justify="left")
        table.add_column("run")
        for p in params:
            table.add_column(p, justify="right")
        table.add_column("state")
        any_reused = any(r.run_id in reused for r in rs)
        if any_reused:
            table.add_column("reused")
        for m in metric_names:
            table.add_column(m, justify="right")
        shown = rs[:40]
        for r in shown:
            state = r.state
            if r.state != "SUCCEEDED" and r.reason:
                state += f": {r.reason[:60]}"
            table.add_row(
                r.run_id[:10],
                *(_fmt(r.params.get(p, "")) for p in params),
                state,
                *(["yes" if r.run_id in reused else ""] if any_reused else []),
                *(_fmt(metrics_of[r.run_id].get(m, "")) for m in metric_names),
            )
        console.print(table)
        if len(rs) > len(shown):
            console.print(f"... and {len(rs) - len(shown)} more (stowplan status --json)")
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.state] = counts.get(r.state, 0) + 1
    console.print(
        ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + (f"; {len(reused)} reused" if reused else "")
    )


def _status_json(name: str, runs: list[RunRecord], reused: set[str]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.state] = counts.get(r.state, 0) + 1
    return {
        "experiment": name,
        "counts": counts,
        "reused": len(reused),
        "runs": [
            {
                "run_id": r.run_id,
                "task": r.task,
                "index": r.index,
                "params": r.params,
                "state": r.state,
                "attempts": r.attempts,
                "failure": r.failure,
                "reason": r.reason,
                "reused": r.run_id in reused,
            }
            for r in runs
        ],
    }
