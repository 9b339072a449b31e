"""Pure parsers of Slurm command output, tested on output captured from a real cluster.

The driver asks for machine-readable formats that Slurm 22.05 has: ``scontrol -o`` (one
record per line), ``squeue -h -r -o`` and ``sacct -X -P -n`` with ``|``-separated fields.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Callable, Sequence

from msgspec import Struct, field

from stowplan.placement.problem import NodeGroup, Pool, Shape
from stowplan.spec.units import MAX_GPUS

SECTION = "@@stowplan@@"
"""Printed between the outputs of several commands run in one remote call."""

SQUEUE_FIELDS = ("%F", "%K", "%i", "%j", "%T", "%N", "%S", "%r")
SQUEUE_FORMAT = "|".join(SQUEUE_FIELDS)
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "NodeList", "Start", "End", "Reason")
SACCT_FORMAT = ",".join(SACCT_FIELDS)

_KV = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:.]*)=")
_ARRAY_ID = re.compile(r"^(\d+)_(\d+)$")
_ARRAY_PENDING = re.compile(r"^(\d+)_\[([^\]]*)\]$")


class JobRow(Struct, frozen=True, kw_only=True):
    """One array element (or plain job) as squeue or sacct shows it."""

    job_id: str
    """The base (array) job id."""
    index: int | None
    name: str
    state: str
    node: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    reason: str = ""
    devices: tuple[int, ...] | None = None
    """The GPU indices Slurm bound to it, as its end record says (``None``: not known)."""

    @property
    def element_id(self) -> str:
        return self.job_id if self.index is None else f"{self.job_id}_{self.index}"


def split_sections(text: str) -> list[str]:
    return text.split(SECTION + "\n")


def parse_oneliner(text: str) -> list[dict[str, str]]:
    """``scontrol show ... -o``: one ``Key=Value`` record per line; values may hold spaces."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        matches = list(_KV.finditer(line))
        rec: dict[str, str] = {}
        for m, nxt in zip(matches, [*matches[1:], None], strict=True):
            end = nxt.start() if nxt is not None else len(line)
            rec[m.group(1)] = line[m.end() : end].strip()
        if rec:
            records.append(rec)
    return records


def parse_time(value: str) -> float | None:
    """Slurm's ``2026-11-26T08:15:02`` (the cluster's local time); ``Unknown``/``None``: none."""
    value = value.strip()
    if not value or value in ("Unknown", "None", "N/A"):
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def parse_exit(value: str) -> tuple[int | None, int | None]:
    """sacct's ``ExitCode`` ``CODE:SIGNAL``."""
    code, _, sig = value.strip().partition(":")
    try:
        return int(code), int(sig) if sig else None
    except ValueError:
        return None, None


def _expand(spec: str) -> list[int]:
    """``0-5,7,9-11%2`` -> indices (the ``%`` throttle is dropped)."""
    out: list[int] = []
    for part in spec.split("%", 1)[0].split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return out


def parse_squeue(text: str) -> list[JobRow]:
    """``squeue -h -r -o SQUEUE_FORMAT``: one line per array element."""
    rows = []
    for line in text.splitlines():
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS):
            continue
        base, index, _jid, name, state, nodes, start, reason = parts
        idx = int(index) if index.isdigit() else None
        rows.append(
            JobRow(
                job_id=base.strip(),
                index=idx,
                name=name,
                state=state.strip(),
                node=nodes.strip() or None,
                started_at=parse_time(start),
                reason="" if reason in ("None", "(null)") else reason.strip(),
            )
        )
    return rows


ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING"})
"""Queue states of an element that has not begun to end: accounting can tell nothing newer."""


def all_active(rows: list[JobRow], elements: Sequence[str]) -> bool:
    """Whether every element id of ``elements`` is in ``rows`` in an ``ACTIVE_STATES`` state
    (the rule ``DESCRIBE_PROGRAM`` applies on the cluster, for a backend that applies it here)."""
    active = {r.element_id for r in rows if r.state in ACTIVE_STATES}
    return all(e in active for e in elements)


