"""The local driver against real processes: no mocks. States are polled with a deadline."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    ProviderState,
    Report,
)
from stowplan.providers.local import (
    ExitRecord,
    LocalProvider,
    LocalRequest,
    classify_exit,
    tail_text,
)
from stowplan.providers.registry import make_provider
from stowplan.scheduler.retry import should_retry
from stowplan.spec.models import (
    INFRASTRUCTURE_FAILURES,
    FailureClass,
    LocalProviderConfig,
    RetryPolicy,
)

S = ProviderState
_ids = itertools.count()


def spec(**kw: object) -> LaunchSpec:
    n = next(_ids)
    fields: dict[str, object] = {
        "key": f"key-{n}",
        "run_id": f"run{n}",
        "attempt": 0,
        "pool": "local",
        "name": "t",
        "memory": 256 << 20,
    }
    fields.update(kw)
    return LaunchSpec(**fields)  # type: ignore[arg-type]


def _kill_leftovers(state_dir: Path) -> None:
    """Whatever a failing test left running dies here, so no test leaks processes."""
    for rec_path in state_dir.glob("runs/*/*/launcher.json"):
        rec = json.loads(rec_path.read_text())
        try:
            if abs(psutil.Process(rec["pid"]).create_time() - rec["create_time"]) < 0.05:
                os.kill(rec["pid"], signal.SIGKILL)
        except (psutil.Error, OSError):
            pass
        if "child_pid" in rec:  # the task's process group, even if its leader is gone
            with contextlib.suppress(OSError):
                os.killpg(rec["child_pid"], signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / ".stowplan"
    yield d
    _kill_leftovers(d)


@pytest.fixture
def provider(state_dir: Path) -> LocalProvider:
    return LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)


def plan1(provider: LocalProvider, launch: LaunchSpec) -> LocalRequest:
    [req] = provider.plan([launch], Facts())
    assert isinstance(req, LocalRequest)
    return req


async def submit1(provider: LocalProvider, launch: LaunchSpec) -> LocalRequest:
    req = plan1(provider, launch)
    [report] = await provider.submit([req])
    assert report.key == launch.key
    assert report.state in {S.QUEUED, S.RUNNING, S.SUCCEEDED}, report
    return req


async def wait_for(
    provider: LocalProvider,
    key: str,
    states: frozenset[ProviderState] = TERMINAL_PROVIDER_STATES,
    *,
    timeout: float = 15.0,
) -> Report:
    import anyio

    deadline = time.monotonic() + timeout
    while True:
        [report] = await provider.describe([key])
        if report.state in states:
            return report
        if time.monotonic() > deadline:
            pytest.fail(f"{key} never reached {sorted(states)}; last report: {report}")
        await anyio.sleep(0.05)


async def wait_file(path: Path, timeout: float = 10.0) -> str:
    import anyio

    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared")
        await anyio.sleep(0.05)
    return path.read_text()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def all_gone(*pids: int, timeout: float = 5.0) -> bool:
    """The task's processes are gone when exit.json appears; the launcher exits right after."""
    import anyio

    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.05)
    return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def launches(req: LocalRequest) -> list[str]:
    path = Path(req.attempt_dir) / "launches"
    return path.read_text().splitlines() if path.exists() else []


# -- discover and plan ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_discover_reports_one_pool_with_configured_capacity(state_dir: Path) -> None:
    provider = make_provider(
        "laptop", LocalProviderConfig(cpus=3, memory="2GiB", site="home"), state_dir=state_dir
    )
    assert isinstance(provider, LocalProvider)
    [pool] = await provider.discover()
    assert (pool.id, pool.provider, pool.kind, pool.site) == ("laptop", "laptop", "local", "home")
    assert (pool.cpus, pool.memory, pool.gpus, pool.price_per_hour) == (3.0, 2 << 30, {}, 0.0)
    assert pool.hardware_class.startswith("cpu=")
    [default] = await LocalProvider("l", LocalProviderConfig(), state_dir=state_dir).discover()
    assert default.cpus == os.cpu_count()
    assert default.memory == psutil.virtual_memory().total


