"""Questions asked of the run store: find runs by any provenance field, diff two runs, and
walk the lineage of a run or an artifact.

Pure reads over a :class:`~stowplan.provenance.store.RunStore`; nothing here prints. The CLI
(``stowplan find | diff | lineage``) renders what these return, and ``--json`` prints them as
they are (msgspec Structs and plain dicts).
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from msgspec import Struct, field

from stowplan.errors import SpecError
from stowplan.provenance.records import (
    ArtifactRecord,
    AttemptRecord,
    ExperimentRecord,
    PlacementRecord,
    ProvenanceRecord,
    RunRecord,
)
from stowplan.provenance.store import RunStore

if TYPE_CHECKING:
    from stowplan.provenance.imports import UsedRecord

__all__ = [
    "Filter",
    "LineageGraph",
    "Readiness",
    "RunView",
    "Waiting",
    "diff_runs",
    "find_runs",
    "lineage",
    "load_view",
    "output_values",
    "parse_param_filter",
    "readiness",
    "replicate_summary",
    "run_metrics",
    "store_states",
    "used_changes",
]


# -- one run, everything about it --------------------------------------------------------------


class RunView(Struct, kw_only=True):
    run: RunRecord
    experiment: ExperimentRecord | None
    provenance: ProvenanceRecord | None
    attempts: list[AttemptRecord] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    placements: list[PlacementRecord] = field(default_factory=list)

    @property
    def task_spec(self) -> dict[str, Any]:
        """The task as written (canonical, defaults explicit) in the recorded experiment."""
        spec = self.experiment.spec if self.experiment is not None else {}
        return next((t for t in spec.get("tasks", []) if t.get("name") == self.run.task), {})


def load_view(store: RunStore, run_id: str) -> RunView:
    runs = store.get_runs([run_id])
    if run_id not in runs:
        raise KeyError(f"no run {run_id}")
    run = runs[run_id]
    try:
        prov: ProvenanceRecord | None = store.get_provenance(run.provenance)
    except KeyError:
        prov = None
    return RunView(
        run=run,
        experiment=store.get_experiment(run.experiment_id),
        provenance=prov,
        attempts=store.attempts_for([run_id]).get(run_id, []),
        artifacts=store.artifacts_for([run_id]).get(run_id, []),
        placements=store.placements_for(run_id),
    )


# -- readiness ---------------------------------------------------------------------------------


class Waiting(Struct, frozen=True, kw_only=True):
    """A run that cannot be placed yet: what it waits on, by upstream task."""

    run_id: str
    task: str
    on: dict[str, list[str]]
    """upstream task -> its runs this one depends on that have not succeeded (yet)."""


class Readiness(Struct, frozen=True, kw_only=True):
    """A plan's runs split as ``stowplan run`` would treat them now."""

    ready: list[str]
    """runs to place now: each upstream run has succeeded in the store, or there is none."""
    reused: list[str]
    """runs that already succeeded: ``run`` reuses them and places nothing."""
    waiting: list[Waiting]
    """runs with an upstream run that has not succeeded (yet)."""


class _Planned(Protocol):
    @property
    def run_id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def depends_on(self) -> list[str]: ...


def readiness(runs: Sequence[_Planned], states: Mapping[str, str]) -> Readiness:
    """Split ``runs`` (planned runs, upstream first) by what ``states`` (run id -> recorded
    state, from the run store; a run not in it has not run) says of them and their upstream.

    An upstream run outside ``runs`` is named by its run id's first 12 characters.
    """
    task_of = {r.run_id: r.task for r in runs}
    ready: list[str] = []
    reused: list[str] = []
    waiting: list[Waiting] = []
    for r in runs:
        if states.get(r.run_id) == "SUCCEEDED":
            reused.append(r.run_id)
            continue
        on: dict[str, list[str]] = {}
        for d in r.depends_on:
            if states.get(d) != "SUCCEEDED":
                on.setdefault(task_of.get(d, d[:12]), []).append(d)
        if on:
            waiting.append(Waiting(run_id=r.run_id, task=r.task, on=on))
        else:
            ready.append(r.run_id)
    return Readiness(ready=ready, reused=reused, waiting=waiting)


