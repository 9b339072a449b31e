"""The provider actor: one per configured provider; drives its driver and watches its jobs.

It submits what the queue actor sends, and watches every live key with ONE batched
``describe`` per poll (0.1 s after new work, doubling to a cap), pushing state changes back to
the queue actor in a batch. Unchanged states are re-sent every ``renew_every`` seconds so the
core's leases stay fresh. Query failures are counted and retried on the next poll, never
raised into the watch loop. It boots from its constructor, so after a restart it reloads its
live keys from the store and watches them at once, without waiting to be called. Any other
exception in the watch loop is a bug: it is reported to the queue as the control plane's
fatal error (see ``control``), never swallowed by a dead loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from stowplan.actors.runtime import error_detail, error_text, note_worker
from stowplan.actors.wire import pack, unpack
from stowplan.errors import ProviderError
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    LaunchSpec,
    Provider,
    ProviderState,
    Report,
)
from stowplan.spec.models import ProviderConfig

log = logging.getLogger(__name__)


class RemoteProviderError(ProviderError):
    """A driver's ``ProviderError`` as it leaves the provider actor.

    ``ProviderError`` takes keyword-only arguments, which unpickling cannot pass, so Ray would
    hand the caller some other error; this one survives the trip, ``retryable`` included, and
    the queue's shell decides on it (the same key again, or a refusal)."""

    def __init__(self, text: str, provider: str, retryable: bool) -> None:
        Exception.__init__(self, text)
        self.provider = provider
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteProviderError, (str(self), self.provider, self.retryable))


@contextlib.contextmanager
def _portable_errors() -> Iterator[None]:
    try:
        yield
    except RemoteProviderError:
        raise
    except ProviderError as e:
        raise RemoteProviderError(str(e), e.provider, e.retryable) from e


class ProviderActor:
    def __init__(
        self,
        name: str,
        config: bytes,
        state_dir: str,
        *,
        queue_name: str,
        store_name: str,
        namespace: str,
        poll_min: float = 0.1,
        poll_max: float = 2.0,
        renew_every: float = 60.0,
        owner: tuple[int, float] | None = None,
    ) -> None:
        from stowplan.providers.registry import make_provider

        note_worker(state_dir, f"provider:{name}", owner)
        self.name = name
        cfg = msgspec.json.decode(config, type=ProviderConfig)
        self.driver: Provider = make_provider(name, cfg, state_dir=Path(state_dir))
        self.namespace = namespace
        self.queue_name = queue_name
        self.store_name = store_name
        self.poll_min, self.poll_max, self.renew_every = poll_min, poll_max, renew_every
        self.live: dict[str, tuple[ProviderState, float]] = {}
        self.describe_failures = 0
        self._wake = asyncio.Event()
        # an async actor's constructor runs on its event loop: start now, not on first call
        self._booting = asyncio.get_running_loop().create_task(self._load_live())
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _load_live(self) -> None:
        import ray

        store: Any = ray.get_actor(self.store_name, namespace=self.namespace)
        for key in await store.active_keys.remote(self.name):
            self.live.setdefault(key, (ProviderState.UNKNOWN, 0.0))

    async def _boot(self) -> None:
        """Wait until the live keys are loaded (raises what loading them raised)."""
        await asyncio.shield(self._booting)

    async def discover(self) -> bytes:
        await self._boot()
        with _portable_errors():
            return pack(await self.driver.discover())

    async def plan(self, launches: bytes) -> list[str]:
        specs = unpack(launches, list[LaunchSpec])
        return [r.render() for r in self.driver.plan(specs)]

    async def submit(self, launches: bytes) -> bytes:
        """Plan and submit a batch; returns one report per launch.

        A ``ProviderError`` is raised to the caller (as ``RemoteProviderError``): the queue's
        shell submits the SAME keys again after a transient one and reports a refusal as a
        failed attempt, as it does with every driver."""
        await self._boot()
        specs = unpack(launches, list[LaunchSpec])
        with _portable_errors():
            reports = await self.driver.submit(self.driver.plan(specs))
        loop = asyncio.get_running_loop()
        for rep in reports:
            if rep.state not in TERMINAL_PROVIDER_STATES:
                self.live[rep.key] = (rep.state, loop.time())
        self._wake.set()
        return pack(reports)

    async def reconcile(self, keys: list[str]) -> bytes:
        """Describe keys now (after a restart or a lost lease) and keep watching live ones."""
        await self._boot()
        with _portable_errors():
            reports = await self.driver.describe(keys)
        loop = asyncio.get_running_loop()
        for rep in reports:
            if rep.state in TERMINAL_PROVIDER_STATES or rep.state is ProviderState.UNKNOWN:
                self.live.pop(rep.key, None)
            else:
                self.live[rep.key] = (rep.state, loop.time())
        return pack(reports)

    async def cancel(self, keys: list[str]) -> None:
        await self._boot()
        with _portable_errors():
            await self.driver.cancel(keys)
        for k in keys:
            self.live.pop(k, None)

    async def stats(self) -> dict[str, Any]:
        return {"live": len(self.live), "describe_failures": self.describe_failures}

    async def _watch(self) -> None:
        """The watch loop; an exception that escapes it is the control plane's fatal error."""
        queue = await self._lookup_queue()
        try:
            await self._boot()
            await self._watch_loop(queue)
        except Exception as e:
            log.exception("%s: the watch loop failed", self.name)
            with contextlib.suppress(Exception):  # a queue that is gone has nobody to tell
                await queue.fail.remote(f"provider:{self.name}", error_text(e), error_detail(e))

    async def _lookup_queue(self, timeout: float = 60.0) -> Any:
        """The queue actor's handle; at the first start it is created just after this one."""
        import ray

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return ray.get_actor(self.queue_name, namespace=self.namespace)
            except ValueError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _watch_loop(self, queue: Any) -> None:
        interval = self.poll_min
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            if self._wake.is_set():
                self._wake.clear()
                interval = self.poll_min
                await asyncio.sleep(self.poll_min)
            if not self.live:
                interval = self.poll_max
                continue
            keys = list(self.live)
            try:
                reports = await self.driver.describe(keys)
            except Exception as e:  # a failed poll is counted and retried, never fatal
                self.describe_failures += 1
                log.warning(
                    "%s: describe failed (%d so far): %s", self.name, self.describe_failures, e
                )
                interval = min(self.poll_max, interval * 2)
                continue
            now = loop.time()
            changed: list[Report] = []
            for rep in reports:
                prev = self.live.get(rep.key)
                if prev is None:
                    continue
                if rep.state is ProviderState.UNKNOWN and prev[0] is not ProviderState.UNKNOWN:
                    continue  # not visible yet; the lease decides if it is lost
                if rep.state != prev[0] or now - prev[1] >= self.renew_every:
                    changed.append(rep)
                    self.live[rep.key] = (rep.state, now)
                if rep.state in TERMINAL_PROVIDER_STATES:
                    self.live.pop(rep.key, None)
            if changed:
                interval = self.poll_min
                await queue.report.remote(self.name, pack(changed))
            else:
                interval = min(self.poll_max, interval * 2)