def test_plan_is_pure_and_renders_the_exact_command(provider: LocalProvider) -> None:
    req = plan1(
        provider,
        spec(argv=["python", "-c", "print('a b')"], env={"A": "x y"}, outputs=["o.txt"]),
    )
    assert not provider._runs.exists()  # planning touched nothing
    assert req.argv == ["python", "-c", "print('a b')"]
    assert req.env["A"] == "x y" and req.env["STOWPLAN_RUN_ID"] == req.run_id
    text = req.render()
    assert shlex.join(req.argv) in text
    assert f"cd {shlex.quote(req.attempt_dir)}" in text
    assert "'A=x y'" in text
    assert f"PATH={shlex.quote(os.path.dirname(sys.executable))}:" in text
    script = plan1(provider, spec(script="echo hi"))
    assert script.argv == ["bash", "-euo", "pipefail", "-c", "echo hi"]


@pytest.mark.parametrize(
    "bad",
    [
        {"run_id": "../escape"},
        {"argv": ["true"], "script": "true"},
        {"argv": []},
        {"files": {"../x": b""}},
        {"files": {"/etc/passwd": b""}},
        {"files": {"exit.json": b"{}"}},
        {"outputs": ["spec.json"]},
        {"outputs": ["stowplan-used.jsonl"]},
        {"env": {"NOT-A-NAME": "1"}},
        {"gpus": 1},
    ],
)
def test_plan_rejects_unsafe_requests(provider: LocalProvider, bad: dict[str, object]) -> None:
    fields: dict[str, object] = {"argv": ["true"], **bad}
    if "script" in bad and "argv" not in bad:
        fields.pop("argv")
    with pytest.raises(ProviderError) as info:
        provider.plan([spec(**fields)], Facts())
    assert not info.value.retryable


# -- outcomes ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_success_collects_declared_outputs_and_logs(provider: LocalProvider) -> None:
    launch = spec(
        argv=["python", "-c", "open('out/m.json', 'w').write('42'); print('hello')"],
        files={"out/.keep": b""},
        outputs=["out/m.json"],
    )
    await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert report.state is S.SUCCEEDED, report
    assert report.failure is None and report.exit_code == 0
    assert report.started_at is not None and report.ended_at is not None
    out = Path(report.outputs["out/m.json"])
    assert out.is_absolute() and out.read_text() == "42"
    assert b"".join([c async for c in provider.logs(launch.key)]) == b"hello\n"
    assert b"".join([c async for c in provider.logs(launch.key, stream="stderr")]) == b""


@pytest.mark.anyio
async def test_the_report_carries_what_the_task_imported(
    provider: LocalProvider, state_dir: Path
) -> None:
    """Read where the attempt ran, so the record outlives the attempt directory."""
    import msgspec

    from stowplan.provenance.imports import UsedRecord

    python, shell = spec(argv=["python", "-c", "import json"]), spec(argv=["true"])
    await provider.submit(provider.plan([python, shell], Facts()))
    report = await wait_for(provider, python.key)
    assert report.state is S.SUCCEEDED and report.used is not None, report
    rec = msgspec.json.decode(report.used, type=UsedRecord)
    v = sys.version_info
    assert [i.python for i in rec.interpreters] == [f"{v.major}.{v.minor}.{v.micro}"]
    assert (await wait_for(provider, shell.key)).used is None
    # a fresh driver reads the same record again
    other = LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)
    assert (await other.describe([python.key]))[0].used == report.used


@pytest.mark.anyio
async def test_logs_follow_streams_until_the_attempt_ends(provider: LocalProvider) -> None:
    launch = spec(script="for i in 1 2 3; do echo line$i; sleep 0.2; done")
    await submit1(provider, launch)
    chunks = [c async for c in provider.logs(launch.key, follow=True)]
    assert b"".join(chunks) == b"line1\nline2\nline3\n"
    [report] = await provider.describe([launch.key])
    assert report.state is S.SUCCEEDED


@pytest.mark.anyio
async def test_logs_of_an_unknown_key_yield_nothing(provider: LocalProvider) -> None:
    assert [c async for c in provider.logs("never-submitted")] == []


