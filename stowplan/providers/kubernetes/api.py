"""The driver's edge to the Kubernetes API: kubernetes-asyncio calls made with raw JSON
(``_preload_content=False``), and every SDK or transport exception translated once into a
``KubernetesError``.

Retries are not made here (the command shell owns the one backoff layer): a throttled or
unavailable API server (429, 500, 503, 504) and a dropped connection raise a retryable error
that carries the server's ``Retry-After``. Credentials live only in the client configuration
kubernetes-asyncio builds from the kubeconfig; no message here includes a header.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from stowplan.errors import ProviderError

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 120.0
"""a Retry-After longer than this is capped (a server must not stall the shell for long)."""


class KubernetesError(ProviderError):
    """A failed API call: the HTTP ``status`` (0: no answer), the Status ``reason``, and for a
    retryable one the server's ``retry_after`` in seconds (capped at ``MAX_RETRY_AFTER_S``)."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        retryable: bool,
        status: int = 0,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, retryable=retryable)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def retry_after_of(headers: Any, body: Any) -> float | None:
    raw = None
    if headers is not None:
        raw = headers.get("Retry-After")
    if raw is None and isinstance(body, dict):
        raw = (body.get("details") or {}).get("retryAfterSeconds")
    try:
        value = float(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None
    return None if value is None else max(0.0, min(value, MAX_RETRY_AFTER_S))


def error_of(provider: str, what: str, status: int, body: Any, headers: Any) -> KubernetesError:
    """The error for a non-2xx answer to ``what`` (say, ``create Job x``)."""
    reason = str(body.get("reason") or "") if isinstance(body, dict) else ""
    message = str(body.get("message") or "") if isinstance(body, dict) else ""
    retryable = status in RETRYABLE_STATUS
    text = f"{what}: HTTP {status}" + (f" {reason}" if reason else "")
    if message:
        text += f": {message}"
    if status == 401:
        text += " (the kubeconfig's credentials were refused; renew them)"
    elif status == 403:
        text += " (the kubeconfig's user lacks this permission; see the README's RBAC list)"
    retry_after = retry_after_of(headers, body) if retryable else None
    if retry_after is not None:
        text += f" (retry after {retry_after:g}s)"
    return KubernetesError(
        text,
        provider=provider,
        retryable=retryable,
        status=status,
        reason=reason,
        retry_after=retry_after,
    )


def transport_error(provider: str, what: str, e: BaseException) -> KubernetesError:
    kind = "timed out" if isinstance(e, TimeoutError) else f"connection failed ({type(e).__name__})"
    return KubernetesError(f"{what}: {kind}", provider=provider, retryable=True)


class Api:
    """Raw JSON calls through a kubernetes-asyncio ``ApiClient``."""

    def __init__(self, provider: str, api_client: Any, timeout: float) -> None:
        from kubernetes_asyncio import client

        self.provider = provider
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.timeout = timeout
        self.calls = 0

    async def call(self, what: str, fn: Any, *args: Any, ok404: bool = False, **kw: Any) -> Any:
        """``fn(*args, **kw)`` as raw JSON; ``None`` for a 404 when ``ok404``."""
        import aiohttp

        self.calls += 1
        try:
            resp = await fn(*args, _preload_content=False, _request_timeout=self.timeout, **kw)
            async with resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise transport_error(self.provider, what, e) from None
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"message": raw[:200].decode(errors="replace")}
        if 200 <= status < 300:
            return body
        if status == 404 and ok404:
            return None
        raise error_of(self.provider, what, status, body, headers)

    async def stream(
        self, what: str, fn: Any, *args: Any, read_timeout: float, **kw: Any
    ) -> AsyncIterator[bytes]:
        """The body of a streaming call (a watch, a followed log), chunk by chunk."""
        import aiohttp

        self.calls += 1
        try:
            resp = await fn(
                *args,
                _preload_content=False,
                _request_timeout=(self.timeout, read_timeout),
                **kw,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise transport_error(self.provider, what, e) from None
        async with resp:
            if not 200 <= resp.status < 300:
                raw = await resp.read()
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                raise error_of(self.provider, what, resp.status, body, resp.headers)
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise transport_error(self.provider, what, e) from None

    async def watch(
        self, what: str, fn: Any, *args: Any, resource_version: str, timeout_s: int, **kw: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) from ``resource_version``, with bookmarks."""
        buf = b""
        async for chunk in self.stream(
            what,
            fn,
            *args,
            read_timeout=timeout_s + self.timeout,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=timeout_s,
            **kw,
        ):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict):
                    yield ev
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        await self.api_client.close()
