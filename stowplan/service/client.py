"""The CLI's side of ``--server URL`` (or ``STOWPLAN_SERVER``): the same Structs that
``views`` returns, read from a service instead of the local store.

Every failure is a ``SpecError`` (exit 2) that says what the server answered: no token,
a refused one, a missing experiment, or a server that cannot be reached.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Final, TypeVar

import msgspec

from stowplan.errors import SpecError
from stowplan.service.api import API_PREFIX
from stowplan.service.views import ExperimentSummary, RunStatus

SERVER_ENV: Final = "STOWPLAN_SERVER"
TOKEN_ENV: Final = "STOWPLAN_TOKEN"
TIMEOUT_S: Final = 30.0

T = TypeVar("T")

__all__ = ["SERVER_ENV", "TOKEN_ENV", "remote_experiments", "remote_status", "server_of"]


def server_of(args: argparse.Namespace) -> str | None:
    """``--server``, else ``$STOWPLAN_SERVER``, else None (read the local store)."""
    url = getattr(args, "server", None) or os.environ.get(SERVER_ENV) or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise SpecError(
            f"--server {url!r} is not an http:// or https:// URL",
            hint="pass e.g. --server https://stowplan.lab.example:8470",
        )
    return url


def _get(url: str, path: str, type_: type[T]) -> T:
    import httpx

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SpecError(
            f"no API token for {url}: {TOKEN_ENV} is not set",
            hint=f"ask an admin for one (`stowplan token create USER`) and export {TOKEN_ENV}",
        )
    try:
        with httpx.Client(
            base_url=url.rstrip("/"),
            timeout=TIMEOUT_S,
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            resp = client.get(path)
    except httpx.HTTPError as e:
        raise SpecError(
            f"cannot reach the service at {url}: {e}",
            hint="check the URL and that `stowplan serve` runs there",
        ) from None
    if resp.status_code != 200:
        detail = _detail(resp.content) or resp.reason_phrase
        hint = {
            401: f"check {TOKEN_ENV}: the token may be wrong, revoked or expired",
            403: "ask a team admin or an admin",
            404: "see stowplan ls --server ...",
        }.get(resp.status_code, "try again; if it persists, the service's log says more")
        raise SpecError(f"the service answered {resp.status_code}: {detail}", hint=hint)
    try:
        return msgspec.json.decode(resp.content, type=type_)
    except msgspec.DecodeError as e:
        raise SpecError(
            f"the service at {url} answered something this stowplan cannot read: {e}",
            hint="is it a stowplan service of the same version?",
        ) from None


def _detail(body: bytes) -> str:
    try:
        data: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return ""
    return str(data.get("detail", "")) if isinstance(data, dict) else ""


def remote_experiments(url: str) -> list[ExperimentSummary]:
    return _get(url, f"{API_PREFIX}/experiments", list[ExperimentSummary])


def remote_status(url: str, experiment: str | None) -> list[RunStatus]:
    """``status`` of ``experiment``, or of the newest experiment the caller may see."""
    from urllib.parse import quote

    if not experiment:
        exps = remote_experiments(url)
        if not exps:
            return []
        experiment = exps[0].name
    return _get(
        url, f"{API_PREFIX}/experiments/{quote(experiment, safe='')}/status", list[RunStatus]
    )