@pytest.mark.anyio
async def test_nonzero_exit_is_a_user_error_with_stderr(provider: LocalProvider) -> None:
    launch = spec(script="echo 'bad input: x' >&2\nexit 3")
    req = await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure, report.exit_code) == (
        S.FAILED,
        FailureClass.USER_ERROR,
        3,
    )
    assert "exit code 3" in report.message and "bad input: x" in report.message
    assert report.failure not in INFRASTRUCTURE_FAILURES
    assert report.failure not in RetryPolicy().on  # not retried by default
    assert len(launches(req)) == 1  # and the driver itself never retries


@pytest.mark.anyio
async def test_missing_declared_output_is_a_user_error(provider: LocalProvider) -> None:
    launch = spec(argv=["true"], outputs=["model.pt", "metrics.json"])
    await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure) == (S.FAILED, FailureClass.USER_ERROR)
    assert "model.pt" in report.message and "metrics.json" in report.message
    assert report.outputs == {}


@pytest.mark.anyio
async def test_a_directory_output_reports_every_file_under_it(provider: LocalProvider) -> None:
    launch = spec(
        script="mkdir -p d/sub && echo a > d/a.txt && echo b > d/sub/b.txt && echo x > d/x",
        outputs=["d/x", "d/"],
    )
    req = await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert report.state is S.SUCCEEDED, report
    real = Path(os.path.realpath(req.attempt_dir))
    assert report.outputs == {
        "d/a.txt": str(real / "d" / "a.txt"),
        "d/sub/b.txt": str(real / "d" / "sub" / "b.txt"),
        "d/x": str(real / "d" / "x"),
    }


@pytest.mark.anyio
async def test_an_output_linked_outside_fails_the_run(
    provider: LocalProvider, tmp_path: Path
) -> None:
    secret = tmp_path / "hostname"
    secret.write_text("the machine's, not the task's")
    launch = spec(
        script=f"echo fine > ok.txt; ln -s {shlex.quote(str(secret))} out.txt",
        outputs=["ok.txt", "out.txt"],
    )
    await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure) == (S.FAILED, FailureClass.USER_ERROR), report
    assert "out.txt: leads to" in report.message
    assert "outside the attempt directory" in report.message
    assert report.outputs == {}


@pytest.mark.anyio
async def test_outputs_are_checked_again_when_the_report_is_made(state_dir: Path) -> None:
    """A launcher's verdict is not trusted blindly: a fresh driver looks at the files again."""
    old = LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)
    launch = spec(script="echo ok > out.txt", outputs=["out.txt"])
    req = await submit1(old, launch)
    assert (await wait_for(old, launch.key)).state is S.SUCCEEDED
    out = Path(req.attempt_dir) / "out.txt"
    out.unlink()
    out.symlink_to("/etc/hostname")
    new = LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)
    [report] = await new.describe([launch.key])
    assert (report.state, report.failure) == (S.FAILED, FailureClass.USER_ERROR), report
    assert "outside the attempt directory" in report.message and report.outputs == {}


@pytest.mark.anyio
async def test_an_outside_sigkill_is_not_called_out_of_memory(provider: LocalProvider) -> None:
    launch = spec(argv=["bash", "-c", "echo $$ > task.pid; exec sleep 30"])
    req = await submit1(provider, launch)
    pid = int(await wait_file(Path(req.attempt_dir) / "task.pid"))
    os.kill(pid, signal.SIGKILL)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure) == (S.FAILED, FailureClass.NODE_FAILURE), report
    assert "killed by signal 9 from outside" in report.message
    assert "out-of-memory killer" not in report.message
    assert should_retry(RetryPolicy(), FailureClass.NODE_FAILURE, 1)  # retried by default


@pytest.mark.anyio
async def test_command_not_found_is_a_user_error(provider: LocalProvider) -> None:
    launch = spec(argv=["no-such-program-stowplan"])
    await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure, report.exit_code) == (
        S.FAILED,
        FailureClass.USER_ERROR,
        127,
    )
    assert "no-such-program-stowplan" in report.message


