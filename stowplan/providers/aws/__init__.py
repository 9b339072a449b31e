"""The AWS provider: elastic pools of EC2 GPU instances (on-demand and spot) running the stowplan
agent, which takes the attempts the control plane sends it; via aiobotocore."""

from stowplan.providers.aws.driver import AwsProvider
from stowplan.providers.aws.render import AwsRequest

__all__ = ["AwsProvider", "AwsRequest"]
