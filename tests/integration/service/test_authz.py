"""The authorisation matrix: every endpoint x every role x own / team / other team, against a
real ``stowplan serve --read-only`` (uvicorn on the loopback, real SQLite).

Read-only: an allowed cancel or submit gets as far as the missing control plane (503), a
refused one stops at 403 before anything is touched."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from stowplan.provenance.store import RunStore
from stowplan.service.people import SERVICE_DB, People
from stowplan.session import prepare, record
from tests.integration.service.conftest import (
    USERS,
    WORK_PY,
    Service,
    auth,
    body,
    experiment,
)

pytestmark = pytest.mark.integration

OWNERS = {"cats": ("vision", "mona"), "words": ("nlp", "nora"), "orphan": None}
"""who submitted each seeded experiment (orphan: `stowplan run` on the server, no team)."""

# written out by hand from the roles, not computed from stowplan.service.auth
READ = {
    "vera": {"cats"},
    "mona": {"cats"},
    "mike": {"cats"},
    "tara": {"cats"},
    "nora": {"words"},
    "ada": {"cats", "words", "orphan"},
}
CANCEL = {
    "vera": set(),
    "mona": {"cats"},  # her own
    "mike": set(),  # a member: not a teammate's
    "tara": {"cats"},  # a team admin: the team's
    "nora": {"words"},
    "ada": {"cats", "words", "orphan"},
}
SUBMIT = {"mona", "mike", "tara", "nora", "ada"}


def seed(root: Path) -> dict[str, str]:
    """The experiments of OWNERS recorded through the session code; name -> a run id."""
    out = {}
    with People(root / ".stowplan" / SERVICE_DB) as people:
        for name, owner in OWNERS.items():
            d = root / "seed" / name
            d.mkdir(parents=True)
            (d / "exp.toml").write_text(experiment(name))
            (d / "work.py").write_bytes(WORK_PY)
            prepared = prepare(d / "exp.toml")
            with RunStore(Path(prepared.store_path)) as store:
                out[name] = record(prepared, store)[0].run_id
            if owner is not None:
                people.add_owner(prepared.experiment.id, *owner)
    return out


def test_every_endpoint_every_role_own_and_other_team(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = read_only_service
    runs = seed(svc.root)
    before = _counts(svc.root)
    seen: list[tuple[str, str, str, int]] = []
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        for user in USERS:
            h = auth(tokens[user])
            r = c.get("/api/v1/experiments", headers=h)
            assert r.status_code == 200, r.text
            assert {e["name"] for e in r.json()} == READ[user], user
            for name, run_id in runs.items():
                may_read = name in READ[user]
                r = c.get(f"/api/v1/experiments/{name}/status", headers=h)
                seen.append((user, "status", name, r.status_code))
                assert r.status_code == (200 if may_read else 403), (user, name, r.text)
                if may_read:
                    assert {x["run_id"] for x in r.json()} >= {run_id}
                else:
                    assert "another team" in r.json()["detail"]
                r = c.get(f"/api/v1/runs/{run_id[:12]}", headers=h)
                seen.append((user, "show", name, r.status_code))
                assert r.status_code == (200 if may_read else 403), (user, name, r.text)
                if may_read:
                    assert r.json()["run"]["run_id"] == run_id
                r = c.post(f"/api/v1/runs/{run_id}/cancel", headers=h, json={"why": "test"})
                seen.append((user, "cancel", name, r.status_code))
                want = 503 if name in CANCEL[user] else 403
                assert r.status_code == want, (user, name, r.text)
            r = c.post("/api/v1/experiments", headers=h, json=body(f"new-{user}", f"req-{user}-1"))
            seen.append((user, "submit", "own", r.status_code))
            assert r.status_code == (503 if user in SUBMIT else 403), (user, r.text)
    assert len(seen) == len(USERS) * (3 * len(OWNERS) + 1)
    assert _counts(svc.root) == before  # nothing was written by any of it


def test_no_valid_token_is_401_everywhere(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = read_only_service
    runs = seed(svc.root)
    run_id = runs["cats"]
    good = tokens["ada"]
    with People(svc.root / ".stowplan" / SERVICE_DB) as people:
        expired, _ = people.create_token("ada", expires_at=1.0)
        revoked, rec = people.create_token("ada")
        people.revoke_token(rec.id)
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    headers = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {good}"},
        auth(forged),
        auth(expired),
        auth(revoked),
        auth("stp_" + "0" * 12 + "_" + "A" * 43),
    ]
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        for h in headers:
            for method, path, data in (
                ("GET", "/api/v1/experiments", None),
                ("GET", "/api/v1/experiments/cats/status", None),
                ("GET", f"/api/v1/runs/{run_id}", None),
                ("POST", f"/api/v1/runs/{run_id}/cancel", {}),
                ("POST", "/api/v1/experiments", body("x", "req-401-1")),
            ):
                r = c.request(method, path, headers=h, json=data)
                assert r.status_code == 401, (h, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["detail"]
        assert c.get("/healthz").status_code == 200  # open
        assert c.get("/readyz").json() == {"ok": False, "detail": "no control plane runs"}


def _counts(root: Path) -> tuple[int, ...]:
    with sqlite3.connect(root / ".stowplan" / "stowplan.db") as db:
        store = tuple(
            db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("experiments", "runs", "ledger")
        )
    with sqlite3.connect(root / ".stowplan" / SERVICE_DB) as db:
        svc = tuple(
            db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("submissions", "owners")
        )
    ws = root / "workspaces"
    return (*store, *svc, len(list(ws.rglob("*"))) if ws.exists() else 0)


def test_the_openapi_document_describes_the_api(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    svc, _ = read_only_service
    doc = httpx.get(f"{svc.url}/schema/openapi.json", timeout=30).json()
    assert set(doc["paths"]) >= {
        "/healthz",
        "/readyz",
        "/api/v1/experiments",
        "/api/v1/experiments/{ref}/status",
        "/api/v1/runs/{ref}",
        "/api/v1/runs/{ref}/cancel",
    }
    submit = doc["components"]["schemas"]["SubmitRequest"]
    assert set(submit["required"]) == {"request_id", "filename", "experiment"}
    assert submit["properties"]["request_id"]["pattern"]
    assert "SubmitResponse" in doc["components"]["schemas"]