@pytest.mark.anyio
async def test_timeout_kills_the_whole_process_group(provider: LocalProvider) -> None:
    launch = spec(argv=["bash", "-c", "sleep 30 & echo $! > grandchild.pid; wait"], timeout_s=1.0)
    req = await submit1(provider, launch)
    grandchild = int(await wait_file(Path(req.attempt_dir) / "grandchild.pid"))
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure) == (S.FAILED, FailureClass.TIMEOUT), report
    assert "1 s timeout" in report.message
    child = json.loads((Path(req.attempt_dir) / "launcher.json").read_text())["child_pid"]
    assert gone(child) and gone(grandchild) and group_gone(child)


@pytest.mark.anyio
async def test_memory_over_the_declared_limit_is_out_of_memory(provider: LocalProvider) -> None:
    launch = spec(
        argv=["python", "-c", "import time; b = b'x' * (300 << 20); time.sleep(30)"],
        memory=100 << 20,
    )
    req = await submit1(provider, launch)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure) == (S.FAILED, FailureClass.OUT_OF_MEMORY), report
    assert "100.0 MiB" in report.message
    exit_info = json.loads((Path(req.attempt_dir) / "exit.json").read_text())
    assert exit_info["reason"] == "memory" and exit_info["peak_rss"] > 100 << 20
    child = json.loads((Path(req.attempt_dir) / "launcher.json").read_text())["child_pid"]
    assert gone(child)


@pytest.mark.anyio
async def test_cancel_stops_a_running_attempt_and_its_processes(provider: LocalProvider) -> None:
    launch = spec(argv=["bash", "-c", "sleep 30 & echo $! > grandchild.pid; wait"])
    req = await submit1(provider, launch)
    running = await wait_for(provider, launch.key, frozenset({S.RUNNING}))
    assert running.job_id is not None and running.node
    grandchild = int(await wait_file(Path(req.attempt_dir) / "grandchild.pid"))
    await provider.cancel([launch.key])
    report = await wait_for(provider, launch.key)
    assert report.state is S.CANCELLED, report
    child = json.loads((Path(req.attempt_dir) / "launcher.json").read_text())["child_pid"]
    assert gone(child) and gone(grandchild)
    assert await all_gone(int(running.job_id))
    # Idempotent, and a no-op for keys nobody knows.
    await provider.cancel([launch.key, "never-submitted"])
    assert (await provider.describe([launch.key]))[0].state is S.CANCELLED


# -- idempotency and reconciliation --------------------------------------------------------------


@pytest.mark.anyio
async def test_submitting_a_key_twice_launches_it_once(
    provider: LocalProvider, state_dir: Path
) -> None:
    launch = spec(script="echo ran >> count.txt")
    req = plan1(provider, launch)
    await provider.submit([req])
    again = await provider.submit([req, req])
    assert [r.key for r in again] == [launch.key, launch.key]
    # A second driver instance (a control plane restarted mid-submit) starts nothing either.
    other = LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)
    await other.submit(other.plan([launch], Facts()))
    assert (await wait_for(provider, launch.key)).state is S.SUCCEEDED
    assert (await wait_for(other, launch.key)).state is S.SUCCEEDED
    assert len(launches(req)) == 1
    assert (Path(req.attempt_dir) / "count.txt").read_text() == "ran\n"


@pytest.mark.anyio
async def test_a_new_instance_reconciles_what_an_old_one_started(state_dir: Path) -> None:
    old = LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)
    done, failed, running = (
        spec(script="echo ok > out.txt", outputs=["out.txt"]),
        spec(script="exit 4"),
        spec(argv=["sleep", "30"]),
    )
    await old.submit(old.plan([done, failed, running], Facts()))
    await wait_for(old, done.key)
    await wait_for(old, failed.key)
    await wait_for(old, running.key, frozenset({S.RUNNING}))

    new = LocalProvider("laptop", LocalProviderConfig(), state_dir=state_dir)
    reports = await new.describe([done.key, failed.key, running.key, "never-submitted"])
    assert [r.state for r in reports] == [S.SUCCEEDED, S.FAILED, S.RUNNING, S.UNKNOWN]
    assert Path(reports[0].outputs["out.txt"]).read_text() == "ok\n"
    assert reports[1].failure is FailureClass.USER_ERROR and reports[1].exit_code == 4
    await new.cancel([running.key])
    assert (await wait_for(new, running.key)).state is S.CANCELLED
    assert (await wait_for(old, running.key)).state is S.CANCELLED


