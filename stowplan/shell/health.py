"""Health checks of service tasks: the probes (I/O) and the count that decides (pure).

Theory of operation
-------------------
A service task (``spec.models.ServiceSpec``) with a ``health`` check is probed by the command
shell while its attempt is RUNNING, every ``interval`` seconds from the attempt's start, each
probe bounded by ``timeout``. ``HealthCount`` keeps the failures in a row: a healthy probe
resets it; failures in the first ``start_period`` seconds do not count, unless a probe was
already healthy (Docker's HEALTHCHECK ``--start-period``). At ``failures`` in a row the shell
tells the core (``ServiceUnhealthy``), which stops the attempt and restarts the service with
its backoff; the run's transition to RETRYING (failure ``unhealthy``) records the last probe's
answer in the run's history, as every transition is recorded.

Probes run where the control plane runs (the queue actor's process): an HTTP check GETs
``http://HOST:PORT/PATH`` of the attempt's endpoint (``endpoint``: 127.0.0.1 when the attempt
runs on the control plane's host, else the node the provider named), so the node must be
reachable from the control plane; a command check runs on the control plane's host too, with
``STOWPLAN_SERVICE_HOST`` and ``STOWPLAN_SERVICE_PORT`` in its environment, never on the
node. ``HealthProbe`` is the port: ``PROBES`` is the real one; a virtual-time adapter (the
simulator) gives its own, or None for no checks.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Final, Protocol

import anyio
import httpx

from stowplan.spec.models import HealthCheck

LOOPBACK: Final = "127.0.0.1"


def endpoint_host(node: str | None, here: str | None = None) -> str | None:
    """The host to reach an attempt that runs on ``node`` from ``here`` (this machine's host
    name by default): the loopback on this machine, else the node's name; None: not known."""
    if node is None or node == "":
        return None
    if node in (LOOPBACK, "localhost") or node == (here or socket.gethostname()):
        return LOOPBACK
    return node


def endpoint(node: str | None, port: int | None, here: str | None = None) -> str | None:
    """``HOST:PORT`` of a service's attempt on ``node`` (None: no port, or no node yet)."""
    host = endpoint_host(node, here)
    if host is None or port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HealthProbe(Protocol):
    async def probe(self, check: HealthCheck, host: str, port: int | None) -> str | None:
        """Probe once, within ``check.timeout``: None when healthy, else why not (one line).
        Never raises for the service's own failures (refused, timed out, bad status)."""
        ...


class Probes:
    """The real probes: HTTP with httpx, commands as subprocesses on this host."""

    async def probe(self, check: HealthCheck, host: str, port: int | None) -> str | None:
        if check.http is not None:
            return await self._http(check, host, port)
        assert check.command is not None  # HealthCheck has exactly one
        return await self._command(check, host, port)

    async def _http(self, check: HealthCheck, host: str, port: int | None) -> str | None:
        assert check.http is not None and port is not None  # ServiceSpec checks the port
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}{check.http}"
        try:
            with anyio.fail_after(check.timeout_s):
                async with httpx.AsyncClient(timeout=check.timeout_s, trust_env=False) as client:
                    answer = await client.get(url)
        except TimeoutError:
            return f"GET {url}: no answer within {check.timeout_s:g}s"
        except httpx.HTTPError as e:
            return f"GET {url}: {type(e).__name__}: {e}".rstrip(": ")
        if 200 <= answer.status_code < 400:
            return None
        return f"GET {url}: HTTP {answer.status_code}"

    async def _command(self, check: HealthCheck, host: str, port: int | None) -> str | None:
        assert check.command is not None
        env = {**os.environ, "STOWPLAN_SERVICE_HOST": host}
        if port is not None:
            env["STOWPLAN_SERVICE_PORT"] = str(port)
        argv = list(check.command)
        try:
            with anyio.fail_after(check.timeout_s):
                done = await anyio.run_process(
                    argv,
                    check=False,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
        except TimeoutError:  # run_process kills the process when cancelled
            return f"{argv[0]}: no exit within {check.timeout_s:g}s"
        except OSError as e:
            return f"{argv[0]}: cannot run: {e.strerror or e}"
        if done.returncode == 0:
            return None
        tail = done.stdout.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"{argv[0]} exited with status {done.returncode}" + (
            f": {tail[0][:200]}" if tail[0] else ""
        )


PROBES: Final[HealthProbe] = Probes()


@dataclass(slots=True)
class HealthCount:
    """The failures in a row of one attempt's probes (module doc); pure."""

    check: HealthCheck
    since: float
    """when the attempt was seen RUNNING: the start period counts from here."""
    failures: int = 0
    healthy: bool = False
    """a probe has succeeded: the start period is over."""
    last: str = ""

    def next_probe(self, now: float) -> float:
        """When to probe next, after a probe (or the start) at ``now``."""
        return now + self.check.interval_s

    def record(self, why: str | None, now: float) -> bool:
        """Count a probe's answer (None: healthy) at ``now``; True when the attempt must be
        restarted (``failures`` in a row that count)."""
        if why is None:
            self.failures, self.healthy = 0, True
            return False
        self.last = why
        if not self.healthy and now - self.since < self.check.start_period_s:
            return False
        self.failures += 1
        return self.failures >= self.check.failures

    def reason(self) -> str:
        n = self.failures
        return (
            f"health check failed {n} time{'s' if n != 1 else ''} in a row "
            f"(failures = {self.check.failures}): {self.last}"
        )
