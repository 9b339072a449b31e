"""The long-lived local supervisor against real processes: it starts each attempt once, is
found again and started again after it dies, and its death loses and repeats nothing."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import cast

import anyio
import psutil
import pytest

from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    ProviderState,
    Report,
    WatchSet,
)
from stowplan.providers.local import LocalProvider, LocalRequest
from stowplan.providers.local.supervisor import (
    IDLE_EXIT_S,
    SUPERVISOR_DIR,
    SupervisorClient,
    _create_time,
    keeper_runs,
    socket_name,
    supported,
)
from stowplan.spec.models import LocalProviderConfig
from tests.unit.providers.test_local import _kill_leftovers, launches, spec, wait_for

S = ProviderState
pytestmark = pytest.mark.skipif(not supported(), reason="the supervisor is Linux only")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / ".stowplan"
    yield d
    _kill_leftovers(d)
    pid = _supervisor_pid(d)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def _supervisor_pid(state_dir: Path) -> int | None:
    """The supervisor of ``state_dir``'s runs, if it lives."""
    try:
        rec = json.loads((state_dir / "runs" / SUPERVISOR_DIR / "pid").read_text())
        proc = psutil.Process(rec["pid"])
        if (
            proc.status() != psutil.STATUS_ZOMBIE
            and abs(proc.create_time() - rec["create_time"]) < 0.05
        ):
            return int(rec["pid"])
    except (FileNotFoundError, psutil.Error):
        pass
    return None