@pytest.mark.anyio
async def test_supervisor_death_is_a_node_failure(provider: LocalProvider) -> None:
    launch = spec(argv=["bash", "-c", "echo started > started.txt; exec sleep 30"])
    req = await submit1(provider, launch)
    running = await wait_for(provider, launch.key, frozenset({S.RUNNING}))
    await wait_file(Path(req.attempt_dir) / "started.txt")
    assert running.job_id is not None
    os.kill(int(running.job_id), signal.SIGKILL)
    report = await wait_for(provider, launch.key)
    assert (report.state, report.failure) == (S.FAILED, FailureClass.NODE_FAILURE), report
    assert "supervisor" in report.message and "still runs" in report.message
    # The orphaned task can still be stopped.
    child = json.loads((Path(req.attempt_dir) / "launcher.json").read_text())["child_pid"]
    await provider.cancel([launch.key])
    assert await all_gone(child), "the orphaned task survived cancel"


@pytest.mark.anyio
async def test_a_claim_never_started_is_queued_then_lost(state_dir: Path) -> None:
    old = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    blocker, waiting = spec(argv=["sleep", "30"]), spec(argv=["true"])
    await old.submit(old.plan([blocker, waiting], Facts()))
    assert (await old.describe([waiting.key]))[0].state is S.QUEUED

    # The old driver "crashes" with `waiting` in its in-memory queue.
    new = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    assert (await new.describe([waiting.key]))[0].state is S.QUEUED  # may still be starting
    attempt_dir = Path(plan1(new, waiting).attempt_dir)
    long_ago = time.time() - 120
    os.utime(attempt_dir, (long_ago, long_ago))
    [lost] = await new.describe([waiting.key])
    assert (lost.state, lost.failure) == (S.FAILED, FailureClass.LOST), lost
    await new.cancel([blocker.key])
    assert (await wait_for(new, blocker.key)).state is S.CANCELLED


CLAIMER = """
import sys
from pathlib import Path

import anyio
import msgspec

from stowplan.providers.base import Facts, LaunchSpec
from stowplan.providers.local import LocalProvider
from stowplan.spec.models import LocalProviderConfig

specs = msgspec.json.decode(Path(sys.argv[2]).read_bytes(), type=list[LaunchSpec])
provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=Path(sys.argv[1]))

async def main() -> None:
    await provider.submit(provider.plan(specs, Facts()))
    while (await provider.describe([specs[0].key]))[0].state != "RUNNING":
        await anyio.sleep(0.05)
    reports = await provider.describe([s.key for s in specs])
    print(" ".join(r.state for r in reports), flush=True)


anyio.run(main)
sys.stdin.read()  # holds its queue until killed
"""


@pytest.mark.anyio
async def test_a_dead_claimer_s_queued_attempt_is_started_once_by_its_successor(
    state_dir: Path, tmp_path: Path
) -> None:
    """A provider actor killed with attempts in its in-memory queue: a new instance starts
    them (once, however many instances take them over), instead of calling them LOST."""
    import msgspec

    blocker, waiting = spec(argv=["sleep", "30"]), spec(script="echo ran >> count.txt")
    specs = tmp_path / "specs.json"
    specs.write_bytes(msgspec.json.encode([blocker, waiting]))
    claimer = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(state_dir), str(specs)],
        cwd=Path(__file__).resolve().parents[3],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert claimer.stdout is not None
        assert claimer.stdout.readline().split() == ["RUNNING", "QUEUED"]
        new = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
        req = plan1(new, waiting)
        long_ago = time.time() - 120
        os.utime(req.attempt_dir, (long_ago, long_ago))
        # its claimer lives and holds it queued: queued, however old the claim
        assert (await new.describe([waiting.key]))[0].state is S.QUEUED
    finally:
        claimer.kill()
        claimer.wait(10)
        if claimer.stdin is not None:
            claimer.stdin.close()
        if claimer.stdout is not None:
            claimer.stdout.close()
    assert (await wait_for(new, blocker.key, frozenset({S.RUNNING}))).state is S.RUNNING
    # two instances take the dead claimer's attempt over; the blocker still holds new's CPU
    other = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    assert (await new.describe([waiting.key]))[0].state is S.QUEUED
    assert (await other.describe([waiting.key]))[0].state in {S.QUEUED, S.RUNNING}
    await new.cancel([blocker.key])
    assert (await wait_for(new, blocker.key)).state is S.CANCELLED
    assert (await wait_for(new, waiting.key)).state is S.SUCCEEDED
    assert (await wait_for(other, waiting.key)).state is S.SUCCEEDED
    assert len(launches(req)) == 1
    assert (Path(req.attempt_dir) / "count.txt").read_text() == "ran\n"


