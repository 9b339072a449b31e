"""``stowplan run``: plan, reuse, record, dispatch through the control plane, watch, report."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stowplan.cli.common import make_console, plural
from stowplan.cli.control import dispatch, stderr_note
from stowplan.provenance.query import output_values, replicate_summary
from stowplan.provenance.records import RunRecord
from stowplan.provenance.store import RunStore

EXIT_OK, EXIT_FAILED = 0, 1


def cmd_run(args: argparse.Namespace) -> int:
    from stowplan.service.client import server_of
    from stowplan.session import check_feasible, discover, prepare, record, save_discovered

    url = server_of(args)
    if url is not None:
        return run_remote(args, url)
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
    planned = prepared.planned
    ids = [r.run_id for r in planned]
    if args.dry_run:
        pools = discover(prepared, dry_run=True, note=stderr_note)
        check_feasible(prepared, pools)
        _print_dry_run(console, prepared, pools)
        return EXIT_OK
    store_path = Path(prepared.store_path)
    reused, todo, seen_before = _reuse(store_path, ids)
    discovered_at = time.time()
    ahead = None
    if todo:
        pools, ahead = _discover_while_ray_starts(
            prepared, args.address, todo=todo, reused=reused, seen_before=seen_before, args=args
        )
    else:
        pools = discover(prepared, note=stderr_note)
        check_feasible(prepared, pools)
    try:
        save_discovered(prepared, pools)
        if not todo:
            with RunStore(store_path) as store:
                record(prepared, store)
        if reused:
            err.print(f"{len(reused)} of {plural(len(ids), 'run')} reused")
        if todo:
            dispatch(
                args,
                prepared,
                todo,
                reused,
                err,
                seen_before=seen_before,
                facts=(pools, discovered_at),
                ahead=ahead,
            )
    finally:
        from stowplan.actors.control import abandon_prestart

        abandon_prestart(Path(prepared.state_dir))  # a no-op once a control plane took it
    name = prepared.experiment.name
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


def _reuse(store_path: Path, ids: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(runs already succeeded, runs to do, runs to do that were stored before), read from
    the store without creating it."""
    existing = {}
    if store_path.exists():
        with RunStore(store_path) as store:
            existing = store.get_runs(ids)
    reused = [i for i in ids if i in existing and existing[i].state == "SUCCEEDED"]
    done = set(reused)
    todo = [i for i in ids if i not in done]
    return reused, todo, [i for i in todo if i in existing]


def _discover_while_ray_starts(
    prepared: Any,
    address: str | None,
    *,
    todo: list[str],
    reused: list[str],
    seen_before: list[str],
    args: argparse.Namespace,
) -> tuple[list[Any], Any]:
    """The providers' pools, found and checked (``check_feasible``) on a thread while this
    one starts the control plane's Ray (``prestart``), which takes seconds; the control
    plane started next takes that Ray over. Where a provider submits ahead, that thread then
    records the runs and submits the first placement (``cli.ahead``); returns the pools and
    what it did (``Ahead``, or None). Ray is stopped again when discovery or the check fails,
    so a refused experiment still leaves nothing behind. Ctrl-C: the thread submits nothing
    more, and what it submitted is cancelled."""
    import importlib
    import threading

    from stowplan.actors.control import abandon_prestart, prestart
    from stowplan.cli.ahead import submit_ahead, wanted
    from stowplan.session import check_feasible, discover

    state_dir = Path(prepared.state_dir)
    got: dict[str, Any] = {}
    stop = threading.Event()

    async def then(pools: list[Any], drivers: Any) -> None:
        check_feasible(prepared, pools)
        if wanted(prepared, drivers):
            got["ahead"] = await submit_ahead(
                prepared,
                pools,
                drivers,
                todo=todo,
                reused=reused,
                seen_before=seen_before,
                why=getattr(args, "why", None) or "",
                provider=args.provider,
                stop=stop,
            )

    def work() -> None:
        try:
            got["pools"] = discover(prepared, then=then)
            # what ``ControlPlane.start`` imports, while Ray is still starting
            for module in ("placement", "provider", "queue", "store"):
                importlib.import_module(f"stowplan.actors.{module}")
        except BaseException as e:  # handed to the main thread, which raises it
            got["error"] = e

    # daemon: a Ctrl-C must not wait for a provider that does not answer
    worker = threading.Thread(target=work, name="stowplan-discover", daemon=True)
    worker.start()
    try:
        # on this thread: Ray sets its SIGTERM handler only on the main thread
        prestart(state_dir=state_dir, address=address)
        worker.join()
        if "error" in got:
            raise got["error"]
    except BaseException as e:
        abandon_prestart(state_dir)
        if isinstance(e, KeyboardInterrupt):
            _cancel_ahead(prepared, worker, stop, got)
        raise
    pools: list[Any] = got["pools"]
    return pools, got.get("ahead")


