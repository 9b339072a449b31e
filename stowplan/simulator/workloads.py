"""Workloads: real traces read through loaders, seeded synthetic sweeps, dataset placement.

Every loader reads the whole file and checks every row before anything runs; a malformed row is
a ``SpecError`` naming the file, the line and the column, with a fix. Loaders never invent data:
what a trace does not record (where data lives) is either added by an explicit, seeded,
documented rule, or written into ``Workload.notes`` so that the report says what was assumed.
A pod that asks for a share of one GPU (openb's ``gpu_milli`` below 1000) keeps its share
(``SimJob.gpu_milli``); the notes say how many there are.

Supported sources (auto-detected from a file's header, or named in a workload TOML file):

``gavel``     Gavel's Philly virtual-cluster traces (7 tab-separated fields) with its throughput
              table: a job's duration is ``total_steps / throughput[job type, GPUs][GPU model]``,
              so it depends on where the job runs. Job types missing from the table are dropped
              (and counted).
``philly``    the 82,247-job Microsoft Philly list (submit time, duration, GPUs, virtual cluster).
``openb``     Alibaba PAI ``openb`` pods (CPU milli, memory MiB, GPUs, GPU-type constraints).
``dlrm``      Alibaba's 2025 long-running inference instances: services that never finish unless
              the trace deletes them, with per-node anti-affinity caps.
``tiresias``  the Tiresias 60-job trace.
``synthetic`` a hyperparameter sweep: Poisson arrivals and lognormal durations, seeded.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import math
import os
import random
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated

from msgspec import Meta, Struct, field

from stowplan.errors import SpecError
from stowplan.spec.loader import decode
from stowplan.spec.units import parse_duration

MIB = 1 << 20
GIB = 1 << 30


class SimJob(Struct, kw_only=True, gc=False):
    """One job of a workload, as the simulator replays it."""

    id: str
    submit: float
    duration: float | None = None
    """seconds of work; None with ``steps``: from the throughput table; None without: never ends"""
    gpus: int = 0
    gpu_milli: int = 1000
    """thousandths of its GPU it takes: below 1000 for a share of one GPU (``gpus`` is 1),
    which goes beside other shares on one device of a pool with ``gpu_sharing`` and holds a
    whole device elsewhere (``TaskInstance.gpu_milli``)"""
    nodes: int = 1
    """a gang: ``gpus``, ``cpus`` and ``memory`` are its totals, an equal part on each of this
    many nodes (``TaskInstance.nodes``); only pools with ``device_leases`` take gangs. A job
    wider than a node becomes one where every GPU pool leases devices (``shell.gang_width``)"""
    cpus: float = 1.0
    memory: int = GIB
    gpu_types: tuple[str, ...] = ()
    project: str = "default"
    job_type: str = ""
    steps: float = 0.0
    service: str = ""
    """long-running service (app) this instance belongs to, for anti-affinity"""
    max_per_node: int = 0
    """at most this many instances of ``service`` per node (0: no limit)"""
    datasets: tuple[str, ...] = ()


class Throughput(Struct, frozen=True, kw_only=True):
    """Steps per second per (job type, GPUs) and GPU model (lower-case), e.g. Gavel's table."""

    source: str
    table: dict[str, dict[str, float]]
    """``"job type|gpus"`` -> GPU model -> steps per second"""

    @staticmethod
    def key(job_type: str, gpus: int) -> str:
        return f"{job_type}|{gpus}"

    def rate(self, job_type: str, gpus: int, model: str) -> float | None:
        row = self.table.get(self.key(job_type, gpus))
        return None if row is None else row.get(model.lower())


class Workload(Struct, kw_only=True):
    name: str
    kind: str
    source: str
    jobs: list[SimJob]
    throughput: Throughput | None = None
    notes: list[str] = field(default_factory=list)
    data_placement: dict[str, object] = field(default_factory=dict)