@pytest.mark.anyio
async def test_a_start_a_dead_claimer_began_is_made_again_once_no_launcher_runs(
    state_dir: Path, tmp_path: Path
) -> None:
    """Ray kills a worker's children with it: a launcher that had not yet detached from a
    killed provider actor dies before recording itself, and its attempt is started again."""
    import msgspec

    blocker, waiting = spec(argv=["sleep", "30"]), spec(script="echo ran >> count.txt")
    specs = tmp_path / "specs.json"
    specs.write_bytes(msgspec.json.encode([blocker, waiting]))
    claimer = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(state_dir), str(specs)],
        cwd=Path(__file__).resolve().parents[3],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with claimer:
        assert claimer.stdout is not None
        assert claimer.stdout.readline().split() == ["RUNNING", "QUEUED"]
        claimer.kill()
    new = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    req = plan1(new, waiting)
    attempt_dir = Path(req.attempt_dir)
    # the dead claimer had begun to start it, and its launcher still runs (it is slow)
    (attempt_dir / "launcher.log").touch()
    long_ago = time.time() - 60
    os.utime(attempt_dir / "launcher.log", (long_ago, long_ago))
    code = "import time; time.sleep(60)"
    slow = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "stowplan.providers.launcher", str(attempt_dir)]
    )
    try:
        await new.cancel([blocker.key])
        assert (await wait_for(new, blocker.key)).state is S.CANCELLED
        for _ in range(3):
            assert (await new.describe([waiting.key]))[0].state is S.QUEUED
        assert launches(req) == []
    finally:
        slow.kill()
        slow.wait(10)
    # it never recorded itself: started again, once
    assert (await wait_for(new, waiting.key)).state is S.SUCCEEDED
    assert len(launches(req)) == 1
    assert (attempt_dir / "count.txt").read_text() == "ran\n"


# -- what the task sees --------------------------------------------------------------------------

HOSTILE = [
    "it's",
    '"double"',
    "$(touch PWNED)",
    "`touch PWNED`",
    "a\nb; touch PWNED",
    "$HOME",
    "; rm -rf / #",
    "*",
]


@pytest.mark.anyio
async def test_hostile_argv_and_env_values_are_passed_literally(
    provider: LocalProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dump = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:], "
        "'env': {k: v for k, v in os.environ.items() if k.startswith('HOSTILE_')}}, "
        "open('seen.json', 'w'))"
    )
    env = {f"HOSTILE_{i}": v for i, v in enumerate(HOSTILE)}
    launch = spec(argv=["python", "-c", dump, *HOSTILE], env=env, outputs=["seen.json"])
    req = await submit1(provider, launch)
    # The rendered command, pasted into a shell, means the same argv.
    command = req.render().split(f"cd {shlex.quote(req.attempt_dir)}\n", 1)[1]
    assert shlex.split(command)[-len(req.argv) :] == req.argv
    report = await wait_for(provider, launch.key)
    assert report.state is S.SUCCEEDED, report
    seen = json.loads(Path(report.outputs["seen.json"]).read_text())
    assert seen == {"argv": HOSTILE, "env": env}
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.anyio
async def test_script_tasks_run_under_strict_bash(provider: LocalProvider) -> None:
    pipefail = spec(script="false | true\necho after")
    nounset = spec(script='echo "$STOWPLAN_SURELY_UNSET"\necho after')
    await provider.submit(provider.plan([pipefail, nounset], Facts()))
    for launch in (pipefail, nounset):
        report = await wait_for(provider, launch.key)
        assert (report.state, report.failure) == (S.FAILED, FailureClass.USER_ERROR), report
        assert b"after" not in b"".join([c async for c in provider.logs(launch.key)])


