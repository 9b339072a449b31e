"""A provider that accepts every attempt and reports it finished at once, running nothing.

For control-plane tests and benchmarks: it measures stowplan's own overhead, with no process,
file or network cost behind it. Reports carry no outputs, since nothing ran.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from stowplan.placement.problem import Pool
from stowplan.providers.base import (
    Capabilities,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
)
from stowplan.spec.models import InstantProviderConfig

UNLIMITED_CPUS = 1e9
UNLIMITED_MEMORY = 1 << 60


class InstantRequest(ProviderRequest, frozen=True, kw_only=True):
    name: str = ""

    def render(self) -> str:
        return f"# instant attempt {self.key}: task {self.name}, completes at once, runs nothing"


class InstantProvider(Provider):
    capabilities = Capabilities(
        gpus=True, arrays=True, cannot={"run": "runs nothing: every attempt succeeds at once"}
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

    def plan(self, launches: Sequence[LaunchSpec]) -> list[ProviderRequest]:
        return [InstantRequest(key=launch.key, name=launch.name) for launch in launches]

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        now = time.time()
        reports = self._reports
        out = []
        for req in requests:
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
