"""The provider contract (v2): what a scheduler or cloud must implement to run stowplan's tasks.

A provider is a driver for one place where tasks run (this machine, a Slurm cluster over SSH,
a Kubernetes cluster, an AWS account). It is named in ``stowplan.toml``, driven by one provider
actor in real time and by the simulator's ``SimProvider`` in virtual time, and checked by the
contract suite in ``tests/contract/`` (every driver passes the same tests).

The verbs, each documented on its method below with the order of its reports, the errors that
may escape it, whether calls may interleave, and its timeouts:

- ``discover()``: the pools and what is known about them (``Facts``). May do I/O.
- ``plan(launches, facts)``: pure rendering into the provider's exact requests, given the facts
  of a discovery. ``--dry-run`` prints what ``submit`` sends: the same function, the same facts.
- ``submit(requests)``: idempotent by key.
- ``describe(keys)``: one batched query for many keys.
- ``watch(keys)``: the reports of keys as they change; batched polling of ``describe`` unless the
  driver has a native watch.
- ``cancel(keys)``: idempotent.
- ``provision(pool, count, token)`` / ``terminate(pool, instances, token)``: elastic capacity,
  for drivers with ``Capability.ELASTIC``.
- ``logs(key, stream, follow)``.

Keys and names
--------------
Every attempt has an idempotency key (``spec.canonical.attempt_key``): at most ``KEY_MAX``
characters of ``[0-9a-z-]``, so it fits every provider's limits as it is (a Kubernetes label
value holds 63 characters, an EC2 ``ClientToken`` 64, a Slurm job name 200). A request may carry
many attempts (a job array, an Indexed Job, a Batch array job): ``ProviderRequest.keys``. The
provider-side name of a request is a function of its keys alone (``request_name``), so "that
name already exists" means "this request was already submitted", and a retried submit finds it.

Errors
------
Provider-native states map to ``ProviderState`` through one total function per driver, with
``UNKNOWN`` for anything unrecognised. SDK and transport exceptions are translated once, at the
driver boundary, into ``ProviderError`` with ``retryable`` set: retryable means the same call
with the same keys may succeed later (throttled, unreachable, an answer lost). A driver does NOT
retry on its own beyond one connection attempt: the command shell owns the one backoff layer
(``stowplan.shell``) and retries with the same keys. Heavy SDKs are imported inside their driver
module so ``import stowplan`` stays fast.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import hashlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Literal, Self

from msgspec import Struct, field

from stowplan.errors import ProviderError
from stowplan.placement.leases import DeviceLease
from stowplan.placement.problem import Pool
from stowplan.scheduler.reports import (
    TERMINAL_PROVIDER_STATES,
    ProviderState,
    Report,
)

__all__ = [
    "KEY_MAX",
    "TERMINAL_PROVIDER_STATES",
    "Capabilities",
    "Capability",
    "Facts",
    "LaunchSpec",
    "LogStream",
    "Provider",
    "ProviderRequest",
    "ProviderState",
    "Report",
    "SecretRef",
    "SingleRequest",
    "WatchSet",
    "command_of",
    "request_name",
]

KEY_MAX = 63
"""The longest idempotency key or request name a driver must accept (a Kubernetes label value,
and a DNS label, hold 63 characters)."""
KEY_PATTERN = re.compile(r"\A[0-9a-z]([-0-9a-z]{0,61}[0-9a-z])?\Z")
"""What a key and a request name look like: a DNS-1123 label, which every provider accepts as a
name, a label value, a token or a file name."""


def request_name(keys: Sequence[str], prefix: str = "sp") -> str:
    """The provider-side name of a request carrying ``keys``: a function of the keys alone (their
    order ignored), at most ``KEY_MAX`` characters. One key: ``prefix-key``; several (or one too
    long for that): ``prefix-`` and 24 hex characters of the hash of the sorted keys."""
    if not keys:
        raise ValueError("a request carries at least one key")
    name = (f"{prefix}-{keys[0]}" if prefix else keys[0]) if len(keys) == 1 else ""
    if not name or len(name) > KEY_MAX:  # several keys, or one too long (made before 0.2)
        digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]
        name = f"{prefix}-{digest}" if prefix else digest
    if len(name) > KEY_MAX or not KEY_PATTERN.match(name):
        raise ValueError(
            f"request name {name!r} is not a DNS label of at most {KEY_MAX} characters"
        )
    return name


class Capability(enum.Enum):
    """What a driver can do. The control plane consults these; a driver lacking one says why
    in ``Capabilities.why_not`` (shown to users)."""

    GPUS = "gpus"
    """it can give an attempt GPUs"""
    ARRAYS = "arrays"
    """one request carries many attempts (a job array, an Indexed Job)"""
    CANCEL_MEMBER = "cancel_member"
    """one attempt of a multi-attempt request can be cancelled alone"""
    LOGS = "logs"
    """``logs()`` returns the attempt's output"""
    CONTAINERS = "containers"
    """it runs ``LaunchSpec.image``; without it, a task that names an image is refused"""
    SECRETS = "secrets"
    """it resolves ``LaunchSpec.secrets`` at submit; without it, a task naming one is refused"""
    ELASTIC = "elastic"
    """``provision``/``terminate`` start and stop instances of its elastic pools"""
    NATIVE_WATCH = "native_watch"
    """``watch()`` is pushed by the provider, not polled"""
    RUNS = "runs"
    """it really runs the command (the instant provider does not)"""
    OUTPUTS = "outputs"
    """declared outputs come back to the store; without it, a task declaring outputs is
    refused (a Kubernetes provider without ``bucket``: they are lost with the pod)"""


