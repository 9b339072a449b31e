"""A 1,000-trial sweep as Indexed Jobs on the emulated Kubernetes API server (tests/kubecluster,
real HTTP, token kubeconfig), against what a user would otherwise write, in one run.

Three phases, each on a fresh emulated cluster (10 nodes of 100 CPUs in one GKE node pool):

1. ``stowplan run --provider k8s --json`` (its own process: Ray, the provider actor, the
   driver) on a sweep of no-op trials; the emulated kubelet completes each pod as soon as it is
   scheduled. Requests are counted at the server, for the whole run (discovery, creates,
   lists, watches, everything).
2. The driver alone, in this process: ``discover``, ``plan`` and ``submit`` of the same 1,000
   attempts (the CLI path's time is dominated by starting Ray), then ``watch`` over all of them
   while a second thread drives every pod Running -> Succeeded through the emulator. The
   driver's CPU is this (main) thread's CPU time while it watches; the emulator runs on its own
   thread and the driving thread is not counted. Watch events are counted at the server: the
   stored changes of this provider's Jobs and pods, which the driver's two watches receive.
3. The baseline: a kubernetes-asyncio loop that creates one plain Job per trial (awaiting each
   create, as the client's examples do) and follows them with ``kubernetes_asyncio.watch.Watch``
   on Jobs and pods (typed models, the client's default), under the same pod drive.

Prints one JSON line:

    trials                     sweep size
    cli_requests               API requests the server answered during ``stowplan run``
    cli_requests_per_trial     cli_requests / trials (target: at most 0.05)
    cli_all_created_s          from starting ``stowplan run`` until every trial's index exists
                               (Ray's start included)
    cli_all_finished_s         until ``stowplan run`` exited, all trials final
    cli_succeeded              trials SUCCEEDED in the run store (must equal trials)
    jobs                       Jobs stowplan created (Indexed)
    driver_submit_s            discover + plan + submit in this process, until all indexes exist
    driver_submit_requests     requests of that phase
    watch_events               Job and pod events the driver's watches received
    driver_cpu_per_1000_events driver CPU seconds per 1,000 of them
    baseline_create_s          the plain-Job loop, until every Job exists
    baseline_requests_per_trial  creates + watches of the baseline, per trial
    baseline_watch_events      events its watches received
    baseline_cpu_per_1000_events its CPU seconds per 1,000 events
    ratio_*                    stowplan / baseline for requests per trial, create time (the
                               driver's submit against the loop) and CPU per 1,000 events

    .venv/bin/python benchmarks/bench_kubernetes.py [--trials 1000] [--skip-cli]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stowplan.provenance.store import RunStore  # noqa: E402
from tests.kubecluster import KubeCluster, NodeSpec, PodOutcome  # noqa: E402

NODES = 10
NODE_CPUS = 100
IMAGE = "python:3.12-slim"
INDEX = "batch.kubernetes.io/job-completion-index"
SELECTOR = "app.kubernetes.io/managed-by=stowplan"
RUN_ARGS = ("run", "sweep.toml", "--provider", "k8s", "--json")


def new_cluster(base: Path, trials: int) -> tuple[KubeCluster, Path]:
    # history: every change of a run kept, so watch events can be counted from it
    cluster = KubeCluster(bookmark_interval=5.0, history_limit=20 * trials + 10_000)
    cluster.start()
    per_node = -(-trials // NODES) + 10
    for i in range(NODES):
        cluster.add_node(
            NodeSpec(
                name=f"node-{i}",
                pool="bench",
                cpu=str(NODE_CPUS),
                memory="1Ti",
                pods=per_node,
                region="europe-west4",
                zone="europe-west4-a",
            )
        )
    base.mkdir(parents=True, exist_ok=True)
    return cluster, cluster.kubeconfig(base / "kubeconfig")


def indexes_created(cluster: KubeCluster) -> int:
    return sum(
        int(j["spec"].get("completions") or 1)
        for j in cluster.objects("jobs", namespace="default", group="batch")
    )


def watch_events(cluster: KubeCluster, after_rv: int, selector: str | None) -> int:
    """Changes of Jobs and pods in ``default`` after ``after_rv`` that a watch with
    ``selector`` (label ``key=value`` or None) receives: one event each."""
    key, _, value = (selector or "").partition("=")

    def count() -> int:
        n = 0
        for e in cluster.emulator.store.history:
            if e.rv <= after_rv or e.res.plural not in ("jobs", "pods"):
                continue
            meta = e.obj["metadata"]
            if meta.get("namespace") != "default":
                continue
            if key and (meta.get("labels") or {}).get(key) != value:
                continue
            n += 1
        return n

    if cluster.emulator.store.compacted_rv > after_rv:
        raise RuntimeError("the emulator's history was cut: raise history_limit")
    return cluster._call(count)


def drive_pods(cluster: KubeCluster, expected: int, stop: threading.Event) -> threading.Thread:
    """A thread that, as pods start Running, ends each one with success (the kubelet's part)."""

    def go() -> None:
        done: set[str] = set()
        while len(done) < expected and not stop.is_set():
            running = [
                p["metadata"]["name"]
                for p in cluster.pods()
                if p.get("status", {}).get("phase") == "Running"
                and p["metadata"]["name"] not in done
            ]
            for name in running:
                cluster.succeed_pod(name)
                done.add(name)
            if not running:
                time.sleep(0.05)

    t = threading.Thread(target=go, name="pod-driver", daemon=True)
    t.start()
    return t


# -- 1. the CLI -------------------------------------------------------------------------------


def cli_phase(base: Path, trials: int) -> dict[str, Any]:
    cluster, kubeconfig = new_cluster(base / "cli", trials)
    cluster.set_pod_behaviour(lambda pod: PodOutcome("succeed"))
    proj = base / "cli" / "project"
    proj.mkdir()
    try:
        (proj / "stowplan.toml").write_text(
            f'[project]\nname = "bench-k8s"\n[providers.k8s]\nkind = "kubernetes"\n'
            f'kubeconfig = "{kubeconfig}"\nimage = "{IMAGE}"\n'
        )
        (proj / "sweep.toml").write_text(
            '[experiment]\nname = "bench"\n[[tasks]]\nname = "noop"\ncommand = ["true"]\n'
            'resources = { cpus = 1, memory = "64MiB" }\n'
            'sweep = { parameters = { i = { type = "int", low = 0, high = '
            f"{trials - 1} }} }} }}\n"
        )
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        start = time.monotonic()
        out_f = open(proj / "run.out", "w+")  # noqa: SIM115
        err_f = open(proj / "run.err", "w+")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "stowplan.cli.main", *RUN_ARGS],
            cwd=proj,
            env=env,
            stdout=out_f,
            stderr=err_f,
        )
        all_created_s = None
        while proc.poll() is None:
            if all_created_s is None and indexes_created(cluster) >= trials:
                all_created_s = time.monotonic() - start
            time.sleep(0.1)
        all_finished_s = time.monotonic() - start
        out_f.close()
        err_f.close()
        if proc.returncode not in (0, 1):
            raise RuntimeError((proj / "run.err").read_text()[-3000:])
        with RunStore(proj / ".stowplan" / "stowplan.db") as store:
            succeeded = sum(
                r.state == "SUCCEEDED"
                for e in store.list_experiments()
                for r in store.runs_for_experiment(e.id)
            )
        jobs = len(cluster.objects("jobs", group="batch"))
        cluster.raise_errors()
    finally:
        cluster.stop()
    requests = len(cluster.requests)  # once the server is down: watches are recorded at their end
    return {
        "cli_requests": requests,
        "cli_requests_per_trial": round(requests / trials, 4),
        "cli_all_created_s": None if all_created_s is None else round(all_created_s, 2),
        "cli_all_finished_s": round(all_finished_s, 2),
        "cli_succeeded": succeeded,
        "jobs": jobs,
    }


