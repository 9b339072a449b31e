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
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct, field
from msgspec.structs import force_setattr

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
    LOST = "lost"
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
    """What one attempt needs. ``memory`` accepts "4GiB"-style text and is stored in bytes."""

    cpus: Cpus = 1.0
    memory: Bytes = "1GiB"
    gpus: Gpus = 0
    gpu_type: Label | list[Label] | None = None
    walltime: Duration | None = None

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


class RetryPolicy(_Spec, frozen=True):
    """Which failure classes are retried, how often, and how long to wait between attempts."""

    max_attempts: Annotated[int, Meta(gt=0, le=1000)] = 3
    on: list[FailureClass] = field(default_factory=lambda: list(INFRASTRUCTURE_FAILURES))
    backoff: Backoff = 2.0
    backoff_cap: Backoff = 300.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.25

    def __post_init__(self) -> None:
        never = (FailureClass.DEPENDENCY_FAILED, FailureClass.CANCELLED)
        bad = [c.value for c in never if c in self.on]
        if bad:
            raise ValueError(
                f"on: {' and '.join(bad)} can never be retried; list only failures a new "
                "attempt can fix ("
                + ", ".join(c.value for c in FailureClass if c not in never)
                + ")"
            )
        force_setattr(self, "on", sorted(set(self.on)))


class PlacementWeights(_Spec, frozen=True):
    data: Weight = 1.0
    cost: Weight = 1.0
    wait: Weight = 1.0
    priority: Weight = 1.0


class Naming(_Spec, frozen=True):
    """Conventions applied to what stowplan creates at providers (job names, tags)."""

    prefix: Annotated[str, Meta(pattern=PREFIX_PATTERN)] = "sp"
    tags: dict[Label, Label] = field(default_factory=dict)


class Policy(_Spec, frozen=True):
    """Project-level defaults; an experiment's ``[policy]`` overrides them field by field."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    placement: PlacementWeights = field(default_factory=PlacementWeights)
    allowed_providers: list[Name] | None = None
    naming: Naming = field(default_factory=Naming)
    max_sweep_size: SweepSize = 1_000_000
    priority: Priority = 0


class TaskPlacement(_Spec, frozen=True):
    """Where a task may run, beyond its resources: sites, pools and residency rules."""

    require_sites: list[Label] = field(default_factory=list)
    forbid_sites: list[Label] = field(default_factory=list)
    forbid_pools: list[Label] = field(default_factory=list)
    residency: list[Label] = field(default_factory=list)
    runtime: Duration | None = None
    """Estimated runtime, for cost; defaults to the walltime, then the timeout, then 1 h."""

    def __post_init__(self) -> None:
        if self.runtime is not None:
            try:
                force_setattr(self, "runtime", parse_duration(self.runtime))
            except ValueError as e:
                raise ValueError(f"runtime: {e}") from None


class Task(_Spec, frozen=True):
    """One step of an experiment. Exactly one of ``command`` (argv) or ``script`` (a shell
    script, run with ``bash -euo pipefail``) is given. ``{name}`` in either is replaced by a
    sweep parameter, ``{seed}``, ``{run_id}`` or ``{experiment_dir}``; ``{{`` is a brace."""

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

    def __post_init__(self) -> None:
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
    queue_factor: Annotated[float, Meta(ge=1, le=MAX_WEIGHT)] = 1.0
    """Offer this many times a partition's capacity, so Slurm's own queue holds the excess."""
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


ProviderConfig = LocalProviderConfig | InstantProviderConfig | SlurmProviderConfig


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

    def __post_init__(self) -> None:
        for name, sites in self.residency.items():
            if not sites:
                raise ValueError(f"residency.{name}: list at least one site or region")


class ProjectConfig(_Spec, frozen=True):
    """``stowplan.toml``: project name, policy defaults, providers by name, store location."""

    project: ProjectMeta = field(default_factory=ProjectMeta)
    policy: Policy = field(default_factory=Policy)
    providers: dict[Name, ProviderConfig] = field(
        default_factory=lambda: {"local": LocalProviderConfig()}
    )
    store: StoreConfig = field(default_factory=StoreConfig)
    placement: PlacementSettings = field(default_factory=PlacementSettings)

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError("providers: configure at least one provider, e.g. [providers.local]")


def to_builtins(obj: object) -> object:
    """Plain JSON-able data of a spec, defaults included."""
    return msgspec.to_builtins(obj)
