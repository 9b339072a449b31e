"""``stowplan plan FILE --explain RUN --server``: for a run waiting in the service's queue, the
answer says why it waits there now (a real ``stowplan serve``: uvicorn, a private local Ray,
SQLite, the local provider with two GPUs and a restricted provider).

Team vision may hold one GPU at a time. Its sweep's first run holds it (and waits for a
go-file), so the rest are held by the team's maximum, and a run of higher priority waits
too; a run on the restricted provider waits for approval. ``--explain`` names the quota, the
team's use, the run ahead by priority, and the approval with who may give it. Another team's
user planning the same file hears nothing of the queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.cli.main import main
from tests.integration.service.conftest import LAB, Service, auth, lab, poll

pytestmark = pytest.mark.integration

CONFIG = (
    LAB.replace("cpus = 2\n", "cpus = 2\ngpus = 2\n", 1)
    .replace(
        "[service]\n",
        '[providers.burst]\nkind = "instant"\n\n[service]\nrestricted = ["burst"]\n',
        1,
    )
    .replace("[service.teams.vision]\n", '[service.teams.vision]\nmax_gpus = { "*" = 1 }\n', 1)
)


WAIT = "import os, time\\nwhile not os.path.exists(os.environ['GO']): time.sleep(0.05)"
"""waits for the go-file (a TOML string, so its newline is escaped)."""


def gpu_sweep(name: str, go: Path, n: int, priority: int) -> str:
    return f"""
[experiment]
name = "{name}"

[policy]
priority = {priority}
allowed_providers = ["local"]

[[tasks]]
name = "nap"
command = ["python", "-c", "{WAIT}", "{{i}}"]
env = {{ GO = "{go}" }}
resources = {{ cpus = 0.5, memory = "64MiB", gpus = 1 }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {n - 1} }} }} }}
"""


BURST = """
[experiment]
name = "burst"

[policy]
allowed_providers = ["burst"]

[[tasks]]
name = "t"
command = ["echo", "burst"]
resources = { cpus = 0.5, memory = "64MiB" }
"""


@pytest.mark.timeout(600)
def test_plan_explain_names_the_quota_the_priority_and_the_approval_a_run_waits_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lab"
    root.mkdir()
    tokens = lab(root)
    (root / "stowplan.toml").write_text(CONFIG)
    go = tmp_path / "go"
    files = {
        "sweep.toml": gpu_sweep("sweep", go, 3, 0),
        "urgent.toml": gpu_sweep("urgent", go, 1, 5),
        "burst.toml": BURST,
    }
    client = tmp_path / "client"
    for name, text in files.items():  # each alone: `plan` sends the files beside it too
        (client / name).mkdir(parents=True)
        (client / name / name).write_text(text)
    svc = Service(root, read_only=False)
    try:
        svc.wait_healthy(240)
        mona = auth(tokens["mona"])
        with httpx.Client(base_url=svc.url, timeout=300, headers=mona) as c:
            ids: dict[str, list[str]] = {}

            def submit(n: int, name: str) -> None:
                req = {
                    "request_id": f"explain-{n:08d}",
                    "filename": name,
                    "experiment": files[name],
                }
                r = c.post("/api/v1/experiments", json=req)
                assert r.status_code == 201, r.text
                ids[name] = r.json()["run_ids"]

            def rows(exp: str) -> list[dict[str, Any]]:
                got: list[dict[str, Any]] = c.get(f"/api/v1/experiments/{exp}/status").json()
                return got

            submit(0, "sweep.toml")
            poll(
                "a run of the sweep to hold the team's GPU",
                240,
                lambda: True if any(r["state"] == "RUNNING" for r in rows("sweep")) else None,
            )
            submit(1, "urgent.toml")
            submit(2, "burst.toml")

            def held(row: dict[str, Any]) -> bool:
                return row["state"] == "READY" and "its maximum" in (row.get("reason") or "")

            def settled() -> str | None:
                waiting = [row["run_id"] for row in rows("sweep") if held(row)]
                (burst,) = rows("burst")
                (urgent,) = rows("urgent")
                ok = burst["state"] == "AWAITING_APPROVAL" and held(urgent) and waiting
                return waiting[0] if ok else None

            hid = poll("the runs to wait in the queue", 240, settled)

            # JSON stays one document; the lines come beside it
            r = c.post(
                "/api/v1/plan",
                json={
                    "filename": "sweep.toml",
                    "experiment": files["sweep.toml"],
                    "explain": hid[:12],
                    "json": True,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["exit_code"] == 0, r.json()
            json.loads(r.json()["output"])
            assert any("its maximum (max_gpus.*)" in line for line in r.json()["queue"])

        env = {"STOWPLAN_TOKEN": tokens["mona"], "STOWPLAN_SERVER": svc.url}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        monkeypatch.chdir(client / "sweep.toml")
        assert main(["plan", "sweep.toml", "--explain", hid[:12]]) == 0
        out = capsys.readouterr().out
        assert f"in the service's queue now: run {hid[:12]} (nap[" in out, out
        assert "team vision, user mona, priority 0) is READY" in out, out
        assert "held back: team vision holds 1 GPUs, its maximum (max_gpus.*)" in out, out
        assert "team vision holds " in out and "max * 1" in out, out
        assert "ahead of it by priority: 1 waiting runs of higher priority (team vision: 1)" in (
            out
        ), out

        (bid,) = ids["burst.toml"]
        monkeypatch.chdir(client / "burst.toml")
        assert main(["plan", "burst.toml", "--explain", bid[:12]]) == 0
        out = capsys.readouterr().out
        assert (
            f"run {bid[:12]} (t[0], team vision, user mona, priority 0) is AWAITING_APPROVAL"
            in (out)
        ), out
        assert "held for approval: " in out and f"stowplan approve {bid[:12]} --why" in out, out
        assert "burst" in out.split("held for approval: ", 1)[1], out

        # another team's member planning the same file hears nothing of the queue
        monkeypatch.setenv("STOWPLAN_TOKEN", tokens["nora"])
        monkeypatch.chdir(client / "sweep.toml")
        assert main(["plan", "sweep.toml", "--explain", hid[:12]]) == 0
        out = capsys.readouterr().out
        assert "in the service's queue" not in out and "held back" not in out, out
    finally:
        go.touch()
        assert svc.stop() == 0, svc.text()
