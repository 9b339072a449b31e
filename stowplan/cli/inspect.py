"""``stowplan ls | status | show | logs | cancel``: reading (and cancelling) what was recorded."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from rich.table import Table

from stowplan.cli.common import make_console, open_store, plural, resolve_run
from stowplan.errors import SpecError
from stowplan.placement.leases import devices_text, lease_from_columns
from stowplan.provenance.records import AttemptRecord
from stowplan.provenance.store import ACTIVE_ATTEMPT_STATES, RunStore
from stowplan.scheduler.states import FINAL

EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command that Ctrl-C ended."""


def attempt_place(a: AttemptRecord) -> str:
    """``node n1, GPUs 0,1`` (``GPUs none``; no GPUs where the pool does not lease devices):
    where an attempt ran, a gang's nodes one after another, ``; `` between."""
    lease = lease_from_columns(a.node, a.devices)
    if lease is not None and lease.others:
        return "; ".join(
            f"node {node}, GPUs {devices_text(devices) or 'none'}"
            for node, devices in lease.parts()
        )
    return f"node {a.node}" + (f", GPUs {a.devices or 'none'}" if a.devices is not None else "")


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def cmd_ls(args: argparse.Namespace) -> int:
    from stowplan.service.client import remote_experiments, server_of
    from stowplan.service.views import list_experiments

    url = server_of(args)
    if url is not None:
        exps = remote_experiments(url)
    else:
        store, _ = open_store(args)
        with store:
            exps = list_experiments(store)
    spent = {e.id: e.usd for e in exps if e.usd is not None}
    rows = [(e, e.counts) for e in exps]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": e.id,
                        "name": e.name,
                        "project": e.project,
                        "created_at": e.created_at,
                        "description": e.description,
                        "counts": c,
                        "usd": spent.get(e.id),
                    }
                    for e, c in rows
                ],
                indent=2,
                sort_keys=True,
            )
        )
        return 0
    table = Table(show_edge=False)
    for col in ("experiment", "id", "created", "runs", "cost", "description"):
        table.add_column(col, justify="right" if col == "cost" else "left")
    for e, c in rows:
        table.add_row(
            e.name,
            e.id[:12],
            _ago(e.created_at),
            " ".join(f"{n} {s.lower()}" for s, n in sorted(c.items())),
            usd_text(spent.get(e.id)),
            e.description[:60],
        )
    make_console().print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from stowplan.service.client import remote_status, server_of
    from stowplan.service.views import experiment_runs, status_rows

    url = server_of(args)
    if url is not None:
        shown = remote_status(url, args.experiment)
    else:
        store, _ = open_store(args)
        with store:
            # the newest replicate of each trial
            shown = status_rows(store, experiment_runs(store, args.experiment))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "run_id": r.run_id,
                        "experiment": r.experiment,
                        "task": r.task,
                        "index": r.index,
                        "params": r.params,
                        "state": r.state,
                        "attempts": r.attempts,
                        "failure": r.failure,
                        "reason": r.reason,
                        "replicate": r.replicate,
                        "cost": r.cost,
                        "service": msgspec.to_builtins(r.service),
                    }
                    for r in shown
                ],
                indent=2,
                sort_keys=True,
            )
        )
        return 0
    console = make_console()
    per_task: dict[tuple[str, str], dict[str, int]] = {}
    task_usd: dict[tuple[str, str], float] = {}
    for r in shown:
        c = per_task.setdefault((r.experiment, r.task), {})
        c[r.state] = c.get(r.state, 0) + 1
        cost = r.cost
        if cost is not None:
            task_usd[(r.experiment, r.task)] = (
                task_usd.get((r.experiment, r.task), 0.0) + cost["usd"]
            )
    table = Table(show_edge=False)
    for col in ("experiment", "task", "runs", "states", "cost"):
        table.add_column(col, justify="right" if col == "cost" else "left")
    for (e, t), c in per_task.items():
        table.add_row(
            e,
            t,
            str(sum(c.values())),
            " ".join(f"{n} {s.lower()}" for s, n in sorted(c.items())),
            usd_text(task_usd.get((e, t))),
        )
    console.print(table)
    for r in shown:
        if r.state in ("FAILED", "CANCELLED"):
            console.print(
                f"  {r.run_id[:12]} {r.task}[{r.index}] {r.state} ({r.failure}): {r.reason}",
                markup=False,
            )
        elif r.state == "READY" and r.reason:  # waiting, and why (a budget holds it)
            console.print(f"  {r.run_id[:12]} {r.task}[{r.index}] READY: {r.reason}", markup=False)
        elif r.service is not None:
            console.print(f"  {r.run_id[:12]} {r.task}[{r.index}] {_service_text(r)}", markup=False)
    return 0


