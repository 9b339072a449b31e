"""Dispatch throughput through the full actor path, to a provider that accepts instantly.

For each size (default 1k, 10k, 100k no-op trials) it plans a one-task sweep, records the runs
in a fresh SQLite store, starts the control plane on a local Ray (store, placement, provider
and queue actors), submits everything and waits until every run is final. It prints one JSON
line per size:

    plan_s        sweep expansion, identities and run records, in the driver
    record_s      writing experiment and runs to the store
    dispatch_s    from the submit call until every run is final (SUCCEEDED), as the queue
                  counts them
    stored_s      from the submit call until the store has written all of it
    tasks_per_s   n / dispatch_s
    peak_rss_gib  peak of the summed RSS of this process and every Ray process under it
    peak_pss_gib  the same with shared pages split among their processes (no double counting)
    idle_pss_gib  PSS of the control plane alone (the Ray processes under this one), just
                  started, before any run is recorded or submitted
    pss_at_peak_gib_by_process   each process's PSS in the sample where the sum peaked
    dispatch_cpu_s_by_process    CPU seconds each process spent during dispatch: with 2
                  cores, where the time goes (the queue and the store actor work in turn)

    .venv/bin/python benchmarks/bench_dispatch.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from stowplan.actors.control import ControlPlane
from stowplan.provenance.records import ExperimentRecord, ProvenanceRecord
from stowplan.provenance.store import RunStore
from stowplan.scheduler.plan import Versions, plan_runs
from stowplan.session import record
from stowplan.spec.loader import load_experiment, load_project
from stowplan.spec.models import InstantProviderConfig


class RssSampler(threading.Thread):
    """Peak memory of this process and every process under it (Ray's included).

    Two sums: RSS, which counts pages shared between processes (Ray's object store, shared
    libraries) once per process that maps them, and PSS, which splits each shared page among
    the processes sharing it, so the sum is what the machine actually spends.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = 0
        self.peak_pss = 0
        self.by_pid: dict[int, int] = {}
        self.at_peak: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self.stop.is_set():
            # PSS reads /proc/PID/smaps, which costs real CPU on 2 cores: once a second
            full = tick % 5 == 0
            tick += 1
            rss_total = pss_total = 0
            sample: dict[int, int] = {}
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    if full:
                        mem = p.memory_full_info()
                        pss_total += mem.pss
                        sample[p.pid] = mem.pss
                        self.by_pid[p.pid] = max(self.by_pid.get(p.pid, 0), mem.pss)
                        name = "driver" if p is me else p.name().split(".")[0]
                        if name not in ("ray::IDLE", "python"):
                            self.names[p.pid] = name
                        rss_total += mem.rss
                    else:
                        rss_total += p.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss_total)
            if full and pss_total > self.peak_pss:
                self.peak_pss = pss_total
                self.at_peak = sample
            self.stop.wait(0.2)


def cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) so far of this process and every process under it."""
    out: dict[int, float] = {}
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def control_plane_pss() -> int:
    """Summed PSS of every process under this one: the control plane, without the driver."""
    total = 0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def experiment_file(d: Path, n: int) -> Path:
    (d / "stowplan.toml").write_text(
        '[project]\nname = "bench"\n[policy]\nmax_sweep_size = 10000000\n'
        '[providers.instant]\nkind = "instant"\n'
    )
    f = d / "bench.toml"
    f.write_text(
        '[experiment]\nname = "bench"\n[[tasks]]\nname = "noop"\ncommand = ["true", "{i}"]\n'
        'resources = { cpus = 1, memory = "1MiB" }\n'
        '[tasks.sweep]\nmethod = "grid"\n'
        f'parameters = {{ i = {{ type = "int", low = 0, high = {n - 1} }} }}\n'
    )
    return f


def bench(n: int) -> dict[str, object]:
    from stowplan import session

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        f = experiment_file(d, n)
        t0 = time.perf_counter()
        project = load_project(search_from=d)
        loaded = load_experiment(f, project)
        planned = plan_runs(
            loaded, Versions(code_version="bench", env_hash="bench"), project="bench"
        )
        prepared = session.Prepared(
            project=project,
            loaded=loaded,
            experiment=ExperimentRecord(
                id=f"bench-{n}",
                name="bench",
                project="bench",
                description="",
                file=str(f),
                spec={},
                created_at=time.time(),
            ),
            planned=planned,
            provenance=ProvenanceRecord(),
            diff=b"",
            providers={"instant": InstantProviderConfig()},
            replicate=0,
            state_dir=str(d / ".stowplan"),
            store_path=str(d / ".stowplan" / "stowplan.db"),
        )
        t1 = time.perf_counter()
        sampler = RssSampler()
        sampler.start()
        plane = ControlPlane(
            state_dir=Path(prepared.state_dir),
            store_path=Path(prepared.store_path),
            providers=prepared.providers,
            num_cpus=2,
        )
        # as `stowplan run` does: the control plane boots, then the runs are recorded
        plane.start()
        idle_pss = control_plane_pss()
        try:
            t2 = time.perf_counter()
            with RunStore(prepared.store_path) as store:
                runs = record(prepared, store)
            ids = [r.run_id for r in runs]
            items = session.submissions(prepared, set(ids))
            del runs, planned
            t3 = time.perf_counter()
            cpu3 = cpu_seconds()
            plane.submit(items, [])
            del items
            while True:
                counts = plane.progress(None)["counts"]
                if counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) >= n:
                    break
                time.sleep(0.05)
            t4 = time.perf_counter()
            # the store may still be writing what the queue sent: wait until it has
            plane._get(plane.queue.drain.remote(), what="drain", timeout=None)
            t5 = time.perf_counter()
            cpu4 = cpu_seconds()
        finally:
            plane.stop()
            sampler.stop.set()
            sampler.join()
        with RunStore(prepared.store_path) as store:
            done = sum(1 for r in store.get_runs(ids).values() if r.state == "SUCCEEDED")
        return {
            "bench": "dispatch",
            "n": n,
            "plan_s": round(t1 - t0, 3),
            "record_s": round(t3 - t2, 3),
            "dispatch_s": round(t4 - t3, 3),
            "tasks_per_s": round(n / (t4 - t3), 1),
            "stored_s": round(t5 - t3, 3),
            "succeeded_in_store": done,
            "failed": counts.get("FAILED", 0),
            "peak_rss_gib": round(sampler.peak_rss / 2**30, 3),
            "peak_pss_gib": round(sampler.peak_pss / 2**30, 3),
            "idle_pss_gib": round(idle_pss / 2**30, 3),
            "peak_pss_gib_by_process": {
                f"{sampler.names.get(pid, 'ray')}[{pid}]": round(v / 2**30, 3)
                for pid, v in sorted(sampler.by_pid.items(), key=lambda kv: -kv[1])[:6]
            },
            "pss_at_peak_gib_by_process": {
                f"{sampler.names.get(pid, 'ray')}[{pid}]": round(v / 2**30, 3)
                for pid, v in sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])[:6]
            },
            "dispatch_cpu_s_by_process": {
                f"{sampler.names.get(pid, 'ray')}[{pid}]": round(v - cpu3.get(pid, 0.0), 2)
                for pid, v in sorted(cpu4.items(), key=lambda kv: cpu3.get(kv[0], 0.0) - kv[1])[:6]
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    args = ap.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(bench(n)), flush=True)


if __name__ == "__main__":
    main()
