"""``stowplan run``'s first submit, sent while Ray starts; the control plane takes it over as
a restarted control plane takes over what it finds in the store.

Why: Ray and the actors take about 4 s to start on two cores (``ray.init`` 2.5-3 s, the actors
1 s). On a batch scheduler (Slurm) the first array went out only then, and the cluster idled
those seconds: 1.08x a raw ``sbatch --array`` of 1,000 trials on a 4-node cluster, in fixed
cost alone. The CLI has everything the first submit needs once discovery has answered
(about 1 s in): the runs, the pools and the driver's connection.

``submit_ahead`` runs on the discovery thread (``cli.run._discover_while_ray_starts``), once
the experiment is known to be feasible, on the drivers discovery opened:

1. The experiment, its runs and the ledger entry are recorded (``dispatch`` does it otherwise).
2. A ``SchedulerCore`` of its own, configured as the queue actor's for ``stowplan run`` (the
   project's placement context; the placement actor's solver with the same budget, seed and
   workers), is given the discovered pools and the runs ready now, and solves once.
3. Each ``Submit`` it commands to a provider whose driver ``submits_ahead`` is carried out as
   the command shell carries it out: the write-ahead record first (the steps of its runs, the
   solve, the intents: ``RunTables.write_dispatch``, one transaction), then plan and submit,
   chunk by chunk (``SUBMIT_CHUNK``). A submit that raises a ``ProviderError`` is left as it
   is: its intents stand.

Then it stops, and ``dispatch`` starts the control plane, which boots as after a crash: the
store gives those runs as SUBMITTING their attempt (``StoreActor.load_active``), the queue's
core reconciles their keys, and the provider actor describes them and watches the live ones.
Whatever became of a submit is found there: a job found is followed; a key the provider never
heard of (the submit failed before sbatch ran) is submitted again under the same key, which
the driver's key index keeps to one job; a refusal is met again by that submit and failed by
the run's retry policy. Runs the first solve did not place, or placed on a provider that does
not submit ahead, keep no steps: they are PENDING in the store, and the control plane places
them, with the leases of the restored runs counted.

Nothing is submitted ahead (the control plane does everything, as before) when no configured
provider submits ahead, when the experiment has a spending budget (the queue reads what was
spent before it launches anything), for runs that were stored before (the queue continues their
attempt numbers) and for runs with upstream runs (their inputs come from the store's
artifacts).

Ctrl-C before the control plane has started: ``Ahead.cancel`` cancels what was submitted
ahead, through the same kind of drivers, and records those runs CANCELLED, as the control
plane would have.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from stowplan.actors.queue import SUBMIT_CHUNK, assignment_of, solve_row
from stowplan.actors.wire import pack
from stowplan.errors import ProviderError
from stowplan.placement.leases import lease_columns
from stowplan.placement.problem import PlacementProblem, Pool
from stowplan.provenance.store import RunStore
from stowplan.provenance.store.runs import Dispatch, IntentRow, Step, StepBatch
from stowplan.providers.base import Facts, Provider
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Cancel,
    CancelRequested,
    Command,
    PlacementDecided,
    PoolsDiscovered,
    SolvePlacement,
    Submit,
    TasksSubmitted,
    Transitioned,
)
from stowplan.spec.units import plural

log = logging.getLogger(__name__)


class Ahead:
    """What ``submit_ahead`` did: the experiment and its runs are recorded (``dispatch``
    records nothing again), and ``submitted`` are the runs submitted ahead, by provider."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        self.submitted: dict[str, list[str]] = {}
        """provider -> run ids whose attempt went to its driver's submit."""

    def runs(self) -> list[str]:
        return [r for rs in self.submitted.values() for r in rs]

    def cancel(self, prepared: Any, reason: str) -> str:
        """Cancel the runs submitted ahead (no control plane took them over): the core's
        cancels go to fresh drivers, then its steps to the store. Where a provider could not
        be told, the runs are left as they are (SUBMITTING, found again by the next ``stowplan
        run``), never recorded CANCELLED while their jobs may run. Returns what happened, in
        one line for the terminal."""
        import anyio

        from stowplan.providers.registry import make_provider

        runs = self.runs()
        if not runs:
            return ""
        cmds = self.core.handle(CancelRequested(run_ids=runs, reason=reason), time.time())
        steps: list[Step] = []
        cancels: list[Cancel] = []
        for c in cmds:
            if isinstance(c, Transitioned):
                steps.extend(_steps(c, time.time()))
            elif isinstance(c, Cancel):
                cancels.append(c)

        async def go() -> None:
            for c in cancels:
                cfg = prepared.providers[c.provider]
                async with make_provider(
                    c.provider, cfg, state_dir=Path(prepared.state_dir)
                ) as drv:
                    await drv.cancel(c.keys)

        try:
            anyio.run(go)
        except ProviderError as e:
            return (
                f"could not cancel the {plural(len(runs), 'run')} submitted ahead ({e}); "
                "they go on at the provider, and `stowplan run` with the same file follows "
                "them to the end"
            )
        with RunStore(Path(prepared.store_path)) as store:
            store.write_steps(StepBatch(attempts=[], steps=steps))
        return f"cancelled the {plural(len(runs), 'run')} submitted ahead"


