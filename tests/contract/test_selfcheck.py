"""The contract suite can fail: each test is run against an in-memory toy driver that keeps
the contract (it passes everything) and against variants that break one rule each (the test
of that rule fails)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import anyio
import pytest

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
    SingleRequest,
    WatchSet,
    command_of,
    request_name,
)
from tests.contract import test_contract as contract
from tests.contract.harness import Harness, Kind, subclass

pytestmark = pytest.mark.anyio
S = ProviderState


class ToyRequest(SingleRequest, frozen=True, kw_only=True):
    kind: str

    def render(self) -> str:
        return f"toy {self.key} {self.kind}"


class Toy(Provider):
    """Keeps the contract: attempts move QUEUED -> RUNNING -> their end, one step per tick."""

    capabilities = Capabilities(
        has=frozenset({Capability.LOGS, Capability.RUNS, Capability.CANCEL_MEMBER}),
        why_not={Capability.ELASTIC: "a toy does not grow"},
    )
    poll_min = 0.01
    poll_max = 0.05

    def __init__(self, name: str) -> None:
        self.name = name
        self.jobs: dict[str, Report] = {}
        self.kinds: dict[str, str] = {}
        self.made = 0

    async def discover(self) -> list[Pool]:
        return [Pool(id="toy", provider=self.name, kind="toy", site="here", cpus=8, memory=1)]

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        out: list[ProviderRequest] = []
        for la in launches:
            try:
                command_of(la)
            except ValueError as e:
                raise ProviderError(f"{la.key}: {e}", provider=self.name, retryable=False) from e
            out.append(ToyRequest(keys=(la.key,), name=self.name_of(la), kind=la.name))
        return out

    def name_of(self, launch: LaunchSpec) -> str:
        return request_name([launch.key])

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        out = []
        for req in requests:
            assert isinstance(req, ToyRequest)
            if req.key not in self.jobs:
                self.made += 1
                self.jobs[req.key] = Report(key=req.key, state=S.QUEUED, job_id=str(self.made))
                self.kinds[req.key] = req.kind
            out.append(self.jobs[req.key])
        return out

    def tick(self) -> None:
        for key, r in self.jobs.items():
            if r.state is S.QUEUED:
                self.jobs[key] = Report(key=key, state=S.RUNNING, job_id=r.job_id)
            elif r.state is S.RUNNING and self.kinds[key] != "long":
                end = S.SUCCEEDED if self.kinds[key] == "quick" else S.FAILED
                self.jobs[key] = Report(key=key, state=end, job_id=r.job_id)

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        return [self.jobs.get(k) or Report(key=k, state=S.UNKNOWN) for k in keys]

    async def cancel(self, keys: Sequence[str]) -> None:
        for k in keys:
            r = self.jobs.get(k)
            if r is not None and r.state not in TERMINAL_PROVIDER_STATES:
                self.jobs[k] = Report(key=k, state=S.CANCELLED, job_id=r.job_id)

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        kind = self.kinds.get(key)
        if kind == "quick" and stream == "stdout":
            yield b"contract-ok\n"
        if kind == "fail" and stream == "stderr":
            yield b"contract-fail\n"


class ToyHarness(Harness):
    name = "toy"
    pool = "toy"
    timeout = 2.0
    expected: ClassVar[Mapping[Kind, ProviderState | None]] = {
        "quick": S.SUCCEEDED,
        "fail": S.FAILED,
        "long": None,
    }

    def __init__(self, tmp: Path, cls: type[Toy] = Toy) -> None:
        super().__init__(tmp)
        self.cls = cls

    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        return subclass(self.cls, wrap)("toy")

    async def advance(self, driver: Provider) -> None:
        assert isinstance(driver, Toy)
        driver.tick()
        await anyio.sleep(0.005)

    async def created(self, driver: Provider) -> int:
        assert isinstance(driver, Toy)
        return driver.made


# -- one broken rule each -------------------------------------------------------------------------


class UnsortedPools(Toy):
    async def discover(self) -> list[Pool]:
        return [*await super().discover(), Pool(id="a", provider=self.name, kind="toy", site="h")]


class PlanReadsTheClock(Toy):
    def name_of(self, launch: LaunchSpec) -> str:
        return request_name([launch.key, str(time.monotonic_ns())])


class PlanTouchesTheDisk(Toy):
    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        Path("/proc/self/stat").read_bytes()
        return super().plan(launches, facts)


class PlanDropsAKey(Toy):
    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return super().plan(launches, facts)[:-1]


class NameFromContent(Toy):
    def name_of(self, launch: LaunchSpec) -> str:
        return request_name([launch.key, *(launch.argv or [])])


class LenientPlan(Toy):
    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return [
            ToyRequest(keys=(la.key,), name=request_name([la.key]), kind=la.name) for la in launches
        ]


class SubmitNotIdempotent(Toy):
    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        for req in requests:
            self.jobs.pop(req.keys[0], None)
        return await super().submit(requests)


class SubmitOutOfOrder(Toy):
    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        return (await super().submit(requests))[::-1]


class DescribeSorted(Toy):
    async def describe(self, keys: Sequence[str]) -> list[Report]:
        return await super().describe(sorted(keys))


class DescribeForgets(Toy):
    """A finished attempt is UNKNOWN once it was reported."""

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        out = await super().describe(keys)
        for r in out:
            if r.state in TERMINAL_PROVIDER_STATES:
                del self.jobs[r.key]
        return out


class CancelUnknownFails(Toy):
    async def cancel(self, keys: Sequence[str]) -> None:
        if any(k not in self.jobs for k in keys):
            raise ProviderError("no such job", provider=self.name, retryable=False)
        await super().cancel(keys)


class CancelFails(Toy):
    async def cancel(self, keys: Sequence[str]) -> None:
        for k in keys:
            r = self.jobs.get(k)
            if r is not None and r.state not in TERMINAL_PROVIDER_STATES:
                self.jobs[k] = Report(key=k, state=S.FAILED, job_id=r.job_id)


class WatchNaive(Toy):
    """Yields every report at every poll: terminal keys stay, failed describes escape."""

    async def watch(
        self, keys: WatchSet, *, renew_every: float = 60.0
    ) -> AsyncIterator[list[Report]]:
        while True:
            await anyio.sleep(self.poll_min)
            yield await self.describe(keys.keys())


class ElasticRetryable(Toy):
    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        raise ProviderError("later", provider=self.name, retryable=True)


class SilentAboutLogs(Toy):
    capabilities = Capabilities(has=frozenset({Capability.RUNS}))


class LogsOfUnknownFail(Toy):
    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        if key not in self.kinds:
            raise ProviderError("no such key", provider=self.name, retryable=False)
        async for chunk in super().logs(key, stream=stream, follow=follow):
            yield chunk


ContractTest = Callable[[Harness], Awaitable[None]]


async def _bad_launches(h: Harness) -> None:
    for case in contract.BAD_LAUNCHES:
        await contract.test_plan_rejects_bad_launches(h, case)


BROKEN: list[tuple[type[Toy], ContractTest]] = [
    (UnsortedPools, contract.test_discover_lists_pools_in_a_stable_order),
    (PlanReadsTheClock, contract.test_plan_is_pure),
    (PlanTouchesTheDisk, contract.test_plan_is_pure),
    (PlanDropsAKey, contract.test_plan_puts_every_key_in_exactly_one_request),
    (NameFromContent, contract.test_request_names_depend_on_keys_alone),
    (LenientPlan, _bad_launches),
    (SubmitNotIdempotent, contract.test_submit_reports_each_key_in_order_and_is_idempotent),
    (SubmitOutOfOrder, contract.test_submit_reports_each_key_in_order_and_is_idempotent),
    (DescribeSorted, contract.test_describe_answers_in_keys_order_and_keeps_terminal_reports),
    (DescribeForgets, contract.test_describe_answers_in_keys_order_and_keeps_terminal_reports),
    (CancelUnknownFails, contract.test_cancel_is_idempotent_and_ends_a_running_attempt_cancelled),
    (CancelFails, contract.test_cancel_is_idempotent_and_ends_a_running_attempt_cancelled),
    (WatchNaive, contract.test_watch_follows_keys_until_terminal),
    (WatchNaive, contract.test_watch_counts_failed_describes_and_lets_bugs_escape),
    (ElasticRetryable, contract.test_elastic_verbs_need_the_capability),
    (SilentAboutLogs, contract.test_logs_yield_the_output_or_the_driver_says_why_not),
    (LogsOfUnknownFail, contract.test_logs_yield_the_output_or_the_driver_says_why_not),
]

EVERY_TEST: list[ContractTest] = sorted(
    {test for _, test in BROKEN if test is not _bad_launches} | {_bad_launches},
    key=lambda t: t.__name__,
)


def test_every_contract_test_is_checked_here() -> None:
    names = {n for n in dir(contract) if n.startswith("test_")}
    checked = {t.__name__ for t in EVERY_TEST} - {"_bad_launches"}
    assert names - checked == {"test_plan_rejects_bad_launches"}


@pytest.mark.parametrize("test", EVERY_TEST, ids=lambda t: t.__name__)
async def test_the_toy_driver_passes(test: ContractTest, tmp_path: Path) -> None:
    await test(ToyHarness(tmp_path))


@pytest.mark.parametrize(
    ("broken", "test"),
    BROKEN,
    ids=[f"{cls.__name__}-{test.__name__}" for cls, test in BROKEN],
)
async def test_a_broken_driver_fails(broken: type[Toy], test: ContractTest, tmp_path: Path) -> None:
    with pytest.raises((AssertionError, ProviderError, TimeoutError, pytest.fail.Exception)):
        await test(ToyHarness(tmp_path, broken))
