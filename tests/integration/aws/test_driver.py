"""The AWS driver against moto's server over HTTP. No instance boots there, so each instance's
real user-data (the agent, read back from EC2) runs here as a local process against moto's S3
through its presigned URLs: the exact scripts an instance would run are what is tested. Its
``halt`` terminates the instance in moto, as ``shutdown -h now`` does with the shutdown
behaviour ``terminate``."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.errors import ProviderError
from stowplan.providers.aws import AwsProvider, AwsRequest
from stowplan.providers.base import Capability, Facts, LaunchSpec, ProviderState, Report
from stowplan.spec.models import AwsProviderConfig, FailureClass
from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.proxy import LossyProxy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

XL = "cloud/us-east-1/g5.xlarge"


def make(tmp_path: Path, **kw: object) -> AwsProvider:
    base: dict[str, object] = {
        "kind": "aws",
        "regions": ["us-east-1"],
        "bucket": f"s3://{BUCKET}/sp",
        "ami": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        "instance_types": ["g5.xlarge", "g5.2xlarge"],
        "spot": "prefer",
        "idle_shutdown": 2,
        "max_hourly_usd": 5,
    }
    cfg = msgspec.convert({**base, **kw}, AwsProviderConfig)
    return AwsProvider("cloud", cfg, state_dir=tmp_path / ".stowplan", project="lab")


def launch(i: int, pool: str = XL, **kw: object) -> LaunchSpec:
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


def tagged(client: Any, tag: str, value: str) -> list[dict[str, Any]]:
    got = client("ec2").describe_instances(Filters=[{"Name": f"tag:{tag}", "Values": [value]}])
    return [i for r in got["Reservations"] for i in r["Instances"]]


def state_of(client: Any, instance_id: str) -> str:
    got = client("ec2").describe_instances(InstanceIds=[instance_id])
    return str(got["Reservations"][0]["Instances"][0]["State"]["Name"])


def start_agent(
    tmp_path: Path, client: Any, moto_url: str, instance_id: str, *, imds: str | None = None
) -> subprocess.Popen[str]:
    """Run the instance's user-data as a local process (what cloud-init would start)."""
    got = client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    script = tmp_path / f"{instance_id}.sh"
    script.write_bytes(base64.b64decode(got["UserData"]["Value"]))
    halt = tmp_path / f"halt-{instance_id}"
    terminate = (
        f"import boto3; boto3.client('ec2', endpoint_url={moto_url!r}, "
        "region_name='us-east-1', aws_access_key_id='testing', "
        f"aws_secret_access_key='testing').terminate_instances(InstanceIds=[{instance_id!r}])"
    )
    halted = tmp_path / "halted"
    halt.write_text(
        f'#!/bin/sh\necho {instance_id} >> {halted}\nexec {sys.executable} -c "{terminate}"\n'
    )
    halt.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "STOWPLAN_ROOT": str(tmp_path / "instance" / instance_id),
        "STOWPLAN_HALT": str(halt),
        "STOWPLAN_POLL": "0.2",
        # the instance metadata service (a spot agent asks it for an interruption notice):
        # a fake one, or a loopback port that refuses at once
        "STOWPLAN_IMDS": imds or "http://127.0.0.1:9",
    }
    return subprocess.Popen(
        ["bash", str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def anyio_sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def until(
    driver: AwsProvider, keys: Sequence[str], done: set[ProviderState], limit: float = 60.0
) -> list[Report]:
    """Describe ``keys`` until each is in ``done`` (polling the state, as watch does)."""
    import anyio

    end = time.monotonic() + limit
    while True:
        reports = await driver.describe(keys)
        if all(r.state in done for r in reports):
            return reports
        assert time.monotonic() < end, reports
        await anyio.sleep(0.2)


async def test_discover_offers_priced_elastic_pools(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    async with make(tmp_path) as driver:
        assert Capability.ELASTIC in driver.capabilities
        pools = await driver.discover()
    ids = [p.id for p in pools]
    assert ids == [
        "cloud/us-east-1/g5.2xlarge",
        "cloud/us-east-1/g5.2xlarge/spot",
        "cloud/us-east-1/g5.xlarge",
        "cloud/us-east-1/g5.xlarge/spot",
    ]
    xl = next(p for p in pools if p.id == XL)
    assert xl.elastic and xl.node is not None
    assert xl.node.gpus == {"a10g": 1} and xl.node.cpus == 4 and xl.node.memory == 16 << 30
    assert xl.price_per_hour == pytest.approx(1.006) and xl.max_instances == 4  # 5 $/h budget
    assert (xl.cpus, xl.gpus) == (0, {})  # no instance yet
    spot = next(p for p in pools if p.id == XL + "/spot")
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


async def test_one_instance_runs_two_attempts_then_idles_out(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-token1")
        (inst,) = tagged(client, "stowplan:token", "p-token1")
        assert inst["InstanceId"] == iid and inst["InstanceType"] == "g5.xlarge"
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["stowplan:pool"] == XL and tags["stowplan:agent"] == "p-token1-0"
        assert tags["stowplan:project"] == "lab"
        # discovery counts it: capacity one instance, one fewer to launch
        xl = next(p for p in await driver.discover() if p.id == XL)
        assert (xl.cpus, xl.gpus, xl.max_instances) == (4, {"a10g": 1}, 3)
        launches = [launch(1), launch(2)]
        requests = driver.plan(launches, facts)
        assert all(isinstance(r, AwsRequest) for r in requests)
        reports = await driver.submit(requests)
        assert [r.state for r in reports] == [ProviderState.QUEUED] * 2
        keys = [x.key for x in launches]
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            final = await until(driver, keys, {ProviderState.SUCCEEDED, ProviderState.FAILED})
            assert agent.wait(timeout=60) == 0, agent.stderr.read() if agent.stderr else ""
        finally:
            agent.kill()
            agent.communicate()
        assert [r.state for r in final] == [ProviderState.SUCCEEDED] * 2, final
        for i, r in zip((1, 2), final, strict=True):
            assert r.exit_code == 0 and r.job_id == iid
            url = r.outputs["out.txt"]
            assert url == f"s3://{BUCKET}/sp/attempts/run-1/{r.key}/outputs/out.txt"
            body = client("s3").get_object(Bucket=BUCKET, Key=url.split("/", 3)[3])["Body"]
            assert body.read() == f"seed {i}\n{i}\n".encode()
        logs = b"".join([c async for c in driver.logs(keys[0])])
        assert logs == b"trial 1 says hi\n"
        # one GPU: the second waited for the first (the driver packs by the instance's shape)
        assert final[0].ended_at is not None and final[1].started_at is not None
        assert final[1].started_at >= final[0].ended_at
        # the agent shut the instance down after idle_shutdown
        assert (tmp_path / "halted").read_text().split() == [iid]
        assert state_of(client, iid) == "terminated"
        # a late, repeated submit of the same requests queues nothing again
        again = await driver.submit(requests)
        assert [r.state for r in again] == [ProviderState.SUCCEEDED] * 2
        # capacity went with the instance
        xl = next(p for p in await driver.discover() if p.id == XL)
        assert (xl.cpus, xl.max_instances) == (0, 4)
    assert len(tagged(client, "stowplan:provider", "cloud")) == 1


async def test_attempts_that_fit_together_run_at_once(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-token2")
        # two CPU-only attempts (2 vCPUs each) fit one g5.xlarge: each waits for the other
        sync = (
            "touch here-$STOWPLAN_KEY; for _ in $(seq 100); do "
            "[ $(ls ../../*/*/here-* | wc -l) -ge 2 ] && exit 0; sleep 0.1; done; exit 9"
        )
        launches = [
            launch(i, run_id=f"run-{i}", gpus=0, cpus=2.0, script=sync, outputs=[], files={})
            for i in (3, 4)
        ]
        await driver.submit(driver.plan(launches, facts))
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            final = await until(
                driver, [x.key for x in launches], {ProviderState.SUCCEEDED, ProviderState.FAILED}
            )
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        assert [r.state for r in final] == [ProviderState.SUCCEEDED] * 2, final


async def test_a_lost_run_instances_answer_starts_one_instance(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    proxy, client = aws
    async with make(tmp_path) as driver:
        await driver.discover()
        proxy.lose = ["RunInstances"]
        first = await driver.provision(XL, 1, "p-lost")
        assert proxy.lose == [], "the answer was not lost"
    # a new driver (the control plane restarted) gets the same provision again
    async with make(tmp_path) as fresh:
        assert await fresh.provision(XL, 1, "p-lost") == first
    assert len(tagged(client, "stowplan:token", "p-lost")) == 1
    assert proxy.seen.count("RunInstances") == 1


async def test_lost_answers_of_the_launch_and_the_lookup_are_retried_by_the_shell(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    proxy, client = aws
    async with make(tmp_path) as driver:
        await driver.discover()
        proxy.lose = ["RunInstances", "DescribeInstances"]
        with pytest.raises(ProviderError) as e:
            await driver.provision(XL, 2, "p-lost2")
        assert e.value.retryable and proxy.lose == []
        ids = await driver.provision(XL, 2, "p-lost2")  # what the shell does: the same token
        assert len(ids) == 2 and len(set(ids)) == 2
        assert await driver.provision(XL, 2, "p-lost2") == ids  # and again: nothing more
    assert len(tagged(client, "stowplan:token", "p-lost2")) == 2
    assert proxy.seen.count("RunInstances") == 2


async def test_provision_stops_at_the_pool_maximum(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    _, client = aws
    async with make(tmp_path, max_instances=2) as driver:
        await driver.discover()
        assert len(await driver.provision(XL, 5, "p-many")) == 2  # fewer than asked
        with pytest.raises(ProviderError) as e:
            await driver.provision(XL, 1, "p-more")
        assert not e.value.retryable and "max_instances" in str(e.value)
    assert len(tagged(client, "stowplan:pool", XL)) == 2


async def test_terminate_stops_only_idle_instances_once_per_token(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        ids = await driver.provision(XL, 2, "p-two")
        l5 = launch(5)
        await driver.submit(driver.plan([l5], facts))  # sent to one of them: that one is busy
        await driver.terminate(XL, 2, "t-one")
        await driver.terminate(XL, 2, "t-one")  # idempotent
        states = {i: state_of(client, i) for i in ids}
        assert sorted(states.values()) == ["running", "terminated"], states
        (r,) = await driver.describe([l5.key])
        assert r.state is ProviderState.QUEUED and states[r.message.split()[-1]] == "running"


async def test_an_attempt_sent_to_an_instance_that_went_away_is_queued_again(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        driver.fleet_every_s = 0  # read the fleet at each describe
        facts = Facts.of(await driver.discover())
        (first,) = await driver.provision(XL, 1, "p-gone")
        l6 = launch(6)
        await driver.submit(driver.plan([l6], facts))
        client("ec2").terminate_instances(InstanceIds=[first])  # before its agent took it
        (r,) = await driver.describe([l6.key])
        assert r.state is ProviderState.QUEUED and "waiting" in r.message
        (second,) = await driver.provision(XL, 1, "p-again")
        agent = start_agent(tmp_path, client, moto_url, second)
        try:
            (done,) = await until(driver, [l6.key], {ProviderState.SUCCEEDED})
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        assert done.job_id == second


async def test_an_instance_gone_under_its_attempt_is_a_node_failure(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    import signal

    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-dies")
        l7 = launch(7, script="echo $$ > pid; exec sleep 60", outputs=[], files={})
        await driver.submit(driver.plan([l7], facts))
        agent = start_agent(tmp_path, client, moto_url, iid)
        pid_file = tmp_path / "instance" / iid / "runs" / "run-1" / "0" / "pid"
        try:
            await until(driver, [l7.key], {ProviderState.RUNNING})
            client("ec2").terminate_instances(InstanceIds=[iid])
            # the machine is gone, and its processes with it: the agent, the attempt's
            # session (its runner) and the process group `timeout` made in it
            agent.kill()
            while not pid_file.exists() or not pid_file.read_text().strip():
                await anyio_sleep(0.05)
            pid = int(pid_file.read_text())
            os.killpg(os.getsid(pid), signal.SIGKILL)
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            (r,) = await until(driver, [l7.key], {ProviderState.FAILED})
        finally:
            agent.kill()
            agent.communicate()
        assert r.failure is FailureClass.NODE_FAILURE and r.job_id == iid
        assert "gone without an exit record" in r.message


async def test_cancel_kills_the_attempt_and_reports_cancelled(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-cancel")
        l8 = launch(8, script="sleep 60", outputs=[], files={})
        await driver.submit(driver.plan([l8], facts))
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            await until(driver, [l8.key], {ProviderState.RUNNING})
            await driver.cancel([l8.key])
            await driver.cancel([l8.key])  # idempotent
            (r,) = await driver.describe([l8.key])
            assert r.state is ProviderState.CANCELLED
            assert agent.wait(timeout=60) == 0  # the attempt was killed; the agent idled out
        finally:
            agent.kill()
            agent.communicate()
        (unknown,) = await driver.describe(["f" * 32])
        assert unknown.state is ProviderState.UNKNOWN