def _service_text(r: Any) -> str:
    """``service RUNNING at 127.0.0.1:8888 (2 restarts)``, or why it is not answering."""
    svc = r.service
    where = f"at {svc.endpoint}" if svc.endpoint else f"{r.state.lower()} (not answering now)"
    text = f"service {r.state} {where}" if svc.endpoint else f"service {where}"
    if svc.restarts:
        text += f" ({plural(svc.restarts, 'restart')})"
    if r.state == "RETRYING" and r.reason:
        text += f": {r.reason}"
    return text


def usd_text(usd: float | None) -> str:
    """Dollars for people: cents, or fractions of a cent when smaller; "-" when unpriced."""
    if usd is None:
        return "-"
    return f"${usd:,.2f}" if usd >= 0.01 or usd == 0 else f"${usd:.4f}"


def attempt_cost_text(a: AttemptRecord) -> str:
    """``$0.0168 (60 s billed, g5.xlarge on-demand)``: what one priced attempt cost."""
    return f"${a.usd or 0:,.4f} ({a.billed_s or 0:,.0f} s billed, {a.instance_type} {a.market})"


def code_line(code: dict[str, Any]) -> str:
    """``code: <version> (...)``: the branch and remote in git; outside git, what was hashed."""
    from stowplan.provenance.capture import TreeHash

    if code.get("tree"):
        return f"code: {code.get('version')} ({msgspec.convert(code['tree'], TreeHash).describe()})"
    return (
        f"code: {code.get('version')} (branch {code.get('branch')}"
        + (f", remote {code['remote_url']}" if code.get("remote_url") else "")
        + ")"
    )


def used_line(used: dict[str, str] | None) -> str:
    """What a run imported, as captured where it ran (``provenance.imports``)."""
    if used is None:
        return (
            "used: nothing captured (no Python ran, it has not succeeded, or its provider kept "
            "no record)"
        )
    if not used:
        return "used (captured where it ran): the standard library only"
    return "used (captured where it ran): " + ", ".join(f"{k}=={v}" for k, v in used.items())


