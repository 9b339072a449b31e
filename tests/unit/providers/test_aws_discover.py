"""EC2 answers -> elastic pools (pure), and the bundled price table."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from stowplan.providers.aws import prices
from stowplan.providers.aws.discover import (
    QUEUE_DEPTH,
    RegionAnswers,
    offers,
    parse_pool_id,
    spot_price,
    type_info,
    vcpu_quota,
)
from stowplan.spec.models import AwsProviderConfig

NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
G5 = {
    "InstanceType": "g5.xlarge",
    "VCpuInfo": {"DefaultVCpus": 4},
    "MemoryInfo": {"SizeInMiB": 16384},
    "GpuInfo": {"Gpus": [{"Name": "A10G", "Manufacturer": "NVIDIA", "Count": 1}]},
}
P4 = {
    "InstanceType": "p4d.24xlarge",
    "VCpuInfo": {"DefaultVCpus": 96},
    "MemoryInfo": {"SizeInMiB": 1179648},
    "GpuInfo": {"Gpus": [{"Name": "A100", "Count": 8}]},
}


def cfg(**kw: object) -> AwsProviderConfig:
    base = {"kind": "aws", "regions": ["us-east-1"], "bucket": "s3://b-1/x", "ami": "/a/b"}
    return msgspec.convert({**base, **kw}, AwsProviderConfig)


def answers(**kw: object) -> RegionAnswers:
    base: dict[str, object] = {
        "region": "us-east-1",
        "types": [type_info(G5), type_info(P4)],
        "zones": {"g5.xlarge": ["us-east-1b", "us-east-1a"], "p4d.24xlarge": ["us-east-1c"]},
    }
    return RegionAnswers(**{**base, **kw})  # type: ignore[arg-type]


def test_types_normalise_gpus_to_the_project_vocabulary() -> None:
    t = type_info(P4)
    assert (t.name, t.vcpus, t.memory, t.gpus, t.family) == (
        "p4d.24xlarge",
        96,
        1179648 << 20,
        {"a100": 8},
        "p4d",
    )


def test_one_pool_per_region_type_and_market() -> None:
    got, notes = offers(
        "c",
        cfg(instance_types=["g5.*", "p4d.24xlarge"], spot="prefer"),
        answers(),
        prices.bundled(),
        now=NOW,
    )
    assert [o.pool.id for o in got] == [
        "c/us-east-1/g5.xlarge",
        "c/us-east-1/g5.xlarge/spot",
        "c/us-east-1/p4d.24xlarge",
        "c/us-east-1/p4d.24xlarge/spot",
    ]
    od, spot = got[0].pool, got[1].pool
    assert od.elastic and od.kind == "cloud" and od.site == "us-east-1" and not od.spot
    assert od.hardware_class == "aws:g5.xlarge" and od.interruption_rate == 0
    assert spot.spot and 0 < spot.price_per_hour < od.price_per_hour and spot.interruption_rate > 0
    assert got[0].zones == ["us-east-1a", "us-east-1b"] and notes == []
    assert parse_pool_id("c", spot.id) is not None and parse_pool_id("c", "c/x") is None
    # the driver queues attempts itself: the core may keep a backlog there
    assert {o.pool.queue_depth for o in got} == {QUEUE_DEPTH} and QUEUE_DEPTH > 1


def test_budget_subnets_and_learned_capacity_leave_pools_out() -> None:
    table = prices.bundled()
    got, notes = offers(
        "c", cfg(instance_types=["*.*"], max_hourly_usd=10), answers(), table, now=NOW
    )
    assert [o.pool.id for o in got] == ["c/us-east-1/g5.xlarge"]
    assert got[0].pool.max_instances == 8  # min(max_instances, 10 // 1.006)
    assert any("max_hourly_usd" in n for n in notes)
    got, notes = offers(
        "c",
        cfg(subnets=["subnet-0123456789abcdef0"]),
        answers(subnet_zones={"subnet-0123456789abcdef0": "us-east-1b"}),
        table,
        now=NOW,
    )
    assert got[0].zones == ["us-east-1b"] and got[0].subnets == {
        "us-east-1b": "subnet-0123456789abcdef0"
    }
    unavailable = {
        ("g5.xlarge", "us-east-1a", False): "no capacity",
        ("g5.xlarge", "us-east-1b", False): "no capacity",
    }
    got, notes = offers("c", cfg(), answers(), table, now=NOW, unavailable=unavailable)
    assert got == [] and "no capacity" in notes[0]
    got, notes = offers(
        "c", cfg(), answers(), table, now=NOW, unavailable={("g5", "*", False): "quota"}
    )
    assert got == [] and "quota" in notes[0]


def test_spot_prices_only_when_the_api_gives_real_recent_values() -> None:
    fresh = datetime(2026, 11, 30, tzinfo=UTC)
    rows = [
        {"AvailabilityZone": "us-east-1a", "SpotPrice": "0.30", "Timestamp": fresh},
        {"AvailabilityZone": "us-east-1b", "SpotPrice": "0.50", "Timestamp": fresh},
        {"AvailabilityZone": "us-east-1c", "SpotPrice": "0.40", "Timestamp": fresh},
    ]
    assert spot_price(rows, ["us-east-1a", "us-east-1b"], NOW) == 0.4
    moto = [{"AvailabilityZone": "us-east-1a", "SpotPrice": "0.00001", "Timestamp": fresh}]
    old = [
        {
            "AvailabilityZone": "us-east-1a",
            "SpotPrice": "0.3",
            "Timestamp": datetime(2006, 1, 2, tzinfo=UTC),
        }
    ]
    assert (
        spot_price(moto, ["us-east-1a"], NOW) is None
        and spot_price(old, ["us-east-1a"], NOW) is None
    )


def test_the_bundled_table_is_dated_sourced_and_licensed() -> None:
    t = prices.bundled()
    text = t.describe()
    assert t.date in text and "licence: Apache-2.0" in text and "aws.amazon.com" in text
    assert t.price("us-east-1", "g5.xlarge") is not None
    assert t.boot_seconds("p5.48xlarge") > t.boot_seconds("g5.xlarge")
    rate = t.interruption_rate("us-east-1", "p5.48xlarge")
    assert rate is not None and 0 < rate < 0.001


def test_each_type_counts_against_its_family_and_markets_vcpu_quota() -> None:
    assert vcpu_quota("g5.xlarge", False) == ("L-DB2E81BA", "G and VT on-demand vCPUs")
    assert vcpu_quota("vt1.3xlarge", True) == ("L-3819A6DF", "G and VT spot vCPUs")
    assert vcpu_quota("p4d.24xlarge", False)[0] == "L-417A185B"  # type: ignore[index]
    assert vcpu_quota("p4d.24xlarge", True)[0] == "L-7212CCBC"  # type: ignore[index]
    assert vcpu_quota("p5.48xlarge", True)[0] == "L-C4BD4855"  # type: ignore[index]
    assert vcpu_quota("m7i.large", False)[0] == "L-1216C47A"  # type: ignore[index]
    assert vcpu_quota("im4gn.large", True)[0] == "L-34B43A08"  # type: ignore[index]
    assert vcpu_quota("inf2.xlarge", False)[0] == "L-1945791B"  # type: ignore[index]
    assert vcpu_quota("trn1.2xlarge", True)[0] == "L-6B0D517C"  # type: ignore[index]
    # no quota known: a refused launch is how it is learned
    assert vcpu_quota("mac1.metal", False) is None
    assert vcpu_quota("p6-b200.48xlarge", True) is None


def test_pools_carry_their_share_of_the_account_quota() -> None:
    two = answers(
        types=[
            type_info(G5),
            type_info({**G5, "InstanceType": "g5.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}}),
        ],
        zones={"g5.xlarge": ["us-east-1a"], "g5.2xlarge": ["us-east-1a"]},
    )
    quotas = {"L-DB2E81BA": (64.0, 20.0), "L-3819A6DF": (4.0, 4.0)}
    got, notes = offers(
        "c",
        cfg(instance_types=["g5.*"], spot="prefer"),
        two,
        prices.bundled(),
        now=NOW,
        quotas=quotas,
    )
    by_id = {o.pool.id: o.pool for o in got}
    small, large = by_id["c/us-east-1/g5.xlarge"], by_id["c/us-east-1/g5.2xlarge"]
    assert small.quota is not None and large.quota is not None
    assert small.quota.group == large.quota.group == "aws:us-east-1:ec2/L-DB2E81BA"
    assert (small.quota.limit, small.quota.left, small.quota.per_instance) == (64.0, 20.0, 4.0)
    assert large.quota.per_instance == 8.0
    assert small.quota.name == "L-DB2E81BA (G and VT on-demand vCPUs)"
    # 4 spot vCPUs: a g5.xlarge fits, a g5.2xlarge never can: left out, with how to ask
    assert by_id["c/us-east-1/g5.xlarge/spot"].quota.group.endswith("L-3819A6DF")  # type: ignore[union-attr]
    assert "c/us-east-1/g5.2xlarge/spot" not in by_id
    [note] = notes
    assert note.startswith("c/us-east-1/g5.2xlarge/spot: left out: one instance takes 8 vCPUs")
    assert "--quota-code L-3819A6DF" in note
    # quotas not known (Service Quotas did not answer): no pool carries one
    got, _ = offers("c", cfg(instance_types=["g5.*"]), two, prices.bundled(), now=NOW)
    assert [o.pool.quota for o in got] == [None, None]
