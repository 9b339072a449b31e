"""What users write: experiments, tasks, resources, data inputs, sweeps, policies, projects.

Every Struct here is frozen, keyword-only and forbids unknown fields, so a typo is an error
with a ``$.path`` rather than a silently ignored setting. Values that users write in human
units (``memory = "4GiB"``, ``timeout = "2h"``) are normalised in ``__post_init__`` to bytes
and seconds, so two spellings of the same request encode, and hash, the same way.

Every number and every name goes through one of the constrained types below (``Cpus``,
``Seed``, ``Name``, ``Label``, ...), so the same kind of input gets the same check wherever the
schema takes it: no NaN or infinity, nothing beyond what the system can represent (the limits
are in :mod:`stowplan.spec.units`), no control characters in names and paths, and patterns
anchored with ``\\A``/``\\Z`` (``$`` would accept a trailing newline).
"""

from __future__ import annotations

import enum
import math
import sys
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct, field
from msgspec.structs import force_setattr

if TYPE_CHECKING:
    from stowplan.scheduler.share import TeamLimits

from stowplan.spec.units import (
    MAX_BUDGET_S,
    MAX_COUNT,
    MAX_CPUS,
    MAX_DURATION_S,
    MAX_GPUS,
    MAX_INT,
    MAX_PRIORITY,
    MAX_SEED,
    MAX_SWEEP_SIZE,
    MAX_WEIGHT,
    parse_duration,
    parse_size,
)

# ---- names and text: one pattern per kind, each described in PATTERNS for error messages ---

NAME_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z"
IDENTIFIER_PATTERN: Final = r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z"
LABEL_PATTERN: Final = r"\A[^\x00-\x1f\x7f]{1,256}\Z"
PATH_PATTERN: Final = r"\A[^\x00-\x1f\x7f]{1,4096}\Z"
ARG_PATTERN: Final = r"\A[^\x00]*\Z"
PREFIX_PATTERN: Final = r"\A[A-Za-z0-9_.-]{0,32}\Z"
IMAGE_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9._/:@-]{0,511}\Z"
SECRET_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9._/-]{0,252}(#[A-Za-z0-9._-]{1,253})?\Z"

PATTERNS: Final = {
    NAME_PATTERN: "a name must be 1 to 128 letters, digits, '_', '.' or '-', starting with a "
    "letter or digit",
    IDENTIFIER_PATTERN: "an identifier must be 1 to 128 letters, digits or '_', not starting "
    "with a digit",
    LABEL_PATTERN: "must be 1 to 256 characters without control characters (newline, tab, "
    "NUL, ...)",
    PATH_PATTERN: "a path or URI must be 1 to 4096 characters without control characters "
    "(newline, tab, NUL, ...)",
    ARG_PATTERN: "must not contain NUL characters (a program cannot receive them)",
    PREFIX_PATTERN: "must be up to 32 letters, digits, '_', '.' or '-'",
    IMAGE_PATTERN: "is not a container image: write registry/name:tag or name@sha256:digest, "
    "up to 512 letters, digits and '.', '_', '-', '/', ':', '@', without spaces",
    SECRET_PATTERN: "is not a secret name: 1 to 253 letters, digits and '.', '_', '-', '/', "
    "starting with a letter or digit, optionally followed by '#' and the entry within the "
    "secret",
}
"""Every string pattern of the schema and how to say it to a person (the loader's messages)."""

Name = Annotated[str, Meta(pattern=NAME_PATTERN, description=PATTERNS[NAME_PATTERN])]
"""Tasks, experiments, projects, providers: what appears in ids, paths and job names."""
Identifier = Annotated[str, Meta(pattern=IDENTIFIER_PATTERN)]
"""Environment variable and sweep parameter names."""
Label = Annotated[str, Meta(pattern=LABEL_PATTERN)]
"""Sites, pools, GPU models, residency rules, partitions: free-form, one line."""
PathText = Annotated[str, Meta(pattern=PATH_PATTERN)]
"""File paths and URIs."""
Arg = Annotated[str, Meta(pattern=ARG_PATTERN)]
"""Command arguments, scripts, environment values, parameter values."""

# ---- numbers: finite, and within what the system can represent (stowplan.spec.units) -----

Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
"""Any finite float: the bounds reject NaN and both infinities."""
Int64 = Annotated[int, Meta(ge=-MAX_INT, le=MAX_INT)]
Scalar = Arg | Int64 | Finite | bool
PositiveInt = Annotated[int, Meta(gt=0, le=MAX_COUNT)]
NonNegInt = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Cpus = Annotated[float, Meta(gt=0, le=MAX_CPUS)]
Gpus = Annotated[int, Meta(ge=0, le=MAX_GPUS)]
GpuRequest = Gpus | Annotated[float, Meta(ge=0, le=MAX_GPUS)]
"""A task's GPUs: whole devices, or a share of one (0 < gpus < 1, in thousandths)."""
GPU_MILLI = 1000
MAX_NODES: Final = 2**16
Nodes = Annotated[int, Meta(ge=1, le=MAX_NODES)]
"""Thousandths of one GPU: the grain of a share (``Resources.gpu_milli``)."""
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
Priority = Annotated[int, Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]
Weight = Annotated[float, Meta(ge=0, le=MAX_WEIGHT)]
Backoff = Annotated[float, Meta(ge=0, le=MAX_DURATION_S)]
SweepSize = Annotated[int, Meta(gt=0, le=MAX_SWEEP_SIZE)]
Budget = Annotated[float, Meta(ge=0, le=MAX_BUDGET_S)]
Bytes = int | str
"""A size: bytes, or text such as "4GiB" (normalised to bytes, at most ``MAX_BYTES``)."""
Duration = float | str
"""Seconds, or text such as "30m" or "1:30:00" (normalised to seconds)."""


def output_path_problem(out: str) -> str | None:
    """Why ``out`` cannot be a declared output, or None. A trailing '/' declares a directory."""
    if not out.strip():
        return "is empty"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in out):
        return "contains a control character (newline, tab, NUL, ...)"
    if out.startswith("/"):
        return "is absolute; give a path relative to the attempt directory"
    if len(out) > 4096:
        return "is longer than 4096 characters"
    parts = out.removesuffix("/").split("/")
    if "" in parts:
        return "has an empty component ('//'); write each directory once"
    if ".." in parts or "." in parts:
        return "has a '.' or '..' component; name the path from the attempt directory down"
    return None


class FailureClass(enum.StrEnum):
    """Why an attempt failed; the retry policy decides per class."""

    USER_ERROR = "user_error"
    OUT_OF_MEMORY = "out_of_memory"
    TIMEOUT = "timeout"
    PREEMPTED = "preempted"
    NODE_FAILURE = "node_failure"
    PROVIDER_TRANSIENT = "provider_transient"
    PROVIDER_REJECTED = "provider_rejected"
    NO_CAPACITY = "no_capacity"
    """the pool could not start the attempt (no node or instance for it); it never ran. The
    scheduler re-places it at once elsewhere, outside the retry policy (``retry.on`` does not
    list it): ``CoreConfig.no_capacity_cooldown``, ``CoreConfig.max_replaces``."""
    LOST = "lost"
    UNHEALTHY = "unhealthy"
    """a service's health check failed ``failures`` times in a row: the attempt was stopped
    and the service restarted (``ServiceSpec``)."""
    DEPENDENCY_FAILED = "dependency_failed"
    CANCELLED = "cancelled"


