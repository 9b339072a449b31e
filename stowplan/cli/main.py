"""The ``stowplan`` command. All printing and rendering lives in this subpackage.

Exit codes: 0 success; 1 some runs failed (or were cancelled); 2 bad input (a spec, a flag, an
unknown run, an unreachable ``--address``): one short paragraph on stderr, never a traceback,
nothing written; 3 the control plane failed (an actor raised): runs it had not finished are
left as they were, to resume on the next ``run``; 130 interrupted by Ctrl-C (quietly).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from stowplan.errors import PlacementInfeasible, SpecError, StowplanError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command that Ctrl-C ended."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"stowplan: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stowplan", description="Reproducible experiment orchestration.")
    p.add_argument("--version", action="version", version="stowplan 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an experiment file (TOML or YAML)")
    run.add_argument("file", type=Path)
    run.add_argument("--dry-run", action="store_true", help="show what would run; change nothing")
    run.add_argument("--rerun", action="store_true", help="run new replicates even if done")
    run.add_argument(
        "--address",
        help="join the Ray cluster at host:port; without it, a private local Ray is started "
        "(RAY_ADDRESS and clusters from an earlier `ray start` are ignored)",
    )
    run.add_argument("--provider", help="run only on this provider from stowplan.toml")
    run.add_argument("--json", action="store_true", help="print the final status as JSON")
    run.add_argument("--why", default="", help="why: kept in the audit ledger")
    run.add_argument(
        "--replicates",
        type=int,
        default=1,
        metavar="N",
        help="run N seeds of every run as distinct runs; report mean and std of each metric",
    )

    ls = sub.add_parser("ls", help="list experiments")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--project-dir", type=Path, default=None)

    st = sub.add_parser("status", help="state of an experiment's runs")
    st.add_argument("experiment", nargs="?")
    st.add_argument("--json", action="store_true")
    st.add_argument("--project-dir", type=Path, default=None)

    sh = sub.add_parser("show", help="everything recorded about one run")
    sh.add_argument("run")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--project-dir", type=Path, default=None)

    lg = sub.add_parser("logs", help="a run's output")
    lg.add_argument("run")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--stderr", action="store_true", help="standard error instead of output")
    lg.add_argument("--attempt", type=int, default=None)
    lg.add_argument("--project-dir", type=Path, default=None)

    ca = sub.add_parser("cancel", help="cancel a run or every unfinished run of an experiment")
    ca.add_argument("target", help="run id (prefix) or experiment name")
    ca.add_argument("--why", default="cancelled by user")
    ca.add_argument("--project-dir", type=Path, default=None)

    from stowplan.cli import provenance as _provenance

    _provenance.add_parsers(sub)

    from stowplan.cli import sim as _sim

    _sim.add_parsers(sub)

    from stowplan.cli import plan as _plan

    _plan.add_parsers(sub)

    from stowplan.cli import money as _money

    _money.add_parsers(sub)

    from stowplan.cli import service as _service

    _service.add_parsers(sub)
    # through a service instead of the local store and control plane
    for name in SERVER_COMMANDS:
        parsers: list[argparse.ArgumentParser] = [sub.choices[name]]
        if name == "audit":  # audit log | verify
            parsers = list(_subcommands(sub.choices[name]).values())
        for parser in parsers:
            parser.add_argument(
                "--server",
                default=None,
                metavar="URL",
                help="ask the service at URL (default: $STOWPLAN_SERVER); token from "
                "$STOWPLAN_TOKEN",
            )
    return p


SERVER_COMMANDS = (
    "run",
    "ls",
    "status",
    "show",
    "logs",
    "cancel",
    "plan",
    "lineage",
    "find",
    "diff",
    "replay",
    "audit",
    "quota",
    "approve",
    "reject",
)
"""Every command that works against a service with ``--server URL`` or $STOWPLAN_SERVER."""


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # NOTE: argparse has no public way to reach subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    # urllib3 warns, on import, that SOCKS proxies need PySocks; requests silences it, but a
    # ``catch_warnings`` in another thread (the sweep's expansion beside Ray's start) can
    # restore the filters without that, and the warning then came before a spec error's
    # one paragraph. Set before any thread starts, this one survives such a restore.
    warnings.filterwarnings("ignore", message="SOCKS support in urllib3 requires")
    try:
        # inside the try: building the parser imports every command's module
        args = build_parser().parse_args(argv)
        if args.command == "run":
            from stowplan.cli.run import cmd_run

            return cmd_run(args)
        if args.command == "plan":
            from stowplan.service.client import server_of

            url = server_of(args)
            if url is not None:
                from stowplan.cli.run import plan_remote

                return plan_remote(args, url)
            from stowplan.cli.plan import cmd_plan

            return cmd_plan(args)
        if args.command in ("prices", "gc"):
            from stowplan.cli import money

            return money.cmd_prices(args) if args.command == "prices" else money.cmd_gc(args)
        if args.command in ("serve", "token", "quota", "approve", "reject"):
            from stowplan.cli import service

            if args.command == "quota":
                return service.cmd_quota(args)
            if args.command in ("approve", "reject"):
                return service.cmd_decide(args)
            return service.cmd_serve(args) if args.command == "serve" else service.cmd_token(args)
        if args.command in ("sim", "whatif"):
            from stowplan.cli import sim

            return sim.cmd_sim(args) if args.command == "sim" else sim.cmd_whatif(args)
        from stowplan.cli import inspect, provenance

        if args.command in provenance.HANDLERS:
            return provenance.handle(args)
        handler = {
            "ls": inspect.cmd_ls,
            "status": inspect.cmd_status,
            "show": inspect.cmd_show,
            "logs": inspect.cmd_logs,
            "cancel": inspect.cmd_cancel,
        }[args.command]
        return handler(args)
    except SpecError as e:
        print(f"stowplan: {e.render()}", file=sys.stderr)
        return EXIT_USAGE
    except PlacementInfeasible as e:
        print(f"stowplan: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StowplanError as e:
        print(f"stowplan: {e}", file=sys.stderr)
        code: int = getattr(e, "exit_code", EXIT_FAILED)  # ControlPlaneError: 3
        return code
    except KeyboardInterrupt:
        # Ctrl-C ends any command as quietly as a shell tool: no traceback, 128 + SIGINT.
        # A command that must clean up first (run cancels its runs) catches it itself.
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