def store_states(store_path: str | Path, run_ids: Sequence[str]) -> dict[str, str]:
    """Recorded state of each of ``run_ids`` that the store at ``store_path`` holds; empty when
    there is no store (nothing has run): this never creates one."""
    path = Path(store_path)
    if not path.exists():
        return {}
    with RunStore(path) as store:
        return {rid: state for rid, (state, _) in store.run_states(run_ids).items()}


# -- find --------------------------------------------------------------------------------------

_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "=": operator.eq,
}
_PARAM = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(==|!=|>=|<=|>|<|=)\s*([^<>=!\s].*?)\s*$")


class ParamFilter(Struct, frozen=True, kw_only=True):
    name: str
    op: str
    value: Any


def parse_param_filter(text: str) -> ParamFilter:
    """``lr>0.01``, ``C=10``, ``kernel!=rbf``: a value that parses as JSON is compared as one."""
    m = _PARAM.match(text)
    if m is None:
        raise SpecError(
            f"--param {text!r} is not NAME OP VALUE",
            path="--param",
            hint="write e.g. --param 'lr>0.01' or --param kernel=rbf (ops: = != > >= < <=)",
        )
    name, op, raw = m.groups()
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return ParamFilter(name=name, op=op, value=value)


class Filter(Struct, kw_only=True):
    """What ``stowplan find`` matches; every given field must match (AND)."""

    data: str | None = None
    """a data version, content hash or URI (substring)."""
    gpu: str | None = None
    """a GPU model (substring, any case), or a placement's hardware class."""
    code: str | None = None
    """a commit (prefix) or code version."""
    params: list[ParamFilter] = field(default_factory=list)
    experiment: str | None = None
    task: str | None = None
    state: str | None = None
    package: str | None = None
    """``name`` or ``name==version`` of an installed distribution."""
    host: str | None = None
    artifact: str | None = None
    """an output's SHA-256 (prefix)."""


def _compare(have: Any, op: str, want: Any) -> bool:
    try:
        return bool(_OPS[op](have, want))
    except TypeError:  # "abc" > 1: incomparable values never match
        return False


def find_runs(store: RunStore, flt: Filter) -> list[RunRecord]:
    """Runs matching every field of ``flt``, oldest first."""
    runs = store.all_runs()
    prov_cache: dict[str, ProvenanceRecord | None] = {}

    def prov(r: RunRecord) -> ProvenanceRecord | None:
        if r.provenance not in prov_cache:
            try:
                prov_cache[r.provenance] = store.get_provenance(r.provenance)
            except KeyError:
                prov_cache[r.provenance] = None
        return prov_cache[r.provenance]

    artifact_runs: set[str] | None = None
    if flt.artifact is not None:
        artifact_runs = set()
        for sha in store.artifacts_by_prefix(flt.artifact):
            artifact_runs.update(store.runs_producing(sha))
    out = []
    for r in runs:
        if flt.experiment is not None and flt.experiment not in (r.experiment, r.experiment_id):
            continue
        if flt.task is not None and r.task != flt.task:
            continue
        if flt.state is not None and r.state != flt.state.upper():
            continue
        if artifact_runs is not None and r.run_id not in artifact_runs:
            continue
        if not all(
            p.name in r.params and _compare(r.params[p.name], p.op, p.value) for p in flt.params
        ):
            continue
        if flt.data is not None:
            needle = flt.data.lower()
            dv = r.identity.get("data_versions", {})
            if not any(needle in k.lower() or needle in str(v).lower() for k, v in dv.items()):
                continue
        if flt.code is not None:
            version = str(r.identity.get("code_version", ""))
            if not version.startswith(flt.code.lower()):
                continue
        if flt.gpu is not None or flt.package is not None or flt.host is not None:
            p = prov(r)
            if p is None:
                continue
            if flt.gpu is not None and not _gpu_matches(store, r, p, flt.gpu):
                continue
            if flt.package is not None and not _package_matches(p, flt.package):
                continue
            if flt.host is not None and flt.host != p.hardware.get("hostname"):
                continue
        out.append(r)
    return out


