"""The local driver: attempts run as processes on this machine, the embedded default.

Each started attempt is supervised by its own launcher process (``launcher.py``) in a new
session, so attempts outlive a crashed control plane; everything this driver knows is on disk
(see ``attempts.py`` for the layout), and a fresh instance over the same ``state_dir``
describes what an earlier one started.

Idempotency: the key index is written first, then the attempt directory is claimed with
``os.mkdir``. A submit that finds the directory claimed starts nothing and reports what is
there. A crash between the two leaves an index entry without a directory: ``UNKNOWN``, and a
retried submit claims it normally. The claimer records itself (pid and start time) in
``spec.json``; starting an attempt creates ``launcher.log`` exclusively first, so of all the
instances that may hold an attempt queued, exactly one starts it.

Concurrency: the driver counts the CPUs, memory and GPUs of the attempts it started (and of
running attempts an earlier instance started, once described) against the configured
capacity. Requests that do not fit wait in a FIFO, reported ``QUEUED``, and are started in
order as capacity frees; the queue is pumped on ``submit()``, ``describe()`` and ``cancel()``.
There is no backfilling: a large request at the head is not overtaken by small ones. A request
larger than the whole machine is started when nothing else of ours runs, so it is never stuck
forever; it may then be slow, or be killed by its own memory limit. The queue lives in memory;
an instance asked about an attempt that another process claimed and never started takes it
into its own queue once that process is dead (a killed provider actor's successor starts what
it had queued), and reports it ``QUEUED`` while that process lives. A start the dead process
had begun is made again once no launcher of that attempt runs (after ``START_GRACE_S``). A
claim whose claimer is unknown (this process, or none recorded) is ``QUEUED`` for
``QUEUED_GRACE_S``, then ``FAILED``/``LOST``, and the control plane retries it under a new key.

Starting: an attempt is started by the long-lived supervisor of this ``runs/`` directory
(``supervisor.py``), which forks a keeper for it: no Python start-up per attempt, and the same
records, process group, limits and survival of a dead control plane as the per-attempt
launcher. The supervisor tells this driver at once when a keeper ends, and the queue is pumped
then too, so capacity is reused without waiting for a describe; a watch woken so describes
the keys that ended and those started since (``_changed``), and every key it follows only
at the poll's cadence (a sweep keeps tens queued here: 70 keys cost about 1.6 ms a
describe, once every few milliseconds when each end woke a describe of all). A supervisor
that died is started again by the next start, or at once when this driver's connection to it
breaks; the starts it had not recorded yet are sent again (its keeper lock makes that safe).
Where no supervisor can run (not Linux) or be reached, each attempt gets its own launcher as
before.

Handing ahead: when the queue's head does not fit, it is handed to the supervisor to start
the moment one of this driver's running attempts ends (its task and all it spawned gone),
behind the shortest line of at most ``HAND_AHEAD``, and only where it asks no more than the one
before it. It holds no capacity of its own until that one ends, then takes its place
(``Started.after``), so the count stays exact and a short trial's successor starts without a
round trip through this driver. Until started it is reported ``QUEUED`` and is cancelled as a
queued one (``exit.json`` first: the supervisor then starts nothing and goes on down the line).
The supervisor forgets what was handed ahead when this driver goes away or it dies itself;
the driver then starts those plainly once their predecessor is seen to end, and an instance
taking a dead driver's attempts over finds them unstarted (they are not ``begin_start``-ed).

Off the event loop: every async method does its file and process I/O (claims, ``spec.json``
and ``exit.json``, ``Popen`` of launchers, psutil) in one worker thread per call, whatever the
number of keys. The in-memory state (queue, started, caches) is touched only there, by one call
at a time (``_lock``, and ``_state_lock`` shared with the supervisor connection's reader
thread), so calls may interleave on the loop as before without racing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import anyio
import msgspec
import psutil

from stowplan.errors import InternalError, ProviderError
from stowplan.placement.leases import PoolDevices
from stowplan.placement.problem import Pool
from stowplan.provenance.nvidia import capture_gpus
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
    WatchSet,
)
from stowplan.providers.importhook import USED_FILE
from stowplan.providers.launcher import LAUNCHER_LOG, STDERR_FILE, STDOUT_FILE, scan_outputs
from stowplan.providers.local.attempts import (
    _IMPORT_ROOT,
    KeyIndex,
    LauncherRecord,
    begin_start,
    claim,
    current_claim,
    declared_needs,
    declared_outputs,
    has_ended,
    read_exit,
    read_launcher,
    same_process,
    start_launcher,
    stderr_tail,
    take_over,
    write_exit,
)
from stowplan.providers.local.capacity import Capacity, Started, local_devices
from stowplan.providers.local.exits import STDERR_TAIL_CHARS, classify_exit, tail_text
from stowplan.providers.local.render import LocalRequest, plan_one
from stowplan.providers.local.supervisor import SupervisorClient, supported
from stowplan.spec.models import FailureClass, LocalProviderConfig

QUEUED_GRACE_S = 30.0
"""A claimed attempt without a launcher is still starting for this long, then it is LOST."""
LOG_POLL_S = 0.2
WAKE_GATHER_S = 0.005
"""A watch woken by an attempt's end waits this long for more ends to report together."""
LOG_READ_BYTES = 1 << 20
"""Read at most this much of a log per trip to the worker thread."""