def _epoch_text(text: str) -> float | None:
    """``EPOCHREALTIME`` as bash prints it (the locale's decimal mark); ``None`` if empty."""
    try:
        return float(text.strip().replace(",", "."))
    except ValueError:
        return None


_DEVICES = re.compile(r"^[0-9]{1,6}(?:,[0-9]{1,6})*$")


def parse_devices(text: str) -> tuple[int, ...] | None:
    """GPU indices as an element recorded them (``0,3``: ``SLURM_JOB_GPUS``); ``None`` for
    anything else (empty, a UUID, a range, a repeated or absurd index): they come from the
    environment of a job and are believed only in this one form."""
    text = text.strip()
    if not _DEVICES.match(text):
        return None
    out = tuple(int(d) for d in text.split(","))
    if len(set(out)) != len(out) or max(out) >= MAX_GPUS:
        return None
    return out


def parse_end_records(text: str) -> list[JobRow]:
    """End records as the describe program prints them (``JOB_INDEX|rc|start|end|node|gpus``,
    one a line; arrays submitted before GPUs were recorded lack ``|gpus``): a row each,
    COMPLETED for exit status 0, else FAILED; ``name`` is empty (the caller knows whose
    element each id is)."""
    rows = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            parts.append("")
        if len(parts) != 6:
            continue
        eid, rc, start, end, node, gpus = parts
        m = _ARRAY_ID.match(eid)
        try:
            code = int(rc)
        except ValueError:
            continue
        if m is None:
            continue
        rows.append(
            JobRow(
                job_id=m.group(1),
                index=int(m.group(2)),
                name="",
                state="COMPLETED" if code == 0 else "FAILED",
                exit_code=code,
                started_at=_epoch_text(start),
                ended_at=_epoch_text(end),
                node=node.strip() or None,
                devices=parse_devices(gpus),
            )
        )
    return rows


def parse_sacct(text: str) -> list[JobRow]:
    """``sacct -X -P -n --format=SACCT_FORMAT``; pending array ranges are expanded."""
    rows = []
    for line in text.splitlines():
        parts = line.split("|", len(SACCT_FIELDS) - 1)
        if len(parts) != len(SACCT_FIELDS):
            continue
        jid, name, state, exit_code, nodes, start, end, reason = parts
        code, sig = parse_exit(exit_code)
        node = None if nodes.strip() in ("", "None assigned") else nodes.strip()
        common = {
            "name": name,
            "state": state.strip(),
            "node": node,
            "exit_code": code,
            "signal": sig,
            "started_at": parse_time(start),
            "ended_at": parse_time(end),
            "reason": "" if reason in ("None", "(null)") else reason.strip(),
        }
        m = _ARRAY_ID.match(jid)
        p = _ARRAY_PENDING.match(jid)
        if m:
            rows.append(JobRow(job_id=m.group(1), index=int(m.group(2)), **common))  # type: ignore[arg-type]
        elif p:
            for i in _expand(p.group(2)):
                rows.append(JobRow(job_id=p.group(1), index=i, **common))  # type: ignore[arg-type]
        elif jid.isdigit():
            rows.append(JobRow(job_id=jid, index=None, **common))  # type: ignore[arg-type]
    return rows


def parse_key_lines(text: str) -> dict[str, tuple[str, int, str, int, list[str]]]:
    """``grep -H`` output ``NAME/job.sh:# stowplan-key INDEX KEY RUN_ID ATTEMPT OUTPUTS`` ->
    key -> (array NAME, INDEX, RUN_ID, ATTEMPT, OUTPUTS)."""
    out: dict[str, tuple[str, int, str, int, list[str]]] = {}
    for line in text.splitlines():
        path, _, rest = line.partition(":")
        words = rest.split(" ", 6)
        if len(words) != 7 or words[:2] != ["#", "stowplan-key"]:
            continue
        _, _, index, key, run_id, attempt, outputs = words
        if not index.isdigit() or not attempt.isdigit():
            continue
        try:
            outs = json.loads(outputs)
        except ValueError:
            continue
        if not isinstance(outs, list) or not all(isinstance(o, str) for o in outs):
            continue
        parts = path.rstrip("/").split("/")
        if len(parts) < 2:
            continue
        out[key] = (parts[-2], int(index), run_id, int(attempt), outs)
    return out


