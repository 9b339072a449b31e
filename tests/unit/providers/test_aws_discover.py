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
