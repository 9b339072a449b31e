"""The Kubernetes provider: sweeps as Indexed Jobs on node pools, watched natively."""

from stowplan.providers.kubernetes.driver import KubernetesProvider
from stowplan.providers.kubernetes.render import KubernetesRequest

__all__ = ["KubernetesProvider", "KubernetesRequest"]
