"""Declared outputs through the real `stowplan run`: a directory is stored whole, a link out of
the attempt directory fails its run, and nothing that fails to be stored is called a success."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore
from stowplan.spec.canonical import sha256_hex

pytestmark = pytest.mark.integration

PROJECT = """
[project]
name = "outputs"
[providers.local]
kind = "local"
cpus = 2
"""

EXPERIMENT = """
[experiment]
name = "outputs"

[[tasks]]
name = "tree"
script = 'mkdir -p d/sub && echo a > d/a.txt && echo b > d/sub/b.txt && echo x > d/x'
outputs = ["d/x", "d/"]
resources = {{ cpus = 1, memory = "64MiB" }}

[[tasks]]
name = "reader"
command = ["python", "-c", '''
import json, os
up = json.load(open(os.environ["STOWPLAN_UPSTREAM"]))
open("seen.json", "w").write(json.dumps(sorted(up[0]["outputs"])))
''']
depends_on = ["tree"]
outputs = ["seen.json"]
resources = {{ cpus = 1, memory = "64MiB" }}

[[tasks]]
name = "escape"
script = 'echo fine > ok.txt; ln -s {secret} out.txt'
outputs = ["ok.txt", "out.txt"]
resources = {{ cpus = 1, memory = "64MiB" }}
"""


def test_a_directory_is_stored_and_a_link_out_is_refused(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "hostname"
    secret.write_text("this machine's name, not the task's output\n")
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    f = tmp_path / "outputs.toml"
    f.write_text(EXPERIMENT.format(secret=json.dumps(str(secret))[1:-1]))
    os.chdir(tmp_path)

    assert main(["run", str(f)]) == 1  # the escape fails, so the command does
    capsys.readouterr()
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        runs = {r.task: r for r in store.runs_by_name("outputs")}
        arts = store.artifacts_for([r.run_id for r in runs.values()])
        leaked = store.runs_producing(sha256_hex(secret.read_bytes()))
    tree, reader, escape = runs["tree"], runs["reader"], runs["escape"]

    assert tree.state == "SUCCEEDED"
    names = ["d/a.txt", "d/sub/b.txt", "d/x"]
    assert [a.name for a in arts[tree.run_id]] == names
    assert [Path(a.path).read_text() for a in arts[tree.run_id]] == ["a\n", "b\n", "x\n"]
    # the dependent task is given each file of the tree by its name
    assert reader.state == "SUCCEEDED"
    assert json.loads(Path(arts[reader.run_id][0].path).read_text()) == names

    assert escape.state == "FAILED" and escape.failure == "user_error"
    assert "out.txt: leads to" in escape.reason
    assert "outside the attempt directory" in escape.reason
    assert escape.run_id not in arts and leaked == []

    assert main(["show", tree.run_id[:10], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in shown["artifacts"]] == names
    assert main(["show", escape.run_id[:10]]) == 0
    assert "outside the attempt directory" in capsys.readouterr().out
