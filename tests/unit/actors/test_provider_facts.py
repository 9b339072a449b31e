"""The provider actor's first discovery takes the pools ``stowplan run`` handed it while they
are fresh, and asks its driver otherwise: stale facts, after a capacity change, after a restart
and for every discovery after the first (``actors.provider``, "Handed facts").

The actor runs here without Ray: its constructor's store and queue lookups are replaced by a
subclass, and its driver is the instant provider, counting its discoveries."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from stowplan.actors import provider as provider_module
from stowplan.actors.provider import FACTS_TRUSTED_S, HandedFacts, ProviderActor
from stowplan.actors.wire import pack, unpack
from stowplan.placement.problem import Pool
from stowplan.providers.base import LaunchSpec, Report
from stowplan.providers.instant import InstantProvider
from stowplan.scheduler.reports import ProviderState
from stowplan.spec.models import InstantProviderConfig, SlurmProviderConfig

NAME = "inst"


class CountingInstant(InstantProvider):
    """The instant provider, counting ``discover`` calls; ``changes`` are its capacity news."""

    def __init__(self, changes: tuple[str, ...] = ()) -> None:
        super().__init__(NAME, InstantProviderConfig())
        self.discovers = 0
        self.changes = changes

    async def discover(self) -> list[Pool]:
        self.discovers += 1
        return await super().discover()

    async def capacity_changes(self) -> AsyncIterator[str]:
        for why in self.changes:
            yield why


class Offline(ProviderActor):
    """The actor without Ray: no live keys to load, no loops following the queue."""

    async def _load_live(self) -> None:
        return None

    async def _follow(self, loop: Callable[[Any], Awaitable[None]], what: str) -> None:
        return None


class Queue:
    """What ``_capacity_loop`` calls: ``queue.capacity_changed.remote(name)``."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self.capacity_changed = self

    async def remote(self, name: str) -> None:
        self.told.append(name)


def handed(age: float) -> bytes:
    """This provider's pools as the CLI would hand them, discovered ``age`` seconds ago."""

    async def pools() -> list[Pool]:
        return await InstantProvider(NAME, InstantProviderConfig()).discover()

    return pack(HandedFacts(pools=anyio.run(pools), at=time.time() - age))


def actor(tmp_path: Path, facts: bytes | None, driver: CountingInstant) -> ProviderActor:
    """An ``Offline`` actor (build it on a running event loop) with ``driver``."""
    a = Offline(
        NAME,
        msgspec.json.encode(InstantProviderConfig()),
        str(tmp_path),
        queue_name="queue",
        store_name="store",
        namespace="test",
        facts=facts,
    )
    a.driver = driver
    return a


def launch(i: int) -> LaunchSpec:
    return LaunchSpec(
        key=f"k{i}", run_id=f"r{i}", attempt=1, pool=NAME, name=f"t{i}", argv=["true"]
    )


def test_fresh_facts_mean_no_discovery_before_the_first_submit(tmp_path: Path) -> None:
    driver = CountingInstant()
    facts = handed(age=1.0)

    async def go() -> None:
        a = actor(tmp_path, facts, driver)
        reports = unpack(await a.submit(pack([launch(0)])), list[Report])
        assert [r.state for r in reports] == [ProviderState.SUCCEEDED]
        assert driver.discovers == 0

    anyio.run(go)


def test_the_queues_first_discovery_gets_the_handed_pools_and_later_ones_ask(
    tmp_path: Path,
) -> None:
    driver = CountingInstant()
    facts = handed(age=1.0)

    async def go() -> None:
        a = actor(tmp_path, facts, driver)
        first = unpack(await a.discover(), list[Pool])
        assert first == unpack(facts, HandedFacts).pools
        assert driver.discovers == 0
        # the periodic rediscovery (and any after) asks the provider
        await a.discover()
        assert driver.discovers == 1
        assert (await a.stats())["discovers"] == 1

    anyio.run(go)


def test_stale_facts_are_discovered_again(tmp_path: Path) -> None:
    driver = CountingInstant()
    facts = handed(age=FACTS_TRUSTED_S + 1)

    async def go() -> None:
        a = actor(tmp_path, facts, driver)
        await a.submit(pack([launch(0)]))
        assert driver.discovers == 1

    anyio.run(go)


def test_facts_from_the_future_beyond_the_bound_are_not_trusted(tmp_path: Path) -> None:
    driver = CountingInstant()
    facts = handed(age=-(FACTS_TRUSTED_S + 1))

    async def go() -> None:
        a = actor(tmp_path, facts, driver)
        await a.discover()
        assert driver.discovers == 1

    anyio.run(go)


