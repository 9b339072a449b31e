"""A 1,000-trial sweep through ``stowplan run`` on the AWS provider against moto's server, and
the solver's instance packing against the cheapest one found by brute force.

It starts moto's server and the counting proxy of ``tests/integration/aws`` on the loopback,
writes a project whose only provider is AWS (moto behind the proxy, ``AWS_ENDPOINT_URL``),
boots each instance moto launches as a local agent process (``tests/integration/aws/harness``:
the instance's real user-data), runs ``stowplan run`` on a sweep of no-op trials and prints one
JSON line:

    trials                 sweep size
    succeeded              trials that succeeded (must equal trials)
    api_calls              AWS API calls the control plane made (EC2 and S3, counted at the
                           proxy; the instances' presigned-URL requests are not API calls)
    api_calls_by_op        those, by operation
    api_per_trial          api_calls / trials (target: at most 0.1)
    instance_requests      the instances' presigned-URL requests (their inbox polls, claims,
                           logs, exit records), for scale
    instances_launched     instances moto started for the sweep
    instance_types         of which, by type
    all_finished_s         from starting ``stowplan run`` until it exited
    submit_sizes           the submit calls that queued attempts (queue objects): how many,
                           the largest and the mean number of attempts in one
    left_running           instances still running 120 s after (must be 0)
    packing                the small case: 6 trials, 3 instance types discovered from moto;
                           solver_usd_per_hour (the instances the solver chose with the default
                           weights, priced), cheapest_usd_per_hour (brute force over every
                           multiset of instances and every assignment of trials to them), the
                           instances of each, ratio = solver / cheapest, and the same solve
                           with cost-only weights (cost_only_usd_per_hour): the default
                           objective also weighs each instance's boot as waiting time, so it may
                           pay a little more for fewer instances; cost-only must be the cheapest

    quota_vcpus            with ``--quota-vcpus N``: the G and VT on-demand vCPU quota the proxy
                           answers Service Quotas with (moto's Service Quotas has none for EC2:
                           without it the driver falls back to learning quotas from refused
                           launches)

    .venv/bin/python benchmarks/bench_aws.py [--trials 1000] [--packing-only] [--quota-vcpus N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stowplan.placement import solve  # noqa: E402
from stowplan.placement.problem import (  # noqa: E402
    DemandClass,
    PlacementProblem,
    Pool,
    Weights,
)
from stowplan.provenance.store import RunStore  # noqa: E402
from tests.integration.aws.conftest import BUCKET  # noqa: E402
from tests.integration.aws.harness import Fleet, instances, project_toml, running  # noqa: E402
from tests.integration.aws.proxy import LossyProxy  # noqa: E402

PACKING_TYPES = ["g5.xlarge", "g5.2xlarge", "g5.12xlarge"]
# (cpus, memory GiB, gpus) of the 6 trials of the small case
PACKING_TRIALS = [(2, 8, 1), (2, 8, 1), (6, 24, 1), (6, 24, 1), (3, 12, 0), (3, 12, 0)]


def sweep(n: int) -> str:
    return f"""
[experiment]
name = "aws-bench"

