"""What explains a run after the fact: provenance records, placement decisions, the audit
ledger and replays. Each is written once (a replay's verdict is updated) and read by the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from stowplan.provenance.records import (
    LEDGER_ACTIONS,
    LedgerAction,
    LedgerEntry,
    PlacementRecord,
    ProvenanceRecord,
    ReplayRecord,
)
from stowplan.provenance.store.database import Database, json_text
from stowplan.spec.canonical import canonical_json, sha256_hex

__all__ = ["AuditTables"]

_terms_decoder = msgspec.json.Decoder(dict[str, float])
_list_decoder = msgspec.json.Decoder(list[str])
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_provenance_decoder = msgspec.json.Decoder(ProvenanceRecord)
_LEDGER_ACTIONS: Final = frozenset(LEDGER_ACTIONS)


class AuditTables(Database):
    """Reads and writes of ``provenance``, ``placements``, ``ledger`` and ``replays``."""

    # -- provenance ------------------------------------------------------------------------

    def put_provenance(self, rec: ProvenanceRecord) -> str:
        """Store a provenance record by the SHA-256 of its canonical JSON; returns that hash."""
        data = canonical_json(rec)
        h = sha256_hex(data)
        with self._write() as c:
            c.execute(
                "INSERT OR IGNORE INTO provenance (hash, record) VALUES (?, ?)",
                (h, data.decode()),
            )
        return h

    def get_provenance(self, h: str) -> ProvenanceRecord:
        """The provenance record with hash ``h``; ``KeyError`` when there is none."""
        with self._read() as c:
            row = c.execute("SELECT record FROM provenance WHERE hash = ?", (h,)).fetchone()
        if row is None:
            raise KeyError(f"no provenance record {h}")
        return _provenance_decoder.decode(row[0])

    # -- placements ------------------------------------------------------------------------

    def put_placements(self, records: Sequence[PlacementRecord]) -> None:
        """Record the placement decision of each (run, attempt); one already recorded is kept.

        A record of an unknown run violates a foreign key and the whole batch is rolled back.
        The control plane records its decisions with the intents instead, once per solve
        (``RunTables.write_dispatch``); these rows go where version 6 kept every decision.
        """
        if not records:
            return
        with self._write() as c:
            c.executemany(
                "INSERT OR IGNORE INTO placements_v6 (run_id, attempt, request_id, provider, pool, "
                "hardware_class, status, objective, bound, gap, terms, problem, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        p.run_id,
                        p.attempt,
                        p.request_id,
                        p.provider,
                        p.pool,
                        p.hardware_class,
                        p.status,
                        p.objective,
                        p.bound,
                        p.gap,
                        json_text(p.terms),
                        p.problem,
                        p.at,
                    )
                    for p in sorted(records, key=lambda p: (p.run_id, p.attempt))
                ),
            )

    def placements_for(self, run_id: str) -> list[PlacementRecord]:
        """The placement of each attempt of a run, by attempt number (from the ``placements``
        view: the decisions recorded per solve and those of older stores)."""
        with self._read() as c:
            rows = c.execute(
                "SELECT run_id, attempt, request_id, provider, pool, hardware_class, status, "
                "objective, bound, gap, terms, problem, at FROM placements WHERE run_id = ? "
                "ORDER BY attempt",
                (run_id,),
            ).fetchall()
        return [
            PlacementRecord(
                run_id=r[0],
                attempt=r[1],
                request_id=r[2],
                provider=r[3],
                pool=r[4],
                hardware_class=r[5],
                status=r[6],
                objective=r[7],
                bound=r[8],
                gap=r[9],
                terms=_terms_decoder.decode(r[10]),
                problem=r[11],
                at=r[12],
            )
            for r in rows
        ]

    # -- audit ledger ----------------------------------------------------------------------

    def append_ledger(
        self,
        *,
        who: str,
        action: LedgerAction,
        target: str,
        why: str,
        details: Mapping[str, Any] | None = None,
        at: float | None = None,
    ) -> LedgerEntry:
        """Append one entry, chained to the last one, in one transaction; returns it."""
        from stowplan.provenance.ledger import GENESIS, entry_hash

        with self._write() as c:
            row = c.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (1, GENESIS) if row is None else (int(row[0]) + 1, str(row[1]))
            entry = LedgerEntry(
                seq=seq,
                at=time.time() if at is None else at,
                who=who,
                action=action,
                target=target,
                why=why,
                details=dict(details or {}),
                prev=prev,
            )
            entry = msgspec.structs.replace(entry, hash=entry_hash(entry))
            c.execute(
                "INSERT INTO ledger (seq, at, who, action, target, why, details, prev, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.at,
                    entry.who,
                    entry.action,
                    entry.target,
                    entry.why,
                    canonical_json(entry.details).decode(),
                    entry.prev,
                    entry.hash,
                ),
            )
        return entry

    def ledger(self, *, target: str | None = None) -> list[LedgerEntry]:
        """Every ledger entry (or those on ``target``), by ``seq``, exactly as stored.

        Rows that no longer decode (an edited action, a details column that is not JSON) come
        back with what can be read, so :func:`stowplan.provenance.ledger.verify` flags them.
        """
        with self._read() as c:
            rows = c.execute(
                "SELECT seq, at, who, action, target, why, details, prev, hash FROM ledger "
                + ("WHERE target = ? " if target is not None else "")
                + "ORDER BY seq",
                (target,) if target is not None else (),
            ).fetchall()
        out = []
        for r in rows:
            try:
                details = _dict_decoder.decode(r[6])
            except msgspec.DecodeError:
                details = {"undecodable": str(r[6])}
            out.append(
                msgspec.convert(
                    {
                        "seq": r[0],
                        "at": float(r[1]),
                        "who": str(r[2]),
                        "action": r[3],
                        "target": str(r[4]),
                        "why": str(r[5]),
                        "details": details,
                        "prev": str(r[7]),
                        "hash": str(r[8]),
                    },
                    LedgerEntry,
                    strict=False,
                )
                if r[3] in _LEDGER_ACTIONS
                else _raw_entry(r, details)
            )
        return out

    def approved(self, run_ids: Sequence[str]) -> list[str]:
        """Those of ``run_ids`` someone approved (the ledger's ``approval`` entries with
        ``decision`` approve), sorted: a restarted core must not ask for them again."""
        found: set[str] = set()
        with self._read() as c:
            ids = sorted(set(run_ids))
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows = c.execute(
                    "SELECT target, details FROM ledger WHERE action = 'approval' AND target IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for target, details in rows:
                    try:
                        doc = _dict_decoder.decode(details)
                    except msgspec.DecodeError:
                        continue
                    if doc.get("decision") == "approve":
                        found.add(str(target))
        return sorted(found)

    # -- replays ---------------------------------------------------------------------------

    def put_replay(self, rec: ReplayRecord) -> None:
        """Record (or update the verdict of) a replay."""
        self.put_replay_batch([rec])

    def put_replay_batch(self, recs: Sequence[ReplayRecord]) -> None:
        """Record (or update the verdicts of) replays, in one transaction."""
        with self._write() as c:
            c.executemany(
                "INSERT INTO replays (run_id, of_run_id, at, verdict, differences) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                "verdict = excluded.verdict, differences = excluded.differences",
                ((r.run_id, r.of_run_id, r.at, r.verdict, json_text(r.differences)) for r in recs),
            )

    def replays_of(self, run_id: str) -> list[ReplayRecord]:
        """Replays made of ``run_id``, oldest first."""
        return self._replays("of_run_id", run_id)

    def replay_source(self, run_id: str) -> ReplayRecord | None:
        """The replay record of ``run_id`` when it is a replay, else None."""
        found = self._replays("run_id", run_id)
        return found[0] if found else None

    def _replays(self, column: str, value: str) -> list[ReplayRecord]:
        with self._read() as c:
            rows = c.execute(
                f"SELECT run_id, of_run_id, at, verdict, differences FROM replays "
                f"WHERE {column} = ? ORDER BY at, run_id",
                (value,),
            ).fetchall()
        return [
            ReplayRecord(
                run_id=r[0],
                of_run_id=r[1],
                at=r[2],
                verdict=r[3],
                differences=_list_decoder.decode(r[4]),
            )
            for r in rows
        ]


def _raw_entry(r: Sequence[Any], details: dict[str, Any]) -> LedgerEntry:
    # An action outside the Literal (someone edited the row): keep the text so verify sees it.
    return msgspec.structs.replace(
        LedgerEntry(
            seq=int(r[0]),
            at=float(r[1]),
            who=str(r[2]),
            action="submit",
            target=str(r[4]),
            why=str(r[5]),
            details=details,
            prev=str(r[7]),
            hash=str(r[8]),
        ),
        action=str(r[3]),
    )
