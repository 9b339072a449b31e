"""The provider actor: one per configured provider; drives its driver and watches its jobs.

It plans and submits what the queue actor sends (with the facts of its last discovery, so
``--dry-run`` and a submit render alike), passes the queue's elastic orders (``provision``,
``terminate``, with the core's token) to the driver, and follows every live key through the driver's
``watch`` (``providers.base.Provider.watch``: batched polling of ``describe`` with the one
polling backoff, or the driver's native watch), pushing each batch of changes to the queue
actor. Unchanged states are re-sent every ``renew_every`` seconds so the core's leases stay
fresh. It also follows the driver's ``capacity_changes`` and tells the queue, whose shell
rediscovers at once. It boots from its constructor, so after a restart it reloads its live
keys from the store and watches them at once, without waiting to be called.

Handed facts. ``stowplan run`` discovers every provider itself (to refuse an infeasible sweep
before anything is written) while Ray starts; it hands those pools to the actor
(``HandedFacts``), and the actor's first discovery (the queue's, at its boot) answers with them
instead of asking the provider again, which was the longest wait before the first submit.
They are taken at most once, only while younger than ``FACTS_TRUSTED_S`` (wall clock, from
when the CLI's discovery began), never after a capacity change and never by a restarted
actor (Ray gives it the same constructor arguments): every later discovery, the capacity
changes' and the periodic ones, asks the provider. A driver that begins its first discovery
as it is built (Slurm over SSH) is told, while the facts are fresh, that the first discovery
is answered (``first_discovery_answered``), so it sends no command for it. An exception
that escapes a watch is a bug: it is reported to the queue as the control plane's fatal error
(see ``control``), never swallowed by a dead loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from stowplan.actors.runtime import error_detail, error_text, note_worker
from stowplan.actors.wire import in_actor, pack, unpack
from stowplan.placement.problem import Pool
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    Provider,
    ProviderState,
    WatchSet,
)
from stowplan.spec.models import ProviderConfig

log = logging.getLogger(__name__)

FACTS_TRUSTED_S = 30.0
"""How old (seconds, wall clock) handed facts may be for the first discovery to use them."""


class HandedFacts(msgspec.Struct, frozen=True, kw_only=True):
    """One provider's pools as the CLI discovered them, for the actor's first discovery."""

    pools: list[Pool]
    at: float
    """``time.time()`` when that discovery began"""

    def fresh(self, now: float) -> bool:
        # both ways: the CLI and the actor may read different (synced) clocks
        return abs(now - self.at) <= FACTS_TRUSTED_S


def restarted() -> bool:
    """Whether this actor is a restart by Ray (its constructor arguments are the first
    start's); False outside an actor."""
    if not in_actor():  # a driver (a test that started Ray) is not an actor
        return False
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class LazyQueue:
    """The queue actor's handle, looked up at the first call through it (``queue.m.remote(
    ...)``, awaited, as on the handle). NOTE: Ray imports an actor's module to make its
    handle; the queue's costs 0.2 s of CPU, which this actor's loops would otherwise spend
    while the control plane starts, with every actor's process starting on few cores."""

    def __init__(self, lookup: Callable[[], Awaitable[Any]]) -> None:
        self._lookup = lookup
        self._handle: Any = None

    async def _call(self, method: str, *args: Any) -> Any:
        if self._handle is None:
            self._handle = await self._lookup()
        return await getattr(self._handle, method).remote(*args)

    def __getattr__(self, method: str) -> Any:
        class Method:
            @staticmethod
            def remote(*args: Any) -> Awaitable[Any]:
                return self._call(method, *args)

        return Method


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
        poll_min: float | None = None,
        poll_max: float | None = None,
        renew_every: float = 60.0,
        owner: tuple[int, float] | None = None,
        facts: bytes | None = None,
    ) -> None:
        """``facts``: the CLI's discovery of this provider (packed ``HandedFacts``), for the
        first discovery (module doc)."""
        from stowplan.providers.registry import make_provider

        note_worker(state_dir, f"provider:{name}", owner)
        self.name = name
        cfg = msgspec.json.decode(config, type=ProviderConfig)
        self.driver: Provider = make_provider(name, cfg, state_dir=Path(state_dir))
        if poll_min is not None:
            self.driver.poll_min = poll_min
        if poll_max is not None:
            self.driver.poll_max = poll_max
        self.namespace = namespace
        self.queue_name = queue_name
        self.store_name = store_name
        self.renew_every = renew_every
        self.live = WatchSet()
        self.facts: Facts | None = None
        self.discovers = 0
        """discoveries asked of the driver"""
        self._handed: HandedFacts | None = None
        if facts is not None and not restarted():
            self._handed = unpack(facts, HandedFacts)
        if self._handed is not None and self._handed.fresh(time.time()):
            self.driver.first_discovery_answered()  # before the loop turns
        # an async actor's constructor runs on its event loop: start now, not on first call
        loop = asyncio.get_running_loop()
        self._booting = loop.create_task(self._load_live())
        self._watcher = loop.create_task(self._follow(self._watch_loop, "the watch"))
        self._capacity = loop.create_task(self._follow(self._capacity_loop, "capacity events"))

    async def _load_live(self) -> None:
        import ray

        store: Any = ray.get_actor(self.store_name, namespace=self.namespace)
        self.live.add(await store.active_keys.remote(self.name))

    async def _boot(self) -> None:
        """Wait until the live keys are loaded (raises what loading them raised)."""
        await asyncio.shield(self._booting)

    async def _discover(self) -> list[Pool]:
        handed, self._handed = self._handed, None
        if handed is not None and handed.fresh(time.time()):
            pools = handed.pools
        else:
            self.discovers += 1
            pools = await self.driver.discover()
        self.facts = Facts.of(pools)
        return pools

    async def discover(self) -> bytes:
        await self._boot()
        return pack(await self._discover())

    async def plan(self, launches: bytes) -> list[str]:
        specs = unpack(launches, list[LaunchSpec])
        facts = self.facts if self.facts is not None else Facts.of(await self._discover())
        return [r.render() for r in self.driver.plan(specs, facts)]

    async def submit(self, launches: bytes) -> bytes:
        """Plan and submit a batch; returns one report per launch.

        Planned with the facts of this actor's last discovery (discovering first after a
        restart). A ``ProviderError`` is raised to the caller (``ProviderError`` pickles whole):
        the queue's shell submits the SAME keys again after a transient one and reports a
        refusal as a failed attempt, as it does with every driver."""
        await self._boot()
        specs = unpack(launches, list[LaunchSpec])
        facts = self.facts if self.facts is not None else Facts.of(await self._discover())
        reports = await self.driver.submit(self.driver.plan(specs, facts))
        for rep in reports:
            if rep.state not in TERMINAL_PROVIDER_STATES:
                self.live.add([rep.key], rep.state)
        return pack(reports)

    async def reconcile(self, keys: list[str]) -> bytes:
        """Describe keys now (after a restart or a lost lease) and keep watching live ones."""
        await self._boot()
        reports = await self.driver.describe(keys)
        for rep in reports:
            if rep.state in TERMINAL_PROVIDER_STATES or rep.state is ProviderState.UNKNOWN:
                self.live.discard([rep.key])
            else:
                self.live.add([rep.key], rep.state)
        return pack(reports)

    async def cancel(self, keys: list[str]) -> None:
        await self._boot()
        await self.driver.cancel(keys)
        self.live.discard(keys)

    async def capabilities(self) -> bytes:
        """The driver's ``Capabilities`` (the queue's shell sends elastic orders only with
        ``Capability.ELASTIC``)."""
        return pack(self.driver.capabilities)

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        """The driver's ``provision``, idempotent by token: a ``ProviderError`` goes back to
        the queue's shell, which calls again with the same token or tells the core."""
        await self._boot()
        return list(await self.driver.provision(pool, count, token))

    async def terminate(self, pool: str, count: int, token: str) -> None:
        await self._boot()
        await self.driver.terminate(pool, count, token)

    async def stats(self) -> dict[str, Any]:
        return {
            "live": len(self.live),
            "describe_failures": self.live.failures,
            "discovers": self.discovers,
        }

    async def _follow(self, loop: Callable[[Any], Awaitable[None]], what: str) -> None:
        """Run one of the actor's loops; an exception that escapes it is the control plane's
        fatal error, reported to the queue."""
        queue = LazyQueue(self._lookup_queue)
        try:
            await self._boot()
            await loop(queue)
        except Exception as e:
            log.exception("%s: %s failed", self.name, what)
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
        async for batch in self.driver.watch(self.live, renew_every=self.renew_every):
            await queue.report.remote(self.name, pack(batch))

    async def _capacity_loop(self, queue: Any) -> None:
        async for why in self.driver.capacity_changes():
            log.info("%s: capacity changed (%s)", self.name, why)
            self._handed = None  # facts from before the change
            await queue.capacity_changed.remote(self.name)
