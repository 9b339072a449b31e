"""What the AWS driver asks of AWS and keeps: discovery answers kept for a while, a queue deeper
than its instances' room, the restart lookup bounded in time, the STS lease renewed before it
expires and never written anywhere. Against moto's server through the counting proxy."""

from __future__ import annotations

import base64
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stowplan.providers.aws import driver as aws_driver
from stowplan.providers.aws.discover import QUEUE_DEPTH
from stowplan.providers.base import Facts, ProviderState
from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.proxy import LossyProxy
from tests.integration.aws.test_driver import XL, launch, make, start_agent, until

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

DONE = {ProviderState.SUCCEEDED, ProviderState.FAILED, ProviderState.CANCELLED}


async def test_rediscovery_asks_nothing_while_its_answers_are_fresh(
    tmp_path: Path, aws: tuple[LossyProxy, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, _ = aws
    async with make(tmp_path) as driver:
        first = await driver.discover()
        asked = len(proxy.seen)
        assert "DescribeInstanceTypes" in proxy.seen
        assert await driver.discover() == first
        assert proxy.seen[asked:] == ["DescribeInstances"]  # answers are fresh: the fleet
    async with make(tmp_path) as again:  # another driver of the process: the same
        asked = len(proxy.seen)
        assert await again.discover() == first
        assert proxy.seen[asked:] == ["DescribeInstances"]
        # once they are stale, zones and spot prices are asked again, never the types
        monkeypatch.setattr(aws_driver, "ANSWERS_TTL_S", 0.0)
        asked = len(proxy.seen)
        assert await again.discover() == first
        assert sorted(proxy.seen[asked:]) == [
            "DescribeInstanceTypeOfferings",
            "DescribeInstances",
            "DescribeSpotPriceHistory",
        ]


async def test_attempts_beyond_the_room_follow_or_wait_and_each_runs_once(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    # a backlog (Pool.queue_depth): 4 vCPUs, 12 attempts of 1 submitted at once: 4 run, 4
    # are sent to follow them (one each), 4 wait in the driver's queue; one that follows and
    # one that waits are cancelled
    proxy, client = aws
    async with make(tmp_path) as driver:
        pools = await driver.discover()
        assert {p.queue_depth for p in pools} == {QUEUE_DEPTH}
        facts = Facts.of(pools)
        (iid,) = await driver.provision(XL, 1, "p-backlog")
        work = [
            launch(90 + i, run_id=f"run-{i}", gpus=0, cpus=1.0, script="sleep 0.5", outputs=[])
            for i in range(12)
        ]
        keys = [x.key for x in work]
        await driver.submit(driver.plan(work, facts))
        reports = await driver.describe(keys)
        assert [r.message for r in reports] == [f"sent to {iid}"] * 8 + [
            f"waiting for an instance of {XL}"
        ] * 4, reports
        inbox = client("s3").get_object(Bucket=BUCKET, Key="sp/agents/p-backlog-0/inbox")
        lines = inbox["Body"].read().decode().splitlines()
        after = {f.split()[2]: f.split("after=")[1].split()[0] for f in lines if "after=" in f}
        assert sorted(after) == keys[4:8] and sorted(after.values()) == keys[:4]
        await driver.cancel([keys[5], keys[9]])
        assert [r.state for r in await driver.describe([keys[5], keys[9]])] == [
            ProviderState.CANCELLED
        ] * 2
        inbox = client("s3").get_object(Bucket=BUCKET, Key="sp/agents/p-backlog-0/inbox")
        assert keys[9] not in inbox["Body"].read().decode()  # never sent
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            final = await until(driver, keys, DONE)
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
    assert [r.state for r in final] == [
        ProviderState.CANCELLED if i in (5, 9) else ProviderState.SUCCEEDED for i in range(12)
    ], final
    ran = sorted(p.parent.name for p in (tmp_path / "instance" / iid / "runs").glob("*/*"))
    assert ran == sorted(f"run-{i}" for i in range(12) if i not in (5, 9))  # each once
    claims = client("s3").list_objects_v2(Bucket=BUCKET, Prefix="sp/claims/")["Contents"]
    assert len(claims) == 10
    assert not [s for s in proxy.seen if s.startswith(f"GET /{BUCKET}/sp/queue/")]


async def test_a_restarted_driver_reads_no_queue_object_older_than_an_agent_lease(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    proxy, _ = aws
    old = launch(80, gpus=0, cpus=1.0)
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        await driver.submit(driver.plan([old], facts))
    async with make(tmp_path) as later:
        # the batch is older than any agent's lease and the margin: its attempts ran or
        # were never sent, and the key is looked for no further
        later.wall = lambda: time.time() + aws_driver.QUEUE_LOOKBACK_S + 60
        await later.discover()
        asked = len(proxy.seen)
        (r,) = await later.describe([old.key])
        assert r.state is ProviderState.UNKNOWN, r
        read = [s for s in proxy.seen[asked:] if s.startswith(f"GET /{BUCKET}/sp/queue/")]
        assert read == []
    async with make(tmp_path) as fresh:  # the same batch, young: found
        await fresh.discover()
        (r,) = await fresh.describe([old.key])
        assert r.state is ProviderState.QUEUED, r


async def test_a_role_lease_is_renewed_before_it_expires_and_never_written(
    tmp_path: Path,
    aws: tuple[LossyProxy, Any],
    moto_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="stowplan")
    proxy, client = aws
    ahead = [timedelta(0)]
    role = "arn:aws:iam::123456789012:role/stowplan-burst"
    async with make(tmp_path, role_arn=role, session_duration="15m") as driver:
        driver.sts_clock = lambda: datetime.now(UTC) + ahead[0]
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-lease")
        work = launch(95, gpus=0, cpus=1.0)
        await driver.submit(driver.plan([work], facts))
        # one lease for every call so far (a 15 min lease is not renewed at each call)
        assert proxy.seen.count("AssumeRole") == 1
        (first,) = proxy.leases
        used = {k for op, k in proxy.signed_by if op != "AssumeRole"}
        assert used == {first.access_key}
        # 200 s before it expires (renewed with a quarter of it left, 225 s)
        ahead[0] = timedelta(seconds=900 - 200)
        proxy.sts_ahead_s = 900 - 200
        asked = len(proxy.signed_by)
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            (r,) = await until(driver, [work.key], DONE)
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        assert r.state is ProviderState.SUCCEEDED, r
        assert proxy.seen.count("AssumeRole") == 2
        second = proxy.leases[1]
        assert second.access_key != first.access_key
        used = {k for op, k in proxy.signed_by[asked:] if op != "AssumeRole"}
        assert used == {second.access_key}
    # nothing secret is written: not in the state directory, the logs, the bucket (queue,
    # inboxes, statuses, outputs) or the instance's user-data; the session token only in
    # presigned URLs (where S3 needs it: a URL signed with a lease carries its token)
    secrets = [x.secret_key for x in proxy.leases]
    tokens = [x.token for x in proxy.leases]
    assert all(secrets) and all(tokens)
    state = tmp_path / ".stowplan"
    written = [p.read_bytes() for p in state.rglob("*") if p.is_file()] if state.exists() else []
    written += [r.getMessage().encode() for r in caplog.records if r.name.startswith("stowplan")]
    for s in [*secrets, *tokens]:
        assert not any(s.encode() in w for w in written)
    s3 = client("s3")
    objects = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
    bodies = [s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in objects]
    got = client("ec2").describe_instance_attribute(InstanceId=iid, Attribute="userData")
    bodies.append(base64.b64decode(got["UserData"]["Value"]))
    for s in secrets:
        assert not any(s.encode() in b for b in bodies)
