"""``SimProvider``: the provider interface over simulated pools, one provider per site.

It implements ``stowplan.providers.base.Provider`` (``discover``, ``plan``, ``submit``,
``describe``, ``cancel``, ``provision``, ``terminate``, ``logs``), with ``Capability.ELASTIC``;
the command shell awaits them in virtual time (each answers at once).

Pools behave like the systems they stand for, one class per discipline over a shared
``SimPool`` base (``POOL_CLASSES``, looked up once per pool when the provider is built):

- ``slurm`` (``SlurmPartition``): a partition of identical nodes. Jobs queue FIFO; when the
  head does not fit, an EASY-style backfill pass starts later jobs that fit now and end before
  the head's reservation. (The reservation is computed on the partition's GPU, or CPU, total;
  run-time estimates are the true run times, as if every user gave an exact time limit.) Jobs
  with more GPUs than a node take whole nodes.
- ``kubernetes`` (``KubernetesNodePool``): a node pool; pending pods are tried in order, each on
  the first node that fits (GPU best fit), honouring a service's per-node anti-affinity cap.
- ``cloud`` (``CloudInstanceType``): an instance type in a region, elastic up to
  ``max_instances``. ``provision`` (the scheduler core's ``Provision``, idempotent by token)
  starts instances that run work after the boot latency; ``terminate`` stops idle ones; each
  is billed per second from launch to stop (at least ``min_billed``). Discovery reports the
  pool as elastic: the node shape, the instances it may still launch, the boot time, and the
  booting and running instances as capacity. Jobs go on running instances as on Kubernetes
  nodes. Spot instances are reclaimed at ``interruptions_per_hour`` each (seeded), which fails
  their jobs as PREEMPTED.

Devices (``device_leases``, slurm and kubernetes): the pool tells the core its nodes and
devices, and starts each attempt on exactly the node and devices its lease names. Each device
is accounted in thousandths (``MILLI`` when whole): a job takes ``MILLI`` of each of its
devices, except a share of one GPU (``SimJob.gpu_milli`` below 1000) on a pool with
``gpu_sharing``, which takes its milli and runs beside other shares there. So a whole-GPU job
needs a device nothing runs on, and on a pool that does not share, a share holds its whole
device. An attempt whose leased devices lack the room (the attempt before it there is still
being stopped) waits for them (``device_waits``); a device is never over-committed.

Idempotency: a submit with a key the provider already holds returns that job; it never makes a
second. Every key executes at most once, and no run ever has two attempts executing at once;
both are asserted (``InternalError``) so that a scheduler bug cannot hide in a simulation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import ClassVar

from stowplan.errors import InternalError, ProviderError
from stowplan.placement.leases import MILLI, DeviceLease, NodeDevices, PoolDevices
from stowplan.placement.problem import NodeGroup, Pool, Shape
from stowplan.providers.base import (
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
    SingleRequest,
    command_of,
    request_name,
)
from stowplan.simulator.cluster import ClusterSpec, PoolKind, PoolSpec
from stowplan.simulator.engine import PRIO_INFRA, Engine
from stowplan.simulator.faults import ApiFaults
from stowplan.simulator.workloads import SimJob, Throughput
from stowplan.spec.models import FailureClass

INF = float("inf")


class SimRequest(SingleRequest, frozen=True, kw_only=True):
    """What a simulated submit carries: the attempt's key, its run, the job and the pool."""

    run_id: str
    attempt: int
    pool: str
    job: str
    lease: DeviceLease | None = None
    """the node and devices the scheduler core leased (pools with ``device_leases``)."""

    def render(self) -> str:
        where = f" node={self.lease.node} devices={self.lease.visible()}" if self.lease else ""
        return f"sim submit key={self.key} run={self.run_id} job={self.job} pool={self.pool}{where}"


class Attempt:
    """One submitted attempt, as the simulated provider tracks it."""

    __slots__ = (
        "alloc",
        "billed_from",
        "devices",
        "ended",
        "epoch",
        "failure",
        "instances",
        "job",
        "key",
        "lease",
        "message",
        "node_devices",
        "pool",
        "run_id",
        "started",
        "state",
        "submitted",
        "work_s",
    )

    def __init__(self, key: str, run_id: str, job: SimJob, pool: SimPool, now: float) -> None:
        self.key = key
        self.run_id = run_id
        self.job = job
        self.pool = pool
        self.state = ProviderState.QUEUED
        self.submitted = now
        self.started: float | None = None
        self.ended: float | None = None
        self.alloc: list[tuple[int, int, float, int]] = []
        self.instances = 0
        self.billed_from = 0.0
        self.epoch = 0
        self.failure: FailureClass | None = None
        self.message = ""
        self.work_s = 0.0
        self.lease: DeviceLease | None = None
        self.devices: tuple[int, ...] = ()
        """the device indices it holds on its (first) node while it runs (``device_leases``)"""
        self.node_devices: dict[int, tuple[int, ...]] = {}
        """node -> the device indices it holds there (a gang: one entry per node)"""

    def report(self) -> Report:
        return Report(
            key=self.key,
            state=self.state,
            failure=self.failure,
            job_id=self.key[:12],
            node=f"{self.pool.spec.name}-{self.alloc[0][0]}" if self.alloc else None,
            message=self.message,
            started_at=self.started,
            ended_at=self.ended,
        )


def _lease_text(lease: DeviceLease) -> str:
    """``k8s-0:0,1`` (a gang: ``+`` between its nodes): a lease, as refusals name it."""
    return "+".join(f"{name}:{','.join(map(str, devs))}" for name, devs in lease.parts())


