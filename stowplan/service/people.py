"""The service's own records: API tokens, and who submitted what (for ownership and for
retried submissions). One SQLite file beside the run store's state, ``service.db``.

Theory of operation:

- A token is ``stp_<id>_<secret>``: ``id`` (12 hex digits) names it in ``token list`` and
  ``token revoke``; ``secret`` is 32 random bytes (URL-safe base64). Only the SHA-256 of the
  whole token is kept, and a presented token is compared with it in constant time, so the
  file never holds a usable token and a timing probe learns nothing.
- A token belongs to a user named in ``[service.users]``; the user's team and role are read
  from the configuration on every request, so taking a user out of the file (or changing the
  role) takes effect at once, whatever tokens they hold.
- ``submissions`` maps (user, client request id) to the answer given, so a retried POST gets
  the same answer and creates nothing; ``owners`` says which team and user submitted each
  experiment (an experiment id is a content hash: two teams submitting the same file share
  it, and both own it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import msgspec

SERVICE_DB: Final = "service.db"
"""Under the project's state directory (``.stowplan/``)."""

TOKEN_PREFIX: Final = "stp_"
_TOKEN_RE: Final = re.compile(r"\Astp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})\Z")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    digest TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS submissions (
    user TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    experiment_id TEXT NOT NULL,
    response BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (user, request_id)
);
CREATE TABLE IF NOT EXISTS owners (
    experiment_id TEXT NOT NULL,
    team TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (experiment_id, team, user)
);
"""


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A stored token: never the token itself."""

    id: str
    user: str
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class SubmissionRecord(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    request_id: str
    body_sha256: str
    experiment_id: str
    response: bytes


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class People:
    """Tokens, submissions and owners in ``service.db``; thread-safe, one connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        if os.name == "posix":
            os.chmod(path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> People:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- tokens ----------------------------------------------------------------------------

    def create_token(
        self, user: str, *, label: str = "", expires_at: float | None = None
    ) -> tuple[str, TokenRecord]:
        """A new token for ``user``: the token (shown once, never stored) and its record."""
        token_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        token = f"{TOKEN_PREFIX}{token_id}_{secret}"
        rec = TokenRecord(
            id=token_id,
            user=user,
            label=label,
            created_at=time.time(),
            expires_at=expires_at,
            revoked_at=None,
        )
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (id, user, digest, label, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rec.id, user, _digest(token), label, rec.created_at, expires_at),
            )
        return token, rec

    def list_tokens(self) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, user, label, created_at, expires_at, revoked_at FROM tokens "
                "ORDER BY created_at, id"
            ).fetchall()
        return [
            TokenRecord(
                id=r[0], user=r[1], label=r[2], created_at=r[3], expires_at=r[4], revoked_at=r[5]
            )
            for r in rows
        ]

    def revoke_token(self, token_id: str) -> bool:
        """Revoke the token ``token_id``; False when there is no such live token."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), token_id),
            )
            return cur.rowcount == 1

    def check_token(self, token: str, *, now: float | None = None) -> tuple[str | None, str]:
        """(user, "") for a valid token, else (None, why): malformed, unknown, forged,
        revoked or expired. Forged and unknown say the same to the caller."""
        m = _TOKEN_RE.match(token)
        if m is None:
            return None, "the token is malformed"
        with self._lock:
            row = self._db.execute(
                "SELECT user, digest, expires_at, revoked_at FROM tokens WHERE id = ?",
                (m.group(1),),
            ).fetchone()
        # compare a digest even when the id is unknown, so both take the same time
        stored = row[1] if row is not None else "0" * 64
        if not hmac.compare_digest(_digest(token), stored) or row is None:
            return None, "the token is not valid"
        if row[3] is not None:
            return None, "the token was revoked"
        if row[2] is not None and (now if now is not None else time.time()) >= row[2]:
            return None, "the token has expired"
        return str(row[0]), ""

    # -- submissions and owners ------------------------------------------------------------

    def find_submission(self, user: str, request_id: str) -> SubmissionRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body_sha256, experiment_id, response FROM submissions "
                "WHERE user = ? AND request_id = ?",
                (user, request_id),
            ).fetchone()
        if row is None:
            return None
        return SubmissionRecord(
            user=user,
            request_id=request_id,
            body_sha256=row[0],
            experiment_id=row[1],
            response=bytes(row[2]),
        )

    def put_submission(self, rec: SubmissionRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO submissions "
                "(user, request_id, body_sha256, experiment_id, response, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    rec.user,
                    rec.request_id,
                    rec.body_sha256,
                    rec.experiment_id,
                    rec.response,
                    time.time(),
                ),
            )

    def add_owner(self, experiment_id: str, team: str, user: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO owners (experiment_id, team, user) VALUES (?, ?, ?)",
                (experiment_id, team, user),
            )

    def owners(self, experiment_id: str) -> list[tuple[str, str]]:
        """(team, user) of every submission of ``experiment_id``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT team, user FROM owners WHERE experiment_id = ? ORDER BY team, user",
                (experiment_id,),
            ).fetchall()
        return [(str(t), str(u)) for t, u in rows]

    def experiments_of(self, teams: set[str]) -> set[str]:
        """Ids of every experiment a team in ``teams`` submitted."""
        with self._lock:
            rows = self._db.execute("SELECT experiment_id, team FROM owners").fetchall()
        return {str(e) for e, t in rows if t in teams}
