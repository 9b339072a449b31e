"""The AWS driver under faults injected at moto's boundary (the proxy of ``proxy.py``, or moto's
own backend, as EC2 would act), never by patching the driver; and the dispatch cases the end to
end sweep found."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import Facts, ProviderState
from stowplan.spec.models import FailureClass
from tests.integration.aws.conftest import BUCKET
from tests.integration.aws.harness import FakeImds, reclaim
from tests.integration.aws.proxy import LossyProxy
from tests.integration.aws.test_driver import (
    XL,
    anyio_sleep,
    launch,
    make,
    start_agent,
    tagged,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_an_attempt_without_a_timeout_is_sent_to_an_instance(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    # its URLs' lease is as long as the agent's (7 days): it must still go to an instance,
    # with URLs valid for what is left of that instance's lease
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-notimeout")
        l9 = launch(9, timeout_s=None)
        (r,) = await driver.submit(driver.plan([l9], facts))
        assert r.state is ProviderState.QUEUED and r.message == f"queued for {XL}"
        (r,) = await driver.describe([l9.key])
        assert r.message == f"sent to {iid}", r


async def test_a_spot_reclaim_mid_trial_is_preempted(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    import os
    import signal

    _, client = aws
    spot = XL + "/spot"
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(spot, 1, "p-spot")
        (inst,) = tagged(client, "stowplan:token", "p-spot")
        assert inst.get("InstanceLifecycle") == "spot"
        l10 = launch(10, pool=spot, script="echo $$ > pid; exec sleep 60", outputs=[], files={})
        await driver.submit(driver.plan([l10], facts))
        agent = start_agent(tmp_path, client, moto_url, iid)
        pid_file = tmp_path / "instance" / iid / "runs" / "run-1" / "0" / "pid"
        try:
            await until(driver, [l10.key], {ProviderState.RUNNING})
            reclaim(client, iid)  # EC2 takes the instance back, and its processes with it
            agent.kill()
            while not pid_file.exists() or not pid_file.read_text().strip():
                await anyio_sleep(0.05)
            pid = int(pid_file.read_text())
            os.killpg(os.getsid(pid), signal.SIGKILL)
            (r,) = await until(driver, [l10.key], {ProviderState.FAILED})
        finally:
            agent.kill()
            agent.communicate()
        assert r.failure is FailureClass.PREEMPTED and r.job_id == iid, r
        assert "Server.SpotInstanceTermination" in r.message


async def test_no_capacity_in_one_zone_launches_in_another(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    proxy, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        proxy.first_zone_runs_out = True
        with pytest.raises(ProviderError) as e:
            await driver.provision(XL, 1, "p-ice")
        assert not e.value.retryable and "InsufficientInstanceCapacity" in str(e.value)
        (bad,) = proxy.refused
        # the core hears of it (and rediscovers, then places again)
        changes = driver.capacity_changes()
        why = await anext(changes)
        assert bad in why and "InsufficientInstanceCapacity" in why, why
        # the next launch avoids that zone: one RunInstances, elsewhere
        (iid,) = await driver.provision(XL, 1, "p-ice2")
        (inst,) = tagged(client, "stowplan:token", "p-ice2")
        assert inst["Placement"]["AvailabilityZone"] != bad
        assert proxy.refused == [bad] and proxy.seen.count("RunInstances") == 2  # refused, then
        l11 = launch(11)
        await driver.submit(driver.plan([l11], facts))
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            (r,) = await until(driver, [l11.key], {ProviderState.SUCCEEDED})
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        assert r.node == inst["Placement"]["AvailabilityZone"]


async def test_describing_queued_attempts_of_many_runs_reads_no_s3_object(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    # a sweep is one run per trial: describing attempts costs calls by instances and pages,
    # not by attempts or runs; attempts still waiting for an instance cost none in S3
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        launches = [launch(20 + i, run_id=f"run-{i}") for i in range(6)]
        await driver.submit(driver.plan(launches, facts))
        before = dict(driver.calls)
        reports = await driver.describe([x.key for x in launches])
        assert {r.state for r in reports} == {ProviderState.QUEUED}
        spent = {k: v - before.get(k, 0) for k, v in driver.calls.items()}
        # no S3 call; the fleet at most once (discovery read it just now)
        assert {k for k, v in spent.items() if v} <= {"describe_instances"}, spent
        assert spent.get("describe_instances", 0) <= 1, spent


def queue_objects(client: Any) -> list[str]:
    got = client("s3").list_objects_v2(Bucket=BUCKET, Prefix="sp/queue/")
    return [str(o["Key"]) for o in got.get("Contents") or []]


async def test_a_retried_batched_submit_writes_nothing_twice(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    # one queue object per submitted batch; its answer lost, the shell submits the same keys
    # again and finds it; a restarted control plane submitting them again finds it too
    proxy, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        launches = [launch(30 + i, run_id=f"run-{i}", gpus=0, cpus=1.0) for i in range(3)]
        requests = driver.plan(launches, facts)
        proxy.lose = ["PUT queue"]
        try:
            await driver.submit(requests)
        except ProviderError as e:
            assert e.retryable  # the shell submits the same keys again
        # (or the HTTP client sent the PUT again itself: PUT is idempotent)
        assert proxy.lose == [], "the answer was not lost"
        (batch,) = queue_objects(client)
        again = await driver.submit(requests)  # the shell's retry: the same keys
        assert [r.state for r in again] == [ProviderState.QUEUED] * 3
        assert queue_objects(client) == [batch]
        # written once; the retry was refused (If-None-Match) and read the batch back
        assert proxy.seen.count(f"PUT /{BUCKET}/{batch}") == 2
        body = client("s3").get_object(Bucket=BUCKET, Key=batch)["Body"].read()
        assert sorted(r["keys"][0] for r in json.loads(body)["requests"]) == sorted(
            x.key for x in launches
        )
        (iid,) = await driver.provision(XL, 1, "p-batch")
    async with make(tmp_path) as fresh:  # the control plane restarted
        facts = Facts.of(await fresh.discover())
        before = proxy.seen.count(f"PUT /{BUCKET}/{batch}")
        reports = await fresh.submit(fresh.plan(launches, facts))
        assert [r.state for r in reports] == [ProviderState.QUEUED] * 3
        assert proxy.seen.count(f"PUT /{BUCKET}/{batch}") == before + 1  # refused: it exists
        assert queue_objects(client) == [batch]
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            final = await until(
                fresh, [x.key for x in launches], {ProviderState.SUCCEEDED, ProviderState.FAILED}
            )
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        assert [r.state for r in final] == [ProviderState.SUCCEEDED] * 3, final
    ran = [p.parent.name for p in (tmp_path / "instance").glob("*/runs/*/*")]
    assert sorted(ran) == ["run-0", "run-1", "run-2"]  # each once


async def test_a_restarted_driver_reads_the_queue_inboxes_and_cancels_back(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-restart")
        sent = [launch(40 + i, run_id=f"run-{i}", gpus=0, cpus=1.0) for i in range(2)]
        waiting = launch(42, run_id="run-2")  # 1 vCPU and the GPU: all three fit at once
        dropped = launch(43, run_id="run-3", gpus=0, cpus=4.0)  # no room left: waits
        await driver.submit(driver.plan([*sent, waiting], facts))
        await driver.submit(driver.plan([dropped], facts))
        await driver.cancel([dropped.key])
        reports = await driver.describe([x.key for x in [*sent, waiting, dropped]])
        assert [r.message for r in reports[:3]] == [f"sent to {iid}"] * 3, reports
        assert reports[3].state is ProviderState.CANCELLED
    inbox = client("s3").get_object(Bucket=BUCKET, Key="sp/agents/p-restart-0/inbox")
    lines = inbox["Body"].read()
    async with make(tmp_path) as fresh:
        await fresh.discover()
        keys = [x.key for x in [*sent, waiting, dropped]]
        reports = await fresh.describe(keys)
        # the queue read back (the batches), where each was sent (the inbox), the cancel
        assert [r.message for r in reports[:3]] == [f"sent to {iid}"] * 3, reports
        assert reports[3].state is ProviderState.CANCELLED
        inbox = client("s3").get_object(Bucket=BUCKET, Key="sp/agents/p-restart-0/inbox")
        assert inbox["Body"].read() == lines  # nothing sent again
        agent = start_agent(tmp_path, client, moto_url, iid)
        try:
            final = await until(fresh, keys[:3], {ProviderState.SUCCEEDED, ProviderState.FAILED})
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        assert [r.state for r in final] == [ProviderState.SUCCEEDED] * 3, final
    ran = sorted(p.parent.name for p in (tmp_path / "instance").glob("*/runs/*/*"))
    assert ran == ["run-0", "run-1", "run-2"]


async def test_api_calls_scale_with_instances_and_polls_not_attempts(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    # 12 attempts of 12 runs, 4 at a time on one instance: one queue object, one inbox PUT
    # per dispatch round, one status GET per poll; no object written or read per attempt
    _, client = aws
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        (iid,) = await driver.provision(XL, 1, "p-scale")
        launches = [
            launch(50 + i, run_id=f"run-{i}", gpus=0, cpus=1.0, outputs=[], files={}, script="true")
            for i in range(12)
        ]
        before = dict(driver.calls)
        began = time.monotonic()
        await driver.submit(driver.plan(launches, facts))
        agent = start_agent(tmp_path, client, moto_url, iid)
        polls = 0
        try:
            while True:
                polls += 1
                reports = await driver.describe([x.key for x in launches])
                if all(r.state in (ProviderState.SUCCEEDED, ProviderState.FAILED) for r in reports):
                    break
                assert polls < 600, reports
                await anyio_sleep(0.2)
            assert agent.wait(timeout=60) == 0
        finally:
            agent.kill()
            agent.communicate()
        spent = {k: v - before.get(k, 0) for k, v in driver.calls.items()}
        took = time.monotonic() - began
    assert {r.state for r in reports} == {ProviderState.SUCCEEDED}, reports
    # the fleet is read at most every fleet_every_s (the provision just read it)
    assert spent.get("describe_instances", 0) <= 1 + took / driver.fleet_every_s, (spent, took)
    assert spent["get_object"] <= polls  # the instance's status, once a poll at most
    assert spent["put_object"] <= 1 + min(polls, 12 // 4 + 1) + 1  # the batch, the inbox
    assert spent.get("list_objects_v2", 0) == 0
    assert spent["presign"] >= 12 * 4  # per-attempt URLs are presigned here, not calls


async def test_a_spot_notice_preempts_what_runs_and_the_instance_takes_nothing_new(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    spot = XL + "/spot"
    imds = FakeImds()
    try:
        async with make(tmp_path) as driver:
            facts = Facts.of(await driver.discover())
            (iid,) = await driver.provision(spot, 1, "p-notice")
            slow = launch(60, pool=spot, gpus=0, cpus=1.0, script="exec sleep 120", outputs=[])
            await driver.submit(driver.plan([slow], facts))
            agent = start_agent(tmp_path, client, moto_url, iid, imds=imds.base(iid))
            try:
                await until(driver, [slow.key], {ProviderState.RUNNING})
                assert imds.asked[iid] > 0  # the agent asks with an IMDSv2 token
                imds.notice(iid)
                (r,) = await until(driver, [slow.key], {ProviderState.FAILED})
                assert r.failure is FailureClass.PREEMPTED and r.job_id == iid, r
                assert "preempted" in r.message
                # the instance takes nothing new: the rerun waits for another instance
                rerun = launch(60, pool=spot, gpus=0, cpus=1.0, script="true", outputs=[])
                rerun = msgspec.structs.replace(rerun, key="e" * 32, attempt=1)
                await driver.submit(driver.plan([rerun], facts))
                (q,) = await driver.describe([rerun.key])
                assert q.state is ProviderState.QUEUED and "waiting" in q.message, q
                (other,) = await driver.provision(spot, 1, "p-notice2")
                second = start_agent(tmp_path, client, moto_url, other, imds=imds.base(other))
                try:
                    (done,) = await until(driver, [rerun.key], {ProviderState.SUCCEEDED})
                    assert done.job_id == other
                    assert second.wait(timeout=60) == 0
                finally:
                    second.kill()
                    second.communicate()
                assert agent.wait(timeout=60) == 0  # idled out, nothing left running there
            finally:
                agent.kill()
                agent.communicate()
    finally:
        imds.close()
    body = client("s3").get_object(Bucket=BUCKET, Key=f"sp/exit/run-1/{slow.key}.json")["Body"]
    assert json.loads(body.read())["reason"] == "preempted"
    pid_dir = tmp_path / "instance" / iid / "runs" / "run-1"
    assert [p.name for p in pid_dir.iterdir()] == ["0"]  # the preempted attempt ran once here
