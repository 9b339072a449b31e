"""Why a task went where it went, what else it could have had, or why it cannot go anywhere.

In a pool that knows its devices (``Pool.devices``) the answer names the node and the devices
the task gets, as the scheduler core would lease them (the tasks the solution puts there
placed in its order, by the deployment's packing objective); a task the pool's totals admit
but no node's devices can hold is not placed, and the reason says the capacity is there only
in pieces ("5 GPUs free on 5 nodes, none has 2 free devices"). Where the caller fed the
solution to the scheduler core (``stowplan plan`` does, as ``run`` would), what the core made
of it is given (``leases``, ``refused``) and is the answer: the devices are not played out
again here.
"""

from __future__ import annotations

from collections.abc import Mapping

from msgspec import Struct, field

from stowplan.placement.devices import MILLI, DeviceLedger, Objective
from stowplan.placement.leases import DeviceLease
from stowplan.placement.problem import DemandClass, PlacementProblem, PlacementSolution, expand
from stowplan.placement.table import build, instance_dollars, pool_reasons


class Alternative(Struct, frozen=True, kw_only=True):
    pool: str
    gpu_model: str = ""
    cost: float
    """Weighted cost of one task there, in the currency of the prices."""
    compute_cost: float
    data_bytes: float
    egress_cost: float
    wait_seconds: float
    free_now: bool
    """Whether capacity was left there after this placement (else it was taken by others)."""
    instance_price_per_hour: float = 0.0
    """Where the pool is elastic: what one instance costs an hour, billed whole on top of
    ``cost`` (which then counts no compute)."""


class Instances(Struct, frozen=True, kw_only=True):
    """What an elastic pool bills: whole instances, whatever share of one a task uses."""

    pool: str
    price_per_hour: float
    """Of one instance."""
    launched: int
    """Instances this placement launches there."""
    hours_each: float
    """Hours one instance is billed for: its boot, then the longest run among the tasks that
    may go there."""
    dollars_each: float
    """``price_per_hour`` times those hours, with the work a spot interruption makes it redo."""


class Explanation(Struct, frozen=True, kw_only=True):
    task: str
    placed: bool
    pool: str | None = None
    gpu_model: str = ""
    status: str
    chosen: Alternative | None = None
    alternatives: list[Alternative] = field(default_factory=list)
    """The cheapest other options, cheapest first."""
    reason: str = ""
    """Why it was not placed: nowhere eligible (with each cause), or no capacity left."""
    instances: Instances | None = None
    """Where the chosen pool is elastic: the instances it bills (its tasks' compute is 0)."""
    devices: DeviceLease | None = None
    """Where the chosen pool knows its devices: the node and device indices it gets there."""
    gpu_milli: int = MILLI
    """Thousandths of its GPU it takes there: below ``MILLI`` for a share of one device."""

    def render(self) -> str:
        if self.placed and self.chosen is not None:
            c = self.chosen
            lines = [
                f"{self.task} -> {self.pool}{' on ' + self.gpu_model if self.gpu_model else ''}"
                f" ({self.status}): cost {c.cost:.4g} = compute {c.compute_cost:.4g}, "
                f"{c.data_bytes / 1e9:.3g} GB moved (egress {c.egress_cost:.4g}), "
                f"wait {c.wait_seconds:.0f} s"
            ]
            if self.devices is not None:
                lines.append(f"  {self.pool}: {lease_text(self.devices, self.gpu_milli)}")
        else:
            lines = [f"{self.task} not placed ({self.status}): {self.reason}"]
        if self.instances is not None:
            i = self.instances
            lines.append(
                f"  {i.pool} bills whole instances: {i.launched} launched at "
                f"${i.price_per_hour:.4g}/h each, each billed {i.hours_each:.3g} h "
                f"(boot, then the longest run) = ${i.dollars_each:.4g}; "
                f"${i.launched * i.dollars_each:.4g} in all"
            )
        for a in self.alternatives:
            note = "" if a.free_now else " (full)"
            if a.instance_price_per_hour:
                note += f" + instances at ${a.instance_price_per_hour:.4g}/h"
            lines.append(
                f"  instead {a.pool}{' on ' + a.gpu_model if a.gpu_model else ''}: "
                f"cost {a.cost:.4g}{note}"
            )
        return "\n".join(lines)


