from __future__ import annotations

import time
from pathlib import Path

import pytest

from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.providers.instant import InstantProvider, InstantRequest
from stowplan.providers.registry import make_provider
from stowplan.spec.models import InstantProviderConfig


def launches(n: int, start: int = 0) -> list[LaunchSpec]:
    return [
        LaunchSpec(key=f"k{i}", run_id=f"r{i}", attempt=0, pool="instant", name="t", argv=["x"])
        for i in range(start, start + n)
    ]


def test_registry_builds_it_from_its_config(tmp_path: Path) -> None:
    provider = make_provider("bench", InstantProviderConfig(), state_dir=tmp_path)
    assert isinstance(provider, InstantProvider) and provider.name == "bench"
    assert not list(tmp_path.iterdir())  # keeps nothing on disk


@pytest.mark.anyio
async def test_discover_offers_unlimited_capacity() -> None:
    [pool] = await InstantProvider("bench", InstantProviderConfig(site="lab")).discover()
    assert (pool.id, pool.provider, pool.site) == ("bench", "bench", "lab")
    assert pool.cpus >= 1e9 and pool.memory >= 1 << 60


def test_plan_is_pure_rendering() -> None:
    [req] = InstantProvider("bench").plan(launches(1), Facts())
    assert isinstance(req, InstantRequest) and req.key == "k0"
    assert "k0" in req.render()


@pytest.mark.anyio
async def test_submit_succeeds_at_once_and_is_idempotent() -> None:
    provider = InstantProvider("bench")
    reqs = provider.plan(launches(3), Facts())
    first = await provider.submit(reqs)
    assert [r.state for r in first] == [ProviderState.SUCCEEDED] * 3
    assert provider.submitted_count == 3
    again = await provider.submit([reqs[1], reqs[1], *provider.plan(launches(1, start=3), Facts())])
    assert again[0] == first[1] and again[1] == first[1]
    assert provider.submitted_count == 4
    described = await provider.describe(["k0", "k3", "unknown"])
    assert described[0] == first[0]
    assert [r.state for r in described] == [
        ProviderState.SUCCEEDED,
        ProviderState.SUCCEEDED,
        ProviderState.UNKNOWN,
    ]
    await provider.cancel(["k0", "unknown"])
    assert (await provider.describe(["k0"]))[0].state is ProviderState.SUCCEEDED
    assert [c async for c in provider.logs("k0", follow=True)] == []


@pytest.mark.anyio
async def test_a_hundred_thousand_submits_take_well_under_a_second() -> None:
    provider = InstantProvider("bench")
    reqs = provider.plan(launches(100_000), Facts())
    started = time.perf_counter()
    reports = await provider.submit(reqs)
    elapsed = time.perf_counter() - started
    assert len(reports) == 100_000 and provider.submitted_count == 100_000
    assert reports[-1].state is ProviderState.SUCCEEDED
    assert elapsed < 1.0, f"{elapsed:.3f} s"