class SchedulerFacts(Struct, frozen=True, kw_only=True):
    """What bounds how fast and how deep the controller's queue is (``scontrol show config``
    and the number of jobs it holds)."""

    sched_interval_s: float = 60.0
    """seconds between passes of the main scheduler (Slurm's default ``sched_interval``)"""
    bf_interval_s: float | None = 30.0
    """seconds between backfill passes; ``None`` without ``sched/backfill``"""
    max_job_count: int | None = None
    jobs: int = 0
    """jobs (array elements shown by ``squeue -r``) in the controller now"""

    @property
    def pass_s(self) -> float:
        """The shortest time a queued job waits for a scheduling pass that can start it."""
        passes = [self.sched_interval_s]
        if self.bf_interval_s is not None:
            passes.append(self.bf_interval_s)
        return max(1.0, min(passes))

    @property
    def job_room(self) -> int | None:
        """Jobs the controller still accepts (``MaxJobCount`` less those it holds)."""
        if self.max_job_count is None:
            return None
        return max(0, self.max_job_count - self.jobs)


class NodeShape(Struct, frozen=True, kw_only=True):
    """What one node can give a single job, and how many usable nodes of a partition have
    that shape: CPUs (``CPUEfctv``, those left to jobs, else ``CPUTot``), memory in bytes
    (``RealMemory`` less ``MemSpecLimit``) and GPUs by type (``Gres``)."""

    cpus: int
    memory: int
    gpus: dict[str, int] = field(default_factory=dict)
    count: int = 1


class PartitionFacts(Struct, frozen=True, kw_only=True):
    name: str
    up: bool
    nodes: list[str]
    cpus: int = 0
    memory: int = 0
    gpus: dict[str, int] = field(default_factory=dict)
    node_shapes: list[NodeShape] = field(default_factory=list)
    """The distinct shapes of its usable nodes (``shapes_of``), the largest first."""
    max_time_s: float | None = None
    default: bool = False
    running_cpus: int = 0
    """CPUs allocated now on its usable nodes (every user's jobs, ours included)."""
    scheduler: SchedulerFacts | None = None
    """The controller's scheduling facts (cluster-wide); ``None`` where the backend has none."""


