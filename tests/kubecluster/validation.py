"""Manifests checked against the Kubernetes OpenAPI schemas with kubernetes-validate, strict
(an unknown field fails), for several minor versions.

kubernetes-validate 1.37 ships schemas for v1.25 to v1.37. The versions below are the oldest
minor where every Job field a sweep uses is GA (backoffLimitPerIndex and successPolicy went GA
in v1.33, podFailurePolicy in v1.31:
https://kubernetes.io/docs/concepts/workloads/controllers/job/) and a newer one.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

KUBERNETES_VERSIONS: tuple[str, ...] = ("1.33", "1.35")


class ManifestError(AssertionError):
    """A manifest failed the schema of one Kubernetes version."""


@functools.cache
def _kv() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kubernetes_validate  # type: ignore[import-untyped]

    return kubernetes_validate


def supported_versions() -> list[str]:
    return sorted(set(_kv().utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))


def validate_manifest(
    manifest: dict[str, Any], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> None:
    """Raise :class:`ManifestError` naming the version, the field path and the problem."""
    kv = _kv()
    for v in versions:
        try:
            kv.validate(manifest, v, strict=True)
        except kv.ValidationError as e:
            path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
            raise ManifestError(
                f"{manifest.get('kind')} {manifest.get('metadata', {}).get('name')!r} is not "
                f"valid for Kubernetes {v}: {path}: {e.message}"
            ) from None
        except kv.SchemaNotFoundError as e:
            raise ManifestError(e.message) from None


def validate_manifests(
    manifests: Iterable[dict[str, Any]], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> None:
    for m in manifests:
        validate_manifest(m, versions)
