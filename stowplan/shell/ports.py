"""The four ports the command shell is given: clock, placement solver, providers, run records.

An adapter supplies them. In real time (the Ray actors) the clock is the event loop's, the
solver and the providers are calls to other actors, and the records go to the store actor. In
virtual time (the simulator) the clock is the discrete-event engine, the solver is a policy
function and the providers are ``SimProvider``s whose awaitables are already complete when
returned, so the shell's coroutines finish inside the call that started them
(``stowplan.shell.clocks.run_now``).

Every method that may wait is ``async``; the shell awaits it and does nothing else with the
event loop. Nothing here imports Ray or picks an event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from stowplan.placement.problem import PlacementProblem, PlacementSolution, Pool
from stowplan.providers.base import Capabilities, Facts, LaunchSpec, ProviderRequest, Report
from stowplan.scheduler.events import SubmitItem, Transition


class Wake(enum.Enum):
    """Why the shell asks the clock for a callback. A virtual clock orders callbacks due at the
    same instant by it (the simulator's table puts the world's own changes first, then
    rediscovery, provider traffic, arrivals, the core's wake-ups); a real clock ignores it."""

    DISCOVER = "discover"
    """rediscovering a provider's pools (capacity changed, or the periodic look)"""
    REPORTS = "reports"
    """a provider's reports of one instant, delivered as one batch"""
    RETRY = "retry"
    """a provider call tried again after a transient error"""
    OBSERVE = "observe"
    """the batched describe of every outstanding key (the heartbeat)"""
    TICK = "tick"
    """the core asked to be woken (``WakeAt``)"""


class Clock(Protocol):
    """Time and concurrency, as SimPy's environment gives both: the only thing that differs
    between real and virtual time."""

    def now(self) -> float:
        """Seconds; the core sees only this."""
        ...

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any, wake: Wake) -> None:
        """Call ``fn(arg)`` at ``when`` (at once if it is past). Never calls it inside this
        call."""
        ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` concurrently with the caller. An exception it raises is the control
        plane's fatal error: the clock reports it (a virtual clock raises it at once)."""
        ...


class Solver(Protocol):
    """Placement: the chosen policy or the production placer behind an actor."""

    async def solve(self, problem: PlacementProblem) -> PlacementSolution: ...


class ProviderPort(Protocol):
    """A provider driver as the shell uses it: the contract of ``providers.base.Provider``
    (its docstrings say what each verb guarantees), minus logs. A proxy for a driver that lives
    elsewhere (a provider actor) implements exactly this."""

    @property
    def capabilities(self) -> Capabilities:
        """What the driver can do; the shell sends ``provision``/``terminate`` only with
        ``Capability.ELASTIC``."""
        ...

    async def discover(self) -> list[Pool]: ...

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]: ...

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]: ...

    async def describe(self, keys: Sequence[str]) -> list[Report]: ...

    async def cancel(self, keys: Sequence[str]) -> None: ...

    async def provision(self, pool: str, count: int, token: str) -> list[str]: ...

    async def terminate(self, pool: str, count: int, token: str) -> None: ...


class RunRecords(Protocol):
    """What is written down about runs (the store in production, the metrics in simulation).

    The shell calls these in the order things happen: a run's transitions before the intent of
    the attempt they lead to, the intent before the provider hears of the attempt, an attempt's
    reports before the core sees them."""

    def transitions(self, records: list[Transition], at: float) -> None:
        """The core moved these runs (buffered by the adapter; ordered before later calls)."""
        ...

    def decided(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        """The solver's inputs and answer, for the placement record of what it placed."""
        ...

    async def launches(
        self, provider: str, pool: str, items: Sequence[SubmitItem]
    ) -> list[LaunchSpec]:
        """What to launch for each attempt, in the order of ``items``."""
        ...

    async def intend(self, provider: str, pool: str, items: Sequence[SubmitItem]) -> None:
        """Write-ahead: when this returns, the intent to submit these attempts is durable."""
        ...

    def reported(self, provider: str, reports: list[Report]) -> Awaitable[list[Report]] | None:
        """What a provider said about attempts (states, nodes, exit codes, outputs).

        None: recorded, and the core hears ``reports`` at once. Otherwise the shell awaits the
        answer and the core hears that instead: records that must wait before the core may
        hear of a success (the store keeps a succeeded attempt's outputs first) answer with
        the reports, a success whose outputs could not be kept turned into a failure."""
        ...
