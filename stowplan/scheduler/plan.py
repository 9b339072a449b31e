"""From a loaded experiment to concrete runs: sweep expansion, identities, launch templates.

Pure: the versions of code, data and environment are captured by the caller (provenance) and
passed in as ``Versions``. Each task becomes one run per trial; a dependency on a task is a
dependency on every run of it. A run's identity hashes the task's spec as written (before
placeholders are filled), its parameters and seed, the versions, its upstream run ids, the
replicate number and, where a sweep repeats a parameter set, the repeat's trial number (see
``sweep.repeat_numbers``), so editing one task re-runs it and what depends on it, and nothing
else, and every trial is a run of its own.

An ``EnvPin`` replaces one run's environment hash with one that also names the versions of the
distributions an earlier run of it used: the caller pins a run whose stored result was made with
versions that have changed since (see ``provenance.imports``), which gives it (and everything
downstream of it) a new identity, so it runs again instead of being reused.
"""

from __future__ import annotations

from collections.abc import Mapping

from msgspec import Struct, field

from stowplan.scheduler.events import TaskInstance
from stowplan.scheduler.sweep import expand, repeat_numbers
from stowplan.spec.canonical import RunIdentity, canonical_json, sha256_hex, task_hash
from stowplan.spec.loader import LoadedExperiment, task_order
from stowplan.spec.models import Scalar, Task


class Versions(Struct, frozen=True, kw_only=True):
    code_version: str
    env_hash: str
    data_versions: dict[str, str] = field(default_factory=dict)
    """uri -> version, for every input of every task."""


class EnvPin(Struct, frozen=True, kw_only=True):
    """The distributions (normalised name -> version, as they are now) that an earlier run of
    the same trial used: part of the pinned run's environment hash."""

    used: dict[str, str]

    def env_hash(self, base: str) -> str:
        return sha256_hex(canonical_json({"env": base, "used": self.used}))


PinKey = tuple[int, str, int]
"""(replicate, task, trial index): which run an EnvPin applies to."""


class Launch(Struct, frozen=True, kw_only=True):
    """What to run for one run, with placeholders filled: the same for every attempt. What it
    needs (CPUs, memory, GPUs) is the core's ``TaskInstance``'s, written once."""

    argv: list[str] | None
    script: str | None
    env: dict[str, str]
    outputs: list[str]
    timeout_s: float | None
    image: str | None = None
    """the task's container image; None: the provider's default, if it has one."""
    code: str | None = None
    """the code version the run's identity and provenance name (``Versions.code_version``)."""
    secrets: dict[str, str] = field(default_factory=dict)
    """environment variable -> secret name (``name`` or ``name#entry``), never a value."""


class RunPayload(Struct, frozen=True, kw_only=True):
    """One run as it is handed to the queue and stored with its record (``RunRecord.task_spec``):
    the core's view of it (``TaskInstance``, no command) and how to launch it. The queue keeps it
    per run and makes each attempt's ``providers.base.LaunchSpec`` from it."""

    instance: TaskInstance
    launch: Launch
    name: str
    """the run's name for people and job names: ``experiment-task-trial``."""

    @property
    def run_id(self) -> str:
        return self.instance.run_id


class PlannedRun(Struct, frozen=True, kw_only=True):
    """One run of an experiment, as planning makes it: its identity and what goes into its
    record, its payload's parts (``launch``, ``instance``)."""

    run_id: str
    task: str
    index: int
    params: dict[str, Scalar]
    seed: int
    replicate: int
    depends_on: list[str]
    identity: RunIdentity
    launch: Launch
    instance: TaskInstance


