"""A secret's value never reaches the store, the ledger, the logs or the screen, end to end on
real local Ray and SQLite: the experiment names a secret, the value is in the environment of
the control plane, and every byte stowplan wrote is searched for it."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore

pytestmark = pytest.mark.integration


def every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_secret_value_is_never_written_or_shown(
    ray_session: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray

    value = "leak-" + secrets.token_hex(16)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    # where a driver for local runs would look the secret up, and where a careless capture
    # of the environment would find it
    monkeypatch.setenv("hf-token", value)
    monkeypatch.setenv("HF_TOKEN", value)
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "sec"\n[providers.fast]\nkind = "instant"\n'
    )
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[experiment]\nname = "sec"\n[[tasks]]\nname = "t"\ncommand = ["true", "{i}"]\n'
        'image = "python:3.12-slim"\nsecrets = { HF_TOKEN = "hf-token" }\n'
        "sweep = { parameters = { i = [1, 2] } }\n"
    )
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []

    assert main(["run", str(exp), "--dry-run"]) == 0
    out = capsys.readouterr()
    shown += [out.out, out.err]
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()

    assert main(["run", str(exp), "--json"]) == 0
    out = capsys.readouterr()
    shown += [out.out, out.err]
    status = json.loads(out.out)
    run_id = status["runs"][0]["run_id"]
    assert main(["show", run_id, "--json"]) == 0
    out = capsys.readouterr()
    shown += [out.out, out.err]
    assert main(["audit", "log", "--json"]) == 0
    out = capsys.readouterr()
    shown += [out.out, out.err]

    state = tmp_path / ".stowplan"
    with RunStore(state / "stowplan.db") as store:
        (rec,) = [r for r in store.get_runs([run_id]).values()]
        assert rec.state == "SUCCEEDED"
        assert rec.task_spec["payload"]["launch"]["secrets"] == {"HF_TOKEN": "hf-token"}
    written = every_file(state)
    assert any(p.name == "stowplan.db" for p in written)
    node: Any = ray._private.worker._global_node  # the Ray session the actors logged into
    assert node is not None
    logs = every_file(Path(node.get_logs_dir_path()))
    assert logs
    for path in written + logs:
        assert value.encode() not in path.read_bytes(), path
    for text in [*shown, caplog.text]:
        assert value not in text
    assert "hf-token" in "".join(shown)  # the reference is shown: it is the value that is not
