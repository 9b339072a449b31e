"""The control plane of one project: the actors, started or joined, and a small sync API.

Actors (all named in the project's namespace, all restarted by Ray after a crash):
``store`` (single writer of the run store), ``placement`` (the solver, in its own process),
``provider:<name>`` (one per configured provider) and ``queue`` (the scheduler core).

Failures. An actor that dies (SIGKILL, OOM) is restarted by Ray, and calls to it are retried
there; each actor resumes its duties from its constructor (the queue reboots from the store
and reconciles, a provider reloads its live keys and watches them), so nothing waits for a
caller to wake it. Transient trouble is retried where it happens: a provider's failed poll on
its next poll, a ``ProviderError`` with ``retryable`` by the retry policy. Any other exception
an actor raises is a bug or a broken environment that a retry would only repeat: the queue
records it as the control plane's fatal error and ``stowplan run`` ends with
``ControlPlaneError`` (exit 3), leaving unfinished runs to resume on the next run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from stowplan.actors.runtime import (
    error_detail,
    error_text,
    init_ray,
    namespace_for,
    owner_identity,
    shutdown_ray,
    stop_orphans,
)
from stowplan.actors.wire import pack
from stowplan.errors import StowplanError
from stowplan.placement.problem import PlacementContext, Pool
from stowplan.scheduler.plan import RunPayload
from stowplan.scheduler.share import Approvals, TeamLimits
from stowplan.spec.models import ProviderConfig

QUEUE = "queue"
STORE = "store"
PLACEMENT = "placement"


CONTROL_FILE = "control.json"
ERROR_FILE = "control-plane-error.log"

CALL_TIMEOUT_S = 120.0
"""How long a quick call (progress, cancel, drain) may take before the control plane counts
as hung; a restarting actor answers in seconds."""


class ControlPlaneError(StowplanError):
    """The control plane failed: an actor raised, or stopped answering. ``stowplan run``
    exits with ``exit_code``; the runs it did not finish stay resumable."""

    exit_code = 3

    def __init__(self, message: str, *, detail: str = "") -> None:
        self.detail = detail
        super().__init__(message)


def provider_actor_name(name: str) -> str:
    return f"provider:{name}"


class ControlInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Where a running control plane can be reached: written by ``run``, read by ``cancel``."""

    address: str
    namespace: str
    pid: int


