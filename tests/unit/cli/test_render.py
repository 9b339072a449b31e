"""What `show`, `diff` and `run` print for people, from records built here (no store, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stowplan.cli import main as cli_main
from stowplan.cli.common import make_console
from stowplan.cli.inspect import code_line, used_line
from stowplan.cli.provenance import diff_lines
from stowplan.cli.run import _print_dry_run, render_results
from stowplan.provenance.records import ArtifactRecord, RunRecord


def test_show_says_what_a_code_version_outside_git_covers() -> None:
    tree = {
        "root": "/x",
        "sha256": "ab" * 32,
        "files": 12,
        "bytes": 3401,
        "ignore_file": "/x/.stowplanignore",
        "referenced": [],
        "skipped": [],
    }
    assert code_line({"version": "nogit.abababababab", "tree": tree}) == (
        "code: nogit.abababababab (no git: 12 files (3401 bytes) under /x, hashed, ignoring "
        "what /x/.stowplanignore lists)"
    )
    # in git: the branch and the remote, as before
    assert code_line({"version": "c0ffee", "branch": "main", "remote_url": "git@h:r"}) == (
        "code: c0ffee (branch main, remote git@h:r)"
    )


def test_show_lists_what_a_run_imported() -> None:
    assert used_line({"numpy": "1.26.4", "scikit-learn": "1.5.0"}) == (
        "used (captured where it ran): numpy==1.26.4, scikit-learn==1.5.0"
    )
    assert used_line({}) == "used (captured where it ran): the standard library only"
    assert used_line(None).startswith("used: nothing captured")


def _diff(**groups: object) -> dict[str, object]:
    d: dict[str, object] = {
        "a": "a" * 64,
        "b": "b" * 64,
        "params": [],
        "spec": [],
        "code": {"fields": [], "diff_of_diffs": []},
        "data": [],
        "packages": {"added": [], "removed": [], "changed": []},
        "used": [],
        "environment": [],
        "hardware": [],
        "placement": [],
        "outputs": [],
    }
    d.update(groups)
    return d


def test_diff_shows_what_each_run_imported_differently() -> None:
    text = "\n".join(
        diff_lines(
            _diff(
                used=[
                    {"package": "fancy-pkg", "a": "1.0", "b": "2.0"},
                    {"package": "new-pkg", "a": None, "b": "0.1"},
                    {"package": "old-pkg", "a": "3.0", "b": None},
                ]
            )
        )
    )
    assert "used (captured where each ran):" in text
    assert "  ~ fancy-pkg 1.0 -> 2.0" in text
    assert "  + new-pkg==0.1" in text and "  - old-pkg==3.0" in text
    assert "no differences" not in text
    assert "no differences in what was recorded" in diff_lines(_diff())


def _run(rid: str, state: str = "SUCCEEDED") -> RunRecord:
    return RunRecord(
        run_id=rid, experiment_id="e", experiment="x", task="fit", index=0,
        params={"C": 1}, seed=0, replicate=0, depends_on=[], identity={},
        task_spec={}, provenance="p", state=state,
    )  # fmt: skip


def test_results_table_shows_the_output_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.json"
    out.write_text(json.dumps({"accuracy_on_the_held_out_set": 0.875, "kernel": "rbf"}))
    arts = {
        "r" * 64: [
            ArtifactRecord(run_id="r" * 64, name="m.json", sha256="0", size=1, path=str(out))
        ]
    }
    render_results(make_console(), [_run("r" * 64)], arts, {"r" * 64})
    shown = capsys.readouterr().out
    assert "accuracy_on_the_held_out_set" in shown and "0.875" in shown and "rbf" in shown
    assert "1 succeeded; 1 reused" in shown


def test_a_dry_run_of_one_run_says_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stowplan.session import prepare

    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "p"\n[providers.local]\nkind = "local"\ncpus = 1\n'
    )
    (tmp_path / "one.toml").write_text(
        '[experiment]\nname = "one"\n[[tasks]]\nname = "t"\nscript = "true"\n'
    )
    prepared = prepare(tmp_path / "one.toml")
    _print_dry_run(make_console(), prepared, [])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("one: 1 run (experiment "), first


def test_ctrl_c_anywhere_in_a_command_ends_it_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stowplan.cli import inspect

    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect, "cmd_ls", interrupted)
    assert cli_main.main(["ls"]) == 130
    assert capsys.readouterr().err == ""
