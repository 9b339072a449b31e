"""The launcher run as the driver runs it, on hand-written attempt directories."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from stowplan.providers.launcher import write_json_atomic

LAUNCHER = [sys.executable, "-m", "stowplan.providers.launcher"]


CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(why: str) -> None:
    """A real OOM kill needs a memory cgroup: in CI (root, cgroup v1 here) its absence fails."""
    if CI:
        pytest.fail(why)
    pytest.skip(why)


def attempt(tmp_path: Path, argv: list[str], **spec: Any) -> Path:
    d = tmp_path / "attempt"
    d.mkdir()
    (d / "spec.json").write_text(json.dumps({"argv": argv, **spec}))
    return d


def run(d: Path, *extra: str, timeout: float = 15) -> dict[str, Any]:
    proc = subprocess.run(
        [*LAUNCHER, "--foreground", *extra, str(d)], timeout=timeout, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads((d / "exit.json").read_text())
    return result


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_records_exit_start_and_streams(tmp_path: Path) -> None:
    d = attempt(
        tmp_path,
        ["bash", "-c", 'echo out; echo err >&2; echo "$X $PATH" > seen.txt; exit 5'],
        env={"X": "from-spec"},
        path_prefix="/opt/first",
    )
    info = run(d)
    assert (info["reason"], info["exit_code"], info["signal"]) == ("exited", 5, None)
    assert info["started_at"] <= info["ended_at"]
    assert (d / "stdout.log").read_text() == "out\n"
    assert (d / "stderr.log").read_text() == "err\n"
    x, path = (d / "seen.txt").read_text().split()
    assert x == "from-spec" and path.startswith("/opt/first" + os.pathsep)
    [line] = (d / "launches").read_text().splitlines()
    rec = json.loads((d / "launcher.json").read_text())
    assert line.split()[0] == str(rec["pid"])
    assert {"pid", "create_time", "started_at", "child_pid", "child_create_time"} <= set(rec)
    assert not list(d.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_success_with_a_missing_output_is_recorded(tmp_path: Path) -> None:
    d = attempt(tmp_path, ["bash", "-c", "touch a.txt"], outputs=["a.txt", "b.txt"])
    info = run(d)
    assert (info["reason"], info["exit_code"], info["missing"]) == (
        "missing_output",
        0,
        ["b.txt"],
    )


def test_a_program_that_cannot_start_exits_127(tmp_path: Path) -> None:
    d = attempt(tmp_path, ["/nonexistent/program"])
    info = run(d)
    assert (info["reason"], info["exit_code"]) == ("exited", 127)
    assert "/nonexistent/program" in (d / "stderr.log").read_text()


def test_a_cancel_recorded_before_start_runs_nothing(tmp_path: Path) -> None:
    d = attempt(tmp_path, ["bash", "-c", "touch ran.txt"])
    write_json_atomic(d / "exit.json", {"reason": "cancelled", "message": "early"})
    info = run(d)
    assert info == {"reason": "cancelled", "message": "early"}
    assert not (d / "ran.txt").exists()


def test_timeout_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    d = attempt(
        tmp_path,
        ["bash", "-c", "trap '' TERM; sleep 30 & echo $! > gc.pid; while :; do sleep 0.1; done"],
        timeout_s=0.5,
        stop_grace_s=0.5,
    )
    started = time.monotonic()
    info = run(d)
    assert time.monotonic() - started < 10
    assert info["reason"] == "timeout"
    assert gone(int((d / "gc.pid").read_text()))


def test_leftover_and_escaped_processes_end_with_the_task(tmp_path: Path) -> None:
    script = (
        "import subprocess\n"
        "bg = subprocess.Popen(['sleep', '30'])\n"
        "daemon = subprocess.Popen(['setsid', 'sleep', '30'])\n"
        "open('pids', 'w').write(f'{bg.pid} {daemon.pid}')\n"
    )
    d = attempt(tmp_path, [sys.executable, "-c", script])
    info = run(d)
    assert (info["reason"], info["exit_code"]) == ("exited", 0)
    pids = [int(p) for p in (d / "pids").read_text().split()]
    if not sys.platform.startswith("linux"):
        pids = pids[:1]  # only Linux has child subreapers to catch a new session
    assert all(gone(p) for p in pids)


def test_sigterm_cancels_the_task(tmp_path: Path) -> None:
    d = attempt(tmp_path, ["bash", "-c", "echo $$ > task.pid; exec sleep 30"])
    proc = subprocess.Popen([*LAUNCHER, "--foreground", str(d)])
    try:
        wait_until(lambda: (d / "task.pid").exists() and (d / "task.pid").read_text().strip())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    info = json.loads((d / "exit.json").read_text())
    assert (info["reason"], info["signal"]) == ("cancelled", signal.SIGTERM)
    assert gone(int((d / "task.pid").read_text()))


def test_memory_is_summed_over_the_task_tree(tmp_path: Path) -> None:
    grow = "import time; b = b'x' * (80 << 20); time.sleep(30)"
    d = attempt(
        tmp_path,
        ["bash", "-c", f'python -c "{grow}" & python -c "{grow}" & wait'],
        memory_limit=120 << 20,
        path_prefix=os.path.dirname(sys.executable),
    )
    info = run(d)
    assert info["reason"] == "memory"
    assert info["peak_rss"] > 120 << 20 and info["memory_limit"] == 120 << 20


def test_detaches_by_default(tmp_path: Path) -> None:
    d = attempt(tmp_path, ["bash", "-c", "sleep 1"])
    subprocess.run([*LAUNCHER, str(d)], check=True, timeout=10)
    assert not (d / "exit.json").exists()  # returned while the attempt runs on
    wait_until((d / "exit.json").exists)
    info = json.loads((d / "exit.json").read_text())
    assert (info["reason"], info["exit_code"]) == ("exited", 0)


def test_an_unreadable_spec_is_a_launcher_error(tmp_path: Path) -> None:
    d = tmp_path / "attempt"
    d.mkdir()
    (d / "spec.json").write_text("{not json")
    proc = subprocess.run([*LAUNCHER, "--foreground", str(d)], capture_output=True, timeout=10)
    assert proc.returncode == 1
    info = json.loads((d / "exit.json").read_text())
    assert info["reason"] == "launcher_error" and "JSONDecodeError" in info["message"]


def test_usage() -> None:
    proc = subprocess.run(LAUNCHER, capture_output=True, timeout=10)
    assert proc.returncode == 2 and b"usage" in proc.stderr


# -- outputs -------------------------------------------------------------------------------------


def test_a_directory_output_is_checked_whole(tmp_path: Path) -> None:
    d = attempt(
        tmp_path,
        ["bash", "-c", "mkdir -p d/sub && echo a > d/a.txt && echo b > d/sub/b.txt && touch d/x"],
        outputs=["d/x", "d/"],
    )
    info = run(d)
    assert (info["reason"], info["exit_code"], info["missing"], info["refused"]) == (
        "exited",
        0,
        [],
        [],
    )


def test_an_output_linked_out_of_the_attempt_directory_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "hostname"
    secret.write_text("not the task's")
    d = attempt(tmp_path, ["ln", "-s", str(secret), "out.txt"], outputs=["out.txt"])
    info = run(d)
    assert (info["reason"], info["exit_code"], info["missing"]) == ("bad_output", 0, [])
    [why] = info["refused"]
    assert why.startswith("out.txt: leads to ") and "outside the attempt directory" in why


# -- a SIGKILL we did not send -------------------------------------------------------------------


def start_and_kill_task(d: Path) -> dict[str, Any]:
    """Run the launcher on ``d`` (whose task writes task.pid), kill -9 the task from outside."""
    proc = subprocess.Popen([*LAUNCHER, "--foreground", str(d)])
    try:
        wait_until(lambda: (d / "task.pid").exists() and (d / "task.pid").read_text().strip())
        os.kill(int((d / "task.pid").read_text()), signal.SIGKILL)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result: dict[str, Any] = json.loads((d / "exit.json").read_text())
    return result


def test_an_outside_sigkill_is_recorded_with_what_is_known_about_memory(tmp_path: Path) -> None:
    d = attempt(
        tmp_path,
        ["bash", "-c", "echo $$ > task.pid; exec sleep 30"],
        memory_limit=1 << 30,
    )
    info = start_and_kill_task(d)
    assert (info["reason"], info["signal"], info["exit_code"]) == ("exited", 9, None)
    # No OOM kill happened: where the facts are readable they say so, else they are unknown.
    assert info["oom_kills"] in (0, None)
    assert info["kernel_oom"] in (False, None)
    assert info["memory_total"] > 0
    assert info["memory_available"] is None or 0 < info["memory_available"] <= info["memory_total"]


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh cgroup v1 memory cgroup below ours with ``limit`` bytes; yields its procs file.

    Needs the right to create cgroups (root, or a delegated hierarchy): skipped without it,
    since then no test can make the kernel's OOM killer act on one process alone."""
    mine = next(
        (
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":")[1].split(",")
        ),
        None,
    )
    if mine is None:
        _unavailable("no cgroup v1 memory controller here to make a real OOM kill in")
    cg = Path("/sys/fs/cgroup/memory") / mine.lstrip("/") / f"stowplan-oom-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError as e:
        _unavailable(f"cannot create a memory cgroup for a real OOM kill: {e}")
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # without swap accounting there is no memsw file
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield cg / "cgroup.procs"
    finally:
        wait_until(lambda: not (cg / "cgroup.procs").read_text().strip())
        cg.rmdir()


def test_a_real_kernel_oom_kill_is_recorded_as_one(tmp_path: Path) -> None:
    d = attempt(
        tmp_path,
        [sys.executable, "-c", "b = bytearray(400 << 20); import time; time.sleep(30)"],
        memory_limit=8 << 30,  # the launcher's own limit is far: the kernel acts first
    )
    with memory_cgroup(200 << 20) as procs:
        shell = f'echo $$ > {procs} && exec "$@"'
        done = subprocess.run(
            ["sh", "-c", shell, "sh", *LAUNCHER, "--foreground", str(d)],
            timeout=30,
            capture_output=True,
        )
    assert done.returncode == 0, done.stderr.decode()
    info = json.loads((d / "exit.json").read_text())
    assert (info["reason"], info["signal"]) == ("exited", 9)
    assert info["oom_kills"] >= 1
    assert info["kernel_oom"] in (True, None)  # True where the kernel log is readable
