"""The queue actor: the real-time adapter of the one command shell (``stowplan.shell``).

The ``SchedulerCore`` decides and ``CommandShell`` carries out its commands, line for line as in
the simulator; this actor only supplies the shell's four ports, in real time:

- clock: ``AsyncioClock`` on this actor's event loop;
- solver: the placement actor, which solves in its own process while the queue goes on;
- providers: ``RemoteProvider``, one per provider actor; planning happens there, at submit, so
  the shell's request carries the launch itself (``PlannedRemotely``). A ``ProviderError``
  comes back as itself (the shell submits the same keys again after a transient one), an
  unreachable provider actor as a transient ``ProviderError``, anything else is fatal;
- run records: ``StoreRecords``, the store actor. Steps (transitions) and provider answers are
  buffered, per run, and written in bulk (``provenance.store.runs``: arrays, not named fields,
  on the wire). Only the intents must be durable before the provider hears of an attempt: a
  submit's write-ahead record (``StoreActor.write_dispatch``) carries them with the solve that
  placed them (once per solve), and the submits of a large placement go out chunk by chunk,
  each as soon as its intents are durable. Every tick writes the answers with every buffered
  step of their runs, and the steps that must not wait (``StoreActor.update_attempts``, one
  transaction); a run whose buffered steps end in READY, PLACED or SUBMITTING waits, at most
  ``HOLD_S`` seconds, so a trial that ends at once costs one events row and one runs update
  (but a READY -> READY step, why a run is held, is written on the next tick). An answer
  is never written before the steps of its run; a restarted queue finds a run whose
  steps were not written by its intent (``StoreActor.load_active``) and reconciles it.

The provider actors watch their keys themselves (``observe_every=None``) and push reports to
``report``; they may push ``capacity_changed`` too, and the shell also rediscovers every
provider every 5 minutes.

Provider reports: the outputs of succeeded attempts are stored first (the records port waits
for the store's answer), an attempt whose outputs were not all stored becomes a FAILED one
(``node_failure``, retried by policy), then the attempts are recorded and the core hears of
them. So no run is SUCCEEDED without its artifacts, and no dependent starts before they exist.

Cost and budget: the attempts that ended on a priced elastic pool (an AWS instance type, any
pool discovered with a node shape, ``max_instances`` and a price) are billed by the store actor
(``StoreActor.record_costs``, the rule in ``providers.aws.prices``) at the pool's rate as last
discovered, before the core hears of them; then the store's spending (this month, this
experiment) is read back and given to the core (``SchedulerCore.set_spending``) with the
experiment's ``[policy] budget``, which the core checks before it launches anything. The
experiment is the newest one among the runs submitted (or restored at boot); spending is
also read again every ``SPENDING_EVERY`` seconds (a new month starts from nothing).

It keeps no state that the store does not also have: after a crash (``max_restarts``) it boots
again, from its constructor, from the store's active runs and reconciles with every provider
before dispatching anything new.

Failures: an exception from a peer actor's call, or from the queue's own handling, is recorded
once as ``fatal`` (which actor, the error in one line, the full text) and the queue stops
acting (the shell is halted); ``progress`` returns it and ``stowplan run`` ends with it. A peer
that is merely unreachable for a moment (``ActorUnavailableError``) is called again a few times
first (a provider actor: by the shell, with its backoff); a peer that died is restarted by Ray,
which retries the call itself.

NOTE: two races are left to the providers' idempotency and are harmless. A submit of a key in
flight when the core gives up on that key (a cancel, a new attempt) can still start a job: the
shell cancels every key a submit answer shows started that the core no longer waits on. And a
key cancelled after the core moved on may still be reported once by its provider actor's watch:
the core ignores reports of keys it no longer holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import msgspec

from stowplan.actors.runtime import error_detail, error_text, note_worker
from stowplan.actors.store import HOLD_S, ActiveState, Artifacts, lease_of
from stowplan.actors.wire import pack, tune_gc, unpack
from stowplan.errors import InternalError, ProviderError
from stowplan.placement.leases import DeviceLease, devices_text, lease_columns
from stowplan.placement.problem import (
    Dataset,
    PlacementContext,
    PlacementProblem,
    PlacementSolution,
    Pool,
)
from stowplan.provenance.records import AttemptRecord, RunRecord
from stowplan.provenance.store.runs import (
    AttemptRow,
    Dispatch,
    IntentRow,
    SolveRow,
    Step,
    StepBatch,
)
from stowplan.providers.aws.prices import Rate, pool_rate
from stowplan.providers.base import (
    Capabilities,
    Facts,
    LaunchSpec,
    ProviderRequest,
    ProviderState,
    Report,
    request_name,
)
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    ApprovalDecided,
    CancelRequested,
    Event,
    RestoredTask,
    SubmitItem,
    TaskInstance,
    TasksRestored,
    TasksSubmitted,
    Tick,
    Transition,
)
from stowplan.scheduler.plan import Launch, RunPayload
from stowplan.scheduler.retry import REPLACED
from stowplan.scheduler.share import Approvals, TeamLimits
from stowplan.scheduler.states import FINAL, LEASED, TaskState
from stowplan.session import launch_spec, payload_of
from stowplan.shell import AsyncioClock, CommandShell, ShellConfig
from stowplan.spec.canonical import sha256_hex
from stowplan.spec.models import FailureClass, SpendBudget

log = logging.getLogger(__name__)

REPLACED_FAILURES = frozenset(f.value for f in REPLACED)
"""the stored failures of attempts that never ran (``AttemptRecord.failure``)."""

SUBMIT_CHUNK = 10_000
TRANSITION_CHUNK = 200_000
CHUNKS_AHEAD = 2
"""Submit chunks prepared while the one before is written ahead: enough to keep the store busy."""
WAITING_STATES = frozenset({TaskState.READY, TaskState.PLACED, TaskState.SUBMITTING})
"""A run whose buffered steps all end in these may wait (module doc: run records)."""
UNAVAILABLE_RETRIES = 5
"""Calls to a peer that is unreachable for a moment are retried this often, backing off."""
REDISCOVER_EVERY = 300.0
"""seconds between the shell's periodic rediscoveries of every provider"""
SPENDING_EVERY = 300.0
"""seconds between reads of what was spent, when no cost was recorded meanwhile"""