class Capabilities(Struct, frozen=True, kw_only=True):
    """What a driver can do, and why not where it cannot."""

    has: frozenset[Capability] = frozenset()
    why_not: Mapping[Capability, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """other limits a user should know of (shown by ``stowplan providers``)."""

    def __contains__(self, cap: object) -> bool:
        return cap in self.has

    def reason(self, cap: Capability) -> str:
        """Why ``cap`` is missing (a sentence); empty when it is not."""
        if cap in self.has:
            return ""
        return self.why_not.get(cap, f"the driver does not support {cap.value}")


class SecretRef(Struct, frozen=True, kw_only=True):
    """A secret by name, resolved only by the driver at submit time (a Kubernetes Secret, an
    AWS Secrets Manager ARN, an environment variable of the control plane for local runs). A
    rendered request and ``--dry-run`` show the reference, never the value."""

    name: str
    key: str | None = None
    """the entry within the secret, where the store holds several."""

    def render(self) -> str:
        return f"secret:{self.name}" + (f"#{self.key}" if self.key else "")


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
    gpu_milli: int = 1000
    """thousandths of each GPU it takes: below 1000, a share of one device (``gpus`` is 1),
    which a provider that shares devices runs beside other shares on its leased device."""
    nodes: int = 1
    """a gang: the attempt spans this many nodes, each with an equal part of ``cpus``,
    ``memory`` and ``gpus`` (which are totals); the command runs once, on the first node."""
    timeout_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    """Files written into the attempt's working directory before it starts."""
    image: str | None = None
    """the container image to run in (the task's, else the provider's default)."""
    code: str | None = None
    """the code bundle: the content-addressed snapshot of the working tree that the run's
    provenance records (``code:<version>``), for drivers that ship code to remote machines."""
    secrets: dict[str, SecretRef] = field(default_factory=dict)
    """environment variable -> secret reference; resolved by the driver, never stored."""
    lease: DeviceLease | None = None
    """the node and device indices the core placed it on, for pools that describe their
    devices (``Pool.devices``): the local provider exports them as ``CUDA_VISIBLE_DEVICES``."""


class Facts(Struct, frozen=True, kw_only=True):
    """What a discovery found, as ``plan`` needs it: the pools (with their GPU types, partitions
    and shapes) and driver-specific facts (say, the images a registry has)."""

    pools: tuple[Pool, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, pools: Sequence[Pool], **extra: str) -> Facts:
        return cls(pools=tuple(pools), extra=dict(extra))

    def pool(self, pool_id: str) -> Pool | None:
        return next((p for p in self.pools if p.id == pool_id), None)

    def gpu_types(self, pool_id: str) -> tuple[str, ...]:
        """The GPU types ``pool_id`` has, sorted; empty when unknown."""
        p = self.pool(pool_id)
        return tuple(sorted(p.gpus)) if p is not None else ()


ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
"""What a driver accepts as an environment variable name (no trailing newline either)."""


def command_of(launch: LaunchSpec) -> list[str]:
    """The argv ``launch`` runs (a script runs under ``bash -euo pipefail -c``), after the
    checks every driver makes before it renders anything: exactly one of argv and script, a
    non-negative attempt, a key a provider accepts, no NUL byte in the command or the
    environment, and variable names a shell accepts. Raises ``ValueError`` naming the first
    problem; drivers turn it into a non-retryable ``ProviderError``."""
    if launch.attempt < 0:
        raise ValueError(f"attempt number {launch.attempt} is negative")
    if not KEY_PATTERN.match(launch.key):
        raise ValueError(f"the idempotency key is not a DNS label of at most {KEY_MAX} characters")
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
    for k in launch.secrets:
        if not ENV_NAME.match(k):
            raise ValueError(f"secrets: {k!r} is not a variable name")
        if k in launch.env:
            raise ValueError(f"secrets: {k} is also set in env")
    return argv


class ProviderRequest(Struct, frozen=True, kw_only=True):
    """Base of every driver's rendered request: the attempts it carries (``keys``, in the order
    the driver reports them) and its provider-side name, a function of the keys alone
    (``request_name``). ``render()`` is what ``--dry-run`` prints: the exact request, secrets
    as references."""

    keys: tuple[str, ...]
    name: str

    def render(self) -> str:
        raise NotImplementedError


class SingleRequest(ProviderRequest, frozen=True, kw_only=True):
    """A request that carries exactly one attempt."""

    @property
    def key(self) -> str:
        return self.keys[0]


class WatchSet:
    """The keys a ``watch`` follows. The caller adds keys as it submits or finds them and
    discards keys it gives up on; the watch drops a key once it reported it terminal."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._last: dict[str, tuple[ProviderState, float]] = {}
        self._added = asyncio.Event()
        self.failures = 0
        """describes that failed (each retried at the next poll)."""
        self.add(keys)

    def add(self, keys: Sequence[str], state: ProviderState = ProviderState.UNKNOWN) -> None:
        """Follow ``keys`` from now on (their last known state: ``state``)."""
        last = self._last
        for k in keys:
            if k not in last or state is not ProviderState.UNKNOWN:
                last[k] = (state, 0.0)
        if keys:
            self._added.set()

    def discard(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._last.pop(k, None)

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, key: object) -> bool:
        return key in self._last

    def keys(self) -> list[str]:
        return list(self._last)

    async def wait_added(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for keys to be added; True if they were."""
        try:
            await asyncio.wait_for(self._added.wait(), timeout)
        except TimeoutError:
            return False
        self._added.clear()
        return True

    def news(self, reports: Sequence[Report], now: float, renew_every: float) -> list[Report]:
        """Of ``reports``, those a caller must hear: a changed state, or an unchanged one not
        said for ``renew_every`` seconds (it renews the core's lease). A key not visible yet
        (UNKNOWN after a known state) is held back: the lease decides whether it is lost.
        Terminal keys are dropped from the set."""
        out: list[Report] = []
        last = self._last
        for r in reports:
            prev = last.get(r.key)
            if prev is None:
                continue
            if r.state is ProviderState.UNKNOWN and prev[0] is not ProviderState.UNKNOWN:
                continue
            if r.state is not prev[0] or now - prev[1] >= renew_every:
                out.append(r)
                last[r.key] = (r.state, now)
            if r.state in TERMINAL_PROVIDER_STATES:
                del last[r.key]
        return out


LogStream = Literal["stdout", "stderr"]


class Provider(abc.ABC):
    """A driver. Instances are async context managers that close what they opened.

    Concurrency: one provider actor (or one ``SimProvider``) owns a driver. Its verbs may be
    called concurrently on one event loop (a ``watch`` in progress while the shell submits,
    reconciles and cancels); a driver serialises what must not interleave (its own state, a
    connection that carries one command at a time) itself. Timeouts: every verb that does I/O
    bounds each request it makes (``ProviderError(retryable=True)`` when it expires); none
    blocks the event loop.
    """

    name: str
    capabilities: Capabilities = Capabilities()
    poll_min: float = 0.1
    """seconds the default ``watch`` waits after new keys before it describes them."""
    poll_max: float = 2.0
    """the longest the default ``watch`` waits between describes when nothing changes."""
    submits_ahead: bool = False
    """``stowplan run`` may submit the first placement's attempts through its own instance of
    this driver while the control plane starts (``stowplan.cli.ahead``), which then finds them
    by key as after a restart. True only where that is sound and worth it: ``submit`` is
    idempotent through state on disk that a later instance reads (a key index), ``describe``
    finds a key from a fresh instance, and a submit is a remote call the cluster queues
    (Slurm), so starting it seconds earlier starts the work seconds earlier."""

    @abc.abstractmethod
    async def discover(self) -> list[Pool]:
        """The pools this provider offers now: free capacity, GPU types, prices, expected wait,
        and for elastic pools the instance shape, maximum and boot time. An elastic pool's
        capacity includes its booting and running instances, and its ``max_instances`` is what
        may still be launched (the core counts what it provisioned until a discovery shows it).
        Pools are returned in a stable order (by id). Errors: ``ProviderError`` (retryable
        when the provider could not be reached). Called at start, when ``capacity_changes``
        yields, and periodically; ``Facts.of(pools)`` is what ``plan`` is given."""

    def first_discovery_answered(self) -> None:
        """The first ``discover`` is answered without this driver (its provider actor was
        handed fresh facts by ``stowplan run``): a driver that begins a discovery as it is
        built withdraws it (Slurm over SSH). Called once, before the event loop turns; by
        default there is nothing to withdraw."""
        return None

    @abc.abstractmethod
    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        """Pure: render ``launches`` into requests, given the facts of a discovery. No I/O,
        no clock, no state: the same launches and facts give the same requests, which is how
        ``--dry-run`` prints exactly what ``submit`` sends. Every launch's key is in exactly one
        request. Errors: ``ProviderError(retryable=False)`` naming the launch and the problem
        (see ``command_of``); nothing else."""

    @abc.abstractmethod
    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        """Idempotent by key: submit each request unless it was submitted before, in which case
        report what exists. A retried submit whose answer was lost finds the first job; it
        never starts a second. Reports: one per key of every request, in request order and
        key order within a request; QUEUED/RUNNING (or terminal, for a job that already ended),
        FAILED with ``PROVIDER_REJECTED`` for an attempt the provider refused, or UNKNOWN when
        it cannot tell whether the submit happened (reconciliation finds out).
        Errors: ``ProviderError``; retryable means nothing was decided and the same requests
        may be submitted again (the shell does, after backoff)."""

    @abc.abstractmethod
    async def describe(self, keys: Sequence[str]) -> list[Report]:
        """Batched observation: one query for many keys, one report per key in ``keys`` order.
        A key the provider has never seen is UNKNOWN (reconciliation relies on it); a
        finished key keeps its terminal report. Errors: ``ProviderError`` (retryable)."""

    async def watch(
        self, keys: WatchSet, *, renew_every: float = 60.0
    ) -> AsyncIterator[list[Report]]:
        """The reports of ``keys`` as they change, in batches, until the caller stops iterating.

        The default polls ``describe`` for every key in the set: ``poll_min`` after keys are
        added or a state changed, doubling to ``poll_max`` while nothing changes. A batch holds
        changed reports and renewals (``WatchSet.news``). A failed describe (a ``ProviderError``,
        or an ``OSError`` a driver failed to translate) is counted in ``keys.failures`` and
        tried again at the next poll; no other error escapes but a bug. This is
        the only polling backoff: drivers do not space their describes themselves. A driver
        with a native watch (Kubernetes) overrides it and has ``Capability.NATIVE_WATCH``."""
        loop = asyncio.get_running_loop()
        interval = self.poll_min
        while True:
            if await keys.wait_added(interval):
                interval = self.poll_min
                await asyncio.sleep(self.poll_min)  # gather what else arrives with them
            if not len(keys):
                interval = self.poll_max
                continue
            try:
                reports = await self.describe(keys.keys())
            except (ProviderError, OSError):  # OSError: a transport error left untranslated
                keys.failures += 1
                interval = min(self.poll_max, interval * 2)
                continue
            news = keys.news(reports, loop.time(), renew_every)
            if news:
                interval = self.poll_min
                yield news
            else:
                interval = min(self.poll_max, max(interval, self.poll_min) * 2)

    async def capacity_changes(self) -> AsyncIterator[str]:
        """Yields a reason each time this provider's capacity changed (a node lost or back, a
        spot instance reclaimed, a node pool scaled); the caller rediscovers. The default
        yields nothing: such a provider is rediscovered periodically only."""
        nothing: tuple[str, ...] = ()
        for why in nothing:  # nothing to push
            yield why

    @abc.abstractmethod
    async def cancel(self, keys: Sequence[str]) -> None:
        """Idempotent: cancelling a finished or unknown key is not an error. A driver without
        ``Capability.CANCEL_MEMBER`` cancels an attempt of a multi-attempt request only when
        every attempt of that request is cancelled; the rest run to the end and their reports
        are ignored. Errors: ``ProviderError`` (retryable: the shell calls again)."""

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        """Start ``count`` instances in elastic pool ``pool``; idempotent by ``token`` (a
        retried call with the same token starts nothing more and returns the same instances).
        Tokens are at most 32 characters of ``[0-9a-z-]``. It may start fewer than ``count``
        (the core makes up the difference later); a pool at its maximum raises a non-retryable
        ``ProviderError``. Returns the ids of the instances started. The capacity reaches the
        core through rediscovery once the instances are up (``capacity_changes``). Only with
        ``Capability.ELASTIC``."""
        raise ProviderError(
            f"cannot provision instances: {self.capabilities.reason(Capability.ELASTIC)}",
            provider=self.name,
            retryable=False,
        )

    async def terminate(self, pool: str, count: int, token: str) -> None:
        """Stop up to ``count`` idle instances of elastic pool ``pool`` (none that runs an
        attempt); idempotent by ``token``. Only with ``Capability.ELASTIC``."""
        raise ProviderError(
            f"cannot terminate instances: {self.capabilities.reason(Capability.ELASTIC)}",
            provider=self.name,
            retryable=False,
        )

    @abc.abstractmethod
    def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        """The attempt's output as chunks of bytes, from the start; with ``follow`` until the
        attempt ends. An unknown key yields nothing. Only with ``Capability.LOGS``."""

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
