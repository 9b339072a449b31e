"""Simulator speed and the checks against published results. One JSON line per case.

Cases (``--cases``, comma-separated; default all):

``engine``   events per second of the bare engine (a self-rescheduling callback over 1,000
             interleaved streams, 1,000,000 events). Target: >= 500k events/s.
``gavel``    Gavel's Philly VC trace 103959 (861 jobs after dropping job types missing from the
             throughput table) on 16:16:16 and 36:36:36 K80:P100:V100, heterogeneity-agnostic
             (``fifo``: first fit, pools fastest first; ``greedy``: cheapest pool first, so K80
             first) vs heterogeneity-aware (``throughput``): average JCT in hours, the ratio,
             and wall seconds per run. Target: <= 1 s per run.
             Gavel's own simulator on 16:16:16: 18.37 h vs 13.57 h (1.35x), 20-26 s.
``philly``   all 82,247 jobs of the Philly list with the real core and ``--policy`` placement
             (default cpsat), on examples/clusters/philly.toml (one shared partition) and
             philly-vc.toml (one partition per virtual cluster, jobs held to their VC);
             ``--philly-clusters philly-devices`` leases every job's GPUs by device: wall
             seconds (target <= 60 s), wait percentiles beside the Philly row of
             acme_cluster_summary.csv.

    .venv/bin/python benchmarks/bench_simulator.py [--cases engine,gavel,philly]
        [--policy cpsat] [--profile]

The Gavel trace and table ship with the repository (examples/traces/gavel/); the Philly list and
the Acme summary come from $STOWPLAN_TRACES (the team's default: ../shared/traces beside the
checkout), and a missing one is named with where to get it. ``--profile`` adds the top of a
cProfile of the Philly replay (where the time goes: core, placement, simulator) to its line.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import os
import pstats
import time
from pathlib import Path
from typing import Any

from stowplan.errors import SpecError
from stowplan.simulator.cluster import load_cluster
from stowplan.simulator.engine import Engine
from stowplan.simulator.shell import SimOptions, Simulation
from stowplan.simulator.workloads import TRACES_ENV, load_workload, trace_path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault(TRACES_ENV, str(ROOT.parent / "shared" / "traces"))
CLUSTERS = ROOT / "examples" / "clusters"


def emit(case: dict[str, Any]) -> None:
    print(json.dumps(case, sort_keys=True), flush=True)


def bench_engine(n: int = 1_000_000, streams: int = 1000) -> None:
    e = Engine(seed=1)
    rng = e.rng("bench")
    delays = [rng.expovariate(1.0) for _ in range(streams)]
    left = [n]

    def tick(i: int) -> None:
        left[0] -= 1
        if left[0] > streams:
            e.at(e.now + delays[i], tick, (i + 1) % streams)

    for i in range(streams):
        e.at(delays[i], tick, i)
    t = time.perf_counter()
    e.run()
    dt = time.perf_counter() - t
    emit(
        {
            "case": "engine",
            "events": e.events_run,
            "wall_s": round(dt, 3),
            "events_per_s": round(e.events_run / dt),
            "target_events_per_s": 500_000,
        }
    )


def _run(cluster: Path, workload: Any, policy: str, seed: int = 0) -> tuple[Simulation, float]:
    spec = load_cluster(cluster).spec
    t = time.perf_counter()
    sim = Simulation(spec, workload, SimOptions(policy=policy, seed=seed))
    sim.run()
    return sim, time.perf_counter() - t


def bench_gavel() -> None:
    wl = load_workload(trace_path("gavel/traces/msr/seed=0/103959.trace"))
    for shape in ("16-16-16", "36-36-36"):
        jct = {}
        for policy in ("fifo", "greedy", "throughput"):
            sim, wall = _run(CLUSTERS / f"gavel-{shape}.toml", wl, policy)
            s = sim.metrics.summary(sim.metrics.job_rows())
            jct[policy] = s["completion_s"]["mean"] / 3600.0
            emit(
                {
                    "case": "gavel",
                    "cluster": shape.replace("-", ":"),
                    "policy": policy,
                    "jobs": s["jobs"],
                    "succeeded": s["states"].get("SUCCEEDED", 0),
                    "avg_jct_h": round(jct[policy], 3),
                    "wall_s": round(wall, 3),
                    "target_wall_s": 1.0,
                }
            )
        emit(
            {
                "case": "gavel-check",
                "cluster": shape.replace("-", ":"),
                "agnostic_avg_jct_h": round(jct["fifo"], 3),
                "aware_avg_jct_h": round(jct["throughput"], 3),
                "agnostic_over_aware": round(jct["fifo"] / jct["throughput"], 3),
                "cheapest_first_avg_jct_h": round(jct["greedy"], 3),
                "aware_is_lower": jct["throughput"] < jct["fifo"],
                "gavel_published_16_16_16": {"agnostic_h": 18.37, "aware_h": 13.57, "ratio": 1.35},
            }
        )


def philly_reference() -> dict[str, float]:
    path = trace_path("acme-helios-philly-pai-summary/acme_cluster_summary.csv")
    for row in csv.DictReader(io.StringIO(path.read_text())):
        if row["id"] == "Philly":
            return {
                "jobs": float(row["gpu_job_num"]),
                "avg_queue_s": float(row["avg_que_time_gpu"]),
                "median_queue_s": float(row["med_que_time_gpu"]),
                "avg_run_s": float(row["avg_run_time_gpu"]),
                "median_run_s": float(row["med_run_time_gpu"]),
            }
    raise SystemExit("no Philly row in acme_cluster_summary.csv")


def bench_philly(policy: str, profile: bool, cluster: str) -> None:
    t = time.perf_counter()
    wl = load_workload(trace_path("philly-derived-pollux/philly.csv"))
    load_s = time.perf_counter() - t
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    sim, wall = _run(CLUSTERS / f"{cluster}.toml", wl, policy)
    if prof is not None:
        prof.disable()
    t = time.perf_counter()
    s = sim.metrics.summary(sim.metrics.job_rows())
    summary_s = time.perf_counter() - t
    line: dict[str, Any] = {
        "case": "philly",
        "policy": policy,
        "jobs": s["jobs"],
        "states": s["states"],
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "summary_s": round(summary_s, 2),
        "target_wall_s": 60,
        "events": sim.engine.events_run,
        "core_events": sim.counters.core_events,
        "solves": sim.counters.solves,
        "cluster": f"examples/clusters/{cluster}.toml (352 nodes x 8 GPUs)",
        "wait_s": s["wait_s"],
        "utilization": s["utilization"],
        "philly_published": philly_reference(),
    }
    if prof is not None:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        total = st.total_tt  # type: ignore[attr-defined]
        groups: dict[str, float] = {}
        for (file, _, _), (_, _, tt, _, _) in st.stats.items():  # type: ignore[attr-defined]
            key = (
                "scheduler core"
                if "/stowplan/scheduler/" in file
                else "placement"
                if "/stowplan/placement/" in file
                else "simulator"
                if "/stowplan/simulator/" in file
                else "other (stdlib, msgspec)"
            )
            groups[key] = groups.get(key, 0.0) + tt
        line["profile_self_s"] = {k: round(v, 2) for k, v in sorted(groups.items())}
        line["profile_total_s"] = round(total, 2)
    emit(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="engine,gavel,philly")
    ap.add_argument("--policy", default="cpsat", help="placement for the Philly replay")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--philly-clusters",
        default="philly,philly-vc",
        help="philly: one shared partition; philly-vc: one per virtual cluster",
    )
    args = ap.parse_args()
    cases = args.cases.split(",")
    if "engine" in cases:
        bench_engine()
    try:
        if "gavel" in cases:
            bench_gavel()
        if "philly" in cases:
            for cluster in args.philly_clusters.split(","):
                bench_philly(args.policy, args.profile, cluster)
    except SpecError as e:
        raise SystemExit(f"bench_simulator: {e.render()}") from None


if __name__ == "__main__":
    main()
