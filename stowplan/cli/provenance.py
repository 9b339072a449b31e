"""``stowplan audit | lineage | find | diff | replay``: questions asked of what was recorded.

Every command takes ``--json`` (one JSON document on stdout) and ``--project-dir``; the text
forms are for people. Bad input (an unknown run, a bad filter) is a SpecError: exit code 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import msgspec

from stowplan.cli.common import choice, hex_prefix, make_console, open_store, plural, resolve_run
from stowplan.errors import SpecError

# NOTE: rich and the store are imported inside the commands: build_parser() imports this
# module for every stowplan invocation, and they cost half a second on a small machine.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(data: Any) -> None:
    print(json.dumps(msgspec.to_builtins(data), indent=2, sort_keys=True))


# -- audit -----------------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.table import Table

    from stowplan.provenance.ledger import LedgerVerdict, verify
    from stowplan.provenance.records import LedgerEntry
    from stowplan.service.client import call, path_of, server_of

    url = server_of(args)
    target = getattr(args, "target", None)
    entries: list[LedgerEntry] = []
    verdict: LedgerVerdict | None = None
    if url is not None and args.audit_command == "log":
        params = {"target": target} if target is not None else None
        entries = call(url, "GET", path_of("ledger"), list[LedgerEntry], params=params)
    elif url is not None:
        verdict = call(url, "GET", path_of("ledger", "verify"), LedgerVerdict)
    else:
        store, _ = open_store(args)
        with store:
            entries = store.ledger(target=target)
    if args.audit_command == "log":
        if args.json:
            _print_json(entries)
            return EXIT_OK
        table = Table(show_edge=False)
        for col in ("#", "when (UTC)", "who", "action", "target", "why", "details"):
            table.add_column(col)
        for e in entries:
            table.add_row(
                str(e.seq),
                _when(e.at),
                e.who,
                e.action,
                e.target[:16],
                e.why,
                ", ".join(f"{k}={v}" for k, v in sorted(e.details.items()) if k != "run_ids"),
            )
        make_console().print(table)
        return EXIT_OK
    if verdict is None:
        verdict = verify(entries)
    expect = args.expect_head
    head_ok = expect is None or verdict.head.startswith(expect)
    if args.json:
        out = msgspec.to_builtins(verdict)
        out["expected_head_matches"] = head_ok if expect is not None else None
        print(json.dumps(out, indent=2, sort_keys=True))
    elif verdict.problem is not None:
        print(
            f"TAMPERED: {verdict.problem.message}\n"
            f"  {plural(verdict.entries, 'entry')}; the chain is intact up to entry "
            f"{verdict.problem.seq - 1} (head {verdict.head[:16]})",
            file=sys.stderr,
        )
    elif not head_ok:
        print(
            f"TAMPERED: the ledger's head is {verdict.head[:16]} after "
            f"{plural(verdict.entries, 'entry')}, not {expect}: entries were removed from its "
            "end (or it was replaced)",
            file=sys.stderr,
        )
    else:
        print(f"OK: {plural(verdict.entries, 'entry')}, chain intact; head {verdict.head}")
    return EXIT_OK if verdict.ok and head_ok else EXIT_FAILED


# -- lineage ---------------------------------------------------------------------------------


def cmd_lineage(args: argparse.Namespace) -> int:
    import shutil
    import subprocess
    from pathlib import Path

    from stowplan.provenance.query import (
        Direction,
        LineageGraph,
        lineage,
        reaches,
        to_dot,
        tree_lines,
    )
    from stowplan.service.client import call, path_of, server_of

    if args.depth is not None and args.depth < 1:
        raise SpecError(f"--depth must be at least 1, not {args.depth}", hint="--depth 2")
    direction: Direction = "both" if args.up and args.down else ("down" if args.down else "up")
    url = server_of(args)
    if url is not None:
        params: dict[str, Any] = {"direction": direction}
        if args.depth is not None:
            params["depth"] = args.depth
        graph = call(url, "GET", path_of("lineage", args.target), LineageGraph, params=params)
    else:
        store, _ = open_store(args)
        with store:
            graph = lineage(store, args.target, direction=direction, depth=args.depth)
    if args.format == "json" or args.json:
        out = msgspec.to_builtins(graph)
        out["reaches"] = reaches(graph)
        print(json.dumps(out, indent=2, sort_keys=True))
        return EXIT_OK
    if args.format == "dot":
        sys.stdout.write(to_dot(graph))
        return EXIT_OK
    if args.format == "svg":
        dot = shutil.which("dot")
        if dot is None:
            raise SpecError(
                "--format svg needs Graphviz's `dot`, which is not installed here",
                hint="install it (apt-get install graphviz), or use --format dot and render it "
                "elsewhere",
            )
        done = subprocess.run(
            [dot, "-Tsvg"], input=to_dot(graph).encode(), capture_output=True, timeout=60
        )
        if done.returncode != 0:
            print(f"stowplan: dot failed: {done.stderr.decode(errors='replace')}", file=sys.stderr)
            return EXIT_FAILED
        if args.output is not None:
            Path(args.output).write_bytes(done.stdout)
            print(f"wrote {args.output}")
        else:
            sys.stdout.buffer.write(done.stdout)
        return EXIT_OK
    for line in tree_lines(graph):
        print(line)
    counts = reaches(graph)
    print(
        f"\n{plural(len(counts['run']), 'run')}, {plural(len(counts['artifact']), 'artifact')}, "
        f"{plural(len(counts['data']), 'data input')}"
    )
    return EXIT_OK


# -- find ------------------------------------------------------------------------------------


def cmd_find(args: argparse.Namespace) -> int:
    from rich.table import Table

    from stowplan.provenance.query import Filter, find_runs, parse_param_filter
    from stowplan.provenance.records import RunRecord
    from stowplan.service.client import call, path_of, server_of

    url = server_of(args)
    flt = Filter(
        data=args.data,
        gpu=args.gpu,
        code=args.code,
        params=[parse_param_filter(p) for p in args.param or []],
        experiment=args.experiment,
        task=args.task,
        state=args.state,
        package=args.package,
        host=args.host,
        artifact=args.artifact,
    )
    if url is not None:
        # the same filters as query parameters; the service parses and checks them again
        params: list[tuple[str, str]] = [
            (k, v)
            for k, v in (
                ("data", args.data),
                ("gpu", args.gpu),
                ("code", args.code),
                ("experiment", args.experiment),
                ("task", args.task),
                ("state", args.state),
                ("package", args.package),
                ("host", args.host),
                ("artifact", args.artifact),
            )
            if v is not None
        ] + [("param", p) for p in args.param or []]
        runs = call(url, "GET", path_of("runs"), list[RunRecord], params=params)
    else:
        store, _ = open_store(args)
        with store:
            runs = find_runs(store, flt)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "run_id": r.run_id,
                        "experiment": r.experiment,
                        "task": r.task,
                        "index": r.index,
                        "replicate": r.replicate,
                        "seed": r.seed,
                        "params": r.params,
                        "state": r.state,
                        "code_version": r.identity.get("code_version"),
                        "data_versions": r.identity.get("data_versions"),
                        "created_at": r.created_at,
                    }
                    for r in runs
                ],
                indent=2,
                sort_keys=True,
            )
        )
        return EXIT_OK
    table = Table(show_edge=False)
    for col in ("run", "experiment", "task", "trial", "params", "state", "code"):
        table.add_column(col)
    for r in runs:
        table.add_row(
            r.run_id[:12],
            r.experiment,
            r.task,
            str(r.index) + (f" rep {r.replicate}" if r.replicate else ""),
            " ".join(f"{k}={v}" for k, v in r.params.items()),
            r.state,
            str(r.identity.get("code_version", ""))[:20],
        )
    c = make_console()
    c.print(table)
    c.print(plural(len(runs), "run"))
    return EXIT_OK


# -- diff ------------------------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace) -> int:
    from stowplan.provenance.imports import used_records
    from stowplan.provenance.query import diff_runs, load_view
    from stowplan.service.client import call, path_of, server_of

    url = server_of(args)
    if url is not None:
        d = call(url, "GET", path_of("diff", args.run_a, args.run_b), dict[str, Any])
    else:
        store, (project, state_dir) = open_store(args)
        with store:
            a = load_view(store, resolve_run(store, args.run_a))
            b = load_view(store, resolve_run(store, args.run_b))
            used = used_records(
                store, [a.run.run_id, b.run.run_id], project.config.providers, state_dir
            )
            d = diff_runs(store, a, b, used=used)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    print("\n".join(diff_lines(d)))
    return EXIT_OK


def diff_lines(d: dict[str, Any]) -> list[str]:
    """``stowplan diff`` for people: one line per change, grouped as ``diff_runs`` groups."""
    from stowplan.provenance.query import diff_is_empty

    out: list[str] = [f"a {d['a']}", f"b {d['b']}"]
    if diff_is_empty(d):
        out.append("no differences in what was recorded")
    for group in ("params", "spec", "data", "environment", "hardware", "placement", "outputs"):
        items = d[group]
        if not items:
            continue
        out.append(f"{group}:")
        for ch in items:
            key = ch.get("field", ch.get("uri", ch.get("name")))
            out.append(f"  {key}: {_short(ch['a'])} -> {_short(ch['b'])}")
    code = d["code"]
    if code["fields"] or code["diff_of_diffs"]:
        out.append("code:")
        for ch in code["fields"]:
            out.append(f"  {ch['field']}: {_short(ch['a'])} -> {_short(ch['b'])}")
        if code["diff_of_diffs"]:
            out.append("  difference between the stored uncommitted diffs:")
            out.extend("    " + line for line in code["diff_of_diffs"])
    pk = d["packages"]
    if pk["added"] or pk["removed"] or pk["changed"]:
        out.append("packages:")
        out.extend(f"  + {p}" for p in pk["added"])
        out.extend(f"  - {p}" for p in pk["removed"])
        out.extend(f"  ~ {c['package']} {c['a']} -> {c['b']}" for c in pk["changed"])
    if d.get("used"):
        out.append("used (captured where each ran):")
        for c in d["used"]:
            if c["a"] is None:
                out.append(f"  + {c['package']}=={c['b']}")
            elif c["b"] is None:
                out.append(f"  - {c['package']}=={c['a']}")
            else:
                out.append(f"  ~ {c['package']} {c['a']} -> {c['b']}")
    return out


def _short(v: Any) -> str:
    if v is None:  # the field is not there (or null) on that side
        return "(none)"
    text = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


# -- replay ----------------------------------------------------------------------------------


def _tolerances(items: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SpecError(
                f"--metric-tolerance {item!r} is not NAME=TOLERANCE",
                path="--metric-tolerance",
                hint="write e.g. --metric-tolerance accuracy=0.001",
            )
    return out


def cmd_replay(args: argparse.Namespace) -> int:
    """Rebuild runs from their records and run them again: provenance/replay.py decides and
    records, the control plane runs them, this renders."""
    from pathlib import Path

    from stowplan.cli.control import dispatch
    from stowplan.provenance import replay as rp
    from stowplan.provenance.store import RunStore
    from stowplan.service.client import server_of
    from stowplan.spec.loader import load_project

    tolerances = _tolerances(args.metric_tolerance)
    if args.tolerance is not None and args.tolerance < 0:
        raise SpecError("--tolerance must not be negative", hint="--tolerance 1e-6")
    url = server_of(args)
    if url is not None:
        return _replay_remote(args, url, tolerances)
    err = make_console(stderr=True)
    project = load_project(search_from=args.project_dir or Path.cwd())
    plan = rp.plan_replay(project, args.targets, provider=args.provider, strict_env=args.strict_env)
    with rp.checked_out(plan, keep=args.keep_worktree) as checkout:
        build = rp.build_replay(plan, checkout)
        for line in plan.environment_differences:
            err.print(f"environment differs: {line}", markup=False)
        for line in build.notes:
            err.print(f"note: {line}", markup=False)
        for new_id, pin in build.pins.items():
            if pin is None:
                err.print(
                    f"note: replay {new_id[:12]} runs unpinned: "
                    + (
                        "its original has no recorded placement"
                        if build.pin_supported
                        else "this scheduler cannot pin a hardware class yet"
                    ),
                    markup=False,
                )

        def links(store: RunStore) -> None:
            rp.record_replay(store, plan, build, why=args.why or "")

        dispatch(args, build.prepared, build.todo, plan.upstream, err, after_record=links)

    outcome = rp.verify_replay(
        plan, build, verify=args.verify, tolerance=args.tolerance, tolerances=tolerances
    )
    return _show_replay(args, outcome)


REPLAY_POLL_S = 1.0
"""How often ``replay --server`` asks whether the replay's runs ended."""