[[tasks]]
name = "noop"
script = 'true'
resources = {{ cpus = 1, memory = "256MiB" }}
timeout = "5m"
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {n - 1} }} }} }}
"""


def succeeded(db: Path) -> int:
    if not db.exists():
        return 0
    with RunStore(db) as store:
        return sum(
            1
            for e in store.list_experiments()
            for r in store.runs_for_experiment(e.id)
            if r.state == "SUCCEEDED"
        )


def discovered(proxy_url: str) -> list[Pool]:
    import msgspec

    from stowplan.providers.aws import AwsProvider
    from stowplan.spec.models import AwsProviderConfig

    cfg = msgspec.convert(
        {
            "kind": "aws",
            "regions": ["us-east-1"],
            "bucket": f"s3://{BUCKET}/sp",
            "ami": "ami-12345678",
            "instance_types": PACKING_TYPES,
            "max_instances": 6,
        },
        AwsProviderConfig,
    )

    async def go() -> list[Pool]:
        async with AwsProvider("cloud", cfg, state_dir=Path(tempfile.mkdtemp())) as d:
            return await d.discover()

    return asyncio.run(go())


def fits(trials: list[tuple[int, int, int]], bins: list[Pool]) -> bool:
    """Whether every trial goes on one of ``bins`` (instances) within its shape."""
    free = []
    for p in bins:
        assert p.node is not None
        free.append([p.node.cpus, p.node.memory >> 30, sum(p.node.gpus.values())])

    def place(i: int) -> bool:
        if i == len(trials):
            return True
        c, m, g = trials[i]
        for f in free:
            if f[0] >= c and f[1] >= m and f[2] >= g:
                f[0], f[1], f[2] = f[0] - c, f[1] - m, f[2] - g
                if place(i + 1):
                    return True
                f[0], f[1], f[2] = f[0] + c, f[1] + m, f[2] + g
        return False

    return place(0)


def packing(pools: list[Pool]) -> dict[str, Any]:
    pools = [p for p in pools if p.elastic]
    by_id = {p.id: p for p in pools}
    classes = [
        DemandClass(id=f"t{i}", members=[f"t{i}"], cpus=c, memory=m << 30, gpus=g, gpu_types=())
        for i, (c, m, g) in enumerate(PACKING_TRIALS)
    ]
    sol = solve(PlacementProblem(pools=pools, classes=classes))
    cost_only = solve(
        PlacementProblem(
            pools=pools, classes=classes, weights=Weights(data=0.0, wait=0.0, cost=1.0)
        )
    )
    chosen = {k: v for k, v in sol.instances.items() if v}
    placed = sum(a.count for a in sol.assignments)
    solver_usd = sum(by_id[k].price_per_hour * v for k, v in chosen.items())
    solver_bins = [by_id[k] for k, v in chosen.items() for _ in range(v)]
    best: tuple[float, dict[str, int]] | None = None
    n = len(PACKING_TRIALS)
    for counts in itertools.product(range(n + 1), repeat=len(pools)):
        if not 0 < sum(counts) <= n:
            continue
        usd = sum(p.price_per_hour * k for p, k in zip(pools, counts, strict=True))
        if best is not None and usd >= best[0]:
            continue
        bins = [p for p, k in zip(pools, counts, strict=True) for _ in range(k)]
        if fits(PACKING_TRIALS, bins):
            best = (usd, {p.id: k for p, k in zip(pools, counts, strict=True) if k})
    assert best is not None
    return {
        "trials": n,
        "types": PACKING_TYPES,
        "status": str(sol.status),
        "placed": placed,
        "solver_instances": chosen,
        "solver_packing_feasible": fits(PACKING_TRIALS, solver_bins),
        "solver_usd_per_hour": round(solver_usd, 4),
        "cheapest_instances": best[1],
        "cheapest_usd_per_hour": round(best[0], 4),
        "ratio": round(solver_usd / best[0], 4),
        "cost_only_usd_per_hour": round(
            sum(by_id[k].price_per_hour * v for k, v in cost_only.instances.items()), 4
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--packing-only", action="store_true")
    ap.add_argument("--quota-vcpus", type=float, default=None)
    args = ap.parse_args()

    import boto3  # type: ignore[import-untyped]
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    ).close()
    out: dict[str, Any] = {}
    try:
        with LossyProxy(moto_url) as proxy:
            os.environ.update(
                {
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": proxy.url,
                    "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": str(REPO),
                }
            )
            session = boto3.Session(region_name="us-east-1")

            def client(service: str) -> Any:
                return session.client(service, endpoint_url=moto_url)

            client("s3").create_bucket(Bucket=BUCKET)
            pack = packing(discovered(proxy.url))
            if args.quota_vcpus is not None:
                proxy.quotas = {"L-DB2E81BA": args.quota_vcpus}
                out["quota_vcpus"] = args.quota_vcpus
            if not args.packing_only:
                out.update(sweep_figures(args.trials, client, moto_url, proxy))
            out["packing"] = pack
    finally:
        server.stop()
    print(json.dumps(out, sort_keys=True))
    return 0


def op_name(seen: str) -> str:
    """An EC2 action as it is; an S3 request as ``S3 METHOD WHAT`` (``list``, or the kind of
    object under the bucket prefix: ``queue``, ``agents``, ``attempts``, ``exit``, ...)."""
    if " " not in seen:
        return seen
    method, path = seen.split(" ", 1)
    parts = path.strip("/").split("/")
    return f"S3 {method} {parts[2] if len(parts) > 2 else 'list'}"


def submit_sizes(client: Any) -> list[int]:
    """Attempts in each queue object (one per submit call that queued something)."""
    s3 = client("s3")
    sizes = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="sp/queue/"):
        for o in page.get("Contents") or []:
            body = s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            sizes.append(len(json.loads(body)["requests"]))
    return sizes


def sweep_figures(n: int, client: Any, moto_url: str, proxy: LossyProxy) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stowplan-bench-aws-") as tmp:
        root = Path(tmp)
        (root / "stowplan.toml").write_text(
            project_toml(
                "aws-bench",
                instance_types='["g5.xlarge", "g5.12xlarge"]',
                max_instances="2",
                idle_shutdown="20",
            )
        )
        (root / ".stowplanignore").write_text("instances/\n*.out\n")
        f = root / "sweep.toml"
        f.write_text(sweep(n))
        db = root / ".stowplan" / "stowplan.db"
        proxy.seen.clear()
        proxy.presigned = 0
        with Fleet(root / "instances", client, moto_url) as fleet:
            t0 = time.monotonic()
            with (root / "run.out").open("wb") as log:
                rc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "stowplan.cli.main",
                        "run",
                        str(f),
                        "--provider",
                        "cloud",
                    ],
                    cwd=root,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=3600,
                ).returncode
            finished = time.monotonic() - t0
            calls = Counter(op_name(op) for op in proxy.seen)
            presigned = proxy.presigned
            fleet.check()
            with contextlib.suppress(AssertionError):
                fleet.wait_all_down(120)
            left = len(running(client))
        launched = instances(client)
        ok = succeeded(db)
        batches = submit_sizes(client)
        if rc != 0:
            sys.stderr.write((root / "run.out").read_text(errors="replace")[-3000:])
    api = sum(calls.values())
    return {
        "trials": n,
        "succeeded": ok,
        "api_calls": api,
        "api_calls_by_op": dict(sorted(calls.items())),
        "api_per_trial": round(api / n, 4),
        "instance_requests": presigned,
        "instances_launched": len(launched),
        "instance_types": dict(Counter(str(i["InstanceType"]) for i in launched)),
        "all_finished_s": round(finished, 1),
        "submit_sizes": {
            "calls": len(batches),
            "largest": max(batches, default=0),
            "mean": round(sum(batches) / max(1, len(batches)), 1),
        },
        "left_running": left,
    }


if __name__ == "__main__":
    raise SystemExit(main())
