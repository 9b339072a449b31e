"""The queue actor: hosts the scheduler core in real time and carries out its commands.

Everything the core decides comes out of ``SchedulerCore.handle`` as commands; this actor only
does what they say, in order:

- ``Transitioned``: sent to the store actor (ordered after everything sent before it);
- ``Submit``: write-ahead first (the intents are durable before the provider hears anything),
  then the provider actor submits the batch, and its reports come back as an event;
- ``SolvePlacement``: the placement actor solves in its own process while the queue goes on;
- ``Reconcile``: the provider describes the keys and the reports come back as an event;
- ``Cancel``: passed to the provider; ``WakeAt``: the tick loop feeds a Tick then.

Provider reports go the other way: the outputs of succeeded attempts are stored first (the
queue waits for the store's answer), an attempt whose outputs were not all stored becomes a
FAILED one (``node_failure``, retried by policy), then the attempts are recorded and the core
hears of them. So no run is SUCCEEDED without its artifacts, and no dependent starts before
they exist.

It keeps no state that the store does not also have: after a crash (``max_restarts``) it boots
again, from its constructor, from the store's active runs and reconciles with every provider
before dispatching anything new.

Failures: an exception from a peer actor's call, or from the queue's own handling, is recorded
once as ``fatal`` (which actor, the error in one line, the full text) and the queue stops
acting; ``progress`` returns it and ``stowplan run`` ends with it. A peer that is merely
unreachable for a moment (``ActorUnavailableError``) is called again a few times first; a
peer that died is restarted by Ray, which retries the call itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from stowplan.actors.runtime import error_detail, error_text, note_worker
from stowplan.actors.store import ActiveState, Artifacts
from stowplan.actors.wire import pack, unpack
from stowplan.placement.problem import (
    PlacementContext,
    PlacementProblem,
    PlacementSolution,
    Pool,
)
from stowplan.provenance.records import (
    AttemptRecord,
    PlacementRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.providers.base import LaunchSpec, ProviderState, Report
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    Cancel,
    CancelRequested,
    Command,
    Event,
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    Reconcile,
    RestoredTask,
    SolvePlacement,
    Submit,
    SubmitItem,
    TaskInstance,
    TasksRestored,
    TasksSubmitted,
    Tick,
    Transitioned,
    WakeAt,
)
from stowplan.scheduler.plan import Launch
from stowplan.scheduler.states import FINAL, LEASED, TaskState
from stowplan.spec.canonical import sha256_hex
from stowplan.spec.models import FailureClass

log = logging.getLogger(__name__)

SUBMIT_CHUNK = 10_000
TRANSITION_CHUNK = 200_000
UNAVAILABLE_RETRIES = 5
"""Calls to a peer that is unreachable for a moment are retried this often, backing off."""


class PeerFailed(Exception):
    """A call to another actor of the control plane raised; names which actor."""

    def __init__(self, actor: str, err: BaseException) -> None:
        self.actor = actor
        self.text = error_text(err)
        self.detail = error_detail(err)
        super().__init__(f"{actor}: {self.text}")


class RunPayload(msgspec.Struct, frozen=True, kw_only=True):
    """What the queue keeps per run: the core's view and how to launch it."""

    instance: TaskInstance
    launch: Launch
    name: str


class SubmitRun(msgspec.Struct, frozen=True, array_like=True):
    run_id: str
    payload: RunPayload


def payload_of(rec: RunRecord) -> RunPayload:
    return msgspec.convert(rec.task_spec["payload"], RunPayload)


def launch_spec(
    payload: RunPayload,
    run_id: str,
    attempt: int,
    key: str,
    pool: str,
    upstream: bytes | None = None,
) -> LaunchSpec:
    """The provider's view of one attempt; ``upstream`` becomes ``upstream.json`` beside it."""
    la = payload.launch
    env = dict(la.env)
    files: dict[str, bytes] = {}
    if upstream is not None:
        files["upstream.json"] = upstream
        env["STOWPLAN_UPSTREAM"] = "upstream.json"
    return LaunchSpec(
        key=key,
        run_id=run_id,
        attempt=attempt,
        pool=pool,
        name=payload.name,
        argv=la.argv,
        script=la.script,
        env=env,
        cpus=la.cpus,
        memory=la.memory,
        gpus=la.gpus,
        gpu_types=la.gpu_types,
        timeout_s=la.timeout_s,
        outputs=la.outputs,
        files=files,
    )