def cmd_show(args: argparse.Namespace) -> int:
    from stowplan.service.client import call, path_of, server_of
    from stowplan.service.views import RunDetail, run_detail

    url = server_of(args)
    if url is not None:
        detail = call(url, "GET", path_of("runs", args.run), RunDetail)
    else:
        store, (project, state_dir) = open_store(args)
        with store:
            detail = run_detail(
                store,
                resolve_run(store, args.run),
                providers=dict(project.config.providers),
                state_dir=state_dir,
            )
    run, exp, prov = detail.run, detail.experiment, detail.provenance
    attempts, artifacts, ledger = detail.attempts, detail.artifacts, detail.ledger
    placements, replay_of, replays = detail.placements, detail.replay_of, detail.replays
    data = {
        "run": msgspec.to_builtins(run),
        "attempts": msgspec.to_builtins(attempts),
        "artifacts": msgspec.to_builtins(artifacts),
        "events": msgspec.to_builtins(detail.events),
        "provenance": msgspec.to_builtins(prov),
        "placements": msgspec.to_builtins(placements),
        "replay_of": msgspec.to_builtins(replay_of),
        "replays": msgspec.to_builtins(replays),
        "ledger": msgspec.to_builtins(ledger),
        "used": detail.used,
    }
    spec = exp.spec if exp is not None else {}
    data["run"]["task_spec"] = next(
        (t for t in spec.get("tasks", []) if t.get("name") == run.task), {}
    )
    data["launch"] = run.task_spec.get("payload", {}).get("launch", {})
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    c = make_console(soft_wrap=True)  # hashes and paths stay on one line
    c.print(f"[bold]run {run.run_id}[/]")
    c.print(
        f"  experiment {run.experiment}  task {run.task}[{run.index}]  "
        f"replicate {run.replicate}  seed {run.seed}"
    )
    c.print(
        f"  state {run.state}"
        + (f" ({run.failure}): {run.reason}" if run.failure else "")
        + (f": {run.reason}" if run.state == "READY" and run.reason else "")
    )
    c.print(f"  params {json.dumps(run.params, sort_keys=True)}")
    launch = data["launch"]
    if launch.get("argv"):
        c.print(f"  command {shlex.join(launch['argv'])}", markup=False)
    elif launch.get("script"):
        c.print(f"  script {launch['script']}", markup=False)
    ident = run.identity
    c.print("[bold]identity[/]")
    for k in ("task_spec_hash", "code_version", "env_hash", "data_versions", "upstream"):
        v = ident.get(k)
        if isinstance(v, list):
            v = plural(len(v), "run") if v else "none"
        c.print(f"  {k}: {v}", markup=False)
    c.print("[bold]provenance[/]")
    code, env, hw = prov.code, prov.environment, prov.hardware
    c.print(f"  {code_line(code)}", markup=False)
    if code.get("dirty"):
        c.print(
            f"  uncommitted diff: blob {code.get('diff_sha256')}"
            + (
                f"; untracked {', '.join(code.get('untracked', []))}"
                if code.get("untracked")
                else ""
            )
            + (
                f"; too large, hashed only: {', '.join(code['skipped'])}"
                if code.get("skipped")
                else ""
            ),
            markup=False,
        )
    py = env.get("python") or {}
    c.print(
        f"  python {py.get('version', '?') if isinstance(py, dict) else py}, "
        f"{len(env.get('distributions', []))} distributions"
        + (f", lock files {', '.join(sorted(env['lock_files']))}" if env.get("lock_files") else "")
        + (f", image {env['container_image']}" if env.get("container_image") else ""),
        markup=False,
    )
    if env.get("env_basis"):
        c.print(f"  environment in the identity: {env['env_basis']}", markup=False)
    c.print(f"  {used_line(data['used'])}", markup=False)
    if env.get("env_vars"):
        c.print(
            "  env " + " ".join(f"{k}={v}" for k, v in sorted(env["env_vars"].items())),
            markup=False,
        )
    c.print(
        f"  host {hw.get('hostname')}: {hw.get('cpu_model')} x{hw.get('cpu_count')}, "
        f"{(hw.get('memory_total_bytes') or hw.get('memory_bytes') or 0) / 2**30:.1f} GiB, "
        f"{plural(len(hw.get('gpus') or []), 'GPU')}",
        markup=False,
    )
    for g in hw.get("gpus") or []:
        c.print(
            f"    gpu {g.get('index')}: {g.get('name')} {g.get('uuid')} driver "
            f"{g.get('driver_version')} CUDA {g.get('cuda_version')}",
            markup=False,
        )
    for uri, d in sorted(prov.data.items()):
        size = f", {d['size']} B" if d.get("size") is not None else ""
        c.print(f"  data {uri}: {d.get('version')}{size}", markup=False)
    if placements:
        c.print("[bold]placement[/]")
        for pl in placements:
            terms = " ".join(f"{k}={v:g}" for k, v in sorted(pl.terms.items()))
            c.print(
                f"  #{pl.attempt} {pl.provider}/{pl.pool} class {pl.hardware_class} "
                f"{pl.status} objective {pl.objective:g} gap {pl.gap:g} {terms}",
                markup=False,
            )
    if replay_of is not None:
        c.print(
            f"  replay of {replay_of.of_run_id[:12]}"
            + (f": {replay_of.verdict}" if replay_of.verdict else ""),
            markup=False,
        )
    for rp in replays:
        c.print(
            f"  replayed as {rp.run_id[:12]}" + (f": {rp.verdict}" if rp.verdict else ""),
            markup=False,
        )
    c.print("[bold]attempts[/]")
    for a in attempts:
        c.print(
            f"  #{a.attempt} {a.state} on {a.provider}/{a.pool} job {a.job_id} "
            f"{attempt_place(a)} exit {a.exit_code}"
            + (f" {a.failure}: {a.message}" if a.failure else ""),
            markup=False,
        )
        if a.usd is not None:
            c.print(f"    cost {attempt_cost_text(a)}", markup=False)
    c.print("[bold]artifacts[/]")
    for art in artifacts:
        c.print(f"  {art.name}  sha256:{art.sha256[:16]}  {art.size} B", markup=False)
    if ledger:
        c.print("[bold]audit[/]")
        for e in ledger:
            c.print(
                f"  #{e.seq} {e.action} by {e.who}" + (f": {e.why}" if e.why else ""), markup=False
            )
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from stowplan.providers.base import LogStream
    from stowplan.providers.registry import make_provider
    from stowplan.service.client import follow_logs, server_of

    url = server_of(args)
    if url is not None:

        def write(chunk: bytes) -> None:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()

        try:
            follow_logs(
                url,
                args.run,
                write,
                stream="stderr" if args.stderr else "stdout",
                attempt=args.attempt,
                follow=args.follow,
            )
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return 0
    store, (project, state_dir) = open_store(args)
    with store:
        run_id = resolve_run(store, args.run)
        attempts = store.attempts_for([run_id]).get(run_id, [])
    if not attempts:
        raise SpecError(f"run {run_id[:12]} has no attempts yet", hint="wait until it starts")
    if args.attempt is not None:
        chosen = [a for a in attempts if a.attempt == args.attempt]
        if not chosen:
            raise SpecError(
                f"run {run_id[:12]} has no attempt {args.attempt}",
                hint=f"attempts: {', '.join(str(a.attempt) for a in attempts)}",
            )
        att = chosen[0]
    else:
        att = attempts[-1]
    cfg = project.config.providers.get(att.provider)
    if cfg is None:
        raise SpecError(
            f"provider {att.provider!r} of this run is no longer configured",
            file=project.file,
            path="$.providers",
            hint="configure it again",
        )
    stream: LogStream = "stderr" if args.stderr else "stdout"

    async def go() -> None:
        async with make_provider(att.provider, cfg, state_dir=state_dir) as drv:
            async for chunk in drv.logs(att.key, stream=stream, follow=args.follow):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    try:
        anyio.run(go)
    except KeyboardInterrupt:
        # Ctrl-C is how one stops following: end as quietly as `tail -f` does.
        return EXIT_INTERRUPTED
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel through a running control plane if there is one; otherwise directly. With
    ``--server``: through the service, which decides who may."""
    from stowplan.actors.control import QUEUE
    from stowplan.service.client import server_of

    url = server_of(args)
    if url is not None:
        return _cancel_remote(url, args.target, args.why)
    store, (project, state_dir) = open_store(args)
    with store:
        try:
            targets = [store.resolve_run(args.target)]
        except (KeyError, ValueError):
            targets = [r.run_id for r in store.runs_by_name(args.target)]
        if not targets:
            raise SpecError(
                f"{args.target!r} is neither a run id nor an experiment name",
                hint="see stowplan ls and stowplan status",
            )
        runs = store.get_runs(targets)
    open_ids = [r for r, rec in runs.items() if rec.state not in FINAL]
    if not open_ids:
        print("nothing to cancel: every run is finished")
        return 0
    from stowplan.provenance.ledger import current_user
    from stowplan.session import run_ids_detail

    with RunStore(store.path) as ledger_store:
        # before the cancel is sent: the ledger says who asked even if the cancel fails midway
        ledger_store.append_ledger(
            who=current_user(),
            action="cancel",
            target=targets[0] if len(targets) == 1 else args.target,
            why=args.why,
            details={"target": args.target, **run_ids_detail(open_ids)},
        )
    queue = _find_queue(state_dir, QUEUE)
    if queue is not None:
        import ray

        n = ray.get(queue.cancel.remote(open_ids, args.why))
        print(f"cancelled {plural(n, 'run')} through the running control plane")
        return 0
    n = _cancel_offline(
        open_ids, args.why, store_path=store.path, project=project, state_dir=state_dir
    )
    print(f"cancelled {plural(n, 'run')}")
    return 0


def _cancel_remote(url: str, target: str, why: str) -> int:
    """A run id (prefix) first, as locally; then an experiment's name or id."""
    import re

    from stowplan.service.api import RUN_REF_PATTERN, CancelExperimentResponse, CancelResponse
    from stowplan.service.client import call, path_of

    if re.match(RUN_REF_PATTERN, target):
        try:
            one = call(
                url, "POST", path_of("runs", target, "cancel"), CancelResponse, json={"why": why}
            )
        except SpecError as e:
            if "answered 404" not in e.message:
                raise
        else:
            print(
                f"cancelled {plural(one.cancelled, 'run')} through the service"
                if one.cancelled
                else "nothing to cancel: the run is finished"
            )
            return 0
    many = call(
        url,
        "POST",
        path_of("experiments", target, "cancel"),
        CancelExperimentResponse,
        json={"why": why},
    )
    print(
        f"cancelled {plural(many.cancelled, 'run')} through the service"
        if many.run_ids
        else "nothing to cancel: every run is finished"
    )
    return 0


