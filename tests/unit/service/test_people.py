"""Tokens: shown once, stored only as a hash, checked in constant time; expiry and revocation."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from stowplan.service.people import People


@pytest.fixture
def people(tmp_path: Path) -> People:
    return People(tmp_path / "service.db")


def test_a_created_token_checks_and_is_stored_only_as_a_hash(
    people: People, tmp_path: Path
) -> None:
    token, rec = people.create_token("alice", label="laptop")
    assert token.startswith(f"stp_{rec.id}_")
    assert people.check_token(token) == ("alice", "")
    people.close()
    raw = (tmp_path / "service.db").read_bytes()
    secret = token[len("stp_") + 13 :]  # the secret may hold "_" itself
    assert secret.encode() not in raw and token.encode() not in raw
    with sqlite3.connect(tmp_path / "service.db") as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(tokens)")]
    assert "digest" in cols and "token" not in cols and "secret" not in cols


def test_forged_unknown_and_malformed_tokens_are_refused(people: People) -> None:
    token, rec = people.create_token("alice")
    secret = token[len("stp_") + 13 :]  # the secret may hold "_" itself
    forged = f"stp_{rec.id}_" + ("A" if secret[0] != "A" else "B") + secret[1:]
    assert people.check_token(forged) == (None, "the token is not valid")
    assert people.check_token("stp_000000000000_" + secret) == (None, "the token is not valid")
    for bad in ("", "Bearer x", token + "x", token[:-1], "stp_../../etc_" + secret):
        assert people.check_token(bad)[0] is None


def test_revoked_and_expired_tokens_are_refused(people: People) -> None:
    token, rec = people.create_token("alice")
    assert people.revoke_token(rec.id)
    assert people.check_token(token) == (None, "the token was revoked")
    assert not people.revoke_token(rec.id)  # revoking twice: no live token
    soon, _ = people.create_token("bob", expires_at=time.time() + 60)
    assert people.check_token(soon) == ("bob", "")
    assert people.check_token(soon, now=time.time() + 61) == (None, "the token has expired")
    assert [t.user for t in people.list_tokens()] == ["alice", "bob"]


def test_owners_and_submissions(people: People) -> None:
    people.add_owner("e1", "vision", "mona")
    people.add_owner("e1", "vision", "mona")  # again: one row
    people.add_owner("e1", "nlp", "nora")
    people.add_owner("e2", "nlp", "nora")
    assert people.owners("e1") == [("nlp", "nora"), ("vision", "mona")]
    assert people.experiments_of({"vision"}) == {"e1"}
    assert people.experiments_of({"nlp"}) == {"e1", "e2"}