def _replay_remote(args: argparse.Namespace, url: str, tolerances: dict[str, float]) -> int:
    """``replay --server``: the service replays from its store, on its control plane, and
    holds the recorded code until the replay's runs end; this asks until the verdict is in.
    The POST carries a request id, so a retry after a dropped connection starts nothing new."""
    import time
    import uuid

    from stowplan.provenance.replay import ReplayOutcome
    from stowplan.service.api import ReplayStatus
    from stowplan.service.client import call, path_of

    if args.keep_worktree or args.address:
        flag = "--keep-worktree" if args.keep_worktree else "--address"
        raise SpecError(
            f"{flag} does not apply through the service: the service checks out the code and "
            "runs the replay on its own cluster",
            path=flag,
            hint=f"drop {flag}, or run `stowplan replay` in the service's project directory",
        )
    body = {
        "request_id": uuid.uuid4().hex,
        "targets": list(args.targets),
        "provider": args.provider,
        "verify": bool(args.verify),
        "strict_env": bool(args.strict_env),
        "tolerance": args.tolerance,
        "metric_tolerances": tolerances,
        "why": args.why or "",
    }
    err = make_console(stderr=True)
    status = call(url, "POST", path_of("replays"), ReplayStatus, json=body, ok=(200, 201))
    for line in status.notes:
        err.print(line, markup=False)
    err.print(
        f"replaying {plural(len(status.run_ids), 'run')} on the service "
        f"(experiment {status.experiment_id[:12]})",
        markup=False,
    )
    while not status.done:
        time.sleep(REPLAY_POLL_S)
        status = call(url, "GET", path_of("replays", status.request_id), ReplayStatus)
    if status.outcome is None:
        raise SpecError(
            f"the service could not finish replay {status.request_id}: {status.error}",
            hint="see the replay's runs with `stowplan status "
            f"{status.experiment_id[:12]} --server ...`",
        )
    return _show_replay(args, msgspec.convert(status.outcome, ReplayOutcome))