AHEAD_JOIN_S = 60.0
"""How long Ctrl-C waits for a submit ahead in flight before it cancels what went out."""


def _cancel_ahead(prepared: Any, worker: Any, stop: Any, got: dict[str, Any]) -> None:
    """Ctrl-C while Ray starts: let a submit ahead in flight end, then cancel its runs."""
    stop.set()
    worker.join(AHEAD_JOIN_S)
    ahead = got.get("ahead")
    if ahead is not None and ahead.runs():
        stderr_note(ahead.cancel(prepared, "interrupted from the terminal"))


SEND_LIMIT = 64 << 20
"""Bytes of files a ``run --server`` sends beside the experiment file at most (the service's
``[service] max_body`` decides in the end)."""
POLL_S = (0.5, 1.0, 2.0)
"""Seconds between status polls of ``run --server``: quickly at first, then every 2 s."""


def run_remote(args: argparse.Namespace, url: str) -> int:
    """``run --server``: submit the experiment file and the files beside it, then follow its
    runs as ``run`` does locally. Ctrl-C stops following; the runs go on in the service."""
    import uuid

    from stowplan.errors import SpecError
    from stowplan.service.api import SubmitRequest
    from stowplan.service.client import submit

    for flag, given in (
        ("--dry-run", args.dry_run),
        ("--rerun", args.rerun),
        ("--replicates", getattr(args, "replicates", 1) != 1),
        ("--address", args.address is not None),
    ):
        if given:
            raise SpecError(
                f"{flag} does not work with --server: the service decides where and how "
                "its runs go",
                path=flag,
                hint="leave it out, or run locally without --server"
                + ("; `stowplan plan FILE --server` shows a plan" if flag == "--dry-run" else ""),
            )
    name, text, files = _request_parts(Path(args.file))
    req = SubmitRequest(
        request_id=uuid.uuid4().hex,
        filename=name,
        experiment=text,
        files=files,
        provider=args.provider,
        why=args.why or "",
    )
    err = make_console(stderr=True)
    answer = submit(url, req)
    for note in answer.notes:
        err.print(note, markup=False)
    err.print(
        f"submitted {answer.name} ({answer.experiment_id[:12]}) to {url}: "
        f"{plural(answer.submitted, 'run')} to run, {answer.reused} reused",
        markup=False,
    )
    try:
        rows = _follow_remote(url, answer.experiment_id, set(answer.run_ids), err)
    except KeyboardInterrupt:
        err.print(
            f"stopped following: the runs go on in the service (`stowplan cancel "
            f"{answer.name} --server {url}` cancels them)",
            markup=False,
        )
        return 130
    if args.json:
        status = {
            "experiment": answer.name,
            "experiment_id": answer.experiment_id,
            "counts": _counts(rows),
            "reused": answer.reused,
            "runs": [_run_json(r) for r in rows],
        }
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        console = make_console()
        table = Table(title=answer.name, show_edge=False, title_justify="left")
        for col in ("run", "task", "trial", "params", "state"):
            table.add_column(col)
        for r in rows[:40]:
            state = r.state + (f": {r.reason[:60]}" if r.state != "SUCCEEDED" and r.reason else "")
            table.add_row(
                r.run_id[:10],
                r.task,
                str(r.index),
                " ".join(f"{k}={_fmt(v)}" for k, v in r.params.items()),
                state,
            )
        console.print(table)
        if len(rows) > 40:
            console.print(f"... and {len(rows) - 40} more (stowplan status --server ... --json)")
        console.print(
            ", ".join(f"{n} {s.lower()}" for s, n in sorted(_counts(rows).items()))
            + (f"; {answer.reused} reused" if answer.reused else "")
        )
    return EXIT_FAILED if any(r.state != "SUCCEEDED" for r in rows) else EXIT_OK