def expand_hostlist(expr: str) -> list[str]:
    """``n[1-3,5],gpu7`` -> ``["n1", "n2", "n3", "n5", "gpu7"]`` (one bracket level)."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", expr):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            out.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            if not lo.isdigit() or (hi and not hi.isdigit()):
                continue
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{i:0{width}d}{suffix}")
    return out


def parse_gres(gres: str) -> dict[str, int]:
    """Node ``Gres=gpu:fake:2(S:0),gpu:2`` -> GPUs by type (``unknown`` when untyped)."""
    out: dict[str, int] = {}
    if not gres or gres == "(null)":
        return out
    for item in re.split(r",(?![^()]*\))", gres):
        item = re.sub(r"\(.*\)$", "", item.strip())
        parts = item.split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        count = parts[-1]
        kind = parts[1] if len(parts) >= 3 else "unknown"
        if count.isdigit():
            out[kind] = out.get(kind, 0) + int(count)
    return out


def parse_time_limit(value: str) -> float | None:
    """Partition ``MaxTime``: ``UNLIMITED``, ``1-00:00:00``, ``30:00``, ``5``(minutes)."""
    value = value.strip()
    if not value or value.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
    parts = [int(p) for p in value.split(":")]
    if len(parts) == 1:
        secs = parts[0] * 60
    elif len(parts) == 2:
        secs = parts[0] * 60 + parts[1]
    else:
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return float(days * 86400 + secs)


_USABLE_NODE_STATES = ("IDLE", "MIXED", "ALLOCATED", "ALLOC", "COMPLETING", "MIX")


def shapes_of(nodes: Sequence[NodeShape]) -> list[NodeShape]:
    """One ``NodeShape`` per distinct shape of ``nodes``, with how many there are; the largest
    first (by GPUs, then CPUs, then memory), ties in a fixed order."""
    counts: dict[tuple[int, int, tuple[tuple[str, int], ...]], int] = {}
    for n in nodes:
        k = (n.cpus, n.memory, tuple(sorted((g, c) for g, c in n.gpus.items() if c > 0)))
        counts[k] = counts.get(k, 0) + n.count
    order = sorted(counts, key=lambda k: (-sum(c for _, c in k[2]), -k[0], -k[1], k[2]))
    return [NodeShape(cpus=k[0], memory=k[1], gpus=dict(k[2]), count=counts[k]) for k in order]


def largest_node(shapes: Sequence[NodeShape]) -> Shape | None:
    """``Pool.node`` of a partition: the shape the scheduler core checks every run against
    (a run larger than it in any one of CPUs, memory or a GPU type is refused there).

    It is the node that holds every other where there is one (a partition of one node type,
    or whose largest node is the largest in every respect): then the core refuses exactly the
    runs no node holds. Where no node holds every other (a 4-GPU node with 8 CPUs beside a
    64-CPU node without GPUs), no single shape can be exact: this is then the smallest shape
    that holds every node (64 CPUs, 4 GPUs), so the core never refuses a run that some node
    could hold; a run that fits it but no one node (64 CPUs and a GPU) is refused by sbatch
    itself ("Requested node configuration is not available"), at submit, never queued.
    ``None`` without usable nodes."""
    if not shapes:
        return None
    gpus: dict[str, int] = {}
    for s in shapes:
        for k, n in s.gpus.items():
            gpus[k] = max(gpus.get(k, 0), n)
    return Shape(
        cpus=float(max(s.cpus for s in shapes)),
        memory=max(s.memory for s in shapes),
        gpus={k: n for k, n in sorted(gpus.items()) if n > 0},
    )


def _int(rec: dict[str, str], *names: str) -> int:
    """The first of ``names`` that ``rec`` has as a whole number (0 without one)."""
    for name in names:
        value = rec.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def node_shape(rec: dict[str, str]) -> NodeShape:
    """A ``scontrol show node -o`` record's ``NodeShape``."""
    memory = max(0, _int(rec, "RealMemory") - _int(rec, "MemSpecLimit"))
    return NodeShape(
        cpus=_int(rec, "CPUEfctv", "CPUTot"),
        memory=memory << 20,
        gpus=parse_gres(rec.get("Gres", "")),
    )


def parse_partitions(
    partitions: str, nodes: str, scheduler: SchedulerFacts | None = None
) -> list[PartitionFacts]:
    """``scontrol show partition -o`` and ``scontrol show node -o`` -> per-partition totals of
    nodes that can take work (down, drained and failed nodes are left out)."""
    node_recs = {n["NodeName"]: n for n in parse_oneliner(nodes) if "NodeName" in n}
    out = []
    for p in parse_oneliner(partitions):
        name = p.get("PartitionName", "")
        members = (
            expand_hostlist(p.get("Nodes", "")) if p.get("Nodes") not in (None, "(null)") else []
        )
        cpus = memory = alloc = 0
        gpus: dict[str, int] = {}
        shapes: list[NodeShape] = []
        for n in members:
            rec = node_recs.get(n)
            if rec is None:
                continue
            flags = rec.get("State", "").split("+")
            if flags[0] not in _USABLE_NODE_STATES or any(
                f in ("DRAIN", "DRAINED", "DRAINING", "DOWN", "FAIL", "NOT_RESPONDING")
                for f in flags
            ):
                continue
            cpus += int(rec.get("CPUTot", "0") or 0)
            with contextlib.suppress(ValueError):
                alloc += int(rec.get("CPUAlloc", "0") or 0)
            memory += int(rec.get("RealMemory", "0") or 0) << 20
            for kind, count in parse_gres(rec.get("Gres", "")).items():
                gpus[kind] = gpus.get(kind, 0) + count
            shapes.append(node_shape(rec))
        out.append(
            PartitionFacts(
                name=name,
                up=p.get("State") == "UP",
                nodes=members,
                cpus=cpus,
                memory=memory,
                gpus=gpus,
                node_shapes=shapes_of(shapes),
                max_time_s=parse_time_limit(p.get("MaxTime", "")),
                default=p.get("Default") == "YES",
                running_cpus=alloc,
                scheduler=scheduler,
            )
        )
    return out