INFRASTRUCTURE_FAILURES: tuple[FailureClass, ...] = (
    FailureClass.PREEMPTED,
    FailureClass.NODE_FAILURE,
    FailureClass.PROVIDER_TRANSIENT,
    FailureClass.LOST,
)


class _Spec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Resources(_Spec, frozen=True):
    """What one attempt needs. ``memory`` accepts "4GiB"-style text and is stored in bytes.

    ``gpus`` is a number of whole GPUs, or a share of one GPU below 1 (``0.25``, to the
    thousandth): a share runs beside other shares on one device where the pool shares its
    GPUs (the local provider; Kubernetes nodes that time-slice their GPUs, where it holds
    whole replicas, rounded up), and holds a whole device elsewhere (``gpu_devices``).

    ``nodes`` above 1 asks for a gang: that many nodes at once, each with ``cpus``, ``memory``
    and ``gpus``; the command runs once, on the first, and starts the work on the others
    itself (``srun``, ``torchrun``). Only a Slurm partition runs them (``--nodes``)."""

    cpus: Cpus = 1.0
    memory: Bytes = "1GiB"
    gpus: GpuRequest = 0
    gpu_type: Label | list[Label] | None = None
    walltime: Duration | None = None
    nodes: Nodes = 1

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "memory", parse_size(self.memory))
        except ValueError as e:
            raise ValueError(f"memory: {e}") from None
        if self.walltime is not None:
            try:
                force_setattr(self, "walltime", parse_duration(self.walltime))
            except ValueError as e:
                raise ValueError(f"walltime: {e}") from None
        if isinstance(self.gpus, float):
            force_setattr(self, "gpus", _gpu_request(self.gpus))
        if self.nodes > 1 and isinstance(self.gpus, float):
            raise ValueError(
                f"gpus: a share of one GPU ({self.gpus:g}) runs on one node, and nodes = "
                f"{self.nodes}; ask for whole GPUs on each node (gpus = 1), or nodes = 1"
            )
        if isinstance(self.gpu_type, str):
            force_setattr(self, "gpu_type", [self.gpu_type])
        if self.gpu_type is not None:
            if not self.gpu_type:
                raise ValueError("gpu_type: an empty list accepts no GPU; leave it out instead")
            if self.gpus == 0:
                raise ValueError("gpu_type is set but gpus = 0; ask for at least one GPU")
            force_setattr(self, "gpu_type", sorted(set(self.gpu_type)))

    @property
    def memory_bytes(self) -> int:
        assert isinstance(self.memory, int)  # normalised in __post_init__
        return self.memory

    @property
    def gpu_types(self) -> tuple[str, ...]:
        return tuple(self.gpu_type) if isinstance(self.gpu_type, list) else ()

    @property
    def gpu_devices(self) -> int:
        """The devices it asks for: a share asks for one."""
        return 1 if isinstance(self.gpus, float) else self.gpus

    @property
    def gpu_milli(self) -> int:
        """Thousandths of each device it takes: ``GPU_MILLI`` for whole GPUs."""
        return round(self.gpus * GPU_MILLI) if isinstance(self.gpus, float) else GPU_MILLI


def _gpu_request(gpus: float) -> int | float:
    """``gpus`` given as a decimal: a whole number of GPUs (``2.0`` is ``2``), or a share of
    one GPU in thousandths; anything else is refused, saying what to write."""
    if gpus == int(gpus):
        return int(gpus)
    if gpus > 1:
        raise ValueError(
            f"gpus: {gpus:g} is more than one GPU but not a whole number; a task takes "
            f"whole GPUs or a share of one, so write {math.floor(gpus)} or {math.ceil(gpus)}"
        )
    milli = round(gpus * GPU_MILLI)
    if milli == 0 or abs(gpus * GPU_MILLI - milli) > 1e-6:
        raise ValueError(
            f"gpus: {gpus!r} is not a share in thousandths of one GPU; write e.g. "
            f"{max(1, milli) / GPU_MILLI:g}"
        )
    return milli / GPU_MILLI


class DataInput(_Spec, frozen=True):
    """One input: a URI (local path, file://, s3://, ...), an optional pinned version and size."""

    uri: PathText
    version: Label | None = None
    size: Bytes | None = None
    sites: list[Label] = field(default_factory=list)
    """Sites holding a replica; placement prefers pools there. Empty: location unknown."""
    residency: Label | None = None
    """A residency rule of the project (``[placement.residency]``): where this data may go."""

    def __post_init__(self) -> None:
        if not self.uri.strip():
            raise ValueError("uri: must not be empty")
        if self.size is not None:
            try:
                force_setattr(self, "size", parse_size(self.size))
            except ValueError as e:
                raise ValueError(f"size: {e}") from None


class Uniform(_Spec, frozen=True, tag_field="type", tag="uniform"):
    low: Finite
    high: Finite

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"uniform needs low < high, got low={self.low} high={self.high}")
        if not math.isfinite(self.high - self.low):
            raise ValueError(
                f"uniform range from {self.low:g} to {self.high:g} is wider than a float can "
                "hold; narrow it"
            )


class LogUniform(_Spec, frozen=True, tag_field="type", tag="loguniform"):
    low: Finite
    high: Finite

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(
                f"loguniform needs 0 < low < high, got low={self.low} high={self.high}"
            )


class IntRange(_Spec, frozen=True, tag_field="type", tag="int"):
    """Integers from ``low`` to ``high`` inclusive."""

    low: Int64
    high: Int64

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"int range needs low <= high, got low={self.low} high={self.high}")


class Choice(_Spec, frozen=True, tag_field="type", tag="choice"):
    values: list[Scalar]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("choice needs at least one value")


Domain = list[Scalar] | Uniform | LogUniform | IntRange | Choice
SweepMethod = Literal["grid", "random", "sobol"]


class Sweep(_Spec, frozen=True):
    """How to expand one task into trials.

    ``grid`` takes the cross product of value lists; ``random`` and ``sobol`` draw ``samples``
    points, seeded, from ranges (a plain list is a choice among its values).
    """

    parameters: dict[Identifier, Domain]
    method: SweepMethod = "grid"
    samples: SweepSize | None = None
    seed: Seed = 0
    max_concurrent: PositiveInt | None = None

    def __post_init__(self) -> None:
        if not self.parameters:
            raise ValueError("parameters: a sweep needs at least one parameter")
        for name, dom in self.parameters.items():
            if isinstance(dom, list) and not dom:
                raise ValueError(f"parameters.{name}: an empty list gives no trials")
            if self.method == "grid" and isinstance(dom, Uniform | LogUniform):
                raise ValueError(
                    f"parameters.{name}: a grid needs explicit values; list them, or use "
                    "method = 'random' or 'sobol' for ranges"
                )
        if self.method == "grid" and self.samples is not None:
            raise ValueError("samples applies to random and sobol sweeps, not grid")
        if self.method != "grid" and self.samples is None:
            raise ValueError(f"a {self.method} sweep needs samples = N")