def _request_parts(file: Path) -> tuple[str, str, dict[str, bytes]]:
    """The experiment file's name and text and the files beside it, as the service takes
    them; SpecError for what cannot be sent."""
    import re

    from stowplan.errors import SpecError
    from stowplan.service.api import FILE_NAME_PATTERN
    from stowplan.service.client import experiment_files

    if not file.is_file():
        raise SpecError(f"no experiment file {str(file)!r}", hint="give the path of a .toml file")
    if not re.match(FILE_NAME_PATTERN, file.name):
        raise SpecError(
            f"the experiment file's name {file.name!r} cannot be sent to the service",
            file=str(file),
            hint="name it with letters, digits, '_', '.', '-', ending .toml, .yaml or .yml",
        )
    text = file.read_text(encoding="utf-8")
    return file.name, text, experiment_files(file, limit=SEND_LIMIT)


def plan_remote(args: argparse.Namespace, url: str) -> int:
    """``plan --server``: the service plans the experiment on the lab's providers and says
    what ``stowplan plan`` says there; its exit code is the command's."""
    import sys

    import msgspec

    from stowplan.service.api import PlanRequest, PlanResponse
    from stowplan.service.client import call, path_of

    name, text, files = _request_parts(Path(args.file))
    req = PlanRequest(
        filename=name,
        experiment=text,
        files=files,
        provider=args.provider,
        explain=args.explain,
        budget=args.budget,
        json=args.json,
    )
    got = call(
        url, "POST", path_of("plan"), PlanResponse, json=msgspec.to_builtins(req), timeout=600
    )
    sys.stderr.write(got.errors)
    sys.stdout.write(got.output)
    return got.exit_code


