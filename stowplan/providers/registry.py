"""Provider drivers by configuration kind. Drivers are imported only when configured, so a
missing optional SDK disables only its own driver."""

from __future__ import annotations

from pathlib import Path
from typing import assert_never

from stowplan.providers.base import Provider
from stowplan.spec.models import (
    AwsProviderConfig,
    InstantProviderConfig,
    KubernetesProviderConfig,
    LocalProviderConfig,
    ProviderConfig,
    SlurmProviderConfig,
)


def make_provider(name: str, config: ProviderConfig, *, state_dir: Path) -> Provider:
    """The driver for ``config``'s kind, named ``name``; ``state_dir`` is the project's
    ``.stowplan/`` directory, where drivers that keep files keep them."""
    if isinstance(config, LocalProviderConfig):
        from stowplan.providers.local import LocalProvider

        return LocalProvider(name, config, state_dir=state_dir)
    if isinstance(config, InstantProviderConfig):
        from stowplan.providers.instant import InstantProvider

        return InstantProvider(name, config, state_dir=state_dir)
    if isinstance(config, SlurmProviderConfig):
        from stowplan.providers.slurm import SlurmProvider

        return SlurmProvider(name, config, state_dir=state_dir)
    if isinstance(config, KubernetesProviderConfig):
        from stowplan.providers.kubernetes import KubernetesProvider

        return KubernetesProvider(name, config, state_dir=state_dir)
    if isinstance(config, AwsProviderConfig):
        from stowplan.providers.aws import AwsProvider

        return AwsProvider(name, config, state_dir=state_dir)
    assert_never(config)