def parse_pending(text: str, ours: Callable[[str], bool] | None = None) -> dict[str, float]:
    """``squeue -h -r -o %P|%C|%l|%t|%j`` (or ``-t PD -o %P|%C|%l``) -> pending CPU-seconds by
    partition (no limit: 1 h); jobs in another state than ``PD``, and those whose name
    ``ours`` claims, are left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) >= 4 and parts[3].strip() != "PD":
            continue
        if len(parts) == 5 and ours is not None and ours(parts[4].strip()):
            continue
        parts = parts[:3]
        if len(parts) != 3:
            continue
        try:
            cpus = int(parts[1])
        except ValueError:
            continue
        limit = parse_time_limit(parts[2]) if parts[2] not in ("UNLIMITED", "INVALID") else None
        for part in parts[0].split(","):
            out[part] = out.get(part, 0.0) + cpus * (limit or 3600.0)
    return out


def _config(config: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in config.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def parse_scheduler(config: str, jobs: str = "") -> SchedulerFacts:
    """``scontrol show config`` (its ``SchedulerType``, ``SchedulerParameters`` and
    ``MaxJobCount`` lines suffice) and the count of jobs ``squeue -h -r`` shows -> the
    scheduling facts; what is missing keeps Slurm's default."""
    conf = _config(config)
    params: dict[str, str] = {}
    for item in conf.get("SchedulerParameters", "").split(","):
        k, _, v = item.partition("=")
        params[k.strip()] = v.strip()

    def seconds(name: str, default: float) -> float:
        try:
            return max(1.0, float(params[name]))
        except (KeyError, ValueError):
            return default

    backfill = conf.get("SchedulerType", "sched/backfill") == "sched/backfill"
    max_jobs = conf.get("MaxJobCount", "")
    count = jobs.strip()
    return SchedulerFacts(
        sched_interval_s=seconds("sched_interval", 60.0),
        bf_interval_s=seconds("bf_interval", 30.0) if backfill else None,
        max_job_count=int(max_jobs) if max_jobs.isdigit() else None,
        jobs=int(count) if count.isdigit() else 0,
    )


def cluster_name(config: str) -> str | None:
    """``scontrol show config`` -> ``ClusterName``."""
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip() or None
    return None


def pools_of(
    provider: str, site: str, parts: list[PartitionFacts], pending: dict[str, float]
) -> list[Pool]:
    """A pool per partition that is up and has usable CPUs: its totals, as ``node`` its
    largest node (``largest_node``) and as ``node_groups`` its nodes by shape, so a run no
    node can hold (or a gang more nodes than hold its part) is refused, not queued."""
    pools = []
    for p in sorted(parts, key=lambda p: p.name):
        if not p.up or p.cpus <= 0:
            continue
        pools.append(
            Pool(
                id=f"{provider}/{p.name}",
                provider=provider,
                kind="slurm",
                site=site,
                cpus=float(p.cpus),
                memory=p.memory,
                gpus=dict(p.gpus),
                expected_wait_s=pending.get(p.name, 0.0) / p.cpus,
                hardware_class=f"slurm:{site}/{p.name}",
                node=largest_node(p.node_shapes),
                node_groups=node_groups(p.node_shapes),
            )
        )
    return pools


def node_groups(shapes: Sequence[NodeShape]) -> tuple[NodeGroup, ...]:
    """``Pool.node_groups`` of a partition: its usable nodes by shape, in ``shapes_of`` order."""
    return tuple(
        NodeGroup(
            shape=Shape(
                cpus=float(s.cpus),
                memory=s.memory,
                gpus={k: n for k, n in sorted(s.gpus.items()) if n > 0},
            ),
            count=s.count,
        )
        for s in shapes
    )
