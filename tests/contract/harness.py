"""Per-driver harnesses for the provider contract suite (see README.md beside this file).

A harness knows the few things the contract cannot say for every driver: how to build the
driver, which pool its launches go to, which launches end how (a quick command, a failing one,
a long-running one), how time passes (the simulator's is virtual) and how to count what the
driver created on the provider's side (jobs, processes, claims). Everything else is the
contract's, written once in ``test_contract.py``.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, cast

import anyio
import msgspec

from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    Provider,
    ProviderState,
    Report,
)

Kind = Literal["quick", "fail", "long"]
"""What a launch does: prints ``Harness.output`` and exits 0; prints to stderr and exits 3;
runs until cancelled (300 s)."""

QUICK_ARGV = ["sh", "-c", "echo contract-ok"]
FAIL_ARGV = ["sh", "-c", "echo contract-fail >&2; exit 3"]
LONG_ARGV = ["sleep", "300"]
ARGV: Mapping[Kind, list[str]] = {"quick": QUICK_ARGV, "fail": FAIL_ARGV, "long": LONG_ARGV}


P = TypeVar("P", bound=Provider)


def subclass(cls: type[P], mixin: type[Provider] | None) -> type[P]:
    """``cls`` with ``mixin`` in front of it: a wrapper subclass that injects faults (the
    mixin overrides a verb and calls ``super()``)."""
    if mixin is None:
        return cls
    return cast(type[P], type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {}))


class Harness(abc.ABC):
    """How the contract suite drives one kind of driver. Subclass it for a new driver.

    Keys are unique per harness (a random token), so tests sharing one real provider (the
    session's Slurm cluster) never see each other's attempts.
    """

    name: ClassVar[str]
    """the driver's id in test ids (``local``, ``slurm``, ...)."""
    expected: ClassVar[Mapping[Kind, ProviderState | None]]
    """the terminal state each kind of launch reaches; ``None``: it runs until cancelled."""
    timeout: ClassVar[float] = 20.0
    """real seconds any one wait may take."""
    output: ClassVar[bytes] = b"contract-ok"
    """what a quick launch writes to stdout (checked with ``Capability.LOGS``)."""
    known_bugs: ClassVar[Mapping[str, str]] = {}
    """contract test name -> the driver bug that makes it fail (marked ``xfail(strict=True)``
    for this driver until fixed)."""
    pool: str
    """the pool launches go to (an id ``discover`` returns)."""
    elastic_pool: str | None = None
    """an elastic pool ``provision`` may grow (drivers with ``Capability.ELASTIC``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = uuid.uuid4().hex[:12]

    # -- the driver ----------------------------------------------------------------------------

    @abc.abstractmethod
    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        """A driver over this harness's provider. ``state_dir`` overrides where it keeps its
        state; ``wrap`` is a mixin subclassed in front of the driver's class (``subclass``)."""

    async def facts(self, driver: Provider) -> Facts:
        return Facts.of(await driver.discover())

    # -- launches ------------------------------------------------------------------------------

    def key(self, i: int) -> str:
        return f"c{self.token}-{i}"

    def launch(self, kind: Kind, i: int, **changes: Any) -> LaunchSpec:
        """A valid launch of ``kind`` with key ``key(i)``; ``changes`` replace its fields."""
        launch = LaunchSpec(
            key=self.key(i),
            run_id=f"contract-{self.token}-{i}",
            attempt=1,
            pool=self.pool,
            name=kind,
            argv=list(ARGV[kind]),
            cpus=1.0,
            memory=64 << 20,
        )
        return msgspec.structs.replace(launch, **changes) if changes else launch

    # -- time and what was created -------------------------------------------------------------

    @abc.abstractmethod
    async def advance(self, driver: Provider) -> None:
        """Let a little time pass for ``driver``'s attempts (real or virtual)."""

    @abc.abstractmethod
    async def created(self, driver: Provider) -> int:
        """How many jobs ``driver`` made on the provider's side so far, counted so that a driver
        that submits each request once has made exactly one per request (an array, an Indexed
        Job and a single attempt count one each; a second process for one attempt counts)."""

    async def keep_advancing(self, driver: Provider) -> None:
        """Advance for ever (run it in a task group beside a ``watch``)."""
        while True:
            await self.advance(driver)

    def cleanup(self) -> None:
        """Stop whatever the tests left running."""
        return None

    # -- waiting -------------------------------------------------------------------------------

    async def wait(
        self,
        driver: Provider,
        keys: Sequence[str],
        done: Callable[[list[Report]], bool],
        what: str,
    ) -> list[Report]:
        """Describe ``keys`` until ``done`` holds of the reports, advancing between tries."""
        deadline = anyio.current_time() + self.timeout
        while True:
            reports = await driver.describe(keys)
            if done(reports):
                return reports
            if anyio.current_time() > deadline:
                raise AssertionError(
                    f"{self.name}: timed out after {self.timeout:g} s waiting for {what}: "
                    + ", ".join(f"{r.key}={r.state.value} {r.message!r}" for r in reports)
                )
            await self.advance(driver)

    async def wait_terminal(self, driver: Provider, keys: Sequence[str]) -> list[Report]:
        return await self.wait(
            driver,
            keys,
            lambda rs: all(r.state in TERMINAL_PROVIDER_STATES for r in rs),
            "terminal states",
        )

    async def wait_state(self, driver: Provider, key: str, state: ProviderState) -> Report:
        [report] = await self.wait(driver, [key], lambda rs: rs[0].state is state, state.value)
        return report
