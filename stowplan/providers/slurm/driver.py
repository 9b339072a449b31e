"""The Slurm driver: sbatch job arrays over SSH to a login node.

Remote layout under the configured ``workdir``::

    jobs/<array>/job.sh        the rendered script (its ``# stowplan-key`` lines map index -> key)
    jobs/<array>/jobid         the array's job id, written right after sbatch answered
    jobs/<array>/logs/I.out    stdout (``.err``: stderr) of array index I
    runs/<run_id>/<attempt>/   where an attempt runs; its declared outputs are left there

Idempotency: an array's job name is a hash of its attempt keys, so a retried submit renders the
same name. The remote submit program holds a ``flock`` on the array directory, and starts
``sbatch`` only if there is no ``jobid`` file and neither ``squeue`` nor ``sacct`` knows the
name; a submit whose answer was lost (the connection dropped after sbatch was sent) is simply
run again, and finds the first job. If ``squeue`` itself fails, nothing is submitted.

Observation: one remote call per poll runs one ``squeue`` and one ``sacct`` for every live
array; finished attempts are cached. Polls are spaced by the driver itself (0 s after a submit,
2 s after a change, then 4, 8, 16, up to 30 s): a ``describe`` sooner than that answers from
the last poll, so a caller may ask as often as it likes. Keys this instance has not seen
(after a control-plane restart) are looked up in the local index under
``state_dir/slurm/<name>/`` and, failing that, in the remote job scripts by one ``grep``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
from msgspec import Struct, field

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
)
from stowplan.providers.slurm.backend import Backend, SSHBackend
from stowplan.providers.slurm.parse import JobRow, pools_of
from stowplan.providers.slurm.render import SlurmRequest, plan_arrays
from stowplan.providers.slurm.ssh import SSHTransport, TransportLost
from stowplan.providers.slurm.states import slurm_state
from stowplan.spec.models import SlurmProviderConfig

SUBMIT_TRIES = 5
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
LOG_POLL_S = 1.0
POLL_BACKOFF_S = (0.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Between polls of the cluster: 0 after a submit, 2 s after a change, doubling to 30 s."""


class _Member(Struct, kw_only=True):
    """Where an attempt is: its array, index, directory and declared outputs."""

    key: str
    array: str
    index: int
    job_dir: str
    attempt_dir: str
    outputs: list[str] = field(default_factory=list)


class _Array(Struct, kw_only=True):
    name: str
    job_dir: str
    job_id: str | None = None
    submitted_at: float = 0.0


class _IndexLine(Struct, kw_only=True, omit_defaults=True):
    member: _Member | None = None
    array: _Array | None = None


_index_decoder = msgspec.json.Decoder(_IndexLine)
_index_encoder = msgspec.json.Encoder()


