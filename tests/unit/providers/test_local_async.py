"""The local driver keeps the event loop free: its file and process I/O runs in worker threads.

A slow disk is simulated without mocks: one key's index entry is a named pipe, so reading it
blocks until a thread of the test writes the entry ``SLOW_S`` later. While a batch that
contains that key is handled, a ticker on the loop records the longest gap between its
wake-ups; a driver that reads on the loop stalls it for the whole ``SLOW_S``.
"""

from __future__ import annotations

import errno
import os
import shlex
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from stowplan.providers.base import TERMINAL_PROVIDER_STATES, Facts, LaunchSpec, ProviderState
from stowplan.providers.local import LocalProvider, LocalRequest
from stowplan.spec.models import LocalProviderConfig
from tests.unit.providers.test_local import _kill_leftovers

S = ProviderState
SLOW_S = 1.5
"""How long the slow disk holds one read."""
MAX_LAG_S = SLOW_S / 2
"""The longest the loop may go without running another task: far below ``SLOW_S``, far above
a scheduling hiccup of a loaded machine."""
BATCH = 20


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / ".stowplan"
    yield d
    _kill_leftovers(d)


@pytest.fixture
def provider(state_dir: Path) -> LocalProvider:
    # One CPU: a batch starts one launcher and queues the rest.
    return LocalProvider("laptop", LocalProviderConfig(cpus=1), state_dir=state_dir)


class SlowEntry:
    """``runs/.keys/<key>`` as a named pipe that yields ``target`` ``SLOW_S`` after it is made."""

    def __init__(self, state_dir: Path, key: str, target: str) -> None:
        index = state_dir / "runs" / ".keys"
        index.mkdir(parents=True, exist_ok=True)
        self.path = index / key
        os.mkfifo(self.path)
        self.served_at: float | None = None
        self._target = target
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        time.sleep(SLOW_S)  # the slow disk
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:  # a reader must be there: without one this fails instead of blocking
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                time.sleep(0.01)
                continue
            # stamped before the write: the reader may have the line (and its call return)
            # before this thread runs again after closing the pipe
            self.served_at = time.monotonic()
            with os.fdopen(fd, "w") as f:
                f.write(self._target + "\n")
            return

    def join(self) -> None:
        self._thread.join(timeout=35)