def assignment_of(problem: PlacementProblem, solution: PlacementSolution) -> dict[str, int]:
    """run id -> the index of the assignment of ``solution`` that placed it (a class's
    members are placed in order, assignment by assignment)."""
    members = {c.id: c.members for c in problem.classes}
    taken: dict[str, int] = {}
    out: dict[str, int] = {}
    for i, a in enumerate(solution.assignments):
        start = taken.get(a.class_id, 0)
        for run_id in members.get(a.class_id, [])[start : start + a.count]:
            out[run_id] = i
        taken[a.class_id] = start + a.count
    return out


def solve_row(solution: PlacementSolution, sha: str, hw: dict[str, str]) -> SolveRow:
    """What every run ``solution`` placed shares, for the intents that name it: ``sha`` is
    the hash of the stored blob of (problem, solution), ``hw`` each pool's hardware class."""
    assignments = []
    for i, a in enumerate(solution.assignments):
        terms = dict(solution.unit_terms[i]) if solution.unit_terms else {}
        terms["gpu_model_" + (a.gpu_model or "none")] = 1.0
        assignments.append((hw.get(a.pool_id, ""), terms))
    return SolveRow(
        problem=sha,
        request_id=solution.request_id,
        status=str(solution.status),
        objective=solution.objective,
        bound=solution.bound,
        gap=solution.gap,
        assignments=assignments,
    )


class SubmittedRun(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A ``RunPayload`` as ``submit`` decodes it: the core's part now, the launch left encoded
    (a slice of the submitted bytes) until an attempt of the run is launched, so a submission
    of 10^5 runs reaches the core sooner; the same fields as ``RunPayload``."""

    instance: TaskInstance
    launch: msgspec.Raw
    name: str

    @property
    def run_id(self) -> str:
        return self.instance.run_id

    def payload(self) -> RunPayload:
        return RunPayload(
            instance=self.instance, launch=unpack(self.launch, Launch), name=self.name
        )


def compact(runs: list[SubmittedRun]) -> list[SubmittedRun]:
    """``runs`` as decoded from one submission, made to hold less while they wait (in place).

    A decoded run has its own copy of what a sweep's runs share (its project and group, its
    retry policy: about 0.3 KiB), and its launch is a view that keeps the whole submission's
    buffer alive (about 0.6 KiB per run) until the last of them ends. Equal values become one
    shared object, and each launch is copied out of the buffer (0.1 KiB), which is freed: 0.8
    KiB less per run, 80 MiB for a sweep of 10^5, for about 1 us per run."""
    shared: dict[Any, Any] = {}
    fields = msgspec.structs.force_setattr  # frozen: equal values, so nothing else changes
    for run in runs:
        t = run.instance
        fields(t, "project", shared.setdefault(t.project, t.project))
        fields(t, "group", shared.setdefault(t.group, t.group))
        fields(t, "retry", shared.setdefault(pack(t.retry), t.retry))
        fields(run, "launch", run.launch.copy())
    return runs


Submitted = tuple[dict[str, tuple[str, int]], str | None, SpendBudget | None]
"""``StoreActor.submitted``'s answer."""