class RetryPolicy(_Spec, frozen=True, gc=False):
    """Which failure classes are retried, how often, and how long to wait between attempts."""

    # gc=False: every run holds its own decoded copy, and the collector's passes over 10^5 of
    # them cost as much as decoding them; it refers to no object that could refer back to it

    max_attempts: Annotated[int, Meta(gt=0, le=1000)] = 3
    on: list[FailureClass] = field(default_factory=lambda: list(INFRASTRUCTURE_FAILURES))
    backoff: Backoff = 2.0
    backoff_cap: Backoff = 300.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.25

    def __post_init__(self) -> None:
        # every run of a sweep decodes its own copy of the same policy: the check and the
        # sorting of each distinct ``on`` are done once (a cache of what passed, keyed by value
        # and by type, since "timeout" equals FailureClass.TIMEOUT yet each is kept as given)
        key = (tuple(self.on), tuple(map(type, self.on)))
        done = _RETRY_ON_CHECKED.get(key)
        if done is None:
            done = _check_retry_on(self.on)
            if len(_RETRY_ON_CHECKED) < _RETRY_ON_CACHE:
                _RETRY_ON_CHECKED[key] = done
        force_setattr(self, "on", list(done))


_RETRY_ON_CACHE = 256
"""distinct ``RetryPolicy.on`` lists whose check is remembered (a bound, not a tuning knob)."""
_RETRY_ON_CHECKED: dict[tuple[tuple[FailureClass, ...], tuple[type, ...]], tuple[FailureClass, ...]]
_RETRY_ON_CHECKED = {}
"""``RetryPolicy.on`` as given (and its types) -> as kept (sorted, distinct), for lists that
passed the check."""


def _check_retry_on(on: list[FailureClass]) -> tuple[FailureClass, ...]:
    """``RetryPolicy.on`` sorted and without repeats; raises for a class never retried."""
    if FailureClass.NO_CAPACITY in on:
        raise ValueError(
            "on: no_capacity is not for the retry policy: an attempt no pool could start "
            "never ran, and the scheduler always places it again elsewhere without counting "
            "it; remove it from on"
        )
    never = (FailureClass.DEPENDENCY_FAILED, FailureClass.CANCELLED, FailureClass.NO_CAPACITY)
    bad = [c.value for c in never if c in on]
    if bad:
        raise ValueError(
            f"on: {' and '.join(bad)} can never be retried; list only failures a new "
            "attempt can fix (" + ", ".join(c.value for c in FailureClass if c not in never) + ")"
        )
    return tuple(sorted(set(on)))


class PlacementWeights(_Spec, frozen=True):
    data: Weight = 1.0
    cost: Weight = 1.0
    wait: Weight = 1.0
    priority: Weight = 1.0


class Naming(_Spec, frozen=True):
    """Conventions applied to what stowplan creates at providers (job names, tags)."""

    prefix: Annotated[str, Meta(pattern=PREFIX_PATTERN)] = "sp"
    tags: dict[Label, Label] = field(default_factory=dict)