def lease_text(lease: DeviceLease, milli: int = MILLI) -> str:
    """``node myhost, GPUs 0,1``: where a lease puts a run (``no GPU`` for one that holds none;
    no node where the pool counts such runs only in its totals); ``0.25 of GPU 0`` for a run
    that takes ``milli`` of one device; a gang's nodes one after another, ``; `` between."""
    if lease.others:
        return "; ".join(lease_text(DeviceLease(n, d), milli) for n, d in lease.parts())
    n = len(lease.devices)
    gpus = f"GPU{'s' if n != 1 else ''} {lease.visible()}" if n else "no GPU"
    if n == 1 and 0 < milli < MILLI:
        gpus = f"{milli / MILLI:g} of {gpus}"
    return f"node {lease.node}, {gpus}" if lease.node else gpus


def _on_devices(
    problem: PlacementProblem,
    solution: PlacementSolution,
    pool_id: str,
    task_id: str | None,
    objective: Objective,
) -> tuple[DeviceLedger, DemandClass | None, str | None]:
    """The devices of ``pool_id`` once the tasks the solution puts there before ``task_id``
    (all of them for None) took theirs; ``task_id``'s class; why it found none ("" when it
    did; None when it needs nothing the devices count)."""
    pool = next(p for p in problem.pools if p.id == pool_id)
    assert pool.devices is not None
    ledger = DeviceLedger(pool.devices, objective=objective)
    classes = {m: c for c in problem.classes for m in c.members}
    for a in expand(problem, solution):
        if a.pool_id != pool_id:
            continue
        c = classes[a.class_id]
        models = (a.gpu_model,) if a.gpu_model else c.gpu_types or tuple(sorted(pool.gpus))
        task = ledger.task(c.cpus, c.memory, c.gpus, models, c.gpu_milli, c.nodes)
        if task is None:
            if a.class_id == task_id:
                return ledger, c, None
            continue
        why = ledger.take(a.class_id, task)
        if a.class_id == task_id:
            return ledger, c, why or ""
    return ledger, None, None


def _fragmented(
    problem: PlacementProblem, solution: PlacementSolution, cls: DemandClass, objective: Objective
) -> list[str]:
    """For an unplaced class that asks for GPUs: what each pool that knows its devices has
    left, and why none of it holds one member."""
    out = []
    for p in problem.pools:
        if p.devices is None or not cls.gpus:
            continue
        models = tuple(m for m in (cls.gpu_types or tuple(sorted(p.gpus))) if m in p.gpus)
        if not models:
            continue
        ledger, _, _ = _on_devices(problem, solution, p.id, None, objective)
        task = ledger.task(cls.cpus, cls.memory, cls.gpus, models, cls.gpu_milli, cls.nodes)
        why = ledger.model.why_not_gang(task) if task is not None else None
        if why:
            out.append(f"{p.id}: {why}")
    return out