class PeerFailed(Exception):
    """A call to another actor of the control plane raised; names which actor."""

    def __init__(self, actor: str, err: BaseException) -> None:
        self.actor = actor
        self.text = error_text(err)
        self.detail = error_detail(err)
        super().__init__(f"{actor}: {self.text}")


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


class PlannedRemotely(ProviderRequest, frozen=True, kw_only=True):
    """The shell's request for attempts whose provider plans in its own actor, at submit, with
    the facts of its own last discovery (the ones the shell was given)."""

    launches: list[LaunchSpec]

    def render(self) -> str:
        return f"# {len(self.keys)} attempts: planned by their provider actor when submitted"


class RemoteProvider:
    """The shell's provider port for one provider actor (``ProviderPort``)."""

    def __init__(self, queue: QueueActor, name: str) -> None:
        self.queue = queue
        self.name = name
        self.actor = f"provider:{name}"
        self._caps: Capabilities | None = None

    @property
    def capabilities(self) -> Capabilities:
        """The driver's, as its actor told them at the first discovery (none before)."""
        return self._caps if self._caps is not None else Capabilities()

    async def _ask(self, method: str, *args: Any, patient: bool = False) -> Any:
        """Call the provider actor. Its ``ProviderError`` is raised as it is; an unreachable
        actor is a transient ``ProviderError`` (asked again ``UNAVAILABLE_RETRIES`` times
        first when ``patient``); anything else is the actor's failure (``PeerFailed``)."""
        import ray

        handle = getattr(self.queue.provider_actors[self.name], method)
        delay = 0.2
        for attempt in range(UNAVAILABLE_RETRIES + 1):
            try:
                return await handle.remote(*args)
            except ray.exceptions.ActorUnavailableError as e:
                if patient and attempt < UNAVAILABLE_RETRIES:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                raise ProviderError(
                    f"the provider actor is unreachable: {error_text(e)}",
                    provider=self.name,
                    retryable=True,
                ) from e
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, ProviderError):
                    raise e.cause from None
                raise PeerFailed(self.actor, e) from e
            except Exception as e:
                raise PeerFailed(self.actor, e) from e
        raise AssertionError("unreachable")

    async def discover(self) -> list[Pool]:
        pools: list[Pool] = unpack(await self._ask("discover", patient=True), list[Pool])
        self.queue._note_rates(self.name, pools)
        if self._caps is None:
            caps = await self._ask("capabilities", patient=True)
            self._caps = unpack(caps, Capabilities)
        return pools

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        keys = tuple(la.key for la in launches)
        return [
            PlannedRemotely(keys=keys, name=request_name(keys, "remote"), launches=list(launches))
        ]

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        launches = []
        for r in requests:
            if not isinstance(r, PlannedRemotely):
                raise InternalError(f"{type(r).__name__} submitted to a provider actor")
            launches.extend(r.launches)
        reports: list[Report] = unpack(await self._ask("submit", pack(launches)), list[Report])
        return reports

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        # reconcile, not a bare describe: the actor watches the live keys from then on
        reports: list[Report] = unpack(await self._ask("reconcile", list(keys)), list[Report])
        return reports

    async def cancel(self, keys: Sequence[str]) -> None:
        await self._ask("cancel", list(keys))

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        instances: list[str] = await self._ask("provision", pool, count, token)
        return instances

    async def terminate(self, pool: str, count: int, token: str) -> None:
        await self._ask("terminate", pool, count, token)


class RemoteSolver:
    """The shell's solver port: the placement actor."""

    def __init__(self, queue: QueueActor) -> None:
        self.queue = queue

    async def solve(self, problem: PlacementProblem) -> PlacementSolution:
        q = self.queue
        answer = await q._call("placement", q.placement.solve, pack(problem))
        solution: PlacementSolution = unpack(answer, PlacementSolution)
        return solution