class WorkloadKind(enum.StrEnum):
    GAVEL = "gavel"
    PHILLY = "philly"
    OPENB = "openb"
    DLRM = "dlrm"
    TIRESIAS = "tiresias"
    SYNTHETIC = "synthetic"


# ---- where traces live -----------------------------------------------------------------------

TRACES_ENV = "STOWPLAN_TRACES"
"""Names the folder that holds the traces too large (or not free enough) to ship."""

SHIPPED = {
    "tiresias-sim/60_job.csv": "examples/traces/tiresias/60_job.csv",
    "gavel/traces/msr/seed=0/103959.trace": "examples/traces/gavel/103959.trace",
    "gavel/derived_isolated_throughputs_simulation.csv": (
        "examples/traces/gavel/derived_isolated_throughputs_simulation.csv"
    ),
    "acme-helios-philly-pai-summary/philly_vc_node_counts.csv": (
        "examples/traces/helios/philly_vc_node_counts.csv"
    ),
}
"""Traces the repository ships (path under ``$STOWPLAN_TRACES`` -> path in a checkout)."""

UPSTREAM = {
    "philly-derived-pollux": "https://github.com/petuum/adaptdl (branch osdi21-artifact, "
    "commit c793c7089bd307462686339d29707925c461f9a9), simulator/traces/",
    "gavel": "https://github.com/stanford-futuredata/gavel (commit "
    "c4fa40097339e9608ab71fd64c8bdea96a5e4a4c), scheduler/",
    "tiresias-sim": "https://github.com/SymbioticLab/Tiresias (commit "
    "959f9b08f44fa1b4f2b3aed79b01e4d439264a94), simulator/",
    "alibaba-gpu-v2023-openb": "https://github.com/alibaba/clusterdata, "
    "cluster-trace-gpu-v2023/csv/ (research or study use only)",
    "alibaba-gpu-v2025-dlrm": "https://github.com/alibaba/clusterdata, "
    "cluster-trace-gpu-v2025/ (research or study use only)",
    "alibaba-v2026-spot-gpu-nodes": "https://github.com/alibaba/clusterdata, "
    "cluster-trace-v2026-spot-gpu/ (research or study use only)",
    "acme-helios-philly-pai-summary": "https://github.com/InternLM/AcmeTrace, data/ and "
    "https://github.com/S-Lab-System-Group/HeliosArtifact",
    "pollux-goodput-profiles": "https://github.com/petuum/adaptdl (branch osdi21-artifact), "
    "simulator/traces/<model>/",
}
"""Where each trace folder of ``$STOWPLAN_TRACES`` comes from (see examples/traces/README.md)."""


def _where_to_get(path: Path) -> str | None:
    """A hint for a trace path that does not exist: the shipped copy, or where to download it."""
    parts = path.as_posix().split("/")
    for i, folder in enumerate(parts):
        rel = "/".join(parts[i:])
        if rel in SHIPPED:
            return f"a copy ships with stowplan: {SHIPPED[rel]}"
        if folder in UPSTREAM:
            return (
                f"{rel} is not shipped with stowplan; get it from {UPSTREAM[folder]} and put "
                f"it under ${TRACES_ENV}/{folder}/ (see examples/traces/README.md)"
            )
    return None


_REPO = Path(__file__).resolve().parents[2]


def trace_path(relative: str) -> Path:
    """``$STOWPLAN_TRACES/relative``, checked: a ``SpecError`` names what is missing and where to
    get it. For the traces too large or not free enough to ship (see examples/traces/)."""
    shipped = SHIPPED.get(relative)
    if shipped is not None and (_REPO / shipped).is_file():
        return _REPO / shipped
    folder = relative.split("/", 1)[0]
    source = UPSTREAM.get(folder, "its publisher (see examples/traces/README.md)")
    base = os.environ.get(TRACES_ENV, "")
    if not base:
        raise SpecError(
            f"needs {relative}, which is not shipped with stowplan, and {TRACES_ENV} is not set",
            path=TRACES_ENV,
            hint=f"get {folder}/ from {source} and set {TRACES_ENV} to the folder that holds it",
        )
    path = Path(base) / relative
    if not path.exists():
        raise SpecError(
            f"not found under {TRACES_ENV}={base} (it is not shipped with stowplan)",
            file=str(path),
            hint=f"get {relative} from {source} and put it there",
        )
    return path