def write_control_file(state_dir: Path, *, address: str, namespace: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (CONTROL_FILE + ".tmp")
    tmp.write_bytes(
        msgspec.json.encode(ControlInfo(address=address, namespace=namespace, pid=os.getpid()))
    )
    os.replace(tmp, state_dir / CONTROL_FILE)


def remove_control_file(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / CONTROL_FILE).unlink()


_PRESTARTED: set[str] = set()
"""Namespaces whose Ray this process started with ``prestart``, for a ``ControlPlane`` of
theirs to own (and shut down) when it starts."""


def prestart(*, state_dir: Path, address: str | None, num_cpus: int | None = None) -> bool:
    """Start (or join) the Ray of ``state_dir``'s control plane now, ahead of
    ``ControlPlane.start``, so that a caller can overlap Ray's start (seconds) with work of
    its own that must come before the actors (discovery, the feasibility check); it writes
    nothing in the project. The ``ControlPlane`` started next for ``state_dir`` owns what this
    started; a caller that ends up starting none calls ``abandon_prestart``. Call it on the
    main thread (Ray sets its SIGTERM handler there). Returns True if it started Ray."""
    namespace = namespace_for(state_dir)
    started = init_ray(address=address, namespace=namespace, num_cpus=num_cpus)
    if started:
        _PRESTARTED.add(namespace)
    return started


def abandon_prestart(state_dir: Path) -> None:
    """Stop the Ray ``prestart`` started for ``state_dir`` when no control plane will use it."""
    namespace = namespace_for(state_dir)
    if namespace in _PRESTARTED:
        _PRESTARTED.discard(namespace)
        fast_shutdown_ray()


def fast_shutdown_ray() -> None:
    """``shutdown_ray``, without waiting a second for Ray's autoscaler monitor.

    NOTE: every local ``ray.init`` starts the autoscaler's ``monitor.py``, which a private
    Ray never uses and which keeps no state; it answers SIGTERM only after Ray's one-second
    grace, and ``ray.shutdown`` stops its processes one after the other, so that second was
    most of a shutdown. It is killed first; Ray then reaps it at once."""
    import ray

    if ray.is_initialized():
        kill_monitor(getattr(ray._private.worker, "_global_node", None))
    shutdown_ray()


def kill_monitor(node: Any) -> None:
    """SIGKILL the autoscaler monitor among the processes of Ray's ``node`` (a
    ``ray._private.node.Node`` this process started; private API, hence each step
    guarded: a Ray without these attributes is shut down the slow way)."""
    processes = getattr(node, "all_processes", None)
    if not isinstance(processes, dict):
        return
    for info in processes.get("monitor", []):
        proc = getattr(info, "process", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


def read_control_file(state_dir: Path) -> ControlInfo | None:
    """The running control plane of this project, or None if none is (still) alive.

    None means nothing of a control plane runs any more: the actor processes a dead driver
    left on this host (which may still be launching an attempt for a few seconds) are stopped,
    and waited for, before it returns, so a caller can act on the store directly.
    """
    import psutil

    try:
        info = msgspec.json.decode((state_dir / CONTROL_FILE).read_bytes(), type=ControlInfo)
    except (FileNotFoundError, msgspec.DecodeError):
        info = None
    if info is not None and psutil.pid_exists(info.pid):
        return info
    stop_orphans(state_dir)
    return None


class ControlPlane:
    def __init__(
        self,
        *,
        state_dir: Path,
        store_path: Path,
        providers: dict[str, ProviderConfig],
        address: str | None = None,
        seed: int = 0,
        lease_ttl: float = 900.0,
        poll_max: float | None = None,
        num_cpus: int | None = None,
        context: PlacementContext | None = None,
        budget: float | None = None,
        workers: int = 1,
        teams: dict[str, TeamLimits] | None = None,
        approvals: Approvals | None = None,
        spread: bool = False,
        facts: Sequence[Pool] | None = None,
        facts_at: float = 0.0,
    ) -> None:
        self.state_dir = state_dir
        self.store_path = store_path
        self.providers = providers
        self.address = address
        self.seed = seed
        self.lease_ttl = lease_ttl
        self.poll_max = poll_max
        self.num_cpus = num_cpus
        self.context = context or PlacementContext()
        self.budget = budget
        self.workers = workers
        self.teams = teams or {}
        """``[service.teams]`` limits for the core's sharing (``scheduler.share``)."""
        self.approvals = approvals
        """the service's: runs ask for approval instead of being held (``CoreConfig``)."""
        self.spread = spread
        """place the actors over the cluster's nodes (Ray's SPREAD strategy) instead of beside
        the driver: ``stowplan serve --spread`` on a cluster of several nodes."""
        self.facts = facts
        """pools the caller discovered, beginning at ``facts_at`` (``time.time()``): each
        provider actor's first discovery uses its own while they are fresh
        (``actors.provider.HandedFacts``)"""
        self.facts_at = facts_at
        self.namespace = namespace_for(state_dir)
        self._started_ray = False
        self.actors: dict[str, Any] = {}

    def start(self) -> None:
        import ray

        from stowplan.actors.placement import PlacementActor
        from stowplan.actors.provider import HandedFacts, ProviderActor
        from stowplan.actors.queue import QueueActor
        from stowplan.actors.store import StoreActor

        # what a driver that died left of its control plane must not run beside this one
        stop_orphans(self.state_dir)
        started = init_ray(address=self.address, namespace=self.namespace, num_cpus=self.num_cpus)
        self._started_ray = started or self.namespace in _PRESTARTED
        _PRESTARTED.discard(self.namespace)
        owner = owner_identity()
        notes: dict[str, Any] = {"state_dir": str(self.state_dir), "owner": owner}
        common: dict[str, Any] = {
            "namespace": self.namespace,
            "get_if_exists": True,
            "max_restarts": -1,
            "max_task_retries": -1,
            "num_cpus": 0,
        }
        if self.spread:
            common["scheduling_strategy"] = "SPREAD"
        self.actors[STORE] = (
            ray.remote(StoreActor)
            .options(name=STORE, **common)
            .remote(str(self.store_path), **notes)
        )
        self.actors[PLACEMENT] = (
            ray.remote(PlacementActor)
            .options(name=PLACEMENT, **common)
            .remote(self.seed, budget=self.budget, workers=self.workers, **notes)
        )
        # the solver's first call imports CP-SAT (about a second): pay it while the provider
        # actors discover, not on the first placement (the answer is not needed)
        self.actors[PLACEMENT].warm.remote()
        names: dict[str, str] = {}
        for name, cfg in sorted(self.providers.items()):
            handed = None
            if self.facts is not None:
                pools = [p for p in self.facts if p.provider == name]
                handed = pack(HandedFacts(pools=pools, at=self.facts_at))
            actor_name = provider_actor_name(name)
            names[name] = actor_name
            self.actors[actor_name] = (
                ray.remote(ProviderActor)
                .options(name=actor_name, **common)
                .remote(
                    name,
                    msgspec.json.encode(cfg),
                    str(self.state_dir),
                    queue_name=QUEUE,
                    store_name=STORE,
                    namespace=self.namespace,
                    poll_max=self.poll_max,
                    renew_every=self.lease_ttl / 4,
                    owner=owner,
                    facts=handed,
                )
            )
        self.actors[QUEUE] = (
            ray.remote(QueueActor)
            .options(name=QUEUE, **common)
            .remote(
                store_name=STORE,
                placement_name=PLACEMENT,
                providers=names,
                namespace=self.namespace,
                seed=self.seed,
                lease_ttl=self.lease_ttl,
                context=pack(self.context),
                teams=pack(self.teams) if self.teams else None,
                approvals=pack(self.approvals) if self.approvals is not None else None,
                **notes,
            )
        )
        try:
            self._get(self.actors[STORE].ping.remote(), what="start the store")
            self._get(self.actors[QUEUE].ping.remote(), what="start the queue")
        except BaseException:
            self.stop(drain=False)
            raise
        write_control_file(
            self.state_dir,
            address=ray.get_runtime_context().gcs_address,
            namespace=self.namespace,
        )

    @property
    def queue(self) -> Any:
        return self.actors[QUEUE]

    def submit(self, runs: list[RunPayload], completed: list[str]) -> dict[str, int]:
        """Hand recorded runs to the queue; ``completed`` lists upstream runs already done."""
        result: dict[str, int] = self._get(
            self.queue.submit.remote(pack(runs), completed), what="submit", timeout=None
        )
        return result

    def progress(
        self, run_ids: list[str] | None, *, since: dict[str, int] | None = None, wait: float = 0.0
    ) -> dict[str, Any]:
        """Counts by state, and ``fatal``: the error that ended the control plane, or None.
        With ``since`` (counts seen before), the answer waits up to ``wait`` seconds for them
        to change (``QueueActor.progress``)."""
        result: dict[str, Any] = self._get(
            self.queue.progress.remote(run_ids, since, wait),
            what="report progress",
            timeout=CALL_TIMEOUT_S + wait,
        )
        return result

    def sharing(self) -> dict[str, Any]:
        """Each limited team's use against its limits (``SchedulerCore.sharing``)."""
        result: dict[str, Any] = self._get(self.queue.sharing.remote(), what="report quotas")
        return result

    def cancel(self, run_ids: list[str], reason: str) -> int:
        n: int = self._get(self.queue.cancel.remote(run_ids, reason), what="cancel")
        return n

    def set_team_spending(self, spent: dict[str, float]) -> None:
        """What each team's attempts cost this month (the service sums the store's records)."""
        self._get(self.queue.set_team_spending.remote(spent), what="set team spending")

    def decide(self, run_ids: list[str], approve: bool, reason: str) -> int:
        """Approve or reject runs waiting for approval; how many were waiting."""
        n: int = self._get(
            self.queue.decide.remote(run_ids, approve, reason), what="approve or reject"
        )
        return n

    def failure(self, fatal: dict[str, str]) -> ControlPlaneError:
        """The error to raise for the queue's ``fatal`` record; its detail is kept in a file."""
        path = self.state_dir / ERROR_FILE
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(fatal.get("detail", "") + "\n")
            where = f"; the full error is in {path}"
        except OSError:
            where = ""
        return ControlPlaneError(
            f"the control plane failed: the {fatal['actor']} actor raised "
            f"{fatal['error']}{where}.\n  Runs that had not finished were left as they are. "
            "fix: if the cause is in your setup (disk, permissions, provider configuration), "
            "fix it and run the same command again: finished runs are kept and the rest "
            "resume; otherwise it is a bug in stowplan: please report it with that file",
            detail=fatal.get("detail", ""),
        )

    def _get(self, ref: Any, *, what: str, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        """``ray.get`` that turns Ray's errors into ControlPlaneError, and a hang into one."""
        import ray

        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ControlPlaneError(
                f"the control plane did not answer within {timeout:.0f} s when asked to {what}"
            ) from None
        except ray.exceptions.RayError as e:
            raise ControlPlaneError(
                f"the control plane failed when asked to {what}: {error_text(e)}",
                detail=error_detail(e),
            ) from None

    def stop(self, *, drain: bool = True) -> None:
        """Stop the actors; stop Ray too if this control plane started it. ``drain`` first
        waits until what the queue sent to the store is written (skipped after a failure)."""
        import ray

        try:
            if drain and QUEUE in self.actors:
                self._get(self.actors[QUEUE].drain.remote(), what="drain")
        finally:
            remove_control_file(self.state_dir)
            if self._started_ray:
                fast_shutdown_ray()
            else:
                for actor in self.actors.values():
                    ray.kill(actor, no_restart=True)
            self.actors.clear()