class _Fill(dict[str, str]):
    pass


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders; ``{{`` and ``}}`` are literal braces."""
    return template.format_map(_Fill(values))


def _scalar_text(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def plan_runs(
    loaded: LoadedExperiment,
    versions: Versions,
    *,
    project: str,
    replicate: int = 0,
    allowed_providers: tuple[str, ...] | None = None,
    env_pins: Mapping[PinKey, EnvPin] | None = None,
) -> list[PlannedRun]:
    """Every run of the experiment, upstream before downstream, trials in sweep order."""
    pins = env_pins or {}
    spec = loaded.spec
    policy = loaded.policy
    by_name = {t.name: t for t in spec.tasks}
    order = task_order(spec.tasks)
    runs_of: dict[str, list[str]] = {}
    out: list[PlannedRun] = []
    providers = allowed_providers
    if providers is None and policy.allowed_providers is not None:
        providers = tuple(sorted(policy.allowed_providers))
    seed = spec.experiment.seed + replicate
    for name in order:
        task = by_name[name]
        spec_of_task = task_hash(task)
        upstream = sorted(r for d in task.depends_on for r in runs_of[d])
        data = {i.uri: versions.data_versions.get(i.uri, "unpinned:" + i.uri) for i in task.inputs}
        retry = task.retry or policy.retry
        priority = task.priority if task.priority is not None else policy.priority
        ids: list[str] = []
        trials = expand(task.sweep)
        for index, (params, trial) in enumerate(zip(trials, repeat_numbers(trials), strict=True)):
            pin = pins.get((replicate, name, index))
            identity = RunIdentity(
                task_spec_hash=spec_of_task,
                params=params,
                seed=seed,
                code_version=versions.code_version,
                data_versions=data,
                env_hash=versions.env_hash if pin is None else pin.env_hash(versions.env_hash),
                upstream=upstream,
                replicate=replicate,
                trial=trial,
            )
            run_id = identity.run_id()
            ids.append(run_id)
            values = {k: _scalar_text(v) for k, v in params.items()}
            values.update(
                seed=str(seed),
                run_id=run_id,
                experiment_dir=loaded.directory,
            )
            argv = [fill(a, values) for a in task.command] if task.command else None
            script = fill(task.script, values) if task.script else None
            env = {k: fill(v, values) for k, v in task.env.items()}
            res = task.resources
            launch = Launch(
                argv=argv,
                script=script,
                env=env,
                outputs=list(task.outputs),
                timeout_s=task.timeout_s,
                image=task.image,
                code=versions.code_version,
                secrets=dict(task.secrets),
            )
            instance = TaskInstance(
                run_id=run_id,
                project=project,
                group=f"{spec.experiment.name}/{task.name}",
                depends_on=tuple(upstream),
                cpus=res.cpus * res.nodes,
                memory=res.memory_bytes * res.nodes,
                gpus=res.gpu_devices * res.nodes,
                gpu_types=res.gpu_types,
                gpu_milli=res.gpu_milli,
                nodes=res.nodes,
                priority=priority,
                retry=retry,
                allowed_providers=providers,
                max_concurrent=task.sweep.max_concurrent if task.sweep else None,
                datasets=tuple(sorted({i.uri for i in task.inputs})),
                runtime_s=_runtime(task),
                require_sites=tuple(task.placement.require_sites),
                forbid_sites=tuple(task.placement.forbid_sites),
                forbid_pools=tuple(task.placement.forbid_pools),
                residency=tuple(sorted(set(task.placement.residency))),
                tolerations=tuple(task.placement.tolerations),
                service=task.service_spec,
            )
            out.append(
                PlannedRun(
                    run_id=run_id,
                    task=task.name,
                    index=index,
                    params=params,
                    seed=seed,
                    replicate=replicate,
                    depends_on=upstream,
                    identity=identity,
                    launch=launch,
                    instance=instance,
                )
            )
        runs_of[name] = ids
    return out


def _runtime(task: Task) -> float:
    """The runtime estimate placement prices: declared, else the walltime, else the timeout."""
    for value in (task.placement.runtime, task.resources.walltime, task.timeout):
        if isinstance(value, float | int):
            return float(value)
    return 3600.0
