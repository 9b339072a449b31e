"""What providers tell the core: the provider-neutral view of one attempt.

Defined here, in the core, because the core consumes it; drivers in ``stowplan.providers``
produce it (and re-export it from ``providers.base``).
"""

from __future__ import annotations

import enum

from msgspec import Struct, field

from stowplan.spec.models import FailureClass


class ProviderState(enum.StrEnum):
    """Our view of a provider's job state."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    """The provider does not know the key (never submitted, or long forgotten)."""


TERMINAL_PROVIDER_STATES = frozenset(
    {ProviderState.SUCCEEDED, ProviderState.FAILED, ProviderState.CANCELLED}
)


class Report(Struct, frozen=True, kw_only=True):
    """What a provider says about one attempt."""

    key: str
    state: ProviderState
    failure: FailureClass | None = None
    job_id: str | None = None
    node: str | None = None
    devices: tuple[int, ...] | None = None
    """the GPU device indices the attempt was bound to, where the provider chose them itself
    (Slurm's GRES binding); None: not reported (the core's lease, if any, stands)."""
    exit_code: int | None = None
    message: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    """artifact name (a declared file, or ``<dir>/<path>`` for each file under a declared
    directory) -> absolute path where the provider left it (on success)"""
    used: bytes | None = None
    """What the attempt's Python processes imported, where the provider captured it: the
    msgspec JSON of a ``provenance.imports.UsedRecord`` (opaque to the core, which only carries
    it to the store). Identical records are byte-identical, so the store keeps each once."""