@pytest.mark.anyio
async def test_task_environment(provider: LocalProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOWPLAN_TEST_INHERITED", "from-parent")
    launch = spec(
        script='python -c "import sys; print(sys.executable)"\n'
        'echo "$PATH"\necho "$STOWPLAN_RUN_ID $STOWPLAN_ATTEMPT $STOWPLAN_ATTEMPT_DIR"\n'
        'echo "$STOWPLAN_TEST_INHERITED $MINE"\npwd -P',
        env={"MINE": "mine"},
        attempt=2,
    )
    req = await submit1(provider, launch)
    assert (await wait_for(provider, launch.key)).state is S.SUCCEEDED
    out = b"".join([c async for c in provider.logs(launch.key)]).decode().splitlines()
    exe_dir = os.path.dirname(sys.executable)
    assert os.path.dirname(out[0]) == exe_dir
    assert out[1].split(os.pathsep)[0] == exe_dir
    assert out[2] == f"{launch.run_id} 2 {req.attempt_dir}"
    assert out[3] == "from-parent mine"
    assert out[4] == str(Path(req.attempt_dir).resolve())


# -- capacity ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_at_most_the_configured_cpus_run_at_once(state_dir: Path) -> None:
    import anyio

    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    body = "import time; a = time.time(); time.sleep(0.3); print(a, time.time())"
    tasks = [spec(argv=["python", "-c", body], cpus=1.0) for _ in range(3)]
    first = await provider.submit(provider.plan(tasks, Facts()))
    assert [r.state for r in first[1:]] == [S.QUEUED, S.QUEUED]
    deadline = time.monotonic() + 20
    while True:
        # Not a count of RUNNING reports: the next task starts as soon as the one before it
        # ends, while that one's keeper, still RUNNING, writes its records. The tasks' own
        # clocks below say whether two ever ran at once.
        reports = await provider.describe([t.key for t in tasks])
        if all(r.state in TERMINAL_PROVIDER_STATES for r in reports):
            break
        assert time.monotonic() < deadline, reports
        await anyio.sleep(0.05)
    assert all(r.state is S.SUCCEEDED for r in reports), reports
    spans = []
    for t in tasks:
        text = b"".join([c async for c in provider.logs(t.key)]).decode()
        start, end = map(float, text.split())
        spans.append((start, end))
    spans.sort()
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans)), spans


@pytest.mark.anyio
async def test_a_request_bigger_than_the_machine_runs_alone(state_dir: Path) -> None:
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    huge = spec(argv=["true"], cpus=64.0)
    await provider.submit(provider.plan([huge], Facts()))
    assert (await wait_for(provider, huge.key)).state is S.SUCCEEDED


@pytest.mark.anyio
async def test_cancel_of_a_queued_request_never_starts_it(state_dir: Path) -> None:
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    blocker, queued = spec(argv=["sleep", "30"]), spec(argv=["true"])
    reqs = provider.plan([blocker, queued], Facts())
    reports = await provider.submit(reqs)
    assert reports[1].state is S.QUEUED
    await provider.cancel([queued.key])
    assert (await provider.describe([queued.key]))[0].state is S.CANCELLED
    await provider.cancel([blocker.key])
    assert (await wait_for(provider, blocker.key)).state is S.CANCELLED
    assert isinstance(reqs[1], LocalRequest)
    assert launches(reqs[1]) == []


