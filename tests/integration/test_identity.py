"""A run's identity end to end, on real local Ray, SQLite and subprocesses: what is reused and
what runs again after an edit, an unrelated install, or a changed version of an import.

The project lives in a temporary directory outside any git repository; its task imports a
package from a site directory of its own (on the task's PYTHONPATH), whose distributions the
tests install, upgrade and add to for real (``.dist-info`` directories).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import pytest

from stowplan.cli.main import main
from stowplan.provenance.imports import USED_FILE, read_used
from stowplan.provenance.store import RunStore
from tests.unit.provenance.test_capture_used import make_dist

pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    site = tmp_path / "site"  # outside the project: not its code
    site.mkdir()
    tmp_path = tmp_path / "proj"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    make_dist(site, "fancy-pkg", "1.0", "fancy", top_level=True)
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "ident"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (tmp_path / "task.py").write_text(
        "import json, sys, fancy\n"
        "json.dump({'a': sys.argv[1], 'fancy': fancy.VERSION}, open('out.json', 'w'))\n"
    )
    f = tmp_path / "exp.toml"
    f.write_text(
        f"""
[experiment]
name = "ident"

[[tasks]]
name = "t"
command = ["python", "{{experiment_dir}}/task.py", "{{a}}"]
env = {{ PYTHONPATH = "{site}" }}
outputs = ["out.json"]
resources = {{ cpus = 1, memory = "128MiB" }}
sweep = {{ parameters = {{ a = [1, 2, 1] }} }}
"""
    )
    return f


def run(
    exp: Path, capsys: pytest.CaptureFixture[str], err: list[str] | None = None
) -> dict[str, object]:
    capsys.readouterr()
    assert main(["run", str(exp), "--json"]) == 0
    out = capsys.readouterr()
    if err is not None:
        err.append(out.err)
    status: dict[str, object] = json.loads(out.out)
    return status


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_reuse_follows_code_and_imports_not_unrelated_installs(
    ray_session: None,
    project: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = project.parent
    site = root.parent / "site"
    first = run(project, capsys)
    # a grid listing a value twice: three trials, three runs, everywhere
    assert first["counts"] == {"SUCCEEDED": 3} and first["reused"] == 0
    with RunStore(root / ".stowplan" / "stowplan.db") as store:
        runs = store.all_runs()
        assert len(runs) == 3
        attempts = store.attempts_for([r.run_id for r in runs])
    for r in runs:
        (a,) = attempts[r.run_id]
        rec = read_used(root / ".stowplan" / "runs" / r.run_id / str(a.attempt) / USED_FILE)
        assert rec is not None and rec.distributions() == {"fancy-pkg": "1.0"}
    first_ids = {r.run_id for r in runs}

    # the same again: all reused
    assert run(project, capsys)["reused"] == 3

    # an install the task never imports: still all reused
    make_dist(site, "unrelated", "9.9", "unrelated", top_level=True)
    assert run(project, capsys)["reused"] == 3

    # a new version of what it imports: all run again, and the user is told why
    make_dist(site, "fancy-pkg", "2.0", "fancy", top_level=True)
    err: list[str] = []
    again = run(project, capsys, err)
    assert again["reused"] == 0 and again["counts"] == {"SUCCEEDED": 3}
    # on stderr, once, before the runs start (not through logging)
    assert err[0].count("re-running 3 runs: fancy-pkg 1.0 -> 2.0 changed since they ran") == 1
    runs_again = {str(r["run_id"]) for r in again["runs"]}  # type: ignore[attr-defined]
    assert not runs_again & first_ids

    # show and diff say what each run imported, as captured where it ran
    old_a1 = next(r for r in runs if r.index == 0)
    rows = cast(list[dict[str, Any]], again["runs"])
    new_a1 = next(str(r["run_id"]) for r in rows if r["index"] == 0)
    shown = json.loads(cli(capsys, "show", old_a1.run_id[:12], "--json"))
    assert shown["used"] == {"fancy-pkg": "1.0"}
    text = cli(capsys, "show", new_a1[:12])
    assert "  used (captured where it ran): fancy-pkg==2.0\n" in text
    assert "  environment in the identity: CPython 3." in text
    d = json.loads(cli(capsys, "diff", old_a1.run_id[:12], new_a1[:12], "--json"))
    assert d["used"] == [{"package": "fancy-pkg", "a": "1.0", "b": "2.0"}]
    assert d["params"] == [] and d["code"]["fields"] == []
    text = cli(capsys, "diff", old_a1.run_id[:12], new_a1[:12])
    assert "used (captured where each ran):\n  ~ fancy-pkg 1.0 -> 2.0" in text
    # ... which the next invocation reuses
    assert run(project, capsys)["reused"] == 3

    # outside git, an edit to the script runs everything again
    (root / "task.py").write_text((root / "task.py").read_text() + "# edited\n")
    edited = run(project, capsys)
    assert edited["reused"] == 0
    assert not {str(r["run_id"]) for r in edited["runs"]} & (first_ids | runs_again)  # type: ignore[attr-defined]
    with RunStore(root / ".stowplan" / "stowplan.db") as store:
        (one,) = store.get_runs([str(edited["runs"][0]["run_id"])]).values()  # type: ignore[index]
        prov = store.get_provenance(one.provenance)
    assert prov.code["version"].startswith("nogit.")
    assert prov.code["tree"]["root"] == str(root.resolve())
    assert os.path.basename(prov.code["tree"]["root"]) == root.name
    # show says what that version covers
    text = cli(capsys, "show", str(edited["runs"][0]["run_id"])[:12])  # type: ignore[index]
    files = prov.code["tree"]["files"]
    assert f"  code: {prov.code['version']} (no git: {files} files (" in text
    assert f"bytes) under {root.resolve()}, hashed" in text
