"""The simulated cluster, as users write it in TOML.

A cluster file names sites, pools at those sites, GPU models, the network between sites,
datasets with their home sites, and optionally faults to inject::

    [cluster]
    name = "campus"

    [[sites]]
    name = "campus"

    [gpu_models.a100]
    memory = "80GiB"

    [[pools]]                     # a Slurm partition
    name = "gpu-a100"
    site = "campus"
    kind = "slurm"
    nodes = 16
    cpus_per_node = 64
    memory_per_node = "512GiB"
    gpus_per_node = 8
    gpu_model = "a100"

    [[links]]
    between = ["campus", "aws-us-east-1"]
    bandwidth = "10Gbps"
    egress_per_gib = 0.09

    [[datasets]]
    name = "imagenet"
    size = "150GiB"
    sites = ["campus"]

Pools are ``slurm`` partitions (FIFO with backfill), ``kubernetes`` node pools (first fit) or
``cloud`` instance types (elastic up to ``max_instances``: the scheduler core provisions
instances and terminates them after ``[scheduler] idle_grace`` idle; boot latency, per-second
billing, spot interruptions); ``stowplan.simulator.provider.POOL_CLASSES`` gives each kind its
simulated discipline. A slurm or kubernetes pool with ``device_leases = true`` is placed by
device (the core leases a node and device indices); with ``gpu_sharing = true`` as well, shares
of one GPU (openb's ``gpu_milli`` below 1000) go side by side on a device. Every mistake is a
``SpecError`` naming the file, the line and the ``$.path``.
"""

from __future__ import annotations

import enum
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct, field
from msgspec.structs import force_setattr

from stowplan.errors import SpecError
from stowplan.spec.loader import decode, locate
from stowplan.spec.models import SpendBudget
from stowplan.spec.units import parse_duration, parse_size

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNeg = Annotated[float, Meta(ge=0)]
Prob = Annotated[float, Meta(ge=0, le=1)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=64)]

_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(bps|B/s)\s*$")
_RATE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_rate(value: float | int | str) -> float:
    """Bytes per second from ``"10Gbps"``, ``"500MB/s"`` or a plain number of bytes per second."""
    if isinstance(value, bool):
        raise ValueError("expected a rate such as '10Gbps'")
    if isinstance(value, int | float):
        if not value > 0:
            raise ValueError(f"rate must be positive, got {value}")
        return float(value)
    m = _RATE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a rate; write e.g. '10Gbps', '400Mbps' or '1GB/s'")
    n = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if n <= 0:
        raise ValueError(f"rate must be positive, got {value!r}")
    return n / 8.0 if m.group(3) == "bps" else n


def seconds(value: float | int | str, *, zero_ok: bool = False) -> float:
    """``parse_duration``, also accepting 0 where a zero duration means "none"."""
    if zero_ok and not isinstance(value, bool) and value in (0, "0", "0s"):
        return 0.0
    return parse_duration(value)


class PoolKind(enum.StrEnum):
    SLURM = "slurm"
    KUBERNETES = "kubernetes"
    CLOUD = "cloud"


class _Spec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ClusterMeta(_Spec, frozen=True):
    name: Name
    description: str = ""


class SiteSpec(_Spec, frozen=True):
    name: Name
    description: str = ""


class GpuModelSpec(_Spec, frozen=True):
    memory: int | str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.memory is not None:
            try:
                force_setattr(self, "memory", parse_size(self.memory))
            except ValueError as e:
                raise ValueError(f"memory: {e}") from None


