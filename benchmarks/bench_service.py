"""The shared-lab service under load: 50 concurrent clients submitting and polling while a
large queue waits, spread over 20 users.

It writes a lab project in a temporary directory (one local provider of one CPU, 4 teams of
5 members, default settings otherwise), starts a real ``stowplan serve`` on the loopback (a
private local Ray with the control plane, SQLite) and then:

1. **idle**: once ``/readyz`` answers, the memory of the service's process tree (the serve
   process and every process under it, Ray's included) at rest;
2. **fill**: the 20 users submit sweeps until ``--runs`` runs are queued (one CPU-bound run
   at a time can start; the rest wait for the CPU);
3. **load**: ``--clients`` threads, each as one of the users, for ``--duration`` seconds
   submit a ``--load-trials`` sweep, then poll: the experiment's status, one of its runs,
   the experiments they may see (``ls``); latency of every request is kept;
4. **queued idle**: the service's memory again, at rest with the full queue.

Every task waits on a file the benchmark creates at the end, so nothing is left running.
It prints one JSON line:

    runs_queued            runs waiting when the load started (``--runs``)
    users, clients         20 and ``--clients``
    fill_s                 time the users took to submit them
    fill_runs_per_s        runs_queued / fill_s
    submissions            submissions the clients made during the load
    submissions_per_s      submissions / duration (each one a ``--load-trials`` sweep)
    api_p50_ms, api_p99_ms latency of every request during the load
    submit_p50_ms, submit_p99_ms, poll_p50_ms, poll_p99_ms   the same, submissions and polls
    by_endpoint_ms         n, p50 and p99 of each: submit, status, show (one run), ls
    load_cpu_s_by_process  CPU seconds each process of the service's tree spent during the
                           load (Ray's workers by the actor they hold)
    errors                 answers other than 200/201, and requests that failed
    idle_rss_gib, idle_pss_gib          at rest before any submission (PSS: shared pages
                                        split among the processes that map them)
    load_peak_rss_gib, load_peak_pss_gib  the peak while loaded (sampled once a second)
    queued_idle_rss_gib, queued_idle_pss_gib  at rest after the load, the queue full
    idle_target_met        idle_pss_gib < 1 (the issue's target: idle control plane with Ray)
    processes              processes in the service's tree when idle

    flock /tmp/stowplan-heavy.lock .venv/bin/python benchmarks/bench_service.py [--runs 100000]

NOTE: the clients, the service and Ray share this machine's cores; on a small machine the
latencies include waiting for a core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from stowplan.service.people import SERVICE_DB, People

TEAMS = ("vision", "nlp", "speech", "robots")
USERS = tuple(f"u{n:02d}" for n in range(20))


def lab_toml() -> str:
    lines = [
        '[project]\nname = "bench"\n',
        '[providers.local]\nkind = "local"\ncpus = 1\n',
        "[service]\n",
    ]
    lines += [f"[service.teams.{t}]\n" for t in TEAMS]
    lines += [
        f'[service.users.{u}]\nteam = "{TEAMS[i % len(TEAMS)]}"\nrole = "member"\n'
        for i, u in enumerate(USERS)
    ]
    return "\n".join(lines)


def sweep(name: str, trials: int, stop: Path) -> str:
    """``trials`` runs that each hold a CPU until ``stop`` exists; the name makes each
    experiment's runs its own (nothing is reused across them)."""
    hi = trials - 1
    return f"""
[experiment]
name = "{name}"

[[tasks]]
name = "hold"
script = 'while [ ! -e "{stop}" ]; do sleep 1; done  # {name}'
resources = {{ cpus = 1, memory = "16MiB" }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {hi} }} }} }}
"""


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) summed over the process tree of ``pid``."""
    rss = pss = n = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.Error):
            mem = p.memory_full_info()
            rss += mem.rss
            pss += mem.pss
            n += 1
    return rss, pss, n


def at_rest(pid: int, samples: int = 3) -> tuple[int, int, int]:
    """The most of a few samples a second apart."""
    got = []
    for _ in range(samples):
        got.append(memory(pid))
        time.sleep(1.0)
    return max(g[0] for g in got), max(g[1] for g in got), max(g[2] for g in got)


class Peak(threading.Thread):
    """The peak memory of a process tree, sampled once a second until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss = self.pss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss, pss, _ = memory(self.pid)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self.stop.wait(1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)


class Client(threading.Thread):
    """One person at the service: submit a sweep, poll it, list, again, until ``until``."""

    def __init__(self, n: int, url: str, token: str, until: float, trials: int, stop: Path) -> None:
        super().__init__(daemon=True)
        self.n, self.url, self.token, self.until = n, url, token, until
        self.trials, self.stop_file = trials, stop
        self.by_kind: dict[str, list[float]] = {k: [] for k in KINDS}
        self.errors: list[str] = []

    def timed(self, c: httpx.Client, kind: str, method: str, path: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            r = c.request(method, path, **kw)
        except httpx.HTTPError as e:
            self.errors.append(f"{method} {path}: {e}")
            return None
        self.by_kind[kind].append(time.perf_counter() - t0)
        if r.status_code not in (200, 201):
            self.errors.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
            return None
        return r.json()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=300) as c:
            k = 0
            while time.monotonic() < self.until:
                name = f"load-c{self.n:02d}-{k:05d}"
                got = self.timed(
                    c,
                    "submit",
                    "POST",
                    "/api/v1/experiments",
                    json={
                        "request_id": f"{name}-req",
                        "filename": "exp.toml",
                        "experiment": sweep(name, self.trials, self.stop_file),
                    },
                )
                k += 1
                if got is None:
                    continue
                for kind, path in (
                    ("status", f"/api/v1/experiments/{name}/status"),
                    ("show", f"/api/v1/runs/{got['run_ids'][0]}"),
                    ("ls", "/api/v1/experiments"),
                ):
                    if time.monotonic() >= self.until:
                        break
                    self.timed(c, kind, "GET", path)


