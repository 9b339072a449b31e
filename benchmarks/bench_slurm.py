"""A 1,000-trial sweep through ``stowplan run`` on a real Slurm cluster started for the run.

It starts the throw-away cluster of ``tests/slurmcluster`` (root needed), writes a project whose
only provider is that cluster over SSH, runs ``stowplan run`` on a sweep of no-op trials and
prints one JSON line:

    trials                 sweep size
    arrays                 sbatch submissions (job arrays) Slurm received
    ssh_commands           remote commands the login node's sshd served (SFTP sessions included),
                           counted from its log: nothing in the driver counts them
    ssh_logins             SSH connections the login node accepted
    ssh_per_trial          ssh_commands / trials (target: at most 0.05)
    all_submitted_s        from starting ``stowplan run`` until every trial has a Slurm job
    all_finished_s         from starting ``stowplan run`` until it exited, all trials final
    succeeded              trials that succeeded (must equal trials)
    cluster_start_s        starting munge, MariaDB, slurmdbd, slurmctld, 4 slurmd and sshd

    .venv/bin/python benchmarks/bench_slurm.py [--trials 1000] [--queue-factor 40]

``queue_factor`` lets stowplan offer the cluster more work than its free CPUs, so Slurm's own
queue holds the excess (the cluster has 32 CPUs for 1,000 trials).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stowplan.provenance.store import RunStore  # noqa: E402
from tests.slurmcluster.cluster import SlurmCluster  # noqa: E402

SUBMITTED = {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}


def states(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    try:
        with RunStore(db) as store:
            counts: dict[str, int] = {}
            for e in store.list_experiments():
                for r in store.runs_for_experiment(e.id):
                    counts[r.state] = counts.get(r.state, 0) + 1
            return counts
    except Exception:  # the store is being created by the run under way
        return {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--queue-factor", type=float, default=40.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="stowplan-bench-slurm-"))
    cluster = SlurmCluster(base / "cluster")
    t0 = time.monotonic()
    facts = cluster.start()
    cluster_start_s = time.monotonic() - t0
    proj = base / "project"
    proj.mkdir()
    try:
        (proj / "stowplan.toml").write_text(
            '[project]\nname = "bench-slurm"\n[providers.cluster]\nkind = "slurm"\n'
            f'host = "127.0.0.1"\nport = {facts.ssh_port}\nuser = "{facts.ssh_user}"\n'
            f'identity_file = "{facts.identity_file}"\nknown_hosts = "{facts.known_hosts}"\n'
            f'slurm_conf = "{facts.slurm_conf}"\nworkdir = "{proj / "remote"}"\n'
            f"queue_factor = {args.queue_factor}\n"
        )
        (proj / "sweep.toml").write_text(
            '[experiment]\nname = "bench"\n[[tasks]]\nname = "noop"\ncommand = ["true"]\n'
            'resources = { cpus = 1, memory = "16MiB" }\n'
            'sweep = { parameters = { i = { type = "int", low = 0, high = '
            f"{args.trials - 1} }} }} }}\n"
        )
        db = proj / ".stowplan" / "stowplan.db"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        start = time.monotonic()
        # files, not pipes: the final --json status is larger than a pipe holds
        out_f = open(proj / "run.out", "w+")  # noqa: SIM115
        err_f = open(proj / "run.err", "w+")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "stowplan.cli.main", "run", str(proj / "sweep.toml"), "--json"],
            cwd=proj,
            env=env,
            stdout=out_f,
            stderr=err_f,
        )
        all_submitted_s = None
        while proc.poll() is None:
            if all_submitted_s is None:
                c = states(db)
                if sum(n for s, n in c.items() if s in SUBMITTED) >= args.trials:
                    all_submitted_s = time.monotonic() - start
            time.sleep(0.2)
        all_finished_s = time.monotonic() - start
        out_f.close()
        err_f.close()
        out = (proj / "run.out").read_text()
        err = (proj / "run.err").read_text()
        if proc.returncode not in (0, 1):
            print(err[-3000:], file=sys.stderr)
            return 1
        final = json.loads(out)["counts"]
        commands, logins = cluster.ssh_sessions()
        arrays = len(list((proj / "remote" / "jobs").glob("*/jobid")))
        print(
            json.dumps(
                {
                    "bench": "slurm",
                    "trials": args.trials,
                    "queue_factor": args.queue_factor,
                    "arrays": arrays,
                    "ssh_commands": commands,
                    "ssh_logins": logins,
                    "ssh_per_trial": round(commands / args.trials, 4),
                    "all_submitted_s": None
                    if all_submitted_s is None
                    else round(all_submitted_s, 2),
                    "all_finished_s": round(all_finished_s, 2),
                    "succeeded": final.get("SUCCEEDED", 0),
                    "cluster_start_s": round(cluster_start_s, 2),
                }
            ),
            flush=True,
        )
        return 0 if final.get("SUCCEEDED", 0) == args.trials else 1
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
