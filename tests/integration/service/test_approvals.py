"""Approvals through the service, end to end: a real ``stowplan serve`` (uvicorn, a private
local Ray, SQLite) with a restricted provider. A run the placer puts there waits in
AWAITING_APPROVAL with the reason; a member cannot approve it, nor another team's member; its
team's admin approves it with ``stowplan approve --server`` and it runs; an admin rejects
another and it is cancelled with the reason; the ledger names who decided what and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.cli.main import main
from tests.integration.service.conftest import LAB, Service, auth, lab, poll

pytestmark = pytest.mark.integration

RESTRICTED = LAB.replace(
    "[service]\n",
    '[providers.burst]\nkind = "instant"\n\n[service]\nrestricted = ["burst"]\n',
    1,
)

BURST = """
[experiment]
name = "{name}"

[policy]
allowed_providers = ["burst"]

[[tasks]]
name = "t"
command = ["echo", "{name}"]
resources = {{ cpus = 0.5, memory = "64MiB" }}
"""


def only_run(c: httpx.Client, name: str, headers: dict[str, str]) -> Any:
    rows = c.get(f"/api/v1/experiments/{name}/status", headers=headers).json()
    (row,) = rows
    return row


@pytest.mark.timeout(600)
def test_a_run_on_a_restricted_provider_waits_until_its_team_admin_approves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = lab(tmp_path)
    (tmp_path / "stowplan.toml").write_text(RESTRICTED)
    monkeypatch.chdir(tmp_path.parent)
    svc = Service(tmp_path, read_only=False)
    try:
        svc.wait_healthy(240)
        mona, nora, tara, ada = (auth(tokens[u]) for u in ("mona", "nora", "tara", "ada"))
        with httpx.Client(base_url=svc.url, timeout=300) as c:
            for name in ("burst-a", "burst-b"):
                req = {
                    "request_id": f"{name}-000001",
                    "filename": "e.toml",
                    "experiment": BURST.format(name=name),
                }
                r = c.post("/api/v1/experiments", json=req, headers=mona)
                assert r.status_code == 201, r.text

            def waiting(name: str) -> Any:
                row = only_run(c, name, mona)
                return row if row["state"] == "AWAITING_APPROVAL" else None

            a = poll("burst-a to wait for approval", 120, lambda: waiting("burst-a"))
            b = poll("burst-b to wait for approval", 120, lambda: waiting("burst-b"))
            assert "provider burst is restricted" in a["reason"], a

            # who may decide: not the member who submitted it, not another team's member
            why = {"why": "deadline"}
            for who in (mona, nora):
                r = c.post(f"/api/v1/runs/{a['run_id']}/approve", json=why, headers=who)
                assert r.status_code == 403, r.text
            assert only_run(c, "burst-a", mona)["state"] == "AWAITING_APPROVAL"

        # the team's admin approves through the CLI; it runs
        monkeypatch.setenv("STOWPLAN_TOKEN", tokens["tara"])
        capsys.readouterr()
        assert (
            main(["approve", a["run_id"][:12], "--why", "paper deadline", "--server", svc.url]) == 0
        )
        assert "approved 1 run" in capsys.readouterr().out
        with httpx.Client(base_url=svc.url, timeout=300) as c:

            def done(name: str, state: str) -> Any:
                row = only_run(c, name, tara)
                return row if row["state"] == state else None

            poll("burst-a to succeed", 120, lambda: done("burst-a", "SUCCEEDED"))

            # an admin of another team rejects the other: cancelled with the reason
            r = c.post(f"/api/v1/runs/{b['run_id']}/reject", json={"why": "too dear"}, headers=ada)
            assert r.status_code == 200, r.text
            assert r.json()["decided"] == 1
            row = poll("burst-b to be cancelled", 60, lambda: done("burst-b", "CANCELLED"))
            assert row["reason"] == "rejected by ada: too dear", row

            # deciding again on a run no longer waiting changes nothing
            r = c.post(f"/api/v1/runs/{b['run_id']}/approve", json=why, headers=ada)
            assert r.status_code == 200 and r.json()["decided"] == 0, r.text

            entries = c.get("/api/v1/ledger", headers=ada).json()
            decided = [
                (e["who"], e["target"], e["why"], e["details"]["decision"])
                for e in entries
                if e["action"] == "approval"
            ]
            assert decided == [
                ("tara", a["run_id"], "paper deadline", "approve"),
                ("ada", b["run_id"], "too dear", "reject"),
            ], entries
        # without a service there is nobody to ask
        monkeypatch.delenv("STOWPLAN_SERVER", raising=False)
        assert main(["reject", "abc", "--why", "x"]) == 2
        assert "--server" in capsys.readouterr().err
    finally:
        assert svc.stop() == 0, svc.text()
