"""Submitting through the service, end to end: a real ``stowplan serve`` (uvicorn, a private
local Ray with the control plane, SQLite, the local provider) runs the quickstart sweep sent
over HTTP, a retried POST creates nothing, and ``status``/``ls --server`` show it."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore
from tests.integration.service.conftest import Service, auth, lab, poll

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def quickstart_body(request_id: str) -> dict[str, Any]:
    ex = REPO / "examples"
    files = {
        f"digits/{p.name}": base64.b64encode(p.read_bytes()).decode()
        for p in sorted((ex / "digits").iterdir())
        if p.is_file()
    }
    return {
        "request_id": request_id,
        "filename": "quickstart.toml",
        "experiment": (ex / "quickstart.toml").read_text(),
        "files": files,
        "why": "does gamma matter?",
    }


def cli_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: str, *argv: str
) -> Any:
    monkeypatch.setenv("STOWPLAN_TOKEN", token)
    capsys.readouterr()
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.mark.timeout(900)
def test_submit_runs_the_quickstart_and_a_retry_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = lab(tmp_path)
    (tmp_path / "stowplan.toml").write_text(
        (tmp_path / "stowplan.toml").read_text().replace('max_body = "256KiB"', 'max_body = "1MiB"')
    )
    monkeypatch.chdir(tmp_path.parent)  # the CLI reads the server, not a project here
    svc = Service(tmp_path, read_only=False)
    try:
        svc.wait_healthy(240)
        with httpx.Client(base_url=svc.url, timeout=300) as c:
            assert c.get("/readyz").json() == {"ok": True, "detail": ""}
            req = quickstart_body("quickstart-0001")
            first = c.post("/api/v1/experiments", json=req, headers=auth(tokens["mona"]))
            assert first.status_code == 201, first.text
            answer = first.json()
            assert answer["runs"] == 25 and answer["submitted"] == 25 and answer["reused"] == 0
            # the client lost the answer and retries: the same answer, nothing new
            again = c.post("/api/v1/experiments", json=req, headers=auth(tokens["mona"]))
            assert again.status_code == 200 and again.json() == answer
            other = {**req, "why": "something else"}
            clash = c.post("/api/v1/experiments", json=other, headers=auth(tokens["mona"]))
            assert clash.status_code == 409 and "already used" in clash.json()["detail"]

            url = ["--server", svc.url]

            def done() -> Any:
                rows = cli_json(capsys, monkeypatch, tokens["mike"], "status", "digits-svm", *url)
                states = {r["state"] for r in rows}
                assert not states & {"FAILED", "CANCELLED"}, rows
                return rows if states == {"SUCCEEDED"} and len(rows) == 25 else None

            rows = poll("the quickstart to finish", 600, done)
            assert {r["task"] for r in rows} == {"train", "select"}
            # the newest experiment is the default, as without --server
            assert cli_json(capsys, monkeypatch, tokens["mona"], "status", *url) == rows
            exps = cli_json(capsys, monkeypatch, tokens["vera"], "ls", *url)
            assert [(e["name"], e["counts"]) for e in exps] == [("digits-svm", {"SUCCEEDED": 25})]
            assert cli_json(capsys, monkeypatch, tokens["nora"], "ls", *url) == []
            monkeypatch.setenv("STOWPLAN_TOKEN", tokens["nora"])
            assert main(["status", "digits-svm", *url]) == 2
            assert "403" in capsys.readouterr().err
            monkeypatch.setenv("STOWPLAN_SERVER", svc.url)
            monkeypatch.setenv("STOWPLAN_TOKEN", tokens["mona"])
            assert main(["ls"]) == 0
            assert "digits-svm" in capsys.readouterr().out

            # cancel through the service: a slow run, refused to another team, done by a
            # team admin, recorded in the ledger under their name
            slow = {
                "request_id": "slow-00000001",
                "filename": "slow.toml",
                "experiment": '[experiment]\nname = "slow"\n[[tasks]]\nname = "nap"\n'
                'script = "sleep 120"\nresources = { cpus = 1, memory = "64MiB" }\n',
            }
            r = c.post("/api/v1/experiments", json=slow, headers=auth(tokens["mona"]))
            assert r.status_code == 201, r.text
            status = c.get("/api/v1/experiments/slow/status", headers=auth(tokens["mona"]))
            run_id = status.json()[0]["run_id"]

            def running() -> Any:
                s = c.get(f"/api/v1/runs/{run_id}", headers=auth(tokens["mona"])).json()
                return s if s["run"]["state"] == "RUNNING" else None

            poll("the slow run to start", 120, running)
            cancel = f"/api/v1/runs/{run_id}/cancel"
            assert c.post(cancel, json={}, headers=auth(tokens["nora"])).status_code == 403
            assert c.post(cancel, json={}, headers=auth(tokens["mike"])).status_code == 403
            r = c.post(cancel, json={"why": "too slow"}, headers=auth(tokens["tara"]))
            assert r.status_code == 200 and r.json() == {"run_id": run_id, "cancelled": 1}

            def cancelled() -> Any:
                s = c.get(f"/api/v1/runs/{run_id}", headers=auth(tokens["tara"])).json()
                return s if s["run"]["state"] == "CANCELLED" else None

            poll("the slow run to be cancelled", 120, cancelled)
    finally:
        code = svc.stop()
    assert code == 0, svc.text()
    assert not (tmp_path / ".stowplan" / "control.json").exists()  # the plane stopped
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        assert sorted(e.name for e in store.list_experiments()) == ["digits-svm", "slow"]
        ledger = [(e.action, e.who, e.why) for e in store.ledger()]
    assert ledger == [
        ("submit", "mona", "does gamma matter?"),
        ("submit", "mona", ""),
        ("cancel", "tara", "too slow"),
    ]
    assert os.environ.get("STOWPLAN_TOKEN") == tokens["mona"]
