"""The provider contract of ``stowplan/providers/base.py``, written once, run for every driver.

Each test states one guarantee of the contract's docstrings and takes only a ``Harness``
(``conftest.py`` runs it for every driver; ``test_selfcheck.py`` runs it against broken fake
drivers to show it can fail).
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import (
    KEY_MAX,
    KEY_PATTERN,
    TERMINAL_PROVIDER_STATES,
    Capability,
    LaunchSpec,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
    WatchSet,
)
from tests.contract.harness import Harness, Kind

pytestmark = pytest.mark.anyio
S = ProviderState

# -- helpers ------------------------------------------------------------------------------------

_IO_EVENTS = (
    "open",
    "os.",
    "shutil.",
    "subprocess.",
    "socket.",
    "pty.",
    "glob.",
    "tempfile.",
    "sqlite3.",
    "fcntl.",
    "mmap.",
    "urllib.",
    "http.",
)
"""Audit events (PEP 578) that are I/O: files, processes, sockets."""
_watching: list[tuple[int, list[str]]] = []
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching and event.startswith(_IO_EVENTS):
        thread, seen = _watching[-1]
        if threading.get_ident() == thread:
            seen.append(f"{event}{args!r:.160}")


@contextmanager
def no_io() -> Iterator[list[str]]:
    """Record the I/O this thread does in the block (audit events; the hook stays installed
    for the process, idle outside such a block)."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    seen: list[str] = []
    _watching.append((threading.get_ident(), seen))
    try:
        yield seen
    finally:
        _watching.pop()


T = TypeVar("T")


