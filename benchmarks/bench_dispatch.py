"""Dispatch throughput through the full actor path, to a provider that accepts instantly.

For each size (default 1k, 10k, 100k no-op trials) it plans a one-task sweep, records the runs
in a fresh SQLite store, starts the control plane on a local Ray (store, placement, provider
and queue actors), submits everything and waits until every run is final. It prints one JSON
line per size:

    plan_s        sweep expansion, identities and run records, in the driver
    record_s      writing experiment and runs to the store
    dispatch_s    from the submit call until every run is final (SUCCEEDED)
    tasks_per_s   n / dispatch_s
    peak_rss_gib  peak of the summed RSS of this process and every Ray process under it

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
from stowplan.actors.session import record
from stowplan.provenance.records import ExperimentRecord, ProvenanceRecord
from stowplan.provenance.store import RunStore
from stowplan.scheduler.plan import Versions, plan_runs
from stowplan.spec.loader import load_experiment, load_project
from stowplan.spec.models import InstantProviderConfig


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self.stop.wait(0.1)


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
    from stowplan.actors import session

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
        with RunStore(prepared.store_path) as store:
            runs = record(prepared, store)
        items = session.submissions(prepared, {r.run_id for r in runs}, {})
        t2 = time.perf_counter()
        sampler = RssSampler()
        sampler.start()
        plane = ControlPlane(
            state_dir=Path(prepared.state_dir),
            store_path=Path(prepared.store_path),
            providers=prepared.providers,
            num_cpus=2,
        )
        plane.start()
        try:
            t3 = time.perf_counter()
            plane.submit(items, [])
            while True:
                counts = plane.progress(None)["counts"]
                if counts.get("SUCCEEDED", 0) + counts.get("FAILED", 0) >= n:
                    break
                time.sleep(0.05)
            t4 = time.perf_counter()
        finally:
            plane.stop()
            sampler.stop.set()
            sampler.join()
        with RunStore(prepared.store_path) as store:
            done = sum(
                1
                for r in store.get_runs([r.run_id for r in runs]).values()
                if r.state == "SUCCEEDED"
            )
        return {
            "bench": "dispatch",
            "n": n,
            "plan_s": round(t1 - t0, 3),
            "record_s": round(t2 - t1, 3),
            "dispatch_s": round(t4 - t3, 3),
            "tasks_per_s": round(n / (t4 - t3), 1),
            "succeeded_in_store": done,
            "failed": counts.get("FAILED", 0),
            "peak_rss_gib": round(sampler.peak / 2**30, 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    args = ap.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(bench(n)), flush=True)


if __name__ == "__main__":
    main()