class NodeFaults(_Spec, frozen=True):
    """Node failure and repair, drawn per node from exponential distributions."""

    mtbf: float | str
    """mean time between failures of one node ("30d", "720h", or seconds)"""
    mttr: float | str = "4h"
    """mean time to repair"""

    def __post_init__(self) -> None:
        for name in ("mtbf", "mttr"):
            try:
                v = parse_duration(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            if v <= 0:
                raise ValueError(f"{name}: must be positive")
            force_setattr(self, name, v)


class PoolSpec(_Spec, frozen=True):
    name: Name
    site: Name
    kind: PoolKind
    gpu_model: str | None = None
    gpus_per_node: NonNegInt = 0
    cpus_per_node: Annotated[float, Meta(gt=0)] = 1.0
    memory_per_node: int | str = "1GiB"
    nodes: NonNegInt = 0
    """slurm and kubernetes: how many nodes the pool has."""
    max_instances: NonNegInt = 0
    """cloud: how many instances may run at once."""
    instance_type: str = ""
    price_per_hour: NonNeg = 0.0
    """per node (slurm, kubernetes: the amortised or charged-back price) or per instance."""
    boot: float | str = 0.0
    """cloud: seconds from launch until the instance runs work."""
    min_billed: float | str = 60.0
    """cloud: a launched instance is billed for at least this long (per-second after)."""
    spot: bool = False
    interruptions_per_hour: NonNeg = 0.0
    """spot: the rate at which a running instance is reclaimed."""
    failures: NodeFaults | None = None
    backfill_depth: PosInt = 100
    """slurm: how many queued jobs behind a blocked head one backfill pass looks at."""
    device_leases: bool = False
    """slurm and kubernetes: the pool tells the scheduler core its nodes and GPU devices
    (``Pool.devices``), the core leases a node and device indices to each job, and the pool
    starts the job on exactly those (a job whose devices are still held waits for them; a
    lease naming a node or device the pool lacks fails the job). Off: the core counts the
    pool's GPUs in total and the pool picks the node itself."""
    gpu_sharing: bool = False
    """with ``device_leases``: the pool puts shares of one GPU (a job's ``gpu_milli`` below
    1000) side by side on one device, up to 1000 thousandths (as MIG or Kubernetes GPU sharing
    do); a whole-GPU job still needs a device nothing runs on. Off: a share holds a whole
    device."""

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "memory_per_node", parse_size(self.memory_per_node))
        except ValueError as e:
            raise ValueError(f"memory_per_node: {e}") from None
        for name in ("boot", "min_billed"):
            try:
                force_setattr(self, name, seconds(getattr(self, name), zero_ok=True))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.gpus_per_node and not self.gpu_model:
            raise ValueError("gpu_model: pools with gpus_per_node > 0 must name their gpu_model")
        if self.gpu_model and not self.gpus_per_node:
            raise ValueError("gpus_per_node: a pool with a gpu_model needs gpus_per_node >= 1")
        if self.kind is PoolKind.CLOUD:
            if self.nodes:
                raise ValueError("nodes: cloud pools are elastic; use max_instances instead")
            if not self.max_instances:
                raise ValueError("max_instances: a cloud pool needs max_instances >= 1")
            if self.failures is not None:
                raise ValueError(
                    "failures: cloud instances have no nodes to fail and repair; "
                    "model reclaimed instances with spot = true and interruptions_per_hour"
                )
        else:
            if self.max_instances:
                raise ValueError("max_instances: only cloud pools have instances; use nodes")
            if self.spot or self.interruptions_per_hour:
                raise ValueError("spot: only cloud pools can be spot")
        if self.interruptions_per_hour and not self.spot:
            raise ValueError("interruptions_per_hour: set spot = true for an interruptible pool")
        if self.device_leases and self.kind is PoolKind.CLOUD:
            raise ValueError(
                "device_leases: cloud instances come and go; lease devices on slurm or "
                "kubernetes pools"
            )
        if self.gpu_sharing and not self.device_leases:
            raise ValueError(
                "gpu_sharing: shares go on the devices the scheduler core leases; set "
                "device_leases = true as well, or remove gpu_sharing"
            )
        if self.gpu_sharing and not self.gpus_per_node:
            raise ValueError("gpu_sharing: the pool has no GPUs to share; set gpus_per_node")

    @property
    def memory_bytes(self) -> int:
        assert isinstance(self.memory_per_node, int)
        return self.memory_per_node

    @property
    def boot_s(self) -> float:
        assert isinstance(self.boot, float)
        return self.boot

    @property
    def min_billed_s(self) -> float:
        assert isinstance(self.min_billed, float)
        return self.min_billed

    @property
    def units(self) -> int:
        """Nodes, or instances for a cloud pool."""
        return self.max_instances if self.kind is PoolKind.CLOUD else self.nodes