def _steps(cmd: Transitioned, at: float) -> list[Step]:
    return [
        Step(t.run_id, t.attempt, t.from_state, t.to_state, at, t.failure, t.reason, t.pool)
        for t in cmd.records
    ]


def wanted(prepared: Any, drivers: Mapping[str, Provider]) -> bool:
    """Whether anything could be submitted ahead (module doc)."""
    return any(d.submits_ahead for d in drivers.values()) and prepared.loaded.policy.budget is None


async def submit_ahead(
    prepared: Any,
    pools: Sequence[Pool],
    drivers: Mapping[str, Provider],
    *,
    todo: Sequence[str],
    reused: Sequence[str],
    seen_before: Sequence[str],
    why: str,
    provider: str | None,
    stop: threading.Event,
) -> Ahead:
    """Record the runs, then submit ahead what the first solve places where it may (module
    doc). ``stop`` set (Ctrl-C): nothing more goes out. Call only where ``wanted``."""
    from stowplan.placement import solve
    from stowplan.placement.context import context_for
    from stowplan.session import launch_spec, payload, record, record_submission

    settings = prepared.project.config.placement
    fresh = set(todo).difference(seen_before)
    ready = [r for r in prepared.planned if r.run_id in fresh and not r.depends_on]
    planned = {r.run_id: r for r in ready}
    core = SchedulerCore(CoreConfig(context=context_for(prepared.project, prepared.loaded)))
    steps: dict[str, list[Step]] = {}
    ahead = Ahead(core)
    with RunStore(Path(prepared.store_path)) as store:
        record(prepared, store)
        record_submission(
            prepared, store, todo, seen_before=seen_before, why=why, provider=provider
        )
        if not ready:
            return ahead
        submits: list[Submit] = []
        problems: list[PlacementProblem] = []

        def take(cmds: list[Command], at: float) -> None:
            for c in cmds:
                if isinstance(c, Transitioned):
                    for s in _steps(c, at):
                        steps.setdefault(s.run_id, []).append(s)
                elif isinstance(c, Submit):
                    submits.append(c)
                elif isinstance(c, SolvePlacement):
                    problems.append(c.problem)

        now = time.time()
        for name in sorted(prepared.providers):
            mine = [p for p in pools if p.provider == name]
            take(core.handle(PoolsDiscovered(provider=name, pools=mine), now), now)
        tasks = [r.instance for r in ready]
        take(core.handle(TasksSubmitted(tasks=tasks, completed=list(reused)), now), now)
        if not problems or stop.is_set():
            return ahead
        problem = problems[0]
        began = time.perf_counter()
        solution = solve(problem, budget=settings.budget, seed=0, workers=settings.workers)
        # as the placement actor times it
        solution = msgspec.structs.replace(solution, solve_seconds=time.perf_counter() - began)
        at = time.time()
        take(core.handle(PlacementDecided(solution=solution), at), at)
        sha = store.put_blob(pack((problem, solution)))
        hw = {p.id: p.hardware_class for p in problem.pools}
        row = solve_row(solution, sha, hw)
        index = assignment_of(problem, solution)
        for sub in submits:
            drv = drivers.get(sub.provider)
            if drv is None or not drv.submits_ahead:
                continue  # left PENDING: the control plane places it
            facts = Facts.of([p for p in pools if p.provider == sub.provider])
            for start in range(0, len(sub.items), SUBMIT_CHUNK):
                if stop.is_set():
                    return ahead
                items = sub.items[start : start + SUBMIT_CHUNK]
                launches = [
                    launch_spec(
                        payload(prepared, planned[it.run_id]),
                        it.run_id,
                        it.attempt,
                        it.key,
                        sub.pool,
                        None,
                        it.lease,
                    )
                    for it in items
                ]
                intents = [
                    IntentRow(
                        it.key,
                        it.run_id,
                        it.attempt,
                        0 if it.run_id in index else -1,
                        index.get(it.run_id, 0),
                        *((None, None) if it.lease is None else lease_columns(it.lease)),
                    )
                    for it in items
                ]
                store.write_dispatch(
                    Dispatch(
                        provider=sub.provider,
                        pool=sub.pool,
                        at=time.time(),
                        attempts=[],
                        steps=[s for it in items for s in steps.pop(it.run_id, [])],
                        solves=[row],
                        intents=intents,
                    )
                )
                ahead.submitted.setdefault(sub.provider, []).extend(it.run_id for it in items)
                try:
                    await drv.submit(drv.plan(launches, facts))
                except ProviderError as e:  # the control plane finds out by key (module doc)
                    log.info("%s: submit ahead left to the control plane: %s", sub.provider, e)
    return ahead
