"""What the run store keeps: one Struct per table row, encoded with msgspec.

States and failure classes are stored as their string values (``TaskState.value``,
``FailureClass.value``) so the store does not depend on the scheduler's enums.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from msgspec import Struct, field


class ExperimentRecord(Struct, frozen=True, kw_only=True):
    id: str
    """spec hash of the canonical experiment (with its effective policy)."""
    name: str
    project: str
    description: str
    file: str
    spec: dict[str, Any]
    """canonical experiment spec, defaults explicit."""
    created_at: float


class RunRecord(Struct, frozen=True, kw_only=True):
    run_id: str
    experiment_id: str
    experiment: str
    task: str
    index: int
    """trial index within the task's sweep (0 for a task without a sweep)."""
    params: dict[str, Any]
    seed: int
    replicate: int
    depends_on: list[str]
    """run ids this run waits for."""
    identity: dict[str, Any]
    """the RunIdentity whose hash is run_id."""
    task_spec: dict[str, Any]
    """``{"payload": ...}``: what the queue needs to launch the run (needs, policy, the command
    with this trial's values filled in). The task as written is in the experiment record."""
    provenance: str
    """hash of the ProvenanceRecord (code, environment, hardware) captured at submission."""
    state: str = "PENDING"
    attempts: int = 0
    failure: str | None = None
    reason: str = ""
    pool: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


class NewRunRecord(Struct, frozen=True, kw_only=True):
    """A run as it is first written (``RunStore.put_runs``), made straight from its plan: a
    PENDING ``RunRecord`` whose ``identity`` and ``task_spec`` are still the Structs they are
    made from (the ``RunIdentity``; ``{"payload": RunPayload}``). The store encodes Structs to
    the JSON their builtins encode to, byte for byte, so the row is the one the ``RunRecord``
    would have made, without 10^5 runs' worth of builtins made first and thrown away."""

    run_id: str
    experiment_id: str
    experiment: str
    task: str
    index: int
    params: dict[str, Any]
    seed: int
    replicate: int
    depends_on: list[str]
    identity: Any
    task_spec: Any
    provenance: str
    created_at: float
    updated_at: float
    state: str = "PENDING"
    attempts: int = 0
    failure: None = None
    reason: str = ""
    pool: None = None


class AttemptRecord(Struct, frozen=True, kw_only=True):
    key: str
    run_id: str
    attempt: int
    provider: str
    pool: str
    state: str
    """SUBMITTING when written ahead of the submit, then the provider's view."""
    job_id: str | None = None
    node: str | None = None
    exit_code: int | None = None
    failure: str | None = None
    message: str = ""
    intent_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    used: str | None = None
    """SHA-256 of what the attempt's Python processes imported (``RunStore.get_used``), where
    its provider captured that; None when nothing was captured."""
    instance_type: str | None = None
    """on a priced (cloud) provider: the instance type the attempt ran on, e.g. ``g5.xlarge``."""
    market: str | None = None
    """``on-demand`` or ``spot`` (priced providers only)."""
    billed_s: float | None = None
    """instance-seconds billed to this attempt (``stowplan.providers.aws.prices.bill``)."""
    usd: float | None = None
    """dollars billed to this attempt: ``billed_s`` at the pool's hourly price."""
    devices: str | None = None
    """in a pool that knows its devices (``Pool.devices``): the GPU device indices the attempt
    holds on ``node``, comma-joined ("0,1"; "" for none), as the core leased them with the
    intent, then as the provider reported binding them (Slurm); None elsewhere."""


class TransitionRecord(Struct, frozen=True, kw_only=True):
    """One lifecycle step of a run, appended to the events table."""

    run_id: str
    attempt: int
    from_state: str
    to_state: str
    at: float
    failure: str | None = None
    reason: str = ""
    pool: str | None = None


class ArtifactRecord(Struct, frozen=True, kw_only=True):
    run_id: str
    name: str
    sha256: str
    size: int
    path: str
    """where the content-addressed copy lives (inside the store's blob directory)."""


class ProvenanceRecord(Struct, frozen=True, kw_only=True):
    """Code, environment, hardware and data as captured on the submitting machine."""

    code: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    """uri -> ``DataVersionRecord`` as builtins, for every input of every task."""


class PlacementRecord(Struct, frozen=True, kw_only=True):
    """The placement decision behind one attempt of a run, as the queue actor dispatched it."""

    run_id: str
    attempt: int
    request_id: int
    provider: str
    pool: str
    hardware_class: str
    status: str
    """OPTIMAL, FEASIBLE, GREEDY or GREEDY_FALLBACK."""
    objective: float
    bound: float
    gap: float
    terms: dict[str, float]
    """this run's share of each objective term."""
    problem: str
    """SHA-256 of the blob (``RunStore.put_blob``) holding the encoded problem and solution."""
    at: float


LedgerAction = Literal["submit", "cancel", "retry", "replay", "policy-override", "approval"]
LEDGER_ACTIONS: tuple[LedgerAction, ...] = get_args(LedgerAction)


class LedgerEntry(Struct, frozen=True, kw_only=True):
    """One line of the append-only audit ledger.

    ``hash`` is the SHA-256 of the canonical JSON of every other field (``prev`` included), so
    each entry commits to the whole chain before it.
    """

    seq: int
    at: float
    who: str
    """the OS user who acted."""
    action: LedgerAction
    target: str
    """what was acted on: a run id, an experiment id or name."""
    why: str
    details: dict[str, Any] = field(default_factory=dict)
    prev: str
    """hash of the entry before (64 zeros for the first)."""
    hash: str = ""


class ReplayRecord(Struct, frozen=True, kw_only=True):
    """A run made by ``stowplan replay`` from the record of another run."""

    run_id: str
    of_run_id: str
    at: float
    verdict: str | None = None
    """REPRODUCED or DIFFERS once verified; None before (or without ``--verify``)."""
    differences: list[str] = field(default_factory=list)
