"""The control plane of one project: the actors, started or joined, and a small sync API.

Actors (all named in the project's namespace, all restarted by Ray after a crash):
``store`` (single writer of the run store), ``placement`` (the solver, in its own process),
``provider:<name>`` (one per configured provider) and ``queue`` (the scheduler core).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from stowplan.actors.queue import SubmitRun
from stowplan.actors.runtime import init_ray, namespace_for, shutdown_ray
from stowplan.actors.wire import pack
from stowplan.placement.problem import PlacementContext
from stowplan.spec.models import ProviderConfig

QUEUE = "queue"
STORE = "store"
PLACEMENT = "placement"


CONTROL_FILE = "control.json"


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


def read_control_file(state_dir: Path) -> ControlInfo | None:
    """The running control plane of this project, or None if none is (still) alive."""
    import psutil

    try:
        info = msgspec.json.decode((state_dir / CONTROL_FILE).read_bytes(), type=ControlInfo)
    except (FileNotFoundError, msgspec.DecodeError):
        return None
    return info if psutil.pid_exists(info.pid) else None


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
        poll_max: float = 2.0,
        num_cpus: int | None = None,
        context: PlacementContext | None = None,
        budget: float | None = None,
        workers: int = 1,
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
        self.namespace = namespace_for(state_dir)
        self._started_ray = False
        self.actors: dict[str, Any] = {}

    def start(self) -> None:
        import ray

        from stowplan.actors.placement import PlacementActor
        from stowplan.actors.provider import ProviderActor
        from stowplan.actors.queue import QueueActor
        from stowplan.actors.store import StoreActor

        self._started_ray = init_ray(
            address=self.address, namespace=self.namespace, num_cpus=self.num_cpus
        )
        common: dict[str, Any] = {
            "namespace": self.namespace,
            "get_if_exists": True,
            "max_restarts": -1,
            "max_task_retries": -1,
            "num_cpus": 0,
        }
        self.actors[STORE] = (
            ray.remote(StoreActor).options(name=STORE, **common).remote(str(self.store_path))
        )
        self.actors[PLACEMENT] = (
            ray.remote(PlacementActor)
            .options(name=PLACEMENT, **common)
            .remote(self.seed, budget=self.budget, workers=self.workers)
        )
        names: dict[str, str] = {}
        for name, cfg in sorted(self.providers.items()):
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
            )
        )
        ray.get(self.actors[STORE].ping.remote())
        ray.get(self.actors[QUEUE].ping.remote())
        write_control_file(
            self.state_dir,
            address=ray.get_runtime_context().gcs_address,
            namespace=self.namespace,
        )

    @property
    def queue(self) -> Any:
        return self.actors[QUEUE]

    def submit(self, runs: list[SubmitRun], completed: list[str]) -> dict[str, int]:
        """Hand recorded runs to the queue; ``completed`` lists upstream runs already done."""
        import ray

        result: dict[str, int] = ray.get(self.queue.submit.remote(pack(runs), completed))
        return result

    def progress(self, run_ids: list[str] | None) -> dict[str, Any]:
        import ray

        result: dict[str, Any] = ray.get(self.queue.progress.remote(run_ids))
        return result

    def cancel(self, run_ids: list[str], reason: str) -> int:
        import ray

        n: int = ray.get(self.queue.cancel.remote(run_ids, reason))
        return n

    def stop(self) -> None:
        """Stop the actors; stop Ray too if this control plane started it."""
        import ray

        if QUEUE in self.actors:
            ray.get(self.actors[QUEUE].drain.remote())
        remove_control_file(self.state_dir)
        if self._started_ray:
            shutdown_ray()
        else:
            for actor in self.actors.values():
                ray.kill(actor, no_restart=True)
        self.actors.clear()