class LinkSpec(_Spec, frozen=True):
    between: Annotated[list[Name], Meta(min_length=2, max_length=2)]
    bandwidth: float | str
    egress_per_gib: NonNeg = 0.0

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "bandwidth", parse_rate(self.bandwidth))
        except ValueError as e:
            raise ValueError(f"bandwidth: {e}") from None
        if self.between[0] == self.between[1]:
            raise ValueError("between: a link joins two different sites")

    @property
    def bytes_per_s(self) -> float:
        assert isinstance(self.bandwidth, float)
        return self.bandwidth


class DatasetSpec(_Spec, frozen=True):
    name: Name
    size: int | str
    sites: Annotated[list[Name], Meta(min_length=1)]

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "size", parse_size(self.size))
        except ValueError as e:
            raise ValueError(f"size: {e}") from None

    @property
    def size_bytes(self) -> int:
        assert isinstance(self.size, int)
        return self.size


class SiteCutoff(_Spec, frozen=True):
    """The site's API and reports are unreachable from ``at`` for ``duration``."""

    site: Name
    at: float | str
    duration: float | str

    def __post_init__(self) -> None:
        for name in ("at", "duration"):
            try:
                force_setattr(self, name, seconds(getattr(self, name), zero_ok=name == "at"))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None


class FaultsSpec(_Spec, frozen=True):
    api_error_rate: Prob = 0.0
    """chance that one submit or describe call fails with a retryable error"""
    lost_answer_rate: Prob = 0.0
    """chance that a submit is carried out but its answer never arrives (the caller retries)"""
    submit_rate_limit: NonNeg = 0.0
    """submit calls per second a provider accepts before it throttles (0: unlimited)"""
    cutoffs: list[SiteCutoff] = field(default_factory=list)


class SchedulerSpec(_Spec, frozen=True):
    """How the simulated control plane talks to providers."""

    lease_ttl: float | str = "1d"
    """a leased run without news for this long becomes LOST and is reconciled"""
    heartbeat: float | str | None = None
    """how often running jobs are described (batched); default: a third of lease_ttl"""
    max_attempts: PosInt = 5
    retry_backoff_cap: float | str = "10m"
    project_sites: dict[str, list[Name]] = field(default_factory=dict)
    """runs of a listed project may use pools at these sites only (a virtual cluster's quota);
    projects not listed may use every site"""
    idle_grace: float | str = "2m"
    """cloud: an instance that stays idle (no queued run could use it) this long is terminated"""
    budget: SpendBudget | None = None
    """what runs on priced cloud pools may cost, as ``[policy] budget`` in a project
    (``{ monthly_usd = ..., per_experiment_usd = ... }``; the whole simulation is one
    experiment): the core holds launches that would break it"""
    device_objective: Literal["fgd", "bestfit"] = "fgd"
    """how the core packs runs onto the devices of pools with ``device_leases``, as
    ``[placement] objective`` in a project"""

    def __post_init__(self) -> None:
        try:
            force_setattr(self, "idle_grace", seconds(self.idle_grace, zero_ok=True))
        except ValueError as e:
            raise ValueError(f"idle_grace: {e}") from None
        for name in ("lease_ttl", "heartbeat", "retry_backoff_cap"):
            v = getattr(self, name)
            if v is None:
                continue
            try:
                s = parse_duration(v)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            if s <= 0:
                raise ValueError(f"{name}: must be positive")
            force_setattr(self, name, s)
        if self.heartbeat is None:
            force_setattr(self, "heartbeat", float(self.lease_ttl) / 3.0)
        if float(self.heartbeat) >= float(self.lease_ttl):  # type: ignore[arg-type]
            raise ValueError("heartbeat: must be shorter than lease_ttl, or every lease expires")

    @property
    def lease_ttl_s(self) -> float:
        assert isinstance(self.lease_ttl, float)
        return self.lease_ttl

    @property
    def heartbeat_s(self) -> float:
        assert isinstance(self.heartbeat, float)
        return self.heartbeat

    @property
    def idle_grace_s(self) -> float:
        assert isinstance(self.idle_grace, float)
        return self.idle_grace

    @property
    def backoff_cap_s(self) -> float:
        assert isinstance(self.retry_backoff_cap, float)
        return self.retry_backoff_cap