def _not_stored(report: Report, reason: str | None) -> Report:
    """``report`` as a failure when its outputs were not all stored (``reason`` says why)."""
    if reason is None or report.state is not ProviderState.SUCCEEDED:
        return report
    return msgspec.structs.replace(
        report,
        state=ProviderState.FAILED,
        failure=FailureClass.NODE_FAILURE,
        message=reason,
        outputs={},
    )


class QueueActor:
    def __init__(
        self,
        *,
        store_name: str,
        placement_name: str,
        providers: dict[str, str],
        namespace: str,
        seed: int = 0,
        lease_ttl: float = 900.0,
        tick: float = 0.2,
        context: bytes | None = None,
        state_dir: str | None = None,
        owner: tuple[int, float] | None = None,
    ) -> None:
        note_worker(state_dir, "queue", owner)
        self.namespace = namespace
        self.store_name = store_name
        self.placement_name = placement_name
        self.provider_names = providers
        ctx = unpack(context, PlacementContext) if context else PlacementContext()
        self.core = SchedulerCore(CoreConfig(lease_ttl=lease_ttl, seed=seed, context=ctx))
        self.payloads: dict[str, RunPayload] = {}
        self.tick = tick
        self.wake_at = float("inf")
        self._boot_lock = asyncio.Lock()
        self._booted = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors: list[str] = []
        self.boots = 0
        self._transitions: list[TransitionRecord] = []
        self._decisions: dict[int, tuple[PlacementSolution, str, dict[str, str]]] = {}
        self._placed: dict[str, tuple[int, int]] = {}
        self.fatal: dict[str, str] | None = None
        # an async actor's constructor runs on its event loop: a restarted queue resumes at
        # once (reconciling with the providers), not when someone next calls it
        self._spawn(self._ensure(), actor="queue")

    # ---- failures ---------------------------------------------------------------------------

    def _fail(self, err: BaseException, actor: str = "queue") -> None:
        """Record the first fatal error; from then on the queue no longer acts."""
        if isinstance(err, PeerFailed):
            actor, text, detail = err.actor, err.text, err.detail
        else:
            text, detail = error_text(err), error_detail(err)
        self._record_fatal(actor, text, detail)

    def _record_fatal(self, actor: str, text: str, detail: str) -> None:
        log.error("%s actor failed: %s", actor, text)
        if self.fatal is None:
            self.fatal = {"actor": actor, "error": text, "detail": detail}
            self.errors.append(f"{actor}: {text}")

    async def fail(self, actor: str, error: str, detail: str = "") -> None:
        """Another actor hit an error it cannot recover from (a provider's watch loop)."""
        self._record_fatal(actor, error, detail)

    async def _call(self, actor: str, method: Any, *args: Any) -> Any:
        """Call ``method`` of the peer ``actor`` and wait; its errors become ``PeerFailed``.
        Calls whose order matters with others (``_send``) are never retried here."""
        import ray

        delay = 0.2
        for attempt in range(UNAVAILABLE_RETRIES + 1):
            try:
                return await method.remote(*args)
            except ray.exceptions.ActorUnavailableError as e:
                if attempt == UNAVAILABLE_RETRIES:
                    raise PeerFailed(actor, e) from e
                await asyncio.sleep(delay)
                delay *= 2
            except Exception as e:
                raise PeerFailed(actor, e) from e
        raise AssertionError("unreachable")

    # ---- boot ---------------------------------------------------------------------------

    async def _ensure(self) -> None:
        if self._booted:
            return
        async with self._boot_lock:
            if not self._booted:
                await self._boot()
                self._booted = True

    async def _boot(self) -> None:
        import ray

        self.boots += 1
        # actor handles are untyped: their methods exist only at run time
        self.store: Any = ray.get_actor(self.store_name, namespace=self.namespace)
        self.placement: Any = ray.get_actor(self.placement_name, namespace=self.namespace)
        self.providers: dict[str, Any] = {
            n: ray.get_actor(a, namespace=self.namespace) for n, a in self.provider_names.items()
        }
        for name, actor in sorted(self.providers.items()):
            pools = unpack(await self._call(f"provider:{name}", actor.discover), list[Pool])
            self._handle(PoolsDiscovered(provider=name, pools=pools))
        runs: list[RunRecord]
        attempts: dict[str, list[AttemptRecord]]
        done: list[str]
        runs, attempts, done = unpack(
            await self._call("store", self.store.load_active), ActiveState
        )
        restored: list[RestoredTask] = []
        for rec in runs:
            payload = payload_of(rec)
            self.payloads[rec.run_id] = payload
            state = TaskState(rec.state)
            current = next(
                (a for a in attempts.get(rec.run_id, []) if a.attempt == rec.attempts), None
            )
            if state in LEASED and current is not None:
                restored.append(
                    RestoredTask(
                        task=payload.instance,
                        state=state,
                        attempt=current.attempt,
                        provider=current.provider,
                        pool=current.pool,
                    )
                )
            else:
                # no intent was written for the last attempt, so it was never submitted
                restored.append(
                    RestoredTask(
                        task=payload.instance, state=TaskState.PENDING, attempt=rec.attempts
                    )
                )
        self._handle(TasksRestored(tasks=restored, completed=done))
        self._spawn(self._tick_loop(), actor="queue")

    # ---- API for the control plane and the provider actors --------------------------------

    async def submit(self, runs: bytes, completed: list[str]) -> dict[str, int]:
        """Add runs (``list[SubmitRun]``, already recorded in the store).

        A run that already had attempts (it failed or was cancelled before) continues its
        attempt numbers, so its new attempts get new idempotency keys.
        """
        try:
            return await self._submit_runs(runs, completed)
        except Exception as e:
            self._fail(e)
            raise

    async def _submit_runs(self, runs: bytes, completed: list[str]) -> dict[str, int]:
        await self._ensure()
        items = unpack(runs, list[SubmitRun])
        fresh: list[TaskInstance] = []
        again: list[RestoredTask] = []
        known = set(self.core.run_ids())
        items = [i for i in items if i.run_id not in known]
        # the store, not the caller's earlier read, says what already ran: a control plane
        # that died a moment ago may have recorded more since
        so_far: dict[str, tuple[str, int]] = await self._call(
            "store", self.store.attempts_so_far, [i.run_id for i in items]
        )
        completed = list(completed)
        for item in items:
            state, attempts = so_far.get(item.run_id, ("PENDING", 0))
            if state == "SUCCEEDED":
                completed.append(item.run_id)
                continue
            self.payloads[item.run_id] = item.payload
            if attempts > 0:
                again.append(
                    RestoredTask(
                        task=item.payload.instance, state=TaskState.PENDING, attempt=attempts
                    )
                )
            else:
                fresh.append(item.payload.instance)
        if again:
            self._handle(TasksRestored(tasks=again, completed=completed))
        self._handle(TasksSubmitted(tasks=fresh, completed=completed))
        return {"new": len(fresh), "resumed": len(again)}

    async def report(self, provider: str, reports: bytes) -> None:
        """A provider's state changes. A failure here is the queue's, recorded as fatal, not
        raised into the provider's watch loop."""
        try:
            await self._ensure()
            await self._on_reports(provider, unpack(reports, list[Report]))
        except Exception as e:
            self._fail(e)

    async def cancel(self, run_ids: list[str], reason: str) -> int:
        try:
            await self._ensure()
            before = sum(1 for r in run_ids if self._final(r))
            self._handle(CancelRequested(run_ids=run_ids, reason=reason))
            return sum(1 for r in run_ids if self._final(r)) - before
        except Exception as e:
            self._fail(e)
            raise

    async def progress(self, run_ids: list[str] | None = None) -> dict[str, Any]:
        """Counts by state; runs the core no longer holds (finished before a restart) are
        looked up in the store. ``fatal`` is the error that stopped the control plane."""
        if self.fatal is None:
            try:
                return await self._progress(run_ids)
            except Exception as e:
                self._fail(e)
        return {"counts": {}, "errors": list(self.errors), "boots": self.boots, "fatal": self.fatal}

    async def _progress(self, run_ids: list[str] | None) -> dict[str, Any]:
        await self._ensure()
        if run_ids is None:
            counts = {s.value: n for s, n in self.core.counts.items() if n}
        else:
            counts = {}
            missing: list[str] = []
            for r in run_ids:
                try:
                    s = self.core.state(r).value
                except KeyError:
                    missing.append(r)
                    continue
                counts[s] = counts.get(s, 0) + 1
            if missing:
                self._flush_transitions()
                states: dict[str, str] = await self._call("store", self.store.states, missing)
                for s in states.values():
                    counts[s] = counts.get(s, 0) + 1
        return {"counts": counts, "errors": list(self.errors), "boots": self.boots, "fatal": None}

    async def drain(self) -> None:
        """Return once everything this actor sent to the store so far has been written."""
        await self._ensure()
        self._flush_transitions()
        await self._call("store", self.store.ping)

    async def ping(self) -> bool:
        await self._ensure()
        return True

    # ---- carrying out commands ------------------------------------------------------------

    def _final(self, run_id: str) -> bool:
        try:
            return self.core.state(run_id) in FINAL
        except KeyError:
            return False

    def _handle(self, event: Event) -> None:
        if self.fatal is not None:
            return  # a failed control plane acts no more; the next run resumes from the store
        commands = self.core.handle(event, time.time())
        self._execute(commands)

    def _send(self, actor: str, method: Any, *args: Any) -> None:
        """Make a call whose answer nobody waits for, so its failure is recorded, not lost.

        The call is made now, not in the task that watches it: calls to one actor run in the
        order they were made, which the write-ahead order and ``drain`` rely on."""
        ref = method.remote(*args)

        async def check() -> None:
            try:
                await ref
            except Exception as e:
                raise PeerFailed(actor, e) from e

        self._spawn(check())

    def _spawn(self, coro: Coroutine[Any, Any, None], actor: str = "queue") -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, actor))

    def _done(self, task: asyncio.Task[None], actor: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            err = task.exception()
            if err is not None:
                self._fail(err, actor)

    def _execute(self, commands: list[Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, Transitioned):
                now = time.time()
                for t in cmd.records:
                    if t.to_state in FINAL:
                        # a finished run is never launched again by this queue; resubmitting
                        # it (after a failure) hands a fresh payload over
                        self.payloads.pop(t.run_id, None)
                self._transitions.extend(
                    TransitionRecord(
                        run_id=t.run_id,
                        attempt=t.attempt,
                        from_state=t.from_state.value,
                        to_state=t.to_state.value,
                        at=now,
                        failure=t.failure.value if t.failure else None,
                        reason=t.reason,
                        pool=t.pool,
                    )
                    for t in cmd.records
                )
            elif isinstance(cmd, Submit):
                self._spawn(self._submit(cmd))
            elif isinstance(cmd, SolvePlacement):
                self._spawn(self._solve(cmd))
            elif isinstance(cmd, Reconcile):
                self._spawn(self._reconcile(cmd))
            elif isinstance(cmd, Cancel):
                self._send(
                    f"provider:{cmd.provider}", self.providers[cmd.provider].cancel, cmd.keys
                )
            elif isinstance(cmd, WakeAt):
                self.wake_at = min(self.wake_at, cmd.at)

    def _flush_transitions(self) -> None:
        """Send buffered transitions to the store (one call per tick or before an intent)."""
        buf, self._transitions = self._transitions, []
        for start in range(0, len(buf), TRANSITION_CHUNK):
            chunk = pack(buf[start : start + TRANSITION_CHUNK])
            self._send("store", self.store.apply_transitions, chunk)

    async def _solve(self, cmd: SolvePlacement) -> None:
        solution = unpack(
            await self._call("placement", self.placement.solve, pack(cmd.problem)),
            PlacementSolution,
        )
        self._remember(cmd.problem, solution)
        self._handle(PlacementDecided(solution=solution))

    def _remember(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        """Keep the solver's inputs and answer as one blob, and which assignment placed each
        run, so the submit that follows can record the decision with the attempt."""
        blob = pack((problem, solution))
        self._send("store", self.store.put_blob, blob)
        hw = {p.id: p.hardware_class for p in problem.pools}
        self._decisions[solution.request_id] = (solution, sha256_hex(blob), hw)
        while len(self._decisions) > 8:
            self._decisions.pop(next(iter(self._decisions)))
        members = {c.id: c.members for c in problem.classes}
        taken: dict[str, int] = {}
        for i, a in enumerate(solution.assignments):
            start = taken.get(a.class_id, 0)
            for run_id in members.get(a.class_id, [])[start : start + a.count]:
                self._placed[run_id] = (solution.request_id, i)
            taken[a.class_id] = start + a.count

    def _placement_records(self, cmd: Submit, items: list[SubmitItem]) -> list[PlacementRecord]:
        out = []
        now = time.time()
        for item in items:
            where = self._placed.pop(item.run_id, None)
            if where is None or where[0] not in self._decisions:
                continue
            solution, sha, hw = self._decisions[where[0]]
            a = solution.assignments[where[1]]
            if a.pool_id != cmd.pool:
                continue
            terms = solution.unit_terms[where[1]] if solution.unit_terms else {}
            out.append(
                PlacementRecord(
                    run_id=item.run_id,
                    attempt=item.attempt,
                    request_id=solution.request_id,
                    provider=cmd.provider,
                    pool=cmd.pool,
                    hardware_class=hw.get(cmd.pool, ""),
                    status=str(solution.status),
                    objective=solution.objective,
                    bound=solution.bound,
                    gap=solution.gap,
                    terms={**terms, "gpu_model_" + (a.gpu_model or "none"): 1.0},
                    problem=sha,
                    at=now,
                )
            )
        return out

    async def _reconcile(self, cmd: Reconcile) -> None:
        provider = self.providers[cmd.provider]
        reports = unpack(
            await self._call(f"provider:{cmd.provider}", provider.reconcile, cmd.keys),
            list[Report],
        )
        await self._on_reports(cmd.provider, reports)

    async def _submit(self, cmd: Submit) -> None:
        # the write-ahead intents reach the store after the transitions that led to them
        self._flush_transitions()
        # chunks bound the memory each actor holds at once for a 10^5-run submit
        for start in range(0, len(cmd.items), SUBMIT_CHUNK):
            await self._submit_chunk(cmd, cmd.items[start : start + SUBMIT_CHUNK])

    async def _submit_chunk(self, cmd: Submit, items: list[SubmitItem]) -> None:
        now = time.time()
        intents = [
            AttemptRecord(
                key=item.key,
                run_id=item.run_id,
                attempt=item.attempt,
                provider=cmd.provider,
                pool=cmd.pool,
                state="SUBMITTING",
                intent_at=now,
            )
            for item in items
        ]
        upstream = await self._upstream([item.run_id for item in items])
        launches = pack(
            [
                self._launch_spec(item.run_id, item.attempt, item.key, cmd.pool, upstream)
                for item in items
            ]
        )
        placements = self._placement_records(cmd, items)
        if placements:
            self._send("store", self.store.put_placements, pack(placements))
        # write-ahead: the intent is durable before the provider hears of the attempt
        await self._call("store", self.store.write_intents, pack(intents))
        del intents
        provider = self.providers[cmd.provider]
        reports = unpack(
            await self._call(f"provider:{cmd.provider}", provider.submit, launches), list[Report]
        )
        await self._on_reports(cmd.provider, reports)

    async def _upstream(self, run_ids: list[str]) -> dict[str, bytes]:
        """The ``upstream.json`` of each run that has dependencies: their params and outputs."""
        deps = {r: self.payloads[r].instance.depends_on for r in run_ids}
        wanted = sorted({d for ds in deps.values() for d in ds})
        if not wanted:
            return {}
        arts = unpack(await self._call("store", self.store.artifacts_for, wanted), Artifacts)
        runs = unpack(await self._call("store", self.store.get_runs, wanted), dict[str, RunRecord])
        out: dict[str, bytes] = {}
        for run_id, ds in deps.items():
            if not ds:
                continue
            entries = [
                {
                    "run_id": d,
                    "task": runs[d].task,
                    "index": runs[d].index,
                    "params": runs[d].params,
                    "outputs": {a.name: a.path for a in arts.get(d, [])},
                }
                for d in ds
                if d in runs
            ]
            entries.sort(key=lambda e: (str(e["task"]), int(str(e["index"]))))
            out[run_id] = json.dumps(entries, indent=1, sort_keys=True).encode()
        return out

    def _launch_spec(
        self, run_id: str, attempt: int, key: str, pool: str, upstream: dict[str, bytes]
    ) -> LaunchSpec:
        return launch_spec(self.payloads[run_id], run_id, attempt, key, pool, upstream.get(run_id))

    async def _on_reports(self, provider: str, reports: list[Report]) -> None:
        """Store the outputs of succeeded attempts, then record the attempts and tell the core.

        Outputs are stored (and the store has answered) before the core hears of the success,
        so a dependent is submitted only once the artifacts it reads exist; an attempt whose
        outputs were not all stored is reported FAILED instead (an infrastructure failure,
        retried by policy: the driver already refused outputs that were the task's fault).
        """
        if not reports:
            return
        runs = {r.key: self._run_of(r.key) for r in reports}
        outputs: dict[str, dict[str, str]] = {}
        for r in reports:
            run_id = runs[r.key]
            if r.state is ProviderState.SUCCEEDED and r.outputs and run_id is not None:
                outputs[run_id] = r.outputs
        if outputs:
            failed: dict[str, str] = await self._call("store", self.store.store_outputs, outputs)
            if failed:
                reports = [_not_stored(r, failed.get(runs[r.key] or "")) for r in reports]
        updates = []
        used: dict[str, bytes] = {}
        for r in reports:
            run_id = runs[r.key]
            if r.state is ProviderState.UNKNOWN or run_id is None:
                continue
            used_hash = None
            if r.used is not None:
                used_hash = sha256_hex(r.used)
                used[used_hash] = r.used
            updates.append(
                AttemptRecord(
                    key=r.key,
                    run_id=run_id,
                    attempt=self.core.attempt(run_id),
                    provider=provider,
                    pool=self.core.pool(run_id) or "",
                    state=r.state.value,
                    job_id=r.job_id,
                    node=r.node,
                    exit_code=r.exit_code,
                    failure=r.failure.value if r.failure else None,
                    message=r.message,
                    started_at=r.started_at,
                    ended_at=r.ended_at,
                    used=used_hash,
                )
            )
        if used:
            # before the updates that name them (calls to the store run in order)
            self._send("store", self.store.put_used, list(used.values()))
        if updates:
            self._send("store", self.store.update_attempts, pack(updates))
        self._handle(ProviderReported(provider=provider, reports=reports))

    def _run_of(self, key: str) -> str | None:
        return self.core.run_of_key(key)

    async def _tick_loop(self) -> None:
        """Flush transitions and feed due Ticks; an exception ends it as the queue's fatal
        error (recorded by ``_done``): a core that cannot handle a Tick would stall."""
        while self.fatal is None:
            await asyncio.sleep(self.tick)
            self._flush_transitions()
            now = time.time()
            if now >= self.wake_at:
                self.wake_at = float("inf")
                self._handle(Tick())
