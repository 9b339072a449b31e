"""The pieces every command shares: consoles, counted nouns, flag types."""

from __future__ import annotations

import argparse

import pytest
from rich.table import Table

from stowplan.cli.common import budget_seconds, choice, hex_prefix, make_console, plural, verb
from stowplan.cli.main import build_parser


@pytest.mark.parametrize(
    ("n", "noun", "want"),
    [
        (1, "run", "1 run"),
        (0, "run", "0 runs"),
        (2, "run", "2 runs"),
        (1.0, "CPU", "1 CPU"),
        (1.5, "CPU", "1.5 CPUs"),
        (1, "entry", "1 entry"),
        (3, "entry", "3 entries"),
        (2, "GPU", "2 GPUs"),
        (2, "child", "2 children"),
    ],
)
def test_plural(n: float, noun: str, want: str) -> None:
    many = "children" if noun == "child" else None
    assert plural(n, noun, many) == want


def test_verb_agrees_with_the_count() -> None:
    assert [verb(n, "waits", "wait") for n in (0, 1, 2)] == ["wait", "waits", "wait"]


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-1", "1e309", "abc", ""])
def test_a_bad_budget_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"--budget 0\.5"):
        budget_seconds(text)


def test_a_good_budget_passes() -> None:
    assert budget_seconds("0") == 0.0
    assert budget_seconds("2.5") == 2.5


@pytest.mark.parametrize("flag", ["nan", "inf", "-1", "NaN"])
def test_plan_budget_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["plan", "x.toml", "--budget", flag])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --budget" in err and "Traceback" not in err


def test_choice_folds_case_and_lists_the_values() -> None:
    parse = choice(["READY", "FAILED"], what="run state")
    assert parse("failed") == "FAILED"
    with pytest.raises(argparse.ArgumentTypeError, match="use one of: READY, FAILED"):
        parse("bogus")


@pytest.mark.parametrize("text", ["", "   ", "abc", "zz12zz12", "0" * 65])
def test_hex_prefix_refuses_what_cannot_be_a_hash(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="8 to 64 hex digits"):
        hex_prefix("ledger head hash", shortest=8)(text)


def test_hex_prefix_takes_any_case() -> None:
    assert hex_prefix("h", shortest=8)("ABCDEF0123") == "abcdef0123"


def test_find_state_and_expect_head_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, shown in (
        (["find", "--state", "bogus"], "SUCCEEDED"),
        (["audit", "verify", "--expect-head", ""], "hex digits"),
    ):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert shown in capsys.readouterr().err
    assert build_parser().parse_args(["find", "--state", "failed"]).state == "FAILED"


def test_a_piped_console_is_as_wide_as_its_content(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    table.add_column("params")
    table.add_column("code")
    long = " ".join(f"param{i}={i * 1.5}" for i in range(12))
    table.add_row(long, "no-git-0123456789abcdef")
    make_console().print(table)
    out = capsys.readouterr().out
    assert long in out and "no-git-0123456789abcdef" in out  # neither cut nor folded
    monkeypatch.setenv("COLUMNS", "60")  # an explicit width still wins
    make_console().print(table)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 60
