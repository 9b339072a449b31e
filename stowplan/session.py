"""One ``stowplan run``: load, identify, decide what to reuse, record, and hand to the queue.

Application logic beside the command shell, free of Ray: the CLI calls these steps and renders
what they return (nothing here prints), and the real-time adapter (``actors/``) is handed their
result. The experiment, its runs and the provenance are recorded before the control plane
starts (content-addressed, insert-or-ignore rows); from then on the store actor is the only
writer.

Before anything is written, a task is refused (``SpecError``, exit 2) when no provider it may
run on could run it: one whose image or secrets no such provider supports (the drivers'
``Capabilities``, checked in ``prepare``), or whose needs no discovered pool could ever meet
(``check_feasible``, which asks the scheduler core itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from stowplan.errors import SpecError
from stowplan.placement.leases import DeviceLease
from stowplan.placement.problem import Pool
from stowplan.provenance.imports import used_records
from stowplan.provenance.records import ExperimentRecord, ProvenanceRecord, RunRecord
from stowplan.provenance.store import RunStore
from stowplan.providers.base import Capabilities, Capability, LaunchSpec, Provider, SecretRef
from stowplan.scheduler.plan import EnvPin, PinKey, PlannedRun, RunPayload, Versions, plan_runs
from stowplan.spec.canonical import canonical_experiment, spec_hash
from stowplan.spec.loader import (
    LoadedExperiment,
    LoadedProject,
    load_experiment,
    load_project,
    spec_error,
)
from stowplan.spec.models import ProviderConfig
from stowplan.spec.units import plural

log = logging.getLogger(__name__)


class Prepared(msgspec.Struct, kw_only=True):
    project: LoadedProject
    loaded: LoadedExperiment
    experiment: ExperimentRecord
    planned: list[PlannedRun]
    provenance: ProvenanceRecord
    diff: bytes
    providers: dict[str, ProviderConfig]
    replicate: int
    """the first replicate planned."""
    state_dir: str
    store_path: str
    replicates: int = 1
    """how many replicates (seeds) of every run were planned, from ``replicate`` on."""
    notes: list[str] = msgspec.field(default_factory=list)
    """what people should hear before the runs start (stored runs not reused, and why)."""


def project_paths(project: LoadedProject) -> tuple[Path, Path]:
    root = Path(project.root)
    state_dir = root / ".stowplan"
    store = Path(project.config.store.path)
    if not store.is_absolute():
        store = root / store
    return state_dir, store


def prepare(
    file: Path,
    *,
    provider: str | None = None,
    rerun: bool = False,
    replicate: int | None = None,
    replicates: int = 1,
) -> Prepared:
    """Everything up to, not including, writing: raises SpecError for any bad input.

    ``replicates`` > 1 plans that many replicates of every run, each with its own seed
    (experiment seed + replicate number), from the first replicate on.
    """
    if replicates < 1:
        raise SpecError(
            f"--replicates must be at least 1, not {replicates}", hint="pass --replicates 3"
        )
    from stowplan.provenance.capture import (
        capture_code,
        capture_environment,
        capture_hardware,
        code_context,
    )
    from stowplan.provenance.data import HashCache, capture_inputs, default_cache_path

    project = load_project(search_from=file.resolve().parent)
    loaded = load_experiment(file, project)
    providers = dict(project.config.providers)
    allowed: tuple[str, ...] | None = None
    if provider is not None:
        if provider not in providers:
            raise SpecError(
                f"--provider {provider!r} is not configured",
                file=project.file or "stowplan.toml",
                path="$.providers",
                hint="use one of: " + ", ".join(sorted(providers)),
            )
        allowed = (provider,)
    elif loaded.policy.allowed_providers is not None:
        unknown = sorted(set(loaded.policy.allowed_providers) - set(providers))
        if unknown:
            raise SpecError(
                f"policy.allowed_providers names unconfigured provider {unknown[0]!r}",
                file=loaded.file,
                path="$.policy.allowed_providers",
                hint="configure it in stowplan.toml or use one of: " + ", ".join(sorted(providers)),
            )
    if allowed is not None:
        providers = {n: c for n, c in providers.items() if n in allowed}

    base = Path(loaded.directory)
    state_dir, store_path = project_paths(project)
    able = capable_providers(loaded, providers, allowed, state_dir)
    records: dict[str, Any] = {}
    # In the user's cache directory, not the project's: a cache is not project state, and a
    # bad input must leave the project untouched.
    with HashCache(default_cache_path()) as cache:
        code, diff = capture_code(
            base,
            references=_command_words(loaded),
            exclude=_covered_elsewhere(loaded, project, state_dir, store_path),
            cache=cache,
        )
        records.update(capture_inputs(loaded, cache=cache))
    context = code_context(base, code)
    lock_dirs = [Path(project.root), base]
    if context["root"]:
        lock_dirs.insert(0, Path(context["root"]))
    env = capture_environment(lock_dirs=lock_dirs)
    data = {uri: rec.version for uri, rec in records.items()}
    versions = Versions(
        code_version=code.version, env_hash=str(env["env_hash"]), data_versions=data
    )
    project_name = loaded.spec.experiment.project or project.config.project.name

    def planned_for(rep: int) -> list[PlannedRun]:
        return plan_runs(
            loaded, versions, project=project_name, replicate=rep, allowed_providers=allowed
        )

    rep = replicate or 0
    planned = planned_for(rep)
    if rerun and replicate is None and store_path.exists():
        # the next replicate number whose runs do not exist yet
        with RunStore(store_path) as store:
            while store.get_runs([planned[0].run_id]):
                rep += 1
                planned = planned_for(rep)
    for extra in range(rep + 1, rep + replicates):
        planned = planned + planned_for(extra)
    notes: list[str] = []
    if store_path.exists():

        def replan(pins: Mapping[PinKey, EnvPin]) -> list[PlannedRun]:
            return [
                r
                for n in range(rep, rep + replicates)
                for r in plan_runs(
                    loaded,
                    versions,
                    project=project_name,
                    replicate=n,
                    allowed_providers=allowed,
                    env_pins=pins,
                )
            ]

        with RunStore(store_path) as store:
            planned, notes = recheck_used(
                planned,
                replan,
                lambda runs: used_records(store, runs, project.config.providers, state_dir),
                lambda ids: {rid: rec.state for rid, rec in store.get_runs(ids).items()},
            )
    if able:
        planned = [_narrowed(r, able) for r in planned]
    canonical = canonical_experiment(loaded.spec)
    canonical["effective_policy"] = msgspec.to_builtins(loaded.policy)
    experiment = ExperimentRecord(
        id=spec_hash(canonical),
        name=loaded.spec.experiment.name,
        project=project_name,
        description=loaded.spec.experiment.description,
        file=str(Path(loaded.file).resolve()),
        spec=canonical,
        created_at=time.time(),
    )
    code_info = msgspec.to_builtins(code)
    code_info.pop("diff", None)
    code_info.update(context)
    root = context["root"]
    code_info["experiment_file"] = (
        Path(os.path.relpath(Path(loaded.file).resolve(), Path(root).resolve())).as_posix()
        if root
        else None
    )
    provenance = ProvenanceRecord(
        code=code_info,
        environment=env,
        hardware=capture_hardware(),
        data={uri: msgspec.to_builtins(rec) for uri, rec in sorted(records.items())},
    )
    return Prepared(
        project=project,
        loaded=loaded,
        experiment=experiment,
        planned=planned,
        provenance=provenance,
        diff=diff,
        providers=providers,
        replicate=rep,
        state_dir=str(state_dir),
        store_path=str(store_path),
        replicates=replicates,
        notes=notes,
    )


MAX_RECHECK_ROUNDS = 8
"""Re-plans at most, when runs pinned to today's versions turn out stale themselves."""


