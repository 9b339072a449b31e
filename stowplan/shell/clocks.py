"""Clocks for the command shell: the only part of the engine that differs between real and
virtual time (SimPy's ``RealtimeEnvironment`` overrides only ``step``).

``run_now`` is the whole of the virtual-time driver: in the simulator every port returns an
awaitable that is already complete, so a coroutine of the shell runs to its end in one step.
``AsyncioClock`` is real time on the running asyncio loop, for a shell hosted by an actor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from stowplan.errors import InternalError
from stowplan.shell.ports import Wake


def run_now(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end now; it must not wait on anything (every port it awaits has
    already answered). Its exception propagates to the caller."""
    try:
        work.send(None)
    except StopIteration:
        return
    work.close()
    name = getattr(work, "__qualname__", work)
    raise InternalError(
        f"{name} waited on a port in virtual time: a simulated port must answer at once "
        "(schedule the delay on the clock instead)"
    )


class AsyncioClock:
    """Wall-clock time (``time.time()``, what run records store) on the running asyncio loop.

    ``on_error`` receives what a spawned coroutine raised (the actor records it as fatal); the
    clock keeps a reference to every task until it ends, and ``aclose`` cancels those left."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_error = on_error

    def now(self) -> float:
        return time.time()

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any, wake: Wake) -> None:
        del wake  # real time orders nothing by it
        self._loop.call_later(max(0.0, when - time.time()), self._call, fn, arg)

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception as e:  # the loop would only log it: it is the control plane's
            self._on_error(e)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            err = task.exception()
            if err is not None:
                self._on_error(err)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
