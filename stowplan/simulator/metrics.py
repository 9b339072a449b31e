"""What a simulation measured: per job, per pool, per project, over time.

Per job: wait (submission to first start), completion time (submission to the end of its last
attempt), slowdown (completion time over the run time of its last attempt). Per pool:
utilization (busy GPU-seconds over GPU-seconds offered; CPU-seconds for pools without GPUs) and
cost (owned pools: every node for the whole horizon; cloud pools: instance-seconds billed, from
each instance's provision to its stop, at least the minimum). A cloud pool offers what its
instances ran for: its utilization is busy GPU- (or CPU-) seconds over instance-seconds times
the instance's GPUs (CPUs), and its ``instance_hours`` and ``launches`` are reported.
A share of one GPU counts its thousandths on a pool with ``gpu_sharing`` (where it runs beside
other shares on one device) and the whole device elsewhere (which it holds alone), in pools'
busy GPU-seconds and in projects' GPU-hours alike (``SimPool.gpu_milli_of``).
Totals: cost including egress, bytes moved between sites, fairness across projects (Jain's index
over per-project mean slowdown), queue length and utilization over time.

Everything here is computed from virtual time only, so the same inputs and seed give the same
numbers, to the last bit.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from stowplan.placement.leases import MILLI
from stowplan.scheduler import states
from stowplan.scheduler.events import Transition
from stowplan.scheduler.states import FINAL, TaskState
from stowplan.simulator.provider import CloudInstanceType

if TYPE_CHECKING:
    from stowplan.simulator.shell import Simulation

WAITING = states.WAITING
PERCENTILES = (50, 90, 95, 99)


def _r(x: float) -> float:
    """Round for the report: stable text, no false precision."""
    return float(round(x, 6))


class Metrics:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.submit: dict[str, float] = {}
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.final: dict[str, TaskState] = {}
        self.why: dict[str, str] = {}
        """why a job ended other than SUCCEEDED: its last transition's failure and reason"""
        self.pool: dict[str, str] = {}
        self.failures: Counter[str] = Counter()
        self.lost = 0
        """leases that expired without news (the run was then reconciled by key)"""
        self.t: list[float] = []
        self.queued: list[int] = []
        self.running: list[int] = []
        self.util: dict[str, list[float]] = {}
        self.end_time = 0.0

    def submitted(self, run_id: str, t: float) -> None:
        self.submit[run_id] = t

    def transitions(self, records: list[Transition], now: float) -> None:
        running = TaskState.RUNNING
        start = self.start
        for rec in records:
            to = rec.to_state
            if to is running:
                if rec.run_id not in start:
                    start[rec.run_id] = now
                if rec.pool is not None:
                    self.pool[rec.run_id] = rec.pool
            elif to in FINAL:
                self.end[rec.run_id] = now
                self.final[rec.run_id] = to
                if to is not TaskState.SUCCEEDED:
                    why = rec.reason or ""
                    if rec.failure is not None:
                        why = f"{rec.failure.value}: {why}" if why else rec.failure.value
                    self.why[rec.run_id] = why
            elif to is TaskState.LOST:
                self.lost += 1
            if rec.failure is not None and to in (TaskState.RETRYING, TaskState.FAILED):
                self.failures[rec.failure.value] += 1

    def sample(self, now: float) -> None:
        counts = self.sim.core.counts
        self.t.append(now)
        self.queued.append(sum(counts[s] for s in WAITING))
        self.running.append(counts[TaskState.RUNNING])
        for prov in self.sim.providers.values():
            for name, pool in prov.pools.items():
                # a cloud pool offers the instances it has now
                units = pool.instances if isinstance(pool, CloudInstanceType) else pool.units
                if pool.gpn:
                    cap = float(units * pool.gpn)
                    used = pool.used_milli / MILLI
                else:
                    cap = units * pool.cpn
                    used = pool.used_c
                self.util.setdefault(name, []).append(used / cap if cap else 0.0)

    def close(self, end: float) -> None:
        self.end_time = end
        self.sample(end)

    # ---- summaries ---------------------------------------------------------------------------

    def job_rows(self) -> list[dict[str, Any]]:
        sim = self.sim
        core = sim.core
        rows = []
        for run_id, submit in self.submit.items():
            state = core.state(run_id)
            start = self.start.get(run_id)
            end = self.end.get(run_id)
            run_s = None
            key = core.key(run_id)
            pool = self.pool.get(run_id)
            if key and pool is not None:
                for prov in sim.providers.values():
                    att = prov.attempts.get(key)
                    if att is not None and att.started is not None and att.ended is not None:
                        run_s = att.ended - att.started
                        break
            jct = end - submit if end is not None and state is TaskState.SUCCEEDED else None
            rows.append(
                {
                    "job": run_id,
                    "project": sim.jobs[run_id].project,
                    "gpus": sim.jobs[run_id].gpus,
                    "state": state.value,
                    "pool": pool or "",
                    "attempts": core.attempt(run_id),
                    "submit": _r(submit),
                    "start": None if start is None else _r(start),
                    "end": None if end is None else _r(end),
                    "wait": None if start is None else _r(start - submit),
                    "completion": None if jct is None else _r(jct),
                    "run_time": None if run_s is None else _r(run_s),
                    "slowdown": None if jct is None or not run_s else _r(jct / run_s),
                    "reason": self.why.get(run_id) or core.held(run_id),
                }
            )
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        sim = self.sim
        horizon = max(self.end_time, 1e-9)
        waits = np.array([r["wait"] for r in rows if r["wait"] is not None], dtype=float)
        jcts = np.array([r["completion"] for r in rows if r["completion"] is not None])
        slow = np.array([r["slowdown"] for r in rows if r["slowdown"] is not None])
        states = Counter(r["state"] for r in rows)
        out: dict[str, Any] = {
            "jobs": len(rows),
            "states": dict(sorted(states.items())),
            "started": len(waits),
            "horizon_s": _r(self.end_time),
            "wait_s": _stats(waits),
            "completion_s": _stats(jcts),
            "slowdown": _stats(slow),
            "failures": dict(sorted(self.failures.items())),
            "leases_expired": self.lost,
        }
        pools: dict[str, Any] = {}
        total_cost = 0.0
        gpu_offered = 0.0
        for prov in sim.providers.values():
            for name, pool in prov.pools.items():
                extra: dict[str, Any] = {}
                if isinstance(pool, CloudInstanceType):
                    unit_s = pool.instance_s  # what the instances ran for, boots included
                    cost = pool.cost
                    extra = {
                        "instance_hours": _r(pool.instance_s / 3600.0),
                        "launches": pool.launches,
                    }
                else:
                    unit_s = pool.units * horizon
                    cost = pool.units * pool.spec.price_per_hour * horizon / 3600.0
                if pool.gpn:
                    offered = unit_s * pool.gpn
                    busy = pool.busy_g_s
                    gpu_offered += offered
                else:
                    offered = unit_s * pool.cpn
                    busy = pool.busy_c_s
                total_cost += cost
                pools[name] = {
                    "kind": pool.kind.value,
                    "site": pool.spec.site,
                    "gpu_model": pool.model,
                    "units": pool.units,
                    "gpus": pool.capacity_gpus,
                    "utilization": _r(busy / offered if offered else 0.0),
                    "busy_gpu_hours": _r(pool.busy_g_s / 3600.0),
                    "cost": _r(cost),
                    "node_failures": pool.node_failures,
                    "preemptions": pool.preemptions,
                    "backfilled": pool.backfilled,
                    **extra,
                }
        busy_all = sum(p["busy_gpu_hours"] for p in pools.values()) * 3600.0
        out["utilization"] = _r(busy_all / gpu_offered if gpu_offered else 0.0)
        out["cost"] = _r(total_cost + sim.data.egress_cost)
        out["egress_cost"] = _r(sim.data.egress_cost)
        out["data_moved_bytes"] = sim.data.bytes_moved
        out["pools"] = dict(sorted(pools.items()))
        by_name = {
            name: pool for prov in sim.providers.values() for name, pool in prov.pools.items()
        }
        projects: dict[str, dict[str, list[float]]] = {}
        njobs: Counter[str] = Counter()
        for r in rows:
            p = projects.setdefault(r["project"], {"wait": [], "slowdown": [], "gpu_s": []})
            njobs[r["project"]] += 1
            if r["wait"] is not None:
                p["wait"].append(r["wait"])
            if r["slowdown"] is not None:
                p["slowdown"].append(r["slowdown"])
            if r["run_time"] is not None:
                ran = by_name.get(r["pool"])
                gpus = ran.gpu_milli_of(sim.jobs[r["job"]]) / MILLI if ran else r["gpus"]
                p["gpu_s"].append(r["run_time"] * gpus)
        fair: dict[str, Any] = {}
        means = []
        for name in sorted(projects):
            p = projects[name]
            ms = float(np.mean(p["slowdown"])) if p["slowdown"] else None
            if ms is not None:
                means.append(ms)
            fair[name] = {
                "jobs": njobs[name],
                "mean_wait_s": _r(float(np.mean(p["wait"]))) if p["wait"] else None,
                "mean_slowdown": None if ms is None else _r(ms),
                "gpu_hours": _r(sum(p["gpu_s"]) / 3600.0),
            }
        x = np.array(means)
        jain = float(x.sum() ** 2 / (len(x) * (x**2).sum())) if len(x) and (x**2).sum() else 1.0
        out["fairness"] = {"jain_index_of_mean_slowdown": _r(jain), "projects": fair}
        return out

    def timeseries(self) -> dict[str, Any]:
        return {
            "t": [_r(t) for t in self.t],
            "queued": self.queued,
            "running": self.running,
            "utilization": {k: [_r(u) for u in v] for k, v in sorted(self.util.items())},
        }


def _stats(a: np.ndarray[Any, Any]) -> dict[str, float | int | None]:
    if len(a) == 0:
        return {"n": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    q = np.percentile(a, PERCENTILES)
    return {
        "n": len(a),
        "mean": _r(float(a.mean())),
        **{f"p{p}": _r(float(v)) for p, v in zip(PERCENTILES, q, strict=True)},
        "max": _r(float(a.max())),
    }
