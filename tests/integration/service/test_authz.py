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
APPROVE = {
    "vera": set(),
    "mona": set(),  # a member: not even her own
    "mike": set(),
    "tara": {"cats"},  # a team admin: the team's
    "nora": set(),
    "ada": {"cats", "words", "orphan"},
}


def seed(root: Path) -> dict[str, str]:
    """The experiments of OWNERS recorded through the session code, each with a ledger entry
    on the experiment and one on its first run; name -> a run id."""
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
                for target in (prepared.experiment.id, out[name]):
                    store.append_ledger(
                        who=owner[1] if owner else "root",
                        action="submit",
                        target=target,
                        why=f"seed {name}",
                        details={},
                    )
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
                r = c.post(f"/api/v1/experiments/{name}/cancel", headers=h, json={"why": "t"})
                seen.append((user, "cancel experiment", name, r.status_code))
                assert r.status_code == want, (user, name, r.text)
                for verb in ("approve", "reject"):
                    r = c.post(f"/api/v1/runs/{run_id}/{verb}", headers=h, json={"why": "t"})
                    seen.append((user, verb, name, r.status_code))
                    # allowed: the seeded run is not waiting for approval, nothing is decided
                    assert r.status_code == (200 if name in APPROVE[user] else 403), (
                        user,
                        name,
                        r.text,
                    )
                    if r.status_code == 200:
                        assert r.json()["decided"] == 0
                # the seeded runs never started: a reader hears so, anyone else is refused
                r = c.get(f"/api/v1/runs/{run_id}/logs", headers=h)
                seen.append((user, "logs", name, r.status_code))
                assert r.status_code == (404 if may_read else 403), (user, name, r.text)
                if may_read:
                    assert "no attempts yet" in r.json()["detail"]
                r = c.get(f"/api/v1/lineage/{run_id}", headers=h, params={"direction": "both"})
                seen.append((user, "lineage", name, r.status_code))
                assert r.status_code == (200 if may_read else 403), (user, name, r.text)
                if may_read:
                    assert r.json()["root"] == f"run:{run_id}"
                # replaying needs both: reading the runs and submitting (read-only: the
                # allowed ones get as far as the missing control plane)
                req = {"request_id": f"replay-{user}-{name}", "targets": [name]}
                r = c.post("/api/v1/replays", headers=h, json=req)
                seen.append((user, "replay", name, r.status_code))
                may_replay = may_read and user in SUBMIT
                assert (r.status_code != 403) == may_replay, (user, name, r.status_code, r.text)
                r = c.get(f"/api/v1/diff/{runs['cats']}/{run_id}", headers=h)
                seen.append((user, "diff", name, r.status_code))
                both = may_read and "cats" in READ[user]
                assert r.status_code == (200 if both else 403), (user, name, r.text)
            r = c.get("/api/v1/runs", headers=h)
            seen.append((user, "find", "all", r.status_code))
            assert r.status_code == 200, r.text
            assert {x["experiment"] for x in r.json()} == READ[user], user
            r = c.get("/api/v1/ledger", headers=h)
            seen.append((user, "audit log", "all", r.status_code))
            assert r.status_code == 200, r.text
            assert {x["why"] for x in r.json()} == {f"seed {n}" for n in READ[user]}, user
            assert len(r.json()) == 2 * len(READ[user])  # on the experiment and on a run
            r = c.get("/api/v1/ledger/verify", headers=h)
            seen.append((user, "audit verify", "all", r.status_code))
            assert r.status_code == (200 if user == "ada" else 403), (user, r.text)
            r = c.post("/api/v1/experiments", headers=h, json=body(f"new-{user}", f"req-{user}-1"))
            seen.append((user, "submit", "own", r.status_code))
            assert r.status_code == (503 if user in SUBMIT else 403), (user, r.text)
            if user != "vera":  # a viewer's plan: refused before anything runs
                continue
            r = c.post("/api/v1/plan", headers=h, json=plan_body("cats"))
            seen.append((user, "plan", "own", r.status_code))
            assert r.status_code == 403, r.text
        # an allowed plan runs `stowplan plan` on the lab's providers (once: it takes seconds)
        r = c.post("/api/v1/plan", headers=auth(tokens["mona"]), json=plan_body("cats"))
        assert r.status_code == 200, r.text
        assert r.json()["exit_code"] == 0, r.json()
        assert "2 placed now" in r.json()["output"], r.json()
    assert len(seen) == len(USERS) * (10 * len(OWNERS) + 4) + 1
    assert _counts(svc.root) == before  # nothing was written by any of it


def plan_body(name: str) -> dict[str, object]:
    import base64

    return {
        "filename": "exp.toml",
        "experiment": experiment(name),
        "files": {"work.py": base64.b64encode(WORK_PY).decode()},
    }


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
                ("POST", f"/api/v1/runs/{run_id}/approve", {"why": "x"}),
                ("POST", f"/api/v1/runs/{run_id}/reject", {"why": "x"}),
                ("POST", "/api/v1/experiments", body("x", "req-401-1")),
                ("POST", "/api/v1/experiments/cats/cancel", {}),
                ("GET", f"/api/v1/runs/{run_id}/logs", None),
                ("GET", "/api/v1/runs", None),
                ("GET", f"/api/v1/lineage/{run_id}", None),
                ("GET", f"/api/v1/diff/{run_id}/{run_id}", None),
                ("GET", "/api/v1/ledger", None),
                ("GET", "/api/v1/ledger/verify", None),
                ("POST", "/api/v1/plan", plan_body("cats")),
                ("POST", "/api/v1/replays", {"request_id": "req-401-2", "targets": ["cats"]}),
                ("GET", "/api/v1/replays/req-401-2", None),
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
        "/api/v1/runs/{ref}/approve",
        "/api/v1/runs/{ref}/reject",
        "/api/v1/experiments/{ref}/cancel",
        "/api/v1/runs/{ref}/logs",
        "/api/v1/runs",
        "/api/v1/lineage/{target}",
        "/api/v1/diff/{a}/{b}",
        "/api/v1/ledger",
        "/api/v1/ledger/verify",
        "/api/v1/plan",
        "/api/v1/replays",
        "/api/v1/replays/{request_id}",
    }
    submit = doc["components"]["schemas"]["SubmitRequest"]
    assert set(submit["required"]) == {"request_id", "filename", "experiment"}
    assert submit["properties"]["request_id"]["pattern"]
    assert "SubmitResponse" in doc["components"]["schemas"]
