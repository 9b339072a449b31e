"""Starting and joining Ray, naming the actors of one project's control plane, and the
bookkeeping that lets a later command find and stop what a dead ``stowplan run`` left behind.

Without an address, ``stowplan run`` always starts a private local Ray (``address="local"``):
a ``ray_current_cluster`` file left by some earlier ``ray start`` and the ``RAY_ADDRESS``
environment variable are both ignored, since joining a cluster is something the user asks for
with ``--address``. With an address, a cluster that does not answer is an error within
seconds, not an endless retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import msgspec

from stowplan.errors import SpecError

CONNECT_TIMEOUT_S = 10.0
"""How long an explicit ``--address`` gets to answer before ``run`` gives up."""

WORKERS_DIR = "workers"
"""Under the state dir: one note per live actor process (see ``note_worker``)."""

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def namespace_for(state_dir: Path) -> str:
    """One control plane per project: actors live in a namespace named after its state dir."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return f"stowplan-{digest}"


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _probe(address: str) -> None:
    """Raise SpecError unless something accepts a TCP connection at ``address`` (host:port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SpecError(
            f"--address {address!r} is not host:port",
            hint="pass the address `ray start --head` printed, e.g. --address 10.0.0.5:6379",
        )
    try:
        with socket.create_connection(
            (host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S
        ) as sock:
            # NOTE: Ray's client waits without end on a port where something that is not a GCS
            # accepts connections, so ask first: a GCS is a gRPC server, and an HTTP/2 server
            # answers the client preface with a SETTINGS frame (RFC 9113, section 3.4)
            sock.sendall(_HTTP2_PREFACE)
            head = _read_exactly(sock, 9)
    except OSError as e:
        raise SpecError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e})",
            hint="start it (`ray start --head`) or check the address; "
            "leave out --address to run on a private local Ray",
        ) from None
    if len(head) < 9 or head[3] != _HTTP2_SETTINGS:
        raise SpecError(
            f"--address {address}: something listens there, but it is not a Ray cluster's "
            "GCS (it does not speak gRPC)",
            hint="pass the address `ray start --head` printed (its GCS port, 6379 by default); "
            "leave out --address to run on a private local Ray",
        )


_HTTP2_SETTINGS = 0x4
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(
    [0, 0, 0, _HTTP2_SETTINGS, 0, 0, 0, 0, 0]
)
"""The HTTP/2 client connection preface followed by an empty SETTINGS frame."""


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only when the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def init_ray(*, address: str | None, namespace: str, num_cpus: int | None = None) -> bool:
    """Start a quiet private local Ray (or join ``address``). Returns True if this call
    started it. A cluster at ``address`` that cannot be reached raises ``SpecError``."""
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
        _probe(address)
        kwargs["address"] = address
        # NOTE: Ray retries a GCS that accepts connections but does not answer about once a
        # second; bound that too (its default is 20 tries, more for some storage backends)
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(CONNECT_TIMEOUT_S)))
    else:
        # NOTE: "local" is the only value that makes Ray ignore both RAY_ADDRESS and the
        # ray_current_cluster file in its temp dir (None joins whatever they name)
        kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError) as e:
        if address is None:
            raise
        raise SpecError(
            f"--address {address}: could not join the Ray cluster there: "
            + strip_ansi(str(e)).strip().splitlines()[0],
            hint="check that a Ray head runs there (`ray status --address ...`) and that its "
            "Ray version matches; leave out --address to run on a private local Ray",
        ) from None
    return True


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def error_text(err: BaseException) -> str:
    """One line naming what went wrong: the original exception of a failed actor call, with
    Ray's wrapping, colours and remote traceback left out."""
    cause = getattr(err, "cause", None)  # RayTaskError: the exception the actor raised
    if isinstance(cause, BaseException) and cause is not err:
        return error_text(cause)
    lines = [ln for ln in strip_ansi(str(err)).splitlines() if ln.strip()]
    first = lines[0].strip() if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def error_detail(err: BaseException) -> str:
    """The full text of an error (Ray's includes the remote traceback), without colours."""
    import traceback

    return strip_ansi("".join(traceback.format_exception(err)))


# ---- the processes of a control plane ---------------------------------------------------------


class WorkerNote(msgspec.Struct, frozen=True, kw_only=True):
    """One actor process of a control plane, and the driver that owns it."""

    actor: str
    pid: int
    started: float
    host: str
    owner_pid: int
    owner_started: float


def _started(pid: int) -> float | None:
    """A process's start time, or None when it is gone (a zombie is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _alive(pid: int, started: float) -> bool:
    now = _started(pid)
    return now is not None and abs(now - started) < 1.0


def owner_identity() -> tuple[int, float]:
    """This process as the owner of the actors it starts: its pid and start time."""
    pid = os.getpid()
    return pid, _started(pid) or 0.0


def note_worker(state_dir: str | Path | None, actor: str, owner: tuple[int, float] | None) -> None:
    """Record the calling actor process under ``state_dir``, so a command run after its
    driver died can stop it (``stop_orphans``). Each actor calls this when it (re)starts."""
    if state_dir is None or owner is None:
        return
    pid = os.getpid()
    note = WorkerNote(
        actor=actor,
        pid=pid,
        started=_started(pid) or 0.0,
        host=socket.gethostname(),
        owner_pid=owner[0],
        owner_started=owner[1],
    )
    d = Path(state_dir) / WORKERS_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{pid}.tmp"
    tmp.write_bytes(msgspec.json.encode(note))
    os.replace(tmp, d / f"{pid}.json")


def stop_orphans(state_dir: Path, *, timeout: float = 15.0) -> list[WorkerNote]:
    """Stop (SIGKILL) the actor processes on this host whose driver is gone, and wait until
    they are; returns them. Processes of a live driver are left alone; notes of processes
    that already ended are removed. An actor on another host dies with its owner in Ray."""
    import signal

    d = state_dir / WORKERS_DIR
    if not d.is_dir():
        return []
    host = socket.gethostname()
    stopped: list[WorkerNote] = []
    for path in sorted(d.glob("*.json")):
        try:
            note = msgspec.json.decode(path.read_bytes(), type=WorkerNote)
        except (OSError, msgspec.DecodeError):
            continue
        if note.host != host:
            continue
        if not _alive(note.pid, note.started):
            path.unlink(missing_ok=True)
            continue
        if _alive(note.owner_pid, note.owner_started):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(note.pid, signal.SIGKILL)
        stopped.append(note)
    deadline = time.monotonic() + timeout
    while any(_alive(n.pid, n.started) for n in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    for n in stopped:
        if not _alive(n.pid, n.started):
            (d / f"{n.pid}.json").unlink(missing_ok=True)
    return stopped