class SpendBudget(_Spec, frozen=True):
    """``[policy] budget``: dollars that runs on elastic (cloud) providers may cost, this
    calendar month (UTC) across the project's store, and per experiment. A run whose launch
    would exceed either is held, with the reason shown by ``stowplan status``, not launched."""

    monthly_usd: Annotated[float, Meta(le=MAX_WEIGHT)] | None = None
    per_experiment_usd: Annotated[float, Meta(le=MAX_WEIGHT)] | None = None

    def __post_init__(self) -> None:
        for name in ("monthly_usd", "per_experiment_usd"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # NaN too
                raise ValueError(
                    f"{name}: a budget of {value:g} dollars would hold every run on an elastic "
                    f"provider; give a positive amount, e.g. {name} = 100, or leave {name} "
                    "out for no limit"
                )

    def exceeded(self, *, month_usd: float, experiment_usd: float, more_usd: float) -> str | None:
        """Why spending ``more_usd`` on top of what was spent would break this budget; None
        when it would not."""
        checks = (
            ("monthly", self.monthly_usd, month_usd, "this month"),
            ("per-experiment", self.per_experiment_usd, experiment_usd, "by this experiment"),
        )
        for what, limit, spent, when in checks:
            if limit is not None and spent + more_usd > limit + 1e-9:
                return (
                    f"held: the {what} budget of ${limit:,.2f} would be exceeded (${spent:,.2f} "
                    f"spent {when}, this launch ${more_usd:,.2f} more); raise policy.budget or "
                    "wait"
                )
        return None


class Policy(_Spec, frozen=True):
    """Project-level defaults; an experiment's ``[policy]`` overrides them field by field."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    placement: PlacementWeights = field(default_factory=PlacementWeights)
    allowed_providers: list[Name] | None = None
    naming: Naming = field(default_factory=Naming)
    max_sweep_size: SweepSize = 1_000_000
    priority: Priority = 0
    budget: SpendBudget | None = None
    """dollars that runs on elastic providers may cost (``SpendBudget``); None: no limit."""


class TaskPlacement(_Spec, frozen=True):
    """Where a task may run, beyond its resources: sites, pools and residency rules."""

    require_sites: list[Label] = field(default_factory=list)
    forbid_sites: list[Label] = field(default_factory=list)
    forbid_pools: list[Label] = field(default_factory=list)
    residency: list[Label] = field(default_factory=list)
    runtime: Duration | None = None
    """Estimated runtime, for cost; defaults to the walltime, then the timeout, then 1 h."""
    tolerations: list[str] = field(default_factory=list)
    """Taint keys (Kubernetes ``NoSchedule``/``NoExecute``, such as ``dedicated``) the task
    tolerates: a node pool whose nodes carry such a taint is offered to this task only when
    it lists every key the pool's taints use."""

    def __post_init__(self) -> None:
        import re

        for i, key in enumerate(self.tolerations):
            if not re.match(K8S_LABEL_KEY, key):
                raise ValueError(
                    f"tolerations[{i}]: {key!r} {_K8S_WORDS[K8S_LABEL_KEY]} (a taint key, "
                    "as `kubectl describe node` shows it: 'dedicated', 'example.com/gpu-team')"
                )
        if len(set(self.tolerations)) != len(self.tolerations):
            raise ValueError("tolerations: lists a key twice; list each once")
        force_setattr(self, "tolerations", sorted(self.tolerations))
        if self.runtime is not None:
            try:
                force_setattr(self, "runtime", parse_duration(self.runtime))
            except ValueError as e:
                raise ValueError(f"runtime: {e}") from None


def _seconds(owner: Struct, name: str, *, zero: bool = False) -> None:
    """Normalise the duration field ``name`` of ``owner`` to seconds (``ValueError`` naming
    the field otherwise); ``zero``: 0 is allowed too."""
    value = getattr(owner, name)
    if value is None:
        return
    if zero and not isinstance(value, bool) and value in (0, "0", "0s"):
        force_setattr(owner, name, 0.0)
        return
    try:
        force_setattr(owner, name, parse_duration(value))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


class HealthCheck(_Spec, frozen=True):
    """How a service is probed while it runs (Kubernetes' liveness probe, Docker's
    HEALTHCHECK): exactly one of ``http`` (a path, probed with GET on the service's endpoint;
    any 2xx or 3xx answer is healthy) or ``command`` (argv, run on the control plane's host
    with ``STOWPLAN_SERVICE_HOST`` and ``STOWPLAN_SERVICE_PORT`` set to the endpoint; exit
    status 0 is healthy). A probe that takes longer than ``timeout`` fails."""

    http: Annotated[str, Meta(pattern=r"\A/[^\x00-\x20\x7f]{0,2047}\Z")] | None = None
    """a path starting with '/', such as "/healthz"; needs the service's ``port``."""
    command: list[Arg] | None = None
    """argv run on the control plane's host (not on the service's node); exit 0 is
    healthy."""
    interval: Duration = 10.0
    """seconds between probes, from the attempt's start."""
    timeout: Duration = 5.0
    """seconds one probe may take; a slower one failed."""
    failures: Annotated[int, Meta(ge=1, le=1000)] = 3
    """this many failed probes in a row restart the attempt."""
    start_period: Duration = 0.0
    """failed probes in the first this many seconds of an attempt do not count (a slow
    start); the first healthy probe ends it early."""

    def __post_init__(self) -> None:
        if (self.http is None) == (self.command is None):
            raise ValueError(
                'give exactly one of http (a path, such as "/healthz") or command (a list of '
                "arguments)"
            )
        if self.command is not None and not self.command:
            raise ValueError("command: must name a program, got an empty list")
        for name in ("interval", "timeout"):
            _seconds(self, name)
        _seconds(self, "start_period", zero=True)

    @property
    def interval_s(self) -> float:
        assert isinstance(self.interval, float)  # normalised in __post_init__
        return self.interval

    @property
    def timeout_s(self) -> float:
        assert isinstance(self.timeout, float)
        return self.timeout

    @property
    def start_period_s(self) -> float:
        assert isinstance(self.start_period, float)
        return self.start_period


class ServiceSpec(_Spec, frozen=True):
    """A long-running task (an inference server, a notebook, a TensorBoard): kept running
    until it is cancelled. Whenever an attempt ends for another reason (it exits, with any
    status; it crashes or is killed; its node is lost; its health check fails), a new attempt
    starts after ``backoff`` seconds, doubling at each restart up to ``backoff_cap``
    (Kubernetes' CrashLoopBackOff, systemd's ``Restart=always``); an attempt that ran for
    ``reset_after`` seconds starts the doubling over. Restarts do not count against the retry
    policy. No task may depend on a service: it never completes."""

    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    """the port the service listens on: its endpoint is the attempt's host and this port
    (127.0.0.1 on the local provider), shown by ``stowplan status`` and the dashboard."""
    health: HealthCheck | None = None
    """how to tell that it works while it runs; not set: only its exit restarts it."""
    backoff: Duration = 10.0
    """seconds before the first restart; each restart in a row waits twice as long."""
    backoff_cap: Duration = 300.0
    """no restart waits longer than this."""
    reset_after: Duration = 600.0
    """an attempt that ran this long before it ended restarts after ``backoff`` again."""

    def __post_init__(self) -> None:
        for name in ("backoff", "backoff_cap", "reset_after"):
            _seconds(self, name)
        if self.backoff_cap_s < self.backoff_s:
            raise ValueError(
                f"backoff_cap: {self.backoff_cap_s:g}s is less than backoff "
                f"({self.backoff_s:g}s); make the cap at least the first wait"
            )
        if self.health is not None and self.health.http is not None and self.port is None:
            raise ValueError(
                "health.http: an HTTP health check needs the service's port; add port = N "
                "(the port the service listens on)"
            )

    @property
    def backoff_s(self) -> float:
        assert isinstance(self.backoff, float)  # normalised in __post_init__
        return self.backoff

    @property
    def backoff_cap_s(self) -> float:
        assert isinstance(self.backoff_cap, float)
        return self.backoff_cap

    @property
    def reset_after_s(self) -> float:
        assert isinstance(self.reset_after, float)
        return self.reset_after


Image = Annotated[str, Meta(pattern=IMAGE_PATTERN)]
"""A container image reference: ``python:3.12-slim``, ``ghcr.io/org/img@sha256:...``."""
SecretName = Annotated[str, Meta(pattern=SECRET_PATTERN)]
"""A secret by name (``hf-token``, ``prod/db``), optionally ``#entry`` within it."""


class Task(_Spec, frozen=True):
    """One step of an experiment. Exactly one of ``command`` (argv) or ``script`` (a shell
    script, run with ``bash -euo pipefail``) is given. ``{name}`` in either is replaced by a
    sweep parameter, ``{seed}``, ``{run_id}`` or ``{experiment_dir}``; ``{{`` is a brace.

    ``image``, ``secrets`` and ``outputs`` need a provider that runs containers, resolves
    secrets and returns outputs (``Capability.CONTAINERS``, ``Capability.SECRETS``,
    ``Capability.OUTPUTS``); a task naming them is refused before anything is written when no
    provider it may run on can."""

    name: Name
    command: list[Arg] | None = None
    script: Arg | None = None
    env: dict[Identifier, Arg] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    inputs: list[DataInput] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    """Paths relative to the attempt directory; one ending in '/' is a directory."""
    depends_on: list[Name] = field(default_factory=list)
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    sweep: Sweep | None = None
    priority: Priority | None = None
    placement: TaskPlacement = field(default_factory=TaskPlacement)
    image: Image | None = None
    """The container image the task runs in; unset, the provider's default image where it has
    one. Part of the run's identity: another image is another run."""
    secrets: dict[Identifier, SecretName] = field(default_factory=dict)
    """Environment variable -> the name of a secret the provider resolves when it submits the
    attempt. The name is part of the task's spec; the value is never read by stowplan, stored,
    logged or shown (a dry run shows ``secret:NAME``)."""
    service: ServiceSpec | bool | None = None
    """``true`` (or a ``[tasks.service]`` table): a long-running service, restarted until it
    is cancelled (``ServiceSpec``); ``false`` is the same as leaving it out."""

    def __post_init__(self) -> None:
        if self.service is True:
            force_setattr(self, "service", ServiceSpec())
        elif self.service is False:
            force_setattr(self, "service", None)
        for var in self.secrets:
            if var in self.env:
                raise ValueError(
                    f"secrets.{var}: {var} is also set in env; a variable comes from one place, "
                    "so remove it from env or from secrets"
                )
        if (self.command is None) == (self.script is None):
            raise ValueError(
                "give exactly one of command (a list of arguments) or script (shell text)"
            )
        if self.command is not None and not self.command:
            raise ValueError("command: must name a program, got an empty list")
        if self.timeout is not None:
            try:
                force_setattr(self, "timeout", parse_duration(self.timeout))
            except ValueError as e:
                raise ValueError(f"timeout: {e}") from None
        seen: set[str] = set()
        for k, out in enumerate(self.outputs):
            problem = output_path_problem(out)
            if problem is not None:
                raise ValueError(
                    f"outputs[{k}]: {out!r} {problem} (an output is a relative path inside the "
                    "attempt directory, such as 'metrics.json' or 'plots/')"
                )
            if out in seen:
                raise ValueError(f"outputs[{k}]: {out!r} is listed twice")
            seen.add(out)
        if len(set(self.depends_on)) != len(self.depends_on):
            raise ValueError("depends_on: lists a task twice")

    @property
    def timeout_s(self) -> float | None:
        assert self.timeout is None or isinstance(self.timeout, float)
        return self.timeout

    @property
    def service_spec(self) -> ServiceSpec | None:
        """The service policy (``service = true`` normalised), or None for a normal task."""
        assert self.service is None or isinstance(self.service, ServiceSpec)
        return self.service


class ExperimentMeta(_Spec, frozen=True):
    name: Name
    description: str = ""
    project: Name | None = None
    seed: Seed = 0


class Experiment(_Spec, frozen=True):
    """The whole experiment file: ``[experiment]``, ``[[tasks]]`` and an optional ``[policy]``."""

    experiment: ExperimentMeta
    tasks: list[Task]
    policy: Policy | None = None

    @property
    def name(self) -> str:
        return self.experiment.name


class LocalProviderConfig(_Spec, frozen=True, tag_field="kind", tag="local"):
    """This machine. Capacity defaults to what the machine has."""

    cpus: Cpus | None = None
    memory: Bytes | None = None
    gpus: Gpus | None = None
    site: Label = "local"

    def __post_init__(self) -> None:
        if self.memory is not None:
            try:
                force_setattr(self, "memory", parse_size(self.memory))
            except ValueError as e:
                raise ValueError(f"memory: {e}") from None


class InstantProviderConfig(_Spec, frozen=True, tag_field="kind", tag="instant"):
    """Accepts and completes every attempt at once, running nothing: for control-plane tests
    and benchmarks."""

    site: Label = "local"


class SlurmProviderConfig(_Spec, frozen=True, tag_field="kind", tag="slurm"):
    """A Slurm cluster reached over SSH at its login node (or through slurmrestd).

    ``known_hosts`` is always checked (unset: ``~/.ssh/known_hosts``). ``workdir`` on the
    cluster holds job scripts, logs and attempt directories; a relative one is under the login
    user's home. ``remote_env`` is set for every Slurm command (``slurm_conf`` is a shorthand
    for ``SLURM_CONF``). ``site`` defaults to the cluster's ``ClusterName``.
    """

    host: Label
    port: Annotated[int, Meta(ge=1, le=65535)] = 22
    user: Label | None = None
    identity_file: PathText | None = None
    known_hosts: PathText | None = None
    transport: Literal["ssh", "rest"] = "ssh"
    rest_url: PathText | None = None
    rest_token_env: Identifier = "SLURM_JWT"
    """Name of the environment variable holding the JWT (the secret itself is never written)."""
    slurm_conf: PathText | None = None
    remote_env: dict[Identifier, Arg] = field(default_factory=dict)
    workdir: PathText = "stowplan"
    site: Label | None = None
    partitions: list[Label] | None = None
    account: Label | None = None
    qos: Label | None = None
    max_array_size: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    max_concurrent: PositiveInt | None = None
    """Per array (``--array=0-N%max``); a sweep's own ``max_concurrent`` is enforced upstream."""
    queue_factor: Annotated[float, Meta(ge=1, le=MAX_WEIGHT)] | None = None
    """Offer this many times a partition's capacity, so Slurm's own queue holds the excess;
    unset: derived from discovery (what the queue can drain within an hour:
    ``providers/slurm/capacity.py``). 1 offers the partition's capacity only."""
    connections: Annotated[int, Meta(ge=1, le=16)] = 2

    def __post_init__(self) -> None:
        if not self.host.strip() or any(c.isspace() for c in self.host):
            raise ValueError(f"host: {self.host!r} is not a host name")
        if not self.workdir.strip() or ".." in self.workdir.split("/"):
            raise ValueError(f"workdir: {self.workdir!r} must be a directory path without '..'")
        if self.transport == "rest" and not self.rest_url:
            raise ValueError("transport = 'rest' needs rest_url (the slurmrestd address)")
        if self.transport == "rest" and not self.workdir.startswith("/"):
            raise ValueError(
                "workdir: transport = 'rest' needs an absolute path (slurmrestd has no home)"
            )


K8S_DNS_LABEL: Final = r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z"
K8S_DNS_SUBDOMAIN: Final = r"\A[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z"
K8S_LABEL_KEY: Final = (
    r"\A([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z"
)
K8S_LABEL_VALUE: Final = r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z"
K8S_IMAGE: Final = r"\A[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,1023}\Z"
_K8S_WORDS: Final = {
    K8S_DNS_LABEL: "must be a DNS label (up to 63 lowercase letters, digits or '-', starting "
    "and ending with a letter or digit)",
    K8S_DNS_SUBDOMAIN: "must be a DNS subdomain (lowercase letters, digits, '-' and '.')",
    K8S_LABEL_KEY: "must be a Kubernetes label key such as 'cloud.google.com/gke-nodepool'",
    K8S_LABEL_VALUE: "must be a Kubernetes label value (up to 63 letters, digits, '-', '_' or "
    "'.', starting and ending with a letter or digit)",
    K8S_IMAGE: "must be an image reference such as 'ghcr.io/lab/train:1.2' (no spaces)",
}


class NodeShapeSpec(_Spec, frozen=True):
    """What one node offers to pods (its allocatable): CPUs, memory ("30GiB") and GPUs by
    model (``{ a100 = 1 }``, in the GPU vocabulary of tasks' ``gpu_type``)."""

    cpus: Cpus
    memory: Bytes
    gpus: dict[Label, Gpus] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "memory", parse_size(self.memory))
        except ValueError as e:
            raise ValueError(f"memory: {e}") from None
        if self.memory == 0:
            raise ValueError("memory: a node needs some memory; give its allocatable memory")
        for model in self.gpus:
            if model != model.lower() or not model.isalnum():
                raise ValueError(
                    f"gpus: {model!r} is not a GPU model as tasks name it; write the lowercase "
                    "model word ('a100', 'h100', 'l4', 'rtx4090')"
                )
        force_setattr(self, "gpus", {m: n for m, n in sorted(self.gpus.items()) if n > 0})


