"""The discrete-event engine: virtual time, one heap, seeded random streams.

Theory of operation
-------------------
An event is a callback and one argument scheduled at a virtual time. The heap holds
``(time, priority, sequence, callback, argument)``: events at the same time run by priority
(lower first), then in the order they were scheduled, so ties resolve the same way on every run.
``step()`` runs the next event, ``run(until)`` runs events up to and including ``until``, and
``peek()`` tells when the next event is due. There is no wall clock anywhere: ``now`` is the time
of the event being run.

Random numbers come from one stream per component (``rng("faults/node")``), each seeded from the
run's seed and the component's name, so adding draws in one component never shifts another.

A callback that raises stops the run: the error propagates with a note saying at which virtual
time and in which callback it happened (an event that fails is never silently dropped).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from typing import Any

from stowplan.errors import InternalError

Callback = Callable[[Any], None]

# priorities for events due at the same time: lower runs first
PRIO_INFRA = 0
"""node failures and repairs, site cut-offs, job completions: the world changes first"""
PRIO_PROVIDER = 10
"""provider reports delivered to the scheduler"""
PRIO_ARRIVAL = 20
"""new work submitted"""
PRIO_TICK = 30
"""the scheduler's own wake-ups"""
PRIO_SAMPLE = 40
"""observers: they see the state after everything else at that time"""


def stream_seed(seed: int, component: str) -> int:
    """A 64-bit seed for ``component``'s stream, independent of every other component's."""
    digest = hashlib.blake2b(f"{seed}:{component}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Engine:
    """A heap of timed events and the virtual clock that follows it."""

    __slots__ = ("_heap", "_rngs", "_seq", "events_run", "now", "seed", "stopped")

    def __init__(self, seed: int = 0, start: float = 0.0) -> None:
        self.seed = seed
        self.now = start
        self.events_run = 0
        self._heap: list[tuple[float, int, int, Callback, Any]] = []
        self._seq = 0
        self.stopped = False
        self._rngs: dict[str, random.Random] = {}

    def rng(self, component: str) -> random.Random:
        """The seeded random stream of ``component`` (created on first use)."""
        r = self._rngs.get(component)
        if r is None:
            r = self._rngs[component] = random.Random(stream_seed(self.seed, component))
        return r

    def at(self, time: float, callback: Callback, arg: Any = None, priority: int = 0) -> None:
        """Run ``callback(arg)`` at virtual time ``time`` (never in the past)."""
        if time < self.now:
            raise InternalError(f"event scheduled at {time} before now ({self.now})")
        self._seq += 1
        heapq.heappush(self._heap, (time, priority, self._seq, callback, arg))

    def after(self, delay: float, callback: Callback, arg: Any = None, priority: int = 0) -> None:
        self.at(self.now + max(0.0, delay), callback, arg, priority)

    def peek(self) -> float:
        """Time of the next event, or infinity when none is left."""
        return self._heap[0][0] if self._heap else float("inf")

    def stop(self) -> None:
        """Drop every event still scheduled: ``run`` returns once the current one is done."""
        self._heap.clear()
        self.stopped = True

    def __len__(self) -> int:
        return len(self._heap)

    def step(self) -> None:
        """Run the next event; raise ``IndexError`` when there is none."""
        if not self._heap:
            raise IndexError("no event left to run")
        time, _, _, callback, arg = heapq.heappop(self._heap)
        self.now = time
        self.events_run += 1
        try:
            callback(arg)
        except Exception as e:
            e.add_note(f"in simulator event {_name(callback)} at virtual time {time:.3f} s")
            raise

    def run(self, until: float | None = None) -> None:
        """Run events in order until none is left or the next one is due after ``until``.

        With ``until`` the clock ends at ``until`` even when the heap ran dry earlier (but not
        after ``stop``: the clock then stays at the last event).
        """
        heap = self._heap
        pop = heapq.heappop
        limit = float("inf") if until is None else until
        n = 0
        try:
            while heap and heap[0][0] <= limit:
                time, _, _, callback, arg = pop(heap)
                self.now = time
                n += 1
                callback(arg)
        except Exception as e:
            e.add_note(f"in simulator event {_name(callback)} at virtual time {time:.3f} s")
            raise
        finally:
            self.events_run += n
        if until is not None and self.now < until and not self.stopped:
            self.now = until


def _name(callback: Callback) -> str:
    return getattr(callback, "__qualname__", None) or repr(callback)
