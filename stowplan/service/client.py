"""The CLI's side of ``--server URL`` (or ``STOWPLAN_SERVER``): the same Structs that
``views`` and the query functions return, read from a service instead of the local store.

One generic request (``call``) serves every reading command; a submission is retried with
its request id (``submit``); ``logs`` follows server-sent events and resumes where it was
(``follow_logs``). Every failure is a ``SpecError`` (exit 2) that says what the server
answered: no token, a refused one, a missing experiment, or a server that cannot be reached.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from stowplan.errors import SpecError
from stowplan.service.api import API_PREFIX, SubmitRequest, SubmitResponse
from stowplan.service.views import ExperimentSummary, RunStatus

SERVER_ENV: Final = "STOWPLAN_SERVER"
TOKEN_ENV: Final = "STOWPLAN_TOKEN"
TIMEOUT_S: Final = 30.0

T = TypeVar("T")

__all__ = [
    "SERVER_ENV",
    "TOKEN_ENV",
    "call",
    "follow_logs",
    "path_of",
    "remote_experiments",
    "remote_status",
    "server_of",
    "submit",
]


def server_of(args: argparse.Namespace) -> str | None:
    """``--server``, else ``$STOWPLAN_SERVER``, else None (read the local store)."""
    url = getattr(args, "server", None) or os.environ.get(SERVER_ENV) or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise SpecError(
            f"--server {url!r} is not an http:// or https:// URL",
            hint="pass e.g. --server https://stowplan.lab.example:8470",
        )
    return url


def _token(url: str) -> str:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SpecError(
            f"no API token for {url}: {TOKEN_ENV} is not set",
            hint=f"ask an admin for one (`stowplan token create USER`) and export {TOKEN_ENV}",
        )
    return token


def _client(url: str, *, timeout: float | None = TIMEOUT_S) -> Any:
    import httpx

    return httpx.Client(
        base_url=url.rstrip("/"),
        timeout=httpx.Timeout(TIMEOUT_S, read=timeout),
        headers={"Authorization": f"Bearer {_token(url)}"},
    )


def _unreachable(url: str, e: Exception) -> SpecError:
    import ssl

    import httpx

    hint = "check the URL and that `stowplan serve` runs there"
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None or "CERTIFICATE_VERIFY_FAILED" in str(e):
        hint = (
            "the service's TLS certificate is not trusted here: if the lab signs its own, "
            "export SSL_CERT_FILE=/path/to/lab-ca.pem (a PEM bundle of the CA)"
        )
    elif url.startswith("http://") and isinstance(e, httpx.RemoteProtocolError | httpx.ReadError):
        hint = (
            "the service closed the connection without an answer: if it serves HTTPS "
            f"([service.tls]), use https://{url.removeprefix('http://')}"
        )
    return SpecError(f"cannot reach the service at {url}: {e}", hint=hint)


def _refused(status: int, body: bytes, reason: str) -> SpecError:
    detail = _detail(body) or reason
    hint = {
        401: f"check {TOKEN_ENV}: the token may be wrong, revoked or expired",
        403: "ask a team admin or an admin",
        404: "see stowplan ls --server ...",
        409: "use a new request id for a new submission",
        413: "send fewer or smaller files beside the experiment file ([service] max_body)",
        503: "the service runs without a control plane, or it is failing: ask its admin",
    }.get(status, "try again; if it persists, the service's log says more")
    return SpecError(f"the service answered {status}: {detail}", hint=hint)


def call(
    url: str,
    method: str,
    path: str,
    type_: type[T],
    *,
    json: Any = None,
    params: Any = None,
    ok: tuple[int, ...] = (200,),
    timeout: float = TIMEOUT_S,
) -> T:
    """One request to the service, its answer decoded as ``type_``; any other status than
    ``ok`` (or no answer) is a SpecError that says what the service answered."""
    import httpx

    try:
        with _client(url, timeout=timeout) as client:
            resp = client.request(method, path, json=json, params=params)
    except httpx.HTTPError as e:
        raise _unreachable(url, e) from None
    if resp.status_code not in ok:
        raise _refused(resp.status_code, resp.content, resp.reason_phrase)
    try:
        return msgspec.json.decode(resp.content, type=type_)
    except msgspec.DecodeError as e:
        raise SpecError(
            f"the service at {url} answered something this stowplan cannot read: {e}",
            hint="is it a stowplan service of the same version?",
        ) from None


def _get(url: str, path: str, type_: type[T]) -> T:
    return call(url, "GET", path, type_)


def path_of(*parts: str) -> str:
    """``/api/v1/<parts>``, each part quoted (a name never becomes more path)."""
    from urllib.parse import quote

    return API_PREFIX + "".join("/" + quote(p, safe="") for p in parts)


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


# -- submissions: retried with the same request id, so a lost answer creates nothing twice ---

SUBMIT_FOR_S: Final = 120.0
"""How long a submission is sent again after a dropped connection (a service restarting takes
about 20 s): the request id makes every try after the first create nothing new."""


def submit(
    url: str,
    req: SubmitRequest,
    *,
    timeout: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SubmitResponse:
    """POST the submission; on a dropped connection, no answer or a proxy's 502/503/504, POST
    it again with the same request id (the service answers the first submission's answer,
    creating nothing), backing off from 0.5 s to 5 s for at most ``SUBMIT_FOR_S``. A service
    never reached at all (a wrong URL, nothing listening) is an error at once, as is a 503
    that says the service runs no control plane."""
    import httpx

    body = msgspec.json.encode(req)
    since = clock()
    for n in itertools.count():
        try:
            with _client(url, timeout=timeout) as client:
                resp = client.post(
                    path_of("experiments"),
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
        except httpx.TransportError as e:
            if (n == 0 and isinstance(e, httpx.ConnectError)) or clock() - since > SUBMIT_FOR_S:
                raise _unreachable(url, e) from None
            sleep(min(0.5 * 2**n, 5.0))
            continue
        gateway = resp.status_code in (502, 504) or (
            resp.status_code == 503 and b"control plane" not in resp.content
        )
        if gateway and clock() - since <= SUBMIT_FOR_S:
            sleep(min(0.5 * 2**n, 5.0))
            continue
        if resp.status_code not in (200, 201):
            raise _refused(resp.status_code, resp.content, resp.reason_phrase)
        return msgspec.json.decode(resp.content, type=SubmitResponse)
    raise AssertionError("unreachable")  # pragma: no cover


def experiment_files(file: Path, *, limit: int) -> dict[str, bytes]:
    """The files a submission sends beside its experiment file: every file under the
    experiment's directory, by relative path, leaving out hidden ones (``.git``,
    ``.stowplan``), ``__pycache__`` and the experiment file itself. SpecError when they add up
    to more than ``limit`` bytes or a name could not travel."""
    import re

    from stowplan.service.api import REL_PATH_PATTERN

    base = file.resolve().parent
    out: dict[str, bytes] = {}
    total = 0
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if not p.is_file() or p.resolve() == file.resolve():
            continue
        name = rel.as_posix()
        if not re.match(REL_PATH_PATTERN, name):
            raise SpecError(
                f"{name!r} beside the experiment file cannot be sent to the service: "
                "names of letters, digits, '_', '.' and '-' only",
                file=str(file),
                hint="rename it, or move the experiment file into a directory of its own",
            )
        total += p.stat().st_size
        if total > limit:
            raise SpecError(
                f"the files beside {file.name} add up to more than {limit / 2**20:.3g} MiB, too "
                "much to send to the service",
                file=str(file),
                hint="move the experiment file into a directory holding only what its tasks "
                "need; read large data from a data input instead",
            )
        out[name] = p.read_bytes()
    return out


# -- logs: server-sent events, resumed after a dropped connection ---------------------------

RESUME_FOR_S: Final = 300.0
"""How long ``logs -f`` and ``run --server`` keep reconnecting to a service that does not
answer (a restart of the service takes up to a minute or two) before they give up."""


class _Event(msgspec.Struct, kw_only=True):
    event: str = "message"
    data: str = ""
    id: str | None = None


def _events(lines: Iterator[str]) -> Iterator[_Event]:
    """Server-sent events from the lines of a stream (the WHATWG format, comments skipped)."""
    ev = _Event()
    data: list[str] = []
    for line in lines:
        if not line:
            if data or ev.id is not None or ev.event != "message":
                ev.data = "\n".join(data)
                yield ev
            ev, data = _Event(), []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            ev.event = value
        elif name == "id":
            ev.id = value


def follow_logs(
    url: str,
    run: str,
    write: Callable[[bytes], None],
    *,
    stream: str = "stdout",
    attempt: int | None = None,
    follow: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    notice: Callable[[str], None] | None = None,
) -> None:
    """Write a run's log as the service sends it; after a dropped connection (or a restarted
    service), reconnect with ``Last-Event-ID`` and go on from the last byte written.
    ``notice`` (standard error by default) is told once when the service goes away, that it
    is reconnecting, and once when it is back.

    Reconnects back off from 0.5 s to 5 s between tries; a gateway's 502, 503 or 504 (a
    proxy in front of a service that is restarting) counts as no answer, and so does a
    stream that ends before its end event. Once nothing (not even a keep-alive) has come for
    ``RESUME_FOR_S``, a SpecError says so and how far the log got. A service that cannot be
    reached at all at first is a SpecError at once, as for every other command."""
    import base64

    import httpx

    from stowplan.service.api import LOG_EVENT_CHUNK, LOG_EVENT_END, LOG_EVENT_ERROR

    params: dict[str, Any] = {"stream": stream, "follow": "true" if follow else "false"}
    if attempt is not None:
        params["attempt"] = attempt
    last: str | None = None
    failures = 0
    since = clock()  # of the last line received
    answered = False
    away = False  # the service stopped answering and notice was told so
    tell = notice if notice is not None else _to_stderr

    def lines(resp: Any) -> Iterator[str]:
        nonlocal since
        for line in resp.iter_lines():
            since = clock()
            yield line

    while True:
        headers = {"Last-Event-ID": last} if last is not None else {}
        why: Exception | str = "the stream ended before its end event"
        try:
            with (
                _client(url, timeout=None) as client,
                client.stream(
                    "GET", path_of("runs", run, "logs"), params=params, headers=headers
                ) as resp,
            ):
                if resp.status_code in GATEWAY_TRANSIENT:
                    resp.read()
                    raise _Transient(
                        f"{resp.status_code} {resp.reason_phrase}: {_detail(resp.content)}"
                    )
                if resp.status_code != 200:
                    resp.read()
                    raise _refused(resp.status_code, resp.content, resp.reason_phrase)
                answered, since = True, clock()
                if away:
                    at = f" after byte {last}" if last is not None else ""
                    tell(f"reconnected to {url}: the log goes on{at}")
                    away = False
                for ev in _events(lines(resp)):
                    if ev.event == LOG_EVENT_CHUNK:
                        write(base64.b64decode(ev.data))
                        last, failures = ev.id, 0
                    elif ev.event == LOG_EVENT_END:
                        return
                    elif ev.event == LOG_EVENT_ERROR:
                        raise SpecError(
                            f"the service could not read the log: {ev.data}",
                            hint="the provider may be unreachable from the service; try again",
                        )
        except httpx.TransportError as e:
            if not answered:
                raise _unreachable(url, e) from None
            why = e
        except _Transient as e:
            why = e
        failures += 1
        if clock() - since > RESUME_FOR_S:
            got = f"the log up to byte {last} was written" if last else "none of the log came"
            raise SpecError(
                f"cannot reach the service at {url} any more: it has not answered for "
                f"{RESUME_FOR_S:g} s ({why}); {got}",
                hint=f"check that `stowplan serve` runs there; `stowplan logs {run} --server "
                f"{url}` shows the whole log again once it does",
            )
        if not away:
            tell(
                f"the service at {url} went away ({_why(why)}): reconnecting "
                f"(for up to {RESUME_FOR_S:g} s)"
            )
            away = True
        sleep(min(0.25 * 2**failures, 5.0))


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _why(e: Exception | str) -> str:
    """Why a try failed, in a few words (an httpx error's text may be empty)."""
    if isinstance(e, str):
        return e
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


GATEWAY_TRANSIENT: Final = frozenset({502, 503, 504})
"""Answers that mean "not now" while a service restarts behind a proxy."""


class _Transient(Exception):
    """An answer that ``follow_logs`` retries, like a dropped connection."""
