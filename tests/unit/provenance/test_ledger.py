"""The audit ledger on a real SQLite store, tampered with through the sqlite3 module."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from stowplan.provenance.ledger import GENESIS, current_user, entry_hash, verify
from stowplan.provenance.store import RunStore


def filled(tmp_path: Path, n: int = 5) -> Path:
    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        for i in range(n):
            store.append_ledger(
                who="alice",
                action="cancel" if i % 2 else "submit",
                target=f"{i:064x}",
                why=f"reason {i}",
                details={"runs": i},
                at=1000.0 + i,
            )
    return db


def raw(db: Path) -> sqlite3.Connection:
    """A plain connection, as someone editing the file would open it, triggers dropped."""
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("DROP TRIGGER ledger_no_update")
    c.execute("DROP TRIGGER ledger_no_delete")
    return c


def check(db: Path) -> tuple[bool, int | None, str | None]:
    with RunStore(db) as store:
        v = verify(store.ledger())
    return v.ok, (v.problem.seq if v.problem else None), (v.problem.kind if v.problem else None)


def test_entries_chain_and_verify(tmp_path: Path) -> None:
    db = filled(tmp_path)
    with RunStore(db) as store:
        entries = store.ledger()
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
        assert entries[0].prev == GENESIS
        for a, b in itertools.pairwise(entries):
            assert b.prev == a.hash
        for e in entries:
            assert e.hash == entry_hash(e)
        assert entries[1].action == "cancel" and entries[1].why == "reason 1"
        assert entries[3].details == {"runs": 3}
        v = verify(entries)
        assert v.ok and v.entries == 5 and v.head == entries[-1].hash
        assert [e.seq for e in store.ledger(target=f"{2:064x}")] == [3]


def test_the_table_refuses_update_and_delete(tmp_path: Path) -> None:
    db = filled(tmp_path)
    c = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        c.execute("UPDATE ledger SET why = 'nothing' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        c.execute("DELETE FROM ledger WHERE seq = 2")
    c.close()
    assert check(db) == (True, None, None)


@pytest.mark.parametrize(
    ("column", "value"),
    [("why", "'nothing to see'"), ("who", "'mallory'"), ("at", "1.5"), ("details", "'{}'")],
)
def test_an_edited_entry_is_named(tmp_path: Path, column: str, value: str) -> None:
    db = filled(tmp_path)
    with raw(db) as c:
        c.execute(f"UPDATE ledger SET {column} = {value} WHERE seq = 3")
    assert check(db) == (False, 3, "edited")


def test_an_edit_that_rehashes_the_entry_breaks_the_next_link(tmp_path: Path) -> None:
    db = filled(tmp_path)
    with RunStore(db) as store:
        e = store.ledger()[2]
    import msgspec

    forged = msgspec.structs.replace(e, why="forged")
    forged = msgspec.structs.replace(forged, hash=entry_hash(forged))
    with raw(db) as c:
        c.execute("UPDATE ledger SET why = ?, hash = ? WHERE seq = 3", (forged.why, forged.hash))
    assert check(db) == (False, 4, "broken-link")


def test_a_deleted_entry_is_named(tmp_path: Path) -> None:
    db = filled(tmp_path)
    with raw(db) as c:
        c.execute("DELETE FROM ledger WHERE seq = 2")
    assert check(db) == (False, 2, "missing")


def test_deleting_and_renumbering_breaks_the_chain(tmp_path: Path) -> None:
    db = filled(tmp_path)
    with raw(db) as c:
        c.execute("DELETE FROM ledger WHERE seq = 2")
        c.execute("UPDATE ledger SET seq = seq - 1 WHERE seq > 2")
    ok, seq, kind = check(db)
    assert not ok and seq == 2 and kind == "reordered"


def test_reordered_entries_are_named(tmp_path: Path) -> None:
    db = filled(tmp_path)
    with raw(db) as c:
        c.execute("UPDATE ledger SET seq = 100 WHERE seq = 2")
        c.execute("UPDATE ledger SET seq = 2 WHERE seq = 3")
        c.execute("UPDATE ledger SET seq = 3 WHERE seq = 100")
    assert check(db) == (False, 2, "reordered")


def test_an_unknown_action_written_into_the_file_is_an_edit(tmp_path: Path) -> None:
    db = filled(tmp_path)
    with raw(db) as c:
        c.execute("UPDATE ledger SET action = 'approve-everything' WHERE seq = 4")
    assert check(db) == (False, 4, "edited")


def test_an_empty_ledger_verifies(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        v = verify(store.ledger())
    assert v.ok and v.entries == 0 and v.head == GENESIS


def test_current_user_names_someone() -> None:
    assert current_user()


def test_the_ledger_says_which_runs_were_approved(tmp_path: Path) -> None:
    with RunStore(tmp_path / "store.db") as store:
        for target, decision in (("r1", "approve"), ("r2", "reject"), ("r3", "approve")):
            store.append_ledger(
                who="tara",
                action="approval",
                target=target,
                why="w",
                details={"decision": decision},
            )
        store.append_ledger(who="mona", action="cancel", target="r4", why="w", details={})
        assert store.approved(["r1", "r2", "r4", "r5"]) == ["r1"]