class SlurmProvider(Provider):
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
        rest_cannot = (
            {"logs": "slurmrestd has no file access; logs need transport = 'ssh'"}
            if config.transport == "rest"
            else {}
        )
        has = {Capability.RUNS, Capability.GPUS, Capability.ARRAYS, Capability.CANCEL_MEMBER}
        if config.transport != "rest":
            has.add(Capability.LOGS)
        self.capabilities = Capabilities(
            has=frozenset(has),
            why_not={
                Capability.LOGS: rest_cannot.get("logs", ""),
                Capability.CONTAINERS: "the Slurm driver runs commands on the compute nodes "
                "as they are; drop the image, or run the task on a kubernetes or aws provider",
                Capability.SECRETS: "the Slurm driver has no secret store; the job's "
                "environment comes from the cluster",
                Capability.ELASTIC: "a Slurm cluster's nodes are fixed; stowplan does not "
                "resize it",
            },
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
        self._index_path = self._dir / "index.jsonl"
        self._loaded = False
        self._members: dict[str, _Member] = {}
        self._arrays: dict[str, _Array] = {}
        self._finished: dict[str, Report] = {}
        self._lock = asyncio.Lock()
        self.describe_calls = 0
        self._seen: dict[str, Report] = {}
        self._poll_step = 0
        self._next_poll = 0.0

    # -- the local index ----------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            lines = self._index_path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                rec = _index_decoder.decode(line)
            except msgspec.DecodeError:
                continue  # a torn last line after a crash
            if rec.member is not None:
                self._members[rec.member.key] = rec.member
            if rec.array is not None:
                known = self._arrays.get(rec.array.name)
                if known is None or rec.array.job_id is not None:
                    self._arrays[rec.array.name] = rec.array

    def _append(self, records: Sequence[_IndexLine]) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        with open(self._index_path, "ab") as f:
            for rec in records:
                f.write(_index_encoder.encode(rec) + b"\n")

    # -- discover / plan ----------------------------------------------------------------------

    async def discover(self) -> list[Pool]:
        cluster, parts, pending = await self.backend.discover()
        site = self.config.site or cluster or self.name
        if self.config.partitions is not None:
            wanted = set(self.config.partitions)
            parts = [p for p in parts if p.name in wanted]
        pools = pools_of(self.name, site, parts, pending)
        f = self.config.queue_factor
        if f != 1.0:
            pools = [
                msgspec.structs.replace(
                    p,
                    cpus=p.cpus * f,
                    memory=int(p.memory * f),
                    gpus={k: math.floor(v * f) for k, v in p.gpus.items()},
                )
                for p in pools
            ]
        return pools

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

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        self._load()
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
        now = time.time()
        # write-ahead: the key -> array mapping is on disk before sbatch can run
        members = [
            _Member(
                key=m.key,
                array=req.name,
                index=m.index,
                job_dir=req.job_dir,
                attempt_dir=m.attempt_dir,
                outputs=list(m.outputs),
            )
            for m in req.members
        ]
        array = self._arrays.get(req.name) or _Array(
            name=req.name, job_dir=req.job_dir, submitted_at=now
        )
        self._append([_IndexLine(member=m) for m in members] + [_IndexLine(array=array)])
        for m in members:
            self._members[m.key] = m
        self._arrays[req.name] = array
        last = ""
        ambiguous = False
        for attempt in range(SUBMIT_TRIES):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt - 1, len(RETRY_BACKOFF_S) - 1)])
            try:
                job_id = None
                if attempt and not self.backend.locked_submit:
                    # the last try may have submitted before its answer was lost: look first
                    job_id = await self.backend.find(req.name)
                if job_id is None:
                    job_id = await self.backend.submit(req)
            except ProviderError as e:
                ambiguous = ambiguous or isinstance(e, TransportLost)
                if not e.retryable and not ambiguous:
                    return self._failed(req, str(e), retryable=False)
                last = str(e)
                if not e.retryable:
                    break
                continue
            array.job_id = job_id
            array.submitted_at = array.submitted_at or now
            self._poll_step, self._next_poll = 0, 0.0
            self._append([_IndexLine(array=array)])
            return [
                Report(
                    key=m.key,
                    state=ProviderState.QUEUED,
                    job_id=f"{job_id}_{m.index}",
                    message=f"submitted as array {job_id} ({req.name})",
                )
                for m in req.members
            ]
        if ambiguous:
            # a try may have reached sbatch before its connection broke: never report a
            # failure that would make the attempt run again under a new key. UNKNOWN leaves
            # the attempt to reconciliation, which finds the job by its name if it exists.
            return [
                Report(
                    key=m.key,
                    state=ProviderState.UNKNOWN,
                    message=f"submit outcome unknown (connection lost): {last}",
                )
                for m in req.members
            ]
        return self._failed(req, f"submit failed after {SUBMIT_TRIES} tries: {last}", True)

    def _failed(self, req: SlurmRequest, message: str, retryable: bool) -> list[Report]:
        from stowplan.spec.models import FailureClass

        failure = FailureClass.PROVIDER_TRANSIENT if retryable else FailureClass.PROVIDER_REJECTED
        return [
            Report(key=m.key, state=ProviderState.FAILED, failure=failure, message=message)
            for m in req.members
        ]

    # -- describe -----------------------------------------------------------------------------

    async def _lookup(self, keys: list[str]) -> None:
        """Find keys this instance has not seen in the remote job scripts (after a restart)."""
        found, job_ids = await self.backend.lookup(self.config.workdir, keys)
        base = self.config.workdir.rstrip("/") or "/"
        new: list[_IndexLine] = []
        wanted = set(keys)
        for key, (array, index, run_id, attempt, outputs) in found.items():
            if key not in wanted:
                continue
            job_dir = f"{base}/jobs/{array}"
            member = _Member(
                key=key,
                array=array,
                index=index,
                job_dir=job_dir,
                attempt_dir=f"{base}/runs/{run_id}/{attempt}",
                outputs=outputs,
            )
            self._members[key] = member
            new.append(_IndexLine(member=member))
            if array not in self._arrays or self._arrays[array].job_id is None:
                self._arrays[array] = _Array(name=array, job_dir=job_dir, job_id=job_ids.get(array))
                new.append(_IndexLine(array=self._arrays[array]))
        if new:
            self._append(new)

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        async with self._lock:
            return await self._describe(keys)

    async def _describe(self, keys: Sequence[str]) -> list[Report]:
        self._load()
        now = time.monotonic()
        if now < self._next_poll and all(k in self._seen or k in self._finished for k in keys):
            # polled a moment ago: answer from that poll (see POLL_BACKOFF_S)
            return [self._finished.get(k) or self._seen[k] for k in keys]
        reports = await self._poll(keys)
        changed = any(self._seen.get(r.key) != r for r in reports)
        self._seen.update((r.key, r) for r in reports if r.state not in TERMINAL_PROVIDER_STATES)
        for r in reports:
            if r.state in TERMINAL_PROVIDER_STATES:
                self._seen.pop(r.key, None)
        self._poll_step = 1 if changed else min(self._poll_step + 1, len(POLL_BACKOFF_S) - 1)
        self._next_poll = time.monotonic() + POLL_BACKOFF_S[self._poll_step]
        return reports

    async def _poll(self, keys: Sequence[str]) -> list[Report]:
        unseen = [k for k in keys if k not in self._members and k not in self._finished]
        if unseen:
            await self._lookup(unseen)
        live = [k for k in keys if k in self._members and k not in self._finished]
        rows: dict[tuple[str, int | None], tuple[JobRow | None, JobRow | None]] = {}
        if live:
            names = sorted({self._members[k].array for k in live})
            since = min(
                (self._arrays[n].submitted_at for n in names if n in self._arrays), default=0.0
            )
            days = 60 if not since else max(1, math.ceil((time.time() - since) / 86400) + 1)
            self.describe_calls += 1
            squeue, sacct = await self.backend.observe(names, days)
            for row in squeue:
                rows[(row.name, row.index)] = (
                    row,
                    rows.get((row.name, row.index), (None, None))[1],
                )
            for row in sacct:
                prev = rows.get((row.name, row.index), (None, None))
                if prev[1] is None or self._preferred(row, prev[1]):
                    rows[(row.name, row.index)] = (prev[0], row)
        out: list[Report] = []
        for key in keys:
            cached = self._finished.get(key)
            if cached is not None:
                out.append(cached)
                continue
            member = self._members.get(key)
            if member is None:
                out.append(Report(key=key, state=ProviderState.UNKNOWN, message="never submitted"))
                continue
            live_row, acct_row = rows.get((member.array, member.index), (None, None))
            report = self._report(member, live_row, acct_row)
            if report.state in TERMINAL_PROVIDER_STATES:
                self._finished[key] = report
            out.append(report)
        return out

    def _preferred(self, new: JobRow, old: JobRow) -> bool:
        """Of two sacct rows for one element, the one of the job id we submitted."""
        array = self._arrays.get(new.name)
        return array is not None and new.job_id == array.job_id and old.job_id != array.job_id

    def _report(self, m: _Member, live: JobRow | None, acct: JobRow | None) -> Report:
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
                message=f"array {m.array} index {m.index} is in neither squeue nor sacct",
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
            {o: f"{m.attempt_dir}/{o}" for o in m.outputs}
            if state is ProviderState.SUCCEEDED
            else {}
        )
        return Report(
            key=m.key,
            state=state,
            failure=failure,
            job_id=row.element_id,
            node=row.node,
            exit_code=row.exit_code,
            message=", ".join(parts),
            started_at=row.started_at,
            ended_at=row.ended_at,
            outputs=outputs,
        )

    # -- cancel / logs ------------------------------------------------------------------------

    async def cancel(self, keys: Sequence[str]) -> None:
        self._load()
        ids = []
        for key in keys:
            m = self._members.get(key)
            if m is None or key in self._finished:
                continue
            array = self._arrays.get(m.array)
            if array is not None and array.job_id is not None:
                ids.append(f"{array.job_id}_{m.index}")
        if not ids:
            return
        self._poll_step, self._next_poll = 0, 0.0
        await self.backend.cancel(ids)

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        self._load()
        if key not in self._members:
            await self._lookup([key])
        m = self._members.get(key)
        if m is None:
            return
        path = f"{m.job_dir}/logs/{m.index}.{'out' if stream == 'stdout' else 'err'}"
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
        await self.backend.aclose()


__all__ = ["SlurmProvider", "SlurmRequest", "TransportLost"]
