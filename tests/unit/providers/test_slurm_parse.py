"""Parsers of Slurm output, on output captured from the real test cluster (Slurm 22.05.8)."""

from __future__ import annotations

from pathlib import Path

from stowplan.providers.slurm.parse import (
    cluster_name,
    expand_hostlist,
    parse_gres,
    parse_key_lines,
    parse_oneliner,
    parse_partitions,
    parse_pending,
    parse_sacct,
    parse_squeue,
    parse_time_limit,
    pools_of,
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
