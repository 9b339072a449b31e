"""The AWS driver against moto's server over HTTP. No instance boots there, so each instance's
real user-data (read back from EC2) runs here as a local process against moto's S3 through its
presigned URLs: the exact script an instance would run is what is tested."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.providers.aws import AwsProvider, AwsRequest
from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.spec.models import AwsProviderConfig
from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.proxy import LossyProxy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def make(tmp_path: Path, **kw: object) -> AwsProvider:
    base: dict[str, object] = {
        "kind": "aws",
        "regions": ["us-east-1"],
        "bucket": f"s3://{BUCKET}/sp",
        "ami": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        "instance_types": ["g5.xlarge", "g5.2xlarge"],
        "spot": "prefer",
        "idle_shutdown": 1,
        "max_hourly_usd": 5,
    }
    cfg = msgspec.convert({**base, **kw}, AwsProviderConfig)
    return AwsProvider("cloud", cfg, state_dir=tmp_path / ".stowplan", project="lab")


def launch(i: int, pool: str, **kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "key": f"{i:032x}",
        "run_id": "run-1",
        "attempt": 0,
        "pool": pool,
        "name": f"trial-{i}",
        "script": f'cat seed.txt > out.txt; echo "trial {i} says hi"; echo $SEED >> out.txt',
        "env": {"SEED": str(i)},
        "gpus": 1,
        "timeout_s": 120.0,
        "outputs": ["out.txt"],
        "files": {"seed.txt": f"seed {i}\n".encode()},
    }
    return msgspec.convert({**base, **kw}, LaunchSpec)


def instances(client: Any, key: str) -> list[dict[str, Any]]:
    got = client("ec2").describe_instances(Filters=[{"Name": "tag:stowplan:key", "Values": [key]}])
    return [i for r in got["Reservations"] for i in r["Instances"]]


def run_user_data(
    tmp_path: Path, client: Any, instance_id: str
) -> subprocess.CompletedProcess[str]:
    got = client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    script = tmp_path / f"{instance_id}.sh"
    script.write_bytes(base64.b64decode(got["UserData"]["Value"]))
    halt = tmp_path / "halt"
    halt.write_text(f"#!/bin/sh\necho {instance_id} >> {tmp_path / 'halted'}\n")
    halt.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "STOWPLAN_ROOT": str(tmp_path / "instance"),
        "STOWPLAN_HALT": str(halt),
    }
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120
    )


async def test_discover_offers_priced_elastic_pools(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    async with make(tmp_path) as driver:
        pools = await driver.discover()
    ids = [p.id for p in pools]
    # g5.2xlarge costs more than max_hourly_usd allows only beyond 4 instances: both offered
    assert ids == [
        "cloud/us-east-1/g5.2xlarge",
        "cloud/us-east-1/g5.2xlarge/spot",
        "cloud/us-east-1/g5.xlarge",
        "cloud/us-east-1/g5.xlarge/spot",
    ]
    xl = next(p for p in pools if p.id == "cloud/us-east-1/g5.xlarge")
    assert xl.elastic and xl.node is not None
    assert xl.node.gpus == {"a10g": 1} and xl.node.cpus == 4 and xl.node.memory == 16 << 30
    assert xl.price_per_hour == pytest.approx(1.006) and xl.max_instances == 4  # 5 $/h budget
    spot = next(p for p in pools if p.id == "cloud/us-east-1/g5.xlarge/spot")
    # moto's spot history is a placeholder (0.00001 $ in 2006): the table's price is used
    assert spot.spot and spot.price_per_hour == pytest.approx(0.4024)
    assert spot.interruption_rate > 0 and spot.boot_s == 90


async def test_an_unknown_instance_type_is_a_spec_error(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    from stowplan.errors import SpecError

    async with make(tmp_path, instance_types=["g5.xlarge", "g5.huge"]) as driver:
        with pytest.raises(SpecError) as e:
            await driver.discover()
    assert e.value.path == "$.providers.cloud.instance_types[1]"
    assert "g5.huge" in e.value.render() and "us-east-1" in e.value.render()


async def test_submit_run_the_user_data_and_describe(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        launches = [
            launch(1, "cloud/us-east-1/g5.xlarge/spot"),
            launch(2, "cloud/us-east-1/g5.xlarge"),
        ]
        requests = driver.plan(launches, facts)
        assert all(isinstance(r, AwsRequest) for r in requests)
        reports = await driver.submit(requests)
        assert [r.state for r in reports] == [ProviderState.QUEUED] * 2  # pending
        keys = [launch.key for launch in launches]
        assert [r.state for r in await driver.describe(keys)] == [ProviderState.RUNNING] * 2
        ids = {}
        for k in keys:
            (inst,) = instances(client, k)
            ids[k] = inst["InstanceId"]
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            assert tags["stowplan:run"] == "run-1" and tags["stowplan:project"] == "lab"
        assert instances(client, keys[0])[0].get("InstanceLifecycle") == "spot"
        for k in keys:
            done = run_user_data(tmp_path, client, ids[k])
            assert done.returncode == 0, done.stderr
        final = await driver.describe(keys)
        assert [r.state for r in final] == [ProviderState.SUCCEEDED] * 2, final
        for i, r in zip((1, 2), final, strict=True):
            assert r.exit_code == 0 and r.job_id == ids[r.key]
            url = r.outputs["out.txt"]
            assert url == f"s3://{BUCKET}/sp/attempts/run-1/{r.key}/outputs/out.txt"
            body = client("s3").get_object(Bucket=BUCKET, Key=url.split("/", 3)[3])["Body"]
            assert body.read() == f"seed {i}\n{i}\n".encode()
        logs = b"".join([c async for c in driver.logs(keys[0])])
        assert logs == b"trial 1 says hi\n"
        # the instance shut itself down after idle_shutdown
        assert sorted((tmp_path / "halted").read_text().split()) == sorted(ids.values())
        # a late, repeated submit of the same requests launches nothing
        again = await driver.submit(requests)
        assert [r.state for r in again] == [ProviderState.SUCCEEDED] * 2
    for k in keys:
        assert len(instances(client, k)) == 1


async def test_a_lost_run_instances_answer_never_launches_twice(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    proxy, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        requests = driver.plan([launch(7, "cloud/us-east-1/g5.xlarge")], facts)
        proxy.lose = ["RunInstances"]
        (report,) = await driver.submit(requests)
        assert proxy.lose == [], "the answer was not lost"
        assert report.state is ProviderState.RUNNING and "answer was lost" in report.message
    # a new driver (the control plane restarted) submits the same request again
    async with make(tmp_path) as fresh:
        await fresh.discover()
        (again,) = await fresh.submit(requests)
        assert again.state is ProviderState.RUNNING and "launched before" in again.message
    assert len(instances(client, "7".rjust(32, "0"))) == 1
    assert proxy.seen.count("RunInstances") == 1


async def test_lost_answers_of_the_launch_and_the_lookup_are_retried_by_the_shell(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    from stowplan.errors import ProviderError

    proxy, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        requests = driver.plan([launch(8, "cloud/us-east-1/g5.xlarge")], facts)
        proxy.lose = ["RunInstances", "DescribeInstances"]
        with pytest.raises(ProviderError) as e:
            await driver.submit(requests)
        assert e.value.retryable and proxy.lose == []
        (again,) = await driver.submit(requests)  # what the shell does: the same keys again
        assert again.state is ProviderState.RUNNING and "launched before" in again.message
    assert len(instances(client, "8".rjust(32, "0"))) == 1
    assert proxy.seen.count("RunInstances") == 1


async def test_cancel_terminates_and_reports_cancelled(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        l9 = launch(9, "cloud/us-east-1/g5.xlarge")
        await driver.submit(driver.plan([l9], facts))
        await driver.cancel([l9.key])
        await driver.cancel([l9.key])  # idempotent
        (r,) = await driver.describe([l9.key])
        assert r.state is ProviderState.CANCELLED
        assert instances(client, l9.key)[0]["State"]["Name"] == "terminated"
        (unknown,) = await driver.describe(["f" * 32])
        assert unknown.state is ProviderState.UNKNOWN