class ClusterSpec(_Spec, frozen=True):
    cluster: ClusterMeta
    sites: Annotated[list[SiteSpec], Meta(min_length=1)]
    pools: Annotated[list[PoolSpec], Meta(min_length=1)]
    gpu_models: dict[str, GpuModelSpec] = field(default_factory=dict)
    links: list[LinkSpec] = field(default_factory=list)
    datasets: list[DatasetSpec] = field(default_factory=list)
    faults: FaultsSpec = field(default_factory=FaultsSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)

    def pool(self, name: str) -> PoolSpec:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def link(self, a: str, b: str) -> LinkSpec | None:
        for ln in self.links:
            if {a, b} == set(ln.between):
                return ln
        return None


class LoadedCluster(Struct, frozen=True, kw_only=True):
    spec: ClusterSpec
    file: str
    text: str


def _err(file: Path, text: str, path: str, message: str, hint: str) -> SpecError:
    return SpecError(message, file=str(file), path=path, line=locate(file, text, path), hint=hint)


def check_cluster(spec: ClusterSpec, file: Path, text: str) -> None:
    """Cross-field checks that need the whole file."""
    sites = [s.name for s in spec.sites]
    seen: set[str] = set()
    for i, s in enumerate(sites):
        if s in seen:
            raise _err(
                file,
                text,
                f"$.sites[{i}].name",
                f"site {s!r} is defined twice",
                "give every site a unique name",
            )
        seen.add(s)
    names: set[str] = set()
    for i, p in enumerate(spec.pools):
        if p.name in names:
            raise _err(
                file,
                text,
                f"$.pools[{i}].name",
                f"pool {p.name!r} is defined twice",
                "give every pool a unique name",
            )
        names.add(p.name)
        if p.site not in seen:
            raise _err(
                file,
                text,
                f"$.pools[{i}].site",
                f"unknown site {p.site!r}",
                f"use one of {sorted(seen)} or add it under [[sites]]",
            )
        if p.gpu_model and spec.gpu_models and p.gpu_model not in spec.gpu_models:
            raise _err(
                file,
                text,
                f"$.pools[{i}].gpu_model",
                f"unknown GPU model {p.gpu_model!r}",
                f"use one of {sorted(spec.gpu_models)} or add [gpu_models.{p.gpu_model}]",
            )
    for i, ln in enumerate(spec.links):
        for j, s in enumerate(ln.between):
            if s not in seen:
                raise _err(
                    file,
                    text,
                    f"$.links[{i}].between[{j}]",
                    f"unknown site {s!r}",
                    f"use one of {sorted(seen)}",
                )
    dnames: set[str] = set()
    for i, d in enumerate(spec.datasets):
        if d.name in dnames:
            raise _err(
                file,
                text,
                f"$.datasets[{i}].name",
                f"dataset {d.name!r} defined twice",
                "give every dataset a unique name",
            )
        dnames.add(d.name)
        for j, s in enumerate(d.sites):
            if s not in seen:
                raise _err(
                    file,
                    text,
                    f"$.datasets[{i}].sites[{j}]",
                    f"unknown site {s!r}",
                    f"use one of {sorted(seen)}",
                )
    for project, quota in spec.scheduler.project_sites.items():
        for j, s in enumerate(quota):
            if s not in seen:
                raise _err(
                    file,
                    text,
                    f"$.scheduler.project_sites.{project}[{j}]",
                    f"unknown site {s!r}",
                    f"use one of {sorted(seen)}",
                )
    for i, c in enumerate(spec.faults.cutoffs):
        if c.site not in seen:
            raise _err(
                file,
                text,
                f"$.faults.cutoffs[{i}].site",
                f"unknown site {c.site!r}",
                f"use one of {sorted(seen)}",
            )


def parse_cluster(text: str, file: Path) -> ClusterSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise SpecError(
            f"not valid TOML: {e}",
            file=str(file),
            line=int(m.group(1)) if m else None,
            hint="check quoting, brackets and '=' on that line",
        ) from None
    spec = decode(file, text, raw, ClusterSpec)
    check_cluster(spec, file, text)
    return spec