def _show_replay(args: argparse.Namespace, outcome: Any) -> int:
    """Print a replay's outcome (``--json``: as is); the exit code its verdict gives."""
    if args.json:
        _print_json(outcome)
    else:
        c = make_console()
        c.print(
            f"replayed {plural(len(outcome.replays), 'run')} at {outcome.commit[:12]}"
            + (" with the recorded uncommitted diff" if outcome.diff_applied else "")
        )
        for r in outcome.replays:
            c.print(
                f"  {r.of[:12]} -> {r.run_id[:12]} {r.task}[{r.index}] {r.state}"
                + (f" {r.verdict}" if r.verdict else ""),
                markup=False,
            )
            for d in r.differences:
                c.print(f"      {d}", markup=False)
        if outcome.verdict is not None:
            c.print(outcome.verdict)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the ``stowplan`` parser's subparsers."""
    au = sub.add_parser("audit", help="the audit ledger: who did what, when and why")
    au_sub = au.add_subparsers(dest="audit_command", required=True)
    lg = au_sub.add_parser("log", help="list ledger entries")
    lg.add_argument("--target", default=None, help="only entries on this target id")
    lg.add_argument("--json", action="store_true")
    lg.add_argument("--project-dir", type=_path, default=None)
    ve = au_sub.add_parser("verify", help="check the hash chain; name the first bad entry")
    ve.add_argument(
        "--expect-head",
        default=None,
        type=hex_prefix("ledger head hash", shortest=8),
        help="the head hash (or a prefix) you kept from an earlier verify: catches truncation",
    )
    ve.add_argument("--json", action="store_true")
    ve.add_argument("--project-dir", type=_path, default=None)

    li = sub.add_parser("lineage", help="which runs produced or consumed a run or artifact")
    li.add_argument("target", help="run id (prefix) or artifact SHA-256 (prefix)")
    li.add_argument("--up", action="store_true", help="what it came from (the default)")
    li.add_argument("--down", action="store_true", help="what came from it")
    li.add_argument("--depth", type=int, default=None, metavar="N")
    li.add_argument("--format", choices=("tree", "dot", "svg", "json"), default="tree")
    li.add_argument("-o", "--output", default=None, help="write the SVG here")
    li.add_argument("--json", action="store_true")
    li.add_argument("--project-dir", type=_path, default=None)

    fi = sub.add_parser("find", help="runs by any provenance field")
    fi.add_argument("--data", help="data version, content hash or URI (substring)")
    fi.add_argument("--gpu", help="GPU model (substring) or hardware class")
    fi.add_argument("--code", help="commit (prefix) or code version")
    fi.add_argument("--param", action="append", help="NAME OP VALUE, e.g. 'lr>0.01' (repeat)")
    fi.add_argument("--experiment")
    fi.add_argument("--task")
    fi.add_argument(
        "--state",
        type=choice(_run_states(), what="run state"),
        help="one of " + ", ".join(_run_states()) + " (any case)",
    )
    fi.add_argument("--package", help="name or name==version of an installed distribution")
    fi.add_argument("--host")
    fi.add_argument("--artifact", help="an output's SHA-256 (prefix)")
    fi.add_argument("--json", action="store_true")
    fi.add_argument("--project-dir", type=_path, default=None)

    rp = sub.add_parser("replay", help="rebuild runs from their records and run them again")
    rp.add_argument("targets", nargs="+", help="run ids (prefixes) or an experiment name")
    rp.add_argument("--provider", help="run the replay on this provider from stowplan.toml")
    rp.add_argument("--verify", action="store_true", help="compare outputs: REPRODUCED or DIFFERS")
    rp.add_argument("--strict-env", action="store_true", help="refuse when the environment differs")
    rp.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="numbers in JSON outputs may differ by this much (absolute)",
    )
    rp.add_argument(
        "--metric-tolerance",
        action="append",
        metavar="NAME=TOL",
        help="tolerance for one metric of the JSON outputs (repeat)",
    )
    rp.add_argument("--why", default="", help="why: kept in the audit ledger")
    rp.add_argument("--keep-worktree", action="store_true", help="keep the rebuilt code")
    rp.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    rp.add_argument("--json", action="store_true")
    rp.add_argument("--project-dir", type=_path, default=None)

    di = sub.add_parser("diff", help="what changed between two runs, grouped")
    di.add_argument("run_a")
    di.add_argument("run_b")
    di.add_argument("--json", action="store_true")
    di.add_argument("--project-dir", type=_path, default=None)


def _run_states() -> list[str]:
    from stowplan.scheduler.states import TaskState

    return [s.value for s in TaskState]


def _path(text: str) -> Any:
    from pathlib import Path

    return Path(text)


HANDLERS = {
    "audit": cmd_audit,
    "lineage": cmd_lineage,
    "find": cmd_find,
    "diff": cmd_diff,
    "replay": cmd_replay,
}


def handle(args: argparse.Namespace) -> int:
    if args.command not in HANDLERS:
        raise SpecError(f"unknown command {args.command!r}")
    return HANDLERS[args.command](args)
