"""No-op sweeps through ``stowplan run`` on the local provider, beside the same through Ray Tune.

Each sweep runs in a fresh project with the settings a new user gets (a local provider with
this machine's CPUs): ``--trials`` trials of ``true`` and ``--py-trials`` trials of
``python -c pass``. Then, in the same run, the same sweeps through Ray Tune (a function
trainable running the same command with one CPU per trial), with and without actor reuse;
Ray Tune is an extra (``pip install -e '.[bench]'``): without it that part is skipped and the
line says why. Prints one JSON line:

    stowplan.<sweep>.trials           trials in the sweep (all must succeed)
    stowplan.<sweep>.wall_s           ``stowplan run`` from start to exit (Ray's start included)
    stowplan.<sweep>.sweep_s          first trial started to last trial ended (attempt records)
    stowplan.<sweep>.trials_per_s     trials / sweep_s
    stowplan.<sweep>.end_to_end_per_s trials / wall_s
    stowplan.<sweep>.cpu_ms_per_trial where the CPU went, per trial: ``supervisor`` (the local
                                      supervisor, its keepers and the trials themselves) and
                                      ``control_plane`` (``stowplan run`` and everything it
                                      waited for: Ray, the actors, the driver, the store)
    tune.<reuse|no_reuse>.<sweep>     the same for Ray Tune: fit_s (``Tuner.fit``, Ray started
                                      before), trials_per_s; ``no_reuse`` runs at most
                                      ``--tune-no-reuse-trials`` (about one trial a second)

    .venv/bin/python benchmarks/bench_local.py [--trials 1000] [--py-trials 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SWEEPS = {"noop": ["true"], "python": [sys.executable, "-c", "pass"]}


def _project(base: Path, name: str, command: list[str], trials: int) -> Path:
    proj = base / name
    proj.mkdir()
    (proj / "stowplan.toml").write_text(
        '[project]\nname = "bench-local"\n[providers.local]\nkind = "local"\n'
    )
    (proj / "sweep.toml").write_text(
        f'[experiment]\nname = "{name}"\n[[tasks]]\nname = "{name}"\n'
        f"command = {json.dumps(command)}\n"
        'resources = { cpus = 1, memory = "64MiB" }\n'
        f'sweep = {{ parameters = {{ i = {{ type = "int", low = 0, high = {trials - 1} }} }} }}\n'
    )
    return proj


def _attempt_span(proj: Path) -> tuple[float, int]:
    """First start to last end over the attempts' own records, and the attempts counted."""
    starts, ends = [], []
    for exit_file in (proj / ".stowplan" / "runs").glob("*/*/exit.json"):
        rec = json.loads(exit_file.read_text())
        if rec.get("started_at") is not None:
            starts.append(rec["started_at"])
        ends.append(rec["ended_at"])
    return (max(ends) - min(starts) if starts else float("nan")), len(ends)


def _supervisor_cpu(proj: Path) -> float | None:
    """CPU seconds of the project's local supervisor and all it waited for (its keepers and
    their trials); read while it lingers after the sweep (``supervisor.IDLE_EXIT_S``)."""
    import psutil

    try:
        rec = json.loads((proj / ".stowplan" / "runs" / ".supervisor" / "pid").read_text())
        t = psutil.Process(rec["pid"]).cpu_times()
    except (OSError, ValueError, KeyError, psutil.Error):
        return None
    return float(t.user + t.system + t.children_user + t.children_system)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stowplan(base: Path, name: str, command: list[str], trials: int) -> dict[str, Any]:
    proj = _project(base, name, command, trials)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cpu_before = _children_cpu()
    start = time.monotonic()
    with open(proj / "run.out", "w+b") as out, open(proj / "run.err", "w+b") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "stowplan.cli.main", "run", str(proj / "sweep.toml"), "--json"],
            cwd=proj,
            env=env,
            stdout=out,
            stderr=err,
            check=False,
        )
    wall = time.monotonic() - start
    control_cpu = _children_cpu() - cpu_before
    supervisor_cpu = _supervisor_cpu(proj)
    if proc.returncode != 0:
        sys.stderr.write((proj / "run.err").read_text()[-3000:])
        raise SystemExit(f"stowplan run of {name} exited {proc.returncode}")
    counts = json.loads((proj / "run.out").read_text())["counts"]
    span, attempts = _attempt_span(proj)
    return {
        "trials": trials,
        "succeeded": counts.get("SUCCEEDED", 0),
        "attempts": attempts,
        "wall_s": round(wall, 2),
        "sweep_s": round(span, 2),
        "trials_per_s": round(trials / span, 1),
        "end_to_end_per_s": round(trials / wall, 1),
        "cpu_ms_per_trial": {
            "supervisor": None
            if supervisor_cpu is None
            else round(supervisor_cpu / trials * 1e3, 2),
            "control_plane": round(control_cpu / trials * 1e3, 2),
        },
    }


TUNE_CHILD = """
import json, subprocess, sys, time
import ray
from ray import tune

command, trials = json.loads(sys.argv[1]), int(sys.argv[2])
reuse, storage = sys.argv[3] == "1", sys.argv[4]

def trial(config):
    subprocess.run(command, check=True)
    return {"i": config["i"]}

ray.init(include_dashboard=False, log_to_driver=False)
tuner = tune.Tuner(
    tune.with_resources(trial, {"cpu": 1}),
    param_space={"i": tune.grid_search(list(range(trials)))},
    tune_config=tune.TuneConfig(reuse_actors=reuse),
    run_config=tune.RunConfig(storage_path=storage, verbose=0),
)
start = time.monotonic()
results = tuner.fit()
fit = time.monotonic() - start
ok = sum(1 for r in results if r.error is None)
rate = round(trials / fit, 1)
print(json.dumps({"trials": trials, "succeeded": ok, "fit_s": round(fit, 2), "trials_per_s": rate}))
"""


def tune_available() -> str | None:
    """``None`` when Ray Tune can be imported, else why not."""
    try:
        import ray.tune  # noqa: F401
    except ImportError as e:
        return f"Ray Tune is not installed (pip install -e '.[bench]'): {e}"
    return None


def run_tune(base: Path, command: list[str], trials: int, reuse: bool) -> dict[str, Any]:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    }
    storage = tempfile.mkdtemp(dir=base, prefix="tune-")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TUNE_CHILD,
            json.dumps(command),
            str(trials),
            str(int(reuse)),
            storage,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--py-trials", type=int, default=200)
    ap.add_argument("--tune-no-reuse-trials", type=int, default=60)
    ap.add_argument("--skip-tune", action="store_true")
    args = ap.parse_args()
    sizes = {"noop": args.trials, "python": args.py_trials}
    base = Path(tempfile.mkdtemp(prefix="stowplan-bench-local-"))
    out: dict[str, Any] = {"bench": "local", "cpus": os.cpu_count()}
    try:
        out["stowplan"] = {
            name: run_stowplan(base, name, SWEEPS[name], n) for name, n in sizes.items()
        }
        why = "skipped (--skip-tune)" if args.skip_tune else tune_available()
        if why is not None:
            out["tune"] = {"skipped": why}
        else:
            out["tune"] = {
                "reuse": {
                    name: run_tune(base, SWEEPS[name], n, reuse=True) for name, n in sizes.items()
                },
                "no_reuse": {
                    name: run_tune(
                        base, SWEEPS[name], min(n, args.tune_no_reuse_trials), reuse=False
                    )
                    for name, n in sizes.items()
                },
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out), flush=True)
    ok = all(r["succeeded"] == r["trials"] for r in out["stowplan"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
