"""``[service]`` validation and ``stowplan token``: clear SpecErrors (exit 2), nothing started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stowplan.cli.main import main

TEAMS = """
[service.teams.vision]
[service.users.mona]
team = "vision"
"""


def project(tmp_path: Path, service: str) -> Path:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "lab"\n' + service)
    return tmp_path


@pytest.mark.parametrize(
    ("service", "path", "words"),
    [
        (
            "[service]\nport = 99999\n" + TEAMS.replace("[service.teams", "[service.teams", 1),
            "$.service.port",
            "at most 65,535",
        ),
        (
            '[service.teams.vision]\n[service.users.mona]\nteam = "nlp"\n',
            "$.service.users.mona.team",
            "no team 'nlp'",
        ),
        (
            '[service.teams.vision]\n[service.users.mona]\nteam = "vision"\nrole = "boss"\n',
            "$.service.users.mona.role",
            "admin",
        ),
        ('[service]\nbind = "0.0.0.0"\nwho = 1\n', "$.service", "who"),
        ('[service]\nmax_body = "lots"\n', "$.service.max_body", "lots"),
        ("[service]\n", "$.service.users", "no users"),
        (
            '[service.tls]\ncert = "missing.pem"\nkey = "missing.key"\n' + TEAMS,
            "$.service.tls.cert",
            "missing.pem",
        ),
    ],
)
def test_a_bad_service_table_is_a_spec_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], service: str, path: str, words: str
) -> None:
    root = project(tmp_path, service)
    assert main(["serve", "--project-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert "stowplan.toml" in err and path in err and words in err and "fix:" in err, err
    assert not (root / ".stowplan").exists()  # nothing written, nothing started


def test_token_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = project(tmp_path, TEAMS)
    d = ["--project-dir", str(root)]
    assert main(["token", "create", "mona", "--label", "laptop", *d]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("stp_") and "shown once" in out.err
    assert token.encode() not in (root / ".stowplan" / "service.db").read_bytes()
    token_id = token.split("_")[1]
    assert main(["token", "list", *d]) == 0
    listed = capsys.readouterr().out
    assert token_id in listed and "live" in listed and token not in listed
    assert main(["token", "revoke", token_id, *d]) == 0
    assert main(["token", "list", *d]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["token", "revoke", token_id, *d]) == 2
    assert "no live token" in capsys.readouterr().err


def test_token_for_an_unconfigured_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = project(tmp_path, TEAMS)
    assert main(["token", "create", "eve", "--project-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert "$.service.users.eve" in err and "mona" in err
    assert main(["token", "create", "mona", "--expires-in", "-1", "--project-dir", str(root)]) == 2


def test_server_must_be_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOWPLAN_SERVER", "ftp://x")
    assert main(["ls"]) == 2
    assert "not an http:// or https:// URL" in capsys.readouterr().err
    monkeypatch.delenv("STOWPLAN_SERVER")
    monkeypatch.delenv("STOWPLAN_TOKEN", raising=False)
    assert main(["status", "--server", "http://127.0.0.1:9"]) == 2
    assert "STOWPLAN_TOKEN is not set" in capsys.readouterr().err
    assert os.environ.get("STOWPLAN_SERVER") is None