def _find_queue(state_dir: Path, name: str) -> Any:
    """The queue actor of the control plane that ``stowplan run`` started for this project."""
    import os

    from stowplan.actors.control import read_control_file

    info = read_control_file(state_dir)
    if info is None:
        return None
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            address=info.address,
            namespace=info.namespace,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        return ray.get_actor(name, namespace=info.namespace)
    except (ConnectionError, ValueError, RuntimeError):
        return None


def _cancel_offline(
    run_ids: list[str], why: str, *, store_path: Path, project: Any, state_dir: Path
) -> int:
    from stowplan.provenance.records import TransitionRecord
    from stowplan.providers.registry import make_provider

    with RunStore(store_path) as store:
        attempts = store.attempts_for(run_ids)
        runs = store.get_runs(run_ids)
        by_provider: dict[str, list[str]] = {}
        for rid in run_ids:
            for a in attempts.get(rid, []):
                if a.state in ACTIVE_ATTEMPT_STATES:
                    by_provider.setdefault(a.provider, []).append(a.key)

        async def go() -> None:
            for name, keys in by_provider.items():
                cfg = project.config.providers.get(name)
                if cfg is None:
                    continue
                async with make_provider(name, cfg, state_dir=state_dir) as drv:
                    await drv.cancel(keys)

        anyio.run(go)
        now = time.time()
        store.apply_transitions(
            [
                TransitionRecord(
                    run_id=rid,
                    attempt=runs[rid].attempts,
                    from_state=runs[rid].state,
                    to_state="CANCELLED",
                    at=now,
                    failure="cancelled",
                    reason=why,
                )
                for rid in run_ids
            ]
        )
    return len(run_ids)
