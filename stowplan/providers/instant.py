"""A provider that accepts every attempt and reports it finished at once, running nothing.

For control-plane tests and benchmarks: it measures stowplan's own overhead, with no process,
file or network cost behind it. Reports carry no outputs, since nothing ran.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from stowplan.errors import InternalError, ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.base import (
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
    command_of,
    request_name,
)
from stowplan.spec.models import InstantProviderConfig

UNLIMITED_CPUS = 1e9
UNLIMITED_MEMORY = 1 << 60


class InstantRequest(SingleRequest, frozen=True, kw_only=True):
    task: str = ""

    def render(self) -> str:
        return f"# instant attempt {self.key}: task {self.task}, completes at once, runs nothing"


class InstantProvider(Provider):
    capabilities = Capabilities(
        has=frozenset(
            {
                Capability.GPUS,
                Capability.CANCEL_MEMBER,
                Capability.CONTAINERS,
                Capability.SECRETS,
                Capability.OUTPUTS,
            }
        ),
        why_not={
            Capability.RUNS: "runs nothing: every attempt succeeds at once",
            Capability.LOGS: "runs nothing, so there is no output to show",
            Capability.ARRAYS: "one request per attempt",
            Capability.ELASTIC: "its one pool is unlimited already",
        },
    )

    def __init__(
        self,
        name: str,
        config: InstantProviderConfig | None = None,
        *,
        state_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.config = config if config is not None else InstantProviderConfig()
        self._reports: dict[str, Report] = {}

    @property
    def submitted_count(self) -> int:
        """Distinct keys submitted; a repeated submit of a key is not counted again."""
        return len(self._reports)

    async def discover(self) -> list[Pool]:
        return [
            Pool(
                id=self.name,
                provider=self.name,
                kind="instant",
                site=self.config.site,
                cpus=UNLIMITED_CPUS,
                memory=UNLIMITED_MEMORY,
                hardware_class="instant",
            )
        ]

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        out: list[ProviderRequest] = []
        for launch in launches:
            try:
                command_of(launch)
            except ValueError as e:
                raise ProviderError(
                    f"attempt {launch.key!r}: {e}", provider=self.name, retryable=False
                ) from None
            out.append(
                InstantRequest(
                    keys=(launch.key,), name=request_name([launch.key]), task=launch.name
                )
            )
        return out

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        now = time.time()
        reports = self._reports
        out = []
        for req in requests:
            if not isinstance(req, InstantRequest):
                raise InternalError(f"{self.name}: the instant driver got a {type(req).__name__}")
            key = req.key
            report = reports.get(key)
            if report is None:
                report = Report(
                    key=key,
                    state=ProviderState.SUCCEEDED,
                    job_id=key,
                    node=self.name,
                    exit_code=0,
                    started_at=now,
                    ended_at=now,
                )
                reports[key] = report
            out.append(report)
        return out

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        reports = self._reports
        return [reports.get(key) or Report(key=key, state=ProviderState.UNKNOWN) for key in keys]

    async def cancel(self, keys: Sequence[str]) -> None:
        return None

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        nothing: tuple[bytes, ...] = ()
        for chunk in nothing:  # nothing ran, so there is nothing to show
            yield chunk
