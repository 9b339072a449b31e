"""`stowplan gc` against moto's server: stray stowplan instances are listed (dry by default) and,
with --yes, terminated; instances an unfinished run uses, and other projects' instances, are
left alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.cli import main as cli_main
from stowplan.provenance.records import AttemptRecord
from stowplan.provenance.store import RunStore
from stowplan.spec.canonical import attempt_key
from tests.integration.aws.harness import project_toml
from tests.integration.aws.proxy import LossyProxy
from tests.unit.provenance.test_store import experiment, run

POOL = "cloud/us-east-1/g5.xlarge"


def launch(client: Any, project: str, agent: str, provider: str = "cloud") -> str:
    tags = {
        "stowplan:provider": provider,
        "stowplan:project": project,
        "stowplan:pool": POOL,
        "stowplan:agent": agent,
    }
    got = client("ec2").run_instances(
        ImageId="ami-12c6146b",
        InstanceType="g5.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
        ],
    )
    return str(got["Instances"][0]["InstanceId"])


def states(client: Any) -> dict[str, str]:
    got = client("ec2").describe_instances()
    return {
        i["InstanceId"]: i["State"]["Name"] for r in got["Reservations"] for i in r["Instances"]
    }


def test_gc_lists_strays_and_terminates_them_only_with_yes(
    tmp_path: Path, aws: tuple[LossyProxy, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = aws
    root = tmp_path / "lab"
    root.mkdir()
    (root / "stowplan.toml").write_text(project_toml("lab"))
    stray = launch(client, "lab", "t1-0")
    used = launch(client, "lab", "t1-1")
    other = launch(client, "another-lab", "t2-0")  # another project's: its store is elsewhere
    # a running run whose attempt is on `used`, and a finished one that was on `stray`
    e = experiment()
    live, done = run(e, 0), msgspec.structs.replace(run(e, 1), state="SUCCEEDED")
    with RunStore(root / ".stowplan" / "stowplan.db") as store:
        store.put_experiment(e)
        store.put_runs([msgspec.structs.replace(live, state="RUNNING"), done])
        store.write_intents(
            [
                AttemptRecord(
                    key=attempt_key(r.run_id, 1),
                    run_id=r.run_id,
                    attempt=1,
                    provider="cloud",
                    pool=POOL,
                    state=state,
                    job_id=job,
                )
                for r, state, job in ((live, "RUNNING", used), (done, "SUCCEEDED", stray))
            ]
        )

    d = ["--project-dir", str(root)]
    assert cli_main.main(["gc", "--json", *d]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["instance_id"] for s in got["strays"]] == [stray]
    assert [s["instance_id"] for s in got["kept"]] == [used]
    assert got["dry_run"] is True and got["terminated"] == []
    assert cli_main.main(["gc", *d]) == 0
    out = capsys.readouterr().out
    assert stray in out and "1 stray instance" in out and "stowplan gc --yes" in out
    assert {states(client)[i] for i in (stray, used, other)} == {"running"}  # dry: nothing changed

    assert cli_main.main(["gc", "--yes", *d]) == 0
    assert "terminated 1 stray instance" in capsys.readouterr().out
    now = states(client)
    assert (now[stray], now[used], now[other]) == ("terminated", "running", "running")
    assert cli_main.main(["gc", *d]) == 0
    assert "no stray instances; 1 instance in use by unfinished runs kept" in (
        capsys.readouterr().out
    )


def test_gc_names_a_provider_that_is_not_aws(
    tmp_path: Path, aws: tuple[LossyProxy, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stowplan.toml").write_text(project_toml("lab"))
    assert cli_main.main(["gc", "--provider", "laptop", "--project-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--provider 'laptop' is not configured" in err and "cloud" in err