class KubernetesAutoscaleSpec(_Spec, frozen=True):
    """A node pool the cluster's autoscaler (cluster-autoscaler, GKE, Karpenter) grows on
    demand, possibly from zero nodes: what the cluster cannot tell while it has no node.
    ``node`` is a new node's allocatable shape; ``max_nodes`` the pool's maximum (nodes it has
    now count against it); ``boot_time`` how long a new node takes to take pods; ``taints``
    the keys its nodes are tainted with (``NoSchedule``); ``region`` where its nodes are
    (unset: where the cluster's other nodes are)."""

    node: NodeShapeSpec
    max_nodes: Annotated[int, Meta(ge=1, le=MAX_COUNT)]
    boot_time: Duration = 180.0
    taints: list[str] = field(default_factory=list)
    region: Label | None = None

    def __post_init__(self) -> None:
        import re

        try:
            force_setattr(self, "boot_time", parse_duration(self.boot_time))
        except ValueError as e:
            raise ValueError(f"boot_time: {e}") from None
        for i, key in enumerate(self.taints):
            if not re.match(K8S_LABEL_KEY, key):
                raise ValueError(f"taints[{i}]: {key!r} {_K8S_WORDS[K8S_LABEL_KEY]}")
        force_setattr(self, "taints", sorted(set(self.taints)))

    @property
    def boot_s(self) -> float:
        assert isinstance(self.boot_time, float)  # normalised in __post_init__
        return self.boot_time


