"""EC2 vCPU quotas as a limit the pools of one family share, against moto's server through the
proxy (which answers Service Quotas' ``GetServiceQuota`` for EC2's codes: moto's Service Quotas
knows only VPC's). Discovery reads the quotas and counts every running instance of the account
against them, stowplan's or not; a sweep that wants more instances than the quota allows, over
two instance types of one family, never has more vCPUs running than the quota and its other
trials wait, then run; where Service Quotas does not answer, discovery goes on without quotas
and says so once."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from stowplan.provenance.store import RunStore
from tests.integration.aws.harness import Fleet, instances, project_toml
from tests.integration.aws.proxy import LossyProxy
from tests.integration.aws.test_driver import XL, make
from tests.integration.aws.test_e2e import executions, finish, start

pytestmark = pytest.mark.integration

XXL = "cloud/us-east-1/g5.2xlarge"
G_ON_DEMAND = "L-DB2E81BA"
G_SPOT = "L-3819A6DF"
VCPUS = {"g5.xlarge": 4, "g5.2xlarge": 8}


@pytest.mark.anyio
async def test_discovery_reads_the_quotas_and_counts_every_running_instance(
    tmp_path: Path, aws: tuple[LossyProxy, Any]
) -> None:
    proxy, client = aws
    proxy.quotas = {G_ON_DEMAND: 24.0, G_SPOT: 8.0}
    # someone else's instance (no stowplan tag): 8 of the G on-demand vCPUs
    client("ec2").run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="g5.2xlarge"
    )
    async with make(tmp_path) as driver:
        pools = {p.id: p for p in await driver.discover()}
        small, large = pools[XL].quota, pools[XXL].quota
        assert small is not None and large is not None
        assert small.group == large.group == f"aws:us-east-1:ec2/{G_ON_DEMAND}"
        assert (small.limit, small.left, small.per_instance) == (24.0, 16.0, 4.0)
        assert (large.left, large.per_instance) == (16.0, 8.0)
        spot = pools[f"{XL}/spot"].quota
        assert spot is not None and spot.group.endswith(G_SPOT) and spot.left == 8.0
        assert sorted(s for s in proxy.seen if s == "GetServiceQuota") == ["GetServiceQuota"] * 2
        # an instance of its own is counted from the fleet, fresh; the quotas are not asked
        # again (kept QUOTA_TTL_S)
        await driver.provision(XXL, 1, "quota-test")
        pools = {p.id: p for p in await driver.discover()}
        small = pools[XL].quota
        assert small is not None and small.left == 8.0
        assert proxy.seen.count("GetServiceQuota") == 2


@pytest.mark.anyio
@pytest.mark.parametrize("error", [None, "AccessDeniedException"])
async def test_without_service_quotas_discovery_goes_on_and_says_so_once(
    tmp_path: Path,
    aws: tuple[LossyProxy, Any],
    caplog: pytest.LogCaptureFixture,
    error: str | None,
) -> None:
    proxy, _ = aws
    proxy.quota_error = error  # None: moto answers (NoSuchResourceException for ec2)
    with caplog.at_level(logging.WARNING, logger="stowplan.providers.aws.driver"):
        async with make(tmp_path) as driver:
            first = await driver.discover()
            assert first and all(p.quota is None for p in first)
            assert await driver.discover() == first
    said = [
        r.getMessage() for r in caplog.records if "vCPU quotas could not be read" in r.getMessage()
    ]
    assert len(said) == 1, said
    assert (error or "NoSuchResourceException") in said[0]
    assert "VcpuLimitExceeded" in said[0]  # what it falls back to
    assert proxy.seen.count("GetServiceQuota") == 1  # the answer is kept: not asked again


def project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text(
        project_toml("aws-quota", instance_types='["g5.xlarge", "g5.2xlarge"]')
    )
    f = tmp_path / "exp" / "wide.toml"
    f.parent.mkdir()
    # 3 CPUs each: one trial per g5.xlarge (4 vCPUs), two per g5.2xlarge (8)
    f.write_text(
        '[experiment]\nname = "wide"\n\n'
        '[[tasks]]\nname = "t"\n'
        'command = ["python", "-c", "import time; time.sleep(2); print({i})"]\n'
        'resources = { cpus = 3, memory = "1GiB" }\ntimeout = "5m"\n\n'
        '[tasks.sweep]\nmethod = "grid"\nparameters = { i = [1, 2, 3, 4, 5, 6] }\n'
    )
    (tmp_path / ".stowplanignore").write_text("instances/\n")
    return f


class Peak:
    """Samples the provider's pending and running instances in moto: the most vCPUs at once."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.vcpus = 0
        self.types: set[str] = set()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                live = [
                    i["InstanceType"]
                    for i in instances(self.client)
                    if i["State"]["Name"] in ("pending", "running")
                ]
            except Exception as e:  # reported by the test
                self.errors.append(e)
            else:
                self.types.update(live)
                self.vcpus = max(self.vcpus, sum(VCPUS[t] for t in live))
            self._stop.wait(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_sweep_wider_than_the_quota_runs_within_it(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    proxy, client = aws
    # 12 G vCPUs: the solver would like three g5.2xlarge (24) for six trials of 3 CPUs
    proxy.quotas = {G_ON_DEMAND: 12.0}
    f = project(tmp_path)
    with Peak(client) as peak, Fleet(tmp_path / "instances", client, moto_url) as fleet:
        finish(tmp_path, "run", start(tmp_path, "run", "run", str(f), "--provider", "cloud"), 300)
        fleet.check()
        fleet.wait_all_down(60)
    assert not peak.errors, peak.errors
    assert 0 < peak.vcpus <= 12, peak.vcpus
    assert peak.types == {"g5.xlarge", "g5.2xlarge"}, peak.types  # one quota, two types
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        held = [
            e.reason
            for r in runs
            for e in store.events_for(r.run_id)
            if e.from_state == "READY" and e.to_state == "READY"
        ]
    assert {r.state for r in runs} == {"SUCCEEDED"} and len(runs) == 6
    assert sorted(executions(tmp_path / "instances").values()) == [1] * 6  # each ran once
    # the trials that waited said why
    assert held and all(
        w.startswith(f"held: account quota {G_ON_DEMAND} (G and VT on-demand vCPUs) has ")
        for w in held
    ), held