class DataNet:
    """Where datasets live and what moving them costs: stage-in time, bytes and egress."""

    def __init__(self, cluster: ClusterSpec) -> None:
        self.cluster = cluster
        self.datasets = {d.name: d for d in cluster.datasets}
        self.bytes_moved = 0
        self.egress_cost = 0.0

    def stage_in(self, job: SimJob, site: str) -> tuple[float, int, float] | str:
        """(seconds, bytes, egress price) to bring the job's inputs to ``site``, or why not."""
        secs, moved, cost = 0.0, 0, 0.0
        for name in job.datasets:
            d = self.datasets.get(name)
            if d is None or site in d.sites:
                continue
            best = None
            for src in sorted(d.sites):
                link = self.cluster.link(src, site)
                if link is not None and (best is None or link.bytes_per_s > best.bytes_per_s):
                    best = link
            if best is None:
                return f"dataset {name} is at {', '.join(d.sites)} and no link reaches {site}"
            secs += d.size_bytes / best.bytes_per_s
            moved += d.size_bytes
            cost += d.size_bytes / 2**30 * best.egress_per_gib
        return secs, moved, cost


class SimPool:
    """What every simulated pool keeps: its queue, its running attempts and their accounting.

    A subclass is one pool discipline (``POOL_CLASSES``): it says where a job fits
    (``_fits``), why it never could (``_never_fits``), what starting and releasing hold and give
    back (``_hold``, ``_free``), and in what order the queue is tried (``_pass``). The attempt's
    life is the same everywhere: queued, (booting,) running, ended; each scheduled event carries
    the attempt's epoch, so an event of an attempt that ended meanwhile does nothing.
    """

    kind: ClassVar[PoolKind]

    def __init__(self, provider: SimProvider, spec: PoolSpec) -> None:
        self.provider = provider
        self.engine = provider.engine
        self.spec = spec
        self.model = (spec.gpu_model or "").lower()
        self.gpn = spec.gpus_per_node
        self.cpn = spec.cpus_per_node
        self.mpn = spec.memory_bytes
        self.units = spec.units
        self.instances = 0
        """cloud: instances launched now (0 for pools of fixed nodes)"""
        self.sharing = spec.gpu_sharing
        """shares of one GPU go side by side on a device (``gpu_sharing``)"""
        self.queue: dict[str, Attempt] = {}
        self.running: dict[str, Attempt] = {}
        self.used_milli = 0
        """GPU thousandths the running attempts hold (``gpu_milli_of``)"""
        self.used_c = 0.0
        self.busy_g_s = 0.0
        self.busy_c_s = 0.0
        self.cost = 0.0
        self._acct_at = 0.0
        self._pass_due = False
        self.preemptions = 0
        self.node_failures = 0
        self.backfilled = 0
        self.rng = self.engine.rng(f"pool/{spec.name}")

    # ---- capacity as the scheduler core sees it ----------------------------------------

    def core_pool(self) -> Pool:
        s = self.spec
        units = self._offered_units()
        return Pool(
            id=s.name,
            provider=self.provider.name,
            kind=s.kind.value,
            site=s.site,
            cpus=units * self.cpn,
            memory=units * self.mpn,
            gpus={self.model: units * self.gpn} if self.gpn else {},
            price_per_hour=s.price_per_hour,
            expected_wait_s=self._expected_wait_s(),
            hardware_class=self.model,
            devices=self._devices() if s.device_leases else None,
            # a pool that leases devices takes gangs (the lease names a part on each node)
            node_groups=(
                (
                    NodeGroup(
                        shape=Shape(
                            cpus=self.cpn,
                            memory=self.mpn,
                            gpus={self.model: self.gpn} if self.gpn else {},
                        ),
                        count=units,
                    ),
                )
                if s.device_leases and units
                else ()
            ),
        )

    def _offered_units(self) -> int:
        """Nodes (or instances) the core may place on now."""
        raise NotImplementedError

    def _devices(self) -> PoolDevices:
        """The nodes up and their devices, as the core leases them (``device_leases``)."""
        raise InternalError(f"{self.spec.name}: a {self.kind} pool leases no devices")

    def _leased(self, att: Attempt) -> list[tuple[int, int, float, int]] | None:
        """Where a leased attempt goes now: its node, if its devices are free (else None: it
        waits for them); a lease the pool cannot honour fails it."""
        raise InternalError(f"{self.spec.name}: a {self.kind} pool leases no devices")

    def _expected_wait_s(self) -> float:
        return 0.0

    @property
    def capacity_gpus(self) -> int:
        return self.units * self.gpn

    def device_milli(self, job: SimJob) -> int:
        """What ``job`` takes of each of its devices here: its share's milli on a pool that
        shares its GPUs, else the whole device (the ledger's rule, ``DeviceLedger.task``)."""
        if self.sharing and job.gpus == 1 and 0 < job.gpu_milli < MILLI:
            return job.gpu_milli
        return MILLI

    def gpu_milli_of(self, job: SimJob) -> int:
        """GPU thousandths ``job`` holds here while it runs (utilization counts these)."""
        return job.gpus * self.device_milli(job)

    def _account(self) -> None:
        now = self.engine.now
        dt = now - self._acct_at
        if dt > 0:
            self.busy_g_s += self.used_milli / MILLI * dt
            self.busy_c_s += self.used_c * dt
        self._acct_at = now

    # ---- run time ------------------------------------------------------------------------

    def work_seconds(self, job: SimJob) -> float | str:
        """How long ``job`` computes here, or why it cannot run here."""
        if job.duration is not None:
            return job.duration
        if job.steps:
            tp = self.provider.throughput
            rate = tp.rate(job.job_type, job.gpus, self.model) if tp and self.model else None
            if not rate:
                return f"no throughput for {job.job_type} x{job.gpus} on {self.model or 'CPU'}"
            return job.steps / rate
        return INF  # a service: runs until cancelled

    # ---- queueing --------------------------------------------------------------------------

    def request_pass(self) -> None:
        if not self._pass_due:
            self._pass_due = True
            self.engine.at(self.engine.now, self._pass_event, None, PRIO_INFRA + 1)

    def _pass_event(self, _: object) -> None:
        self._pass_due = False
        self.schedule()

    def schedule(self) -> None:
        """Start what the pool's discipline allows now."""
        if self.queue:
            self._pass()

    def _pass(self) -> None:
        """One pass over a non-empty queue: start what fits, in the discipline's order."""
        raise NotImplementedError

    def _fits(
        self, job: SimJob, only: set[int] | None = None
    ) -> list[tuple[int, int, float, int]] | None:
        """Where ``job`` would go now: (node, gpus, cpus, memory) per node, or None."""
        raise NotImplementedError

    def _never_fits(self, job: SimJob) -> str:
        """Why ``job`` could not run here even on an empty pool ('' if it could)."""
        raise NotImplementedError

    def _hold(self, att: Attempt, where: list[tuple[int, int, float, int]]) -> float:
        """Take what a starting attempt holds; return its boot seconds (0: it runs now)."""
        raise NotImplementedError

    def _free(self, att: Attempt) -> None:
        """Give back what ``_hold`` took."""
        raise NotImplementedError

    def _try_start(self, att: Attempt, only: set[int] | None = None) -> bool:
        job = att.job
        work = self.work_seconds(job)
        if isinstance(work, str):
            self.queue.pop(att.key, None)
            self.provider.finish(att, ProviderState.FAILED, FailureClass.PROVIDER_REJECTED, work)
            return True
        stage = self.provider.data.stage_in(job, self.spec.site) if job.datasets else (0.0, 0, 0.0)
        if isinstance(stage, str):
            self.queue.pop(att.key, None)
            self.provider.finish(att, ProviderState.FAILED, FailureClass.PROVIDER_REJECTED, stage)
            return True
        where = self._leased(att) if att.lease is not None else self._fits(job, only)
        if att.state is not ProviderState.QUEUED:
            return True  # the lease could not be honoured: failed
        if where is None:
            never = self._never_fits(job)
            if never:
                self.queue.pop(att.key, None)
                self.provider.finish(
                    att, ProviderState.FAILED, FailureClass.PROVIDER_REJECTED, never
                )
                return True
            return False
        self._account()
        self.queue.pop(att.key, None)
        now = self.engine.now
        boot = self._hold(att, where)
        self.used_milli += self.gpu_milli_of(job)
        self.used_c += job.cpus
        self.running[att.key] = att
        secs, moved, egress = stage
        self.provider.data.bytes_moved += moved
        self.provider.data.egress_cost += egress
        att.work_s = secs + work
        att.epoch += 1
        if boot:
            self.engine.at(now + boot, self._booted, (att, att.epoch), PRIO_INFRA)
        else:
            self._begin(att)
        return True

    def _booted(self, arg: tuple[Attempt, int]) -> None:
        att, epoch = arg
        if att.epoch == epoch and att.state is ProviderState.QUEUED:
            self._begin(att)

    def _begin(self, att: Attempt) -> float:
        """The attempt runs from now; returns when it will end (INF: never on its own)."""
        now = self.engine.now
        self.provider.started(att)
        end = now + att.work_s
        att.ended = end if end < INF else None
        if end < INF:
            self.engine.at(end, self._done, (att, att.epoch), PRIO_INFRA)
        return end

    def _done(self, arg: tuple[Attempt, int]) -> None:
        att, epoch = arg
        if att.epoch == epoch and att.state is ProviderState.RUNNING:
            self.release(att)
            self.provider.finish(att, ProviderState.SUCCEEDED, None, "")

    def release(self, att: Attempt) -> None:
        """Give back what a started attempt holds (it ended, failed or was cancelled)."""
        if self.running.pop(att.key, None) is None:
            return
        self._account()
        att.epoch += 1
        job = att.job
        self.used_milli -= self.gpu_milli_of(job)
        self.used_c -= job.cpus
        self._free(att)
        self.request_pass()

    # ---- faults ----------------------------------------------------------------------------

    def node_down(self, n: int) -> None:
        raise InternalError(f"{self.spec.name}: a {self.kind} pool has no nodes to fail")

    def node_up(self, n: int) -> None:
        raise InternalError(f"{self.spec.name}: a {self.kind} pool has no nodes to repair")

    def finish_accounting(self) -> None:
        """Close the books at the end of the simulation."""
        self._account()