# -- 2. the driver ----------------------------------------------------------------------------


async def driver_phase(base: Path, trials: int) -> dict[str, Any]:
    from stowplan.providers.base import TERMINAL_PROVIDER_STATES, Facts, LaunchSpec, WatchSet
    from stowplan.providers.kubernetes import KubernetesProvider
    from stowplan.spec.models import KubernetesProviderConfig

    cluster, kubeconfig = new_cluster(base / "driver", trials)
    cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    stop = threading.Event()
    try:
        config = KubernetesProviderConfig(kubeconfig=str(kubeconfig), image=IMAGE)
        async with KubernetesProvider("k8s", config, state_dir=base / "driver") as drv:
            specs = [
                LaunchSpec(
                    key=f"bench-{i:05d}",
                    run_id=f"run-{i:05d}",
                    attempt=0,
                    pool="k8s/bench",
                    name="noop",
                    argv=["true", str(i)],
                    cpus=1,
                    memory=64 << 20,
                )
                for i in range(trials)
            ]
            before = len(cluster.requests)
            start = time.monotonic()
            pools = await drv.discover()
            requests = drv.plan(specs, Facts.of(pools))
            await drv.submit(requests)
            while indexes_created(cluster) < trials:  # created is what submit's answer says
                await asyncio.sleep(0.01)
            submit_s = time.monotonic() - start
            submit_requests = len(cluster.requests) - before
            await cluster.asettle(60)

            rv = cluster.resource_version
            keys = WatchSet([s.key for s in specs])
            left = {s.key for s in specs}
            cpu0 = time.thread_time()
            driver = drive_pods(cluster, trials, stop)
            async for reports in drv.watch(keys, renew_every=3600):
                for r in reports:
                    if r.state in TERMINAL_PROVIDER_STATES:
                        left.discard(r.key)
                if not left:
                    break
            cpu = time.thread_time() - cpu0
            stop.set()
            driver.join(30)
            events = watch_events(cluster, rv, SELECTOR)
        cluster.raise_errors()
        return {
            "driver_submit_s": round(submit_s, 3),
            "driver_submit_requests": submit_requests,
            "watch_events": events,
            "driver_cpu_s": round(cpu, 3),
            "driver_cpu_per_1000_events": round(1000 * cpu / max(events, 1), 4),
        }
    finally:
        stop.set()
        cluster.stop()


