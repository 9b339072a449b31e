"""``stowplan sim`` and ``stowplan whatif``: run the scheduler in virtual time and plan capacity.

Inputs are read and checked completely before anything runs; a bad cluster file, trace or
option prints one paragraph (file, line, field, fix) and exits 2 with nothing written. Results
are written to a temporary folder beside ``--out`` and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from stowplan.cli.common import make_console
from stowplan.errors import SpecError
from stowplan.spec.units import parse_duration

EXIT_OK = 0


def add_parsers(sub: Any) -> None:
    """Register ``sim`` and ``whatif`` on the main parser's subcommands."""
    for name, helptext in (
        ("sim", "simulate a workload on a cluster in virtual time"),
        ("whatif", "compare a cluster with a changed one on the same workload and seeds"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "cluster",
            type=Path,
            help="cluster TOML with [cluster] and [[pools]] (e.g. "
            "examples/clusters/university-slurm.toml) or an openb/spot node-list CSV",
        )
        p.add_argument(
            "workload",
            type=Path,
            help="a trace (Gavel .trace, Philly/openb/DLRM/Tiresias CSV, e.g. "
            "examples/traces/tiresias/60_job.csv) or a workload TOML with [workload] (e.g. "
            "examples/clusters/sweep-workload.toml)",
        )
        p.add_argument(
            "--policy",
            action="append",
            default=None,
            help="cpsat (default), greedy, fifo, throughput, or module:function; repeat to compare"
            if name == "sim"
            else "the placement policy",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--until", default=None, help="stop at this simulated time, e.g. 30d")
        p.add_argument("--out", type=Path, default=None, help="folder for the report")
        p.add_argument("--no-faults", action="store_true", help="inject no faults")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG and SVG plots")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        if name == "whatif":
            p.add_argument(
                "--add",
                action="append",
                default=[],
                help="pool=NAME,count=N[,like=POOL][,gpu_model=M][,price_per_hour=X]",
            )
            p.add_argument("--remove", action="append", default=[], help="pool=NAME[,count=N]")


def _until(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        raise SpecError(str(e), path="--until", hint="e.g. --until 30d or --until 12h") from None


@contextmanager
def _progress(err: Console, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.1f} / {task.total:,.1f} simulated h"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        yield bar


def _simulate(
    cluster: Any, workload: Any, policy: str, args: argparse.Namespace, bar: Any
) -> dict[str, Any]:
    from stowplan.simulator.report import run_record
    from stowplan.simulator.shell import SimOptions, Simulation

    opts = SimOptions(
        policy=policy,
        seed=args.seed,
        until=_until(args.until),
        faults=not args.no_faults,
        budget=cluster.scheduler.budget,
    )
    progress = None
    if bar is not None:
        last = max((j.submit for j in workload.jobs), default=0.0)
        task = bar.add_task(policy, total=max(opts.until or last, 1.0) / 3600.0)

        def progress(now: float, horizon: float) -> None:
            total = horizon if horizon != float("inf") else max(last, now)
            bar.update(task, completed=now / 3600.0, total=max(total, 1.0) / 3600.0)

    sim = Simulation(cluster, workload, opts, progress=progress)
    sim.run()
    if bar is not None:
        bar.remove_task(task)
    return run_record(sim)


def _write(report: dict[str, Any], out: Path, plots: bool) -> list[Path]:
    """Write into a temporary folder beside ``out``, then move the files into ``out``."""
    from stowplan.simulator.report import write_outputs

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = write_outputs(report, tmp, plots=plots)
        out.mkdir(exist_ok=True)
        final = []
        for f in written:
            dest = out / f.name
            f.replace(dest)
            final.append(dest)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_roles(cluster: Path, workload: Path) -> None:
    """Refuse a file given in the other's place (or an experiment or project file) with a hint
    that names the kind of file that belongs there, not the shape of the one given."""
    from stowplan.simulator.workloads import CLUSTER_EXAMPLE, WORKLOAD_EXAMPLES, FileKind, file_kind

    ck, wk = file_kind(cluster), file_kind(workload)
    swap = f"swap the two: stowplan sim {workload} {cluster}"
    if ck not in (FileKind.CLUSTER, FileKind.UNKNOWN):
        raise SpecError(
            f"this is {ck.value}, given as CLUSTER (the first argument)",
            file=str(cluster),
            hint=swap
            if ck is FileKind.WORKLOAD and wk is FileKind.CLUSTER
            else "give a cluster TOML with [cluster] and [[pools]] (e.g. "
            f"{CLUSTER_EXAMPLE}) or a node-list CSV",
        )
    if wk not in (FileKind.WORKLOAD, FileKind.UNKNOWN):
        raise SpecError(
            f"this is {wk.value}, given as WORKLOAD (the second argument)",
            file=str(workload),
            hint=f"give a trace or a workload TOML with [workload] (e.g. {WORKLOAD_EXAMPLES})",
        )


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from stowplan.simulator.cluster import load_cluster
    from stowplan.simulator.policies import resolve
    from stowplan.simulator.workloads import load_workload

    for p in args.policy or []:
        resolve(p)  # unknown policies are bad input: refuse before reading big traces
    _until(args.until)
    _check_roles(args.cluster, args.workload)
    return load_cluster(args.cluster).spec, load_workload(args.workload)


def _summary_table(title: str, records: list[dict[str, Any]]) -> Table:
    t = Table(title=title)
    for col in (
        "policy",
        "jobs",
        "done",
        "wait p50",
        "wait p95",
        "wait p99",
        "mean JCT",
        "util",
        "cost",
    ):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in records:
        s = r["summary"]
        t.add_row(
            r["policy"],
            f"{s['jobs']:,}",
            f"{s['states'].get('SUCCEEDED', 0):,}",
            _dur(s["wait_s"]["p50"]),
            _dur(s["wait_s"]["p95"]),
            _dur(s["wait_s"]["p99"]),
            _dur(s["completion_s"]["mean"]),
            f"{s['utilization']:.1%}",
            f"{s['cost']:,.2f}",
        )
    return t


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if abs(s) < 120:
        return f"{s:.0f} s"
    if abs(s) < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def cmd_sim(args: argparse.Namespace) -> int:
    from stowplan.simulator.report import build_report, encode

    cluster, workload = _load(args)
    policies = args.policy or ["cpsat"]
    out = args.out or Path(f"sim-{cluster.cluster.name}-{workload.name}")
    err = Console(stderr=True)
    started = time.perf_counter()
    records = []
    with _progress(err, sys.stderr.isatty()) as bar:
        for policy in policies:
            records.append(_simulate(cluster, workload, policy, args, bar))
    report = build_report(str(args.cluster), str(args.workload), records)
    files = _write(report, out, not args.no_plots)
    if args.json:
        slim = [{k: v for k, v in r.items() if k not in ("jobs", "timeseries")} for r in records]
        sys.stdout.buffer.write(encode({"runs": slim, "out": str(out)}))
    else:
        console = make_console()
        console.print(_summary_table(f"{cluster.cluster.name} x {workload.name}", records))
        for r in records:
            for note in r["workload"]["notes"] + r["notes"]:
                console.print(f"note: {note}", highlight=False)
            break
        console.print(f"{len(files)} files in {out}/ (report.json, CSV, plots)", highlight=False)
    err.print(
        f"simulated in {time.perf_counter() - started:.1f} s of wall time",
        style="dim",
        highlight=False,
    )
    return EXIT_OK


def cmd_whatif(args: argparse.Namespace) -> int:
    from stowplan.simulator.report import build_report, encode
    from stowplan.simulator.whatif import apply, compare, parse_change

    changes = [parse_change(t, "add") for t in args.add]
    changes += [parse_change(t, "remove") for t in args.remove]
    if not changes:
        raise SpecError(
            "nothing to compare", path="--add/--remove", hint="e.g. --add pool=gpu-a100,count=16"
        )
    if args.policy and len(args.policy) > 1:
        raise SpecError(
            "whatif compares clusters under one policy",
            path="--policy",
            hint="give --policy once (or use stowplan sim to compare policies)",
        )
    cluster, workload = _load(args)
    variant = apply(cluster, changes)
    policy = (args.policy or ["cpsat"])[0]
    out = args.out or Path(f"whatif-{cluster.cluster.name}-{workload.name}")
    err = Console(stderr=True)
    with _progress(err, sys.stderr.isatty()) as bar:
        base = _simulate(cluster, workload, policy, args, bar)
        base["policy"] = f"{policy} (baseline)"
        var = _simulate(variant, workload, policy, args, bar)
        var["policy"] = f"{policy} (variant)"
    delta = compare(base, var)
    report = build_report(str(args.cluster), str(args.workload), [base, var])
    report["whatif"] = {"changes": [c.describe() for c in changes], "delta": delta}
    files = _write(report, out, not args.no_plots)
    if args.json:
        sys.stdout.buffer.write(encode({"whatif": report["whatif"], "out": str(out)}))
        return EXIT_OK
    console = make_console()
    console.print(_summary_table("baseline and variant", [base, var]))
    t = Table(title="variant - baseline: " + "; ".join(c.describe() for c in changes))
    for col in ("metric", "baseline", "variant", "change"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for name, d in delta.items():
        fmt = (
            _dur
            if name.endswith("_s")
            else (
                (lambda v: "-" if v is None else f"{v:.1%}")
                if name == "utilization"
                else (lambda v: "-" if v is None else f"{v:,.2f}")
            )
        )
        change = d["change"]
        sign = "" if change is None or change < 0 else "+"
        t.add_row(
            name,
            fmt(d["baseline"]),
            fmt(d["variant"]),
            "-" if change is None else sign + fmt(change).lstrip("+"),
        )
    console.print(t)
    console.print(f"{len(files)} files in {out}/", highlight=False)
    return EXIT_OK