class StoreRecords:
    """The shell's run records port: the store actor, through the queue's buffers."""

    def __init__(self, queue: QueueActor) -> None:
        self.queue = queue

    def transitions(self, records: list[Transition], at: float) -> None:
        q = self.queue
        q._changed()
        q._buffered.set()
        buf, due, payloads = q._steps, q._due, q.payloads
        if not buf:
            q._held_since = at
        for t in records:
            run_id, to = t.run_id, t.to_state
            # states are StrEnums: each is its own value, on the wire and in SQLite
            step = Step(run_id, t.attempt, t.from_state, to, at, t.failure, t.reason, t.pool)
            steps = buf.get(run_id)
            if steps is None:
                buf[run_id] = [step]
            else:
                steps.append(step)
            if to not in WAITING_STATES or t.from_state == to:
                # a READY -> READY step is why a run is held (a quota, a budget): people wait
                # on it and read it in ``status``, so it is not held back with the others
                due.add(run_id)
                if to in FINAL:
                    # a finished run is never launched again by this queue; resubmitting it
                    # (after a failure) hands a fresh payload over
                    payloads.pop(run_id, None)

    def decided(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        self.queue._remember(problem, solution)

    async def launches(
        self, provider: str, pool: str, items: Sequence[SubmitItem]
    ) -> list[LaunchSpec]:
        del provider
        q = self.queue
        # a chunk's launches are made only when it is next to be written ahead (``intend``
        # lets the next one go): a placement of 10^5 runs does not hold 10^5 of them at once
        await q._chunks.acquire()
        try:
            upstream = await q._upstream([it.run_id for it in items])
            return [
                q._launch_spec(it.run_id, it.attempt, it.key, pool, upstream, it.lease)
                for it in items
            ]
        except BaseException:
            q._chunks.release()
            raise

    async def intend(self, provider: str, pool: str, items: Sequence[SubmitItem]) -> None:
        q = self.queue
        now = q.shell.clock.now()
        # only the intents (and the solves that placed them) must be durable before the
        # submit: the steps that led to them wait, and a restarted queue finds such a run
        # by its intent (``StoreActor.load_active``). Answers buffered so far go first, with
        # their runs' steps, as on every write of answers.
        solves, intents = q._intents(pool, items)
        attempts, steps = q._take_answers()
        dispatch = Dispatch(
            provider=provider,
            pool=pool,
            at=now,
            attempts=attempts,
            steps=steps,
            solves=solves,
            intents=intents,
        )
        try:
            # write-ahead: the intent is durable before the provider hears of the attempt
            await q._call("store", q.store.write_dispatch, pack(dispatch))
        finally:
            q._chunks.release()

    def reported(self, provider: str, reports: list[Report]) -> Awaitable[list[Report]]:
        # the core hears of a success only once its outputs are stored (``_on_reports``)
        return self.queue._on_reports(provider, reports)


def session_epoch(owner: tuple[int, float]) -> str:
    """The epoch of a control-plane session's elastic tokens. ``owner`` is the process that
    started the session, the same across a restart of the queue actor: a restarted queue
    repeats the tokens of a provision in flight, and a new session never reuses an old one's."""
    return f"{owner[0]}-{owner[1]:.6f}"


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
        teams: bytes | None = None,
        approvals: bytes | None = None,
        state_dir: str | None = None,
        owner: tuple[int, float] | None = None,
    ) -> None:
        note_worker(state_dir, "queue", owner)
        tune_gc()
        self.namespace = namespace
        self.store_name = store_name
        self.placement_name = placement_name
        self.provider_names = providers
        ctx = unpack(context, PlacementContext) if context else PlacementContext()
        epoch = session_epoch(owner) if owner is not None else namespace
        limits = unpack(teams, dict[str, TeamLimits]) if teams else {}
        self.core = SchedulerCore(
            CoreConfig(
                lease_ttl=lease_ttl,
                seed=seed,
                context=ctx,
                token_epoch=epoch,
                teams=limits,
                approvals=unpack(approvals, Approvals) if approvals else None,
            )
        )
        self.payloads: dict[str, RunPayload | SubmittedRun] = {}
        self._dataset_ids = {d.id for d in ctx.datasets}
        """datasets the core knows: its context's, and those handed it since."""
        self.tick = tick
        self._boot_lock = asyncio.Lock()
        self._booted = False
        self.errors: list[str] = []
        self.boots = 0
        self._steps: dict[str, list[Step]] = {}
        """per run, its steps not yet sent to the store, in order."""
        self._due: set[str] = set()
        """runs among ``_steps`` with a step that the next tick writes (module doc)."""
        self._held_since: float | None = None
        """when ``_steps`` last became non-empty (nothing waits longer than ``HOLD_S``)."""
        self._attempts: list[AttemptRow] = []
        """provider answers not yet sent to the store, in order."""
        self._buffered = asyncio.Event()
        """set when steps or answers are buffered: the tick loop sleeps on it when idle."""
        self._change = asyncio.Event()
        """set (and replaced) when a run moves or the queue fails: ``progress`` waits on it."""
        self._decisions: dict[int, tuple[PlacementSolution, str, dict[str, str]]] = {}
        self._solve_rows: dict[int, SolveRow] = {}
        self._chunks = asyncio.Semaphore(CHUNKS_AHEAD)
        """submit chunks between their launches and their durable intents (``launches``)."""
        self._placed: dict[str, tuple[int, int]] = {}
        self._rates: dict[str, dict[str, Rate]] = {}
        """provider -> its priced elastic pools' rates as last discovered (never dropped: an
        attempt may end on a pool the last discovery left out)."""
        self._experiment: str | None = None
        self._budget: SpendBudget | None = None
        self._spending_at = 0.0
        self.fatal: dict[str, str] | None = None
        # an async actor's constructor runs on its event loop, which the clock takes
        self.clock = AsyncioClock(self._fail)
        self.shell = CommandShell(
            self.core,
            clock=self.clock,
            solver=RemoteSolver(self),
            providers={n: RemoteProvider(self, n) for n in sorted(providers)},
            records=StoreRecords(self),
            config=ShellConfig(
                seed=seed,
                # the provider actors watch their keys and renew the leases themselves
                observe_every=None,
                rediscover_every=REDISCOVER_EVERY,
                submit_chunk=SUBMIT_CHUNK,
            ),
        )
        # a restarted queue resumes at once (reconciling with the providers), not when
        # someone next calls it
        self.clock.spawn(self._ensure())

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
        self.shell.halt()
        if self.fatal is None:
            self.fatal = {"actor": actor, "error": text, "detail": detail}
            self.errors.append(f"{actor}: {text}")
        self._changed()
        self._buffered.set()  # the tick loop ends

    def _changed(self) -> None:
        """Wake every ``progress`` call waiting for a change."""
        self._change.set()
        self._change = asyncio.Event()

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
        self.provider_actors: dict[str, Any] = {
            n: ray.get_actor(a, namespace=self.namespace) for n, a in self.provider_names.items()
        }
        await self.shell.discover()
        runs: list[RunRecord]
        attempts: dict[str, list[AttemptRecord]]
        done: list[str]
        runs, attempts, done = unpack(
            await self._call("store", self.store.load_active), ActiveState
        )
        restored: list[RestoredTask] = []
        # runs someone approved before the restart do not ask again (the ledger says who)
        waiting = [r.run_id for r in runs if TaskState(r.state) not in LEASED]
        approved = (
            set(await self._call("store", self.store.approved, waiting)) if waiting else set()
        )
        for rec in runs:
            payload = payload_of(rec)
            self.payloads[rec.run_id] = payload
            state = TaskState(rec.state)
            current = next(
                (a for a in attempts.get(rec.run_id, []) if a.attempt == rec.attempts), None
            )
            # attempts that never ran (no capacity) do not count against the retry policy
            uncounted = sum(
                1 for a in attempts.get(rec.run_id, []) if a.failure in REPLACED_FAILURES
            )
            if state in LEASED and current is not None:
                restored.append(
                    RestoredTask(
                        task=payload.instance,
                        state=state,
                        attempt=current.attempt,
                        provider=current.provider,
                        pool=current.pool,
                        key=current.key,
                        uncounted=uncounted,
                        lease=lease_of(current),
                    )
                )
            else:
                # no intent was written for the last attempt, so it was never submitted
                restored.append(
                    RestoredTask(
                        task=payload.instance,
                        state=TaskState.PENDING,
                        attempt=rec.attempts,
                        approved=rec.run_id in approved,
                        uncounted=uncounted,
                    )
                )
        if runs:
            await self._budget_of([r.run_id for r in runs])
        datasets = await self._datasets_for([rt.task for rt in restored])
        self._handle(TasksRestored(tasks=restored, completed=done, datasets=datasets))
        self.shell.start()
        self.clock.spawn(self._tick_loop())

    # ---- API for the control plane and the provider actors --------------------------------

    async def submit(self, runs: bytes, completed: list[str]) -> dict[str, int]:
        """Add runs (``list[RunPayload]``, already recorded in the store).

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
        items = compact(unpack(runs, list[SubmittedRun]))
        fresh: list[TaskInstance] = []
        again: list[RestoredTask] = []
        known = set(self.core.run_ids())
        items = [i for i in items if i.run_id not in known]
        # the store, not the caller's earlier read, says what already ran: a control plane
        # that died a moment ago may have recorded more since
        so_far: dict[str, tuple[str, int]] = {}
        if items:
            answer = await self._call("store", self.store.submitted, [i.run_id for i in items])
            so_far, experiment, budget = unpack(answer, Submitted)
            if experiment is not None:  # its budget, and what was spent
                self._experiment, self._budget = experiment, budget
                await self._refresh_spending()
        completed = list(completed)
        for item in items:
            state, attempts = so_far.get(item.run_id, ("PENDING", 0))
            if state == "SUCCEEDED":
                completed.append(item.run_id)
                continue
            self.payloads[item.run_id] = item
            if attempts > 0:
                again.append(
                    RestoredTask(task=item.instance, state=TaskState.PENDING, attempt=attempts)
                )
            else:
                fresh.append(item.instance)
        datasets = await self._datasets_for([*fresh, *(rt.task for rt in again)])
        if again:
            self._handle(TasksRestored(tasks=again, completed=completed, datasets=datasets))
        self._handle(TasksSubmitted(tasks=fresh, completed=completed, datasets=datasets))
        return {"new": len(fresh), "resumed": len(again)}

    async def report(self, provider: str, reports: bytes) -> None:
        """A provider's state changes, delivered to the shell with the others of this instant.
        A failure here is the queue's, recorded as fatal, not raised into the provider's watch
        loop."""
        try:
            await self._ensure()
            shell = self.shell
            for r in unpack(reports, list[Report]):
                shell.report(provider, r)
        except Exception as e:
            self._fail(e)

    async def capacity_changed(self, provider: str) -> None:
        """A provider's pools changed (a node lost or back): it is rediscovered at once."""
        try:
            await self._ensure()
            self.shell.capacity_changed(provider)
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

    async def set_team_spending(self, spent: dict[str, float]) -> None:
        """Each team's recorded cloud spend this month (``SchedulerCore.set_team_spending``);
        runs held for it are placed again when it leaves room."""
        try:
            await self._ensure()
            self.core.set_team_spending(spent)
            self._handle(Tick())
        except Exception as e:
            self._fail(e)
            raise

    async def decide(self, run_ids: list[str], approve: bool, reason: str) -> int:
        """Approve or reject runs waiting in AWAITING_APPROVAL (``ApprovalDecided``); how many
        of ``run_ids`` were waiting."""
        try:
            await self._ensure()
            waiting = sum(1 for r in run_ids if self._state(r) is TaskState.AWAITING_APPROVAL)
            self._handle(ApprovalDecided(run_ids=run_ids, approve=approve, reason=reason))
            return waiting
        except Exception as e:
            self._fail(e)
            raise

    async def sharing(self) -> dict[str, Any]:
        """Each limited team's use against its limits (``SchedulerCore.sharing``), for
        ``stowplan quota`` and the dashboard."""
        await self._ensure()
        return self.core.sharing()

    async def progress(
        self,
        run_ids: list[str] | None = None,
        since: dict[str, int] | None = None,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """Counts by state; runs the core no longer holds (finished before a restart) are
        looked up in the store. ``fatal`` is the error that stopped the control plane.

        With ``since`` (the counts a caller last saw) and ``wait``: the answer waits, at most
        ``wait`` seconds, until the counts differ from ``since``, or an error comes, so a
        caller following a sweep is answered when something changes instead of polling."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        errors = len(self.errors)
        while True:
            change = self._change  # set by any change from here on
            if self.fatal is not None:
                break
            try:
                info = await self._progress(run_ids)
            except Exception as e:
                self._fail(e)
                break
            left = deadline - loop.time()
            if since is None or info["counts"] != since or len(self.errors) > errors or left <= 0:
                return info
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), left)
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

    # ---- the shell's ports, on this actor's state ---------------------------------------------

    def _final(self, run_id: str) -> bool:
        return self._state(run_id) in FINAL

    def _state(self, run_id: str) -> TaskState | None:
        try:
            return self.core.state(run_id)
        except KeyError:
            return None

    def _handle(self, event: Event) -> None:
        if self.fatal is not None:
            return  # a failed control plane acts no more; the next run resumes from the store
        self.shell.feed(event)

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

        self.clock.spawn(check())

    def _flush_transitions(self, *, due_only: bool = False) -> None:
        """Send buffered provider answers and steps to the store, every run's (before a read,
        a cost, a drain) or, with ``due_only`` (each tick), those that must not wait."""
        buf = self._steps
        held = self._held_since
        if due_only and held is not None and self.clock.now() - held >= HOLD_S:
            due_only = False  # nothing waits longer than HOLD_S
        if due_only:
            runs: Any = self._due
            self._due = set()
        else:
            runs, self._steps, self._due = list(buf), {}, set()
        steps: list[Step] = []
        for run_id in runs:
            mine = buf.pop(run_id, None) if due_only else buf[run_id]
            if mine is not None:
                steps.extend(mine)
        if not self._steps:
            self._held_since = None
        attempts, self._attempts = self._attempts, []
        for start in range(0, max(len(steps), 1), TRANSITION_CHUNK):
            part = steps[start : start + TRANSITION_CHUNK]
            if part or attempts:
                batch = pack(StepBatch(attempts=attempts, steps=part))
                self._send("store", self.store.update_attempts, batch)
                attempts = []

    def _remember(self, problem: PlacementProblem, solution: PlacementSolution) -> None:
        """Keep the solver's inputs and answer as one blob, and which assignment placed each
        run, so the submit that follows can record the decision with the attempt."""
        blob = pack((problem, solution))
        self._send("store", self.store.put_blob, blob)
        hw = {p.id: p.hardware_class for p in problem.pools}
        self._decisions[solution.request_id] = (solution, sha256_hex(blob), hw)
        while len(self._decisions) > 8:
            self._decisions.pop(next(iter(self._decisions)))
        for run_id, i in assignment_of(problem, solution).items():
            self._placed[run_id] = (solution.request_id, i)

    def _take_answers(self) -> tuple[list[AttemptRow], list[Step]]:
        """The buffered provider answers, and every buffered step of their runs: an answer
        is never written before the steps that led to its attempt."""
        attempts, self._attempts = self._attempts, []
        buf, due = self._steps, self._due
        steps: list[Step] = []
        for a in attempts:
            mine = buf.pop(a.run_id, None)
            if mine is not None:
                steps.extend(mine)
                due.discard(a.run_id)
        if not buf:
            self._held_since = None
        return attempts, steps

    def _intents(
        self, pool: str, items: Sequence[SubmitItem]
    ) -> tuple[list[SolveRow], list[IntentRow]]:
        """The intents of ``items``, each naming the solve (and its assignment) that placed
        it on ``pool`` when that decision is remembered, and those solves."""
        solves: list[SolveRow] = []
        index: dict[int, int] = {}
        placed, decisions = self._placed, self._decisions
        out = []
        for item in items:
            # the lease (node and devices) is recorded with the intent, before the submit
            lease = item.lease
            where_to = (None, None) if lease is None else lease_columns(lease)
            where = placed.pop(item.run_id, None)
            if where is not None and where[0] in decisions:
                request, i = where
                solution, sha, hw = decisions[request]
                if solution.assignments[i].pool_id == pool:
                    s = index.get(request)
                    if s is None:
                        s = index[request] = len(solves)
                        solves.append(self._solve_row(solution, sha, hw))
                    out.append(IntentRow(item.key, item.run_id, item.attempt, s, i, *where_to))
                    continue
            out.append(IntentRow(item.key, item.run_id, item.attempt, -1, 0, *where_to))
        return solves, out

    def _solve_row(self, solution: PlacementSolution, sha: str, hw: dict[str, str]) -> SolveRow:
        """``solve_row``, made once per solve."""
        row = self._solve_rows.get(solution.request_id)
        if row is None or row.problem != sha:
            row = self._solve_rows[solution.request_id] = solve_row(solution, sha, hw)
            while len(self._solve_rows) > 8:
                self._solve_rows.pop(next(iter(self._solve_rows)))
        return row

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
        self,
        run_id: str,
        attempt: int,
        key: str,
        pool: str,
        upstream: dict[str, bytes],
        lease: DeviceLease | None = None,
    ) -> LaunchSpec:
        payload = self.payloads[run_id]
        if isinstance(payload, SubmittedRun):  # decoded for each launch: kept encoded
            payload = payload.payload()
        return launch_spec(payload, run_id, attempt, key, pool, upstream.get(run_id), lease)

    async def _on_reports(self, provider: str, reports: list[Report]) -> list[Report]:
        """Store the outputs of succeeded attempts, then record the attempts; returns the
        reports the core is to hear.

        Outputs are stored (and the store has answered) before the core hears of the success,
        so a dependent is submitted only once the artifacts it reads exist; an attempt whose
        outputs were not all stored is reported FAILED instead (an infrastructure failure,
        retried by policy: the driver already refused outputs that were the task's fault).
        """
        if not reports:
            return reports
        # run id, attempt and pool of each key, in one lookup per report
        of_key = self.core.attempt_of_key
        runs = {r.key: of_key(r.key) for r in reports}
        outputs: dict[str, dict[str, str]] = {}
        for r in reports:
            run = runs[r.key]
            if r.state is ProviderState.SUCCEEDED and r.outputs and run is not None:
                outputs[run[0]] = r.outputs
        if outputs:
            failed: dict[str, str] = await self._call("store", self.store.store_outputs, outputs)
            if failed:
                reports = [
                    _not_stored(r, failed.get(run[0])) if (run := runs[r.key]) else r
                    for r in reports
                ]
        updates = []
        used: dict[str, bytes] = {}
        for r in reports:
            run = runs[r.key]
            if r.state is ProviderState.UNKNOWN or run is None:
                continue
            run_id, attempt, pool = run
            used_hash = None
            if r.used is not None:
                used_hash = sha256_hex(r.used)
                used[used_hash] = r.used
            updates.append(
                AttemptRow(
                    r.key,
                    run_id,
                    attempt,
                    provider,
                    pool or "",
                    r.state,  # a StrEnum: its own value
                    r.job_id,
                    r.node,
                    r.exit_code,
                    r.failure,
                    r.message,
                    0.0,
                    r.started_at,
                    r.ended_at,
                    used_hash,
                    devices=devices_text(r.devices),
                )
            )
        if used:
            # before the updates that name them (calls to the store run in order)
            self._send("store", self.store.put_used, list(used.values()))
        # written with the next tick's steps, and with those of their own runs
        self._attempts.extend(updates)
        self._due.update(u.run_id for u in updates)
        self._buffered.set()
        rates = self._rates.get(provider)
        ended = [u.key for u in updates if u.ended_at is not None and rates and u.pool in rates]
        if ended and rates:
            # after the updates (calls to the store run in order), before the core hears
            self._flush_transitions()
            await self._call("store", self.store.record_costs, provider, ended, pack(rates))
            await self._refresh_spending()
        return reports

    def _note_rates(self, provider: str, pools: list[Pool]) -> None:
        known = self._rates.setdefault(provider, {})
        for pool in pools:
            rate = pool_rate(pool)
            if rate is not None:
                known[pool.id] = rate

    async def _datasets_for(self, tasks: list[TaskInstance]) -> list[Dataset]:
        """The inputs of ``tasks`` that this queue has not handed the core yet, from their
        experiments' stored specs (``StoreActor.datasets_of``): one run asked for per unknown
        dataset, so a sweep of 10^5 runs over one input costs one lookup."""
        ask: dict[str, str] = {}
        for t in tasks:
            for d in t.datasets:
                if d not in self._dataset_ids and d not in ask:
                    ask[d] = t.run_id
        if not ask:
            return []
        answer = await self._call("store", self.store.datasets_of, sorted(set(ask.values())))
        found: list[Dataset] = unpack(answer, list[Dataset])
        self._dataset_ids.update(d.id for d in found)
        return found

    async def _budget_of(self, run_ids: list[str]) -> None:
        """Take the budget of the newest experiment among ``run_ids``, and what was spent."""
        answer = await self._call("store", self.store.budget_of, run_ids)
        experiment, budget = unpack(answer, tuple[str | None, SpendBudget | None])
        if experiment is None:
            return
        self._experiment, self._budget = experiment, budget
        await self._refresh_spending()

    async def _refresh_spending(self) -> None:
        """Give the core what the store recorded as spent, with the budget."""
        self._flush_transitions()
        now = self.clock.now()
        month, experiment = await self._call("store", self.store.spending, self._experiment, now)
        self._spending_at = now
        self.core.set_spending(
            month_usd=float(month), experiment_usd=float(experiment), budget=self._budget
        )

    async def _tick_loop(self) -> None:
        """Send the buffered transitions to the store once per tick (the shell's clock does
        every other waiting). With nothing buffered it sleeps until something is (or the next
        read of the spending is due): an idle queue wakes nobody while a sweep runs, which on
        a small machine shares the cores with the cluster's own daemons."""
        while self.fatal is None:
            await asyncio.sleep(self.tick)
            self._buffered.clear()  # set again by whatever is buffered from here on
            self._flush_transitions(due_only=True)
            if self._budget is not None and self.clock.now() >= (
                self._spending_at + SPENDING_EVERY
            ):
                try:
                    await self._refresh_spending()
                    self._handle(Tick())  # more room may let held runs go
                except Exception as e:
                    self._fail(e)
            if self._steps or self._attempts or self.fatal is not None:
                continue  # held steps: written within HOLD_S, on a later tick
            idle = None
            if self._budget is not None:
                idle = max(0.0, self._spending_at + SPENDING_EVERY - self.clock.now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._buffered.wait(), idle)
