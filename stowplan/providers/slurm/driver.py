"""The Slurm driver: sbatch job arrays over SSH to a login node.

Remote layout under the configured ``workdir``::

    jobs/<array>/job.sh        the rendered script (its ``# stowplan-key`` lines map index -> key)
    jobs/<array>/jobid         the array's job id, written right after sbatch answered
    jobs/<array>/logs/I.out    stdout (``.err``: stderr) of array index I
    runs/<run_id>/<attempt>/   where an attempt runs; its declared outputs are left there

Idempotency: an array's job name is ``request_name`` of its attempt keys, and the local key
index (``stowplan.providers.keyindex``, under ``state_dir/slurm/<name>/``) records each key's
array before sbatch can run. A submit tries once: a transient failure raises a retryable
``ProviderError`` and the command shell retries with the same keys. Over SSH the remote submit
program holds a ``flock`` on the array directory and starts ``sbatch`` only if there is no
``jobid`` file and neither ``squeue`` nor ``sacct`` knows the name, so a retry whose first
answer was lost (the connection dropped after sbatch was sent) finds the first job; if
``squeue`` itself fails, nothing is submitted. Over REST the name is looked up before a
request that was tried before is submitted again. A key already tried in another array (a retry
re-planned with fewer keys) is looked up in that array first.

Observation: one remote call per ``describe`` reads the end records the elements write as
they exit (``elements/I.end``: exit status, start, end, node, and the GPU indices Slurm
bound; SSH only), runs one ``squeue`` for every live array unless every element waited on
has one, and ``sacct`` in the same call only when a watched element without an end record
left the queue (it was killed, or never ran); finished attempts are cached. The driver's
own ``watch`` spaces its polls by what is expected to change (``cadence.py``: the array's
completion rate, the shortest remaining expected runtime), not by a fixed backoff, and
waits the last seconds of each delay on the cluster, where the call answers as soon as
every element waited on has ended. Keys this instance has not seen (after a control-plane
restart) are looked up in the local index and, failing that, in the remote job scripts by
one ``grep``. A job that ended ``NODE_FAIL`` or waits for nodes that went down is pushed to
``capacity_changes`` so the cluster is rediscovered.

Devices: Slurm binds GPUs itself (``--gres=gpu[:TYPE]:K``; sbatch cannot ask for given
indices, and a node list per element would split the array), so a partition is no
``Pool.devices`` pool: the core counts its GPUs, and ``Pool.node`` (its largest node) keeps
runs no node holds from being offered to it. The indices Slurm bound are read back from the
end record: ``Report.devices`` (with ``Report.node``) once the element ended; ``None`` while
it runs, over REST (no file access), and where the element was killed.

Start-up: built where an event loop runs (the provider actor), the SSH driver begins its first
discovery at once, so the connection and the cluster's answer are ready when the control
plane first asks; unless the actor answers that discovery with the facts ``stowplan run``
handed it (``first_discovery_answered``), when it would be a remote command for nothing.

Capacity: a partition is offered the work its queue can absorb in the planning horizon
(``capacity.py``), not only its CPUs, so a sweep goes to Slurm as one array; an explicit
``queue_factor`` overrides the derived depth.

Every remote command is counted (``Backend.commands``) and the count is kept in
``state_dir/slurm/<name>/remote.json`` (``{"commands": N, "connects": M, "polls": [...],
"calls": [...]}``, the last polls of the watch as ``[time, live keys, ended so far, next
delay]`` and the last backend calls as ``[time begun, verb, seconds]``), rewritten
when the count changed at the end of each verb but ``discover`` (a dry run writes nothing).
Each instance adds its counts to those it found there, so the file counts the commands of
every instance on one state directory (``stowplan run``'s own, which submits ahead, then the
provider actor's).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
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
from stowplan.providers.keyindex import KeyIndex, Member, RequestRecord, submit_once
from stowplan.providers.slurm.backend import Backend, SSHBackend
from stowplan.providers.slurm.cadence import Progress, next_poll
from stowplan.providers.slurm.capacity import offered
from stowplan.providers.slurm.parse import JobRow, PartitionFacts, pools_of
from stowplan.providers.slurm.render import ELEMENTS_DIR, END_SUFFIX, SlurmRequest, plan_arrays
from stowplan.providers.slurm.ssh import SSHTransport, TransportLost
from stowplan.providers.slurm.states import capacity_reason, slurm_state
from stowplan.spec.models import FailureClass, SlurmProviderConfig

T = TypeVar("T")
Discovered = tuple[str | None, list[PartitionFacts], dict[str, float]]
"""What ``Backend.discover`` answers: cluster name, partitions, pending CPU-seconds."""
_WATCH_WAIT: contextvars.ContextVar[float] = contextvars.ContextVar("watch_wait", default=0.0)
"""How long the ``describe`` the watch makes may wait on the cluster (other callers: 0)."""
ADDED_CHECK_S = 0.05
REMOTE_WAIT_MAX_S = 5.0
"""The longest part of a watch's delay waited on the cluster (``describe`` waits on it)."""
EARLY_DISCOVERY_S = 30.0
"""How long the discovery begun at construction stands for the first ``discover``."""
LOG_POLL_S = 1.0
POLLS_KEPT = 64
CAPACITY_QUEUE = 64
"""Capacity news held for a consumer that lags; more is dropped (one rediscovery covers it)."""