_T = TypeVar("_T")


async def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on the event loop's default executor, and wait for it even when cancelled.

    Not ``anyio.to_thread``: its worker threads are not daemons and stop only when the loop's
    root task ends, so a process whose loop is abandoned (a Ray actor whose raylet died) waits
    for them forever at exit. The default executor's idle threads end at interpreter exit.
    """
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            await asyncio.wait((future,))
        raise


HAND_AHEAD = 4
"""At most this many attempts wait behind each running one at the supervisor, started by it
the moment the one before ends: a short trial's successor starts without a round trip through
this driver (whose thread may wait for the GIL of a busy control plane)."""
QUEUE_DEPTH = 32.0
"""Waves of this machine's capacity the core may keep queued here (``Pool.queue_depth``): the
FIFO starts the next attempt the moment one ends, without a round trip to the control plane;
the core's ``backlog_s`` bounds it to about 30 s of work, so short trials get a deep queue and
hour-long ones none."""


class LocalProvider(Provider):
    poll_max = 1.0
    """a local attempt's end is a file on this disk: cheap to look for every second."""

    def __init__(self, name: str, config: LocalProviderConfig, *, state_dir: Path) -> None:
        self.name = name
        self.config = config
        self._runs = Path(state_dir).absolute() / "runs"
        self._keys = KeyIndex(self._runs, provider=name)
        self._capacity = Capacity(
            cpus=float(config.cpus or os.cpu_count() or 1),
            memory=(
                config.memory if isinstance(config.memory, int) else psutil.virtual_memory().total
            ),
            gpus=config.gpus or 0,
        )
        self._host = socket.gethostname()
        self._devices: PoolDevices | None = None
        self._me = current_claim()
        self._path_prefix = str(Path(sys.executable).parent) if sys.executable else ""
        self.capabilities = Capabilities(
            has=frozenset(
                {Capability.RUNS, Capability.LOGS, Capability.CANCEL_MEMBER, Capability.OUTPUTS}
                | ({Capability.GPUS} if self._capacity.gpus > 0 else set())
            ),
            why_not={
                Capability.GPUS: "this machine has no GPUs configured ([providers.NAME] gpus)",
                Capability.ARRAYS: "each trial is its own process; there is no array to batch into",
                Capability.CONTAINERS: "the local provider runs commands on this machine, not "
                "in containers; run on a kubernetes or aws provider, or drop the image",
                Capability.SECRETS: "the local provider has no secret store; pass the value "
                "through the environment of the run instead",
                Capability.ELASTIC: "this machine does not grow",
            },
            notes=("GPUs are counted, not assigned: a task sees every GPU",),
        )
        self._queue: deque[LocalRequest] = deque()
        self._queued: set[str] = set()
        self._started: dict[str, Started] = {}
        self._finished: dict[str, Report] = {}
        self._used: dict[bytes, bytes] = {}
        self._lock = anyio.Lock()
        self._state_lock = threading.RLock()
        self._watching: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._changed: set[str] = set()
        """Keys whose state this driver changed or heard change (an end the supervisor told,
        a start) since a watch last asked, while one runs: what a watch woken by an end
        describes, not every key it follows (a sweep's deep queue: tens of keys each time).
        Under ``_changed_lock`` (held for a set operation only, also on the event loop)."""
        self._changed_lock = threading.Lock()
        self.supervisor: SupervisorClient | None = None
        if supported():
            self.supervisor = SupervisorClient(
                self._runs, import_root=_IMPORT_ROOT, on_done=self._on_done, on_lost=self._on_lost
            )
            weakref.finalize(self, self.supervisor.close)

    async def _off_loop(self, fn: Callable[[], _T], *, hold: bool = True) -> _T:
        """Run ``fn`` (blocking I/O, and the state it changes) in a worker thread, one call at
        a time. A cancelled caller still waits for the thread, so the state stays whole.
        ``hold=False``: ``fn`` takes ``_state_lock`` itself, around each change, so a long
        call (a batch of claims, a describe of every live key) does not hold up the starts
        the supervisor's reader thread makes when a keeper ends."""

        def locked() -> _T:
            with self._state_lock:
                return fn()

        async with self._lock:
            return await _in_thread(locked if hold else fn)

    # -- the supervisor's news (its connection's reader thread) ---------------------------------

    def _on_done(self, attempt_dir: Path) -> None:
        """A keeper this driver started ended: its capacity is free now, and a watch may
        report it now."""
        with self._state_lock:
            if self._watching is not None:
                for key, held in self._started.items():
                    if held.dir == attempt_dir:
                        self._note_changed(key)
                        break
            self._pump()
        watching = self._watching
        if watching is not None:
            loop, ended = watching
            with contextlib.suppress(RuntimeError):  # the watch's loop is closed
                loop.call_soon_threadsafe(ended.set)

    def _on_lost(self) -> None:
        """The supervisor went away: start a new one now, and send it again every start that
        no keeper recorded yet (a keeper that did goes on without it)."""
        with self._state_lock:
            for held in self._started.values():
                held.keeper = False  # of the supervisor that went away
                if (
                    held.launcher is None
                    and self.supervisor is not None
                    and not has_ended(held.dir)
                    and read_launcher(held.dir) is None
                ):
                    if self._waiting(held):
                        # The new supervisor does not know its predecessor: started plainly
                        # once that one is seen to end (``_promote``).
                        held.sent = False
                    else:
                        held.keeper = self.supervisor.start(held.dir)
            self._pump()

    def _note_changed(self, key: str) -> None:
        if self._watching is not None:
            with self._changed_lock:
                self._changed.add(key)

    def _take_changed(self) -> set[str]:
        with self._changed_lock:
            changed, self._changed = self._changed, set()
        return changed

    # -- discover / plan -----------------------------------------------------------------------

    async def discover(self) -> list[Pool]:
        cap = self._capacity
        if self._devices is None and cap.gpus:
            # by device, so the core leases device indices (``CUDA_VISIBLE_DEVICES``); the
            # devices are counted under the pool's ``unknown`` model, as its ``gpus`` are
            found = await asyncio.to_thread(capture_gpus)
            self._devices = local_devices(cap.gpus, found, node=self._host, model="unknown")
        return [
            Pool(
                id=self.name,
                provider=self.name,
                kind="local",
                site=self.config.site,
                cpus=cap.cpus,
                memory=cap.memory,
                gpus={"unknown": cap.gpus} if cap.gpus else {},
                price_per_hour=0.0,
                hardware_class=f"cpu={platform.machine() or 'unknown'}",
                queue_depth=QUEUE_DEPTH,
                devices=self._devices,
            )
        ]

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return [
            plan_one(
                launch,
                provider=self.name,
                runs=self._runs,
                path_prefix=self._path_prefix,
                has_gpus=bool(self._capacity.gpus),
            )
            for launch in launches
        ]

    # -- submit --------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        local: list[LocalRequest] = []
        for req in requests:
            if not isinstance(req, LocalRequest):
                raise InternalError(
                    f"{self.name}: the local driver got a {type(req).__name__}, not a LocalRequest"
                )
            local.append(req)
        return await self._off_loop(lambda: self._submit_now(local), hold=False)

    def _submit_now(self, requests: Sequence[LocalRequest]) -> list[Report]:
        for req in requests:
            self._accept(req)
        out = []
        for req in requests:
            with self._state_lock:
                out.append(self._describe_one(req.key))
        return out

    def _accept(self, req: LocalRequest) -> None:
        """Claim the attempt directory and queue the request (starting it if it fits); do
        nothing if already claimed. The claim is files only (the key index, ``mkdir``): the
        state lock is held just to queue, so starts go on between the claims of a batch."""
        self._keys.remember(req.key, Path(req.attempt_dir))
        if claim(req, self._me, provider=self.name):
            with self._state_lock:
                self._queue.append(req)
                self._queued.add(req.key)
                self._pump()

    # -- the FIFO and capacity -----------------------------------------------------------------

    def _pump(self) -> None:
        """Release capacity of ended attempts, then start queued ones in order while they fit,
        then hand the supervisor the next ones to start as the running ones end."""
        gone: dict[str, str | None] = {}
        for key, held in list(self._started.items()):
            if held.launcher is not None:
                code = held.launcher.poll()  # reaps it once it has detached
                if code and not has_ended(held.dir):
                    # It failed before detaching (it forks first), so nothing else will write.
                    write_exit(
                        held.dir,
                        "launcher_error",
                        f"exited with code {code} before starting the task; "
                        f"see {held.dir / LAUNCHER_LOG}",
                    )
            # One handed ahead is judged once it holds a place (``_promote``).
            if has_ended(held.dir) or (held.after is None and not self._supervised(held)):
                gone[key] = held.after
                del self._started[key]
        if gone or any(h.after is not None for h in self._started.values()):
            self._promote(gone)
        while self._queue:
            req = self._queue[0]
            if has_ended(Path(req.attempt_dir)):  # cancelled by another instance
                self._queue.popleft()
                self._queued.discard(req.key)
                continue
            if self._started and not self._capacity.fits(self._holding(), req):
                break
            self._queue.popleft()
            self._queued.discard(req.key)
            self._start(req)
        if self._queue and self.supervisor is not None and self.supervisor.connected():
            self._hand_ahead(self.supervisor)

    def _waiting(self, held: Started) -> bool:
        """Is ``held`` handed ahead, behind an attempt that still holds its place?"""
        return held.after is not None and held.after in self._started

    def _holding(self) -> list[Started]:
        """The attempts that hold capacity now: all but those waiting behind another."""
        return [h for h in self._started.values() if not self._waiting(h)]

    def _promote(self, gone: dict[str, str | None]) -> None:
        """Attempts handed ahead whose predecessor is gone hold its place now: the supervisor
        started them (or starts them now, when it was never told)."""
        for key, held in list(self._started.items()):
            if held.after is None:
                continue
            after: str | None = held.after
            while after is not None and after in gone:  # it followed one that went too
                after = gone[after]
            held.after = after
            if after is not None and after in self._started:
                continue
            self._note_changed(key)
            held.since = time.time()
            if not held.sent:
                held.sent = True
                if not begin_start(held.dir):
                    continue  # another instance started it
                held.keeper = self.supervisor is not None and self.supervisor.start(held.dir)
                if not held.keeper:
                    held.launcher = start_launcher(held.dir, begun=True)

    def _hand_ahead(self, supervisor: SupervisorClient) -> None:
        """Hand the supervisor the queue's head to start when one of ours ends, behind the
        shortest line of attempts it may follow (asking no more than the one before it), at
        most ``HAND_AHEAD`` deep; in order, so nothing overtakes the head."""
        behind = {h.after: key for key, h in self._started.items() if h.after is not None}
        while self._queue:
            req = self._queue[0]
            if has_ended(Path(req.attempt_dir)):
                self._queue.popleft()
                self._queued.discard(req.key)
                continue
            best: tuple[int, str] | None = None
            for key, held in self._started.items():
                if held.after is not None or not held.keeper:
                    continue  # the supervisor sees only its own keepers end
                depth, tail = 0, key
                while tail in behind:
                    depth, tail = depth + 1, behind[tail]
                if (
                    depth < HAND_AHEAD
                    and (best is None or depth < best[0])
                    and self._capacity.within(self._started[tail], req)
                ):
                    best = (depth, tail)
            if best is None:
                return
            self._queue.popleft()
            self._queued.discard(req.key)
            # NOTE: not begun (``begin_start``) here: until the supervisor starts it, it is
            # as queued as before, and an instance taking it over from a dead driver starts
            # it at once (the supervisor forgets what a driver that went away handed ahead,
            # and of two starts its keeper lock lets one through).
            attempt_dir = Path(req.attempt_dir)
            tail = best[1]
            sent = supervisor.start_after(attempt_dir, self._started[tail].dir)
            self._started[req.key] = _held(req, after=tail, sent=sent, keeper=sent)
            behind[tail] = req.key
            if not sent:
                return

    def _supervised(self, held: Started) -> bool:
        if held.launcher is not None:
            code = held.launcher.poll()
            if code is None:
                return True  # still detaching
            if code != 0:
                return False  # failed before it could supervise anything
        rec = read_launcher(held.dir)
        if rec is None:  # detached, not yet recorded
            return time.time() - held.since < QUEUED_GRACE_S
        return same_process(rec.pid, rec.create_time)

    def _start(self, req: LocalRequest) -> None:
        attempt_dir = Path(req.attempt_dir)
        if not begin_start(attempt_dir):
            return
        launcher = None
        keeper = self.supervisor is not None and self.supervisor.start(attempt_dir)
        if not keeper:
            # No supervisor here (not Linux) or none could be reached: its own launcher.
            launcher = start_launcher(attempt_dir, begun=True)
            if launcher is None:
                return
        self._started[req.key] = _held(req, launcher=launcher, keeper=keeper)
        self._note_changed(req.key)

    def _adopt(self, key: str, attempt_dir: Path) -> None:
        """Count a running attempt that an earlier instance started against our capacity."""
        if key in self._started:
            return
        needs = declared_needs(attempt_dir)
        if needs is None:
            return
        cpus, memory, gpus, milli = needs
        self._started[key] = Started(
            dir=attempt_dir, cpus=cpus, memory=memory, gpus=gpus, since=time.time(), gpu_milli=milli
        )

    # -- describe ------------------------------------------------------------------------------

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        keys = list(keys)
        return await self._off_loop(lambda: self._describe_now(keys), hold=False)

    def _describe_now(self, keys: Sequence[str]) -> list[Report]:
        with self._state_lock:
            self._pump()
        out = []
        for key in keys:  # the lock per key: starts go on between them
            with self._state_lock:
                out.append(self._describe_one(key))
        return out

    def _describe_one(self, key: str) -> Report:
        cached = self._finished.get(key)
        if cached is not None:
            return cached
        attempt_dir = self._keys.dir_for(key)
        if attempt_dir is None:
            return Report(key=key, state=ProviderState.UNKNOWN)
        ended = self._ended(key, attempt_dir)
        if ended is not None:
            return ended
        rec = read_launcher(attempt_dir)
        if rec is not None:
            if same_process(rec.pid, rec.create_time):
                self._adopt(key, attempt_dir)
                return Report(
                    key=key,
                    state=ProviderState.RUNNING,
                    job_id=str(rec.pid),
                    node=self._host,
                    started_at=rec.started_at,
                )
            ended = self._ended(key, attempt_dir)  # it may have finished just now
            if ended is not None:
                return ended
            message = f"supervisor (pid {rec.pid}) died without recording how the attempt ended"
            if rec.child_pid is not None and same_process(rec.child_pid, rec.child_create_time):
                message += f"; its task (pid {rec.child_pid}) still runs: cancel it to stop it"
            return self._report(key, ProviderState.FAILED, FailureClass.NODE_FAILURE, message, rec)
        if not attempt_dir.exists():
            return Report(key=key, state=ProviderState.UNKNOWN)
        if key in self._queued:
            return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        held = self._started.get(key)
        if held is not None and self._waiting(held):
            return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        if held is None:
            taken = take_over(key, attempt_dir, self._me)
            if taken is not None:
                if isinstance(taken, LocalRequest):
                    self._queue.append(taken)
                    self._queued.add(key)
                    self._pump()
                return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        try:
            # Dequeued by us: the age of the start; otherwise the age of the claim.
            since = held.since if held is not None else attempt_dir.stat().st_mtime
        except FileNotFoundError:
            return Report(key=key, state=ProviderState.UNKNOWN)
        age = time.time() - since
        if age < QUEUED_GRACE_S:
            return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        return self._report(
            key,
            ProviderState.FAILED,
            FailureClass.LOST,
            f"no supervisor recorded itself in {age:.0f} s (the driver that queued it went "
            "away, or its start failed)",
        )

    def _report(
        self,
        key: str,
        state: ProviderState,
        failure: FailureClass | None,
        message: str,
        rec: LauncherRecord | None = None,
    ) -> Report:
        return Report(
            key=key,
            state=state,
            failure=failure,
            message=message,
            job_id=None if rec is None else str(rec.pid),
            node=self._host,
            started_at=None if rec is None else rec.started_at,
        )

    def _ended(self, key: str, attempt_dir: Path) -> Report | None:
        """The terminal report from ``exit.json``, cached; ``None`` while there is none."""
        info = read_exit(attempt_dir)
        if info is None:
            return None
        rec = read_launcher(attempt_dir)
        if isinstance(info, msgspec.DecodeError):
            return self._report(
                key,
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                f"unreadable exit.json: {info}",
            )
        tail = ""
        if info.reason == "exited" and info.exit_code != 0:
            tail = tail_text(stderr_tail(attempt_dir, STDERR_TAIL_CHARS))
        state, failure, message = classify_exit(info, stderr_tail=tail)
        outputs: dict[str, str] = {}
        if state is ProviderState.SUCCEEDED:
            # Checked again here, with the launcher's rule: what is reported is exactly what
            # may be stored (files inside the attempt directory, directories expanded), and a
            # run whose outputs cannot all be stored does not succeed.
            scan = scan_outputs(attempt_dir, declared_outputs(attempt_dir))
            if scan.missing or scan.refused:
                info = msgspec.structs.replace(
                    info, reason="bad_output", missing=scan.missing, refused=scan.refused
                )
                state, failure, message = classify_exit(info)
            else:
                outputs = {name: str(path) for name, path in scan.files.items()}
        report = Report(
            key=key,
            state=state,
            failure=failure,
            message=message,
            job_id=None if rec is None else str(rec.pid),
            node=self._host,
            exit_code=info.exit_code,
            started_at=info.started_at,
            ended_at=info.ended_at,
            outputs=outputs,
            used=self._used_record(attempt_dir),
        )
        self._finished[key] = report
        return report

    def _used_record(self, attempt_dir: Path) -> bytes | None:
        """What the attempt's Python processes imported (the launcher's import hook wrote it
        beside the attempt), encoded once; equal records share one object in memory."""
        from stowplan.provenance.imports import read_used

        rec = read_used(attempt_dir / USED_FILE)
        if rec is None:
            return None
        data = msgspec.json.encode(rec)
        return self._used.setdefault(data, data)

    # -- watch ---------------------------------------------------------------------------------

    async def watch(
        self, keys: WatchSet, *, renew_every: float = 60.0
    ) -> AsyncIterator[list[Report]]:
        """The default polling watch, also woken when the supervisor says an attempt this
        driver started ended: an end is reported at once, not at the next poll."""
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        self._watching = (loop, ended)
        interval = self.poll_min
        described = loop.time()
        """When every key was last described."""
        try:
            while True:
                added = asyncio.ensure_future(keys.wait_added(interval))
                woken = asyncio.ensure_future(ended.wait())
                try:
                    await asyncio.wait({added, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in (added, woken):
                        waiting.cancel()
                    await asyncio.gather(added, woken, return_exceptions=True)
                by_end = False
                if added.done() and not added.cancelled() and added.result():
                    interval = self.poll_min
                    await asyncio.sleep(self.poll_min)  # gather what else arrives with them
                elif ended.is_set():
                    await asyncio.sleep(WAKE_GATHER_S)  # and the ends that follow at once
                    by_end = True
                ended.clear()
                if not len(keys):
                    interval = self.poll_max
                    continue
                if by_end and loop.time() - described < interval:
                    # Woken by ends: what changed is known (the keys that ended, and those
                    # started in their place); every key is described again at the poll's
                    # cadence, so what this driver did not see itself still shows.
                    asked = [k for k in self._take_changed() if k in keys]
                    if not asked:
                        continue
                else:
                    described = loop.time()
                    self._take_changed()  # all of it is in this answer
                    asked = keys.keys()
                try:
                    reports = await self.describe(asked)
                except (ProviderError, OSError):
                    keys.failures += 1
                    interval = min(self.poll_max, interval * 2)
                    continue
                news = keys.news(reports, loop.time(), renew_every)
                if news:
                    interval = self.poll_min
                    yield news
                else:
                    interval = min(self.poll_max, max(interval, self.poll_min) * 2)
        finally:
            if self._watching is not None and self._watching[1] is ended:
                self._watching = None

    # -- cancel --------------------------------------------------------------------------------

    async def cancel(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        await self._off_loop(lambda: self._cancel_now(keys))

    def _cancel_now(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._cancel_one(key)
        self._pump()

    def _cancel_one(self, key: str) -> None:
        if key in self._finished:
            return
        attempt_dir = self._keys.dir_for(key)
        if attempt_dir is None or not attempt_dir.exists():
            return
        if has_ended(attempt_dir):
            return
        if key in self._queued:
            self._queued.discard(key)
            self._queue = deque(r for r in self._queue if r.key != key)
            write_exit(attempt_dir, "cancelled", "cancelled before it started")
            return
        rec = read_launcher(attempt_dir)
        if rec is None:
            # Claimed but not supervised yet: its launcher is starting, or another instance
            # holds it queued. Record the cancel first, then look again for a launcher: one
            # that starts after this sees exit.json and runs nothing (see launcher.py).
            write_exit(attempt_dir, "cancelled", "cancelled before it started")
            rec = read_launcher(attempt_dir)
            if rec is None:
                return
        if same_process(rec.pid, rec.create_time):
            # The launcher stops the task's processes and records the cancel.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rec.pid, signal.SIGTERM)
        elif rec.child_pid is not None and same_process(rec.child_pid, rec.child_create_time):
            # The supervisor died and left its task running: stop the task's process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.child_pid, signal.SIGKILL)

    # -- logs ----------------------------------------------------------------------------------

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        attempt_dir = await self._off_loop(lambda: self._keys.dir_for(key))
        if attempt_dir is None:
            return  # an unknown key yields nothing (the contract)
        path = attempt_dir / (STDOUT_FILE if stream == "stdout" else STDERR_FILE)
        log = _LogReader(path)
        try:
            while True:
                # Decide before reading, so the last read after the end drains the file.
                done = not follow or await self._is_over(key)
                while chunks := await _in_thread(log.read):
                    for chunk in chunks:
                        yield chunk
                if done:
                    return
                await self._off_loop(self._pump)
                await anyio.sleep(LOG_POLL_S)
        finally:
            log.close()

    async def _is_over(self, key: str) -> bool:
        report = await self._off_loop(lambda: self._describe_one(key))
        return report.state in TERMINAL_PROVIDER_STATES

    async def aclose(self) -> None:
        """Reap finished launchers and leave the supervisor (it ends once idle). Running
        attempts go on; queued ones are never started."""
        await self._off_loop(self._reap)
        if self.supervisor is not None:
            self.supervisor.close()

    def _reap(self) -> None:
        for held in self._started.values():
            if held.launcher is not None:
                held.launcher.poll()
            # The supervisor forgets what this driver handed it ahead when it leaves: were
            # this driver used again, those are started plainly (``_promote``).
            held.keeper = False
            if held.after is not None:
                held.sent = False


def _held(
    req: LocalRequest,
    *,
    launcher: subprocess.Popen[bytes] | None = None,
    after: str | None = None,
    sent: bool = True,
    keeper: bool = False,
) -> Started:
    """What ``req`` holds of the machine from now: started, or handed ahead (``after``)."""
    return Started(
        dir=Path(req.attempt_dir),
        cpus=req.cpus,
        memory=req.memory,
        gpus=req.gpus,
        gpu_milli=req.gpu_milli,
        since=time.time(),
        launcher=launcher,
        after=after,
        sent=sent,
        keeper=keeper,
        devices=req.devices or (),
    )


class _LogReader:
    """A log file opened once it exists, kept open across polls, read in bounded batches."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._f: IO[bytes] | None = None

    def read(self) -> list[bytes]:
        """Up to ``LOG_READ_BYTES`` of what was appended since the last read (``[]``: none)."""
        if self._f is None:
            with contextlib.suppress(FileNotFoundError):
                self._f = open(self._path, "rb")  # noqa: SIM115 (kept open across polls)
        if self._f is None:
            return []
        chunks: list[bytes] = []
        size = 0
        while size < LOG_READ_BYTES and (chunk := self._f.read(1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
        return chunks

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
