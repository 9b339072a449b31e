"""The AWS provider: EC2 GPU instances (on-demand and spot), one per attempt, via aiobotocore."""

from stowplan.providers.aws.driver import AwsProvider
from stowplan.providers.aws.render import AwsRequest

__all__ = ["AwsProvider", "AwsRequest"]