def test_a_capacity_change_drops_the_handed_facts(tmp_path: Path) -> None:
    driver = CountingInstant(changes=("node lost",))
    facts = handed(age=1.0)
    queue = Queue()

    async def go() -> None:
        a = actor(tmp_path, facts, driver)
        await a._capacity_loop(queue)
        assert queue.told == [NAME]
        await a.discover()  # the queue's rediscovery after the news
        assert driver.discovers == 1

    anyio.run(go)


def test_a_restarted_actor_discovers_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray restarts an actor with its first constructor arguments: the facts handed to the
    first start are not the restart's."""
    monkeypatch.setattr(provider_module, "restarted", lambda: True)
    driver = CountingInstant()
    facts = handed(age=1.0)

    async def go() -> None:
        a = actor(tmp_path, facts, driver)
        await a.submit(pack([launch(0)]))
        assert driver.discovers == 1

    anyio.run(go)


def test_without_handed_facts_the_first_submit_discovers(tmp_path: Path) -> None:
    driver = CountingInstant()

    async def go() -> None:
        a = actor(tmp_path, None, driver)
        await a.submit(pack([launch(0)]))
        await a.submit(pack([launch(1)]))
        assert driver.discovers == 1

    anyio.run(go)


SLURM = "cluster"
SLURM_POOLS = [Pool(id=f"{SLURM}/cpu", provider=SLURM, kind="slurm", cpus=8, memory=8 << 30)]


@pytest.mark.parametrize(
    ("age", "restart", "early"),
    [
        (1.0, False, 0),  # fresh facts answer the first discovery: no command of its own
        (FACTS_TRUSTED_S + 1, False, 1),  # stale: the driver's head start is kept
        (1.0, True, 1),  # a restarted actor discovers itself
    ],
)
def test_the_slurm_driver_sends_no_first_discovery_the_handed_facts_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, age: float, restart: bool, early: int
) -> None:
    """The SSH Slurm driver begins its first discovery as it is built; the actor withdraws it
    when its handed facts will answer that discovery, and plans with those facts. Only the
    backend's discovery is replaced: the driver and the actor are the real ones."""
    from stowplan.providers.slurm import backend as backend_mod

    asked: list[float] = []

    async def discover(
        self: object, ours: object = None
    ) -> tuple[str, list[Any], dict[str, float]]:
        asked.append(time.monotonic())
        return "fake", [], {}

    monkeypatch.setattr(backend_mod.SSHBackend, "discover", discover)
    monkeypatch.setattr(provider_module, "restarted", lambda: restart)
    facts = pack(HandedFacts(pools=SLURM_POOLS, at=time.time() - age))
    spec = LaunchSpec(
        key="k", run_id="r", attempt=1, pool=SLURM_POOLS[0].id, name="t", argv=["true"]
    )

    async def go() -> None:
        a = Offline(
            SLURM,
            msgspec.json.encode(SlurmProviderConfig(host="login", workdir="/w")),
            str(tmp_path),
            queue_name="queue",
            store_name="store",
            namespace="test",
            facts=facts,
        )
        try:
            await anyio.sleep(0.01)  # a discovery begun at construction has run by now
            assert len(asked) == early
            first = unpack(await a.discover(), list[Pool])
            (script,) = await a.plan(pack([spec]))
            assert "#SBATCH" in script
            assert len(asked) == early  # the first discovery: the facts, or the head start
            assert (first == SLURM_POOLS) is (early == 0)
            await a.discover()  # every later one asks the cluster
            assert len(asked) == early + 1
        finally:
            await a.driver.aclose()

    anyio.run(go)


def test_the_queue_is_looked_up_at_the_first_call_and_once() -> None:
    """The loops' queue handle costs an import of the queue's module in this process: not
    at start-up, only when there is something to tell."""
    from stowplan.actors.provider import LazyQueue

    lookups: list[int] = []
    queue = Queue()

    async def lookup() -> Any:
        lookups.append(1)
        return queue

    async def go() -> None:
        lazy = LazyQueue(lookup)
        assert lookups == []
        await lazy.capacity_changed.remote("a")
        await lazy.capacity_changed.remote("b")
        assert lookups == [1] and queue.told == ["a", "b"]

    anyio.run(go)


def test_a_process_that_started_ray_itself_is_not_a_restarted_actor() -> None:
    """In a driver (a test, the CLI) that has Ray up, ``restarted`` is False: Ray's runtime
    context answers ``was_current_actor_reconstructed`` only inside a worker."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert provider_module.restarted() is False
    finally:
        if started:
            ray.shutdown()
