"""``stowplan show``'s place of an attempt: a gang's nodes one by one, not the store's
columns as they are ("n1;n2", "0,1;2,3")."""

from __future__ import annotations

from stowplan.cli.inspect import attempt_place
from stowplan.placement.leases import DeviceLease, lease_columns
from stowplan.provenance.records import AttemptRecord


def record(node: str | None, devices: str | None) -> AttemptRecord:
    return AttemptRecord(
        key="k", run_id="r", attempt=1, provider="p", pool="p", state="RUNNING", node=node,
        devices=devices,
    )  # fmt: skip


def test_a_gang_is_shown_node_by_node() -> None:
    node, devices = lease_columns(DeviceLease("n1", (0, 1), (("n2", (2, 3)),)))
    assert attempt_place(record(node, devices)) == "node n1, GPUs 0,1; node n2, GPUs 2,3"
    cpu_gang = lease_columns(DeviceLease("n1", (), (("n2", ()),)))
    assert attempt_place(record(*cpu_gang)) == "node n1, GPUs none; node n2, GPUs none"


def test_one_node_reads_as_before() -> None:
    assert attempt_place(record("box", "0,1")) == "node box, GPUs 0,1"
    assert attempt_place(record("box", "")) == "node box, GPUs none"
    assert attempt_place(record("box", None)) == "node box"
    assert attempt_place(record(None, None)) == "node None"
    # columns that do not read as a lease are shown as stored, never dropped
    assert attempt_place(record("n1;n2", "0;x")) == "node n1;n2, GPUs 0;x"