# ---- helpers ------------------------------------------------------------------------------


def _not_found(path: Path) -> SpecError:
    return SpecError("file not found", file=str(path), hint=_where_to_get(path) or "check the path")


def _bad(file: Path, line: int, column: str, message: str, hint: str) -> SpecError:
    return SpecError(message, file=str(file), line=line, path=f"column {column!r}", hint=hint)


def _open(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _not_found(path) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise SpecError(f"cannot read: {e}", file=str(path)) from None


def _rows(path: Path, text: str, need: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """CSV rows with their line numbers, after checking the header has every needed column."""
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in need if c not in header]
    if missing:
        raise SpecError(
            f"missing column(s) {', '.join(missing)} in the header",
            file=str(path),
            line=1,
            hint=f"the header must name {', '.join(need)}",
        )
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise _bad(
                path,
                reader.line_num,
                header[-1],
                "wrong number of fields",
                f"every row needs {len(header)} comma-separated fields",
            )
        yield reader.line_num, row


def _num(
    path: Path,
    line: int,
    row: dict[str, str],
    col: str,
    *,
    lo: float = 0.0,
    allow_empty: bool = False,
) -> float | None:
    text = row[col].strip()
    if text == "" or text.lower() == "nan":
        if allow_empty:
            return None
        raise _bad(path, line, col, "empty value", "give a number")
    try:
        v = float(text)
    except ValueError:
        raise _bad(path, line, col, f"{text!r} is not a number", "give a number") from None
    if not math.isfinite(v) or v < lo:
        raise _bad(path, line, col, f"{text!r} is out of range", f"give a finite number >= {lo:g}")
    return v


def _int(path: Path, line: int, row: dict[str, str], col: str, *, lo: int = 0) -> int:
    v = _num(path, line, row, col, lo=lo)
    assert v is not None
    if v != int(v):
        raise _bad(path, line, col, f"{row[col]!r} is not a whole number", "give an integer")
    return int(v)


# ---- Gavel --------------------------------------------------------------------------------


def load_throughput(path: Path) -> Throughput:
    """Gavel's isolated throughputs, flattened: ``job_type,scale_factor,k80,...,v100,...``."""
    text = _open(path)
    table: dict[str, dict[str, float]] = {}
    reader = csv.DictReader(text.splitlines())
    cols = [c for c in (reader.fieldnames or []) if c not in ("job_type", "scale_factor")]
    models = [c for c in cols if not c.endswith("_unconsolidated")]
    if "job_type" not in (reader.fieldnames or []) or not models:
        raise SpecError(
            "not a throughput table",
            file=str(path),
            line=1,
            hint="the header must be job_type,scale_factor,<gpu model>,...",
        )
    for line, row in _rows(path, text, ("job_type", "scale_factor")):
        sf = _int(path, line, row, "scale_factor", lo=1)
        rates = {}
        for m in models:
            v = _num(path, line, row, m)
            assert v is not None
            rates[m.lower()] = v
        table[Throughput.key(row["job_type"], sf)] = rates
    return Throughput(source=str(path), table=table)


def find_throughput_for(trace: Path) -> Path | None:
    """The throughput table beside a Gavel trace folder (``gavel/derived_isolated_...csv``)."""
    for parent in trace.resolve().parents:
        cand = parent / "derived_isolated_throughputs_simulation.csv"
        if cand.exists():
            return cand
    return None


def load_gavel(path: Path, throughput: Throughput) -> Workload:
    """Gavel's 7-field msr traces: type, command, steps arg, needs data, steps, arrival, GPUs."""
    text = _open(path)
    jobs: list[SimJob] = []
    dropped: dict[str, int] = {}
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        f = raw.split("\t")
        if len(f) != 7:
            raise SpecError(
                f"expected 7 tab-separated fields, found {len(f)}",
                file=str(path),
                line=i,
                path="fields",
                hint="job_type, command, num_steps_arg, needs_data_dir, total_steps, "
                "arrival_time, scale_factor (Gavel's msr trace format)",
            )
        row = {"total_steps": f[4], "arrival_time": f[5], "scale_factor": f[6]}
        steps = _num(path, i, row, "total_steps", lo=1)
        arrival = _num(path, i, row, "arrival_time")
        gpus = _int(path, i, row, "scale_factor", lo=1)
        assert steps is not None and arrival is not None
        job_type = f[0]
        if Throughput.key(job_type, gpus) not in throughput.table:
            k = f"{job_type} x{gpus}"
            dropped[k] = dropped.get(k, 0) + 1
            continue
        jobs.append(
            SimJob(
                id=f"j{i:06d}",
                submit=arrival,
                gpus=gpus,
                cpus=1.0,
                memory=GIB,
                job_type=job_type,
                steps=steps,
                project=job_type.split(" ")[0],
            )
        )
    notes = []
    if dropped:
        notes.append(
            f"dropped {sum(dropped.values())} jobs whose (job type, GPUs) is missing from the "
            f"throughput table: " + ", ".join(f"{k}: {n}" for k, n in sorted(dropped.items()))
        )
    notes.append("job duration = total_steps / isolated throughput on the GPU model it runs on")
    notes.append(
        "each job type is a project: the core groups ready jobs into classes per project, so "
        "a class holds one job type and a heterogeneity-aware policy can tell them apart"
    )
    return Workload(
        name=path.stem,
        kind="gavel",
        source=str(path),
        jobs=jobs,
        throughput=throughput,
        notes=notes,
    )


# ---- Philly -------------------------------------------------------------------------------


def load_philly(path: Path) -> Workload:
    """The derived Philly list: ``timestamp,duration,num_gpus,gpu_time,cluster``.

    Read with a plain ``csv.reader`` and a fast path per row (82,247 rows); any row the fast
    path rejects is re-checked field by field for an exact error.
    """
    text = _open(path)
    lines = text.splitlines()
    reader = csv.reader(lines)
    header = next(reader, [])
    need = ("timestamp", "duration", "num_gpus", "cluster")
    missing = [c for c in need if c not in header]
    if missing:
        raise SpecError(
            f"missing column(s) {', '.join(missing)} in the header",
            file=str(path),
            line=1,
            hint=f"the header must name {', '.join(need)}",
        )
    its, idur, igpu, ivc = (header.index(c) for c in need)
    epoch = datetime(1970, 1, 1)
    raw: list[tuple[float, int, float, int, str]] = []
    for line, f in enumerate(reader, start=2):
        if not f:
            continue
        try:
            ts = (datetime.fromisoformat(f[its]) - epoch).total_seconds()
            dur = float(f[idur])
            gpus = int(f[igpu])
            vc = f[ivc].strip()
            ok = dur >= 0 and math.isfinite(dur) and gpus >= 1 and len(f) == len(header)
        except (ValueError, IndexError):
            ok = False
        if not ok:
            if len(f) != len(header):
                raise _bad(
                    path,
                    line,
                    header[-1],
                    "wrong number of fields",
                    f"every row needs {len(header)} comma-separated fields",
                )
            row = dict(zip(header, f, strict=True))
            try:
                datetime.fromisoformat(row["timestamp"])
            except ValueError:
                raise _bad(
                    path,
                    line,
                    "timestamp",
                    f"{row['timestamp']!r} is not a time",
                    "write it as 'YYYY-MM-DD HH:MM:SS'",
                ) from None
            _num(path, line, row, "duration")
            _int(path, line, row, "num_gpus", lo=1)
            raise _bad(path, line, "num_gpus", "bad row", "check the row")  # pragma: no cover
        raw.append((ts, line, dur, gpus, vc))
    if not raw:
        raise SpecError("no jobs in the file", file=str(path), hint="check the file")
    t0 = min(r[0] for r in raw)
    raw.sort()
    jobs = [
        SimJob(
            id=f"p{line:06d}",
            submit=ts - t0,
            duration=dur,
            gpus=gpus,
            cpus=1.0,
            memory=GIB,
            project=vc,
        )
        for ts, line, dur, gpus, vc in raw
    ]
    return Workload(
        name=path.stem,
        kind="philly",
        source=str(path),
        jobs=jobs,
        notes=[
            "submit times are seconds after the first submission in the file; each "
            "virtual cluster (VC) is a project for fair share"
        ],
    )


# ---- Alibaba ------------------------------------------------------------------------------


def load_openb(path: Path) -> Workload:
    """Alibaba PAI openb pods; a pod runs from its scheduled (or creation) to deletion time."""
    text = _open(path)
    need = (
        "name",
        "cpu_milli",
        "memory_mib",
        "num_gpu",
        "gpu_milli",
        "gpu_spec",
        "creation_time",
        "deletion_time",
        "scheduled_time",
    )
    jobs: list[SimJob] = []
    fractional = 0
    for line, row in _rows(path, text, need):
        created = _num(path, line, row, "creation_time")
        deleted = _num(path, line, row, "deletion_time", allow_empty=True)
        sched = _num(path, line, row, "scheduled_time", allow_empty=True)
        assert created is not None
        start = sched if sched is not None else created
        gpus = _int(path, line, row, "num_gpu")
        milli = _num(path, line, row, "gpu_milli")
        assert milli is not None
        share = int(milli) if gpus == 1 and 0 < milli < 1000 else 1000
        if share < 1000:
            fractional += 1
        if deleted is not None and deleted < start:
            raise _bad(
                path,
                line,
                "deletion_time",
                "deleted before it started",
                "deletion_time must not be before scheduled_time",
            )
        spec = row["gpu_spec"].strip()
        jobs.append(
            SimJob(
                id=row["name"].strip() or f"pod{line}",
                submit=created,
                duration=None if deleted is None else max(1.0, deleted - start),
                gpus=gpus,
                gpu_milli=share,
                cpus=max(0.001, (_num(path, line, row, "cpu_milli") or 0.0) / 1000.0),
                memory=max(MIB, int((_num(path, line, row, "memory_mib") or 0.0) * MIB)),
                gpu_types=tuple(sorted(s.lower() for s in spec.split("|"))) if spec else (),
                project=row.get("qos", "").strip() or "default",
            )
        )
    jobs.sort(key=lambda j: (j.submit, j.id))
    notes = []
    if fractional:
        notes.append(
            f"{fractional} pods ask for a fraction of a GPU (gpu_milli < 1000): shares go "
            "beside other shares on one device of pools with gpu_sharing, and each takes a "
            "whole GPU on every other pool"
        )
    return Workload(name=path.stem, kind="openb", source=str(path), jobs=jobs, notes=notes)


def load_dlrm(path: Path) -> Workload:
    """Alibaba's 2025 DLRM serving instances: long-running, with per-node anti-affinity caps."""
    text = _open(path)
    need = (
        "instance_sn",
        "role",
        "app_name",
        "cpu_request",
        "gpu_request",
        "memory_request",
        "max_instance_per_node",
        "creation_time",
        "deletion_time",
    )
    jobs: list[SimJob] = []
    for line, row in _rows(path, text, need):
        created = _num(path, line, row, "creation_time", allow_empty=True)
        deleted = _num(path, line, row, "deletion_time", allow_empty=True)
        submit = created if created is not None else 0.0
        gpus = _int(path, line, row, "gpu_request")
        cap_v = _num(path, line, row, "max_instance_per_node", lo=-1)
        assert cap_v is not None
        cap = int(cap_v)
        if deleted is not None and deleted < submit:
            raise _bad(
                path,
                line,
                "deletion_time",
                "deleted before it was created",
                "deletion_time must not be before creation_time",
            )
        app = row["app_name"].strip()
        jobs.append(
            SimJob(
                id=row["instance_sn"].strip(),
                submit=submit,
                duration=None if deleted is None else max(1.0, deleted - submit),
                gpus=gpus,
                cpus=max(0.001, _num(path, line, row, "cpu_request") or 0.0),
                memory=max(MIB, int((_num(path, line, row, "memory_request") or 0.0) * GIB)),
                project=app,
                service=app,
                max_per_node=max(0, cap),
            )
        )
    jobs.sort(key=lambda j: (j.submit, j.id))
    return Workload(
        name=path.stem,
        kind="dlrm",
        source=str(path),
        jobs=jobs,
        notes=[
            "instances created before the trace start arrive at 0; instances never deleted "
            "run until the simulation ends (they have no completion time)"
        ],
    )


# ---- Tiresias -----------------------------------------------------------------------------


def load_tiresias(path: Path) -> Workload:
    text = _open(path)
    need = ("job_id", "num_gpu", "submit_time", "model_name", "duration")
    jobs = []
    for line, row in _rows(path, text, need):
        jobs.append(
            SimJob(
                id=f"t{row['job_id'].strip()}",
                submit=_num(path, line, row, "submit_time") or 0.0,
                duration=max(1.0, _num(path, line, row, "duration") or 0.0),
                gpus=_int(path, line, row, "num_gpu", lo=1),
                job_type=row["model_name"].strip(),
                project=row["model_name"].strip(),
            )
        )
    jobs.sort(key=lambda j: (j.submit, j.id))
    return Workload(name=path.stem, kind="tiresias", source=str(path), jobs=jobs)


# ---- synthetic ----------------------------------------------------------------------------


class SyntheticSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A hyperparameter sweep: Poisson arrivals, lognormal durations."""

    trials: Annotated[int, Meta(ge=1, le=10_000_000)] = 1000
    arrivals_per_hour: Annotated[float, Meta(gt=0)] = 120.0
    duration_median: float | str = "30m"
    duration_sigma: Annotated[float, Meta(ge=0, le=10)] = 1.0
    gpus: Annotated[int, Meta(ge=0)] = 1
    gpu_types: list[str] = field(default_factory=list)
    cpus: Annotated[float, Meta(gt=0)] = 4.0
    memory: Annotated[int, Meta(ge=1)] = 16 * GIB
    projects: Annotated[int, Meta(ge=1)] = 1
    seed: int = 0

    def __post_init__(self) -> None:
        from msgspec.structs import force_setattr

        try:
            force_setattr(self, "duration_median", parse_duration(self.duration_median))
        except ValueError as e:
            raise ValueError(f"duration_median: {e}") from None


def synthetic_sweep(spec: SyntheticSpec, name: str = "sweep") -> Workload:
    """Trials arrive as a Poisson process; each runs a lognormal time around the median."""
    rng = random.Random(f"synthetic:{spec.seed}")
    median = float(spec.duration_median)
    t = 0.0
    jobs = []
    rate = spec.arrivals_per_hour / 3600.0
    for i in range(spec.trials):
        t += rng.expovariate(rate)
        dur = max(1.0, median * math.exp(rng.gauss(0.0, spec.duration_sigma)))
        jobs.append(
            SimJob(
                id=f"s{i:07d}",
                submit=t,
                duration=dur,
                gpus=spec.gpus,
                cpus=spec.cpus,
                memory=spec.memory,
                gpu_types=tuple(sorted(g.lower() for g in spec.gpu_types)),
                project=f"user{i % spec.projects}",
            )
        )
    return Workload(
        name=name,
        kind="synthetic",
        source=f"synthetic(seed={spec.seed})",
        jobs=jobs,
        notes=[
            f"{spec.trials} trials, Poisson arrivals at {spec.arrivals_per_hour:g}/h, "
            f"lognormal durations (median {median:g} s, sigma {spec.duration_sigma:g}), "
            f"seed {spec.seed}"
        ],
    )


# ---- dataset placement ----------------------------------------------------------------------


def assign_datasets(workload: Workload, datasets: list[str], seed: int) -> None:
    """Give every job one input dataset, chosen by a seeded hash of its id. Explicit, documented.

    Rule: job ``j`` reads ``datasets[blake2b(f"{seed}:{j.id}") mod len(datasets)]``. The rule,
    the seed and the datasets are written into the report (``data_placement``). The hash of the
    job id (not a draw from a stream) keeps each job's dataset independent of the trace's order
    and of which other jobs are in it.
    """
    names = sorted(datasets)
    if not names:
        return
    for j in workload.jobs:
        h = hashlib.blake2b(f"{seed}:{j.id}".encode(), digest_size=8).digest()
        j.datasets = (names[int.from_bytes(h, "big") % len(names)],)
    workload.data_placement = {
        "rule": "each job reads datasets[blake2b(seed:job id) mod n] (sorted by name)",
        "seed": seed,
        "datasets": names,
    }


# ---- detection and workload files -----------------------------------------------------------


class WorkloadMeta(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: WorkloadKind
    path: str | None = None
    throughput: str | None = None
    name: str | None = None
    limit: Annotated[int, Meta(ge=1)] | None = None
    """keep only the first ``limit`` jobs (in submit order)"""


class DataSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    datasets: Annotated[list[str], Meta(min_length=1)]
    seed: int = 0


class WorkloadFile(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    workload: WorkloadMeta
    synthetic: SyntheticSpec | None = None
    data: DataSpec | None = None


class FileKind(enum.StrEnum):
    """What an input file is, told from its top-level tables or its header."""

    CLUSTER = "a cluster file"
    WORKLOAD = "a workload"
    EXPERIMENT = "an experiment file (for stowplan run)"
    PROJECT = "a project file (stowplan.toml)"
    UNKNOWN = "unknown"


_TOML_KINDS = {
    "workload": FileKind.WORKLOAD,
    "synthetic": FileKind.WORKLOAD,
    "cluster": FileKind.CLUSTER,
    "pools": FileKind.CLUSTER,
    "experiment": FileKind.EXPERIMENT,
    "tasks": FileKind.EXPERIMENT,
    "project": FileKind.PROJECT,
    "providers": FileKind.PROJECT,
}
_TRACE_HEADERS = (
    "timestamp,duration,num_gpus",
    "job_id,num_gpu,submit_time",
    "name,cpu_milli,memory_mib,num_gpu",
    "instance_sn,role,app_name",
)
_NODE_LIST_HEADERS = ("sn,cpu_milli,memory_mib,gpu,model", "gpu_model,gpu_capacity_num,cpu_num")
CLUSTER_EXAMPLE = "examples/clusters/university-slurm.toml"
WORKLOAD_EXAMPLES = "examples/traces/tiresias/60_job.csv or examples/clusters/sweep-workload.toml"


def file_kind(path: Path) -> FileKind:
    """Cluster, workload, experiment or project file, by content; ``UNKNOWN`` when it cannot
    tell (or cannot read it: the loader then says why). Never opens anything but a regular file.
    """
    try:
        if not path.is_file():
            return FileKind.UNKNOWN
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
            kinds = {_TOML_KINDS[k] for k in raw if k in _TOML_KINDS}
            return kinds.pop() if len(kinds) == 1 else FileKind.UNKNOWN
        if path.suffix == ".trace":
            return FileKind.WORKLOAD
        with path.open(encoding="utf-8") as fh:
            first = fh.readline(4096).strip()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return FileKind.UNKNOWN
    if first.startswith(_TRACE_HEADERS):
        return FileKind.WORKLOAD
    if first.startswith(_NODE_LIST_HEADERS):
        return FileKind.CLUSTER
    return FileKind.UNKNOWN


def _not_a_workload(path: Path, kind: FileKind) -> SpecError:
    return SpecError(
        f"this is {kind.value}, not a workload",
        file=str(path),
        hint=f"give a trace or a workload TOML with a [workload] table, e.g. {WORKLOAD_EXAMPLES}"
        + (
            " (a cluster file goes first: stowplan sim CLUSTER WORKLOAD)"
            if kind is FileKind.CLUSTER
            else ""
        ),
    )


def detect(path: Path) -> WorkloadKind:
    """Which loader reads ``path``, from its extension or its first line."""
    if path.suffix == ".trace":
        return WorkloadKind.GAVEL
    try:
        with path.open(encoding="utf-8") as fh:
            first = fh.readline().strip()
    except FileNotFoundError:
        raise _not_found(path) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise SpecError(f"cannot read: {e}", file=str(path)) from None
    if first.startswith("timestamp,duration,num_gpus"):
        return WorkloadKind.PHILLY
    if first.startswith("job_id,num_gpu,submit_time"):
        return WorkloadKind.TIRESIAS
    if first.startswith("name,cpu_milli,memory_mib,num_gpu"):
        return WorkloadKind.OPENB
    if first.startswith("instance_sn,role,app_name"):
        return WorkloadKind.DLRM
    if first.startswith(_NODE_LIST_HEADERS):
        raise _not_a_workload(path, FileKind.CLUSTER)
    raise SpecError(
        "cannot tell what kind of trace this is",
        file=str(path),
        line=1,
        hint="pass a Gavel *.trace, the Philly, Tiresias, openb or DLRM CSV, or a workload "
        "*.toml with [workload] kind = ...",
    )


def load_trace(path: Path, kind: WorkloadKind, throughput: Path | None = None) -> Workload:
    if kind is WorkloadKind.GAVEL:
        table = throughput or find_throughput_for(path)
        if table is None:
            raise SpecError(
                "a Gavel trace needs its throughput table",
                file=str(path),
                hint="name it with throughput = '.../derived_isolated_throughputs_simulation.csv'"
                " in a workload file",
            )
        return load_gavel(path, load_throughput(table))
    loader = {
        WorkloadKind.PHILLY: load_philly,
        WorkloadKind.OPENB: load_openb,
        WorkloadKind.DLRM: load_dlrm,
        WorkloadKind.TIRESIAS: load_tiresias,
    }[kind]
    return loader(path)


def load_workload(path: Path) -> Workload:
    """A workload TOML file, or a trace file recognised by its header."""
    if path.suffix.lower() != ".toml":
        return load_trace(path, detect(path))
    text = _open(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(
            f"not valid TOML: {e}",
            file=str(path),
            hint="check quoting, brackets and '=' on that line",
        ) from None
    if "workload" not in raw:
        kinds = {_TOML_KINDS[k] for k in raw if k in _TOML_KINDS} - {FileKind.WORKLOAD}
        if len(kinds) == 1:
            raise _not_a_workload(path, kinds.pop())
    wf = decode(path, text, raw, WorkloadFile)
    meta = wf.workload
    base = path.resolve().parent
    if meta.kind is WorkloadKind.SYNTHETIC:
        if wf.synthetic is None:
            raise SpecError(
                "kind = 'synthetic' needs a [synthetic] table",
                file=str(path),
                path="$.synthetic",
                hint="add [synthetic] with trials = ..., ...",
            )
        wl = synthetic_sweep(wf.synthetic, meta.name or path.stem)
    else:
        if meta.path is None:
            raise SpecError(
                f"kind = {meta.kind.value!r} needs the trace's path",
                file=str(path),
                path="$.workload.path",
                hint="add path = '...' (relative to this file)",
            )
        tp = base / meta.throughput if meta.throughput else None
        wl = load_trace(base / meta.path, meta.kind, tp)
        if meta.name:
            wl.name = meta.name
    if meta.limit is not None and len(wl.jobs) > meta.limit:
        wl.notes.append(f"kept the first {meta.limit} of {len(wl.jobs)} jobs (limit)")
        del wl.jobs[meta.limit :]
    if wf.data is not None:
        assign_datasets(wl, wf.data.datasets, wf.data.seed)
    return wl