class KubernetesProviderConfig(_Spec, frozen=True, tag_field="kind", tag="kubernetes"):
    """A Kubernetes cluster (GKE, EKS, on-prem with the NVIDIA GPU operator, with or without
    Kueue), reached with a kubeconfig or, failing that, the in-cluster service account.

    ``kubeconfig`` unset: ``$KUBECONFIG``, then ``~/.kube/config``, then in-cluster. Credentials
    stay in the kubeconfig: stowplan never copies them. ``node_pool_label`` unset: the first of
    ``cloud.google.com/gke-nodepool``, ``eks.amazonaws.com/nodegroup``, ``karpenter.sh/nodepool``
    and ``node.kubernetes.io/instance-type`` that the nodes carry. ``tolerations`` lists the
    taint keys every stowplan pod tolerates (GPU pods also tolerate ``gpu_resource``'s taint);
    a node pool with another NoSchedule or NoExecute taint is offered only to tasks that list
    its keys in ``placement.tolerations``. ``autoscale`` names the node pools (by their
    node-pool label value) that the cluster's autoscaler grows, with their node shape and
    maximum: they are offered as elastic capacity, also while they have no node.
    """

    kubeconfig: PathText | None = None
    context: Label | None = None
    namespace: Annotated[str, Meta(pattern=K8S_DNS_LABEL)] | None = None
    """unset: ``default`` (not the kubeconfig context's: a dry run renders the same
    manifests on every machine)."""
    image: str | None = None
    image_pull_secrets: list[Annotated[str, Meta(pattern=K8S_DNS_SUBDOMAIN)]] = field(
        default_factory=list
    )
    service_account: Annotated[str, Meta(pattern=K8S_DNS_SUBDOMAIN)] | None = None
    node_pool_label: str | None = None
    gpu_resource: str = "nvidia.com/gpu"
    kueue_queue: str | None = None
    priority_class: Annotated[str, Meta(pattern=K8S_DNS_SUBDOMAIN)] | None = None
    ttl_after_finished: Duration | None = None
    """seconds a finished Job is kept (``ttlSecondsAfterFinished``); unset: kept."""
    max_parallelism: PositiveInt | None = None
    """the most pods of one Indexed Job at once; unset: all of its indexes."""
    tolerations: list[str] = field(default_factory=list)
    unschedulable_after: Duration = 600.0
    """a pod unschedulable this long is reported as such (the core may re-place it)."""
    site: Label | None = None
    """unset: the nodes' ``topology.kubernetes.io/region`` (else the provider's name)."""
    request_timeout: Annotated[float, Meta(gt=0, le=600)] = 30.0
    autoscale: dict[str, KubernetesAutoscaleSpec] = field(default_factory=dict)
    """node-pool label value -> the autoscaled pool's shape and maximum."""
    bucket: str | None = None
    """``s3://BUCKET/PREFIX``: pods upload their declared outputs, logs and exit record there
    through presigned URLs made at submit (a pod holds no credentials); unset: outputs are not
    returned, and a task that declares outputs is refused on this provider. Presigning uses
    the SDK's credentials (``AWS_PROFILE``, the default chain)."""
    bucket_endpoint: str | None = None
    """the S3 API's URL (MinIO, Ceph, a GCS interoperability endpoint); unset: the SDK's
    (``AWS_ENDPOINT_URL``, else AWS). Pods must reach it."""
    bucket_region: Label | None = None
    """unset: the SDK's region (``AWS_REGION``, ``AWS_DEFAULT_REGION``), else us-east-1."""

    def __post_init__(self) -> None:
        import re

        def check(name: str, value: str | None, pattern: str) -> None:
            if value is not None and not re.match(pattern, value):
                raise ValueError(f"{name}: {value!r} {_K8S_WORDS[pattern]}")

        for pool in self.autoscale:
            if not re.match(K8S_LABEL_VALUE, pool):
                raise ValueError(
                    f"autoscale: pool name {pool!r} {_K8S_WORDS[K8S_LABEL_VALUE]}; name the "
                    "pool as its nodes' node-pool label value ([providers.NAME.autoscale.POOL])"
                )

        check("image", self.image, K8S_IMAGE)
        check("node_pool_label", self.node_pool_label, K8S_LABEL_KEY)
        check("gpu_resource", self.gpu_resource, K8S_LABEL_KEY)
        check("kueue_queue", self.kueue_queue, K8S_LABEL_VALUE)
        for i, t in enumerate(self.tolerations):
            check(f"tolerations[{i}]", t, K8S_LABEL_KEY)
        for name in ("ttl_after_finished", "unschedulable_after"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                force_setattr(self, name, parse_duration(value))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.context is not None and not self.context.strip():
            raise ValueError("context: is empty; name a context of the kubeconfig or leave it out")
        if self.bucket is not None and not re.match(_AWS_BUCKET, self.bucket):
            raise ValueError(
                f"bucket: {self.bucket!r} is not an S3 URL; write 's3://BUCKET' or "
                "'s3://BUCKET/PREFIX' (a bucket name of 3 to 63 lowercase letters, digits, "
                "'.' and '-')"
            )
        if self.bucket_endpoint is not None and not re.match(
            r"\Ahttps?://[^\s/?#@]+(/[^\s?#]*)?\Z", self.bucket_endpoint
        ):
            raise ValueError(
                f"bucket_endpoint: {self.bucket_endpoint!r} is not an http(s) URL without "
                "credentials; write 'https://HOST[:PORT]'"
            )
        if self.bucket is None and self.bucket_endpoint is not None:
            raise ValueError(
                "bucket_endpoint: has no effect without bucket; set bucket = 's3://BUCKET' "
                "or remove it"
            )

    @property
    def bucket_name(self) -> str:
        return (self.bucket or "").removeprefix("s3://").split("/", 1)[0]

    @property
    def bucket_prefix(self) -> str:
        """The key prefix under the bucket, without slashes at either end ("" for none)."""
        rest = (self.bucket or "").removeprefix("s3://").split("/", 1)
        return rest[1].strip("/") if len(rest) > 1 else ""


AWS_REGIONS: Final = (
    "af-south-1", "ap-east-1", "ap-east-2", "ap-northeast-1", "ap-northeast-2",
    "ap-northeast-3", "ap-south-1", "ap-south-2", "ap-southeast-1", "ap-southeast-2",
    "ap-southeast-3", "ap-southeast-4", "ap-southeast-5", "ap-southeast-7", "ca-central-1",
    "ca-west-1", "cn-north-1", "cn-northwest-1", "eu-central-1", "eu-central-2", "eu-north-1",
    "eu-south-1", "eu-south-2", "eu-west-1", "eu-west-2", "eu-west-3", "il-central-1",
    "me-central-1", "me-south-1", "mx-central-1", "sa-east-1", "us-east-1", "us-east-2",
    "us-gov-east-1", "us-gov-west-1", "us-west-1", "us-west-2",
)  # fmt: skip
"""The AWS regions stowplan knows (a typo is an error; a region added later needs a release)."""
_AWS_INSTANCE_GLOB: Final = r"\A[a-z0-9*?]+\.[a-z0-9*?]+\Z"
_AWS_AMI: Final = r"\Aami-[0-9a-f]{8,17}\Z"
_AWS_SSM: Final = r"\A(ssm:)?/[A-Za-z0-9_.\-/]{1,2047}\Z"
_AWS_ROLE_ARN: Final = r"\Aarn:aws(-cn|-us-gov)?:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}\Z"
_AWS_BUCKET: Final = r"\As3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[A-Za-z0-9!_.*'()/-]*)?\Z"


class AwsProviderConfig(_Spec, frozen=True, tag_field="kind", tag="aws"):
    """EC2 GPU instances (on-demand and spot) in one or more regions: one elastic pool per
    (region, instance type, market), whose instances the scheduler starts and stops; each runs
    the stowplan agent, which takes the attempts sent to it (several at once when they fit).

    Credentials: ``profile`` (a named profile of ~/.aws/config), else ``role_arn`` assumed
    through STS for leases of ``session_duration`` seconds renewed before they expire, else the
    SDK's default chain. Credentials are only ever held in memory: never written, logged or
    passed to an instance (instances get presigned S3 URLs). ``instance_types`` are glob
    patterns (``g5.*``, ``p4d.24xlarge``); ``ami`` is an AMI id (one region), an SSM parameter
    name (``/aws/service/...``, resolved by EC2 at launch in every region) or a table of region
    -> either. ``bucket`` (``s3://bucket/prefix``) holds payloads, logs, outputs and exit
    records. ``idle_shutdown``: seconds an instance stays up with nothing to run before it
    shuts itself down (and, with shutdown behaviour ``terminate``, is gone). ``max_instances``
    and ``max_hourly_usd`` bound the instances of each pool at once.
    """

    regions: list[Label]
    bucket: str
    ami: str | dict[str, str]
    instance_types: list[str] = field(default_factory=lambda: ["g5.*"])
    profile: Label | None = None
    role_arn: str | None = None
    session_duration: Duration = 3600.0
    spot: Literal["never", "prefer", "only"] = "never"
    max_instances: Annotated[int, Meta(ge=1, le=100_000)] = 8
    max_hourly_usd: Annotated[float, Meta(gt=0, le=MAX_WEIGHT)] | None = None
    subnets: list[Annotated[str, Meta(pattern=r"\Asubnet-[0-9a-f]{8,17}\Z")]] = field(
        default_factory=list
    )
    security_groups: list[Annotated[str, Meta(pattern=r"\Asg-[0-9a-f]{8,17}\Z")]] = field(
        default_factory=list
    )
    instance_profile: Label | None = None
    """an instance profile name or ARN (the attempt's own AWS access, if it needs any)."""
    idle_shutdown: Duration = 300.0
    prices: PathText | None = None
    """a price table (JSON, the bundled table's format) used instead of the bundled one."""

    def __post_init__(self) -> None:
        import difflib
        import re

        if not self.regions:
            raise ValueError("regions: list at least one region, e.g. ['us-east-1']")
        for i, region in enumerate(self.regions):
            if region not in AWS_REGIONS:
                close = difflib.get_close_matches(region, AWS_REGIONS, n=1)
                raise ValueError(
                    f"regions[{i}]: {region!r} is not an AWS region"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                    + " (write region codes such as 'us-east-1')"
                )
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("regions: lists a region twice; list each once")
        if self.profile is not None and self.role_arn is not None:
            raise ValueError(
                "role_arn: give profile or role_arn, not both (a role is assumed with the "
                "default credentials; to assume it from a profile, set source_profile in "
                "~/.aws/config and give only profile)"
            )
        if self.role_arn is not None and not re.match(_AWS_ROLE_ARN, self.role_arn):
            raise ValueError(
                f"role_arn: {self.role_arn!r} is not an IAM role ARN; write "
                "'arn:aws:iam::123456789012:role/NAME'"
            )
        for name in ("session_duration", "idle_shutdown"):
            try:
                force_setattr(self, name, parse_duration(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if not 900 <= float(self.session_duration) <= 43200:
            raise ValueError(
                "session_duration: an STS lease lasts from 15 minutes to 12 hours; give a "
                "duration between '15m' and '12h'"
            )
        if not self.instance_types:
            raise ValueError("instance_types: list at least one type or pattern, e.g. ['g5.*']")
        for i, t in enumerate(self.instance_types):
            if not re.match(_AWS_INSTANCE_GLOB, t):
                raise ValueError(
                    f"instance_types[{i}]: {t!r} is not an instance type or pattern; write "
                    "FAMILY.SIZE in lowercase, with * or ? as wildcards ('g5.*', 'p4d.24xlarge')"
                )
        if not re.match(_AWS_BUCKET, self.bucket):
            raise ValueError(
                f"bucket: {self.bucket!r} is not an S3 URL; write 's3://BUCKET' or "
                "'s3://BUCKET/PREFIX' (a bucket name of 3 to 63 lowercase letters, digits, "
                "'.' and '-')"
            )
        amis = self.ami if isinstance(self.ami, dict) else None
        if amis is None:
            assert isinstance(self.ami, str)
            if re.match(_AWS_AMI, self.ami) and len(self.regions) > 1:
                raise ValueError(
                    "ami: an AMI id belongs to one region; give a table "
                    "{ us-east-1 = 'ami-...', ... } or an SSM parameter name"
                )
            amis = {r: self.ami for r in self.regions}
        for region, ami in amis.items():
            if region not in self.regions:
                raise ValueError(
                    f"ami: {region!r} is not one of regions; remove it or add it to regions"
                )
            if not (re.match(_AWS_AMI, ami) or re.match(_AWS_SSM, ami)):
                raise ValueError(
                    f"ami: {ami!r} (for {region}) is neither an AMI id "
                    "('ami-0123456789abcdef0') nor an SSM parameter name ('/aws/service/...')"
                )
        missing = [r for r in self.regions if r not in amis]
        if missing:
            raise ValueError(f"ami: no AMI for {', '.join(missing)}; add one per region")

    def ami_for(self, region: str) -> str:
        """The ``ImageId`` to launch in ``region``: an AMI id, or ``resolve:ssm:NAME``."""
        ami = self.ami[region] if isinstance(self.ami, dict) else self.ami
        return ami if ami.startswith("ami-") else "resolve:ssm:" + ami.removeprefix("ssm:")

    @property
    def bucket_name(self) -> str:
        return self.bucket.removeprefix("s3://").split("/", 1)[0]

    @property
    def bucket_prefix(self) -> str:
        """The key prefix under the bucket, without slashes at either end ("" for none)."""
        rest = self.bucket.removeprefix("s3://").split("/", 1)
        return rest[1].strip("/") if len(rest) > 1 else ""


ProviderConfig = (
    LocalProviderConfig
    | InstantProviderConfig
    | SlurmProviderConfig
    | KubernetesProviderConfig
    | AwsProviderConfig
)


class StoreConfig(_Spec, frozen=True):
    path: PathText = ".stowplan/stowplan.db"


class ProjectMeta(_Spec, frozen=True):
    name: Name = "default"


class LinkSpec(_Spec, frozen=True):
    """The network from one site to another."""

    src: Label
    dst: Label
    bandwidth: Bytes
    """Bytes per second, or a size such as "1.25GB" (read as per second)."""
    egress_per_gb: Weight = 0.0

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "bandwidth", parse_size(self.bandwidth))
        except ValueError as e:
            raise ValueError(f"bandwidth: {e}") from None
        if self.bandwidth == 0:
            raise ValueError("bandwidth: must be greater than 0")


class PlacementSettings(_Spec, frozen=True):
    """``[placement]`` in stowplan.toml: the network, residency rules and the solver budget."""

    links: list[LinkSpec] = field(default_factory=list)
    residency: dict[Label, list[Label]] = field(default_factory=dict)
    """Rule name -> the sites or regions where data under the rule may be processed."""
    budget: Budget = 0.1
    """Deterministic seconds of CP-SAT search per placement (a work unit, not wall time)."""
    workers: Annotated[int, Meta(ge=1, le=16)] = 1
    objective: Literal["fgd", "bestfit"] = "fgd"
    """How runs are packed onto the GPUs of pools that know their devices (``Pool.devices``):
    ``fgd`` keeps idle GPUs usable by the typical task shapes (fragmentation-aware), ``bestfit``
    fills the fullest node that fits."""

    def __post_init__(self) -> None:
        for name, sites in self.residency.items():
            if not sites:
                raise ValueError(f"residency.{name}: list at least one site or region")


ServiceRole = Literal["viewer", "member", "team-admin", "admin"]
"""What a person may do through the service: read their team's runs (viewer), also submit
and cancel their own (member), also cancel their team's (team-admin), everything (admin)."""


class ServiceTeamSpec(_Spec, frozen=True):
    """``[service.teams.NAME]``: one team of the lab and its share of the lab's GPUs
    (``scheduler.share``: limits, guarantees, borrowing, GPU-hours)."""

    description: Label | None = None
    guaranteed_gpus: dict[Label, NonNegInt] = field(default_factory=dict)
    """GPU model -> GPUs the team gets before other teams may borrow them."""
    max_gpus: dict[Label, NonNegInt] = field(default_factory=dict)
    """GPU model, or "*" for all models together -> the most GPUs the team holds at once."""
    gpu_hours: Annotated[float, Meta(ge=0, le=MAX_WEIGHT)] | None = None
    """GPU-hours the team may use per ``window``."""
    window: Duration = "7d"
    weight: Annotated[float, Meta(gt=0, le=MAX_WEIGHT)] = 1.0
    """the team's share in fair-share ordering (2: twice the usage before it yields)."""
    monthly_usd: Annotated[float, Meta(le=MAX_WEIGHT)] | None = None
    """dollars the team's runs may cost on cloud (priced elastic) providers per calendar month
    (UTC); a run that would exceed it waits for approval."""

    def __post_init__(self) -> None:
        if self.monthly_usd is not None and not self.monthly_usd > 0:  # NaN too
            raise ValueError(
                f"monthly_usd: {self.monthly_usd:g} dollars would hold every cloud run of the "
                "team; give a positive amount, e.g. monthly_usd = 500, or leave it out for no "
                "limit"
            )
        try:
            force_setattr(self, "window", parse_duration(self.window))
        except ValueError as e:
            raise ValueError(f"window: {e}") from None
        if float(self.window) <= 0:
            raise ValueError("window: give a positive duration such as '7d'")
        for model, n in sorted(self.guaranteed_gpus.items()):
            if model == "*":
                raise ValueError(
                    "guaranteed_gpus.*: a guarantee is per GPU model; name the model, "
                    "e.g. guaranteed_gpus = { A100 = 4 }"
                )
            most = self.max_gpus.get(model, self.max_gpus.get("*"))
            if most is not None and n > most:
                raise ValueError(
                    f"guaranteed_gpus.{model}: {n} is more than max_gpus allows ({most}); "
                    "lower the guarantee or raise the maximum"
                )

    def limits(self) -> TeamLimits:
        from stowplan.scheduler.share import TeamLimits

        return TeamLimits(
            guaranteed_gpus=dict(self.guaranteed_gpus),
            max_gpus=dict(self.max_gpus),
            gpu_hours=self.gpu_hours,
            window_s=float(self.window),
            weight=self.weight,
            monthly_usd=self.monthly_usd,
        )


class ServiceUserSpec(_Spec, frozen=True):
    """``[service.users.NAME]``: one person, their team and their role."""

    team: Name
    role: ServiceRole = "member"


class ServiceTlsSpec(_Spec, frozen=True):
    """``[service.tls]``: serve HTTPS with this certificate and key (PEM files)."""

    cert: PathText
    key: PathText


class ServiceConfig(_Spec, frozen=True):
    """``[service]`` in stowplan.toml: where ``stowplan serve`` listens, who may use it."""

    bind: Label = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8470
    tls: ServiceTlsSpec | None = None
    max_body: Bytes = 16 * 2**20
    """The largest request body accepted (an experiment file and the files it names), bytes
    or a size such as "16MiB"."""
    teams: dict[Name, ServiceTeamSpec] = field(default_factory=dict)
    users: dict[Name, ServiceUserSpec] = field(default_factory=dict)
    keepalive: Duration = "15s"
    """How often a followed log (server-sent events) with nothing new gets a ``: keep-alive``
    comment, so proxies that cut idle connections keep it open."""
    reports: str = "reports"
    """The folder (relative to the project) whose simulation and what-if reports the dashboard
    shows at ``/ui/reports``: ``stowplan whatif ... --out reports/NAME`` puts one there."""
    log_format: Literal["json", "text"] = "json"
    """The service's log lines on standard error: one JSON object each (for journald, Loki,
    ...), or text for a terminal (``stowplan serve --log-format``)."""
    restricted: list[Name] = field(default_factory=list)
    """Providers whose pools a run may use only once someone approves it (``stowplan approve``):
    a run the placer puts there waits in AWAITING_APPROVAL, as does a run a budget would hold."""

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "max_body", parse_size(self.max_body))
        except ValueError as e:
            raise ValueError(f"max_body: {e}") from None
        try:
            force_setattr(self, "keepalive", parse_duration(self.keepalive))
        except ValueError as e:
            raise ValueError(f"keepalive: {e}") from None
        if not float(self.keepalive) > 0:
            raise ValueError("keepalive: give a positive duration such as '15s'")
        for name, user in sorted(self.users.items()):
            if user.team not in self.teams:
                known = ", ".join(sorted(self.teams)) or "none is defined"
                raise ValueError(
                    f"users.{name}.team: no team {user.team!r} under [service.teams] ({known}); "
                    f"add [service.teams.{user.team}]"
                )


class ProjectConfig(_Spec, frozen=True):
    """``stowplan.toml``: project name, policy defaults, providers by name, store location."""

    project: ProjectMeta = field(default_factory=ProjectMeta)
    policy: Policy = field(default_factory=Policy)
    providers: dict[Name, ProviderConfig] = field(
        default_factory=lambda: {"local": LocalProviderConfig()}
    )
    store: StoreConfig = field(default_factory=StoreConfig)
    placement: PlacementSettings = field(default_factory=PlacementSettings)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError("providers: configure at least one provider, e.g. [providers.local]")
        for i, name in enumerate(self.service.restricted):
            if name not in self.providers:
                known = ", ".join(sorted(self.providers))
                raise ValueError(
                    f"service.restricted[{i}]: no provider {name!r} is configured ({known}); "
                    "name one of them, or add [providers." + name + "]"
                )


def to_builtins(obj: object) -> object:
    """Plain JSON-able data of a spec, defaults included."""
    return msgspec.to_builtins(obj)
