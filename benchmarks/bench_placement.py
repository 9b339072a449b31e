"""Placement benchmarks: one JSON line per case.

    python benchmarks/bench_placement.py [scale] [boolean] [quality] [openb] [gavel]

1. scale: tasks x pools x classes at 1k x 50 x 10, 10k x 200 x 50 and 100k x 1,000 x 200
   (five seeded instances each, median reported): table build time, whole solve time, status,
   gap (against the solve's own bound), gap against the whole relaxation's optimum (column
   generation run to the end, after timing), peak RSS of the process when it had solved.
2. boolean: the count model against the obvious model with one boolean per (task, option), on
   the same columns and costs, at 300 x 30 and 2,000 x 100 and at 10k x 200 (boolean model
   capped at BOOLEAN_CAP_S seconds of search, as long as the issue's own measurement ran, and
   BOOLEAN_MEM_GIB of memory). The count model's time is the median of 3 solves. Where the
   boolean model finds nothing as good, its build time plus the cap is only a floor on the
   time it would need, so the speedup reported is a floor too. Both models add an elastic
   pool's capacity up over its instances; the boolean model's answer is repacked instance by
   instance (``place_greedy``) as ``solve`` repacks the count model's, before it is priced.
3. quality: on instances where CP-SAT proves the optimum (within 60 s of search), greedy and
   the default-budget answer against that optimum.
4. openb, pooled: the Alibaba PAI "openb" trace (all 1,523 nodes, 8,152 pods): pods arrive in
   trace order in batches of 250, no inflation; share of GPUs allocated and pods left unplaced,
   with each node's GPUs counted as ONE pooled budget (devices not modelled, so some of these
   placements are impossible on real devices). This is the count model's batch throughput on a
   real trace, not the FGD protocol: packing on real devices is ``bench_packing.py``.
5. gavel: jobs of a Gavel Philly virtual-cluster trace on 16:16:16 and 36:36:36 K80:P100:V100,
   placed with Gavel's throughput table (heterogeneity-aware) and without it: total normalized
   throughput of what was placed.

Each case runs in a child process (fork), so peak RSS is that case's alone. This machine has 2
cores and is noisy: compare within one run.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# openb and Gavel's traces: $STOWPLAN_TRACES, the team's copy ../shared/traces by default
# (the Alibaba traces are for research or study use and are not shipped; see examples/traces/)
TRACES = Path(
    os.environ.get(
        "STOWPLAN_TRACES", Path(__file__).resolve().parents[1].parent / "shared" / "traces"
    )
)
BOOLEAN_CAP_S = 120.0
BOOLEAN_MEM_GIB = 10


def _warm() -> None:
    """Import the solvers before any clock starts: a long-lived placement actor has them loaded."""
    import ortools.sat.python.cp_model  # noqa: F401
    import scipy.optimize  # noqa: F401

    import stowplan.placement.cpsat
    import stowplan.placement.lp  # noqa: F401


def _child(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], q: Any) -> None:
    _warm()
    try:
        out = fn(*args)
    except MemoryError:
        out = {"error": "out of memory"}
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    q.put(out)


def isolated(
    fn: Callable[..., dict[str, Any]],
    *args: Any,
    mem_gib: float | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def target() -> None:
        if mem_gib is not None:
            limit = int(mem_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        _child(fn, args, q)

    p = ctx.Process(target=target)
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"error": f"did not finish in {timeout:.0f} s"}
    if p.exitcode != 0 and q.empty():
        return {"error": f"exited with {p.exitcode} (out of memory?)"}
    result: dict[str, Any] = q.get()
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def emit(case: dict[str, Any]) -> None:
    print(json.dumps(case, sort_keys=True), flush=True)


# ---- 1. scale ------------------------------------------------------------------------------


def _scale_one(tasks: int, pools: int, classes: int, seed: int) -> dict[str, Any]:
    from stowplan.placement import solve
    from stowplan.placement.synthetic import problem
    from stowplan.placement.table import build

    p = problem(tasks, pools, classes, seed=seed)
    t0 = time.perf_counter()
    table = build(p)
    build_s = time.perf_counter() - t0
    columns = sum(len(c) for c in table.columns)
    del table
    t0 = time.perf_counter()
    s1 = solve(p, seed=0)
    solve_s = time.perf_counter() - t0
    s2 = solve(p, seed=0)
    solve_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # quality against the whole relaxation's optimum (column generation run to the end): a
    # tighter yardstick than the bound one default solve can afford at 10^5 tasks
    from stowplan.placement.greedy import place_greedy
    from stowplan.placement.lp import relax

    table = build(p)
    whole = relax(table, place_greedy(table)[0], rounds=1000)
    assert whole is not None
    return {
        "build_s": build_s,
        "solve_s": solve_s,
        "status": str(s1.status),
        "gap": s1.gap,
        "gap_to_lp_optimum": max(0.0, (s1.objective - whole.bound) / abs(s1.objective)),
        "placed": s1.placed(),
        "columns": columns,
        "deterministic": s1.fingerprint() == s2.fingerprint(),
        "solve_rss_mib": round(solve_rss, 1),
    }


def scale() -> None:
    for tasks, pools, classes in [(1_000, 50, 10), (10_000, 200, 50), (100_000, 1_000, 200)]:
        runs = [isolated(_scale_one, tasks, pools, classes, seed) for seed in range(5)]
        emit(
            {
                "case": "scale",
                "tasks": tasks,
                "pools": pools,
                "classes": classes,
                "instances": len(runs),
                "columns_median": statistics.median(r["columns"] for r in runs),
                "build_s_median": round(statistics.median(r["build_s"] for r in runs), 4),
                "solve_s_median": round(statistics.median(r["solve_s"] for r in runs), 4),
                "solve_s_max": round(max(r["solve_s"] for r in runs), 4),
                "statuses": sorted({r["status"] for r in runs}),
                "gap_median": statistics.median(r["gap"] for r in runs),
                "gap_to_lp_optimum_max": max(r["gap_to_lp_optimum"] for r in runs),
                "placed_median": statistics.median(r["placed"] for r in runs),
                "deterministic": all(r["deterministic"] for r in runs),
                "peak_rss_mib_max": max(r["solve_rss_mib"] for r in runs),
            }
        )


# ---- 2. boolean model ----------------------------------------------------------------------


def _boolean(tasks: int, pools: int, classes: int, cap_s: float) -> dict[str, Any]:
    """One boolean per (task, option) on the count model's own columns and costs."""
    from ortools.sat.python import cp_model

    from stowplan.placement.greedy import place_greedy
    from stowplan.placement.solution import objective_int
    from stowplan.placement.synthetic import problem
    from stowplan.placement.table import build

    p = problem(tasks, pools, classes, seed=1)
    t0 = time.perf_counter()
    table = build(p)
    m = cp_model.CpModel()
    use: dict[tuple[int, int, int], list[tuple[Any, int]]] = {}
    terms: list[Any] = []
    coefs: list[int] = []
    for ci, cols in enumerate(table.columns):
        opts = list(
            zip(cols.pool.tolist(), cols.model.tolist(), cols.cost_int.tolist(), strict=True)
        )
        for _ in table.classes[ci].members:
            bs = []
            for j, mi, cost in opts:
                b = m.new_bool_var("")
                bs.append(b)
                use.setdefault((ci, j, mi), []).append((b, 1))
                terms.append(b)
                coefs.append(cost - table.reward[ci])
            if bs:
                m.add_at_most_one(bs)
    n = {
        j: m.new_int_var(0, table.pools[j].max_instances, "")
        for j in range(len(table.pools))
        if table.node[j] is not None
    }
    by_pool: dict[int, list[tuple[int, int, Any]]] = {}
    for (ci, j, mi), bs in use.items():
        for b, _ in bs:
            by_pool.setdefault(j, []).append((ci, mi, b))
    for j, items in by_pool.items():
        cpu, mem, gpus = table.free[j]
        node = table.node[j]
        inst = n.get(j)

        def extra(r: int, inst: Any = inst) -> Any:
            return r * inst if inst is not None else 0

        m.add(
            sum(table.need[ci][0] * b for ci, _, b in items) <= cpu + extra(node[0] if node else 0)
        )
        m.add(
            sum(table.need[ci][1] * b for ci, _, b in items) <= mem + extra(node[1] if node else 0)
        )
        for mi, model in enumerate(table.models):
            g = [(ci, b) for ci, k, b in items if k == mi and table.need[ci][2]]
            if g:
                m.add(
                    sum(table.need[ci][2] * b for ci, b in g)
                    <= gpus.get(model, 0) + extra(node[2].get(model, 0) if node else 0)
                )
    obj = cp_model.LinearExpr.weighted_sum(terms, coefs)
    if n:
        obj = obj + cp_model.LinearExpr.weighted_sum(
            list(n.values()), [table.instance_cost_int[j] for j in n]
        )
    m.minimize(obj)
    build_s = time.perf_counter() - t0
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = cap_s
    t1 = time.perf_counter()
    status = solver.solve(m)
    solve_s = time.perf_counter() - t1
    out: dict[str, Any] = {
        "model": "boolean",
        "variables": len(terms),
        "build_s": build_s,
        "solve_s": solve_s,
        "status": solver.status_name(status),
    }
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        counts: dict[tuple[int, int, str], int] = {}
        for (ci, j, mi), bs in use.items():
            k = sum(int(solver.value(b)) for b, _ in bs)
            if k:
                key = (ci, j, table.models[mi] if mi >= 0 else "")
                counts[key] = counts.get(key, 0) + k
        launched = {j: int(solver.value(v)) for j, v in n.items() if solver.value(v)}
        # like the count model's, its answer counts an elastic pool's capacity over the
        # instances together: both are repacked instance by instance the same way
        counts, launched = place_greedy(table, counts, launched)
        out["objective"] = objective_int(table, counts, launched)
        out["placed"] = sum(counts.values())
    return out


