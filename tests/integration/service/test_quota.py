"""Team limits through the service, end to end: a real ``stowplan serve`` (uvicorn, a private
local Ray, SQLite, the local provider with two GPUs) runs a team's GPU sweep never holding more
than its ``max_gpus``, shows the held runs' reason, and ``quota`` shows each team's use to
whom may see it. A submission's inputs reach the long-lived core (``TasksSubmitted.datasets``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.cli.main import main
from tests.integration.service.conftest import LAB, Service, auth, lab, poll

pytestmark = pytest.mark.integration

LIMITED = LAB.replace("cpus = 2\n", "cpus = 2\ngpus = 2\n", 1).replace(
    "[service.teams.vision]\n",
    '[service.teams.vision]\nmax_gpus = { "*" = 1 }\ngpu_hours = 100\nwindow = "1d"\n',
    1,
)

SWEEP = """
[experiment]
name = "gpu-sweep"

[[tasks]]
name = "nap"
command = ["python", "-c", "import time; time.sleep(1.5)", "{i}"]
resources = { cpus = 0.5, memory = "64MiB", gpus = 1 }
inputs = [{ uri = "s3://lab/corpus", version = "v1", size = "1GB", sites = ["local"] }]
sweep = { method = "grid", parameters = { i = { type = "int", low = 0, high = 2 } } }
"""


@pytest.mark.timeout(600)
def test_a_team_never_holds_more_gpus_than_its_maximum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = lab(tmp_path)
    (tmp_path / "stowplan.toml").write_text(LIMITED)
    monkeypatch.chdir(tmp_path.parent)
    svc = Service(tmp_path, read_only=False)
    try:
        svc.wait_healthy(240)
        with httpx.Client(base_url=svc.url, timeout=300) as c:
            mona, nora, ada = (auth(tokens[u]) for u in ("mona", "nora", "ada"))
            req = {"request_id": "gpu-sweep-0001", "filename": "s.toml", "experiment": SWEEP}
            r = c.post("/api/v1/experiments", json=req, headers=mona)
            assert r.status_code == 201, r.text
            holds: list[dict[str, int]] = []
            reasons: set[str] = set()

            def finished() -> Any:
                (vision,) = c.get("/api/v1/quota", headers=mona).json()
                holds.append(vision["holds"])
                rows = c.get("/api/v1/experiments/gpu-sweep/status", headers=mona).json()
                reasons.update(row.get("reason") or "" for row in rows)
                states = {row["state"] for row in rows}
                assert not states & {"FAILED", "CANCELLED"}, rows
                return rows if states == {"SUCCEEDED"} else None

            poll("the sweep to finish", 300, finished)
            assert max(sum(h.values()) for h in holds) == 1, holds
            assert any("holds 1 GPUs, its maximum (max_gpus.*)" in r for r in reasons), reasons

            # the three runs ran one after another: their attempts never overlap
            rows = c.get("/api/v1/experiments/gpu-sweep/status", headers=mona).json()
            spans = []
            for row in rows:
                detail = c.get(f"/api/v1/runs/{row['run_id']}", headers=mona).json()
                (attempt,) = detail["attempts"]
                spans.append((attempt["started_at"], attempt["ended_at"]))
            spans.sort()
            assert all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(spans)), spans

            # who sees what: a member their team, an admin every team
            assert [t["team"] for t in c.get("/api/v1/quota", headers=nora).json()] == ["nlp"]
            teams = c.get("/api/v1/quota", headers=ada).json()
            assert [t["team"] for t in teams] == ["nlp", "vision"]
            vision = teams[1]
            assert vision["max_gpus"] == {"*": 1} and vision["gpu_hours_limit"] == 100
            assert 0 < vision["gpu_hours"] < 0.1  # three GPU naps of 1.5 s, at least

            # the dashboard shows the same use against the same limits, to the same people
            page = c.get("/ui/", headers=mona)
            assert page.status_code == 200, page.text
            quotas = page.text.split('<table id="quotas">', 1)[1].split("</table>", 1)[0]
            assert 'data-team="vision"' in quotas and 'data-team="nlp"' not in quotas
            assert 'data-limit="1" data-used="0"' in quotas  # max_gpus *: 1, none held now
            assert "GPU-hours per 1d, of 100" in quotas
            assert (
                'data-team="vision"'
                not in c.get("/ui/", headers=nora)
                .text.split('<table id="quotas">', 1)[1]
                .split("</table>", 1)[0]
            )

        monkeypatch.setenv("STOWPLAN_TOKEN", tokens["ada"])
        capsys.readouterr()
        assert main(["quota", "--server", svc.url, "--json"]) == 0
        assert [t["team"] for t in json.loads(capsys.readouterr().out)] == ["nlp", "vision"]
        assert main(["quota", "--server", svc.url]) == 0
        table = capsys.readouterr().out
        assert "vision" in table and "* 1" in table and "per 1d" in table
        monkeypatch.delenv("STOWPLAN_SERVER", raising=False)
        assert main(["quota"]) == 2
        assert "--server" in capsys.readouterr().err
    finally:
        assert svc.stop() == 0, svc.text()