# -- the exit table, as a pure function ---------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "state", "failure", "words"),
    [
        (ExitRecord(reason="exited", exit_code=0), S.SUCCEEDED, None, ""),
        (
            ExitRecord(reason="exited", exit_code=2),
            S.FAILED,
            FailureClass.USER_ERROR,
            "exit code 2",
        ),
        (ExitRecord(reason="timeout", timeout_s=5), S.FAILED, FailureClass.TIMEOUT, "5 s"),
        (
            ExitRecord(reason="memory", peak_rss=300 << 20, memory_limit=100 << 20),
            S.FAILED,
            FailureClass.OUT_OF_MEMORY,
            "300.0 MiB",
        ),
        (ExitRecord(reason="cancelled"), S.CANCELLED, None, "cancelled"),
        (
            ExitRecord(reason="missing_output", exit_code=0, missing=["a.csv"]),
            S.FAILED,
            FailureClass.USER_ERROR,
            "a.csv",
        ),
        (
            ExitRecord(reason="bad_output", exit_code=0, refused=["o: leads to /etc/x, outside"]),
            S.FAILED,
            FailureClass.USER_ERROR,
            "refused: o: leads to /etc/x",
        ),
        (
            ExitRecord(reason="exited", signal=int(signal.SIGKILL)),
            S.FAILED,
            FailureClass.NODE_FAILURE,
            "killed by signal 9 from outside",
        ),
        (
            ExitRecord(
                reason="exited",
                signal=int(signal.SIGKILL),
                oom_kills=0,
                kernel_oom=False,
                peak_rss=10 << 20,
                memory_limit=1 << 30,
                memory_available=8 << 30,
                memory_total=16 << 30,
            ),
            S.FAILED,
            FailureClass.NODE_FAILURE,
            "killed by signal 9 from outside (SIGKILL, not sent by stowplan; its memory cgroup "
            "counted no OOM kill; the kernel log names no OOM kill of it; it used at most "
            "10.0 MiB of its 1.0 GiB limit)",
        ),
        (
            ExitRecord(reason="exited", signal=int(signal.SIGKILL), oom_kills=1),
            S.FAILED,
            FailureClass.OUT_OF_MEMORY,
            "out-of-memory killer (its memory cgroup counted 1 OOM kill during the attempt)",
        ),
        (
            ExitRecord(reason="exited", signal=int(signal.SIGKILL), oom_kills=0, kernel_oom=True),
            S.FAILED,
            FailureClass.OUT_OF_MEMORY,
            "out-of-memory killer (the kernel log names it)",
        ),
        (
            ExitRecord(reason="exited", signal=int(signal.SIGKILL), peak_rss=95, memory_limit=100),
            S.FAILED,
            FailureClass.OUT_OF_MEMORY,
            "after using 95 B of its 100 B limit: most likely out of memory",
        ),
        (
            ExitRecord(
                reason="exited",
                signal=int(signal.SIGKILL),
                memory_available=1 << 20,
                memory_total=16 << 30,
            ),
            S.FAILED,
            FailureClass.OUT_OF_MEMORY,
            "while the machine had only 1.0 MiB of 16.0 GiB available",
        ),
        (
            ExitRecord(reason="exited", signal=int(signal.SIGTERM)),
            S.FAILED,
            FailureClass.NODE_FAILURE,
            "SIGTERM",
        ),
        (
            ExitRecord(reason="exited", signal=int(signal.SIGSEGV)),
            S.FAILED,
            FailureClass.USER_ERROR,
            "SIGSEGV",
        ),
        (
            ExitRecord(reason="launcher_error", message="disk full"),
            S.FAILED,
            FailureClass.NODE_FAILURE,
            "disk full",
        ),
        (ExitRecord(reason="exited"), S.FAILED, FailureClass.NODE_FAILURE, "neither"),
        (ExitRecord(reason="martian"), S.FAILED, FailureClass.NODE_FAILURE, "martian"),
    ],
)
def test_classify_exit_is_total(
    info: ExitRecord, state: ProviderState, failure: FailureClass | None, words: str
) -> None:
    got_state, got_failure, message = classify_exit(info, stderr_tail="")
    assert (got_state, got_failure) == (state, failure)
    assert words in message


def test_stderr_tail_keeps_whole_last_lines_within_the_limit() -> None:
    data = b"".join(b"line %d\n" % i for i in range(1000))
    tail = tail_text(data, limit=40)
    assert len(tail) <= 40 and tail.endswith("line 999")
    assert tail.splitlines()[0].startswith("line ")
    assert classify_exit(ExitRecord(reason="exited", exit_code=1), stderr_tail=tail)[2] == (
        f"exit code 1: {tail}"
    )
