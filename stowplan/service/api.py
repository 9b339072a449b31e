"""The HTTP API's own request and answer types (what ``views`` returns travels as is).

Requests are frozen, keyword-only and forbid unknown fields, like everything users write;
every string that becomes a path on the server has a pattern that cannot climb out of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

API_PREFIX: Final = "/api/v1"

REQUEST_ID_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{7,127}\Z"
FILE_NAME_PATTERN: Final = r"\A[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.(toml|yaml|yml)\Z"
REL_PATH_PATTERN: Final = (
    r"\A(?!.*(?:\A|/)\.\.?(?:/|\Z))[A-Za-z0-9_.-]{1,128}(/[A-Za-z0-9_.-]{1,128}){0,15}\Z"
)
"""A relative path: up to 16 parts of letters, digits, '_', '.', '-'; no '.' or '..' part."""
RUN_REF_PATTERN: Final = r"\A[0-9a-f]{6,64}\Z"
EXPERIMENT_REF_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z"
"""An experiment's name or id; also a provider's name."""
WHY_PATTERN: Final = r"\A[^\x00-\x08\x0b-\x1f\x7f]*\Z"
LINEAGE_TARGET_PATTERN: Final = r"\A(sha256:)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z"
"""A run id or artifact hash (prefix), or an output's name."""
FILTER_PATTERN: Final = r"\A[^\x00-\x1f\x7f]{1,256}\Z"
"""A ``find`` filter's value: up to 256 characters, none a control character."""

PATTERN_TEXT: Final = {
    REQUEST_ID_PATTERN: "must be 8 to 128 letters, digits, '_', '.' or '-', starting with a "
    "letter or digit (a UUID will do)",
    FILE_NAME_PATTERN: "must be a plain file name ending .toml, .yaml or .yml (no directory)",
    REL_PATH_PATTERN: "must be a relative path of parts made of letters, digits, '_', '.', '-' "
    "(no '..', no leading '/')",
    EXPERIMENT_REF_PATTERN: "must be a name: letters, digits, '_', '.' or "
    "'-', starting with a letter or digit",
    WHY_PATTERN: "must not contain control characters",
    RUN_REF_PATTERN: "must be 6 to 64 hex digits of a run id",
    LINEAGE_TARGET_PATTERN: "must be a run id or artifact hash (prefix) or an output's name",
    FILTER_PATTERN: "must be 1 to 256 characters, none of them a control character",
}
"""Each string pattern of the API and how to say it to a person (the 400's message)."""

RequestId = Annotated[
    str,
    Meta(
        pattern=REQUEST_ID_PATTERN,
        description="8 to 128 letters, digits, '_', '.', '-' chosen by the client (a UUID); "
        "the same id retried returns the first answer",
    ),
]
FileName = Annotated[
    str, Meta(pattern=FILE_NAME_PATTERN, description="a file name ending .toml, .yaml or .yml")
]
RelPath = Annotated[
    str,
    Meta(
        pattern=REL_PATH_PATTERN,
        description="a relative path of letters, digits, '_', '.', '-' parts; no '..'",
    ),
]
Why = Annotated[str, Meta(max_length=1000, pattern=WHY_PATTERN)]
ProviderName = Annotated[str, Meta(pattern=EXPERIMENT_REF_PATTERN)]


class SubmitRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/experiments``: an experiment file and the files its tasks name.

    The providers, store and policy defaults are the lab's (the service's ``stowplan.toml``):
    a submission cannot configure where the lab's work runs."""

    request_id: RequestId
    filename: FileName
    experiment: Annotated[str, Meta(max_length=1 << 20)]
    """the experiment file's text (TOML or YAML, by ``filename``)."""
    files: dict[RelPath, bytes] = msgspec.field(default_factory=dict)
    """files beside the experiment file, by relative path (JSON: base64)."""
    provider: ProviderName | None = None
    why: Why = ""


def files_clash(filename: str, files: Iterable[str]) -> str | None:
    """What makes a submission's files impossible to write beside its experiment file: a
    name that is a file and also the directory of another (``a`` and ``a/b``), said for the
    400; None when there is none."""
    dirs: dict[str, str] = {}
    for name in sorted(files):
        parts = name.split("/")
        for i in range(1, len(parts)):
            dirs.setdefault("/".join(parts[:i]), name)
    for name in sorted({filename, *files}):
        if name in dirs:
            return (
                f"{name!r} is a file and also the directory of {dirs[name]!r}: a name can be "
                "only one of them"
            )
    return None


class PlanRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/plan``: what ``stowplan plan`` would show for this experiment on the
    lab's providers; nothing is submitted or recorded."""

    filename: FileName
    experiment: Annotated[str, Meta(max_length=1 << 20)]
    files: dict[RelPath, bytes] = msgspec.field(default_factory=dict)
    provider: ProviderName | None = None
    explain: Annotated[str, Meta(pattern=RUN_REF_PATTERN)] | None = None
    """a run id prefix: explain that run's placement (``plan --explain``)."""
    budget: Annotated[float, Meta(ge=0, le=3600)] | None = None
    json: bool = False


class PlanResponse(msgspec.Struct, frozen=True, kw_only=True):
    exit_code: int
    output: str
    """what ``stowplan plan`` printed (its table, or its JSON document with ``json``)."""
    errors: str = ""
    """what it said on stderr (notes; the error when ``exit_code`` is not 0)."""
    queue: list[str] = msgspec.field(default_factory=list)
    """with ``explain``, for a run waiting in the service's queue: why it waits there now (an
    approval, a team's quota, a budget; the runs ahead of it by priority and fair share). In
    text form these lines end ``output`` too."""


ReplayTarget = Annotated[
    str,
    Meta(pattern=EXPERIMENT_REF_PATTERN, description="a run id (prefix) or an experiment name"),
]
MetricName = Annotated[str, Meta(pattern=EXPERIMENT_REF_PATTERN)]


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/replays``: rebuild recorded runs from the service's store and run them
    again on the lab's control plane (``stowplan replay --server``). The recorded code is
    checked out on the server and kept until the replay's runs end; the verdict follows."""

    request_id: RequestId
    targets: Annotated[list[ReplayTarget], Meta(min_length=1, max_length=1000)]
    provider: ProviderName | None = None
    verify: bool = False
    strict_env: bool = False
    tolerance: Annotated[float, Meta(ge=0)] | None = None
    metric_tolerances: dict[MetricName, Annotated[float, Meta(ge=0)]] = msgspec.field(
        default_factory=dict
    )
    why: Why = ""


class ReplayStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A replay the service runs: ``GET /api/v1/replays/{request_id}`` until ``done``."""

    request_id: str
    experiment_id: str
    run_ids: list[str]
    """the replay's runs (the new ones)."""
    notes: list[str] = msgspec.field(default_factory=list)
    """what ``stowplan replay`` says on stderr: environment differences, notes, unpinned runs."""
    done: bool = False
    """every run of the replay ended and the verdict (``outcome``) is in."""
    outcome: dict[str, Any] | None = None
    """``provenance.replay.ReplayOutcome`` once ``done``: each replay's state and verdict."""
    error: str = ""
    """why the replay could not be followed to its end (``done`` and no ``outcome``)."""


class SubmitResponse(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    experiment_id: str
    name: str
    runs: int
    submitted: int
    reused: int
    notes: list[str] = msgspec.field(default_factory=list)
    run_ids: list[str] = msgspec.field(default_factory=list)
    """every run of the submission (submitted and reused), to follow them by."""


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    why: Why = "cancelled by user"


class CancelResponse(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    cancelled: int


class DecideRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/runs/{ref}/approve`` or ``/reject``: why (the ledger keeps it)."""

    why: Why


class DecideResponse(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    decision: Literal["approve", "reject"]
    decided: int
    """1 when the run was waiting for approval and now is not; 0 when it was not waiting."""
    state: str
    """the run's state now."""


class CancelExperimentResponse(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /api/v1/experiments/{ref}/cancel``: every unfinished run of it."""

    experiment: str
    cancelled: int
    run_ids: list[str]


LOG_EVENT_CHUNK: Final = "chunk"
"""``GET /api/v1/runs/{ref}/logs`` (server-sent events): ``data`` is a base64 chunk of the
log, ``id`` the byte offset where the chunk ends; send it back as ``Last-Event-ID`` to
resume after a dropped connection."""
LOG_EVENT_END: Final = "end"
"""The log is complete (or, without ``follow``, everything written so far was sent)."""
LOG_EVENT_ERROR: Final = "error"
"""The provider failed while reading; ``data`` says why. The stream ends."""


class TeamUse(msgspec.Struct, frozen=True, kw_only=True):
    """One team's use of the lab against its limits (``stowplan quota``)."""

    team: str
    holds: dict[str, int]
    """GPU model -> GPUs its runs hold now."""
    waiting_gpus: int
    """GPUs its READY runs wait for."""
    gpu_hours: float
    """GPU-hours used in its window."""
    gpu_hours_limit: float | None
    window_s: float
    guaranteed_gpus: dict[str, int]
    max_gpus: dict[str, int]
    weight: float
    monthly_usd: float | None = None
    """its cloud spend limit per calendar month (UTC); None: no limit."""
    spent_usd: float = 0.0
    """dollars recorded for its attempts this month."""
    running_usd: float = 0.0
    """estimated dollars of its runs on cloud pools now."""


class Health(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    detail: str = ""


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Every 4xx/5xx answer."""

    status_code: int
    detail: str
