"""Mistakes in an AWS project through the real CLI (moto's server behind the provider): an
instance type the region does not have (found at discovery), a region typo, a bucket without
``s3://``, a budget of 0. ``stowplan plan`` and ``stowplan run`` each exit 2 with one paragraph
naming the file, the field path and a fix, and nothing is written: no ``.stowplan`` store, no
instance launched, no object put in the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.harness import project_toml
from tests.integration.aws.proxy import LossyProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT = (
    '[experiment]\nname = "tiny"\n\n'
    '[[tasks]]\nname = "t"\ncommand = ["python", "-c", "print({i})"]\n'
    'resources = { cpus = 1, memory = "256MiB", gpus = 1 }\ntimeout = "5m"\n'
    "sweep = { parameters = { i = [1, 2] } }\n"
)

# name -> (provider fields that differ from the harness's (TOML text), [policy] lines of
# stowplan.toml, [policy] lines of the experiment, the file named, the field path, words of
# the message)
CASES: dict[str, tuple[dict[str, str], str, str, str, str, str]] = {
    "instance type not in the region": (
        {"instance_types": '["g5.xlarge", "g5.3xlarge"]'},
        "",
        "",
        "stowplan.toml",
        "$.providers.cloud.instance_types[1]",
        "'g5.3xlarge' does not exist in us-east-1",
    ),
    "region typo": (
        {"regions": '["us-eats-1"]'},
        "",
        "",
        "stowplan.toml",
        "$.providers.cloud.regions[0]",
        "did you mean 'us-east-1'?",
    ),
    "bucket without s3://": (
        {"bucket": f'"{BUCKET}/sp"'},
        "",
        "",
        "stowplan.toml",
        "$.providers.cloud.bucket",
        "'s3://BUCKET'",
    ),
    "project budget of 0": (
        {},
        "budget = { monthly_usd = 0 }",
        "",
        "stowplan.toml",
        "$.policy.budget.monthly_usd",
        "a budget of 0 dollars",
    ),
    "experiment budget of 0": (
        {},
        "",
        "budget = { per_experiment_usd = 0 }",
        "exp.toml",
        "$.policy.budget.per_experiment_usd",
        "a budget of 0 dollars",
    ),
}


def write_project(tmp_path: Path, aws: dict[str, str], policy: str, exp_policy: str) -> Path:
    text = project_toml("bad-aws", **aws)
    if policy:
        text = text.replace("[policy]\n", f"[policy]\n{policy}\n", 1)
    (tmp_path / "stowplan.toml").write_text(text)
    f = tmp_path / "exp.toml"
    body = EXPERIMENT
    if exp_policy:
        body = body.replace("\n\n[[tasks]]", f"\n\n[policy]\n{exp_policy}\n\n[[tasks]]", 1)
    f.write_text(body)
    return f


def stowplan(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``stowplan ARGS`` in its own process (a run that got past its checks would start Ray)."""
    return subprocess.run(
        [sys.executable, "-m", "stowplan.cli.main", *args],
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def nothing_written(tmp_path: Path, client: Any) -> None:
    assert not (tmp_path / ".stowplan").exists(), sorted(
        str(p) for p in (tmp_path / ".stowplan").rglob("*")
    )
    reservations = client("ec2").describe_instances()["Reservations"]
    assert reservations == [], reservations
    assert client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    assert [b["Name"] for b in client("s3").list_buckets()["Buckets"]] == [BUCKET]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_exits_2_naming_file_field_and_fix(
    tmp_path: Path, aws: tuple[LossyProxy, Any], case: str
) -> None:
    _, client = aws
    fields, policy, exp_policy, file, path, words = CASES[case]
    f = write_project(tmp_path, fields, policy, exp_policy)
    for command in (["plan"], ["run"]):
        got = stowplan(tmp_path, *command, str(f))
        err = got.stderr.strip()
        assert got.returncode == 2, (command, got.returncode, err[-3000:])
        assert err.startswith("stowplan: ") and "Traceback" not in err, err
        head, _, fix = err.partition("\n  fix: ")
        assert "\n" not in head and fix and "\n" not in fix, err
        assert file in head and f" at {path}" in head and words in head, err
        nothing_written(tmp_path, client)


def test_the_same_project_without_a_mistake_plans(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    """The cases above fail for their mistake alone: the project they change plans."""
    _, client = aws
    f = write_project(tmp_path, {"instance_types": '["g5.xlarge", "g5.2xlarge"]'}, "", "")
    got = stowplan(tmp_path, "plan", str(f))
    assert got.returncode == 0, got.stderr
    assert "2 placed now" in got.stdout, got.stdout
    nothing_written(tmp_path, client)
