"""Simulation results as files: ``report.json``, CSV tables and plots (PNG and SVG).

Same inputs and seed give byte-identical files: the report holds virtual times only (no wall
clock, no host names), JSON keys are sorted, floats are rounded once in ``metrics``, and the
plots are written with fixed metadata and a fixed SVG hash salt.

Files written into the output folder:

- ``report.json``: everything, one document (``runs`` holds one entry per policy);
- ``jobs-<policy>.csv``: one row per job (wait, completion, slowdown, attempts, pool);
- ``pools-<policy>.csv``: one row per pool (utilization, busy GPU-hours, cost, faults);
- ``timeseries-<policy>.csv``: queue length, running jobs and utilization per pool over time;
- ``queue.png``/``.svg``: queue length and utilization over time, one panel per policy;
- ``wait_cdf.png``/``.svg``: the wait-time CDF, one line per policy.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import msgspec

from stowplan.simulator.shell import Simulation

REPORT_VERSION = 1


def run_record(sim: Simulation) -> dict[str, Any]:
    """One simulation as plain data: summary, per-job rows and time series."""
    m = sim.metrics
    rows = m.job_rows()
    wl = sim.workload
    c = sim.counters
    return {
        "policy": sim.opts.policy,
        "seed": sim.opts.seed,
        "until": sim.until,
        "faults": sim.opts.faults,
        "summary": m.summary(rows),
        "counters": {k: v for k, v in msgspec.structs.asdict(c).items() if k != "notes"},
        "notes": list(c.notes),
        "idempotency": {
            "keys_executed": c.keys_executed,
            "max_executions_per_key": 1 if c.keys_executed else 0,
            "duplicate_submits_absorbed": c.duplicate_submits_absorbed,
        },
        "workload": {
            "name": wl.name,
            "kind": wl.kind,
            "source": wl.source,
            "jobs": len(wl.jobs),
            "notes": list(wl.notes),
            "data_placement": wl.data_placement
            or {"rule": "none: the trace records no data locations and none were assigned"},
        },
        "jobs": rows,
        "timeseries": m.timeseries(),
    }


def build_report(
    cluster_file: str, workload_file: str, records: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "stowplan_sim_report": REPORT_VERSION,
        "cluster": cluster_file,
        "workload": workload_file,
        "runs": records,
    }


def encode(report: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report, order="sorted"), indent=1) + b"\n"


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buf.getvalue()


JOB_COLUMNS = [
    "job",
    "project",
    "gpus",
    "state",
    "pool",
    "attempts",
    "submit",
    "start",
    "end",
    "wait",
    "completion",
    "run_time",
    "slowdown",
    "reason",
]
POOL_COLUMNS = [
    "pool",
    "kind",
    "site",
    "gpu_model",
    "units",
    "gpus",
    "utilization",
    "busy_gpu_hours",
    "cost",
    "instance_hours",
    "launches",
    "node_failures",
    "preemptions",
    "backfilled",
]


def write_outputs(report: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """Write every file into ``out`` (created if needed); return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # per-job rows go to CSV; the JSON keeps summaries only, so it stays readable
    slim = dict(report)
    slim["runs"] = [{k: v for k, v in r.items() if k != "jobs"} for r in report["runs"]]
    p = out / "report.json"
    p.write_bytes(encode(slim))
    written.append(p)
    for r in report["runs"]:
        tag = _tag(r["policy"])
        p = out / f"jobs-{tag}.csv"
        p.write_text(_csv(r["jobs"], JOB_COLUMNS), encoding="utf-8")
        written.append(p)
        pools = [{"pool": k, **v} for k, v in r["summary"]["pools"].items()]
        p = out / f"pools-{tag}.csv"
        p.write_text(_csv(pools, POOL_COLUMNS), encoding="utf-8")
        written.append(p)
        ts = r["timeseries"]
        names = sorted(ts["utilization"])
        trows = []
        for i, t in enumerate(ts["t"]):
            row: dict[str, Any] = {"t": t, "queued": ts["queued"][i], "running": ts["running"][i]}
            for n in names:
                row[f"util:{n}"] = ts["utilization"][n][i]
            trows.append(row)
        p = out / f"timeseries-{tag}.csv"
        p.write_text(
            _csv(trows, ["t", "queued", "running", *(f"util:{n}" for n in names)]), encoding="utf-8"
        )
        written.append(p)
    if plots:
        written += plot(report, out)
    return written


def _tag(policy: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in policy)


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Queue length and utilization over time; the wait-time CDF per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written: list[Path] = []
    runs = report["runs"]
    with matplotlib.rc_context({"svg.hashsalt": "stowplan", "font.size": 9}):
        fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3 * len(runs)), squeeze=False)
        for ax, r in zip(axes[:, 0], runs, strict=True):
            ts = r["timeseries"]
            hours = np.asarray(ts["t"], dtype=float) / 3600.0
            ax.step(hours, ts["queued"], where="post", label="queued", color="tab:red")
            ax.step(hours, ts["running"], where="post", label="running", color="tab:blue")
            ax.set_ylabel("jobs")
            ax.set_title(f"{r['policy']}: queue and utilization")
            ax2 = ax.twinx()
            for name, u in sorted(ts["utilization"].items()):
                ax2.plot(hours, u, linewidth=0.8, alpha=0.7, label=f"util {name}")
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("utilization")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7)
        axes[-1, 0].set_xlabel("simulated time (h)")
        fig.tight_layout()
        written += _save(fig, out / "queue")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            waits = np.sort([j["wait"] for j in r["jobs"] if j["wait"] is not None])
            if len(waits) == 0:
                continue
            y = np.arange(1, len(waits) + 1) / len(waits)
            ax.step(np.maximum(waits, 1.0), y, where="post", label=r["policy"])
        ax.set_xscale("log")
        ax.set_xlabel("wait (s, log; waits under 1 s drawn at 1 s)")
        ax.set_ylabel("fraction of jobs")
        ax.set_title("wait-time CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written += _save(fig, out / "wait_cdf")
        plt.close(fig)
    return written


def _save(fig: Any, stem: Path) -> list[Path]:
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    fig.savefig(png, dpi=110, metadata={"Software": None})
    fig.savefig(svg, metadata={"Date": None, "Creator": None})
    return [png, svg]
