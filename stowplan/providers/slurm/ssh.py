"""The SSH transport: a small pool of asyncssh connections to the login node.

Connections are opened lazily, kept alive with SSH keepalives, and replaced when they break;
connecting again backs off (0.5, 1, 2, 4 s, capped) before giving up with a retryable
``ProviderError``. Host keys are always verified (``known_hosts``: a file, or the user's
default). Commands are strings the driver builds from ``shlex``-quoted words only.

A command whose connection drops mid-flight raises ``TransportLost``: the caller cannot know
whether the remote side ran it, so only commands that are safe to repeat are repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from msgspec import Struct

from stowplan.errors import ProviderError

if TYPE_CHECKING:
    import asyncssh

CONNECT_TIMEOUT_S = 15.0
COMMAND_TIMEOUT_S = 120.0
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


def _quiet_dsa() -> None:
    """Call before importing asyncssh (imported on first use: plan and dry run never need it).

    cryptography 51 deprecated DSA, and asyncssh names DSA's classes as it is imported: a user
    would see one warning per name on every Slurm command. stowplan makes and asks for no DSA keys,
    so the warning says nothing to them; it is ignored for asyncssh's modules only.
    """
    warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")


class TransportLost(ProviderError):
    """The connection broke while a command was in flight: it may or may not have run."""


class Completed(Struct, frozen=True, kw_only=True):
    rc: int
    stdout: str
    stderr: str


def _text(x: object) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return x if isinstance(x, str) else ""


class SSHTransport:
    def __init__(
        self,
        provider: str,
        *,
        host: str,
        port: int = 22,
        user: str | None = None,
        identity_file: str | None = None,
        known_hosts: str | None = None,
        connections: int = 2,
        keepalive_s: float = 15.0,
    ) -> None:
        self.provider = provider
        self.host, self.port, self.user = host, port, user
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.size = max(1, connections)
        self.keepalive_s = keepalive_s
        self._conns: list[asyncssh.SSHClientConnection | None] = [None] * self.size
        self._locks = [asyncio.Lock() for _ in range(self.size)]
        self._next = 0
        self.connects = 0
        self.commands = 0
        """remote commands started (SFTP sessions and a repeated try each count once)"""

    def _error(self, message: str, *, lost: bool = False) -> ProviderError:
        where = f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"
        cls = TransportLost if lost else ProviderError
        return cls(f"ssh {where}: {message}", provider=self.provider, retryable=True)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        _quiet_dsa()
        import asyncssh

        options: dict[str, Any] = {
            "port": self.port,
            # NOTE: asyncssh treats known_hosts=None as "do not check"; () is the default file.
            "known_hosts": os.path.expanduser(self.known_hosts) if self.known_hosts else (),
            "keepalive_interval": self.keepalive_s,
            "keepalive_count_max": 3,
            "connect_timeout": CONNECT_TIMEOUT_S,
        }
        if self.user:
            options["username"] = self.user
        if self.identity_file:
            options["client_keys"] = [os.path.expanduser(self.identity_file)]
        last: Exception | None = None
        for delay in (0.0, *BACKOFF_S):
            if delay:
                await asyncio.sleep(delay)
            try:
                conn = await asyncssh.connect(self.host, **options)
            except asyncssh.HostKeyNotVerifiable as e:
                raise ProviderError(
                    f"ssh {self.host}:{self.port}: host key not verified ({e}); add the host to "
                    f"known_hosts ({self.known_hosts or '~/.ssh/known_hosts'})",
                    provider=self.provider,
                    retryable=False,
                ) from None
            except asyncssh.PermissionDenied as e:
                raise ProviderError(
                    f"ssh {self.host}:{self.port}: permission denied ({e}); check user and "
                    "identity_file",
                    provider=self.provider,
                    retryable=False,
                ) from None
            except (OSError, asyncssh.Error, TimeoutError) as e:
                last = e
                continue
            self.connects += 1
            return conn
        raise self._error(f"cannot connect after {len(BACKOFF_S) + 1} tries: {last}")

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncssh.SSHClientConnection]:
        i = self._next
        self._next = (self._next + 1) % self.size
        async with self._locks[i]:
            conn = self._conns[i]
            if conn is None or conn.is_closed():
                conn = self._conns[i] = await self._connect()
        try:
            yield conn
        except BaseException:
            if conn.is_closed() and self._conns[i] is conn:
                self._conns[i] = None
            raise

    async def run(
        self,
        command: str,
        *,
        stdin: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
        repeatable: bool = False,
    ) -> Completed:
        """Run ``command`` (already quoted) on the login node; never raises for a non-zero exit.

        A ``repeatable`` command (a query, or one that checks before it acts) whose connection
        turns out to be dead is tried once more on a fresh connection: a pooled connection can
        die unnoticed between two calls.
        """
        try:
            return await self._run_once(command, stdin=stdin, timeout=timeout)
        except TransportLost:
            if not repeatable:
                raise
            await asyncio.sleep(BACKOFF_S[0])
            return await self._run_once(command, stdin=stdin, timeout=timeout)

    async def _run_once(self, command: str, *, stdin: str | None, timeout: float) -> Completed:
        _quiet_dsa()
        import asyncssh

        async with self._conn() as conn:
            self.commands += 1
            try:
                result = await asyncio.wait_for(
                    conn.run(command, input=stdin, check=False), timeout
                )
            except (asyncssh.Error, OSError, TimeoutError) as e:
                conn.close()
                raise self._error(f"{type(e).__name__}: {e}", lost=True) from None
        rc = result.exit_status
        if rc is None:
            # no exit status: the channel closed (the connection dropped) before the end
            conn.close()
            raise self._error(f"no exit status ({result.exit_signal})", lost=True)

        return Completed(rc=rc, stdout=_text(result.stdout), stderr=_text(result.stderr))

    async def read_file(self, path: str, offset: int = 0) -> bytes | None:
        """Bytes of a remote file from ``offset`` over SFTP; ``None`` if it does not exist."""
        _quiet_dsa()
        import asyncssh

        async with self._conn() as conn:
            self.commands += 1
            try:
                async with conn.start_sftp_client() as sftp:
                    try:
                        async with sftp.open(path, "rb") as f:
                            await f.seek(offset)
                            data: object = await f.read()
                    except asyncssh.SFTPNoSuchFile:
                        return None
            except (asyncssh.Error, OSError) as e:
                if isinstance(e, asyncssh.SFTPError):
                    raise self._error(f"sftp {path}: {e}") from None
                conn.close()
                raise self._error(f"sftp {path}: {e}", lost=True) from None
        return data if isinstance(data, bytes) else _text(data).encode()

    async def aclose(self) -> None:
        for i, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
                with contextlib.suppress(Exception):
                    await conn.wait_closed()
            self._conns[i] = None