def _count(tasks: int, pools: int, classes: int) -> dict[str, Any]:
    from stowplan.placement import solve
    from stowplan.placement.synthetic import problem

    p = problem(tasks, pools, classes, seed=1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        s = solve(p)
        times.append(time.perf_counter() - t0)
    return {
        "model": "count",
        "solve_s": statistics.median(times),
        "status": str(s.status),
        "objective": int(s.objective),
        "placed": s.placed(),
        "gap": s.gap,
    }


def boolean() -> None:
    for tasks, pools, classes in [(300, 30, 6), (2_000, 100, 20), (10_000, 200, 50)]:
        count = isolated(_count, tasks, pools, classes)
        boolean = isolated(
            _boolean,
            tasks,
            pools,
            classes,
            BOOLEAN_CAP_S,
            mem_gib=BOOLEAN_MEM_GIB,
            timeout=BOOLEAN_CAP_S * 6,
        )
        case: dict[str, Any] = {
            "case": "boolean",
            "tasks": tasks,
            "pools": pools,
            "classes": classes,
            "count": count,
            "boolean": boolean,
        }
        total_b = boolean.get("build_s", 0.0) + boolean.get("solve_s", 0.0)
        case["speedup"] = round(total_b / count["solve_s"], 1)
        # a boolean model that found nothing is beaten by any placement
        case["count_objective_at_least_as_good"] = count["objective"] <= boolean.get("objective", 0)
        emit(case)


# ---- 3. quality ----------------------------------------------------------------------------


def _quality(tasks: int, pools: int, classes: int, seed: int) -> dict[str, Any]:
    from stowplan.placement import solve
    from stowplan.placement.greedy import solve_greedy
    from stowplan.placement.synthetic import problem

    p = problem(tasks, pools, classes, seed=seed)
    t0 = time.perf_counter()
    best = solve(p, budget=60.0)  # deterministic seconds; stops when proven
    best_s = time.perf_counter() - t0
    default = solve(p)
    greedy = solve_greedy(p)

    def rel(x: float) -> float:
        return (x - best.objective) / abs(best.objective)

    return {
        "optimal": str(best.status) == "OPTIMAL",
        "prove_s": best_s,
        "default_rel": rel(default.objective),
        "greedy_rel": rel(greedy.objective),
        "placed": {
            "optimum": best.placed(),
            "default": default.placed(),
            "greedy": greedy.placed(),
        },
        "cost": {
            "optimum": best.terms["cost"],
            "default": default.terms["cost"],
            "greedy": greedy.terms["cost"],
        },
    }


def quality() -> None:
    for tasks, pools, classes, seed in [
        (1_000, 30, 8, 7),
        (1_000, 30, 8, 8),
        (2_000, 40, 10, 1),
        (500, 20, 6, 2),
        (800, 25, 6, 4),
    ]:
        r = isolated(_quality, tasks, pools, classes, seed)
        emit(
            {
                "case": "quality",
                "tasks": tasks,
                "pools": pools,
                "classes": classes,
                "seed": seed,
                **r,
            }
        )


# ---- 4. Alibaba openb ----------------------------------------------------------------------


def _openb(batch: int) -> dict[str, Any]:
    from stowplan.placement import DemandClass, PlacementProblem, Pool, expand, solve
    from stowplan.placement.greedy import solve_greedy

    root = TRACES / "alibaba-gpu-v2023-openb" / "csv"
    mib = 1 << 20
    nodes = _rows(root / "openb_node_list_all_node.csv")
    pods = _rows(root / "openb_pod_list_default.csv")
    pods.sort(key=lambda r: (int(r["creation_time"]), r["name"]))
    # GPUs count in thousandths so fractional (shared) GPUs fit; a pod needing more than one
    # GPU takes whole ones. Within a node, which physical GPU a share sits on is not modelled.
    free = {
        n["sn"]: [
            int(n["cpu_milli"]),
            int(n["memory_mib"]),
            int(n["gpu"]) * 1000,
            n["model"] or "none",
        ]
        for n in nodes
    }
    total_gpu = sum(int(n["gpu"]) for n in nodes) * 1000
    out: dict[str, Any] = {}
    for name, solver in (("cp-sat", solve), ("greedy", None)):
        state = {k: list(v) for k, v in free.items()}
        unplaced = 0
        t0 = time.perf_counter()
        for start in range(0, len(pods), batch):
            chunk = pods[start : start + batch]
            pools = [
                Pool(
                    id=sn,
                    provider="k8s",
                    kind="kubernetes",
                    cpus=c / 1000,
                    memory=m * mib,
                    gpus={model: g} if g else {},
                )
                for sn, (c, m, g, model) in sorted(state.items())
            ]
            groups: dict[tuple[Any, ...], list[str]] = {}
            need = {}
            for pod in chunk:
                ng, gm = int(pod["num_gpu"]), int(pod["gpu_milli"])
                gpus = ng * 1000 if ng > 1 else (gm if ng == 1 else 0)
                spec = tuple(sorted(x for x in pod["gpu_spec"].split("|") if x))
                key = (int(pod["cpu_milli"]), int(pod["memory_mib"]), gpus, spec)
                groups.setdefault(key, []).append(pod["name"])
                need[pod["name"]] = key
            classes = [
                DemandClass(
                    id=f"c{i:05d}",
                    cpus=k[0] / 1000,
                    memory=k[1] * mib,
                    gpus=k[2],
                    gpu_types=k[3] if k[2] else (),
                    members=members,
                )
                for i, (k, members) in enumerate(groups.items())
            ]
            problem = PlacementProblem(pools=pools, classes=classes)
            sol = solver(problem, seed=0) if solver else solve_greedy(problem)
            placed = 0
            for a in expand(problem, sol):
                cpu, mem, gpus, _ = need[a.class_id]
                st = state[a.pool_id]
                st[0] -= cpu
                st[1] -= mem
                st[2] -= gpus
                placed += 1
            unplaced += len(chunk) - placed
        used = total_gpu - sum(v[2] for v in state.values())
        out[name] = {
            "gpu_allocated_share_pooled": round(used / total_gpu, 4),
            "pods_unplaced": unplaced,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return {"nodes": len(nodes), "pods": len(pods), "batch": batch, **out}


def openb() -> None:
    emit(
        {
            "case": "openb-pooled",
            "measures": "pooled GPU budget per node (devices not modelled), 1,523 nodes, trace "
            "order, batches of 250, no inflation; not the FGD protocol: see bench_packing.py",
            **isolated(_openb, 250),
        }
    )


# ---- 5. Gavel ------------------------------------------------------------------------------


def _gavel(trace: str, per_type: int) -> dict[str, Any]:
    from stowplan.placement import DemandClass, PlacementProblem, Pool, expand, solve

    gavel = TRACES / "gavel"
    thr: dict[tuple[str, int], dict[str, float]] = {}
    for row in _rows(gavel / "derived_isolated_throughputs_simulation.csv"):
        thr[(row["job_type"], int(row["scale_factor"]))] = {
            m: float(row[m]) for m in ("k80", "p100", "v100")
        }
    jobs = []
    for line in (gavel / "traces" / "msr" / "seed=0" / trace).read_text().splitlines():
        f = line.rstrip("\n").split("\t")
        key = (f[0], int(f[6]))
        if key in thr and all(v > 0 for v in thr[key].values()):
            jobs.append((f"j{len(jobs):05d}", key, int(f[4])))
    pools = [
        Pool(
            id=m,
            provider="gavel",
            kind="sim",
            cpus=1e6,
            memory=1 << 50,
            gpus={m: per_type},
            price_per_hour=1.0,
        )
        for m in ("k80", "p100", "v100")
    ]
    out: dict[str, Any] = {
        "trace": trace,
        "jobs": len(jobs),
        "cluster": f"{per_type}:{per_type}:{per_type}",
    }
    for aware in (True, False):
        classes = []
        for jid, (jt, sf), steps in jobs:
            secs = {m: steps / t for m, t in thr[(jt, sf)].items()}
            classes.append(
                DemandClass(
                    id=jid,
                    cpus=1,
                    memory=1 << 30,
                    gpus=sf,
                    runtime_s=statistics.mean(secs.values()),
                    runtime_by_gpu=tuple(sorted(secs.items())) if aware else (),
                    members=[jid],
                )
            )
        problem = PlacementProblem(pools=pools, classes=classes)
        t0 = time.perf_counter()
        sol = solve(problem, seed=0, budget=1.0)
        key_of = {jid: key for jid, key, _ in jobs}
        total = 0.0
        for a in expand(problem, sol):
            t = thr[key_of[a.class_id]]
            total += t[a.pool_id] / max(t.values())
        out["aware" if aware else "agnostic"] = {
            "placed": sol.placed(),
            "normalized_throughput": round(total, 3),
            "status": str(sol.status),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    out["ratio"] = round(
        out["aware"]["normalized_throughput"] / max(1e-9, out["agnostic"]["normalized_throughput"]),
        3,
    )
    return out


def gavel() -> None:
    trace = sorted(p.name for p in (TRACES / "gavel" / "traces" / "msr" / "seed=0").iterdir())[0]
    for per_type in (16, 36):
        emit({"case": "gavel", **isolated(_gavel, trace, per_type)})


CASES = {"scale": scale, "boolean": boolean, "quality": quality, "openb": openb, "gavel": gavel}
NEEDS = {
    "openb": ("alibaba-gpu-v2023-openb/csv/openb_node_list_all_node.csv",),
    "gavel": ("gavel/derived_isolated_throughputs_simulation.csv", "gavel/traces/msr/seed=0"),
}
"""Traces each case reads under $STOWPLAN_TRACES: checked before anything runs."""

if __name__ == "__main__":
    from stowplan.errors import SpecError
    from stowplan.simulator.workloads import TRACES_ENV, trace_path

    os.environ.setdefault(TRACES_ENV, str(TRACES))
    names = sys.argv[1:] or list(CASES)
    try:
        for name in names:
            for rel in NEEDS.get(name, ()):
                trace_path(rel)
    except SpecError as e:
        raise SystemExit(f"bench_placement: {e.render()}") from None
    for name in names:
        CASES[name]()