# -- 3. the baseline --------------------------------------------------------------------------


def plain_job(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"trial-{i:05d}", "labels": {"app": "sweep"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "sweep"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trial",
                            "image": IMAGE,
                            "command": ["true", str(i)],
                            "resources": {
                                "requests": {"cpu": "1", "memory": "64Mi"},
                                "limits": {"cpu": "1", "memory": "64Mi"},
                            },
                        }
                    ],
                },
            },
        },
    }


async def baseline_phase(base: Path, trials: int) -> dict[str, Any]:
    from kubernetes_asyncio import client, config, watch

    cluster, kubeconfig = new_cluster(base / "baseline", trials)
    cluster.set_pod_behaviour(lambda pod: PodOutcome("run"))
    stop = threading.Event()
    try:
        api = await config.new_client_from_config(config_file=str(kubeconfig))
        async with api:
            batch = client.BatchV1Api(api)
            core = client.CoreV1Api(api)
            before = len(cluster.requests)
            start = time.monotonic()
            for i in range(trials):
                body: Any = plain_job(i)  # a dict: the client serialises it as given
                await batch.create_namespaced_job("default", body)
            create_s = time.monotonic() - start
            await cluster.asettle(60)

            rv = cluster.resource_version
            cpu0 = time.thread_time()
            driver = drive_pods(cluster, trials, stop)
            done: set[str] = set()
            finished = asyncio.Event()

            async def follow(list_fn: Callable[..., Any], on: Callable[[Any], None]) -> None:
                w = watch.Watch()
                async with w.stream(
                    list_fn, "default", label_selector="app=sweep", resource_version=str(rv)
                ) as stream:
                    async for ev in stream:
                        on(ev["object"])
                        if finished.is_set():
                            return

            def on_job(job: Any) -> None:
                if job.status and (job.status.succeeded or job.status.failed):
                    done.add(job.metadata.name)
                if len(done) >= trials:
                    finished.set()

            pod_phase: dict[str, str] = {}

            def on_pod(pod: Any) -> None:
                pod_phase[pod.metadata.name] = pod.status.phase if pod.status else ""

            tasks = [
                asyncio.ensure_future(follow(batch.list_namespaced_job, on_job)),
                asyncio.ensure_future(follow(core.list_namespaced_pod, on_pod)),
            ]
            await finished.wait()
            cpu = time.thread_time() - cpu0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.set()
            driver.join(30)
            events = watch_events(cluster, rv, "app=sweep")
        cluster.raise_errors()
    finally:
        stop.set()
        cluster.stop()
    # counted once the server is down: a watch is recorded when its stream ends
    requests = len(cluster.requests) - before
    return {
        "baseline_create_s": round(create_s, 3),
        "baseline_requests": requests,
        "baseline_requests_per_trial": round(requests / trials, 4),
        "baseline_watch_events": events,
        "baseline_cpu_s": round(cpu, 3),
        "baseline_cpu_per_1000_events": round(1000 * cpu / max(events, 1), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--skip-cli", action="store_true", help="phases 2 and 3 only (no Ray)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="stowplan-bench-k8s-"))
    try:
        out: dict[str, Any] = {"bench": "kubernetes", "trials": args.trials}
        if not args.skip_cli:
            out.update(cli_phase(base, args.trials))
        out.update(asyncio.run(driver_phase(base, args.trials)))
        out.update(asyncio.run(baseline_phase(base, args.trials)))

        def ratio(a: str, b: str) -> float | None:
            if out.get(a) is None or not out.get(b):
                return None
            return round(float(out[a]) / float(out[b]), 4)

        if not args.skip_cli:
            out["ratio_requests_per_trial"] = ratio(
                "cli_requests_per_trial", "baseline_requests_per_trial"
            )
        out["ratio_create_s"] = ratio("driver_submit_s", "baseline_create_s")
        out["ratio_cpu_per_1000_events"] = ratio(
            "driver_cpu_per_1000_events", "baseline_cpu_per_1000_events"
        )
        print(json.dumps(out), flush=True)
        ok = args.skip_cli or out["cli_succeeded"] == args.trials
        return 0 if ok else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