def _gpu_matches(store: RunStore, r: RunRecord, p: ProvenanceRecord, want: str) -> bool:
    w = want.lower()
    if any(w in str(g.get("name", "")).lower() for g in p.hardware.get("gpus") or []):
        return True
    return any(w in pl.hardware_class.lower() for pl in store.placements_for(r.run_id))


def _package_matches(p: ProvenanceRecord, want: str) -> bool:
    dists = p.environment.get("distributions", [])
    w = want.lower().replace("_", "-")
    if "==" in w:
        return w in dists
    return any(d.split("==")[0] == w for d in dists)


# -- diff --------------------------------------------------------------------------------------

Change = dict[str, Any]
"""``{"field": ..., "a": ..., "b": ...}`` (a missing side is None)."""


def _changes(a: Any, b: Any, prefix: str = "$") -> list[Change]:
    """The fields that differ, as deep as both sides have the same shape.

    Two non-empty tables are compared key by key; two lists of tables of the same length,
    item by item; anything else (a value against an empty table or list, lists of different
    lengths, a table against nothing) is one change at that path, showing both sides whole,
    so an empty side reads as ``{}`` or ``[]``, never as a missing field.
    """
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict) and a and b:
        out: list[Change] = []
        for k in sorted(set(a) | set(b)):
            out += _changes(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    if (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and any(isinstance(x, dict | list) for x in [*a, *b])
    ):
        return [
            c
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for c in _changes(x, y, f"{prefix}[{i}]")
        ]
    return [{"field": prefix, "a": a, "b": b}]


def _packages(a: list[str], b: list[str]) -> dict[str, list[Any]]:
    def split(ds: list[str]) -> dict[str, str]:
        return {d.partition("==")[0]: d.partition("==")[2] for d in ds}

    pa, pb = split(a), split(b)
    return {
        "added": [f"{n}=={pb[n]}" for n in sorted(set(pb) - set(pa))],
        "removed": [f"{n}=={pa[n]}" for n in sorted(set(pa) - set(pb))],
        "changed": [
            {"package": n, "a": pa[n], "b": pb[n]}
            for n in sorted(set(pa) & set(pb))
            if pa[n] != pb[n]
        ],
    }


_CODE_FIELDS: Final = ("commit", "branch", "dirty", "diff_sha256", "version", "remote_url")
_HARDWARE_FIELDS: Final = ("cpu_model", "cpu_count", "memory_total_bytes", "machine", "hostname")
DIFF_LIMIT: Final = 400
"""Most lines of the difference between two stored code diffs shown."""


def _gpus(hw: dict[str, Any]) -> list[str]:
    return [
        f"{g.get('name')} ({g.get('memory_total_mib', g.get('memory_mib', '?'))} MiB, driver "
        f"{g.get('driver_version')}, CUDA {g.get('cuda_version')})"
        for g in hw.get("gpus") or []
    ]


def _where(view: RunView) -> dict[str, Any]:
    last = view.attempts[-1] if view.attempts else None
    pl = view.placements[-1] if view.placements else None
    return {
        "provider": last.provider if last else None,
        "pool": last.pool if last else None,
        "node": last.node if last else None,
        "hardware_class": pl.hardware_class if pl else None,
    }


def used_changes(a: UsedRecord | None, b: UsedRecord | None) -> list[dict[str, Any]]:
    """``{"package", "a", "b"}`` for each distribution whose version differs between what two
    runs imported, as captured where each ran; a side that did not use it is None.

    [] when either run has no captured record: nothing is known to compare with, and a
    whole list of "not used" would say something false."""
    if a is None or b is None:
        return []
    da, db = a.distributions(), b.distributions()
    return [
        {"package": n, "a": da.get(n), "b": db.get(n)}
        for n in sorted(set(da) | set(db))
        if da.get(n) != db.get(n)
    ]


def diff_runs(
    store: RunStore,
    a: RunView,
    b: RunView,
    *,
    used: Mapping[str, UsedRecord] | None = None,
) -> dict[str, Any]:
    """What changed from run ``a`` to run ``b``, grouped; an empty group means no change.

    Groups: params, spec (the task as written, and the experiment's policy), code (the
    fields, and the difference between the two stored uncommitted diffs), data (version per
    input URI), packages (added, removed, changed, of everything installed where stowplan
    ran), used (the distributions each run imported, captured where it ran: ``used`` maps
    run id to its record, see ``provenance.imports.used_records``), environment (Python,
    lock files, allowed env vars), hardware (and where each ran), placement, outputs
    (artifacts by name).
    """
    out: dict[str, Any] = {"a": a.run.run_id, "b": b.run.run_id}
    out["params"] = _changes(a.run.params, b.run.params, "params")
    if a.run.seed != b.run.seed:
        out["params"].append({"field": "seed", "a": a.run.seed, "b": b.run.seed})
    spec = _changes(a.task_spec, b.task_spec, "$.task")
    ea = a.experiment.spec if a.experiment else {}
    eb = b.experiment.spec if b.experiment else {}
    for key in ("effective_policy", "experiment"):
        spec += _changes(ea.get(key) or {}, eb.get(key) or {}, f"$.{key}")
    out["spec"] = spec

    pa = a.provenance or ProvenanceRecord()
    pb = b.provenance or ProvenanceRecord()
    code: dict[str, Any] = {
        "fields": [
            {"field": k, "a": pa.code.get(k), "b": pb.code.get(k)}
            for k in _CODE_FIELDS
            if pa.code.get(k) != pb.code.get(k)
        ],
        "diff_of_diffs": [],
    }
    da, db = pa.code.get("diff_sha256"), pb.code.get("diff_sha256")
    if da != db:
        ta, tb = _patch_text(store, da), _patch_text(store, db)
        lines = list(
            difflib.unified_diff(
                ta.splitlines(),
                tb.splitlines(),
                "a: uncommitted diff",
                "b: uncommitted diff",
                lineterm="",
            )
        )
        code["diff_of_diffs"] = lines[:DIFF_LIMIT]
        code["diff_of_diffs_truncated"] = len(lines) > DIFF_LIMIT
    out["code"] = code

    va = a.run.identity.get("data_versions", {})
    vb = b.run.identity.get("data_versions", {})
    out["data"] = [
        {"uri": u, "a": va.get(u), "b": vb.get(u)}
        for u in sorted(set(va) | set(vb))
        if va.get(u) != vb.get(u)
    ]
    out["packages"] = _packages(
        pa.environment.get("distributions", []), pb.environment.get("distributions", [])
    )
    captured = used or {}
    out["used"] = used_changes(captured.get(a.run.run_id), captured.get(b.run.run_id))
    env: list[Change] = []
    pya = (pa.environment.get("python") or {}).get("version")
    pyb = (pb.environment.get("python") or {}).get("version")
    if pya != pyb:
        env.append({"field": "python", "a": pya, "b": pyb})
    for key in ("lock_files", "env_vars", "container_image"):
        env += _changes(pa.environment.get(key), pb.environment.get(key), f"environment.{key}")
    out["environment"] = env
    hw = [
        {"field": k, "a": pa.hardware.get(k), "b": pb.hardware.get(k)}
        for k in _HARDWARE_FIELDS
        if pa.hardware.get(k) != pb.hardware.get(k)
    ]
    if _gpus(pa.hardware) != _gpus(pb.hardware):
        hw.append({"field": "gpus", "a": _gpus(pa.hardware), "b": _gpus(pb.hardware)})
    wa, wb = _where(a), _where(b)
    hw += [{"field": k, "a": wa[k], "b": wb[k]} for k in wa if wa[k] != wb[k]]
    out["hardware"] = hw
    pla = a.placements[-1] if a.placements else None
    plb = b.placements[-1] if b.placements else None
    place: list[Change] = []
    for k in ("provider", "pool", "hardware_class", "status", "objective", "gap", "terms"):
        x = getattr(pla, k) if pla else None
        y = getattr(plb, k) if plb else None
        if x != y:
            place.append({"field": k, "a": x, "b": y})
    out["placement"] = place
    oa = {x.name: x.sha256 for x in a.artifacts}
    ob = {x.name: x.sha256 for x in b.artifacts}
    out["outputs"] = [
        {"name": n, "a": oa.get(n), "b": ob.get(n)}
        for n in sorted(set(oa) | set(ob))
        if oa.get(n) != ob.get(n)
    ]
    return out


def _patch_text(store: RunStore, sha: Any) -> str:
    if not sha:
        return ""
    try:
        return store.get_blob(str(sha)).decode(errors="replace")
    except KeyError:
        return f"(diff {sha} is not in the blob store)"


def diff_is_empty(d: dict[str, Any]) -> bool:
    pk = d["packages"]
    return not (
        d["params"]
        or d["spec"]
        or d["code"]["fields"]
        or d["data"]
        or pk["added"]
        or pk["removed"]
        or pk["changed"]
        or d.get("used")
        or d["environment"]
        or d["hardware"]
        or d["placement"]
        or d["outputs"]
    )


# -- lineage -----------------------------------------------------------------------------------

NodeKind = Literal["run", "artifact", "data"]
Direction = Literal["up", "down", "both"]


class Node(Struct, frozen=True, kw_only=True):
    id: str
    """``run:<run id>``, ``artifact:<sha256>`` or ``data:<uri>@<version>``."""
    kind: NodeKind
    label: str


class Edge(Struct, frozen=True, kw_only=True):
    src: str
    dst: str
    kind: Literal["produced", "consumed", "read"]
    """run -produced-> artifact; artifact -consumed-> run; data -read-> run."""


class LineageGraph(Struct, kw_only=True):
    root: str
    direction: Direction
    depth: int | None
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def parents(self, node: str) -> list[str]:
        return sorted({e.src for e in self.edges if e.dst == node})

    def children(self, node: str) -> list[str]:
        return sorted({e.dst for e in self.edges if e.src == node})


class _Lineage:
    """Neighbours of each node, read from the store on demand (with per-walk caches)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._runs: dict[str, RunRecord] = {}
        self._all: list[RunRecord] | None = None
        self._arts: dict[str, list[ArtifactRecord]] = {}

    def run(self, run_id: str) -> RunRecord | None:
        if run_id not in self._runs:
            got = self.store.get_runs([run_id])
            if run_id not in got:
                return None
            self._runs[run_id] = got[run_id]
        return self._runs[run_id]

    def all_runs(self) -> list[RunRecord]:
        if self._all is None:
            self._all = self.store.all_runs()
            for r in self._all:
                self._runs[r.run_id] = r
        return self._all

    def artifacts(self, run_id: str) -> list[ArtifactRecord]:
        if run_id not in self._arts:
            self._arts[run_id] = self.store.artifacts_for([run_id]).get(run_id, [])
        return self._arts[run_id]

    def run_node(self, r: RunRecord) -> Node:
        params = " ".join(f"{k}={v}" for k, v in r.params.items())
        label = f"{r.experiment}/{r.task}[{r.index}] {r.run_id[:12]}"
        if params:
            label += f" ({params})"
        if r.replicate:
            label += f" rep {r.replicate}"
        return Node(id=f"run:{r.run_id}", kind="run", label=label)

    def up(self, node: str) -> list[tuple[Node, Edge]]:
        kind, _, key = node.partition(":")
        out: list[tuple[Node, Edge]] = []
        if kind == "artifact":
            for rid in self.store.runs_producing(key):
                r = self.run(rid)
                if r is not None:
                    n = self.run_node(r)
                    out.append((n, Edge(src=n.id, dst=node, kind="produced")))
        elif kind == "run":
            r = self.run(key)
            if r is None:
                return out
            for uri, version in sorted(r.identity.get("data_versions", {}).items()):
                sha = str(version).removeprefix("sha256:")
                producers = self.store.runs_producing(sha) if sha != version else []
                if producers:  # the input is another run's output
                    n = Node(
                        id=f"artifact:{sha}", kind="artifact", label=f"{uri} sha256:{sha[:12]}"
                    )
                else:
                    n = Node(
                        id=f"data:{uri}@{version}", kind="data", label=f"{uri} @ {version[:19]}"
                    )
                out.append((n, Edge(src=n.id, dst=node, kind="read")))
            for d in r.depends_on:
                for art in self.artifacts(d):
                    n = Node(
                        id=f"artifact:{art.sha256}",
                        kind="artifact",
                        label=f"{art.name} sha256:{art.sha256[:12]}",
                    )
                    out.append((n, Edge(src=n.id, dst=node, kind="consumed")))
        return out

    def down(self, node: str) -> list[tuple[Node, Edge]]:
        kind, _, key = node.partition(":")
        out: list[tuple[Node, Edge]] = []
        if kind == "run":
            for art in self.artifacts(key):
                n = Node(
                    id=f"artifact:{art.sha256}",
                    kind="artifact",
                    label=f"{art.name} sha256:{art.sha256[:12]}",
                )
                out.append((n, Edge(src=node, dst=n.id, kind="produced")))
        elif kind == "artifact":
            producers = set(self.store.runs_producing(key))
            for r in self.all_runs():
                reads = f"sha256:{key}" in r.identity.get("data_versions", {}).values()
                if reads or producers.intersection(r.depends_on):
                    n = self.run_node(r)
                    out.append((n, Edge(src=node, dst=n.id, kind="read" if reads else "consumed")))
        elif kind == "data":
            uri, _, version = key.rpartition("@")
            for r in self.all_runs():
                if r.identity.get("data_versions", {}).get(uri) == version:
                    n = self.run_node(r)
                    out.append((n, Edge(src=node, dst=n.id, kind="read")))
        return out


def resolve_target(store: RunStore, target: str) -> Node:
    """A run id (prefix), an artifact SHA-256 (prefix, ``sha256:`` optional) or an artifact
    name of the newest run that has one (``best.json``)."""
    t = target.strip()
    walker = _Lineage(store)
    try:
        r = walker.run(store.resolve_run(t))
        if r is not None:
            return walker.run_node(r)
    except (KeyError, ValueError):
        pass
    shas = store.artifacts_by_prefix(t) if len(t.removeprefix("sha256:")) >= 4 else []
    if len(shas) == 1:
        return Node(id=f"artifact:{shas[0]}", kind="artifact", label=f"sha256:{shas[0][:12]}")
    if len(shas) > 1:
        raise SpecError(
            f"{target!r} matches {len(shas)} artifacts", hint="give more characters of the hash"
        )
    named = store.latest_artifact_named(t)
    if named is not None:
        return Node(id=f"artifact:{named}", kind="artifact", label=f"{t} sha256:{named[:12]}")
    raise SpecError(
        f"{target!r} is neither a run id, an artifact hash nor an output name in this store",
        hint="see stowplan status and stowplan show RUN for run ids and artifact hashes",
    )


def lineage(
    store: RunStore, target: str, *, direction: Direction = "up", depth: int | None = None
) -> LineageGraph:
    """The graph of runs, artifacts and data reachable from ``target`` (breadth first).

    ``up``: what it came from (producing runs, their inputs, transitively); ``down``: what
    came from it; ``both``: the union. ``depth`` bounds the number of edges walked.
    """
    root = resolve_target(store, target)
    graph = LineageGraph(root=root.id, direction=direction, depth=depth)
    graph.nodes[root.id] = root
    walker = _Lineage(store)
    seen_edges: set[tuple[str, str]] = set()
    for way in ("up", "down") if direction == "both" else (direction,):
        frontier = [root.id]
        level = 0
        visited = {root.id}
        while frontier and (depth is None or level < depth):
            nxt: list[str] = []
            for node in frontier:
                step = walker.up(node) if way == "up" else walker.down(node)
                for n, e in step:
                    if (e.src, e.dst) not in seen_edges:
                        seen_edges.add((e.src, e.dst))
                        graph.edges.append(e)
                    graph.nodes.setdefault(n.id, n)
                    if n.id not in visited:
                        visited.add(n.id)
                        nxt.append(n.id)
            frontier = nxt
            level += 1
    return graph


def reaches(graph: LineageGraph) -> dict[str, list[str]]:
    """Node ids of the graph by kind (what a lineage reached), sorted."""
    out: dict[str, list[str]] = {"run": [], "artifact": [], "data": []}
    for n in graph.nodes.values():
        out[n.kind].append(n.id)
    return {k: sorted(v) for k, v in out.items()}


def to_dot(graph: LineageGraph) -> str:
    """Graphviz DOT of the graph: runs as boxes, artifacts as notes, data as cylinders."""
    shape = {"run": "box", "artifact": "note", "data": "cylinder"}

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["digraph lineage {", "  rankdir=LR;", '  node [fontname="monospace"];']
    for n in sorted(graph.nodes.values(), key=lambda n: n.id):
        extra = ", penwidth=2" if n.id == graph.root else ""
        lines.append(f"  {q(n.id)} [label={q(n.label)}, shape={shape[n.kind]}{extra}];")
    for e in sorted(graph.edges, key=lambda e: (e.src, e.dst)):
        lines.append(f"  {q(e.src)} -> {q(e.dst)} [label={q(e.kind)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def tree_lines(graph: LineageGraph) -> list[str]:
    """The graph as an indented tree from the root; a node met again says ``(see above)``."""
    lines: list[str] = []
    shown: set[str] = set()

    def walk(node: str, way: str, indent: str, last: bool, top: bool) -> None:
        n = graph.nodes[node]
        branch = "" if top else ("└── " if last else "├── ")
        again = node in shown and not top
        lines.append(f"{indent}{branch}[{n.kind}] {n.label}" + (" (see above)" if again else ""))
        if again:
            return
        shown.add(node)
        nxt = graph.parents(node) if way == "up" else graph.children(node)
        child_indent = indent + ("" if top else ("    " if last else "│   "))
        for i, c in enumerate(nxt):
            walk(c, way, child_indent, i == len(nxt) - 1, False)

    ways: Sequence[str] = ("up", "down") if graph.direction == "both" else (graph.direction,)
    for way in ways:
        if len(ways) > 1:
            lines.append(f"-- {'inputs (up)' if way == 'up' else 'outputs (down)'} --")
            shown.clear()
        walk(graph.root, way, "", True, True)
    return lines


# -- results and replicates --------------------------------------------------------------------


def output_values(artifacts: Sequence[ArtifactRecord]) -> dict[str, Any]:
    """Scalar top-level values of a run's JSON outputs (short strings included): what a result
    table shows. An output that cannot be read or is not a JSON object adds nothing."""
    out: dict[str, Any] = {}
    for a in artifacts:
        if not a.name.endswith(".json"):
            continue
        try:
            data = json.loads(Path(a.path).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, int | float | str | bool) and len(str(v)) <= 40:
                    out[k] = v
    return out


def run_metrics(run: RunRecord, artifacts: Sequence[ArtifactRecord]) -> dict[str, float]:
    """The metrics of a run: the finite numbers among its output values, less any value named
    like one of its parameters (a task that writes its own parameters back, such as a
    categorical ``C``, reports a setting, not a measurement). Booleans and strings are not
    metrics."""
    return {
        k: float(v)
        for k, v in output_values(artifacts).items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and k not in run.params
    }


def replicate_summary(
    runs: Sequence[RunRecord], artifacts: Mapping[str, Sequence[ArtifactRecord]]
) -> list[dict[str, Any]]:
    """Mean and (sample) standard deviation of each metric over the replicates of each trial:
    runs of one task, sweep index and parameters that differ only in their seed.

    Only metrics are summarised (see :func:`run_metrics`); parameters are shown as they are.
    Runs of one index whose parameters differ are never averaged together.
    """
    groups: dict[tuple[str, int, str], list[RunRecord]] = {}
    for r in runs:
        key = (r.task, r.index, json.dumps(r.params, sort_keys=True, default=str))
        groups.setdefault(key, []).append(r)
    out: list[dict[str, Any]] = []
    for (task, index, _), rs in groups.items():
        values: dict[str, list[float]] = {}
        for r in rs:
            if r.state != "SUCCEEDED":
                continue
            for k, v in run_metrics(r, artifacts.get(r.run_id, [])).items():
                values.setdefault(k, []).append(v)
        out.append(
            {
                "task": task,
                "index": index,
                "params": rs[0].params,
                "replicates": len(rs),
                "succeeded": sum(r.state == "SUCCEEDED" for r in rs),
                "seeds": sorted(r.seed for r in rs),
                "run_ids": [r.run_id for r in sorted(rs, key=lambda r: r.replicate)],
                "metrics": {
                    k: {
                        "n": len(v),
                        "mean": statistics.fmean(v),
                        "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    }
                    for k, v in sorted(values.items())
                },
            }
        )
    return out
