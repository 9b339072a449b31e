"""Every reading command with ``--server`` against a real ``stowplan serve --read-only``
(uvicorn on the loopback, real SQLite): an admin gets what the same command prints on the
server's project, a member only their team's, and a refusal is exit 2 naming the 403."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stowplan.cli.main import main
from tests.integration.service.conftest import WORK_PY, Service, experiment
from tests.integration.service.test_authz import seed

pytestmark = pytest.mark.integration


def run_cli(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    token: str | None,
    *argv: str,
) -> tuple[int, str, str]:
    if token is None:
        monkeypatch.delenv("STOWPLAN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("STOWPLAN_TOKEN", token)
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def as_json(text: str) -> Any:
    return json.loads(text)


def test_reading_commands_answer_as_on_the_server_and_only_the_teams(
    read_only_service: tuple[Service, dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    svc, tokens = read_only_service
    runs = seed(svc.root)
    cats, words = runs["cats"], runs["words"]
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # no project here: the server's
    local = ["--project-dir", str(svc.root)]
    remote = ["--server", svc.url]

    def both(*argv: str) -> tuple[str, str]:
        rc, here, err = run_cli(capsys, monkeypatch, None, *argv, *local)
        assert rc == 0, err
        rc, there, err = run_cli(capsys, monkeypatch, tokens["ada"], *argv, *remote)
        assert rc == 0, err
        return here, there

    # an admin sees what the server's own CLI shows, for every reading command
    for argv in (
        ("show", cats[:12], "--json"),
        ("find", "--json"),
        ("find", "--experiment", "cats", "--param", "i=1", "--state", "pending", "--json"),
        ("lineage", cats, "--down", "--json"),
        ("lineage", cats, "--format", "dot"),
        ("diff", cats, words, "--json"),
        ("diff", cats, words),
        ("audit", "log", "--json"),
        ("audit", "log", "--target", cats, "--json"),
        ("audit", "verify", "--json"),
    ):
        here, there = both(*argv)
        assert here == there, argv
    here, there = both("show", cats[:12])
    assert here == there and f"run {cats}" in there
    found = as_json(both("find", "--param", "i=1", "--json")[1])
    assert sorted(r["experiment"] for r in found) == ["cats", "orphan", "words"]

    # a member of vision: vision's runs only; another team's is a 403, exit 2
    mona = tokens["mona"]
    rc, out, err = run_cli(capsys, monkeypatch, mona, "find", "--json", *remote)
    assert rc == 0, err
    assert {r["experiment"] for r in as_json(out)} == {"cats"}
    rc, out, err = run_cli(capsys, monkeypatch, mona, "audit", "log", "--json", *remote)
    assert rc == 0, err
    assert {e["why"] for e in as_json(out)} == {"seed cats"}
    for argv in (
        ("show", words),
        ("lineage", words),
        ("diff", cats, words),
        ("logs", words),
        ("cancel", words[:12]),
        ("cancel", "words"),
        ("audit", "verify"),
    ):
        rc, out, err = run_cli(capsys, monkeypatch, mona, *argv, *remote)
        assert rc == 2, (argv, out, err)
        assert "answered 403" in err and "fix:" in err, (argv, err)
        assert "Traceback" not in err
    # her own run: no attempts yet, said as such; a cancel needs the missing control plane
    rc, _, err = run_cli(capsys, monkeypatch, mona, "logs", cats, *remote)
    assert rc == 2 and "no attempts yet" in err, err
    rc, _, err = run_cli(capsys, monkeypatch, mona, "cancel", "cats", *remote)
    assert rc == 2 and "answered 503" in err and "control plane" in err, err
    # and from $STOWPLAN_SERVER as well as --server
    monkeypatch.setenv("STOWPLAN_SERVER", svc.url)
    rc, out, err = run_cli(capsys, monkeypatch, mona, "find", "--json")
    assert rc == 0 and {r["experiment"] for r in as_json(out)} == {"cats"}, err


def test_plan_with_server_is_the_plan_on_the_server(
    read_only_service: tuple[Service, dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    svc, tokens = read_only_service
    mine = tmp_path_factory.mktemp("mine")  # the user's checkout: no stowplan.toml
    (mine / "exp.toml").write_text(experiment("cats"))
    (mine / "work.py").write_bytes(WORK_PY)
    monkeypatch.chdir(mine)
    rc, out, err = run_cli(
        capsys, monkeypatch, tokens["mona"], "plan", "exp.toml", "--json", "--server", svc.url
    )
    assert rc == 0, err
    there = as_json(out)
    assert there["experiment"] == "cats" and there["placed"] == 2, there
    assert {a["provider"] for a in there["assignments"]} == {"local"}
    # --explain of one run, by a prefix of its id
    run = next(iter(there["runs"]))
    rc, out, err = run_cli(
        capsys, monkeypatch, tokens["mona"], "plan", "exp.toml", "--explain", run[:10],
        "--server", svc.url,
    )  # fmt: skip
    assert rc == 0 and "local" in out, (out, err)
    # a bad experiment: exit 2, the error with the file's name, not the server's path
    (mine / "bad.toml").write_text("[experiment]\nname = 3\n")
    rc, out, err = run_cli(
        capsys, monkeypatch, tokens["mona"], "plan", "bad.toml", "--server", svc.url
    )
    assert rc == 2 and "bad.toml" in err and "$.experiment.name" in err, err
    assert str(svc.root) not in err
    # a viewer may not
    rc, out, err = run_cli(
        capsys, monkeypatch, tokens["vera"], "plan", "exp.toml", "--server", svc.url
    )
    assert rc == 2 and "answered 403" in err, err
    assert not (svc.root / "workspaces").exists()  # nothing left behind
    # run flags the service decides are refused before anything is sent
    rc, out, err = run_cli(
        capsys, monkeypatch, tokens["mona"], "run", "exp.toml", "--dry-run", "--server", svc.url
    )
    assert rc == 2 and "--dry-run does not work with --server" in err, err


def test_the_server_url_and_token_are_checked_first(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (("find",), ("show", "abcdef"), ("logs", "abcdef", "-f"), ("audit", "log")):
        rc, _, err = run_cli(capsys, monkeypatch, "x", *argv, "--server", "ftp://lab")
        assert rc == 2 and "not an http:// or https:// URL" in err, err
        rc, _, err = run_cli(capsys, monkeypatch, None, *argv, "--server", "http://127.0.0.1:9")
        assert rc == 2 and "STOWPLAN_TOKEN is not set" in err, err
