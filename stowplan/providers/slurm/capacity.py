"""What a Slurm partition is offered: the work its queue can absorb in the planning horizon.

A partition is itself a queue. Offering the core only its CPUs makes stowplan a second queue
in front of Slurm's: a sweep larger than the partition goes in as many small arrays, each
submitted after an earlier one ended and its end was noticed, and the cluster idles between
them. So by default a partition is offered ``depth`` times its capacity (CPUs, memory and
GPUs alike; the core counts its leases against that), where

    wait    = pending CPU-seconds of every user / CPUs        (the pool's expected_wait_s)
    room    = max(0, horizon - wait)                          seconds of the horizon left free
    depth   = room / pass_s                                    at least 1
    depth   = min(depth, job_room / CPUs)                      if the controller caps its jobs

``pass_s`` is the shortest of the controller's scheduling intervals (``sched_interval``,
``bf_interval``; at least 1 s): a queued job waits about that long for a pass that can start
it, so no task, however short, holds a CPU for less, and a queue deeper than
``CPUs x room / pass_s`` tasks cannot drain within the horizon. A backlog as long as the
horizon (``wait >= horizon``) leaves depth 1: the partition is offered its CPUs only, as
before. ``job_room`` is ``MaxJobCount`` less the jobs the controller holds: sbatch refuses
more. With an explicit ``queue_factor`` the depth is that number instead.

On the test cluster (32 CPUs, ``sched_interval=2``) the depth is 1,800: a 1,000-trial sweep is
placed at once and goes as one array. On a cluster with Slurm's default intervals (60 s and
30 s) a 32-CPU partition with an empty queue is offered 32 x 120 CPUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from stowplan.placement.problem import Pool
from stowplan.providers.slurm.parse import PartitionFacts, SchedulerFacts

PLANNING_HORIZON_S = 3600.0
"""How far ahead a partition's queue is filled (the placement's default task runtime)."""
DEFAULT_SCHEDULER = SchedulerFacts()


def queue_depth(
    part: PartitionFacts, pending_cpu_s: float, *, horizon_s: float = PLANNING_HORIZON_S
) -> float:
    """How many times its capacity ``part`` can absorb in ``horizon_s`` (module doc)."""
    if part.cpus <= 0:
        return 1.0
    sched = part.scheduler or DEFAULT_SCHEDULER
    wait = max(0.0, pending_cpu_s) / part.cpus
    room = max(0.0, horizon_s - wait)
    depth = max(1.0, room / sched.pass_s)
    room_jobs = sched.job_room
    if room_jobs is not None:
        depth = min(depth, max(1.0, room_jobs / part.cpus))
    return depth


def offer(pool: Pool, depth: float) -> Pool:
    """``pool`` with ``depth`` times its CPUs, memory and GPUs."""
    if depth == 1.0:
        return pool
    return msgspec.structs.replace(
        pool,
        cpus=pool.cpus * depth,
        memory=int(pool.memory * depth),
        gpus={k: math.floor(v * depth) for k, v in pool.gpus.items()},
    )


def offered(
    provider: str,
    pools: Sequence[Pool],
    parts: Sequence[PartitionFacts],
    pending: dict[str, float],
    queue_factor: float | None,
) -> list[Pool]:
    """The pools of ``parts`` as the core is offered them: each scaled by ``queue_factor``
    when one is set, else by its own ``queue_depth``."""
    by_id = {f"{provider}/{p.name}": p for p in parts}
    out = []
    for pool in pools:
        part = by_id.get(pool.id)
        if queue_factor is not None:
            depth = queue_factor
        elif part is not None:
            depth = queue_depth(part, pending.get(part.name, 0.0))
        else:
            depth = 1.0
        out.append(offer(pool, depth))
    return out
