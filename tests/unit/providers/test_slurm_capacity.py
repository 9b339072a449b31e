"""What a Slurm partition is offered: its queue's depth, from what discovery saw (captured
``scontrol`` output of the test cluster), and the explicit ``queue_factor`` override."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stowplan.providers.slurm.capacity import PLANNING_HORIZON_S, offered, queue_depth
from stowplan.providers.slurm.driver import queue_factor
from stowplan.providers.slurm.parse import (
    PartitionFacts,
    SchedulerFacts,
    parse_partitions,
    parse_pending,
    parse_scheduler,
    pools_of,
)
from stowplan.spec.models import SlurmProviderConfig

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "slurm"


def read(name: str) -> str:
    return (FIX / name).read_text()


def parts() -> dict[str, PartitionFacts]:
    sched = parse_scheduler(read("scontrol-config.txt"), "12")
    return {
        p.name: p
        for p in parse_partitions(read("scontrol-partition.txt"), read("scontrol-node.txt"), sched)
    }


def test_the_scheduler_facts_come_from_scontrol_show_config() -> None:
    sched = parse_scheduler(read("scontrol-config.txt"), "12")
    assert sched == SchedulerFacts(
        sched_interval_s=2.0, bf_interval_s=5.0, max_job_count=100_000, jobs=12
    )
    assert sched.pass_s == 2.0 and sched.job_room == 99_988
    # what the config leaves out keeps Slurm's defaults (sched_interval=60, bf_interval=30)
    bare = parse_scheduler("SchedulerType = sched/builtin\n")
    assert bare.pass_s == 60.0 and bare.bf_interval_s is None and bare.job_room is None
    assert parse_scheduler("").pass_s == 30.0
    p = parts()["cpu"]
    assert p.scheduler == sched and p.running_cpus == 2  # two CPUs ran jobs in the capture


def test_the_queue_listing_of_every_state_gives_pending_work_only() -> None:
    listing = "cpu|1|5:00|PD\ncpu|2|5:00|R\ngpu|1|UNLIMITED|PD\n"
    assert parse_pending(listing) == {"cpu": 300.0, "gpu": 3600.0}
    assert parse_pending("cpu|1|5:00\n") == {"cpu": 300.0}  # the older three-field form
    # our own queued arrays are the core's leases: not a backlog in front of us
    named = "cpu|1|5:00|PD|sp-ours\ncpu|4|5:00|PD|other|job\n"
    assert parse_pending(named, lambda name: name == "sp-ours") == {"cpu": 1200.0}


def test_an_empty_queue_is_offered_what_it_drains_in_the_horizon() -> None:
    cpu = parts()["cpu"]
    # 3,600 s / a 2 s scheduling pass: 1,800 times its 32 CPUs, so 1,000 trials fit at once
    assert queue_depth(cpu, 0.0) == pytest.approx(PLANNING_HORIZON_S / 2.0)
    assert cpu.cpus * queue_depth(cpu, 0.0) >= 1000
    # Slurm's default intervals: 120 times
    slow = msgspec.structs.replace(cpu, scheduler=SchedulerFacts())
    assert queue_depth(slow, 0.0) == pytest.approx(120.0)
    assert queue_depth(msgspec.structs.replace(cpu, scheduler=None), 0.0) == pytest.approx(120.0)


def test_a_backlog_shortens_the_room_and_a_full_one_leaves_the_cpus() -> None:
    cpu = parts()["cpu"]
    half = 32 * PLANNING_HORIZON_S / 2  # CPU-seconds pending: a half-hour wait
    assert queue_depth(cpu, half) == pytest.approx(PLANNING_HORIZON_S / 2 / 2.0)
    assert queue_depth(cpu, 32 * PLANNING_HORIZON_S * 3) == 1.0


def test_the_controllers_job_limit_caps_the_depth() -> None:
    cpu = parts()["cpu"]
    full = msgspec.structs.replace(
        cpu, scheduler=SchedulerFacts(sched_interval_s=2, max_job_count=1000, jobs=360)
    )
    assert queue_depth(full, 0.0) == pytest.approx(640 / 32)
    none_left = msgspec.structs.replace(
        cpu, scheduler=SchedulerFacts(max_job_count=1000, jobs=1000)
    )
    assert queue_depth(none_left, 0.0) == 1.0


def test_offered_pools_scale_every_resource_and_the_override_wins() -> None:
    ps = parts()
    pending = {"gpu": 16 * 1800.0}  # half an hour of pending work on the 16-CPU gpu partition
    pools = pools_of("campus", "spcluster", list(ps.values()), pending)
    derived = {p.id: p for p in offered("campus", pools, list(ps.values()), pending, None)}
    assert derived["campus/cpu"].cpus == 32 * 1800
    assert derived["campus/cpu"].memory == 1800 * 4 * (8192 << 20)
    gpu_depth = queue_depth(ps["gpu"], pending["gpu"])
    assert gpu_depth == pytest.approx(900.0)  # the half hour left, in 2 s passes
    assert derived["campus/gpu"].gpus == {"fake": int(4 * gpu_depth)}
    fixed = {p.id: p for p in offered("campus", pools, list(ps.values()), pending, 40.0)}
    assert fixed["campus/cpu"].cpus == 32 * 40 and fixed["campus/gpu"].gpus == {"fake": 160}


def test_an_unset_queue_factor_derives_and_an_explicit_one_is_kept() -> None:
    assert queue_factor(SlurmProviderConfig(host="h")) is None
    assert queue_factor(SlurmProviderConfig(host="h", queue_factor=40)) == 40.0
    # 1 is a real choice now: the partition's own capacity, no deeper
    assert queue_factor(SlurmProviderConfig(host="h", queue_factor=1)) == 1.0
