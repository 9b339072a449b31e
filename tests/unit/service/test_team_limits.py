"""``[service.teams.NAME]`` limits: what the core's sharing gets, and mistakes named (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.scheduler.share import TeamLimits
from stowplan.spec.loader import load_project

USER = '[service.users.mona]\nteam = "vision"\n'


def project(tmp_path: Path, team: str) -> Path:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "lab"\n[service.teams.vision]\n' + team + USER
    )
    return tmp_path


def test_a_teams_limits_reach_the_core(tmp_path: Path) -> None:
    root = project(
        tmp_path,
        "guaranteed_gpus = { A100 = 2 }\nmax_gpus = { A100 = 4, '*' = 6 }\n"
        'gpu_hours = 500\nwindow = "30d"\nweight = 2\nmonthly_usd = 500\n',
    )
    team = load_project(search_from=root).config.service.teams["vision"]
    assert team.limits() == TeamLimits(
        guaranteed_gpus={"A100": 2},
        max_gpus={"A100": 4, "*": 6},
        gpu_hours=500.0,
        window_s=30 * 86400.0,
        weight=2.0,
        monthly_usd=500.0,
    )


def test_a_team_without_limits_is_not_limited(tmp_path: Path) -> None:
    team = load_project(search_from=project(tmp_path, "")).config.service.teams["vision"]
    assert team.limits() == TeamLimits(window_s=7 * 86400.0)


@pytest.mark.parametrize(
    ("team", "path", "words"),
    [
        ("guaranteed_gpus = { A100 = 5 }\nmax_gpus = { A100 = 4 }\n", "guaranteed_gpus.A100", "4"),
        ("guaranteed_gpus = { A100 = 5 }\nmax_gpus = { '*' = 3 }\n", "guaranteed_gpus.A100", "3"),
        ("guaranteed_gpus = { '*' = 1 }\n", "guaranteed_gpus.*", "per GPU model"),
        ("max_gpus = { A100 = -1 }\n", "$.service.teams.vision.max_gpus.A100", "at least 0"),
        ('window = "soon"\n', "window", "soon"),
        ("window = 0\n", "window", "positive"),
        ("weight = 0\n", "$.service.teams.vision.weight", "more than 0"),
        ("gpu_hours = -3\n", "$.service.teams.vision.gpu_hours", "at least 0"),
        ("monthly_usd = 0\n", "monthly_usd", "would hold every cloud run"),
    ],
)
def test_a_bad_team_limit_is_a_spec_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], team: str, path: str, words: str
) -> None:
    root = project(tmp_path, team)
    assert main(["serve", "--project-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert "stowplan.toml" in err and path in err and words in err and "fix:" in err, err
    assert not (root / ".stowplan").exists()


def test_a_restricted_provider_that_is_not_configured_is_a_spec_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "lab"\n[service]\nrestricted = ["aws"]\n[service.teams.vision]\n' + USER
    )
    assert main(["serve", "--project-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "stowplan.toml:4 at $.service.restricted[0]" in err and "no provider 'aws'" in err
    assert "[providers.aws]" in err and "fix:" in err
    assert not (tmp_path / ".stowplan").exists()


def test_a_port_in_use_is_a_clear_error_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    root = project(tmp_path, "")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--project-dir", str(root), "--port", str(port), "--read-only"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "$.service.port" in err, err
    assert "another port" in err
