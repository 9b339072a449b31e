"""Reaching the providers and the control plane: discovery for planning, and dispatching
recorded runs to the control plane while watching them to the end.

``run`` and ``replay`` share these; discovery itself is ``session.discover`` (the service
uses it too), re-exported here with its notes on stderr. Imported only by those commands
(never by ``build_parser()``), so rich's progress bar loads here at import time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stowplan.provenance.store import RunStore
from stowplan.scheduler.states import FINAL, WAITING, TaskState
from stowplan.session import DRY_RUN_DISCOVER_S, save_discovered

__all__ = [
    "DRY_RUN_DISCOVER_S",
    "discover",
    "dispatch",
    "save_discovered",
    "stderr_note",
    "watch",
]


def discover(
    prepared: Any, *, dry_run: bool = False, timeout_s: float = DRY_RUN_DISCOVER_S
) -> list[Any]:
    """``session.discover``, saying on stderr where a dry run used saved facts."""
    from stowplan.session import discover as _discover

    return _discover(prepared, dry_run=dry_run, timeout_s=timeout_s, note=stderr_note)


def stderr_note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def dispatch(
    args: argparse.Namespace,
    prepared: Any,
    todo: list[str],
    reused: list[str],
    err: Console,
    *,
    seen_before: list[str] | None = None,
    after_record: Callable[[RunStore], None] | None = None,
    facts: tuple[list[Any], float] | None = None,
    ahead: Any = None,
) -> None:
    """Start (or join) the control plane, record the runs, hand them over, watch them.

    The control plane boots first, so what it restores from the store is what earlier,
    interrupted invocations left unfinished, not the runs about to be submitted; except
    after a submit ahead (``ahead``, ``cli.ahead``), which recorded the runs already and
    which the control plane takes over as it boots.
    ``after_record`` writes the ledger entry (and any links) instead of a plain submit entry.
    ``facts``: the pools just discovered and when (``time.time()``) that discovery began,
    for the provider actors' first discovery.
    """
    from stowplan.actors.control import ControlPlane
    from stowplan.placement.context import context_for
    from stowplan.session import record, record_submission, submissions

    settings = prepared.project.config.placement
    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        address=args.address,
        context=context_for(prepared.project, prepared.loaded),
        budget=settings.budget,
        workers=settings.workers,
        facts=facts[0] if facts is not None else None,
        facts_at=facts[1] if facts is not None else 0.0,
    )
    ids = list(todo)
    total = len(ids)
    started = time.monotonic()
    try:
        plane.start()
    except KeyboardInterrupt:
        if ahead is not None and ahead.runs():  # nobody took over what went out ahead
            stderr_note(ahead.cancel(prepared, "interrupted from the terminal"))
        raise
    failed = True
    try:
        if ahead is None:  # else recorded ahead, with its ledger entry
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


FOLLOW_MIN_S = 0.2
"""``watch`` asks for progress at most this often (a sweep of fast trials changes all the time)."""
FOLLOW_WAIT_S = 2.0
"""and the queue holds each question this long at most while nothing changes, so the bar's
line is redrawn at least that often."""


def watch(plane: Any, ids: list[str], total: int, started: float, err: Console) -> None:
    """Follow the queue until every run is final; a live bar on a terminal, lines otherwise.

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
        counts: dict[str, int] | None = None
        asked = 0.0
        while True:
            # at most every FOLLOW_MIN_S, and waiting in the queue until something changes
            time.sleep(max(0.0, asked + FOLLOW_MIN_S - time.monotonic()))
            asked = time.monotonic()
            info = plane.progress(ids, since=counts, wait=FOLLOW_WAIT_S)
            counts = info["counts"]
            done = sum(counts.get(s, 0) for s in FINAL)
            queued = sum(counts.get(s, 0) for s in WAITING if s is not TaskState.LOST)
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
    finally:
        if progress:
            progress.stop()
