"""The provider interface: what a scheduler or cloud must implement to run stowplan's tasks.

A provider is a driver for one place where tasks run (this machine, a Slurm cluster over SSH,
a Kubernetes cluster, an AWS account). It is named in ``stowplan.toml`` and driven by one
provider actor. The lifecycle verbs, always in this order of concern:

``discover()``
    Gather facts: the pools this provider offers, their free capacity, prices, expected wait.
    May do I/O. Called at start and periodically.

``plan(launches)``
    Pure rendering. Turns ``LaunchSpec`` records into the provider's exact request
    (``*Request``: an sbatch script, a manifest, an API call). No I/O, ever: ``--dry-run``
    prints exactly what ``submit`` would send, and tests compare it with golden files.

``submit(requests)``
    Idempotent. The request carries the attempt's idempotency key; the driver maps it onto the
    provider's own de-duplication (a directory claimed with ``mkdir``, a Slurm job name and
    comment looked up before ``sbatch``, EC2's ``ClientToken``, a Kubernetes object name). A
    retried submit whose answer was lost finds the first job and reports it; it never makes a
    second one. Returns one ``Report`` per request.

``describe(keys)``
    Batched observation: one query for many keys. Returns one ``Report`` per key; a key the
    provider has never seen is reported ``UNKNOWN``, which reconciliation relies on.

``cancel(keys)``
    Idempotent: cancelling a finished or unknown job is not an error.

``logs(key, stream, follow)``
    The attempt's output as chunks of bytes; with ``follow`` until the attempt ends.

Provider-native states map to ``ProviderState`` through one total function per driver, with
``UNKNOWN`` for anything unrecognised. SDK and transport exceptions are translated once, at
the driver boundary, into ``ProviderError`` with ``retryable`` set. Heavy SDKs are imported
inside their driver module so ``import stowplan`` stays fast.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Literal, Self

from msgspec import Struct, field

from stowplan.placement.problem import Pool
from stowplan.scheduler.reports import (
    TERMINAL_PROVIDER_STATES,
    ProviderState,
    Report,
)

__all__ = [
    "TERMINAL_PROVIDER_STATES",
    "Capabilities",
    "LaunchSpec",
    "LogStream",
    "Provider",
    "ProviderRequest",
    "ProviderState",
    "Report",
]


class LaunchSpec(Struct, frozen=True, kw_only=True):
    """One attempt to run, as the control plane hands it to a provider."""

    key: str
    run_id: str
    attempt: int
    pool: str
    name: str
    argv: list[str] | None = None
    script: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 1.0
    memory: int = 1 << 30
    gpus: int = 0
    gpu_types: tuple[str, ...] = ()
    timeout_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    """Files written into the attempt's working directory before it starts."""


ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
"""What a driver accepts as an environment variable name (no trailing newline either)."""


def command_of(launch: LaunchSpec) -> list[str]:
    """The argv ``launch`` runs (a script runs under ``bash -euo pipefail -c``), after the
    checks every driver makes before it renders anything: exactly one of argv and script, a
    non-negative attempt, no NUL byte in the command or the environment, and variable names
    a shell accepts. Raises ``ValueError`` naming the first problem; drivers turn it into a
    non-retryable ``ProviderError``."""
    if launch.attempt < 0:
        raise ValueError(f"attempt number {launch.attempt} is negative")
    if launch.argv is not None and launch.script is None:
        if not launch.argv:
            raise ValueError("argv is empty")
        argv = list(launch.argv)
    elif launch.script is not None and launch.argv is None:
        argv = ["bash", "-euo", "pipefail", "-c", launch.script]
    else:
        raise ValueError("give exactly one of argv or script")
    if any("\0" in a for a in argv):
        raise ValueError("the command contains a NUL byte")
    for k, v in launch.env.items():
        if not ENV_NAME.match(k):
            raise ValueError(f"env: {k!r} is not a variable name")
        if "\0" in v:
            raise ValueError(f"env: {k} contains a NUL byte")
    return argv


class ProviderRequest(Struct, frozen=True, kw_only=True):
    """Base of every driver's rendered request. ``render()`` is what ``--dry-run`` prints."""

    key: str

    def render(self) -> str:
        raise NotImplementedError


class Capabilities(Struct, frozen=True, kw_only=True):
    """What a driver can and cannot do, each 'cannot' with the reason (shown to users)."""

    gpus: bool = False
    arrays: bool = False
    cannot: dict[str, str] = field(default_factory=dict)


LogStream = Literal["stdout", "stderr"]


class Provider(abc.ABC):
    """A driver. Instances are async context managers that close what they opened."""

    name: str
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    async def discover(self) -> list[Pool]: ...

    @abc.abstractmethod
    def plan(self, launches: Sequence[LaunchSpec]) -> list[ProviderRequest]: ...

    @abc.abstractmethod
    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]: ...

    @abc.abstractmethod
    async def describe(self, keys: Sequence[str]) -> list[Report]: ...

    @abc.abstractmethod
    async def cancel(self, keys: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Release connections and background tasks; running jobs are left alone."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
