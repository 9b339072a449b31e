"""Parsers of Slurm output, on output captured from the real test cluster (Slurm 22.05.8)."""

from __future__ import annotations

import re
from pathlib import Path

from stowplan.placement.problem import Shape
from stowplan.providers.slurm.parse import (
    NodeShape,
    cluster_name,
    expand_hostlist,
    largest_node,
    parse_devices,
    parse_end_records,
    parse_gres,
    parse_key_lines,
    parse_oneliner,
    parse_partitions,
    parse_pending,
    parse_sacct,
    parse_squeue,
    parse_time_limit,
    pools_of,
    shapes_of,
)

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "slurm"


def read(name: str) -> str:
    return (FIX / name).read_text()


def test_squeue_expands_arrays() -> None:
    rows = parse_squeue(read("squeue.txt"))
    by_id = {r.element_id: r for r in rows}
    assert by_id["9"].index is None and by_id["9"].state == "RUNNING"
    assert by_id["9"].node == "n1" and by_id["9"].started_at is not None
    pending = [r for r in rows if r.job_id == "12" and r.state == "PENDING"]
    assert sorted(r.index for r in pending if r.index is not None) == list(range(2, 10))
    assert all(r.reason == "JobArrayTaskLimit" and r.node is None for r in pending)
    assert by_id["12_1"].state == "RUNNING"


def test_sacct_rows() -> None:
    rows = {r.element_id: r for r in parse_sacct(read("sacct.txt"))}
    assert rows["1_0"].state == "FAILED" and rows["1_0"].exit_code == 3
    assert rows["5_0"].name == "sp-3db51366db8393b943ef18c5"
    assert rows["5_0"].exit_code == 0 and rows["5_0"].ended_at is not None
    assert rows["10"].state.startswith("CANCELLED")
    assert rows["9"].ended_at is None
    timeout = {r.element_id: r for r in parse_sacct(read("sacct-timeout.txt"))}
    assert timeout["9"].state == "TIMEOUT"


def test_sacct_pending_array_range() -> None:
    rows = parse_sacct("77_[3-5,8%2]|sp-x|PENDING|0:0|None assigned|Unknown|Unknown|None\n")
    assert [(r.job_id, r.index, r.node) for r in rows] == [
        ("77", 3, None),
        ("77", 4, None),
        ("77", 5, None),
        ("77", 8, None),
    ]


def test_partitions_and_pools() -> None:
    parts = {
        p.name: p
        for p in parse_partitions(read("scontrol-partition.txt"), read("scontrol-node.txt"))
    }
    assert parts["cpu"].nodes == ["n1", "n2", "n3", "n4"] and parts["cpu"].default
    assert parts["cpu"].cpus == 32 and parts["cpu"].memory == 4 * (8192 << 20)
    assert parts["gpu"].gpus == {"fake": 4} and parts["gpu"].cpus == 16
    assert parts["gpu"].max_time_s == 86400.0 and parts["cpu"].max_time_s is None
    pending = parse_pending(read("squeue-pending.txt"))
    pools = pools_of("campus", "spcluster", list(parts.values()), pending)
    assert [p.id for p in pools] == ["campus/cpu", "campus/gpu"]
    assert all(p.kind == "slurm" and p.site == "spcluster" for p in pools)
    assert pools[1].expected_wait_s > 0  # eight pending gpu elements
    assert cluster_name(read("scontrol-config.txt")) == "spcluster"


def test_down_nodes_are_left_out() -> None:
    nodes = read("scontrol-node.txt").replace("State=IDLE", "State=IDLE+DRAIN", 1)
    parts = {p.name: p for p in parse_partitions(read("scontrol-partition.txt"), nodes)}
    assert parts["cpu"].cpus == 24


def test_oneliner_values_with_spaces() -> None:
    (rec,) = parse_oneliner("NodeName=n1 OS=Linux 6.1 #1 SMP Gres=gpu:a:1 State=IDLE")
    assert rec["OS"] == "Linux 6.1 #1 SMP" and rec["Gres"] == "gpu:a:1"


def test_small_grammars() -> None:
    assert expand_hostlist("n[1-3,05],gpu7") == ["n1", "n2", "n3", "n05", "gpu7"]
    assert parse_gres("gpu:a100:2(S:0-1),gpu:1,shard:4") == {"a100": 2, "unknown": 1}
    assert parse_gres("(null)") == {}
    assert parse_time_limit("UNLIMITED") is None
    assert parse_time_limit("1-02:03:04") == 93784.0
    assert parse_time_limit("30") == 1800.0
    assert parse_time_limit("5:30") == 330.0