@asynccontextmanager
async def aclosing(it: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async generator typed as an iterator (``Provider.watch``) when done with it."""
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.exists() else set()


def all_keys(requests: Sequence[ProviderRequest]) -> list[str]:
    return [k for r in requests for k in r.keys]


def mixed(h: Harness, *kinds: Kind, start: int = 0) -> list[LaunchSpec]:
    return [h.launch(kind, start + i) for i, kind in enumerate(kinds)]


def names_by_keys(requests: Sequence[ProviderRequest]) -> dict[frozenset[str], str]:
    return {frozenset(r.keys): r.name for r in requests}


def final_state(h: Harness, kind: Kind) -> ProviderState:
    """The state ``kind`` ends in, cancelled if it runs until cancelled."""
    expected = h.expected[kind]
    return S.CANCELLED if expected is None else expected


# -- discover -----------------------------------------------------------------------------------


async def test_discover_lists_pools_in_a_stable_order(harness: Harness) -> None:
    async with harness.new_driver() as d:
        first = await d.discover()
        again = await d.discover()
    ids = [p.id for p in first]
    assert ids == sorted(ids), "pools are returned sorted by id"
    assert len(set(ids)) == len(ids)
    assert ids == [p.id for p in again]
    assert harness.pool in ids
    assert {p.provider for p in first} == {d.name}


# -- plan ---------------------------------------------------------------------------------------


async def test_plan_is_pure(harness: Harness) -> None:
    """Same launches and facts -> equal requests, from this instance and another; no I/O:
    nothing opened, started or connected, nothing created under a state directory that does
    not exist."""
    h = harness
    absent = h.tmp / "absent"
    launches = mixed(h, "quick", "fail", "long", "quick")
    async with h.new_driver(state_dir=absent / ".stowplan") as d:
        facts = await h.facts(d)
        before = tree(h.tmp)
        first = d.plan(launches, facts)  # the first call may import what it needs
        with no_io() as io:
            again = d.plan(launches, facts)
        after = tree(h.tmp)
        async with h.new_driver(state_dir=absent / ".stowplan") as other:
            from_other = other.plan(launches, facts)
    assert io == [], f"plan did I/O: {io}"
    assert after == before, f"plan created {sorted(map(str, after - before))}"
    assert not absent.exists()
    assert first == again == from_other
    assert [r.render() for r in first] == [r.render() for r in again]


async def test_plan_puts_every_key_in_exactly_one_request(harness: Harness) -> None:
    h = harness
    launches = mixed(h, "quick", "fail", "long", "quick", "fail")
    async with h.new_driver() as d:
        requests = d.plan(launches, await h.facts(d))
    assert Counter(all_keys(requests)) == Counter(la.key for la in launches)
    assert d.plan([], await h.facts(d)) == []


async def test_request_names_depend_on_keys_alone(harness: Harness) -> None:
    h = harness
    launches = mixed(h, "quick", "fail", "long", "quick", "fail")
    async with h.new_driver() as d:
        facts = await h.facts(d)
        base = names_by_keys(d.plan(launches, facts))
        reordered = names_by_keys(d.plan(launches[::-1], facts))
        recontented = names_by_keys(
            d.plan(
                [
                    msgspec.structs.replace(
                        la, argv=["sh", "-c", "echo other"], env={"CONTRACT_OTHER": "1"}
                    )
                    for la in launches
                ],
                facts,
            )
        )
        others = names_by_keys(d.plan(mixed(h, "quick", "fail", "long", start=100), facts))
    for name in base.values():
        assert len(name) <= KEY_MAX and KEY_PATTERN.match(name), name
    assert len(set(base.values())) == len(base), "two requests share a name"
    for variant in (reordered, recontented):
        common = base.keys() & variant.keys()
        assert common, "the same launches give the same key sets"
        assert {ks: base[ks] for ks in common} == {ks: variant[ks] for ks in common}
    assert not set(others.values()) & set(base.values()), "other keys, other names"


BAD_LAUNCHES: dict[str, dict[str, Any]] = {
    "argv_and_script": {"script": "echo both"},
    "neither_argv_nor_script": {"argv": None},
    "nul_in_argv": {"argv": ["sh", "-c", "echo \0"]},
    "nul_in_env": {"env": {"CONTRACT": "a\0b"}},
    "bad_env_name": {"env": {"1CONTRACT": "v"}},
    "newline_in_env_name": {"env": {"CONTRACT\n": "v"}},
    "key_not_a_dns_label": {"key": "Not_A_Label"},
}


@pytest.mark.parametrize("case", list(BAD_LAUNCHES))
async def test_plan_rejects_bad_launches(harness: Harness, case: str) -> None:
    h = harness
    good = h.launch("quick", 0)
    bad = h.launch("quick", 1, **BAD_LAUNCHES[case])
    async with h.new_driver() as d:
        facts = await h.facts(d)
        with pytest.raises(ProviderError) as info:
            d.plan([good, bad], facts)
    assert info.value.retryable is False
    assert bad.key in str(info.value), "the error names the launch"


# -- submit and describe ------------------------------------------------------------------------


async def test_submit_reports_each_key_in_order_and_is_idempotent(harness: Harness) -> None:
    """One report per key, in request then key order; the same requests again (an answer
    lost, before and after the attempts ended) create nothing and report the same jobs."""
    h = harness
    launches = mixed(h, "quick", "fail", "quick")
    kind = {la.key: la.name for la in launches}
    async with h.new_driver() as d:
        requests = d.plan(launches, await h.facts(d))
        order = all_keys(requests)
        first = await d.submit(requests)
        assert [r.key for r in first] == order
        assert await h.created(d) == len(requests)
        again = await d.submit(requests)
        assert [r.key for r in again] == order
        assert await h.created(d) == len(requests), "a repeated submit created a job"
        final = await h.wait_terminal(d, order)
        assert [r.state for r in final] == [h.expected[kind[k]] for k in order]  # type: ignore[index]
        late = await d.submit(requests)
        assert await h.created(d) == len(requests), "a submit after the end created a job"
    assert [(r.key, r.state, r.job_id) for r in late] == [
        (r.key, r.state, r.job_id) for r in final
    ], "a repeated submit reports the jobs that exist"


async def test_describe_answers_in_keys_order_and_keeps_terminal_reports(
    harness: Harness,
) -> None:
    h = harness
    quick, fail = h.launch("quick", 0), h.launch("fail", 1)
    unknown = h.key(99)
    keys = [fail.key, unknown, quick.key]
    async with h.new_driver() as d:
        assert [r.state for r in await d.describe([unknown])] == [S.UNKNOWN]
        await d.submit(d.plan([quick, fail], await h.facts(d)))
        reports = await d.describe(keys)
        assert [r.key for r in reports] == keys
        assert reports[1].state is S.UNKNOWN
        final = await h.wait(
            d,
            keys,
            lambda rs: (
                rs[0].state in TERMINAL_PROVIDER_STATES and rs[2].state in TERMINAL_PROVIDER_STATES
            ),
            "the launches' ends",
        )
        assert [r.state for r in final] == [h.expected["fail"], S.UNKNOWN, h.expected["quick"]]
        for _ in range(3):
            await h.advance(d)
            assert await d.describe(keys) == final, "a finished key keeps its terminal report"
        assert await d.describe(keys[::-1]) == final[::-1]
        assert await d.describe([]) == []


async def test_cancel_is_idempotent_and_ends_a_running_attempt_cancelled(
    harness: Harness,
) -> None:
    h = harness
    quick, long = h.launch("quick", 0), h.launch("long", 1)
    unknown = h.key(99)
    async with h.new_driver() as d:
        await d.cancel([unknown])  # nothing submitted yet: not an error
        await d.submit(d.plan([quick, long], await h.facts(d)))
        if h.expected["long"] is None:
            await h.wait_state(d, long.key, S.RUNNING)
        [done] = await h.wait_terminal(d, [quick.key])
        await d.cancel([long.key])
        await d.cancel([long.key, quick.key, unknown])  # again, a finished key, an unknown one
        final = await h.wait_terminal(d, [quick.key, long.key])
        await d.cancel([long.key, quick.key])  # both finished
        after = await d.describe([quick.key, long.key, unknown])
    assert final[0] == done, "cancelling a finished key changes nothing"
    assert final[1].state is final_state(h, "long")
    assert after == [*final, after[2]] and after[2].state is S.UNKNOWN


# -- watch --------------------------------------------------------------------------------------


async def _follow(
    h: Harness, d: Provider, ws: WatchSet, deadline: float
) -> dict[str, list[Report]]:
    """Iterate ``d.watch(ws)`` until the set is empty, advancing time beside it."""
    heard: dict[str, list[Report]] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.keep_advancing, d)
            with anyio.fail_after(deadline):
                async with aclosing(d.watch(ws)) as batches:
                    async for batch in batches:
                        assert batch, "a watch yields no empty batch"
                        for r in batch:
                            said = heard.setdefault(r.key, [])
                            assert not said or said[-1].state not in TERMINAL_PROVIDER_STATES, (
                                f"{r.key} reported after its terminal report"
                            )
                            said.append(r)
                        if not len(ws):
                            break
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the task group's wrapping of one failure
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return heard


async def test_watch_follows_keys_until_terminal(harness: Harness) -> None:
    h = harness
    quick, fail, stray = h.launch("quick", 0), h.launch("fail", 1), h.launch("quick", 2)
    async with h.new_driver() as d:
        await d.submit(d.plan([quick, fail, stray], await h.facts(d)))
        ws = WatchSet([quick.key, fail.key])
        heard = await _follow(h, d, ws, h.timeout)
    assert set(heard) == {quick.key, fail.key}, "only the watched keys are reported"
    assert heard[quick.key][-1].state is h.expected["quick"]
    assert heard[fail.key][-1].state is h.expected["fail"]
    assert len(ws) == 0 and quick.key not in ws, "terminal keys leave the set"
    assert ws.failures == 0


class FlakyDescribe(Provider):
    """Its first two describes fail (retryably), as a provider that is briefly unreachable."""

    flaky_left = 2

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        if self.flaky_left:
            self.flaky_left -= 1
            raise ProviderError("describe: injected outage", provider=self.name, retryable=True)
        return await super().describe(keys)  # type: ignore[safe-super]


class BuggyDescribe(Provider):
    """Its describe has a bug."""

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        raise RuntimeError("a bug in describe")


async def test_watch_counts_failed_describes_and_lets_bugs_escape(harness: Harness) -> None:
    h = harness
    quick = h.launch("quick", 0)
    async with h.new_driver(wrap=FlakyDescribe) as d:
        await d.submit(d.plan([quick], await h.facts(d)))
        ws = WatchSet([quick.key])
        heard = await _follow(h, d, ws, h.timeout)
    assert ws.failures == 2, "each failed describe is counted"
    assert heard[quick.key][-1].state is h.expected["quick"]
    async with h.new_driver(wrap=BuggyDescribe) as buggy:
        with anyio.fail_after(h.timeout), pytest.raises(RuntimeError, match="a bug"):
            async with aclosing(buggy.watch(WatchSet([quick.key]))) as batches:
                async for _ in batches:
                    pass


# -- capabilities -------------------------------------------------------------------------------


async def test_elastic_verbs_need_the_capability(harness: Harness) -> None:
    h = harness
    token = f"c{h.token}-elastic"
    async with h.new_driver() as d:
        caps = d.capabilities
        if Capability.ELASTIC in caps:
            assert h.elastic_pool is not None, "the harness names an elastic pool"
            first = await d.provision(h.elastic_pool, 1, token)
            assert await d.provision(h.elastic_pool, 1, token) == first, "idempotent by token"
            await d.terminate(h.elastic_pool, 1, f"{token}-down")
            await d.terminate(h.elastic_pool, 1, f"{token}-down")
            return
        reason = caps.reason(Capability.ELASTIC)
        assert reason
        with pytest.raises(ProviderError) as grow:
            await d.provision(h.pool, 1, token)
        with pytest.raises(ProviderError) as shrink:
            await d.terminate(h.pool, 1, token)
    for info in (grow, shrink):
        assert info.value.retryable is False
        assert reason in str(info.value), "the error says why"


async def test_logs_yield_the_output_or_the_driver_says_why_not(harness: Harness) -> None:
    h = harness
    async with h.new_driver() as d:
        caps = d.capabilities
        if Capability.LOGS not in caps:
            why = caps.why_not.get(Capability.LOGS, "")
            assert why.strip(), "a driver without LOGS says why in Capabilities.why_not"
            assert caps.reason(Capability.LOGS) == why
            return
        assert caps.reason(Capability.LOGS) == ""
        quick, fail = h.launch("quick", 0), h.launch("fail", 1)
        await d.submit(d.plan([quick, fail], await h.facts(d)))
        await h.wait_terminal(d, [quick.key, fail.key])
        with anyio.fail_after(h.timeout):
            out = b"".join([c async for c in d.logs(quick.key)])
            followed = b"".join([c async for c in d.logs(quick.key, follow=True)])
            err = b"".join([c async for c in d.logs(fail.key, stream="stderr")])
            nothing = [c async for c in d.logs(h.key(99))]
    assert h.output in out
    assert followed == out, "following an ended attempt yields its output and ends"
    assert b"contract-fail" in err
    assert nothing == [], "an unknown key yields nothing"