class _NodePool(SimPool):
    """A fixed set of identical nodes (Slurm partitions, Kubernetes node pools).

    A job with more GPUs than a node takes whole nodes; any other job goes on one node, best
    fit on GPUs (fewest free that suffice, then the lowest index), honouring a service's
    per-node anti-affinity cap. Failed nodes leave the pool until repaired.
    """

    def __init__(self, provider: SimProvider, spec: PoolSpec) -> None:
        super().__init__(provider, spec)
        n = self.units
        self.free_g = [self.gpn] * n
        self.free_c = [self.cpn] * n
        self.free_m = [self.mpn] * n
        self.up = [True] * n
        self.on_node: list[dict[str, None]] = [{} for _ in range(n)]
        self.svc: list[dict[str, int]] = [{} for _ in range(n)]
        # up nodes by free GPU count (insertion-ordered dicts as ordered sets)
        self.by_free: list[dict[int, None]] = [{} for _ in range(self.gpn + 1)]
        if self.gpn:
            self.by_free[self.gpn] = dict.fromkeys(range(n))
        self.nodes_up = n
        self._dirty: set[int] = set()
        """nodes that gained capacity (a release, a repair) since the last first-fit pass"""
        self.holder: list[list[dict[str, int]]] = (
            [[{} for _ in range(self.gpn)] for _ in range(n)] if spec.device_leases else []
        )
        """``device_leases``: per node and device, the attempts running there and the milli
        each holds (one attempt with ``MILLI``, or shares summing to at most ``MILLI``);
        ``free_g`` counts the devices that hold nothing"""
        self.device_waits = 0
        """leased attempts that found a device of theirs without room, and waited for it"""

    def _offered_units(self) -> int:
        return self.nodes_up

    def _node_name(self, n: int) -> str:
        return f"{self.spec.name}-{n}"

    def _room(self, n: int, d: int) -> int:
        """Milli free on device ``d`` of node ``n`` (``device_leases``)."""
        return MILLI - sum(self.holder[n][d].values())

    def _devices(self) -> PoolDevices:
        return PoolDevices(
            sharing=self.sharing,
            nodes=tuple(
                NodeDevices(
                    name=self._node_name(n),
                    model=self.model,
                    devices=(MILLI,) * self.gpn,
                    cpus=self.cpn,
                    memory=self.mpn,
                )
                for n in range(len(self.up))
                if self.up[n]
            ),
        )

    def _leased(self, att: Attempt) -> list[tuple[int, int, float, int]] | None:
        lease, job = att.lease, att.job
        assert lease is not None
        prefix = self.spec.name + "-"
        parts = lease.parts()
        k = len(parts)
        gpus, cpus, memory = job.gpus // k, job.cpus / k, job.memory // k
        nodes = [int(name[len(prefix) :]) if name.startswith(prefix) else -1 for name, _ in parts]
        why = ""
        if k != max(1, job.nodes) or len(set(nodes)) != k:
            why = f"lease {_lease_text(lease)} names {k} nodes for a job of {max(1, job.nodes)}"
        for n, (_, devices) in zip(nodes, parts, strict=True):
            if why:
                break
            if not self.holder or not 0 <= n < len(self.up) or len(devices) != gpus:
                why = (
                    f"lease {_lease_text(lease)} for a {job.gpus}-GPU job names no "
                    f"node and devices of {self.spec.name}"
                )
            elif any(not 0 <= d < self.gpn for d in devices) or len(set(devices)) != len(devices):
                why = f"lease {_lease_text(lease)}: {self.spec.name} nodes have {self.gpn}"
        if why:
            self.queue.pop(att.key, None)
            self.provider.finish(att, ProviderState.FAILED, FailureClass.PROVIDER_REJECTED, why)
            return None
        use = self.device_milli(job)
        for n, (_, devices) in zip(nodes, parts, strict=True):
            if not self.up[n]:
                return None  # the node is down: wait for its repair, as the job would
            if any(self._room(n, d) < use for d in devices):
                self.device_waits += 1
                return None  # the attempt before it there is still being stopped
            if self.free_c[n] < cpus - 1e-9 or self.free_m[n] < memory:
                return None
        att.node_devices = {n: devices for n, (_, devices) in zip(nodes, parts, strict=True)}
        return [(n, gpus, cpus, memory) for n in nodes]

    def _never_fits(self, job: SimJob) -> str:
        # The core sees a pool's totals; nodes are what a job must fit on (Slurm refuses such
        # a job at submit time; a Kubernetes pod would stay Pending for ever).
        k = -(-job.gpus // self.gpn) if self.gpn and job.gpus > self.gpn else 1
        if job.gpus and not self.gpn:
            return f"{self.spec.name} has no GPUs"
        if k > self.units or job.cpus / k > self.cpn or job.memory / k > self.mpn:
            return (
                f"no node of {self.spec.name} ({self.cpn:g} CPUs, "
                f"{self.mpn / 2**30:.3g} GiB, {self.gpn} GPUs) can ever hold the job"
            )
        if job.max_per_node and job.service and k > 1:
            return f"{self.spec.name}: multi-node instances of {job.service}"
        return ""

    def _single_node(self, job: SimJob) -> bool:
        return job.gpus <= self.gpn or not self.gpn

    def _fits_among(self, job: SimJob, nodes: set[int]) -> list[tuple[int, int, float, int]] | None:
        """Best fit (fewest free GPUs, then lowest index) among ``nodes`` for a one-node job."""
        g = job.gpus
        if self._shares(job):
            return self._share_fit(job, sorted(nodes))
        best: tuple[int, int] | None = None
        for n in nodes:
            if (
                self.up[n]
                and self.free_g[n] >= g
                and self.free_c[n] >= job.cpus
                and self.free_m[n] >= job.memory
                and self._anti_ok(job, n)
            ):
                key = (self.free_g[n] if g else 0, n)
                if best is None or key < best:
                    best = key
        return None if best is None else [(best[1], g, job.cpus, job.memory)]

    def _fits(
        self, job: SimJob, only: set[int] | None = None
    ) -> list[tuple[int, int, float, int]] | None:
        """``only``: the caller knows no other node can hold this one-node job (see
        ``KubernetesNodePool._pass``)."""
        if only is not None:
            return self._fits_among(job, only)
        g = job.gpus
        if g > self.gpn and self.gpn:
            k = -(-g // self.gpn)
            whole = self.by_free[self.gpn]
            if len(whole) < k:
                return None
            c, m = job.cpus / k, job.memory // k
            nodes = []
            for n in whole:
                if self.free_c[n] >= c and self.free_m[n] >= m and self._anti_ok(job, n):
                    nodes.append(n)
                    if len(nodes) == k:
                        return [(n, self.gpn, c, m) for n in nodes]
            return None
        if g and not self.gpn:
            return None
        if self._shares(job):
            return self._share_fit(job, range(len(self.up)))
        if g:
            for free in range(g, self.gpn + 1):  # best fit on GPUs
                for n in self.by_free[free]:
                    if (
                        self.free_c[n] >= job.cpus
                        and self.free_m[n] >= job.memory
                        and self._anti_ok(job, n)
                    ):
                        return [(n, g, job.cpus, job.memory)]
            return None
        for n in range(len(self.up)):
            if (
                self.up[n]
                and self.free_c[n] >= job.cpus
                and self.free_m[n] >= job.memory
                and self._anti_ok(job, n)
            ):
                return [(n, 0, job.cpus, job.memory)]
        return None

    def _shares(self, job: SimJob) -> bool:
        """``job`` is a share that may go beside others on a device here."""
        return bool(self.holder) and self.device_milli(job) < MILLI

    def _share_fit(
        self, job: SimJob, nodes: Iterable[int]
    ) -> list[tuple[int, int, float, int]] | None:
        """Best fit for a share: the node whose roomiest device has the least room that
        suffices, then the lowest index (``_take`` puts it on that node's tightest device)."""
        use = self.device_milli(job)
        best: tuple[int, int] | None = None
        for n in nodes:
            if (
                self.up[n]
                and self.free_c[n] >= job.cpus
                and self.free_m[n] >= job.memory
                and self._anti_ok(job, n)
            ):
                rooms = [r for r in (self._room(n, d) for d in range(self.gpn)) if r >= use]
                if rooms and (best is None or (min(rooms), n) < best):
                    best = (min(rooms), n)
        return None if best is None else [(best[1], 1, job.cpus, job.memory)]

    def _anti_ok(self, job: SimJob, n: int) -> bool:
        return not job.max_per_node or self.svc[n].get(job.service, 0) < job.max_per_node

    def _hold(self, att: Attempt, where: list[tuple[int, int, float, int]]) -> float:
        for n, g, c, m in where:
            self._take(n, g, c, m, att)
        att.alloc = where
        if where:
            att.devices = att.node_devices.get(where[0][0], ())
        return 0.0

    def _free(self, att: Attempt) -> None:
        for n, g, c, m in att.alloc:
            self._give(n, g, c, m, att)
        att.node_devices = {}

    def _take(self, n: int, g: int, c: float, m: int, att: Attempt) -> None:
        if self.holder and g:
            held = self.holder[n]
            use = self.device_milli(att.job)
            devices = att.node_devices.get(n) or self._pick(n, g, use)
            for d in devices:
                if self._room(n, d) < use:  # a device over-committed: a scheduler bug
                    others = ", ".join(f"{k[:12]} ({v})" for k, v in sorted(held[d].items()))
                    raise InternalError(
                        f"{self._node_name(n)} device {d}: attempt {att.key[:12]} over-books "
                        f"it by taking {use} milli, held by {others}"
                    )
            g = sum(1 for d in devices if not held[d])  # devices nothing ran on until now
            for d in devices:
                held[d][att.key] = use
            att.node_devices[n] = tuple(devices)
        if self.gpn:
            del self.by_free[self.free_g[n]][n]
            self.free_g[n] -= g
            self.by_free[self.free_g[n]][n] = None
        self.free_c[n] -= c
        self.free_m[n] -= m
        self.on_node[n][att.key] = None
        if att.job.service:
            self.svc[n][att.job.service] = self.svc[n].get(att.job.service, 0) + 1

    def _pick(self, n: int, g: int, use: int) -> tuple[int, ...]:
        """Devices for an attempt that came without a lease: the tightest with room for a
        share, else the first ``g`` that hold nothing."""
        if use < MILLI:
            rooms = [(self._room(n, d), d) for d in range(self.gpn)]
            return (min((r, d) for r, d in rooms if r >= use)[1],)
        return tuple(d for d, k in enumerate(self.holder[n]) if not k)[:g]

    def _give(self, n: int, g: int, c: float, m: int, att: Attempt) -> None:
        if self.holder and g:
            held = self.holder[n]
            g = 0
            for d in att.node_devices.get(n, ()):
                if held[d].pop(att.key, None) is not None and not held[d]:
                    g += 1  # the device holds nothing now
        self._dirty.add(n)
        if self.gpn and self.up[n]:
            del self.by_free[self.free_g[n]][n]
        self.free_g[n] += g
        if self.gpn and self.up[n]:
            self.by_free[self.free_g[n]][n] = None
        self.free_c[n] += c
        self.free_m[n] += m
        self.on_node[n].pop(att.key, None)
        if att.job.service:
            self.svc[n][att.job.service] -= 1

    def node_down(self, n: int) -> None:
        if not self.up[n]:
            return
        self.node_failures += 1
        for key in list(self.on_node[n]):
            att = self.running.get(key)
            if att is not None:
                self.release(att)
                self.provider.finish(
                    att,
                    ProviderState.FAILED,
                    FailureClass.NODE_FAILURE,
                    f"node {self.spec.name}-{n} failed",
                )
        if self.gpn:
            del self.by_free[self.free_g[n]][n]
        self.up[n] = False
        self.nodes_up -= 1
        self.provider.capacity_changed()

    def node_up(self, n: int) -> None:
        if self.up[n]:
            return
        self.up[n] = True
        self._dirty.add(n)
        self.nodes_up += 1
        if self.gpn:
            self.by_free[self.free_g[n]][n] = None
        self.provider.capacity_changed()
        self.request_pass()


class SlurmPartition(_NodePool):
    """A Slurm partition: FIFO, with an EASY-style backfill pass behind a blocked head.

    Later jobs start now if they fit and end before the head's reservation (its shadow time,
    computed on the partition's GPU, or CPU, total; run-time estimates are the true run times,
    as if every user gave an exact time limit). At most ``backfill_depth`` jobs behind the head
    are looked at per pass.
    """

    kind = PoolKind.SLURM

    def _pass(self) -> None:
        q = self.queue
        while q:
            head = next(iter(q.values()))
            if not self._try_start(head):
                break
        if len(q) < 2:
            return
        head = next(iter(q.values()))
        candidates = []
        failed: set[tuple[object, ...]] = set()
        for att in list(q.values())[1 : 1 + self.spec.backfill_depth]:
            j = att.job
            shape = (j.gpus, j.gpu_milli, j.cpus, j.memory, j.service, j.max_per_node, att.lease)
            if shape in failed:
                continue
            if self._fits(j) is not None:
                candidates.append(att)
            else:
                failed.add(shape)
        if not candidates:
            return
        shadow = self._shadow_time(head.job)
        now = self.engine.now
        for att in candidates:
            w = self.work_seconds(att.job)
            est = w if isinstance(w, float) else 0.0
            est += self._stage_seconds(att.job)
            if now + est <= shadow and self._try_start(att):
                self.backfilled += 1

    def _stage_seconds(self, job: SimJob) -> float:
        if not job.datasets:
            return 0.0
        s = self.provider.data.stage_in(job, self.spec.site)
        return s[0] if isinstance(s, tuple) else 0.0

    def _shadow_time(self, job: SimJob) -> float:
        """When the head job could start if running jobs end on time (pool totals)."""
        need: float
        free: float
        ends: list[tuple[float, float]]
        if self.gpn:
            need = job.gpus
            free = sum(self.free_g[n] for n in range(len(self.up)) if self.up[n])
        else:
            need = job.cpus
            free = sum(self.free_c[n] for n in range(len(self.up)) if self.up[n])
        ends = sorted(
            (a.ended if a.ended is not None else INF, a.job.gpus if self.gpn else a.job.cpus)
            for a in self.running.values()
        )
        for end, amount in ends:
            if free >= need:
                break
            free += amount
            if free >= need:
                return end
        return self.engine.now if free >= need else INF


class KubernetesNodePool(_NodePool):
    """A Kubernetes node pool: pending pods are tried in order, each on the first node that fits.

    NOTE: a pod shape that fit on no node stays infeasible on every node that has not gained
    capacity since: such shapes are tried on the nodes freed since the last pass only, and once
    per pass (nothing is freed during a pass). Exact, and it keeps a pass over thousands of
    pending pods on thousands of nodes from scanning every node each time.
    """

    kind = PoolKind.KUBERNETES

    def __init__(self, provider: SimProvider, spec: PoolSpec) -> None:
        super().__init__(provider, spec)
        self._failed: set[tuple[object, ...]] = set()

    def _pass(self) -> None:
        failed: set[tuple[object, ...]] = set()
        before, dirty = self._failed, self._dirty
        self._dirty = set()
        for att in list(self.queue.values())[: max(self.spec.backfill_depth, 1000)]:
            j = att.job
            shape = (
                j.gpus,
                j.gpu_milli,
                j.cpus,
                j.memory,
                j.gpu_types,
                j.service,
                j.max_per_node,
                att.lease,
            )
            if shape in failed:
                continue
            only = dirty if shape in before and self._single_node(j) else None
            if not self._try_start(att, only):
                failed.add(shape)
        self._failed = failed


class CloudInstanceType(_NodePool):
    """An instance type in a region, elastic up to ``max_instances``.

    Instances are started by the provider's ``provision`` and stopped by its ``terminate``
    (the scheduler core decides both); each is a node of the pool's shape that runs work after
    the boot latency and is billed per second from its launch until it stops (at least
    ``min_billed``). Jobs go on running instances as pods go on Kubernetes nodes (GPU best
    fit; a job with more GPUs than an instance takes whole instances); a job sent for an
    instance still booting waits in the queue, tried in order. Spot instances are reclaimed
    at ``interruptions_per_hour`` each (seeded): the jobs on one fail as PREEMPTED and the
    instance is gone (billed until then).

    Slots: the pool has ``max_instances`` node slots; a slot holds no instance, a booting one
    or a running one (``up``). The scheduler core sees booting and running instances as the
    pool's capacity, the empty slots as ``max_instances`` it may still launch.
    """

    kind = PoolKind.CLOUD

    def __init__(self, provider: SimProvider, spec: PoolSpec) -> None:
        super().__init__(provider, spec)
        n = self.units
        self.up = [False] * n
        self.nodes_up = 0
        if self.gpn:
            self.by_free[self.gpn] = {}
        self.instance_of: list[str | None] = [None] * n
        """the instance in each slot (None: empty)"""
        self.launched_at = [0.0] * n
        self.slot_epoch = [0] * n
        self.booting: set[int] = set()
        self.started_by: dict[str, list[str]] = {}
        """provision token -> the instances it started (a retried token starts nothing)"""
        self.stopped_by: set[str] = set()
        self.launches = 0
        self.instance_s = 0.0
        """instance-seconds of instances stopped (and, after ``finish_accounting``, of all)"""
        self._serial = 0

    # ---- capacity as the scheduler core sees it ----------------------------------------

    def core_pool(self) -> Pool:
        s = self.spec
        n = self.instances
        return Pool(
            id=s.name,
            provider=self.provider.name,
            kind=s.kind.value,
            site=s.site,
            cpus=n * self.cpn,
            memory=n * self.mpn,
            gpus={self.model: n * self.gpn} if self.gpn else {},
            node=Shape(
                cpus=self.cpn, memory=self.mpn, gpus={self.model: self.gpn} if self.gpn else {}
            ),
            price_per_hour=s.price_per_hour,
            spot=s.spot,
            interruption_rate=s.interruptions_per_hour,
            max_instances=self.units - n,
            boot_s=s.boot_s,
            hardware_class=self.model,
        )

    def _offered_units(self) -> int:
        return self.instances

    # ---- instances -----------------------------------------------------------------------

    def provision(self, count: int, token: str) -> list[str]:
        """Start up to ``count`` instances (as many as empty slots allow); idempotent by
        ``token``. Raises a non-retryable ``ProviderError`` when no slot is empty."""
        ids = self.started_by.get(token)
        if ids is not None:
            return ids
        empty = [n for n in range(self.units) if self.instance_of[n] is None][:count]
        if not empty:
            raise ProviderError(
                f"{self.spec.name}: all {self.units} instances are running (max_instances)",
                provider=self.provider.name,
                retryable=False,
            )
        now = self.engine.now
        ids = []
        for n in empty:
            self._serial += 1
            iid = f"{self.spec.name}-i{self._serial}"
            self.instance_of[n] = iid
            self.launched_at[n] = now
            self.slot_epoch[n] += 1
            self.booting.add(n)
            self.instances += 1
            self.launches += 1
            self.engine.at(
                now + self.spec.boot_s, self._booted_slot, (n, self.slot_epoch[n]), PRIO_INFRA
            )
            ids.append(iid)
        self.started_by[token] = ids
        self.provider.capacity_changed()
        return ids

    def terminate(self, count: int, token: str) -> None:
        """Stop up to ``count`` running instances that hold no attempt (the last slots first);
        idempotent by ``token``. Booting instances are left alone."""
        if token in self.stopped_by:
            return
        self.stopped_by.add(token)
        idle = [n for n in reversed(range(self.units)) if self.up[n] and not self.on_node[n]]
        for n in idle[:count]:
            self._stop(n)
        if idle[:count]:
            self.provider.capacity_changed()

    def _booted_slot(self, arg: tuple[int, int]) -> None:
        n, epoch = arg
        if self.slot_epoch[n] != epoch or n not in self.booting:
            return
        self.booting.discard(n)
        self.up[n] = True
        self.nodes_up += 1
        self._dirty.add(n)
        if self.gpn:
            self.by_free[self.free_g[n]][n] = None
        self.request_pass()
        rate = self.spec.interruptions_per_hour
        if self.spec.spot and rate and self.provider.inject:
            gone = self.engine.now + self.rng.expovariate(rate / 3600.0)
            self.engine.at(gone, self._reclaimed, (n, epoch), PRIO_INFRA)

    def _reclaimed(self, arg: tuple[int, int]) -> None:
        n, epoch = arg
        if self.slot_epoch[n] != epoch or not self.up[n]:
            return
        for key in list(self.on_node[n]):
            att = self.running.get(key)
            if att is not None:
                self.preemptions += 1
                self.release(att)
                self.provider.finish(
                    att, ProviderState.FAILED, FailureClass.PREEMPTED, "spot instance reclaimed"
                )
        self._stop(n)
        self.provider.capacity_changed()

    def _stop(self, n: int) -> None:
        """The instance in slot ``n`` stops (it holds no attempt): bill it, empty the slot."""
        now = self.engine.now
        self._bill(now - self.launched_at[n])
        if self.up[n]:
            if self.gpn:
                del self.by_free[self.free_g[n]][n]
            self.up[n] = False
            self.nodes_up -= 1
        self.booting.discard(n)
        self.instance_of[n] = None
        self.slot_epoch[n] += 1
        self.instances -= 1

    def _bill(self, seconds: float) -> None:
        self.instance_s += seconds
        self.cost += max(self.spec.min_billed_s, seconds) * self.spec.price_per_hour / 3600.0

    # ---- queueing --------------------------------------------------------------------------

    def _pass(self) -> None:
        failed: set[tuple[object, ...]] = set()
        for att in list(self.queue.values())[: max(self.spec.backfill_depth, 1000)]:
            j = att.job
            shape = (j.gpus, j.gpu_milli, j.cpus, j.memory, j.gpu_types, j.service, j.max_per_node)
            if shape in failed:
                continue
            if not self._try_start(att):
                failed.add(shape)

    def node_down(self, n: int) -> None:
        raise InternalError(
            f"{self.spec.name}: a cloud pool has no nodes to fail (spot instances are reclaimed)"
        )

    def node_up(self, n: int) -> None:
        raise InternalError(f"{self.spec.name}: a cloud pool has no nodes to repair")

    def finish_accounting(self) -> None:
        """Close the books: bill every instance still there until now."""
        super().finish_accounting()
        now = self.engine.now
        for n in range(self.units):
            if self.instance_of[n] is not None:
                self._bill(now - self.launched_at[n])
                self.launched_at[n] = now


POOL_CLASSES: dict[PoolKind, type[SimPool]] = {
    PoolKind.SLURM: SlurmPartition,
    PoolKind.KUBERNETES: KubernetesNodePool,
    PoolKind.CLOUD: CloudInstanceType,
}
"""the discipline that simulates each kind of pool"""


def pool_class(kind: PoolKind) -> type[SimPool]:
    """The simulated pool class for ``kind``; every ``PoolKind`` has one."""
    cls = POOL_CLASSES.get(kind)
    if cls is None:
        known = ", ".join(sorted(k.value for k in POOL_CLASSES))
        raise InternalError(f"no simulated pool discipline for kind {kind!r} (known: {known})")
    return cls


ReportSink = Callable[[str, Report], None]


class SimProvider(Provider):
    """All simulated pools of one site, behind the provider interface."""

    capabilities = Capabilities(
        has=frozenset(
            {
                Capability.GPUS,
                Capability.CANCEL_MEMBER,
                Capability.CONTAINERS,
                Capability.SECRETS,
                Capability.ELASTIC,
                Capability.OUTPUTS,
            }
        ),
        why_not={
            Capability.LOGS: "simulated jobs produce no output",
            Capability.ARRAYS: "one submit per attempt",
            Capability.RUNS: "simulated jobs run nothing",
        },
    )

    def __init__(
        self,
        name: str,
        pools: Sequence[PoolSpec],
        engine: Engine,
        *,
        jobs: Callable[[str], SimJob],
        data: DataNet,
        faults: ApiFaults,
        throughput: Throughput | None = None,
        sink: ReportSink | None = None,
        on_capacity: Callable[[str], None] | None = None,
        inject: bool = True,
    ) -> None:
        self.name = name
        self.inject = inject
        """False: no spot interruptions (the other faults come from ``faults`` and the shell)"""
        self.engine = engine
        self.job_of = jobs
        self.data = data
        self.api = faults
        self.throughput = throughput
        self.sink = sink
        self.on_capacity = on_capacity
        self.pools: dict[str, SimPool] = {}
        for spec in pools:
            self.pools[spec.name] = pool_class(spec.kind)(self, spec)
        self.attempts: dict[str, Attempt] = {}
        self.executed: set[str] = set()
        self.executing_runs: dict[str, str] = {}
        self.duplicate_submits = 0
        self.held: list[Report] = []
        self._quiet: set[str] | None = None
        self.leases: dict[str, DeviceLease] = {}
        """attempt key -> the core's device lease, as the shell's records hand it over (the
        ``SubmitItem``'s; a ``LaunchSpec`` does not carry it)"""

    # ---- the interface -------------------------------------------------------------------

    async def discover(self) -> list[Pool]:
        return self.core_pools()

    def core_pools(self) -> list[Pool]:
        return sorted((p.core_pool() for p in self.pools.values()), key=lambda p: p.id)

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        for la in launches:
            try:  # a simulated job runs nothing, but its launch is checked as a real one is
                command_of(la)
            except ValueError as e:
                raise ProviderError(
                    f"attempt {la.key!r}: {e}", provider=self.name, retryable=False
                ) from None
        return [
            SimRequest(
                keys=(la.key,),
                name=request_name([la.key]),
                run_id=la.run_id,
                attempt=la.attempt,
                pool=la.pool,
                job=la.name,
                lease=self.leases.get(la.key),
            )
            for la in launches
        ]

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        return self.submit_now(requests)

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        return self.describe_now(keys)

    async def cancel(self, keys: Sequence[str]) -> None:
        self.cancel_now(keys)

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        """Start instances of a cloud pool (``CloudInstanceType.provision``). May raise a
        retryable error before (the API's faults) or after (an answer lost: the retry with the
        same token finds the same instances)."""
        self.api.check("provision")
        ids = self._cloud(pool).provision(count, token)
        if self.api.answer_lost():
            raise ProviderError(
                "provision: connection reset before the answer", provider=self.name, retryable=True
            )
        return ids

    async def terminate(self, pool: str, count: int, token: str) -> None:
        self.api.check("terminate")
        self._cloud(pool).terminate(count, token)

    def _cloud(self, pool: str) -> CloudInstanceType:
        p = self.pools.get(pool)
        if not isinstance(p, CloudInstanceType):
            why = "no such pool" if p is None else f"a {p.kind.value} pool has fixed nodes"
            raise ProviderError(
                f"cannot provision or terminate instances of {pool}: {why}",
                provider=self.name,
                retryable=False,
            )
        return p

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        del key, stream, follow
        empty: tuple[bytes, ...] = ()
        for chunk in empty:  # simulated jobs write nothing
            yield chunk

    # ---- synchronous halves, for the simulator's shell ---------------------------------------

    def submit_now(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        """Idempotent: a key already held returns its job. May raise a retryable error."""
        self.api.check("submit")
        now = self.engine.now
        touched: list[SimPool] = []
        batch: list[Attempt] = []
        for req in requests:
            if not isinstance(req, SimRequest):
                raise InternalError(f"{self.name}: not a simulator request: {req!r}")
            att = self.attempts.get(req.key)
            if att is not None:
                self.duplicate_submits += 1
                batch.append(att)
                continue
            pool = self.pools.get(req.pool)
            if pool is None:
                raise ProviderError(f"no pool {req.pool}", provider=self.name, retryable=False)
            att = Attempt(req.key, req.run_id, self.job_of(req.job), pool, now)
            att.lease = req.lease
            self.attempts[req.key] = att
            pool.queue[att.key] = att
            batch.append(att)
            if pool not in touched:
                touched.append(pool)
        self._quiet = {a.key for a in batch}
        try:
            for pool in touched:
                pool.schedule()
        finally:
            self._quiet = None
        if self.api.answer_lost():
            raise ProviderError(
                "submit: connection reset before the answer", provider=self.name, retryable=True
            )
        return [a.report() for a in batch]

    def describe_now(self, keys: Sequence[str]) -> list[Report]:
        self.api.check("describe")
        out = []
        for k in keys:
            att = self.attempts.get(k)
            out.append(
                att.report()
                if att is not None
                else Report(key=k, state=ProviderState.UNKNOWN, message="no such job")
            )
        return out

    def cancel_now(self, keys: Sequence[str]) -> None:
        self.api.check("cancel")
        for k in keys:
            att = self.attempts.get(k)
            if att is None or att.state not in (ProviderState.QUEUED, ProviderState.RUNNING):
                continue
            att.pool.queue.pop(k, None)
            att.pool.release(att)
            self.finish(att, ProviderState.CANCELLED, None, "cancelled")

    # ---- what pools tell the provider ----------------------------------------------------

    def started(self, att: Attempt) -> None:
        if att.key in self.executed:
            raise InternalError(f"attempt key {att.key[:12]} executed twice")
        other = self.executing_runs.get(att.run_id)
        if other is not None:
            raise InternalError(
                f"run {att.run_id} started attempt {att.key[:12]} while {other[:12]} executes"
            )
        self.executed.add(att.key)
        self.executing_runs[att.run_id] = att.key
        att.state = ProviderState.RUNNING
        att.started = self.engine.now
        self._emit(att)

    def finish(
        self, att: Attempt, state: ProviderState, failure: FailureClass | None, message: str
    ) -> None:
        if self.executing_runs.get(att.run_id) == att.key:
            del self.executing_runs[att.run_id]
        att.state = state
        att.failure = failure
        att.message = message
        att.ended = self.engine.now
        self._emit(att)

    def _emit(self, att: Attempt) -> None:
        if self._quiet is not None and att.key in self._quiet:
            return
        rep = att.report()
        if not self.api.reachable:
            self.held.append(rep)  # the watch is cut off: delivered when the site is back
        elif self.sink is not None:
            self.sink(self.name, rep)

    def capacity_changed(self) -> None:
        if self.on_capacity is not None:
            self.on_capacity(self.name)

    def set_reachable(self, up: bool) -> None:
        self.api.reachable = up
        if up and self.held and self.sink is not None:
            held, self.held = self.held, []
            for rep in held:
                self.sink(self.name, rep)