def explain(
    problem: PlacementProblem,
    solution: PlacementSolution,
    task_id: str,
    *,
    top: int = 3,
    objective: Objective = "fgd",
    leases: Mapping[str, DeviceLease] | None = None,
    refused: Mapping[str, str] | None = None,
) -> Explanation:
    """Where ``task_id`` went in ``solution`` and the ``top`` best alternatives, or why not;
    in a pool that knows its devices, on which node and devices (packed by ``objective``, the
    deployment's ``[placement] objective``), or why its devices hold no more.

    ``leases`` and ``refused``: what the scheduler core made of ``solution``, when it was fed
    it (``SchedulerCore.lease`` of each run it placed, ``SchedulerCore.held`` of each it left
    READY). Given, they decide: a run in ``refused`` is not placed, for that reason, and a
    placed run gets the lease ``leases`` names (none when absent). Without them, the devices
    are played out here, the solution's runs in its order.

    Raises ``KeyError`` when the task is not in the problem.
    """
    table = build(problem)
    ci = next((i for i, c in enumerate(table.classes) if task_id in c.members), None)
    if ci is None:
        raise KeyError(f"task {task_id!r} is not in placement request {problem.request_id}")
    cls = table.classes[ci]
    where = next((a for a in expand(problem, solution) if a.class_id == task_id), None)
    used: dict[tuple[str, str], int] = {}
    for a in solution.assignments:
        used[(a.pool_id, a.gpu_model)] = used.get((a.pool_id, a.gpu_model), 0) + a.count

    def alt(k: int) -> Alternative:
        o = table.option(ci, k)
        pid = table.pools[o.pool].id
        return Alternative(
            pool=pid,
            gpu_model=o.model,
            cost=o.unit_cost,
            compute_cost=o.compute_cost,
            data_bytes=o.data_bytes,
            egress_cost=o.egress_cost,
            wait_seconds=o.wait_seconds,
            free_now=used.get((pid, o.model), 0) < o.ub,
            instance_price_per_hour=table.pools[o.pool].price_per_hour
            if table.node[o.pool] is not None
            else 0.0,
        )

    options = [alt(k) for k in range(len(table.columns[ci]))]
    if where is not None:
        chosen = next(
            (a for a in options if a.pool == where.pool_id and a.gpu_model == where.gpu_model),
            None,
        )
        others = [a for a in options if a is not chosen][:top]
        j = next(j for j, p in enumerate(table.pools) if p.id == where.pool_id)
        pool = table.pools[j]
        instances = (
            Instances(
                pool=pool.id,
                price_per_hour=pool.price_per_hour,
                launched=solution.instances.get(pool.id, 0),
                hours_each=pool.boot_s / 3600.0 + table.instance_hours[j],
                dollars_each=instance_dollars(pool, table.instance_hours[j]),
            )
            if pool.elastic
            else None
        )
        lease = None
        if refused is not None and task_id in refused:  # the core did not take the answer
            return Explanation(
                task=task_id,
                placed=False,
                status=str(solution.status),
                alternatives=others,
                reason=refused[task_id],
            )
        if leases is not None:
            lease = leases.get(task_id)
        elif pool.devices is not None:
            ledger, _, why = _on_devices(problem, solution, pool.id, task_id, objective)
            if why:  # the pool's totals admit it, its devices do not
                return Explanation(
                    task=task_id,
                    placed=False,
                    status=str(solution.status),
                    alternatives=others,
                    reason=f"{pool.id}: {why}",
                )
            if why is not None:
                lease = ledger.confirm(task_id, "explain")
        return Explanation(
            task=task_id,
            placed=True,
            pool=where.pool_id,
            gpu_model=where.gpu_model,
            status=str(solution.status),
            chosen=chosen,
            alternatives=others,
            instances=instances,
            devices=lease,
            gpu_milli=cls.gpu_milli,
        )
    reason = solution.unplaced.get(cls.id, "")
    if refused is not None and refused.get(task_id):
        return Explanation(
            task=task_id,
            placed=False,
            status=str(solution.status),
            alternatives=options[:top],
            reason=refused[task_id],
        )
    pieces = _fragmented(problem, solution, cls, objective)
    if pieces:
        reason = "; ".join([reason or "no capacity now", *pieces])
    if table.eligible_full[ci] == 0:
        causes: dict[str, list[str]] = {}
        for p in table.pools:
            for r in pool_reasons(problem, cls, p):
                causes.setdefault(r, []).append(p.id)
        parts = [
            f"{r} ({', '.join(ps[:3])}{' and more' if len(ps) > 3 else ''})"
            for r, ps in sorted(causes.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        ]
        reason = (
            (reason.split(":")[0] if reason else "no pool can run it") + ": " + "; ".join(parts)
        )
    return Explanation(
        task=task_id,
        placed=False,
        status=str(solution.status),
        alternatives=options[:top],
        reason=reason,
    )
