"""What provenance costs: data hashing with and without the cache, the ledger, and find.

Prints one JSON line per case:

    data_hash       a DATA_MIB file versioned three times: first (reads it), cached (stat only),
                    and after a same-size rewrite (reads it again); seconds each, and the ratio
                    first / cached
    ledger          N ledger appends (one transaction each), then verifying the whole chain
    find            one find over N stored runs by a parameter filter, and by a data hash

    .venv/bin/python benchmarks/bench_provenance.py [--data-mib 256] [--entries 10000]
        [--runs 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from stowplan.provenance.data import HashCache, capture_data
from stowplan.provenance.ledger import verify
from stowplan.provenance.query import Filter, find_runs, parse_param_filter
from stowplan.provenance.records import ExperimentRecord, ProvenanceRecord, RunRecord
from stowplan.provenance.store import RunStore


def bench_data(tmp: Path, mib: int) -> dict[str, object]:
    f = tmp / "data.bin"
    block = os.urandom(1 << 20)
    with open(f, "wb") as out:
        for _ in range(mib):
            out.write(block)
    with HashCache(tmp / "cache.db") as cache:
        t0 = time.perf_counter()
        first = capture_data(str(f), None, tmp, cache=cache)
        t1 = time.perf_counter()
        cached = capture_data(str(f), None, tmp, cache=cache)
        t2 = time.perf_counter()
        with open(f, "r+b") as out:  # same size, one byte changed
            out.write(b"\x00" if block[0] else b"\x01")
        changed = capture_data(str(f), None, tmp, cache=cache)
        t3 = time.perf_counter()
    assert first == cached and changed.sha256 != first.sha256
    return {
        "case": "data_hash",
        "mib": mib,
        "first_s": round(t1 - t0, 4),
        "cached_s": round(t2 - t1, 6),
        "after_rewrite_s": round(t3 - t2, 4),
        "first_over_cached": round((t1 - t0) / max(t2 - t1, 1e-9), 1),
    }


def bench_ledger(tmp: Path, n: int) -> dict[str, object]:
    with RunStore(tmp / "ledger.db") as store:
        t0 = time.perf_counter()
        for i in range(n):
            store.append_ledger(
                who="bench", action="submit", target=f"{i:064x}", why="bench", details={"i": i}
            )
        t1 = time.perf_counter()
        entries = store.ledger()
        verdict = verify(entries)
        t2 = time.perf_counter()
    assert verdict.ok and verdict.entries == n
    return {
        "case": "ledger",
        "entries": n,
        "append_per_s": round(n / (t1 - t0)),
        "read_and_verify_s": round(t2 - t1, 3),
    }


def _h(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def bench_find(tmp: Path, n: int) -> dict[str, object]:
    with RunStore(tmp / "find.db") as store:
        exp = ExperimentRecord(
            id="e" * 64, name="b", project="p", description="", file="b.toml", spec={},
            created_at=0.0,
        )  # fmt: skip
        store.put_experiment(exp)
        prov = store.put_provenance(ProvenanceRecord())
        runs = [
            RunRecord(
                run_id=hashlib.sha256(str(i).encode()).hexdigest(),
                experiment_id=exp.id,
                experiment="b",
                task="t",
                index=i,
                params={"lr": i / n},
                seed=0,
                replicate=0,
                depends_on=[],
                identity={"data_versions": {"d": "sha256:" + _h(i % 10)}},
                task_spec={},
                provenance=prov,
                created_at=float(i),
                updated_at=float(i),
            )
            for i in range(n)
        ]
        store.put_runs(runs)
        t0 = time.perf_counter()
        by_param = find_runs(store, Filter(params=[parse_param_filter("lr>0.5")]))
        t1 = time.perf_counter()
        by_data = find_runs(store, Filter(data=_h(3)[:16]))
        t2 = time.perf_counter()
    assert len(by_param) == n - n // 2 - 1 and len(by_data) == n // 10
    return {
        "case": "find",
        "runs": n,
        "by_param_s": round(t1 - t0, 3),
        "by_data_s": round(t2 - t1, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-provenance-") as d:
        tmp = Path(d)
        print(json.dumps(bench_data(tmp, args.data_mib)), flush=True)
        print(json.dumps(bench_ledger(tmp, args.entries)), flush=True)
        print(json.dumps(bench_find(tmp, args.runs)), flush=True)


if __name__ == "__main__":
    main()
