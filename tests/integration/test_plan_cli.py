"""``stowplan plan``: real providers discovered, the real core and engine, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stowplan.cli.main import main

pytestmark = pytest.mark.integration

PROJECT = """
[project]
name = "plan"

[providers.eu]
kind = "local"
cpus = 2
site = "eu-west"

[providers.us]
kind = "local"
cpus = 2
site = "us-east"

[[placement.links]]
src = "eu-west"
dst = "us-east"
bandwidth = "1GB"
egress_per_gb = 0.05

[placement.residency]
eu-only = ["eu-west"]
"""

EXPERIMENT = """
[experiment]
name = "near-data"

[[tasks]]
name = "train"
command = ["true"]
resources = {{ cpus = 1, memory = "64MiB" }}
inputs = [{{ uri = "data/corpus", size = "10GB", sites = ["eu-west"]{residency} }}]
sweep = {{ parameters = {{ k = [1, 2, 3, 4, 5, 6] }} }}
"""


def write(tmp_path: Path, residency: str = "") -> Path:
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus").write_text("tokens\n")
    f = tmp_path / "exp.toml"
    f.write_text(EXPERIMENT.format(residency=residency))
    return f


def test_plan_fills_the_pool_next_to_the_data_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path)
    assert main(["plan", str(f), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_pool = {a["pool"]: a for a in doc["assignments"]}
    assert by_pool["eu"]["tasks"] == 2 and by_pool["eu"]["data_bytes"] == 0
    assert by_pool["us"]["tasks"] == 2 and by_pool["us"]["data_bytes"] == 2 * 10e9
    assert doc["placed"] == 4 and doc["queued"] == 2
    assert doc["terms"]["egress_cost"] == pytest.approx(2 * 10 * 0.05)
    assert doc["terms"]["data_seconds"] == pytest.approx(2 * 10)
    assert doc["status"] in ("OPTIMAL", "FEASIBLE")
    assert len(doc["runs"]) == 4
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()  # nothing recorded


def test_plan_keeps_resident_data_in_its_region_and_explains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path, residency=', residency = "eu-only"')
    assert main(["plan", str(f), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {a["pool"] for a in doc["assignments"]} == {"eu"}
    run = next(iter(doc["runs"]))
    assert main(["plan", str(f), "--explain", run[:16]]) == 0
    text = capsys.readouterr().out
    assert "-> eu" in text
    assert main(["plan", str(f)]) == 0
    assert "2 placed now, 4 queued" in capsys.readouterr().out


def test_an_unknown_residency_rule_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path, residency=', residency = "eu-onyl"')
    assert main(["plan", str(f)]) == 2
    err = capsys.readouterr().err
    assert "unknown residency rule 'eu-onyl'" in err
    assert "$.tasks[0].inputs[0].residency" in err
    assert "exp.toml" in err
    assert "eu-only" in err  # the fix names the rules that exist
    assert main(["run", str(f)]) == 2
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()
