"""The audit ledger: who did what, to which target, when and why, in a hash chain.

Theory of operation:

- Every state-changing action a person takes (submit, cancel, retry, replay, policy override,
  approval) appends one :class:`~stowplan.provenance.records.LedgerEntry` to the ``ledger``
  table of the run store, in the same write transaction that reads the entry before it.
- An entry's ``hash`` is the SHA-256 of the canonical JSON (sorted keys, no whitespace) of all
  its other fields, ``seq`` and ``prev`` included; ``prev`` is the hash of the entry before,
  64 zeros for the first. So editing any field of an entry breaks its own hash, deleting an
  entry breaks the next one's ``prev`` (and leaves a gap in ``seq``), and swapping two breaks
  both.
- SQLite triggers refuse UPDATE and DELETE on the table; :func:`verify` catches what goes
  around them (dropping the triggers, editing the file). Removing entries from the end leaves
  a valid shorter chain: compare the head that ``verify`` reports with one kept elsewhere
  (``stowplan audit verify --expect-head``) to catch that too.
- Secrets never go in: the CLI writes user-facing names and ids, never environment values.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence
from typing import Final

import msgspec

from stowplan.provenance.records import LedgerEntry
from stowplan.spec.canonical import canonical_json, sha256_hex

__all__ = ["GENESIS", "LedgerProblem", "LedgerVerdict", "current_user", "entry_hash", "verify"]

GENESIS: Final = "0" * 64
"""``prev`` of the first entry."""


def current_user() -> str:
    """The OS user acting, as the ledger names them."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER: a bare container
        return f"uid:{os.getuid()}"


def entry_hash(entry: LedgerEntry) -> str:
    """SHA-256 of the canonical JSON of ``entry`` without its own ``hash`` field."""
    body = msgspec.to_builtins(entry)
    body.pop("hash", None)
    return sha256_hex(canonical_json(body))


class LedgerProblem(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    """the first bad entry (for a missing entry: the seq that is missing)."""
    kind: str
    """``edited``, ``missing`` (deleted), ``reordered`` or ``broken-link``."""
    message: str


class LedgerVerdict(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    entries: int
    head: str
    """hash of the last entry that verified (GENESIS when none did)."""
    problem: LedgerProblem | None = None


def verify(entries: Sequence[LedgerEntry]) -> LedgerVerdict:
    """Check the chain in ``seq`` order; the verdict names the first bad entry.

    ``entries`` come as stored, ordered by ``seq`` (``RunStore.ledger()``).
    """
    prev = GENESIS
    expected_seq = 1
    for e in entries:
        problem: LedgerProblem | None = None
        own = entry_hash(e)
        if e.seq != expected_seq:
            if e.seq > expected_seq:
                problem = LedgerProblem(
                    seq=expected_seq,
                    kind="missing",
                    message=f"entry {expected_seq} is missing (deleted): the ledger jumps from "
                    f"{expected_seq - 1} to {e.seq}",
                )
            else:
                problem = LedgerProblem(
                    seq=e.seq,
                    kind="reordered",
                    message=f"entry {e.seq} appears after entry {expected_seq - 1}",
                )
        elif own != e.hash:
            # Its content is intact but was written at another place in the chain: moved.
            written_at = next(
                (
                    s
                    for s in range(1, len(entries) + 2)
                    if s != e.seq and entry_hash(msgspec.structs.replace(e, seq=s)) == e.hash
                ),
                None,
            )
            if written_at is not None:
                problem = LedgerProblem(
                    seq=e.seq,
                    kind="reordered",
                    message=f"entry {e.seq} ({e.action} {e.target[:16]} by {e.who}) was "
                    f"written as entry {written_at}: the ledger was reordered",
                )
            else:
                problem = LedgerProblem(
                    seq=e.seq,
                    kind="edited",
                    message=f"entry {e.seq} ({e.action} {e.target[:16]} by {e.who}) was "
                    f"edited: its content hashes to {own[:12]}, not the stored {e.hash[:12]}",
                )
        elif e.prev != prev:
            problem = LedgerProblem(
                seq=e.seq,
                kind="broken-link",
                message=f"entry {e.seq} ({e.action} {e.target[:16]} by {e.who}) does not follow "
                f"the entry before it: it names {e.prev[:12]} as previous, the chain has "
                f"{prev[:12]}; an entry before it was deleted, replaced or moved",
            )
        if problem is not None:
            return LedgerVerdict(ok=False, entries=len(entries), head=prev, problem=problem)
        prev = e.hash
        expected_seq += 1
    return LedgerVerdict(ok=True, entries=len(entries), head=prev)