def _listening(state_dir: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(socket_name(state_dir / "runs"))
        except OSError:
            return False
    return True


async def _poll(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_attempts_start_without_a_launcher_process_each(state_dir: Path) -> None:
    """Every attempt is kept by a fork of the one supervisor: no ``python -m`` per attempt."""
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    tasks = [spec(argv=["true"]) for _ in range(6)]
    await provider.submit(provider.plan(tasks, Facts()))
    for t in tasks:
        assert (await wait_for(provider, t.key)).state is S.SUCCEEDED
    sup = _supervisor_pid(state_dir)
    assert sup is not None
    assert provider.supervisor is not None and provider.supervisor.spawned == 1
    keepers = set()
    for t in tasks:
        [req] = provider.plan([t], Facts())
        assert isinstance(req, LocalRequest)
        assert len(launches(req)) == 1
        rec = json.loads((Path(req.attempt_dir) / "launcher.json").read_text())
        keepers.add(rec["pid"])
        assert rec["pid"] != sup
    assert len(keepers) == len(tasks)


@pytest.mark.anyio
async def test_killing_the_supervisor_mid_sweep_runs_every_trial_exactly_once(
    state_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "executions.log"
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    tasks = [
        spec(script='sleep 0.3; echo "$STOWPLAN_RUN_ID" >> "$MARKER"', env={"MARKER": str(marker)})
        for _ in range(12)
    ]
    keys = [t.key for t in tasks]
    await provider.submit(provider.plan(tasks, Facts()))

    async def succeeded() -> int:
        return sum(r.state is S.SUCCEEDED for r in await provider.describe(keys))

    deadline = time.monotonic() + 30
    while await succeeded() < 3:
        assert time.monotonic() < deadline, "3 successes before the kill"
        await anyio.sleep(0.02)
    first = _supervisor_pid(state_dir)
    assert first is not None
    assert await succeeded() < len(tasks), "the sweep finished before the kill"
    os.kill(first, signal.SIGKILL)

    deadline = time.monotonic() + 60
    while True:
        reports = await provider.describe(keys)
        if all(r.state in TERMINAL_PROVIDER_STATES for r in reports):
            break
        assert time.monotonic() < deadline, reports
        await anyio.sleep(0.05)
    assert [r.state for r in reports] == [S.SUCCEEDED] * len(tasks), reports
    executed = Counter(marker.read_text().split())
    assert executed == Counter({t.run_id: 1 for t in tasks})
    for t in tasks:
        [req] = provider.plan([t], Facts())
        assert isinstance(req, LocalRequest)
        assert len(launches(req)) == 1, req.attempt_dir
    # found dead, and started again (once) by the same driver
    assert provider.supervisor is not None and provider.supervisor.spawned == 2
    second = _supervisor_pid(state_dir)
    assert second is not None and second != first


@pytest.mark.anyio
async def test_a_start_sent_twice_is_kept_once(state_dir: Path) -> None:
    """Two starts of one attempt (a driver sending again after the supervisor died, two
    drivers) make one keeper: the keeper's lock is held for its whole life."""
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    launch = spec(script="echo ran >> count.txt; sleep 0.5")
    [req] = provider.plan([launch], Facts())
    assert isinstance(req, LocalRequest)
    await provider.submit([req])
    attempt_dir = Path(req.attempt_dir)
    await _poll(lambda: keeper_runs(attempt_dir), 10, "the keeper")
    other = SupervisorClient(
        state_dir / "runs",
        import_root=Path(__file__).resolve().parents[3],
        on_done=provider._on_done,
        on_lost=provider._on_lost,
    )
    try:
        assert other.start(attempt_dir) and other.start(attempt_dir)
        assert (await wait_for(provider, launch.key)).state is S.SUCCEEDED
        # started again after it ended: exit.json is there, nothing starts
        assert other.start(attempt_dir)
    finally:
        other.close()
    # the keeper lets go of its lock as its process exits, just after exit.json is there; a
    # keeper started by the last start would write a second line before it let go
    await _poll(lambda: not keeper_runs(attempt_dir), 10, "the keeper to exit")
    assert len(launches(req)) == 1
    assert (attempt_dir / "count.txt").read_text() == "ran\n"
    assert other.spawned == 0


@pytest.mark.anyio
async def test_the_supervisor_ends_once_idle(state_dir: Path) -> None:
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    launch = spec(argv=["true"])
    await provider.submit(provider.plan([launch], Facts()))
    assert (await wait_for(provider, launch.key)).state is S.SUCCEEDED
    pid = _supervisor_pid(state_dir)
    assert pid is not None
    await provider.aclose()
    await _poll(
        lambda: _supervisor_pid(state_dir) is None and not _listening(state_dir),
        IDLE_EXIT_S + 10,
        "the idle supervisor to end",
    )


# -- starts handed ahead -------------------------------------------------------------------------


def _intervals(log: Path) -> list[tuple[int, int]]:
    """(start, end) in ns of each task that wrote ``start <ns>`` and ``end <ns>`` lines."""
    starts: dict[str, int] = {}
    out = []
    for line in log.read_text().splitlines():
        what, run, ns = line.split()
        if what == "start":
            starts[run] = int(ns)
        else:
            out.append((starts[run], int(ns)))
    return sorted(out)


@pytest.mark.anyio
async def test_the_supervisor_starts_what_was_handed_ahead_without_the_driver(
    state_dir: Path, tmp_path: Path
) -> None:
    """A keeper that ends starts the next attempt at once, even while the driver cannot act
    (here: its state is locked), and one at a time on a one-CPU machine."""
    log = tmp_path / "tasks.log"
    line = 'echo "{0} $STOWPLAN_RUN_ID $(date +%s%N)" >> "$LOG"'
    script = "; ".join([line.format("start"), "sleep 0.05", line.format("end")])
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    tasks = [spec(script=script, env={"LOG": str(log)}) for _ in range(4)]
    reqs = provider.plan(tasks, Facts())
    await provider.submit(reqs)
    dirs = [Path(r.attempt_dir) for r in reqs if isinstance(r, LocalRequest)]
    with provider._state_lock:  # the driver's reader thread waits here on every "done"
        await _poll(
            lambda: all((d / "exit.json").exists() for d in dirs), 20, "every attempt to end"
        )
    for t in tasks:
        assert (await wait_for(provider, t.key)).state is S.SUCCEEDED
    spans = _intervals(log)
    assert len(spans) == len(tasks)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    assert all(len(launches(r)) == 1 for r in reqs if isinstance(r, LocalRequest))


@pytest.mark.anyio
async def test_an_attempt_handed_ahead_is_queued_however_long_it_waits(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It holds no place of its own while its predecessor runs: never taken for LOST."""
    from stowplan.providers.local import driver

    monkeypatch.setattr(driver, "QUEUED_GRACE_S", 0.3)
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    blocker, after = spec(argv=["sleep", "1.5"]), spec(argv=["true"])
    await provider.submit(provider.plan([blocker, after], Facts()))
    assert (await wait_for(provider, blocker.key, frozenset({S.RUNNING}))).state is S.RUNNING
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        [report] = await provider.describe([after.key])
        assert report.state is S.QUEUED, report
        await anyio.sleep(0.05)
    assert (await wait_for(provider, blocker.key)).state is S.SUCCEEDED
    assert (await wait_for(provider, after.key)).state is S.SUCCEEDED


@pytest.mark.anyio
async def test_cancelling_an_attempt_handed_ahead_starts_nothing_and_the_next_runs(
    state_dir: Path,
) -> None:
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    blocker, cancelled, last = spec(argv=["sleep", "30"]), spec(argv=["true"]), spec(argv=["true"])
    reqs = provider.plan([blocker, cancelled, last], Facts())
    await provider.submit(reqs)
    assert (await wait_for(provider, blocker.key, frozenset({S.RUNNING}))).state is S.RUNNING
    assert [r.state for r in await provider.describe([cancelled.key, last.key])] == [
        S.QUEUED,
        S.QUEUED,
    ]
    await provider.cancel([cancelled.key])
    assert (await wait_for(provider, cancelled.key)).state is S.CANCELLED
    [report] = await provider.describe([last.key])
    assert report.state is S.QUEUED, "it waits for the blocker, not for the cancelled one"
    await provider.cancel([blocker.key])
    assert (await wait_for(provider, blocker.key)).state is S.CANCELLED
    assert (await wait_for(provider, last.key)).state is S.SUCCEEDED
    assert isinstance(reqs[1], LocalRequest)
    assert launches(reqs[1]) == []


# -- the keeper's start of the task ---------------------------------------------------------------


def test_create_time_is_psutil_s_without_psutil() -> None:
    """The keeper records its task's start time with one read of ``/proc``: the very value
    ``psutil`` gives, so ``same_process`` still tells the task from a reuse of its pid."""
    child = subprocess.Popen(["sleep", "5"])
    try:
        for pid in (os.getpid(), child.pid):
            assert _create_time(pid) == pytest.approx(psutil.Process(pid).create_time(), abs=1e-6)
    finally:
        child.kill()
        child.wait()
    assert _create_time(child.pid) is None


@pytest.mark.anyio
async def test_the_task_is_found_on_its_own_path_not_the_keeper_s(
    state_dir: Path, tmp_path: Path
) -> None:
    """The command is looked up on the task's PATH (its ``env``), as ``subprocess`` did; a
    name found there that may not run is exit code 126, one found nowhere 127."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "stowplan-tool").write_text("#!/bin/sh\necho from-the-tool\n")
    (tools / "stowplan-tool").chmod(0o755)
    (tools / "stowplan-nox").write_text("#!/bin/sh\necho never\n")
    (tools / "stowplan-nox").chmod(0o644)
    path = f"{tools}{os.pathsep}{os.environ['PATH']}"
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    found, nox, nowhere = (
        spec(argv=[name], env={"PATH": path})
        for name in ("stowplan-tool", "stowplan-nox", "stowplan-nowhere")
    )
    reqs = provider.plan([found, nox, nowhere], Facts())
    await provider.submit(reqs)
    assert (await wait_for(provider, found.key)).state is S.SUCCEEDED
    assert isinstance(reqs[0], LocalRequest)
    assert (Path(reqs[0].attempt_dir) / "stdout.log").read_text() == "from-the-tool\n"
    assert (await wait_for(provider, nox.key)).exit_code == 126
    assert (await wait_for(provider, nowhere.key)).exit_code == 127


@pytest.mark.anyio
async def test_the_task_starts_with_default_signal_handling(state_dir: Path) -> None:
    """Python ignores SIGPIPE; the task must not inherit that (``subprocess`` restored it):
    ``producer | head`` would otherwise run its producer to the end."""
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    task = spec(argv=["grep", "^SigIgn:", "/proc/self/status"])
    [req] = provider.plan([task], Facts())
    await provider.submit([req])
    assert (await wait_for(provider, task.key)).state is S.SUCCEEDED
    assert isinstance(req, LocalRequest)
    ignored = int((Path(req.attempt_dir) / "stdout.log").read_text().split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"the task ignores {sig.name}"


@pytest.mark.anyio
async def test_the_task_inherits_no_descriptor_but_its_three_streams(state_dir: Path) -> None:
    """Nothing of the keeper's leaks into the task (``subprocess`` closed every other
    descriptor): a task holding the keeper's lock (its attempt directory, open) would keep
    its attempt "kept" after it."""
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    task = spec(argv=["ls", "/proc/self/fd"])
    [req] = provider.plan([task], Facts())
    await provider.submit([req])
    assert (await wait_for(provider, task.key)).state is S.SUCCEEDED
    assert isinstance(req, LocalRequest)
    fds = {int(fd) for fd in (Path(req.attempt_dir) / "stdout.log").read_text().split()}
    assert fds == {0, 1, 2, 3}, fds  # 3: the directory ls reads


# -- what an attempt costs -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_supervisor_loads_neither_the_spec_models_nor_the_driver(
    state_dir: Path,
) -> None:
    """Keepers are forks of the supervisor, and a smaller process forks faster: it imports
    the launcher and itself, not the packages' ``__init__`` (the spec models, the driver,
    msgspec and pydantic, whose compiled modules would show in its memory map)."""
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    task = spec(argv=["true"])
    await provider.submit(provider.plan([task], Facts()))
    assert (await wait_for(provider, task.key)).state is S.SUCCEEDED
    pid = _supervisor_pid(state_dir)
    assert pid is not None
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "psutil" in maps  # the map shows what the supervisor did load
    for heavy in ("msgspec", "pydantic_core", "yaml"):
        assert heavy not in maps, f"the supervisor loaded {heavy}"


@pytest.mark.anyio
async def test_a_keeper_makes_no_file_but_the_attempts_records(state_dir: Path) -> None:
    """Each file made costs a short attempt as much as a fork on some file systems: the
    keeper's lock is its attempt directory, not a file of its own."""
    provider = LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    task = spec(argv=["true"])
    [req] = provider.plan([task], Facts())
    await provider.submit([req])
    assert (await wait_for(provider, task.key)).state is S.SUCCEEDED
    assert isinstance(req, LocalRequest)
    names = {p.name for p in Path(req.attempt_dir).iterdir()}
    assert names == {
        "spec.json",
        "launcher.log",
        "launches",
        "launcher.json",
        "stdout.log",
        "stderr.log",
        "exit.json",
    }


class _CountingProvider(LocalProvider):
    """Records, for each describe, how many keys it was asked about and how many its watch
    followed then."""

    asked: list[tuple[int, int]]
    following: WatchSet

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        self.asked.append((len(keys), len(self.following)))
        return await super().describe(keys)


@pytest.mark.anyio
async def test_a_watch_woken_by_an_end_describes_what_changed_not_every_key(
    state_dir: Path,
) -> None:
    """A sweep keeps tens of keys queued here, and a short trial ends every few
    milliseconds: a watch woken by an end asks about the keys that ended and those started
    in their place, and about every key only at the poll's cadence; it misses no end."""
    provider = _CountingProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)
    provider.asked = []
    # a tenth of a second each, one at a time: ends come apart, so wake-ups see few of them
    # however loaded the machine is (with ``true`` a loaded machine saw them all at once)
    tasks = [spec(argv=["sleep", "0.1"]) for _ in range(30)]
    await provider.submit(provider.plan(tasks, Facts()))
    keys = WatchSet([t.key for t in tasks])
    provider.following = keys
    heard: dict[str, ProviderState] = {}
    with anyio.fail_after(30):
        watch = cast(AsyncGenerator[list[Report], None], provider.watch(keys))
        async with aclosing(watch) as batches:
            async for batch in batches:
                heard.update((r.key, r.state) for r in batch)
                if not len(keys):
                    break
    assert heard == {t.key: S.SUCCEEDED for t in tasks}
    # asking about every key it follows at each wake-up would give asked == followed each
    # time; how far below it depends on how many ends one wake-up sees (load), so no margin
    assert any(asked < followed for asked, followed in provider.asked), provider.asked


@pytest.mark.anyio
async def test_a_keeper_from_before_the_directory_lock_is_still_found(state_dir: Path) -> None:
    """A keeper started by an older supervisor holds ``keeper.lock``, not the directory: a
    start sent again after an upgrade must find it and start nothing."""
    import fcntl

    from stowplan.providers.local.attempts import claim, current_claim, has_ended
    from stowplan.providers.local.supervisor import LEGACY_LOCK

    provider = LocalProvider("laptop", LocalProviderConfig(cpus=2), state_dir=state_dir)
    old, new = spec(script="echo ran >> count.txt"), spec(argv=["true"])
    [old_req, new_req] = provider.plan([old, new], Facts())
    assert isinstance(old_req, LocalRequest) and isinstance(new_req, LocalRequest)
    me = current_claim()
    assert claim(old_req, me, provider="laptop") and claim(new_req, me, provider="laptop")
    old_dir, new_dir = Path(old_req.attempt_dir), Path(new_req.attempt_dir)
    client = SupervisorClient(
        state_dir / "runs",
        import_root=Path(__file__).resolve().parents[3],
        on_done=provider._on_done,
        on_lost=provider._on_lost,
    )
    fd = os.open(old_dir / LEGACY_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the old keeper held it for its whole life
        assert keeper_runs(old_dir)
        assert client.start(old_dir) and client.start(new_dir)
        # the supervisor takes one connection's starts in order: once the second has ended,
        # the first was judged
        await _poll(lambda: has_ended(new_dir), 10, "the second attempt")
        assert launches(old_req) == [] and not (old_dir / "count.txt").exists()
        assert not (old_dir / "launcher.json").exists()
    finally:
        os.close(fd)
        client.close()
    assert not keeper_runs(old_dir)