def queue_factor(config: SlurmProviderConfig) -> float | None:
    """The explicit ``queue_factor``, or ``None`` to derive the depth from discovery."""
    f: float | None = getattr(config, "queue_factor", None)
    return f


def _read_counts(path: Path) -> dict[str, Any]:
    """``remote.json`` as an earlier instance left it; empty where there is none or it is
    not what this driver writes (a diagnostic: never worth failing for)."""
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(got, dict):
        return {}
    ok = all(isinstance(got.get(k, 0), int) for k in ("commands", "connects")) and all(
        isinstance(got.get(k, []), list) for k in ("polls", "calls")
    )
    return got if ok else {}


class SlurmProvider(Provider):
    poll_min = 1.0
    """squeue answers within a second of a change; sooner polls only load the controller."""
    submits_ahead = True
    """the key index makes a submit idempotent across instances (``Provider.submits_ahead``)"""
    poll_max = 30.0
    """the longest blind backoff (nothing known of what runs); ``cadence.next_poll`` may wait
    longer, up to half the lease renewal, when it expects nothing to change sooner."""

    def __init__(
        self,
        name: str,
        config: SlurmProviderConfig,
        *,
        state_dir: Path,
        backend: Backend | None = None,
    ) -> None:
        self.name = name
        self.config = config
        has = {
            Capability.RUNS,
            Capability.GPUS,
            Capability.ARRAYS,
            Capability.CANCEL_MEMBER,
            Capability.OUTPUTS,
        }
        why_not = {
            Capability.CONTAINERS: "the Slurm driver runs commands on the compute nodes "
            "as they are; drop the image, or run the task on a kubernetes or aws provider",
            Capability.SECRETS: "the Slurm driver has no secret store; the job's "
            "environment comes from the cluster",
            Capability.ELASTIC: "a Slurm cluster's nodes are fixed; stowplan does not resize it",
        }
        if config.transport == "rest":
            why_not[Capability.LOGS] = "slurmrestd has no file access; logs need transport = 'ssh'"
        else:
            has.add(Capability.LOGS)
        self.capabilities = Capabilities(
            has=frozenset(has),
            why_not=why_not,
            notes=(
                "Slurm time limits are whole minutes; ours are rounded up",
                "final states of jobs that left squeue need sacct (slurmdbd); without it they "
                "stay UNKNOWN until the lease expires",
            ),
        )
        env = dict(config.remote_env)
        if config.slurm_conf is not None:
            env["SLURM_CONF"] = config.slurm_conf
        if backend is not None:
            self.backend = backend
        elif config.transport == "rest":
            from stowplan.providers.slurm.rest import RestBackend

            self.backend = RestBackend(name, config)
        else:
            transport = SSHTransport(
                name,
                host=config.host,
                port=config.port,
                user=config.user,
                identity_file=config.identity_file,
                known_hosts=config.known_hosts,
                connections=config.connections,
            )
            self.backend = SSHBackend(name, transport, env)
        self._dir = Path(state_dir).absolute() / "slurm" / name
        self.index = KeyIndex(self._dir / "index.jsonl")
        self._finished: dict[str, Report] = {}
        self._lock = asyncio.Lock()
        self.describe_calls = 0
        self._counted: dict[str, int] = {}
        self._before: dict[str, Any] = _read_counts(self._dir / "remote.json")
        """what earlier instances counted (``stowplan run`` submits ahead with one of its own
        before the provider actor's): this instance's counts are added to theirs."""
        self._polls: deque[tuple[float, int, int, float]] = deque(maxlen=POLLS_KEPT)
        """the watch's last polls: (epoch time, live keys, ended so far, next delay)"""
        self._calls: deque[tuple[float, str, float]] = deque(maxlen=POLLS_KEPT)
        self._polls.extend(tuple(p) for p in self._before.get("polls", ()))
        self._calls.extend(tuple(c) for c in self._before.get("calls", ()))
        """the last backend calls: (epoch time it began, verb, seconds it took)"""
        self._capacity: asyncio.Queue[str] = asyncio.Queue(CAPACITY_QUEUE)
        self._capacity_last: set[str] = set()
        self._early: asyncio.Task[Discovered] | None = None
        """the first discovery, begun at construction (``_begin_discovery``)"""
        self._early_at = 0.0
        if backend is None and config.transport == "ssh":
            self._begin_discovery()

    def _begin_discovery(self) -> None:
        """Begin the first discovery now, in the background, where an event loop runs (the
        provider actor's constructor): the SSH connection and the cluster's answer are then
        ready, or nearly, when the control plane asks (after Ray has started its other
        actors), instead of only starting then. The first ``discover`` within
        ``EARLY_DISCOVERY_S`` takes its answer (after an error, it asks again itself); later
        ones ask again."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._early_at = time.monotonic()
        task = loop.create_task(self._discover_remote())
        # an answer nobody took is dropped, its error too (never "never retrieved")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._early = task

    def first_discovery_answered(self) -> None:
        """The first discovery is answered without this driver (the provider actor was handed
        fresh facts): withdraw the one begun at construction, before the loop turns (the
        actor's constructor calls this right after building the driver), so no remote command
        is sent; one already under way is cancelled (a query: nothing is left half done).

        Nothing is lost for ``plan`` and ``submit``: the driver keeps no state from a
        discovery. ``plan`` takes everything it renders with (GPU types by pool) from the
        ``Facts`` it is given, here the handed pools; the cluster name, the partitions and the
        pending work only make those pools; ``submit`` needs the key index (read from disk at
        construction) and the connection, opened lazily by its first command. The next
        ``discover`` asks the cluster itself."""
        early, self._early = self._early, None
        if early is not None:
            early.cancel()

    async def _discover_remote(self) -> Discovered:
        # our own queued arrays are the core's leases already, not a backlog before us
        return await self._timed(
            "discover", self.backend.discover(lambda name: self.index.request(name) is not None)
        )

    # -- discover / plan ----------------------------------------------------------------------

    async def discover(self) -> list[Pool]:
        # the count is written by the next verb that acts (a dry run writes nothing)
        early, self._early = self._early, None
        found: Discovered | None = None
        if early is not None and time.monotonic() - self._early_at <= EARLY_DISCOVERY_S:
            # its failure (the cluster briefly unreachable back then) is not this call's
            with contextlib.suppress(ProviderError, OSError):
                found = await early
        elif early is not None:
            early.cancel()
        cluster, parts, pending = found if found is not None else await self._discover_remote()
        site = self.config.site or cluster or self.name
        if self.config.partitions is not None:
            wanted = set(self.config.partitions)
            parts = [p for p in parts if p.name in wanted]
        pools = pools_of(self.name, site, parts, pending)
        return offered(self.name, pools, parts, pending, queue_factor(self.config))

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return list(
            plan_arrays(
                launches,
                provider=self.name,
                workdir=self.config.workdir,
                max_array_size=self.config.max_array_size,
                max_concurrent=self.config.max_concurrent,
                account=self.config.account,
                qos=self.config.qos,
                gpu_types={p.id: facts.gpu_types(p.id) for p in facts.pools},
                self_logging=self.config.transport == "rest",
            )
        )

    async def _timed(self, verb: str, call: Awaitable[T]) -> T:
        """``await call``, kept in ``_calls`` (``remote.json``'s ``calls``)."""
        began = time.time()
        try:
            return await call
        finally:
            self._calls.append((round(began, 3), verb, round(time.time() - began, 3)))

    # -- submit -------------------------------------------------------------------------------

    def _count(self, *, polled: bool = False) -> None:
        """Keep the count of remote commands in ``remote.json`` (module doc), if it changed
        (or a poll was added)."""
        before = self._before
        counts = {
            "commands": before.get("commands", 0) + self.backend.commands,
            "connects": before.get("connects", 0) + self.backend.connects,
        }
        if counts == self._counted and not polled:
            return
        self._counted = counts
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = self._dir / "remote.json.tmp"
        tmp.write_text(
            json.dumps({**counts, "polls": list(self._polls), "calls": list(self._calls)})
        )
        os.replace(tmp, self._dir / "remote.json")

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        try:
            return await self._submit(requests)
        finally:
            self._count()

    async def _submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        out: list[Report] = []
        for req in requests:
            if not isinstance(req, SlurmRequest):
                raise ProviderError(
                    f"not a Slurm request: {type(req).__name__}",
                    provider=self.name,
                    retryable=False,
                )
            out.extend(await self._submit_one(req))
        return out

    async def _submit_one(self, req: SlurmRequest) -> list[Report]:
        earlier = await self._found_earlier(req)
        if earlier is not None:
            return earlier
        # write-ahead: the key -> array mapping is on disk before sbatch can run
        before = self.index.intend(
            req.name,
            [
                Member(
                    key=m.key,
                    request=req.name,
                    index=m.index,
                    outputs=list(m.outputs),
                    where={"attempt_dir": m.attempt_dir},
                )
                for m in req.members
            ],
            {"job_dir": req.job_dir},
        )
        backend = self.backend

        async def find(name: str) -> str | None:
            return await self._timed("find", backend.find(name, req.job_dir))

        try:
            # one try: a retryable error (TransportLost included: sbatch may have run) escapes
            # to the shell, whose retry of the same keys finds the job by its name
            job_id = await submit_once(
                self.index,
                before,
                lambda: self._timed("submit", backend.submit(req, first=not before.tries)),
                None if backend.locked_submit else find,
            )
        except ProviderError as e:
            if e.retryable or isinstance(e, TransportLost):
                raise
            return [
                Report(
                    key=m.key,
                    state=ProviderState.FAILED,
                    failure=FailureClass.PROVIDER_REJECTED,
                    message=str(e),
                )
                for m in req.members
            ]
        # an attempt seen ending (the same requests again, late) keeps its final report
        return [
            self._finished.get(m.key)
            or Report(
                key=m.key,
                state=ProviderState.QUEUED,
                job_id=f"{job_id}_{m.index}",
                message=f"submitted as array {job_id} ({req.name})",
            )
            for m in req.members
        ]

    async def _found_earlier(self, req: SlurmRequest) -> list[Report] | None:
        """Reports for ``req``'s keys from the arrays they were tried in before under another
        name (a retry re-planned with fewer keys), if any of those arrays exists; ``None`` when
        none does and ``req`` is to be submitted. A key whose earlier array is not found while
        another's is stays UNKNOWN (never submitted twice; reconciliation settles it)."""
        earlier = self.index.earlier(req.name, req.keys)
        if not earlier:
            return None
        found: dict[str, Report] = {}
        for name, keys in earlier.items():
            rec = self.index.request(name)
            job_id = rec.job_id if rec is not None else None
            if job_id is None:
                job_id = await self._timed("find", self.backend.find(name, self._job_dir(name)))
                if job_id is None:
                    continue
                self.index.submitted(name, job_id)
            for k in keys:
                m = self.index.member(k)
                index = m.index if m is not None else 0
                found[k] = self._finished.get(k) or Report(
                    key=k,
                    state=ProviderState.QUEUED,
                    job_id=f"{job_id}_{index}",
                    message=f"submitted before as array {job_id} ({name})",
                )
        if not found:
            return None
        return [
            found.get(k)
            or Report(
                key=k,
                state=ProviderState.UNKNOWN,
                message=f"its other keys were found in earlier arrays; {req.name} not submitted",
            )
            for k in req.keys
        ]

    def _job_dir(self, name: str) -> str:
        rec = self.index.request(name)
        if rec is not None and "job_dir" in rec.where:
            return rec.where["job_dir"]
        return f"{self.config.workdir.rstrip('/') or '/'}/jobs/{name}"

    # -- describe -----------------------------------------------------------------------------

    async def _lookup(self, keys: list[str]) -> None:
        """Find keys this instance has not seen in the remote job scripts (after a restart)."""
        found, job_ids = await self._timed("lookup", self.backend.lookup(self.config.workdir, keys))
        base = self.config.workdir.rstrip("/") or "/"
        wanted = set(keys)
        members: list[Member] = []
        requests: dict[str, RequestRecord] = {}
        for key, (array, index, run_id, attempt, outputs) in found.items():
            if key not in wanted:
                continue
            members.append(
                Member(
                    key=key,
                    request=array,
                    index=index,
                    outputs=outputs,
                    where={"attempt_dir": f"{base}/runs/{run_id}/{attempt}"},
                )
            )
            known = self.index.request(array)
            if known is None or known.job_id is None:
                requests[array] = RequestRecord(
                    name=array,
                    job_id=job_ids.get(array),
                    tried_at=known.tried_at if known is not None else 0.0,
                    tries=known.tries if known is not None else 1,
                    where={"job_dir": f"{base}/jobs/{array}"},
                )
        self.index.learn(members, list(requests.values()))

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        async with self._lock:
            return await self._poll(keys, _WATCH_WAIT.get())

    async def _poll(self, keys: Sequence[str], wait_s: float = 0.0) -> list[Report]:
        """Reports for ``keys``, from one remote call; ``wait_s``: wait there, at most that
        long, until every element waited on has its end record (the watch's delay)."""
        index = self.index
        unseen = [k for k in keys if index.member(k) is None and k not in self._finished]
        if unseen:
            await self._lookup(unseen)
        members = {k: m for k in keys if k not in self._finished and (m := index.member(k))}
        rows: dict[tuple[str, int | None], tuple[JobRow | None, JobRow | None]] = {}
        if members:
            names = sorted({m.request for m in members.values()})
            since = min(
                (r.tried_at for n in names if (r := index.request(n)) is not None and r.tried_at),
                default=0.0,
            )
            days = 60 if not since else max(1, math.ceil((time.time() - since) / 86400) + 1)
            self.describe_calls += 1
            elements: list[str] = []
            ends: dict[str, str] = {}
            by_element: dict[str, Member] = {}
            for m in members.values():
                rec = index.request(m.request)
                if rec is None or rec.job_id is None:
                    elements = []  # an array whose id is not known: read accounting too
                    ends = {}
                    break
                element = f"{rec.job_id}_{m.index}"
                elements.append(element)
                by_element[element] = m
                if self.backend.reads_files:
                    job_dir = rec.where.get("job_dir") or self._job_dir(m.request)
                    ends[element] = f"{job_dir}/{ELEMENTS_DIR}/{m.index}{END_SUFFIX}"
            try:
                squeue, sacct, *more = await self._timed(
                    "observe",
                    self.backend.observe(names, days, elements, end_files=ends, wait_s=wait_s),
                )
            finally:
                self._count()
            # an element's own end record stands for accounting (which it spares) until
            # accounting has the element ended too
            from_ends: set[tuple[str, int | None]] = set()
            for row in more[0] if more else []:
                ended = by_element.get(row.element_id)
                if ended is not None:
                    rows[(ended.request, row.index)] = (
                        None,
                        msgspec.structs.replace(row, name=ended.request),
                    )
                    from_ends.add((ended.request, row.index))
            for row in squeue:
                if not self._ours(row):
                    continue
                rows[(row.name, row.index)] = (
                    row,
                    rows.get((row.name, row.index), (None, None))[1],
                )
            for row in sacct:
                if not self._ours(row):
                    continue
                k = (row.name, row.index)
                prev = rows.get(k, (None, None))
                if k in from_ends:
                    if slurm_state(row.state, row.exit_code)[0] in TERMINAL_PROVIDER_STATES:
                        # accounting knows no device indices: the end record's stay
                        ended_row = prev[1]
                        if ended_row is not None and ended_row.devices is not None:
                            row = msgspec.structs.replace(row, devices=ended_row.devices)
                        rows[k] = (prev[0], row)
                        from_ends.discard(k)
                elif prev[1] is None or self._preferred(row, prev[1]):
                    rows[k] = (prev[0], row)
            self._capacity_news(
                [row for m in members.values() for row in rows.get((m.request, m.index), ())]
            )
        out: list[Report] = []
        for key in keys:
            cached = self._finished.get(key)
            if cached is not None:
                out.append(cached)
                continue
            member = members.get(key)
            if member is None:
                out.append(Report(key=key, state=ProviderState.UNKNOWN, message="never submitted"))
                continue
            live_row, acct_row = rows.get((member.request, member.index), (None, None))
            report = self._report(member, live_row, acct_row)
            if report.state in TERMINAL_PROVIDER_STATES:
                self._finished[key] = report
            out.append(report)
        return out

    async def watch(
        self, keys: WatchSet, *, renew_every: float = 60.0
    ) -> AsyncIterator[list[Report]]:
        """The contract's polling watch (``Provider.watch``: batches of news, failures counted
        and retried), with the delay between polls from ``cadence.next_poll`` instead of a
        doubling backoff: soon when ends are expected, long when none are. Over SSH the end
        of each delay is waited on the cluster itself, in the same remote call as the poll,
        which answers as soon as every element waited on has written its end record: the
        last element's end is seen within ``backend.WAIT_STEP_S``, not a delay later."""
        loop = asyncio.get_running_loop()
        progress = Progress()
        cap = max(self.poll_max, renew_every / 2)
        delay = self.poll_min
        while True:
            # the last REMOTE_WAIT_MAX_S of the delay are waited on the cluster, for the end
            # records of the elements waited on: the poll answers as soon as all have ended
            remote = min(delay, REMOTE_WAIT_MAX_S) if self.backend.reads_files and len(keys) else 0
            # (a moment at least: keys added meanwhile are seen, and polled after poll_min)
            if await keys.wait_added(max(delay - remote, ADDED_CHECK_S)):
                await asyncio.sleep(self.poll_min)  # gather what else arrives with them
                remote = 0.0
            if not len(keys):
                delay = self.poll_max
                continue
            # through ``describe`` (what a wrapper of it sees), with the wait in this task only
            waiting = _WATCH_WAIT.set(remote)
            try:
                reports = await self.describe(keys.keys())
            except (ProviderError, OSError):  # OSError: a transport error left untranslated
                keys.failures += 1
                progress.quiet += 1
                delay = next_poll(
                    live=len(keys),
                    rate=None,
                    first_end_s=None,
                    quiet=progress.quiet,
                    poll_min=self.poll_min,
                    poll_max=self.poll_max,
                    cap=cap,
                )
                continue
            finally:
                _WATCH_WAIT.reset(waiting)
            now = loop.time()
            progress.observe(reports, now)
            news = keys.news(reports, now, renew_every)
            delay = next_poll(
                live=len(keys),
                rate=progress.rate(),
                first_end_s=progress.first_end_s(reports, time.time()),
                quiet=progress.quiet,
                poll_min=self.poll_min,
                poll_max=self.poll_max,
                cap=cap,
            )
            self._polls.append((round(time.time(), 3), len(keys), progress.ended, round(delay, 3)))
            self._count(polled=True)
            if news:
                yield news

    def _ours(self, row: JobRow) -> bool:
        """A row of a job this request's submit started (once its job id is known): another
        project, or another workdir, may run a job of the same name (the same keys)."""
        record = self.index.request(row.name)
        return record is None or record.job_id is None or record.job_id == row.job_id

    def _capacity_news(self, rows: Sequence[JobRow | None]) -> None:
        """Push the capacity reasons these rows show that the last describe did not."""
        now = {
            why
            for row in rows
            if row is not None and (why := capacity_reason(row.state, row.reason, row.node))
        }
        for why in sorted(now - self._capacity_last):
            with contextlib.suppress(asyncio.QueueFull):
                self._capacity.put_nowait(why)
        self._capacity_last = now

    async def capacity_changes(self) -> AsyncIterator[str]:
        """A reason each time a ``describe`` sees a job that ended ``NODE_FAIL``/``BOOT_FAIL``
        or that waits for nodes or a partition that went down or were drained (once per
        reason until it is no longer seen). One consumer."""
        while True:
            yield await self._capacity.get()

    def _preferred(self, new: JobRow, old: JobRow) -> bool:
        """Of two sacct rows for one element, the one of the job id we submitted."""
        rec = self.index.request(new.name)
        job_id = rec.job_id if rec is not None else None
        return job_id is not None and new.job_id == job_id and old.job_id != job_id

    def _report(self, m: Member, live: JobRow | None, acct: JobRow | None) -> Report:
        row = live
        if acct is not None:
            live_done = live is not None and (
                slurm_state(live.state, live.exit_code)[0] in TERMINAL_PROVIDER_STATES
            )
            acct_state, _ = slurm_state(acct.state, acct.exit_code)
            if live is None or (acct_state in TERMINAL_PROVIDER_STATES and not live_done):
                row = acct
        if row is None:
            return Report(
                key=m.key,
                state=ProviderState.UNKNOWN,
                message=f"array {m.request} index {m.index} is in neither squeue nor sacct",
            )
        state, failure = slurm_state(row.state, row.exit_code)
        parts = [f"slurm {row.state}"]
        if row.exit_code not in (None, 0) or row.signal:
            parts.append(
                f"exit code {row.exit_code}" + (f" signal {row.signal}" if row.signal else "")
            )
        if row.reason:
            parts.append(row.reason)
        if row.node:
            parts.append(f"on {row.node}")
        outputs = (
            {o: f"{m.where.get('attempt_dir', '.')}/{o}" for o in m.outputs}
            if state is ProviderState.SUCCEEDED
            else {}
        )
        return Report(
            key=m.key,
            state=state,
            failure=failure,
            job_id=row.element_id,
            node=row.node,
            devices=next((r.devices for r in (row, acct) if r and r.devices is not None), None),
            exit_code=row.exit_code,
            message=", ".join(parts),
            started_at=row.started_at,
            ended_at=row.ended_at,
            outputs=outputs,
        )

    # -- cancel / logs ------------------------------------------------------------------------

    async def cancel(self, keys: Sequence[str]) -> None:
        ids = []
        for key in keys:
            m = self.index.member(key)
            if m is None or key in self._finished:
                continue
            rec = self.index.request(m.request)
            job_id = rec.job_id if rec is not None else None
            if job_id is None and rec is not None and rec.tries:
                # its submit's answer was lost: the array may exist all the same
                job_id = await self._timed(
                    "find", self.backend.find(m.request, self._job_dir(m.request))
                )
                if job_id is not None:
                    self.index.submitted(m.request, job_id)
            if job_id is not None:
                ids.append(f"{job_id}_{m.index}")
        if ids:
            try:
                await self._timed("cancel", self.backend.cancel(ids))
            finally:
                self._count()

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        if self.index.member(key) is None:
            await self._lookup([key])
        m = self.index.member(key)
        if m is None:
            return
        path = f"{self._job_dir(m.request)}/logs/{m.index}.{'out' if stream == 'stdout' else 'err'}"
        offset = 0
        while True:
            done = not follow or (await self.describe([key]))[0].state in TERMINAL_PROVIDER_STATES
            data = await self.backend.read_file(path, offset)
            if data:
                offset += len(data)
                yield data
            if done:
                return
            await asyncio.sleep(LOG_POLL_S)

    async def aclose(self) -> None:
        if self._early is not None:
            self._early.cancel()
            self._early = None
        await self.backend.aclose()


__all__ = ["SlurmProvider", "SlurmRequest", "TransportLost"]
