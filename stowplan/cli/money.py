"""``stowplan prices | gc``: the price table cloud pools are priced from, and stray instances.

``prices`` shows the table (its date, source and licence first: the figures are estimates that
age), from ``--file``, else from the ``prices`` file of the AWS provider named by
``--provider`` (or the only one configured), else the table bundled with stowplan.

``gc`` lists the instances that carry stowplan's tags (``stowplan:provider`` of a configured
AWS provider, in each of its regions) that no unfinished run of this project's store is
using, and with ``--yes`` terminates them. An instance is in use while an attempt of an
unfinished run is recorded on it (its job id) or while its run has an attempt that has not
reached an instance yet (sent to a pool, not yet claimed): with such an attempt of the same
pool, idle instances of that pool are kept too, since the control plane may be about to use
them. Without ``--yes`` nothing is changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from stowplan.cli.common import make_console, plural

if TYPE_CHECKING:
    from stowplan.providers.aws.prices import PriceTable
    from stowplan.spec.loader import LoadedProject
    from stowplan.spec.models import AwsProviderConfig

EXIT_OK = 0


def add_parsers(sub: Any) -> None:
    pr = sub.add_parser("prices", help="the cloud price table: its date, source and prices")
    pr.add_argument("--file", type=Path, help="a price table of your own (JSON, as the bundled)")
    pr.add_argument("--provider", help="the table of this AWS provider from stowplan.toml")
    pr.add_argument("--region", help="only this region's prices")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--project-dir", type=Path, default=None)

    gc = sub.add_parser("gc", help="list (and with --yes terminate) stray stowplan instances")
    gc.add_argument("--provider", help="only this AWS provider from stowplan.toml")
    gc.add_argument("--yes", action="store_true", help="terminate them (default: only list)")
    gc.add_argument("--json", action="store_true")
    gc.add_argument("--project-dir", type=Path, default=None)


# -- prices -----------------------------------------------------------------------------------


def _aws_providers(project: LoadedProject, only: str | None) -> dict[str, AwsProviderConfig]:
    from stowplan.errors import SpecError
    from stowplan.spec.models import AwsProviderConfig

    aws = {n: c for n, c in project.config.providers.items() if isinstance(c, AwsProviderConfig)}
    if only is None:
        return aws
    if only not in aws:
        kind = project.config.providers.get(only)
        raise SpecError(
            f"--provider {only!r} is "
            + (f"a {type(kind).__name__} provider, not aws" if kind else "not configured"),
            file=project.file,
            path="$.providers",
            hint="name an aws provider of stowplan.toml: " + (", ".join(sorted(aws)) or "none"),
        )
    return {only: aws[only]}


def price_source(args: argparse.Namespace) -> tuple[PriceTable, str]:
    """The table ``stowplan prices`` shows and where it comes from (a path)."""
    from stowplan.errors import SpecError
    from stowplan.providers.aws import prices
    from stowplan.spec.loader import load_project

    if args.file is not None:
        return prices.load(str(args.file), field_path="--file", file=None), str(args.file)
    project = load_project(search_from=args.project_dir or Path.cwd())
    aws = _aws_providers(project, args.provider)
    files = {n: c.prices for n, c in aws.items() if c.prices is not None}
    if len(files) > 1 and args.provider is None:
        raise SpecError(
            f"providers {', '.join(sorted(files))} each give their own price table",
            file=project.file,
            path="$.providers",
            hint="say which with --provider NAME",
        )
    for name, path in files.items():
        return prices.load(path, field_path=f"$.providers.{name}.prices", file=project.file), path
    return prices.bundled(), str(prices.BUNDLED)


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.4f}"


def cmd_prices(args: argparse.Namespace) -> int:
    from stowplan.errors import SpecError
    from stowplan.providers.aws import prices

    table, path = price_source(args)
    if args.region is not None and args.region not in table.regions:
        raise SpecError(
            f"--region {args.region!r}: the table of {table.date} has no prices there",
            path="--region",
            hint="regions in it: " + ", ".join(sorted(table.regions)),
        )
    listed = prices.rows(table, args.region)
    if args.json:
        print(
            json.dumps(
                {
                    "date": table.date,
                    "compiled": table.compiled,
                    "source": table.source,
                    "licence": table.licence,
                    "currency": table.currency,
                    "file": path,
                    "interruption_bands": table.interruption_bands,
                    "boot_s": table.boot_s,
                    "prices": [
                        {
                            "region": r.region,
                            "instance_type": r.instance_type,
                            "on_demand": r.on_demand,
                            "spot": r.spot,
                            "interruption": r.interruption,
                        }
                        for r in listed
                    ],
                },
                indent=2,
                sort_keys=True,
            )
        )
        return EXIT_OK
    c = make_console(soft_wrap=True)
    c.print(table.describe(Path(path)), markup=False)
    grid = Table(show_edge=False)
    for col, justify in (
        ("region", "left"),
        ("instance type", "left"),
        ("on-demand /h", "right"),
        ("spot /h (typical)", "right"),
        ("interruption", "left"),
    ):
        grid.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in listed:
        grid.add_row(
            r.region, r.instance_type, _money(r.on_demand), _money(r.spot), r.interruption or "-"
        )
    c.print(grid)
    c.print(
        "interruption: the share of spot instances interrupted in a month (Spot Instance "
        "Advisor bands); spot prices here are typical, the market's are used when EC2 gives "
        "recent ones",
        markup=False,
    )
    return EXIT_OK


# -- gc -----------------------------------------------------------------------------------------


class Stray:
    """One stowplan instance no unfinished run uses."""

    def __init__(self, provider: str, region: str, inst: dict[str, Any]) -> None:
        tags = {str(t["Key"]): str(t["Value"]) for t in inst.get("Tags") or []}
        self.provider = provider
        self.region = region
        self.instance_id = str(inst["InstanceId"])
        self.instance_type = str(inst.get("InstanceType") or "")
        self.state = str((inst.get("State") or {}).get("Name") or "")
        self.pool = tags.get("stowplan:pool", "")
        self.project = tags.get("stowplan:project", "")
        launched: Any = inst.get("LaunchTime")
        self.launched: float | None = (
            launched.timestamp() if hasattr(launched, "timestamp") else None
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "region": self.region,
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "state": self.state,
            "pool": self.pool,
            "project": self.project,
            "launched": self.launched,
        }


LIVE_STATES = ("pending", "running", "stopping", "stopped")
"""EC2 states of an instance that still exists (and may still bill: a stopped instance's
volumes do)."""


def strays(
    seen: list[Stray], *, project: str, in_use: set[str], waiting_pools: set[str]
) -> tuple[list[Stray], list[Stray]]:
    """(strays, kept): of the instances ``seen``, those of ``project`` that still exist, are
    not ``in_use`` (an unfinished run's attempt is on them) and whose pool no unfinished run is
    waiting on (an attempt sent to the pool, not yet on an instance); kept: the rest of the
    project's live instances. Instances of other projects are in neither."""
    out: list[Stray] = []
    kept: list[Stray] = []
    for s in seen:
        if s.project != project or s.state not in LIVE_STATES:
            continue
        if s.instance_id in in_use or s.pool in waiting_pools:
            kept.append(s)
        else:
            out.append(s)
    key = lambda s: (s.provider, s.region, s.instance_id)  # noqa: E731
    return sorted(out, key=key), sorted(kept, key=key)


def cmd_gc(args: argparse.Namespace) -> int:
    import anyio

    from stowplan.provenance.store import ACTIVE_ATTEMPT_STATES, RunStore
    from stowplan.providers.aws import AwsProvider
    from stowplan.session import project_paths
    from stowplan.spec.loader import load_project

    project = load_project(search_from=args.project_dir or Path.cwd())
    aws = _aws_providers(project, args.provider)
    state_dir, store_path = project_paths(project)
    in_use: set[str] = set()
    waiting: set[str] = set()
    if store_path.exists():
        with RunStore(store_path) as store:
            for a in store.active_attempts():
                if a.state not in ACTIVE_ATTEMPT_STATES:
                    continue
                if a.job_id:
                    in_use.add(a.job_id)
                else:
                    waiting.add(a.pool)
    seen: list[Stray] = []
    ended: list[str] = []
    name_of: dict[str, str] = {}

    async def go() -> None:
        for name, cfg in sorted(aws.items()):
            async with AwsProvider(name, cfg, state_dir=state_dir) as drv:
                name_of[name] = drv.project
                for region, inst in await drv.tagged_instances():
                    seen.append(Stray(name, region, inst))
                if not args.yes:
                    continue
                found, _ = strays(
                    [s for s in seen if s.provider == name],
                    project=drv.project,
                    in_use=in_use,
                    waiting_pools=waiting,
                )
                for region in sorted({s.region for s in found}):
                    ids = [s.instance_id for s in found if s.region == region]
                    await drv.terminate_instances(region, ids)
                    ended.extend(ids)

    anyio.run(go)
    found: list[Stray] = []
    kept: list[Stray] = []
    for name in sorted(aws):
        f, k = strays(
            [s for s in seen if s.provider == name],
            project=name_of.get(name, ""),
            in_use=in_use,
            waiting_pools=waiting,
        )
        found.extend(f)
        kept.extend(k)
    if args.json:
        print(
            json.dumps(
                {
                    "strays": [s.as_dict() for s in found],
                    "kept": [s.as_dict() for s in kept],
                    "terminated": sorted(ended),
                    "dry_run": not args.yes,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return EXIT_OK
    c = make_console()
    if not aws:
        c.print("no aws provider is configured in stowplan.toml: nothing to look at")
        return EXIT_OK
    if found:
        grid = Table(show_edge=False)
        for col in ("provider", "region", "instance", "type", "state", "pool", "launched"):
            grid.add_column(col)
        for s in found:
            grid.add_row(
                s.provider,
                s.region,
                s.instance_id,
                s.instance_type,
                s.state,
                s.pool,
                _when(s.launched),
            )
        c.print(grid)
    kept_text = f"; {plural(len(kept), 'instance')} in use by unfinished runs kept" if kept else ""
    if not found:
        c.print(f"no stray instances{kept_text}", markup=False)
    elif args.yes:
        c.print(f"terminated {plural(len(ended), 'stray instance')}{kept_text}", markup=False)
    else:
        c.print(
            f"{plural(len(found), 'stray instance')}{kept_text}; nothing changed: run "
            "`stowplan gc --yes` to terminate them",
            markup=False,
        )
    return EXIT_OK


def _when(t: float | None) -> str:
    import time

    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))