def recheck_used(
    planned: list[PlannedRun],
    replan: Callable[[Mapping[PinKey, EnvPin]], list[PlannedRun]],
    used_of: Callable[[list[str]], dict[str, Any]],
    states_of: Callable[[list[str]], dict[str, str]],
    *,
    checker: Any = None,
) -> tuple[list[PlannedRun], list[str]]:
    """Check, before reuse, that every stored succeeded run still has what it used.

    A run whose captured record (``used_of``) names a distribution whose version has changed
    since (or a gone one, or another Python) is pinned to the versions now (``EnvPin``): its
    identity, and that of everything downstream, changes, so it runs again as a run of its
    own, and the next invocation, finding that run, reuses it. Returns the runs to use and
    one line per cause for people (``re-running 24 runs: numpy 1.26.4 -> 2.0.0 changed since
    they ran``). A run without a captured record is reused as before.
    """
    from stowplan.provenance.imports import UsedChecker, summarize

    check = checker if checker is not None else UsedChecker()
    pins: dict[PinKey, EnvPin] = {}
    stale: dict[PinKey, str] = {}
    verdicts: dict[str, list[Any]] = {}
    for _ in range(MAX_RECHECK_ROUNDS):
        states = states_of([r.run_id for r in planned])
        todo = [
            r.run_id
            for r in planned
            if states.get(r.run_id) == "SUCCEEDED" and r.run_id not in verdicts
        ]
        records = used_of(todo) if todo else {}
        check.prefetch(records.values())
        new: dict[PinKey, EnvPin] = {}
        for r in planned:
            if r.run_id not in todo:
                continue
            rec = records.get(r.run_id)
            changes = [] if rec is None else check.changes(rec)
            verdicts[r.run_id] = changes
            if changes and rec is not None:
                key = (r.replicate, r.task, r.index)
                new[key] = EnvPin(used=check.now(rec))
                stale.setdefault(key, summarize(changes))
        if not new:
            break
        pins.update(new)
        planned = replan(pins)
    # what actually runs again because of a change: a pinned run not already stored
    states = states_of([r.run_id for r in planned])
    groups: dict[str, int] = {}
    for r in planned:
        key = (r.replicate, r.task, r.index)
        if key in stale and states.get(r.run_id) != "SUCCEEDED":
            groups[stale[key]] = groups.get(stale[key], 0) + 1
    notes = [
        f"re-running {n} run{'s' if n != 1 else ''}: {why} changed since "
        f"{'they' if n != 1 else 'it'} ran"
        for why, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return planned, notes


def _command_words(loaded: LoadedExperiment) -> list[str]:
    """The words of every task's command or script, ``{experiment_dir}`` filled in: where a
    code version outside git looks for files named outside the experiment's directory."""
    import shlex

    from stowplan.scheduler.plan import fill

    out: list[str] = []
    for t in loaded.spec.tasks:
        for word in t.command or []:
            out.append(word)
        if t.script:
            try:
                out += shlex.split(t.script, comments=True)
            except ValueError:
                out += t.script.split()
    # Only {experiment_dir} is known before planning; a word with other placeholders is a
    # parameter's value, not a file.
    filled = []
    for w in out:
        try:
            filled.append(fill(w, {"experiment_dir": loaded.directory}))
        except (KeyError, ValueError, IndexError):
            continue
    return filled


def _covered_elsewhere(
    loaded: LoadedExperiment, project: LoadedProject, state_dir: Path, store_path: Path
) -> list[Path]:
    """What a code version outside git leaves out because other parts of a run's identity
    cover it (the experiment file, local data inputs) or because stowplan writes it."""
    base = Path(loaded.directory)
    out = [Path(loaded.file), state_dir, store_path]
    out += [store_path.with_name(store_path.name + sfx) for sfx in ("-wal", "-shm", "-journal")]
    out.append(store_path.parent / "blobs")
    if project.file:
        out.append(Path(project.file))
    for t in loaded.spec.tasks:
        for i in t.inputs:
            uri = i.uri.removeprefix("file://")
            if "://" not in uri:
                out.append(base / uri)
    return out


DRY_RUN_DISCOVER_S = 10.0
"""How long a dry run waits for a provider's discovery before it uses the saved facts."""


def discover(
    prepared: Prepared,
    *,
    dry_run: bool = False,
    timeout_s: float = DRY_RUN_DISCOVER_S,
    note: Callable[[str], None] | None = None,
    then: Callable[[list[Pool], Mapping[str, Provider]], Awaitable[None]] | None = None,
) -> list[Pool]:
    """Every configured provider's pools; writes nothing itself.

    ``then``: awaited with the pools and the drivers that found them, on the same event loop
    before the drivers are closed (``stowplan run`` submits ahead on their connections).

    A real run saves them with ``save_discovered`` once the experiment is known to be
    feasible, for later dry runs. A dry run waits at most ``timeout_s`` per provider and, where
    one cannot be reached, plans with its saved facts and says so through ``note`` (the log
    when None), or fails with a ``SpecError`` (exit 2) when there are none.
    """
    import anyio

    from stowplan.errors import ProviderError
    from stowplan.providers.facts import load_facts
    from stowplan.providers.registry import make_provider

    state_dir = Path(prepared.state_dir)
    say = note if note is not None else log.warning

    drivers: dict[str, Provider] = {}

    async def one(name: str, cfg: Any, opened: contextlib.AsyncExitStack) -> list[Any]:
        drv = drivers[name] = await opened.enter_async_context(
            make_provider(name, cfg, state_dir=state_dir)
        )
        if not dry_run:
            return await drv.discover()
        with anyio.fail_after(timeout_s):
            return await drv.discover()

    async def go() -> list[Any]:
        async with contextlib.AsyncExitStack() as opened:
            pools = await each(opened)
            if then is not None:
                await then(pools, drivers)
            return pools

    async def each(opened: contextlib.AsyncExitStack) -> list[Any]:
        pools: list[Any] = []
        for name, cfg in sorted(prepared.providers.items()):
            try:
                pools.extend(await one(name, cfg, opened))
            except (ProviderError, TimeoutError) as e:
                if not dry_run:
                    raise
                why = (
                    f"no answer within {timeout_s:g} s"
                    if isinstance(e, TimeoutError)
                    else str(e).removeprefix(f"{name}: ")
                )
                cached, missing = load_facts(state_dir, name, cfg)
                if cached is None:
                    raise SpecError(
                        f"provider {name!r} is unreachable ({why}), and a dry run has no facts "
                        f"from an earlier discovery to plan with: {missing}",
                        file=prepared.project.file,
                        path=f"$.providers.{name}",
                        hint="make the cluster reachable (host, port, network, keys) and try "
                        "again; a real run that reaches it saves its facts for offline dry runs",
                    ) from None
                say(f"{name}: unreachable ({why}); using facts discovered {cached.when()}")
                pools.extend(cached.pools)
        return pools

    return anyio.run(go)


def save_discovered(prepared: Prepared, pools: Sequence[Pool]) -> None:
    """Save each provider's discovered pools (``.stowplan/facts/``) for offline dry runs."""
    from stowplan.providers.facts import save_facts

    for name, cfg in sorted(prepared.providers.items()):
        save_facts(Path(prepared.state_dir), name, cfg, [p for p in pools if p.provider == name])


def check_feasible(prepared: Prepared, pools: Sequence[Pool]) -> None:
    """Refuse, before anything is written, a task that no discovered pool could ever run.

    The scheduler core decides: it is given the pools and one run of each task, and a run it
    fails at once (no pool could run it even when empty, elastic pools at their full size
    included) is refused here, with the core's reason."""
    from stowplan.placement.context import context_for
    from stowplan.scheduler.core import CoreConfig, SchedulerCore
    from stowplan.scheduler.events import PoolsDiscovered, TasksSubmitted, Transitioned
    from stowplan.scheduler.states import TaskState

    first: dict[str, PlannedRun] = {}
    for run in prepared.planned:  # a task's runs differ in parameters only, not in needs
        first.setdefault(run.task, run)
    refused: dict[str, str] = {}
    if not pools:
        refused = {run.run_id: "no configured provider offers any pool" for run in first.values()}
    else:
        core = SchedulerCore(CoreConfig(context=context_for(prepared.project, prepared.loaded)))
        by_provider: dict[str, list[Pool]] = {}
        for p in pools:
            by_provider.setdefault(p.provider, []).append(p)
        for name, ps in sorted(by_provider.items()):
            core.handle(PoolsDiscovered(provider=name, pools=ps), now=0.0)
        tasks = [
            msgspec.structs.replace(r.instance, depends_on=(), max_concurrent=None)
            for r in first.values()
        ]
        for command in core.handle(TasksSubmitted(tasks=tasks), now=0.0):
            if isinstance(command, Transitioned):
                refused.update(
                    (t.run_id, t.reason) for t in command.records if t.to_state is TaskState.FAILED
                )
    for run in first.values():
        if run.run_id not in refused:
            continue
        inst = run.instance
        k = max(1, inst.nodes)  # a gang's totals, per node
        gpu = (
            f", {plural(inst.gpu_amount / k, 'GPU')} {'/'.join(inst.gpu_types)}".rstrip()
            if inst.gpus
            else ""
        )
        nodes = f"{k} nodes of " if k > 1 else ""
        raise spec_error(
            prepared.loaded,
            f"$.tasks[{_task_index(prepared.loaded, run.task)}].resources",
            f"task {run.task!r} asks for {nodes}{plural(float(inst.cpus / k), 'CPU')}, "
            f"{inst.memory / k / 2**30:.2f} GiB{gpu}, which no configured pool can run: "
            f"{refused[run.run_id]}",
            f"lower the resources{' or nodes' if k > 1 else ''} of {run.task!r}, or "
            "configure a provider that offers them in stowplan.toml",
        )


def capable_providers(
    loaded: LoadedExperiment,
    providers: Mapping[str, ProviderConfig],
    allowed: Sequence[str] | None,
    state_dir: Path,
) -> dict[str, tuple[str, ...]]:
    """For each task that names an image, secrets or outputs: the providers it may run on whose
    drivers run containers (``Capability.CONTAINERS``), resolve secrets (``Capability.SECRETS``)
    and bring declared outputs back (``Capability.OUTPUTS``) as it needs. Raises ``SpecError``
    naming the task's field, with the driver's reason as the fix, when there are none. Writes
    nothing; a task that names none of them is left out."""
    from stowplan.providers.registry import make_provider

    caps: dict[str, Capabilities] = {}

    def capabilities(name: str) -> Capabilities:
        if name not in caps:
            drv = make_provider(name, providers[name], state_dir=state_dir)
            caps[name] = drv.capabilities
        return caps[name]

    may = sorted(providers)
    if allowed is None and loaded.policy.allowed_providers is not None:
        may = [n for n in may if n in loaded.policy.allowed_providers]
    out: dict[str, tuple[str, ...]] = {}
    for i, task in enumerate(loaded.spec.tasks):
        needs = [
            (cap, where, what)
            for cap, where, what, used in (
                (Capability.CONTAINERS, "image", f"image {task.image!r}", task.image is not None),
                (Capability.SECRETS, "secrets", "secrets", bool(task.secrets)),
                (Capability.OUTPUTS, "outputs", "outputs", bool(task.outputs)),
            )
            if used
        ]
        if not needs:
            continue
        able = list(may)
        for cap, where, what in needs:
            lacking = [n for n in able if cap not in capabilities(n)]
            able = [n for n in able if n not in lacking]
            if able:
                continue
            reasons = [(n, capabilities(n).reason(cap)) for n in lacking]
            hint = (
                reasons[0][1]
                if len(reasons) == 1
                else "; ".join(f"{n}: {why}" for n, why in reasons)
            )
            raise spec_error(
                loaded,
                f"$.tasks[{i}].{where}",
                f"task {task.name!r} names {what}, which no provider it may run on supports "
                f"({', '.join(lacking) or 'none is configured'})",
                hint or f"configure a provider that supports {cap.value}",
            )
        out[task.name] = tuple(able)
    return out


def _narrowed(run: PlannedRun, able: Mapping[str, tuple[str, ...]]) -> PlannedRun:
    """``run`` placed only on providers that can run it (``capable_providers``)."""
    providers = able.get(run.task)
    inst = run.instance
    if providers is None or (inst.allowed_providers or ()) == providers:
        return run
    return msgspec.structs.replace(
        run, instance=msgspec.structs.replace(inst, allowed_providers=providers)
    )


def _task_index(loaded: LoadedExperiment, task: str) -> int:
    return next(i for i, t in enumerate(loaded.spec.tasks) if t.name == task)


def payload(prepared: Prepared, r: PlannedRun) -> RunPayload:
    name = f"{prepared.experiment.name}-{r.task}-{r.index}"
    return RunPayload(instance=r.instance, launch=r.launch, name=name)


def submissions(prepared: Prepared, run_ids: set[str]) -> list[RunPayload]:
    """What the queue needs of each run in ``run_ids``: its payload."""
    return [payload(prepared, r) for r in prepared.planned if r.run_id in run_ids]


def payload_of(rec: RunRecord) -> RunPayload:
    """The payload stored with a run's record."""
    return msgspec.convert(rec.task_spec["payload"], RunPayload)


def secret_ref(name: str) -> SecretRef:
    """A task's secret name (``name`` or ``name#entry``) as the reference a driver resolves."""
    base, _, entry = name.partition("#")
    return SecretRef(name=base, key=entry or None)


def launch_spec(
    payload: RunPayload,
    run_id: str,
    attempt: int,
    key: str,
    pool: str,
    upstream: bytes | None = None,
    lease: DeviceLease | None = None,
) -> LaunchSpec:
    """The provider's view of one attempt; ``upstream`` becomes ``upstream.json`` beside it.
    Secrets stay references: only the driver resolves them, when it submits.

    Without upstream the spec shares the payload's ``env`` (nobody changes a spec's dicts):
    10^5 launches of a sweep copy nothing they do not change."""
    la, needs = payload.launch, payload.instance
    env = la.env
    files: dict[str, bytes] = {}
    if upstream is not None:
        files["upstream.json"] = upstream
        env = {**env, "STOWPLAN_UPSTREAM": "upstream.json"}
    secrets = {var: secret_ref(name) for var, name in la.secrets.items()} if la.secrets else {}
    return LaunchSpec(
        key=key,
        run_id=run_id,
        attempt=attempt,
        pool=pool,
        name=payload.name,
        argv=la.argv,
        script=la.script,
        env=env,
        cpus=needs.cpus,
        memory=needs.memory,
        gpus=needs.gpus,
        gpu_types=needs.gpu_types,
        gpu_milli=needs.gpu_milli,
        nodes=needs.nodes,
        timeout_s=la.timeout_s,
        outputs=la.outputs,
        files=files,
        image=la.image,
        code=la.code,
        secrets=secrets,
        lease=lease,
    )


def run_records(prepared: Prepared, provenance_hash: str) -> list[RunRecord]:
    now = time.time()
    exp = prepared.experiment
    out = []
    for r in prepared.planned:
        out.append(
            RunRecord(
                run_id=r.run_id,
                experiment_id=exp.id,
                experiment=exp.name,
                task=r.task,
                index=r.index,
                params=dict(r.params),
                seed=r.seed,
                replicate=r.replicate,
                depends_on=r.depends_on,
                identity=msgspec.to_builtins(r.identity),
                task_spec={"payload": msgspec.to_builtins(payload(prepared, r))},
                provenance=provenance_hash,
                created_at=now,
                updated_at=now,
            )
        )
    return out


def record(prepared: Prepared, store: RunStore) -> list[PlannedRun]:
    """Write the experiment, its provenance and its runs (insert-or-ignore); return the runs
    planned (``prepared.planned``), every one of them now in the store.

    The rows are those of ``run_records`` (``tests/unit/test_session_record.py``), written
    from ``NewRunRecord``s: each run's identity and payload go to the store as the Structs
    they are and are encoded once, instead of as builtins made of them first."""
    from stowplan.provenance.records import NewRunRecord

    if prepared.diff:
        store.put_blob(prepared.diff)
    h = store.put_provenance(prepared.provenance)
    store.put_experiment(prepared.experiment)
    now = time.time()
    exp = prepared.experiment
    store.put_runs(
        [
            NewRunRecord(
                run_id=r.run_id,
                experiment_id=exp.id,
                experiment=exp.name,
                task=r.task,
                index=r.index,
                params=r.params,
                seed=r.seed,
                replicate=r.replicate,
                depends_on=r.depends_on,
                identity=r.identity,
                task_spec={"payload": payload(prepared, r)},
                provenance=h,
                created_at=now,
                updated_at=now,
            )
            for r in prepared.planned
        ]
    )
    return prepared.planned


LEDGER_MAX_IDS = 50
"""Run ids listed in a ledger entry; beyond that, only their count and hash."""


def run_ids_detail(ids: Sequence[str]) -> dict[str, Any]:
    """Ledger details naming a set of runs: their count, the SHA-256 of the sorted ids, and the
    ids themselves while there are few (a 10^5-trial sweep must not make a 6 MB entry)."""
    from stowplan.spec.canonical import canonical_json, sha256_hex

    ordered = sorted(ids)
    out: dict[str, Any] = {
        "runs": len(ordered),
        "run_ids_sha256": sha256_hex(canonical_json(ordered)),
    }
    if len(ordered) <= LEDGER_MAX_IDS:
        out["run_ids"] = ordered
    return out


def record_submission(
    prepared: Prepared,
    store: RunStore,
    todo: Sequence[str],
    *,
    seen_before: Sequence[str] = (),
    why: str = "",
    provider: str | None = None,
    who: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Ledger entries for handing ``todo`` to the queue: ``submit`` for new runs, ``retry``
    for runs that were stored before (failed or cancelled ones run again).

    ``who`` is the OS user when None (the service names its own user); ``details`` are added
    to (and override) the entries' own, e.g. the service's team and request id."""
    from stowplan.provenance.ledger import current_user
    from stowplan.provenance.records import LedgerAction

    again = set(seen_before)
    exp = prepared.experiment
    base = {
        "experiment": exp.name,
        "file": exp.file,
        "replicate": prepared.replicate,
        "replicates": prepared.replicates,
        "provider": provider,
        **(details or {}),
    }
    fresh = [r for r in todo if r not in again]
    retried = [r for r in todo if r in again]
    entries: tuple[tuple[LedgerAction, list[str]], ...] = (("submit", fresh), ("retry", retried))
    for action, ids in entries:
        if ids:
            store.append_ledger(
                who=who if who is not None else current_user(),
                action=action,
                target=exp.id,
                why=why,
                details={**base, **run_ids_detail(ids)},
            )


__all__ = [
    "DRY_RUN_DISCOVER_S",
    "Prepared",
    "capable_providers",
    "check_feasible",
    "discover",
    "launch_spec",
    "payload",
    "payload_of",
    "prepare",
    "record",
    "record_submission",
    "save_discovered",
    "submissions",
]
