"""Schema version 8 of the run store: the GPU devices an attempt holds, written with its intent
(the core's lease), updated by what its provider reports binding, read back by a restarted
queue as the lease to give back to the pool's ledger; and the upgrade from version 7."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from stowplan.actors.store import StoreActor, lease_of
from stowplan.actors.wire import pack, unpack
from stowplan.placement.leases import DeviceLease, devices_of, devices_text
from stowplan.provenance.records import AttemptRecord, RunRecord
from stowplan.provenance.store import SCHEMA_VERSION, RunStore
from stowplan.provenance.store.runs import AttemptRow, Dispatch, IntentRow, StepBatch
from stowplan.provenance.store.schema import (
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_V4,
    SCHEMA_V5,
    SCHEMA_V6,
    SCHEMA_V7,
)
from stowplan.spec.canonical import attempt_key
from tests.unit.provenance.test_store import experiment, run


def dispatch(intents: list[IntentRow]) -> Dispatch:
    return Dispatch(
        provider="local",
        pool="local",
        at=20.0,
        attempts=[],
        steps=[],
        solves=[],
        intents=intents,
    )


def test_devices_text_round_trips() -> None:
    for devices in [(), (0,), (0, 1, 7)]:
        assert devices_of(devices_text(devices)) == devices
    assert devices_text(None) is None and devices_of(None) is None
    assert devices_text((0, 1)) == "0,1" == DeviceLease("n", (0, 1)).visible()
    assert devices_of("0,x") is None  # unreadable: not known, never a wrong device


def test_the_intent_carries_the_lease_and_a_report_updates_it(tmp_path: Path) -> None:
    actor = StoreActor(str(tmp_path / "runs.db"))
    store = actor.store
    e = experiment()
    store.put_experiment(e)
    gpu, cpu, plain = run(e, 0), run(e, 1), run(e, 2)
    store.put_runs([gpu, cpu, plain])
    k_gpu, k_cpu, k_plain = (attempt_key(r.run_id, 1) for r in (gpu, cpu, plain))
    actor.write_dispatch(
        pack(
            dispatch(
                [
                    IntentRow(k_gpu, gpu.run_id, 1, -1, 0, "box", "0,1"),
                    IntentRow(k_cpu, cpu.run_id, 1, -1, 0, "box", ""),  # a lease of no device
                    IntentRow(k_plain, plain.run_id, 1),  # a pool that does not lease devices
                ]
            )
        )
    )

    def attempt(r: RunRecord) -> AttemptRecord:
        [a] = store.attempts_for([r.run_id])[r.run_id]
        return a

    assert (attempt(gpu).node, attempt(gpu).devices) == ("box", "0,1")
    assert (attempt(cpu).node, attempt(cpu).devices) == ("box", "")
    assert (attempt(plain).node, attempt(plain).devices) == (None, None)
    # a report without devices keeps them; one that names others (Slurm bound it) replaces them
    actor.update_attempts(
        pack(
            StepBatch(
                attempts=[AttemptRow(k_gpu, gpu.run_id, 1, "local", "local", "QUEUED")], steps=[]
            )
        )
    )
    assert (attempt(gpu).state, attempt(gpu).devices) == ("QUEUED", "0,1")
    actor.update_attempts(
        pack(
            StepBatch(
                attempts=[
                    AttemptRow(
                        k_gpu, gpu.run_id, 1, "local", "local", "RUNNING", node="box", devices="2,3"
                    )
                ],
                steps=[],
            )
        )
    )
    assert (attempt(gpu).state, attempt(gpu).node, attempt(gpu).devices) == (
        "RUNNING",
        "box",
        "2,3",
    )
    # what a restarted queue reads back, and the lease it restores
    _, attempts, _ = unpack(
        actor.load_active(),
        tuple[list[RunRecord], dict[str, list[AttemptRecord]], list[str]],
    )
    leases = {rid: lease_of(a[-1]) for rid, a in attempts.items()}
    assert leases == {
        gpu.run_id: DeviceLease("box", (2, 3)),
        cpu.run_id: DeviceLease("box", ()),
        plain.run_id: None,
    }
    store.close()


def test_a_version_7_store_is_upgraded_and_keeps_its_attempts(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    e = experiment()
    r = run(e, 0)
    c = sqlite3.connect(db, isolation_level=None)
    for statement in (*SCHEMA_V2, *SCHEMA_V3, *SCHEMA_V4, *SCHEMA_V5, *SCHEMA_V6, *SCHEMA_V7):
        c.execute(statement)
    c.execute("PRAGMA user_version = 7")
    c.execute(
        "INSERT INTO experiments VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.id, e.name, e.project, e.description, e.file, "{}", e.created_at),
    )
    body = '{"params":{},"seed":7,"depends_on":[],"identity":{},"task_spec":{},"provenance":"p"}'
    c.execute(
        "INSERT INTO runs (rid, run_id, experiment_id, experiment, task, idx, replicate, "
        "state, attempts, failure, reason, pool, created_at, updated_at) "
        "VALUES (1, ?, ?, ?, 'train', 0, 0, 'RUNNING', 1, NULL, '', 'local', 1.0, 1.0)",
        (r.run_id, e.id, e.name),
    )
    c.execute("INSERT INTO run_bodies (rid, body) VALUES (1, ?)", (body,))
    key = attempt_key(r.run_id, 1)
    c.execute(
        "INSERT INTO attempts (key, run_id, attempt, provider, pool, state, job_id, node, "
        "message, intent_at) VALUES (?, ?, 1, 'local', 'local', 'RUNNING', 'j1', 'box', '', 5.0)",
        (key, r.run_id),
    )
    c.close()

    with RunStore(db) as store:
        [a] = store.attempts_for([r.run_id])[r.run_id]
        # the old row is kept; its devices were never recorded: not known, no lease restored
        assert (a.key, a.state, a.job_id, a.node, a.intent_at) == (key, "RUNNING", "j1", "box", 5.0)
        assert a.devices is None and lease_of(a) is None
        assert [x.key for x in store.active_attempts()] == [key]
        store.update_attempts([AttemptRow(key, "", 0, "", "", "RUNNING", devices="1")])
        [a] = store.attempts_for([r.run_id])[r.run_id]
        assert (a.node, a.devices) == ("box", "1")
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    c.close()