async def lag_during(call: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """Run ``call`` while a ticker runs; (the longest gap between ticks, when the call ended)."""
    worst = 0.0
    done = anyio.Event()

    async def tick() -> None:
        nonlocal worst
        last = time.monotonic()
        while not done.is_set():
            await anyio.sleep(0.005)
            now = time.monotonic()
            worst = max(worst, now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await anyio.sleep(0)  # the ticker has started
        await call()
        ended = time.monotonic()
        done.set()
    return worst, ended


def spec(n: int, **kw: object) -> LaunchSpec:
    fields: dict[str, object] = {
        "key": f"key-{n}",
        "run_id": f"run{n}",
        "attempt": 0,
        "pool": "local",
        "name": "t",
        "argv": ["true"],
        "memory": 16 << 20,
    }
    fields.update(kw)
    return LaunchSpec(**fields)  # type: ignore[arg-type]


def check_free(worst: float, ended: float, slow: SlowEntry) -> None:
    assert slow.served_at is not None, "the slow entry was never read"
    assert ended >= slow.served_at, "the call did not wait for the slow entry"
    assert worst < MAX_LAG_S, f"the event loop was blocked for {worst:.2f} s"


@pytest.mark.anyio
async def test_submit_of_a_batch_leaves_the_loop_free(
    provider: LocalProvider, state_dir: Path
) -> None:
    reqs = provider.plan([spec(n) for n in range(BATCH)], Facts())
    assert isinstance(reqs[-1], LocalRequest)
    slow = SlowEntry(state_dir, reqs[-1].key, f"run{BATCH - 1}/0")
    reports: list[object] = []

    async def call() -> None:
        reports.extend(await provider.submit(reqs))

    worst, ended = await lag_during(call)
    slow.join()
    check_free(worst, ended, slow)
    assert len(reports) == BATCH
    keys = [r.key for r in reqs]
    assert {r.state for r in await provider.describe(keys)} <= {S.QUEUED, S.RUNNING, S.SUCCEEDED}
    await provider.cancel(keys)
    deadline = time.monotonic() + 15
    while not all(r.state in TERMINAL_PROVIDER_STATES for r in await provider.describe(keys)):
        assert time.monotonic() < deadline, "the batch never ended"
        await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["describe", "cancel", "logs"])
async def test_calls_over_a_batch_leave_the_loop_free(
    provider: LocalProvider, state_dir: Path, method: str
) -> None:
    keys = [f"key-{n}" for n in range(BATCH)]
    slow = SlowEntry(state_dir, "slow", "never-claimed/0")
    reports: list[object] = []

    async def call() -> None:
        if method == "describe":
            reports.extend(await provider.describe([*keys, "slow"]))
        elif method == "cancel":
            await provider.cancel([*keys, "slow"])
        else:
            reports.extend([chunk async for chunk in provider.logs("slow")])

    worst, ended = await lag_during(call)
    slow.join()
    check_free(worst, ended, slow)
    if method == "describe":
        assert [r.state for r in reports] == [S.UNKNOWN] * (BATCH + 1)  # type: ignore[attr-defined]
    if method == "logs":
        assert reports == []


@pytest.mark.anyio
async def test_interleaved_calls_start_each_attempt_once_within_capacity(
    provider: LocalProvider, state_dir: Path
) -> None:
    """Calls overlap on the loop (the provider actor submits while it watches): each attempt
    still starts once, and one CPU still runs one attempt at a time."""
    guard = shlex.quote(str(state_dir / "one-at-a-time"))
    script = (
        f"mkdir {guard} || exit 3; echo ran >> count.txt; "
        f"sleep 0.2; rmdir {guard}"  # the task's work: overlapping attempts would collide
    )
    reqs = provider.plan([spec(100 + n, argv=None, script=script) for n in range(6)], Facts())
    keys = [r.key for r in reqs]
    deadline = time.monotonic() + 60
    ended: list[bool] = []

    async def watch() -> None:
        while not all(r.state in TERMINAL_PROVIDER_STATES for r in await provider.describe(keys)):
            assert time.monotonic() < deadline, "the batch never ended"
            await anyio.sleep(0.01)
        ended.append(True)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(provider.submit, reqs)
            tg.start_soon(provider.submit, reqs[::-1])
        tg.start_soon(watch)
        tg.start_soon(watch)
    assert ended == [True, True]
    reports = await provider.describe(keys)
    assert [(r.state, r.exit_code) for r in reports] == [(S.SUCCEEDED, 0)] * len(keys), reports
    for req in reqs:
        assert isinstance(req, LocalRequest)
        assert (Path(req.attempt_dir) / "count.txt").read_text() == "ran\n"


ABANDONED_LOOP = """
import asyncio, sys, threading
from stowplan.providers.local import LocalProvider
from stowplan.spec.models import LocalProviderConfig

provider = LocalProvider("laptop", LocalProviderConfig(), state_dir=sys.argv[1])
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever).start()
discovered = threading.Event()


async def follow():  # a long-lived task, like the provider actor's watch loop
    await provider.describe(["0" * 32])
    discovered.set()
    await asyncio.Event().wait()


asyncio.run_coroutine_threadsafe(follow(), loop)
assert discovered.wait(timeout=60)
print("discovered", flush=True)
# The loop stops with its task still pending, never closed: as a Ray actor's loop does when the
# actor exits because its raylet died.
loop.call_soon_threadsafe(loop.stop)
"""


def test_an_abandoned_loop_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """A process whose event loop is left running (a Ray actor told to exit when its raylet
    dies) must still exit: the driver's worker threads may not hold it at interpreter exit."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", ABANDONED_LOOP, str(tmp_path / ".stowplan")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the process did not exit: a worker thread of the driver holds it")
    assert proc.returncode == 0
    assert "discovered" in out
