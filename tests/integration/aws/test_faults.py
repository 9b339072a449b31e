"""The AWS driver under faults injected at moto's boundary (the proxy of ``proxy.py``, or moto's
own backend, as EC2 would act), never by patching the driver; and the dispatch cases the end to
end sweep found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import Facts, ProviderState
from stowplan.spec.models import FailureClass
from tests.integration.aws.harness import reclaim
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


async def test_describing_attempts_of_many_runs_lists_each_prefix_once(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    # a sweep is one run per trial: exit records and claims are read with one listing of
    # their prefix (while that is fewer pages than one listing per run), not one per run
    async with make(tmp_path) as driver:
        facts = Facts.of(await driver.discover())
        launches = [launch(20 + i, run_id=f"run-{i}") for i in range(6)]
        await driver.submit(driver.plan(launches, facts))
        before = driver.calls["list_objects_v2"]
        reports = await driver.describe([x.key for x in launches])
        assert {r.state for r in reports} == {ProviderState.QUEUED}
        assert driver.calls["list_objects_v2"] - before == 2  # exits, claims
