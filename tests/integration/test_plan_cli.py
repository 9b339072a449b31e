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


# ---- devices: the lease a run would get, and a run no node can hold -------------------------

GPU_PROJECT = """
[project]
name = "gpus"

[providers.box]
kind = "local"
cpus = 4
gpus = 2
"""

GPU_EXPERIMENT = """
[experiment]
name = "on-devices"

[[tasks]]
name = "pair"
command = ["true"]
resources = {{ cpus = 1, memory = "64MiB", gpus = 2 }}
{more}
"""

WIDE_TASK = """
[[tasks]]
name = "wide"
command = ["true"]
resources = { cpus = 1, memory = "64MiB", gpus = 4 }
"""

H200_XML = (
    Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "h200-x1" / "nvidia-smi-q-x.xml"
)


def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """This machine has ``n`` GPUs, as a stand-in ``nvidia-smi`` on PATH reports them (the
    captured report of an H200 host, its one GPU repeated); NVML is kept out of it."""
    import os
    import re
    import shutil
    import stat

    import stowplan.provenance.nvidia as nvidia

    xml = H200_XML.read_text()
    head, rest = xml.split("\t<gpu id=", 1)
    gpu = "\t<gpu id=" + rest[: rest.index("</gpu>") + len("</gpu>")] + "\n"
    gpus = [re.sub(r"<uuid>[^<]*</uuid>", f"<uuid>GPU-fake-{i}</uuid>", gpu) for i in range(n)]
    head = re.sub(
        r"<attached_gpus>\d+</attached_gpus>", f"<attached_gpus>{n}</attached_gpus>", head
    )
    report = tmp_path / "fake-smi" / "report.xml"
    report.parent.mkdir()
    report.write_text(head + "".join(gpus) + "</nvidia_smi_log>\n")
    tool = report.parent / "nvidia-smi"
    cat = shutil.which("cat")
    tool.write_text(f'#!/bin/sh\n[ "$1 $2" = "-q -x" ] || exit 3\nexec {cat} "{report}"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{report.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(nvidia, "nvml_gpus", lambda: None)
    assert [g.uuid for g in nvidia.capture_gpus()] == [f"GPU-fake-{i}" for i in range(n)]


def write_gpus(tmp_path: Path, more: str = "") -> Path:
    (tmp_path / "stowplan.toml").write_text(GPU_PROJECT)
    f = tmp_path / "exp.toml"
    f.write_text(GPU_EXPERIMENT.format(more=more))
    return f


def test_plan_explain_names_the_node_and_devices_a_run_would_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(tmp_path, monkeypatch, 2)
    import socket

    host = socket.gethostname()
    f = write_gpus(tmp_path)
    assert main(["plan", str(f), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [(run, got)] = doc["runs"].items()
    assert got["pool"] == "box" and got["lease"] == {"node": host, "devices": [0, 1]}
    assert doc["placed"] == 1 and doc["held"] == {}
    assert main(["plan", str(f)]) == 0
    assert f"pair[0] -> box: node {host}, GPUs 0,1" in capsys.readouterr().out
    assert main(["plan", str(f), "--explain", run[:16]]) == 0
    text = capsys.readouterr().out
    assert "-> box" in text and f"\n  box: node {host}, GPUs 0,1" in text
    assert main(["plan", str(f), "--explain", run[:16], "--json"]) == 0
    why = json.loads(capsys.readouterr().out)
    assert why["placed"] and why["lease"] == {"node": host, "devices": [0, 1]}
    assert not (tmp_path / ".stowplan" / "stowplan.db").exists()  # nothing recorded


def test_a_run_wider_than_every_node_is_refused_with_the_widest_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(tmp_path, monkeypatch, 2)
    import socket

    host = socket.gethostname()
    f = write_gpus(tmp_path, WIDE_TASK)
    for cmd in ("plan", "run"):
        assert main([cmd, str(f)]) == 2
        err = capsys.readouterr().err
        assert "exp.toml" in err and "$.tasks[1].resources" in err
        assert "task 'wide'" in err and "4 GPUs" in err
        assert f"box: no node has 4 GPUs (the widest, {host}, has 2)" in err
        assert "lower the resources of 'wide'" in err  # the fix
        assert not (tmp_path / ".stowplan" / "stowplan.db").exists()
