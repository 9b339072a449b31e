"""``stowplan serve``, ``stowplan token create|list|revoke`` and ``stowplan quota``: the
shared-lab service.

``serve`` starts the project's control plane once (a private local Ray, or ``--address``) and
serves the API with uvicorn until SIGTERM or Ctrl-C: uvicorn stops accepting and finishes the
requests in flight, then the queue drains what it sent to the store and the control plane
stops. ``token`` works on the service's records directly (it needs the service's project
directory, so only someone with access to the server can hand out tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stowplan.errors import SpecError

__all__ = ["add_parsers", "cmd_quota", "cmd_serve", "cmd_token"]


def add_parsers(sub: Any) -> None:
    sv = sub.add_parser("serve", help="run the shared-lab service ([service] in stowplan.toml)")
    sv.add_argument("--project-dir", type=Path, default=None)
    sv.add_argument("--bind", default=None, help="address to listen on ([service] bind)")
    sv.add_argument("--port", type=int, default=None, help="port ([service] port)")
    sv.add_argument(
        "--address",
        help="run the control plane on the Ray cluster at host:port; without it, a private "
        "local Ray is started",
    )
    sv.add_argument(
        "--spread",
        action="store_true",
        help="with --address: place the control plane's actors over the cluster's nodes "
        "(Ray's SPREAD strategy) instead of on the service's own node; an actor on a node "
        "that is lost is restarted on another",
    )
    sv.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=None,
        help="one JSON object a line, or text for a terminal ([service] log_format; json)",
    )
    sv.add_argument(
        "--read-only",
        action="store_true",
        help="serve the store without a control plane: reads work, submissions and cancels "
        "answer 503",
    )

    qu = sub.add_parser(
        "quota", help="each team's GPUs and GPU-hours against its limits, from the service"
    )
    qu.add_argument("--json", action="store_true")

    for verb, what in (
        ("approve", "approve a run waiting for approval (a budget, a restricted pool)"),
        ("reject", "reject a run waiting for approval: it is cancelled"),
    ):
        dp = sub.add_parser(verb, help=what + ", through the service")
        dp.add_argument("run", help="run id (prefix)")
        dp.add_argument("--why", required=True, help="recorded in the ledger with your name")

    tk = sub.add_parser("token", help="API tokens of the service's users")
    tsub = tk.add_subparsers(dest="token_command", required=True)
    cr = tsub.add_parser("create", help="create a token for a user; it is shown once")
    cr.add_argument("user", help="a user under [service.users]")
    cr.add_argument("--label", default="", help="what the token is for")
    cr.add_argument(
        "--expires-in", type=float, default=None, metavar="DAYS", help="expire after DAYS days"
    )
    cr.add_argument("--project-dir", type=Path, default=None)
    ls = tsub.add_parser("list", help="tokens (never the tokens themselves)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--project-dir", type=Path, default=None)
    rv = tsub.add_parser("revoke", help="revoke a token by its id")
    rv.add_argument("id", help="the token's id (`stowplan token list`)")
    rv.add_argument("--project-dir", type=Path, default=None)


def _project(args: argparse.Namespace) -> tuple[Any, Path, Path]:
    """The project (its ``stowplan.toml`` required), its state dir and store path."""
    from stowplan.session import project_paths
    from stowplan.spec.loader import load_project

    project = load_project(search_from=args.project_dir or Path.cwd())
    if project.file is None:
        raise SpecError(
            "no stowplan.toml here or above: the service is configured there",
            hint="create stowplan.toml with a [service] table (teams and users), or pass "
            "--project-dir",
        )
    state_dir, store_path = project_paths(project)
    return project, state_dir, store_path


def _people(state_dir: Path) -> Any:
    from stowplan.service.people import SERVICE_DB, People

    return People(state_dir / SERVICE_DB)


def check_service_config(project: Any) -> None:
    """SpecError for a ``[service]`` that cannot serve anyone (the schema checked the rest)."""
    cfg = project.config.service
    if not cfg.users:
        raise SpecError(
            "no users are configured, so no token can be created and every request is refused",
            file=project.file,
            path="$.service.users",
            hint='add [service.teams.NAME] and [service.users.NAME] with team = "NAME" and '
            'role = "member" (or viewer, team-admin, admin)',
        )
    if cfg.tls is not None:
        root = Path(project.root)
        for field in ("cert", "key"):
            p = Path(getattr(cfg.tls, field)).expanduser()
            p = p if p.is_absolute() else root / p
            if not p.is_file():
                raise SpecError(
                    f"TLS {field} file {str(p)!r} does not exist or is not a file",
                    file=project.file,
                    path=f"$.service.tls.{field}",
                    hint=f"give the path of a PEM {field} file, or remove [service.tls] to "
                    "serve plain HTTP (behind a TLS proxy)",
                )


def project_context(project: Any) -> Any:
    """The placement context every experiment of the project shares: the network and the
    residency rules. NOTE: datasets and weights are per experiment; a long-lived queue is
    started before any, so they are not in its context yet."""
    from stowplan.placement.problem import Link, PlacementContext

    settings = project.config.placement
    return PlacementContext(
        links=[
            Link(src=k.src, dst=k.dst, bandwidth=float(k.bandwidth), egress_per_gb=k.egress_per_gb)
            for k in settings.links
        ],
        residency={n: tuple(s) for n, s in sorted(settings.residency.items())},
        objective=settings.objective,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    project, state_dir, store_path = _project(args)
    try:
        import uvicorn

        from stowplan.service.app import ServiceState, create_app
    except ImportError as e:
        raise SpecError(
            f"the service needs packages that are not installed ({e.name})",
            hint="pip install 'stowplan[service]'",
        ) from None
    from stowplan.provenance.store import RunStore

    check_service_config(project)
    cfg = project.config.service
    port = args.port if args.port is not None else cfg.port
    if not 0 < port < 65536:
        raise SpecError(f"--port {port} is not a port", hint="pass 1 to 65535")
    plane = None
    if not args.read_only:
        from stowplan.actors.control import ControlPlane
        from stowplan.scheduler.share import Approvals

        settings = project.config.placement
        plane = ControlPlane(
            state_dir=state_dir,
            store_path=store_path,
            providers=dict(project.config.providers),
            address=args.address,
            context=project_context(project),
            budget=settings.budget,
            workers=settings.workers,
            teams={n: t.limits() for n, t in sorted(project.config.service.teams.items())},
            approvals=Approvals(restricted=tuple(sorted(set(cfg.restricted)))),
            spread=args.spread,
        )
    # the port first: the control plane's Ray processes take ports of their own
    sock = _bind(args.bind or cfg.bind, port, project.file)
    store = RunStore(store_path)
    people = _people(state_dir)
    spending = None
    state = None
    try:
        if plane is not None:
            from stowplan.service.spending import EVERY_S, TeamSpending

            plane.start()
            spending = TeamSpending(store_path, people, plane, sorted(cfg.teams), EVERY_S)
            spending.start()
        state = ServiceState(
            project=project,
            state_dir=state_dir,
            store=store,
            people=people,
            plane=plane,
            keepalive_s=float(cfg.keepalive),
        )
        ssl: dict[str, Any] = {}
        if cfg.tls is not None:
            root = Path(project.root)
            ssl = {
                "ssl_certfile": str(root / Path(cfg.tls.cert).expanduser()),
                "ssl_keyfile": str(root / Path(cfg.tls.key).expanduser()),
            }
        from stowplan.service.logs import log_config

        server = _make_server(
            uvicorn.Config(
                create_app(state),
                host=args.bind or cfg.bind,
                port=port,
                log_level="info",
                log_config=log_config(args.log_format or cfg.log_format),
                access_log=False,  # stowplan.access logs each request (service/logs.py)
                lifespan="on",
                timeout_graceful_shutdown=30,
                **ssl,
            )
        )
        server.run(sockets=[sock])  # returns after SIGTERM/SIGINT, once in-flight requests are done
        if not server.started:
            return 2
        return 130 if signal.SIGINT in server.stopped_by else 0
    finally:
        sock.close()
        try:
            if state is not None:
                state.replayer.stop()
            if spending is not None:
                spending.stop()
            if plane is not None:
                plane.stop(drain=True)
        finally:
            people.close()
            store.close()


def _bind(host: str, port: int, file: Any) -> socket.socket:
    """The service's listening socket, bound before anything starts: a port in use is a clear
    error (exit 2) instead of a failure after the control plane started, and no process the
    control plane starts can take the port meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SpecError(
            f"cannot listen on {host}:{port}: {e.strerror or e}",
            file=file,
            path="$.service.port",
            hint="stop what listens there, or choose another port ([service] port or --port)",
        ) from None
    sock.set_inheritable(True)
    return sock


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus re-raising the signal that stopped it.

        NOTE: uvicorn re-raises SIGTERM/SIGINT once it has shut down, so the process would
        die by the signal before the control plane drains and stops; ``serve`` stops it
        gracefully itself and then exits 0 (130 after Ctrl-C)."""

        stopped_by: tuple[int, ...] = ()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self.stopped_by = tuple(self._captured_signals)
                self._captured_signals.clear()

    return Server


def _make_server(config: Any) -> Any:
    return _server_class()(config)


def cmd_token(args: argparse.Namespace) -> int:
    project, state_dir, _ = _project(args)
    users = project.config.service.users
    with _people(state_dir) as people:
        if args.token_command == "create":
            if args.user not in users:
                known = ", ".join(sorted(users)) or "none is configured"
                raise SpecError(
                    f"no user {args.user!r} under [service.users] ({known})",
                    file=project.file,
                    path=f"$.service.users.{args.user}",
                    hint=f'add [service.users.{args.user}] with team = "..." and role = "..."',
                )
            expires = None
            if args.expires_in is not None:
                if not args.expires_in > 0:
                    raise SpecError(
                        f"--expires-in {args.expires_in:g} is not a positive number of days",
                        hint="pass e.g. --expires-in 90",
                    )
                expires = time.time() + args.expires_in * 86400
            token, rec = people.create_token(args.user, label=args.label, expires_at=expires)
            print(token)
            print(
                f"token {rec.id} for {args.user}: shown once, keep it secret "
                "(export STOWPLAN_TOKEN=...)",
                file=sys.stderr,
            )
            return 0
        if args.token_command == "list":
            tokens = people.list_tokens()
            if args.json:
                import msgspec

                print(json.dumps(msgspec.to_builtins(tokens), indent=2, sort_keys=True))
                return 0
            now = time.time()
            for t in tokens:
                state = (
                    "revoked"
                    if t.revoked_at is not None
                    else "expired"
                    if t.expires_at is not None and t.expires_at <= now
                    else "live"
                )
                print(f"{t.id}  {t.user:<16} {state:<8} {t.label}")
            return 0
        if not people.revoke_token(args.id):
            raise SpecError(
                f"no live token {args.id!r}", hint="see `stowplan token list` for the ids"
            )
        print(f"revoked token {args.id}")
        return 0


def cmd_decide(args: argparse.Namespace) -> int:
    """``stowplan approve|reject RUN --why TEXT``: ``POST /api/v1/runs/RUN/approve|reject``.
    Who may decide (a team admin for the team's runs, an admin) is the service's to check."""
    from stowplan.service.api import DecideResponse
    from stowplan.service.client import call, path_of, server_of
    from stowplan.spec.units import plural

    verb = args.command
    url = server_of(args)
    if url is None:
        raise SpecError(
            f"stowplan {verb} asks the shared-lab service, where runs wait for approval",
            path="--server",
            hint="pass --server URL or set STOWPLAN_SERVER (and STOWPLAN_TOKEN)",
        )
    answer = call(
        url, "POST", path_of("runs", args.run, verb), DecideResponse, json={"why": args.why}
    )
    if answer.decided:
        print(f"{verb}d {plural(answer.decided, 'run')}: {answer.run_id[:12]} is {answer.state}")
    else:
        print(
            f"nothing to {verb}: run {answer.run_id[:12]} is {answer.state}, "
            "not waiting for approval"
        )
    return 0


def cmd_quota(args: argparse.Namespace) -> int:
    """``stowplan quota``: what ``GET /api/v1/quota`` answers, as a table (``--json``: as is).
    Quotas live in the running service, so it needs ``--server`` or $STOWPLAN_SERVER."""
    import msgspec
    from rich.table import Table

    from stowplan.cli.common import make_console
    from stowplan.scheduler.share import span_text
    from stowplan.service.api import TeamUse
    from stowplan.service.client import call, path_of, server_of

    url = server_of(args)
    if url is None:
        raise SpecError(
            "stowplan quota asks the shared-lab service, which keeps the teams' use",
            path="--server",
            hint="pass --server URL or set STOWPLAN_SERVER (and STOWPLAN_TOKEN)",
        )
    teams = call(url, "GET", path_of("quota"), list[TeamUse])
    if args.json:
        sys.stdout.write(msgspec.json.encode(teams).decode() + "\n")
        return 0
    grid = Table(show_edge=False)
    cols = ("team", "GPUs held", "max", "guaranteed", "waiting", "GPU-hours", "cloud $", "weight")
    for col in cols:
        grid.add_column(col, justify="left" if col == "team" else "right")
    for t in teams:
        hours = f"{t.gpu_hours:,.1f}"
        if t.gpu_hours_limit is not None:
            hours += f" / {t.gpu_hours_limit:,g} per {span_text(t.window_s)}"
        dollars = f"{t.spent_usd + t.running_usd:,.2f}"
        if t.monthly_usd is not None:
            dollars += f" / {t.monthly_usd:,.2f} a month"
        grid.add_row(
            t.team,
            _models(t.holds) or "0",
            _models(t.max_gpus) or "-",
            _models(t.guaranteed_gpus) or "-",
            str(t.waiting_gpus),
            hours,
            dollars,
            f"{t.weight:g}",
        )
    c = make_console(soft_wrap=True)
    if not teams:
        c.print("no team with limits ([service.teams] in the service's stowplan.toml)")
        return 0
    c.print(grid)
    return 0


def _models(counts: dict[str, int]) -> str:
    return ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))
