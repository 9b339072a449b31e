"""Starting and joining Ray, and naming the actors of one project's control plane."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any


def namespace_for(state_dir: Path) -> str:
    """One control plane per project: actors live in a namespace named after its state dir."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return f"stowplan-{digest}"


def init_ray(*, address: str | None, namespace: str, num_cpus: int | None = None) -> bool:
    """Start a quiet local Ray (or join ``address``). Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # NOTE: Ray prints a banner about token auth on every local start; it is not for our users
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": logging.ERROR,
    }
    if address is not None:
        kwargs["address"] = address
    elif num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    return True


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