KINDS = ("submit", "status", "show", "ls")
"""What the clients ask: submit a sweep; its status, one of its runs, the experiments."""


def cpu_by_process(pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) over the tree of ``pid``; Ray's workers by the
    actor they hold (their process title)."""
    out = {}
    for p in tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            name = "serve" if p.pid == pid else p.name()
            if name.startswith(("python", "ray::")):
                title = " ".join(p.cmdline())[:60]
                name = title if title.startswith("ray::") else name
            out[p.pid] = (name.split(" ")[0].split(".")[0], t.user + t.system)
    return out


def fill(url: str, tokens: dict[str, str], runs: int, per: int, stop: Path) -> None:
    """The users submit sweeps of ``per`` runs, a few at a time, until ``runs`` are in."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = [min(per, runs - i) for i in range(0, runs, per)]

    def one(j: int) -> None:
        user = USERS[j % len(USERS)]
        name = f"queue-{user}-{j:05d}"
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {tokens[user]}"}, timeout=600
        ) as c:
            r = c.post(
                "/api/v1/experiments",
                json={
                    "request_id": f"{name}-req",
                    "filename": "exp.toml",
                    "experiment": sweep(name, sizes[j], stop),
                },
            )
        if r.status_code != 201:
            raise RuntimeError(f"fill: {r.status_code} {r.text[:300]}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(len(sizes))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000, help="runs queued before the load")
    ap.add_argument("--per-experiment", type=int, default=500, help="runs per queued sweep")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--load-trials", type=int, default=5, help="runs per load submission")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    lab = tmp / "lab"
    lab.mkdir()
    (lab / "stowplan.toml").write_text(lab_toml())
    stop = tmp / "stop"
    with People(lab / ".stowplan" / SERVICE_DB) as people:
        tokens = {u: people.create_token(u)[0] for u in USERS}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("STOWPLAN_SERVER", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    log = (tmp / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "stowplan.cli.main", "serve", "--port", str(port)],
        cwd=lab,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            if serve.poll() is not None:
                raise RuntimeError(f"serve exited {serve.returncode}: see {tmp / 'serve.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("serve was not ready in 300 s")
            time.sleep(0.5)
        time.sleep(5.0)  # let Ray's start settle
        idle_rss, idle_pss, nproc = at_rest(serve.pid)

        peak = Peak(serve.pid)
        peak.start()
        t0 = time.monotonic()
        fill(url, tokens, args.runs, args.per_experiment, stop)
        fill_s = time.monotonic() - t0

        until = time.monotonic() + args.duration
        clients = [
            Client(n, url, tokens[USERS[n % len(USERS)]], until, args.load_trials, stop)
            for n in range(args.clients)
        ]
        cpu0 = cpu_by_process(serve.pid)
        t0 = time.monotonic()
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - t0
        cpu: dict[str, float] = {}
        for pid, (name, t) in cpu_by_process(serve.pid).items():
            cpu[name] = cpu.get(name, 0.0) + t - cpu0.get(pid, (name, 0.0))[1]
        peak.stop.set()
        peak.join()
        time.sleep(5.0)
        q_rss, q_pss, _ = at_rest(serve.pid)

        by_kind = {k: [x for c in clients for x in c.by_kind[k]] for k in KINDS}
        submit_s = by_kind["submit"]
        poll_s = [x for k in KINDS[1:] for x in by_kind[k]]
        errors = [e for c in clients for e in c.errors]
        gib = 2**30
        out = {
            "runs_queued": args.runs,
            "users": len(USERS),
            "clients": args.clients,
            "fill_s": round(fill_s, 1),
            "fill_runs_per_s": round(args.runs / fill_s, 1),
            "load_s": round(elapsed, 1),
            "submissions": len(submit_s),
            "submissions_per_s": round(len(submit_s) / elapsed, 2),
            "load_trials": args.load_trials,
            "api_p50_ms": pct(submit_s + poll_s, 0.5),
            "api_p99_ms": pct(submit_s + poll_s, 0.99),
            "submit_p50_ms": pct(submit_s, 0.5),
            "submit_p99_ms": pct(submit_s, 0.99),
            "poll_p50_ms": pct(poll_s, 0.5),
            "poll_p99_ms": pct(poll_s, 0.99),
            "requests": len(submit_s) + len(poll_s),
            "by_endpoint_ms": {
                k: {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99)}
                for k, v in by_kind.items()
            },
            "load_cpu_s_by_process": {
                k: round(v, 1) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.5
            },
            "errors": len(errors),
            "first_errors": errors[:3],
            "idle_rss_gib": round(idle_rss / gib, 3),
            "idle_pss_gib": round(idle_pss / gib, 3),
            "load_peak_rss_gib": round(peak.rss / gib, 3),
            "load_peak_pss_gib": round(peak.pss / gib, 3),
            "queued_idle_rss_gib": round(q_rss / gib, 3),
            "queued_idle_pss_gib": round(q_pss / gib, 3),
            "idle_target_met": idle_pss < gib,
            "processes": nproc,
        }
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                for proc in reversed(tree(serve.pid)):
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                serve.wait()
        stop.touch()  # the tasks that started end by themselves
        log.close()
        if not args.keep:
            import shutil

            # the local supervisor leaves once its tasks ended
            time.sleep(2.0)
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