def test_key_lines() -> None:
    text = (
        'sp-abc/job.sh:# stowplan-key 3 k1 run1 2 ["m.json","a b"]\n'
        "sp-abc/job.sh:  export STOWPLAN_KEY=k1\n"
        "garbage\n"
    )
    assert parse_key_lines(text) == {"k1": ("sp-abc", 3, "run1", 2, ["m.json", "a b"])}


GIB = 1 << 30


def test_each_partition_knows_its_node_shapes_and_its_largest_node() -> None:
    parts = {
        p.name: p
        for p in parse_partitions(read("scontrol-partition.txt"), read("scontrol-node.txt"))
    }
    gpu_node = NodeShape(cpus=8, memory=8 * GIB, gpus={"fake": 2}, count=2)
    assert parts["gpu"].node_shapes == [gpu_node]
    assert parts["cpu"].node_shapes == [gpu_node, NodeShape(cpus=8, memory=8 * GIB, count=2)]
    pools = {p.id: p for p in pools_of("campus", "spcluster", list(parts.values()), {})}
    # n3 holds every other node of either partition: the core checks runs against it
    for pid in ("campus/cpu", "campus/gpu"):
        assert pools[pid].node == Shape(cpus=8.0, memory=8 * GIB, gpus={"fake": 2})
        assert not pools[pid].elastic
    # without n3 and n4 (drained) the cpu partition's largest node has no GPU
    nodes = "\n".join(
        re.sub(r"State=(\w+)", r"State=\1+DRAIN", line) if "Gres=gpu" in line else line
        for line in read("scontrol-node.txt").splitlines()
    )
    drained = {p.name: p for p in parse_partitions(read("scontrol-partition.txt"), nodes)}
    assert drained["cpu"].node_shapes == [NodeShape(cpus=8, memory=8 * GIB, count=2)]
    assert drained["gpu"].node_shapes == []
    (cpu,) = pools_of("campus", "spcluster", list(drained.values()), {})
    assert cpu.node == Shape(cpus=8.0, memory=8 * GIB)


def test_a_node_gives_jobs_its_effective_cpus_and_memory_less_the_reserved() -> None:
    line = read("scontrol-node.txt").splitlines()[0]
    line = line.replace("CPUEfctv=8", "CPUEfctv=6").replace(
        "RealMemory=8192", "RealMemory=8192 MemSpecLimit=1024"
    )
    (part,) = [
        p for p in parse_partitions("PartitionName=p Nodes=n1 State=UP MaxTime=UNLIMITED", line)
    ]
    assert part.cpus == 8  # the totals stay as they were
    assert part.node_shapes == [NodeShape(cpus=6, memory=7 * GIB)]


def test_the_largest_node_where_none_holds_every_other() -> None:
    """A 4-GPU node with 8 CPUs beside a 64-CPU node: no single shape is exact; the one that
    holds both refuses nothing some node could run (sbatch refuses the rest itself)."""
    shapes = shapes_of(
        [
            NodeShape(cpus=64, memory=256 * GIB),
            NodeShape(cpus=8, memory=32 * GIB, gpus={"a100": 4}),
            NodeShape(cpus=8, memory=32 * GIB, gpus={"a100": 4}),
            NodeShape(cpus=16, memory=64 * GIB, gpus={"v100": 2}),
        ]
    )
    assert [(s.cpus, s.count) for s in shapes] == [(8, 2), (16, 1), (64, 1)]
    assert largest_node(shapes) == Shape(cpus=64.0, memory=256 * GIB, gpus={"a100": 4, "v100": 2})
    assert largest_node([]) is None


def test_device_indices_are_believed_in_one_form_only() -> None:
    assert parse_devices("0") == (0,)
    assert parse_devices("3,1") == (3, 1)
    for bad in ("", " ", "0,,1", "0,0", "0-3", "GPU-6f1c2a3e", "-1", "1;2", "99999999", "0,"):
        assert parse_devices(bad) is None, bad


def test_end_records_with_and_without_gpus() -> None:
    rows = parse_end_records(
        "7_0|0|1.5|2.5|n3|0,1\n"
        "7_1|0|1.5|2.5|n4|\n"
        "7_2|3|||\n"  # an array rendered before the GPUs were recorded
        "7_3|0|1.5|2.5|n4|0|x\n"  # not an end record
        "7_4|0|1.5|2.5|n4|$(reboot)\n"
    )
    assert [(r.index, r.node, r.devices, r.exit_code) for r in rows] == [
        (0, "n3", (0, 1), 0),
        (1, "n4", None, 0),
        (2, None, None, 3),
        (4, "n4", None, 0),
    ]