def _counts(rows: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    return counts


def _run_json(r: Any) -> dict[str, Any]:
    """One run of ``run --json``, locally (a ``RunRecord``) or through the service (a
    status row): the fields both have."""
    return {
        "run_id": r.run_id,
        "task": r.task,
        "index": r.index,
        "params": r.params,
        "state": r.state,
        "attempts": r.attempts,
        "failure": r.failure,
        "reason": r.reason,
    }


def _follow_remote(url: str, experiment_id: str, ids: set[str], err: Console) -> list[Any]:
    """Poll the experiment's status until each of ``ids`` shown is final; a line on stderr
    whenever the counts change. A service that does not answer for a while is waited for."""
    import time

    from stowplan.errors import SpecError
    from stowplan.scheduler.states import FINAL
    from stowplan.service.client import RESUME_FOR_S, remote_status

    started = answered = time.monotonic()
    last = ""
    polls = 0
    while True:
        try:
            rows = [r for r in remote_status(url, experiment_id) if r.run_id in ids]
            answered = time.monotonic()
        except SpecError as e:
            if not e.message.startswith("cannot reach"):
                raise
            if time.monotonic() - answered > RESUME_FOR_S:
                raise
            time.sleep(POLL_S[-1])
            continue
        counts = _counts(rows)
        line = "  ".join(f"{s.lower()} {n}" for s, n in sorted(counts.items()))
        if line != last:
            err.print(f"[{time.monotonic() - started:6.1f}s] {line}", markup=False)
            last = line
        if rows and all(r.state in FINAL for r in rows):
            return sorted(rows, key=lambda r: (r.task, r.index))
        time.sleep(POLL_S[min(polls, len(POLL_S) - 1)])
        polls += 1


def _dry_run_pools(prepared: Any, pools: list[Any]) -> dict[str, tuple[str, str]]:
    """run id -> (provider, pool) the placer gives it, found the way the run's core finds it.

    First the runs ready at once (no upstream) in one problem, as the first solve of a real run
    sees them; then each task's first trial that this left unplaced (it waits for capacity, or
    for upstream runs) alone, as the core would place it once room frees or its upstream runs
    have succeeded. Runs that fit nowhere are left out."""
    import msgspec

    from stowplan.placement import solve
    from stowplan.placement.context import context_for
    from stowplan.placement.problem import expand
    from stowplan.scheduler.core import CoreConfig, SchedulerCore
    from stowplan.scheduler.events import PoolsDiscovered, SolvePlacement, TasksSubmitted

    settings = prepared.project.config.placement
    context = context_for(prepared.project, prepared.loaded)
    by_provider: dict[str, list[Any]] = {}
    for p in pools:
        by_provider.setdefault(p.provider, []).append(p)
    provider_of = {p.id: p.provider for p in pools}
    out: dict[str, tuple[str, str]] = {}

    def place(tasks: list[Any]) -> None:
        core = SchedulerCore(CoreConfig(context=context))
        for name, ps in sorted(by_provider.items()):
            core.handle(PoolsDiscovered(provider=name, pools=ps), now=0.0)
        cmds = core.handle(TasksSubmitted(tasks=tasks), now=0.0)
        for problem in (c.problem for c in cmds if isinstance(c, SolvePlacement)):
            sol = solve(problem, budget=settings.budget, seed=0, workers=settings.workers)
            for a in expand(problem, sol):
                out[a.class_id] = (provider_of[a.pool_id], a.pool_id)

    ready = [r.instance for r in prepared.planned if not r.depends_on]
    if ready:
        place(ready)
    firsts: dict[str, Any] = {}
    for r in prepared.planned:
        firsts.setdefault(r.task, r)
    for r in firsts.values():
        if r.run_id not in out:
            place([msgspec.structs.replace(r.instance, depends_on=())])
    return out


def _print_dry_run(console: Console, prepared: Any, pools: list[Any]) -> None:
    """Each task's first trial, rendered by the provider's ``plan`` with the facts of this
    discovery (or the saved ones): exactly the request ``submit`` would send."""
    from stowplan.providers.base import Facts
    from stowplan.providers.registry import make_provider
    from stowplan.session import launch_spec, payload
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
        needs = f"{r.instance.cpus:g} cpu, {r.instance.memory / 2**30:.2g} GiB"
        if r.instance.gpus:
            needs += f", {r.instance.gpu_amount:g} gpu"
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
    placed = _dry_run_pools(prepared, pools)
    drivers: dict[str, Any] = {}
    for r in planned:
        if r.task in seen:
            continue
        seen.add(r.task)
        where = placed.get(r.run_id)
        if where is None:
            console.print(f"\n[bold]{r.task}[/] (first trial): no pool can take it now")
            continue
        name, pool = where
        driver = drivers.get(name)
        if driver is None:
            cfg = prepared.providers[name]
            driver = drivers[name] = make_provider(name, cfg, state_dir=Path(prepared.state_dir))
        facts = Facts.of([p for p in pools if p.provider == name])
        spec = launch_spec(payload(prepared, r), r.run_id, 1, attempt_key(r.run_id, 1), pool)
        console.print(f"\n[bold]{r.task}[/] (first trial) on provider {name}, pool {pool}:")
        # exactly what submit sends: no markup, no emoji codes, no highlighting
        console.print(
            driver.plan([spec], facts)[0].render(),
            markup=False,
            emoji=False,
            highlight=False,
            soft_wrap=True,
        )


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
    counts = _counts(runs)
    console.print(
        ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + (f"; {len(reused)} reused" if reused else "")
    )


def _status_json(name: str, runs: list[RunRecord], reused: set[str]) -> dict[str, Any]:
    return {
        "experiment": name,
        "counts": _counts(runs),
        "reused": len(reused),
        "runs": [{**_run_json(r), "reused": r.run_id in reused} for r in runs],
    }
