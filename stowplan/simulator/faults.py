"""Failure injection, all seeded: node failure and repair, provider API errors and throttling,
lost answers, and sites cut off from the network. (Spot interruptions are drawn by the cloud
pools themselves, per instance, from their own stream.)

Each kind of fault draws from its own random stream of the engine (``faults/nodes/<pool>``,
``faults/api/<site>``), so turning one kind on or off never changes when another strikes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from stowplan.errors import ProviderError
from stowplan.simulator.cluster import FaultsSpec
from stowplan.simulator.engine import PRIO_INFRA, Engine

if TYPE_CHECKING:
    from stowplan.simulator.provider import SimPool, SimProvider


class ApiFaults:
    """What can go wrong with one call to a provider's API."""

    def __init__(self, engine: Engine, site: str, spec: FaultsSpec) -> None:
        self.engine = engine
        self.site = site
        self.spec = spec
        self.rng = engine.rng(f"faults/api/{site}")
        self.reachable = True
        self._tokens = max(1.0, spec.submit_rate_limit)
        self._tokens_at = 0.0
        self.errors = 0
        self.throttled = 0
        self.lost_answers = 0
        self.unreachable_calls = 0

    def check(self, call: str) -> None:
        """Raise a retryable ``ProviderError`` when this call fails before doing anything."""
        if not self.reachable:
            self.unreachable_calls += 1
            raise ProviderError(f"{call}: site unreachable", provider=self.site, retryable=True)
        if call == "submit" and self.spec.submit_rate_limit > 0:
            rate = self.spec.submit_rate_limit
            now = self.engine.now
            self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                self.throttled += 1
                raise ProviderError(f"{call}: throttled (429)", provider=self.site, retryable=True)
            self._tokens -= 1.0
        if self.spec.api_error_rate and self.rng.random() < self.spec.api_error_rate:
            self.errors += 1
            raise ProviderError(f"{call}: internal error (503)", provider=self.site, retryable=True)

    def answer_lost(self) -> bool:
        """After a submit was carried out: does its answer fail to come back?"""
        if self.spec.lost_answer_rate and self.rng.random() < self.spec.lost_answer_rate:
            self.lost_answers += 1
            return True
        return False


def schedule_cutoffs(
    engine: Engine,
    spec: FaultsSpec,
    providers: dict[str, SimProvider],
    on_restore: Callable[[str], None],
) -> None:
    """Cut each listed site off at ``at`` and bring it back ``duration`` later."""
    for c in spec.cutoffs:
        prov = providers.get(c.site)
        if prov is None:
            continue
        at = float(c.at)
        dur = float(c.duration)

        def down(p: SimProvider) -> None:
            p.set_reachable(False)

        def up(p: SimProvider) -> None:
            p.set_reachable(True)
            on_restore(p.name)

        engine.at(at, down, prov, PRIO_INFRA)
        engine.at(at + dur, up, prov, PRIO_INFRA)


class NodeFailures:
    """Every node of one pool fails after Exp(MTBF), is repaired after Exp(MTTR), fails again.

    One stream per pool; the first failures are drawn in node order.
    """

    def __init__(self, engine: Engine, pool: SimPool, mtbf: float, mttr: float) -> None:
        self.engine = engine
        self.pool = pool
        self.rng = engine.rng(f"faults/nodes/{pool.spec.name}")
        self.mtbf = mtbf
        self.mttr = mttr
        for n in range(pool.units):
            engine.after(self.rng.expovariate(1.0 / mtbf), self._fail, n, PRIO_INFRA)

    def _fail(self, node: int) -> None:
        self.pool.node_down(node)
        self.engine.after(self.rng.expovariate(1.0 / self.mttr), self._repair, node, PRIO_INFRA)

    def _repair(self, node: int) -> None:
        self.pool.node_up(node)
        self.engine.after(self.rng.expovariate(1.0 / self.mtbf), self._fail, node, PRIO_INFRA)


def schedule_node_failures(engine: Engine, provider: SimProvider) -> list[NodeFailures]:
    out = []
    for pool in provider.pools.values():
        spec = pool.spec.failures
        if spec is not None:
            out.append(NodeFailures(engine, pool, float(spec.mtbf), float(spec.mttr)))
    return out
