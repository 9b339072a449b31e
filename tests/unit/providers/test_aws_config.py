"""``[providers.X] kind = "aws"`` in stowplan.toml: what loads, and what a user gets wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.providers.aws import AwsProvider
from stowplan.providers.base import Capability
from stowplan.providers.registry import make_provider
from stowplan.spec.loader import load_project
from stowplan.spec.models import AwsProviderConfig

BASE = (
    '[project]\nname = "p"\n[providers.cloud]\nkind = "aws"\nbucket = "s3://lab-bucket/stowplan"\n'
)
ONE_REGION = 'regions = ["us-east-1"]\nami = "/aws/service/deeplearning/ami/latest"\n'


def load(tmp_path: Path, extra: str) -> AwsProviderConfig:
    f = tmp_path / "stowplan.toml"
    f.write_text(BASE + extra)
    cfg = load_project(f).config.providers["cloud"]
    assert isinstance(cfg, AwsProviderConfig)
    return cfg


def test_defaults_and_registry(tmp_path: Path) -> None:
    cfg = load(tmp_path, ONE_REGION)
    assert cfg.instance_types == ["g5.*"] and cfg.spot == "never" and cfg.max_instances == 8
    assert cfg.idle_shutdown == 300.0 and cfg.session_duration == 3600.0
    assert (cfg.bucket_name, cfg.bucket_prefix) == ("lab-bucket", "stowplan")
    assert cfg.ami_for("us-east-1") == "resolve:ssm:/aws/service/deeplearning/ami/latest"
    driver = make_provider("cloud", cfg, state_dir=tmp_path / ".stowplan")
    assert isinstance(driver, AwsProvider)
    assert driver.project == tmp_path.name
    for cap in (Capability.RUNS, Capability.GPUS, Capability.LOGS, Capability.CANCEL_MEMBER):
        assert cap in driver.capabilities
    assert "AMI" in driver.capabilities.reason(Capability.CONTAINERS)


def test_every_field_loads(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'regions = ["us-east-1", "eu-west-1"]\n'
        'role_arn = "arn:aws:iam::123456789012:role/stowplan"\nsession_duration = "2h"\n'
        'instance_types = ["g5.*", "p4d.24xlarge"]\nspot = "prefer"\nmax_instances = 4\n'
        "max_hourly_usd = 40.5\n"
        'subnets = ["subnet-0123456789abcdef0"]\nsecurity_groups = ["sg-0123456789abcdef0"]\n'
        'instance_profile = "stowplan-instance"\nidle_shutdown = "10m"\n'
        '[providers.cloud.ami]\nus-east-1 = "ami-0123456789abcdef0"\n'
        'eu-west-1 = "/aws/service/x"\n',
    )
    assert cfg.session_duration == 7200.0 and cfg.idle_shutdown == 600.0
    assert cfg.ami_for("us-east-1") == "ami-0123456789abcdef0"
    assert cfg.ami_for("eu-west-1") == "resolve:ssm:/aws/service/x"


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ('regions = ["us-east-7"]\nami = "/x"\n', "$.providers.cloud.regions[0]", "us-east-1"),
        ('regions = ["useast1"]\nami = "/x"\n', "$.providers.cloud.regions[0]", "region"),
        ("regions = []\nami = '/x'\n", "$.providers.cloud.regions", "at least one"),
        (
            ONE_REGION + 'instance_types = ["G5 XL"]\n',
            "$.providers.cloud.instance_types[0]",
            "FAMILY",
        ),
        (ONE_REGION + 'spot = "sometimes"\n', "$.providers.cloud.spot", "prefer"),
        (ONE_REGION + "max_hourly_usd = 0\n", "$.providers.cloud.max_hourly_usd", "more than 0"),
        (ONE_REGION + "max_instances = 0\n", "$.providers.cloud.max_instances", "at least 1"),
        (ONE_REGION + 'subnets = ["sub-1"]\n', "$.providers.cloud.subnets", "sub-1"),
        (ONE_REGION + 'role_arn = "my-role"\n', "$.providers.cloud.role_arn", "arn:aws:iam"),
        (
            ONE_REGION + 'profile = "lab"\nrole_arn = "arn:aws:iam::123456789012:role/r"\n',
            "$.providers.cloud.role_arn",
            "not both",
        ),
        (ONE_REGION + 'session_duration = "1m"\n', "$.providers.cloud.session_duration", "15m"),
        (ONE_REGION + 'idle_shutdown = "soon"\n', "$.providers.cloud.idle_shutdown", "soon"),
        (
            'regions = ["us-east-1", "us-west-2"]\nami = "ami-0123456789abcdef0"\n',
            "$.providers.cloud.ami",
            "one region",
        ),
        ('regions = ["us-east-1"]\nami = "ubuntu"\n', "$.providers.cloud.ami", "SSM"),
        (
            'regions = ["us-east-1"]\nami = { us-west-2 = "/x" }\n',
            "$.providers.cloud.ami",
            "not one of regions",
        ),
        (ONE_REGION + "instance_type = 'g5.xlarge'\n", "$.providers.cloud", "instance_type"),
    ],
)
def test_mistakes_name_the_field(tmp_path: Path, extra: str, path: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        load(tmp_path, extra)
    text = e.value.render()
    assert "stowplan.toml" in text and words in text, text
    assert (e.value.path or "").startswith(path), e.value.path
    assert e.value.hint


@pytest.mark.parametrize("bucket", ["lab-bucket", "https://lab-bucket.s3.amazonaws.com", "s3://A"])
def test_a_bucket_must_be_an_s3_url(tmp_path: Path, bucket: str) -> None:
    f = tmp_path / "stowplan.toml"
    f.write_text(f'[providers.cloud]\nkind = "aws"\nbucket = "{bucket}"\n' + ONE_REGION)
    with pytest.raises(SpecError) as e:
        load_project(f)
    assert e.value.path == "$.providers.cloud.bucket" and "s3://" in e.value.render()


def test_a_bad_price_table_names_its_field(tmp_path: Path) -> None:
    (tmp_path / "prices.json").write_text("{not json")
    cfg = load(tmp_path, ONE_REGION + f'prices = "{tmp_path / "prices.json"}"\n')
    with pytest.raises(SpecError) as e:
        make_provider("cloud", cfg, state_dir=tmp_path)
    assert e.value.path == "$.providers.cloud.prices" and "not JSON" in e.value.render()
