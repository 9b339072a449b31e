"""The SSH backend's remote submit program, run here with the real bash and coreutils and
stand-ins for ``sbatch``, ``squeue`` and ``sacct`` (each logs its call): the stub it gives
sbatch runs every element exactly as the whole script does, and a first submit does not ask
the queue for an earlier one while a repeated one does; the describe program reads the
elements' end records and asks the queue only about the others."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from stowplan.providers.base import LaunchSpec
from stowplan.providers.slurm.backend import DESCRIBE_PROGRAM, SUBMIT_PROGRAM, TRIED
from stowplan.providers.slurm.parse import JobRow, parse_end_records, split_sections
from stowplan.providers.slurm.render import ELEMENTS_DIR, SlurmRequest, plan_arrays

FAKES = {
    "sbatch": 'echo "sbatch $*" >> "$CALLS"; cp "${@: -1}" "$SUBMITTED"; echo "4242;spcluster"',
    "squeue": 'echo "squeue $*" >> "$CALLS"; cat "$QUEUE" 2>/dev/null || true',
    "sacct": 'echo "sacct $*" >> "$CALLS"',
}


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, str]:
    for prog in ("bash", "flock", "sha256sum", "awk", "sed", "xargs"):
        if shutil.which(prog) is None:
            pytest.fail(f"{prog} is needed to run the submit program")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        f = bin_dir / name
        f.write_text(f"#!/bin/bash\n{body}\n")
        f.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "CALLS": str(tmp_path / "calls"),
        "SUBMITTED": str(tmp_path / "submitted.sh"),
        "QUEUE": str(tmp_path / "queue"),
    }


def launch(i: int, argv: list[str], outputs: list[str] | None = None) -> LaunchSpec:
    return LaunchSpec(
        key=f"{i:032x}",
        run_id=f"run{i:04d}",
        attempt=1,
        pool="cluster/cpu",
        name="t",
        argv=argv,
        cpus=1,
        memory=16 << 20,
        env={"X": f"x{i}; $(touch pwned)"},
        outputs=outputs or [],
    )


def submit(req: SlurmRequest, env: dict[str, str], first: str) -> subprocess.CompletedProcess[str]:
    digest = hashlib.sha256(req.script.encode()).hexdigest()
    Path(env["HOME"]).mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", "-c", SUBMIT_PROGRAM, "stowplan", req.job_dir, req.name, digest, first],
        input=req.script,
        cwd=env["HOME"],
        env=env,
        capture_output=True,
        text=True,
    )


def element(script: Path, index: int, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    r = subprocess.run(
        ["bash", str(script)],
        cwd=cwd,
        env={**env, "SLURM_ARRAY_TASK_ID": str(index)},
        capture_output=True,
        text=True,
    )
    return r.returncode, r.stdout, r.stderr


def test_the_stub_runs_each_element_as_the_whole_script_does(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    launches = [
        launch(0, ["sh", "-c", 'printf "%s|%s|%s" "$X" "$STOWPLAN_RUN_ID" "$(pwd)"']),
        launch(1, ["sh", "-c", "exit 3"]),
        launch(2, ["true"], outputs=["metrics.json"]),
        launch(3, ["sh", "-c", "echo {} > metrics.json"], outputs=["metrics.json"]),
    ]
    (req,) = plan_arrays(launches, provider="cluster", workdir="sp")  # relative: under HOME
    done = submit(req, fakes, "first")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4242"
    job_dir = Path(fakes["HOME"]) / req.job_dir
    assert (job_dir / "jobid").read_text() == "4242\n"
    stub = Path(fakes["SUBMITTED"])
    assert len(stub.read_bytes()) < 2048 < len(req.script.encode())
    assert "stowplan-key" not in stub.read_text()
    assert sorted(p.name for p in (job_dir / ELEMENTS_DIR).iterdir()) == ["0", "1", "2", "3"]
    # every attempt directory exists before any element runs
    for m in req.members:
        assert (Path(fakes["HOME"]) / m.attempt_dir).is_dir()
    whole = job_dir / "job.sh"
    assert whole.read_text() == req.script
    for i in range(5):  # index 4 has no attempt: exit 70 from both
        via_stub = element(stub, i, fakes, job_dir)
        via_whole = element(whole, i, fakes, job_dir)
        assert via_stub == via_whole, i
    rc, out, _ = element(stub, 0, fakes, job_dir)
    attempt = Path(fakes["HOME"]) / req.members[0].attempt_dir
    assert (rc, out) == (0, f"x0; $(touch pwned)|run0000|{attempt.resolve()}")
    assert [element(stub, i, fakes, job_dir)[0] for i in range(5)] == [0, 3, 1, 0, 70]
    assert not list(tmp_path.rglob("pwned"))


def test_a_first_submit_skips_the_queue_and_a_repeated_one_finds_the_job(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    (req,) = plan_arrays([launch(0, ["true"])], provider="cluster", workdir=str(tmp_path / "w"))
    calls = Path(fakes["CALLS"])
    assert submit(req, fakes, "first").returncode == 0
    assert [c.split()[0] for c in calls.read_text().splitlines()] == ["sbatch"]
    job_dir = Path(req.job_dir)
    assert (job_dir / TRIED).exists()
    # the answer was lost after sbatch and before the job id was written: a retry asks the
    # queue (the marker is there, even though the driver thinks it is a first try) and finds
    # the job submitted from this very directory
    (job_dir / "jobid").unlink()
    Path(fakes["QUEUE"]).write_text(f"4242_0|{job_dir.resolve()}\n")
    calls.unlink()
    again = submit(req, fakes, "first")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "4242"
    assert [c.split()[0] for c in calls.read_text().splitlines()] == ["squeue", "sacct"]


def test_a_driver_retry_asks_the_queue_even_without_the_marker(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    (req,) = plan_arrays([launch(0, ["true"])], provider="cluster", workdir=str(tmp_path / "w"))
    assert submit(req, fakes, "again").returncode == 0
    kinds = [c.split()[0] for c in Path(fakes["CALLS"]).read_text().splitlines()]
    assert kinds == ["squeue", "sacct", "sbatch"]


def describe(
    env: dict[str, str], lines: list[tuple[str, str]], steps: int = 0
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    calls = Path(env["CALLS"])
    calls.unlink(missing_ok=True)
    r = subprocess.run(
        ["bash", "-c", DESCRIBE_PROGRAM, "stowplan", "sp-x", "now-1days", str(steps)],
        input="".join(f"{e}\t{f}\n" for e, f in lines),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    kinds = [c.split()[0] for c in calls.read_text().splitlines()] if calls.exists() else []
    return r, kinds


def test_describe_reads_end_records_and_asks_the_queue_only_for_the_rest(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    ends = tmp_path / "elements"
    ends.mkdir()
    (ends / "0.end").write_text("0|1.5|2.25|n1\n")
    (ends / "1.end").write_text("3|||\n")
    (ends / "2.end").write_text("")  # being written: not ended yet
    every = [("7_0", str(ends / "0.end")), ("7_1", str(ends / "1.end"))]
    done, kinds = describe(fakes, every)
    assert done.returncode == 0, done.stderr
    assert kinds == []  # every element waited on ended: neither squeue nor sacct
    assert parse_end_records(split_sections(done.stdout)[0]) == [
        JobRow(
            job_id="7",
            index=0,
            name="",
            state="COMPLETED",
            exit_code=0,
            node="n1",
            started_at=1.5,
            ended_at=2.25,
        ),
        JobRow(job_id="7", index=1, name="", state="FAILED", exit_code=3),
    ]
    # one still running in the queue: squeue, no sacct
    Path(fakes["QUEUE"]).write_text("7|2|sp-x|x|RUNNING|0:0|n2||||\n")
    _, kinds = describe(fakes, [*every, ("7_2", str(ends / "2.end"))])
    assert kinds == ["squeue"]
    # one left the queue without an end record (killed): sacct too
    _, kinds = describe(fakes, [*every, ("7_3", str(ends / "3.end"))])
    assert kinds == ["squeue", "sacct"]


def test_describe_waits_on_the_cluster_until_the_last_end_record(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    end = tmp_path / "0.end"
    writer = subprocess.Popen(["bash", "-c", f"sleep 0.6; echo '0|||' > {end}"])
    began = time.monotonic()
    done, kinds = describe(fakes, [("7_0", str(end))], steps=100)  # at most 20 s
    took = time.monotonic() - began
    writer.wait()
    assert done.returncode == 0, done.stderr
    assert kinds == []
    assert split_sections(done.stdout)[0] == "7_0|0|||\n"
    assert took < 5, took


def test_an_element_killed_by_a_signal_leaves_no_end_record(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    """scancel, the time limit and preemption end a command with SIGTERM: accounting, not
    the element, says how it ended (CANCELLED, TIMEOUT), so no end record claims an exit."""
    launches = [
        launch(0, ["sh", "-c", "exit 3"]),
        launch(1, ["sh", "-c", "kill -TERM $$"]),
        launch(2, ["true"]),
    ]
    (req,) = plan_arrays(launches, provider="cluster", workdir=str(tmp_path / "w"))
    assert submit(req, fakes, "first").returncode == 0
    job_dir = Path(req.job_dir)
    stub = Path(fakes["SUBMITTED"])
    assert [element(stub, i, fakes, job_dir)[0] for i in range(3)] == [3, 143, 0]
    ends = job_dir / ELEMENTS_DIR
    assert sorted(p.name for p in ends.glob("*.end")) == ["0.end", "2.end"]
    rc, start, end, node, gpus = (ends / "0.end").read_text().rstrip("\n").split("|")
    assert rc == "3" and node == "" and gpus == ""
    assert float(start.replace(",", ".")) <= float(end.replace(",", "."))


def test_an_element_records_the_node_and_the_gpus_slurm_bound(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    """The end record names the node and the GPU indices Slurm bound (``SLURM_JOB_GPUS``, else
    ``CUDA_VISIBLE_DEVICES``) as the element found them before its own lines ran; whatever
    else the environment holds there is dropped, never run, and never believed."""
    # the task's own environment may name anything: it is not what Slurm bound
    own = {"CUDA_VISIBLE_DEVICES": "7", "SLURM_JOB_GPUS": "6", "SLURMD_NODENAME": "evil"}
    launches = [
        msgspec.structs.replace(
            launch(i, ["true"]), pool="cluster/gpu", gpus=1, env=own if i else {}
        )
        for i in range(4)
    ]
    (req,) = plan_arrays(launches, provider="cluster", workdir=str(tmp_path / "w"))
    assert submit(req, fakes, "first").returncode == 0
    job_dir = Path(req.job_dir)
    stub = Path(fakes["SUBMITTED"])
    hostile = "0$(touch pwned)"
    given = [
        {"SLURM_JOB_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "0,1", "SLURMD_NODENAME": "n3"},
        {"CUDA_VISIBLE_DEVICES": "2", "SLURMD_NODENAME": "n4"},
        {"SLURM_JOB_GPUS": hostile, "CUDA_VISIBLE_DEVICES": "1", "SLURMD_NODENAME": "n|x"},
        {"CUDA_VISIBLE_DEVICES": "GPU-6f1c2a3e-0000", "SLURMD_NODENAME": "n4"},
    ]
    for i, extra in enumerate(given):
        assert element(stub, i, {**fakes, **extra}, job_dir)[0] == 0
    records = [(job_dir / ELEMENTS_DIR / f"{i}.end").read_text() for i in range(4)]
    assert [r.split("|", 3)[3] for r in records] == ["n3|1,3\n", "n4|2\n", "|\n", "n4|\n"]
    assert not list(tmp_path.rglob("pwned"))
    lines = [(f"7_{i}", str(job_dir / ELEMENTS_DIR / f"{i}.end")) for i in range(4)]
    done, kinds = describe(fakes, lines)
    assert kinds == []
    rows = parse_end_records(split_sections(done.stdout)[0])
    assert [(r.index, r.node, r.devices) for r in rows] == [
        (0, "n3", (1, 3)),
        (1, "n4", (2,)),
        (2, None, None),
        (3, "n4", None),
    ]


def test_a_cpu_element_records_no_gpus_whatever_the_environment_says(
    tmp_path: Path, fakes: dict[str, str]
) -> None:
    # sbatch passes the submitter's environment on: a CUDA_VISIBLE_DEVICES from the login
    # node is no binding
    (req,) = plan_arrays([launch(0, ["true"])], provider="cluster", workdir=str(tmp_path / "w"))
    assert submit(req, fakes, "first").returncode == 0
    job_dir = Path(req.job_dir)
    env = {**fakes, "CUDA_VISIBLE_DEVICES": "0", "SLURMD_NODENAME": "n1"}
    assert element(Path(fakes["SUBMITTED"]), 0, env, job_dir)[0] == 0
    assert (job_dir / ELEMENTS_DIR / "0.end").read_text().endswith("|n1|\n")