def load_cluster(path: Path) -> LoadedCluster:
    """Read and check a cluster TOML file; raise ``SpecError`` on the first problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            "file not found",
            file=str(path),
            hint="check the path; examples are in examples/clusters/",
        ) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise SpecError(f"cannot read: {e}", file=str(path)) from None
    if path.suffix.lower() == ".csv":
        return LoadedCluster(spec=cluster_from_node_list(path, text), file=str(path), text=text)
    if path.suffix.lower() != ".toml":
        raise SpecError(
            "a cluster file must be TOML (or an Alibaba node list CSV)",
            file=str(path),
            hint="name it *.toml; see examples/clusters/",
        )
    return LoadedCluster(spec=parse_cluster(text, path), file=str(path), text=text)


def cluster_from_node_list(path: Path, text: str) -> ClusterSpec:
    """A Kubernetes cluster from a real node list: one node pool per node shape.

    Reads Alibaba's openb node lists (``sn,cpu_milli,memory_mib,gpu,model``) and the 2026 spot
    GPU node list (``gpu_model,gpu_capacity_num,cpu_num,node_name``; it records no memory, so
    every node gets 8 GiB per CPU, and the report's workload notes do not cover that: it is
    said here and in the pool names' ``-m8`` suffix).
    """
    import csv

    lines = text.splitlines()
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    shapes: dict[tuple[str, int, float, int], int] = {}
    openb = {"sn", "cpu_milli", "memory_mib", "gpu", "model"} <= set(header)
    spot = {"gpu_model", "gpu_capacity_num", "cpu_num"} <= set(header)
    if not (openb or spot):
        raise SpecError(
            "not a node list this simulator reads",
            file=str(path),
            line=1,
            hint="give a cluster TOML, an openb node list (sn,cpu_milli,memory_mib,gpu,model) "
            "or the spot GPU node list (gpu_model,gpu_capacity_num,cpu_num,node_name)",
        )
    for row in reader:
        line = reader.line_num
        try:
            if openb:
                model = row["model"].strip().lower()
                gpus = int(row["gpu"])
                cpus = int(row["cpu_milli"]) / 1000.0
                mem = int(row["memory_mib"]) << 20
            else:
                model = row["gpu_model"].strip().lower()
                gpus = int(row["gpu_capacity_num"])
                cpus = float(row["cpu_num"])
                mem = int(cpus) * (8 << 30)
        except (ValueError, TypeError, AttributeError):
            raise SpecError(
                "a field is not a number",
                file=str(path),
                line=line,
                hint="every node needs whole numbers for GPUs, CPUs and memory",
            ) from None
        if gpus < 0 or cpus <= 0 or mem <= 0:
            raise SpecError(
                "a node with no CPUs or memory", file=str(path), line=line, hint="check the row"
            )
        key = (model if gpus else "", gpus, cpus, mem)
        shapes[key] = shapes.get(key, 0) + 1
    pools = []
    for (model, gpus, cpus, mem), n in sorted(shapes.items()):
        label = f"{model or 'cpu'}-x{gpus}-c{cpus:g}-m{mem >> 30}"
        name = re.sub(r"[^A-Za-z0-9_.\-]", "-", label)[:64]
        pools.append(
            PoolSpec(
                name=name,
                site="k8s",
                kind=PoolKind.KUBERNETES,
                nodes=n,
                gpus_per_node=gpus,
                gpu_model=model or None,
                cpus_per_node=cpus,
                memory_per_node=mem,
            )
        )
    if not pools:
        raise SpecError("no nodes in the file", file=str(path), hint="check the file")
    return ClusterSpec(
        cluster=ClusterMeta(name=re.sub(r"[^A-Za-z0-9_.\-]", "-", path.stem)),
        sites=[SiteSpec(name="k8s")],
        pools=pools,
    )


def with_changes(spec: ClusterSpec, pools: list[PoolSpec]) -> ClusterSpec:
    """The same cluster with another pool list (used by what-if variants)."""
    return msgspec.structs.replace(spec, pools=pools)
