"""The long-lived local supervisor: ``python -c LEAN_START RUNS_DIR`` (or ``-m`` this module).

Theory of operation. One supervisor runs per ``runs/`` directory (per project state dir). It
is started by the first local driver that needs it, detaches (its first process exits once
the supervisor listens, so the driver's ``Popen`` returns at once and holds no child), and
listens on an abstract Unix socket named after the directory. A driver connects, sends its
environment once, then ``start <attempt_dir>`` per attempt; the supervisor forks a *keeper*
for each: a copy of itself, already past Python's start-up and imports, that supervises that
one attempt exactly as the per-attempt launcher does (``launcher._Supervisor``: its own
session, the task in its own process group, subreaper, timeout and memory limit, the same
``launches``, ``launcher.json`` and ``exit.json`` records), except that it starts the task
with ``posix_spawn`` (a vfork: the keeper's pages are not copied again, and no Python runs
between the fork and the exec) and reads the task's start time from ``/proc`` itself. When
a keeper ends the supervisor sends ``done <attempt_dir>`` to the driver that started it,
which frees its capacity at once.

Where a short attempt's CPU goes (``true`` on 2 cores, measured 2026-12, about 6.5 ms in
all): the supervisor's own bookkeeping about 1.1 ms; the fork and exit of the keeper about
1.3 ms from a 23 MiB supervisor, 0.8 ms from the 14 MiB one ``LEAN_START`` makes; the task's
spawn and exec about 1 ms; the keeper's Python (records, signals, waits) the rest, of which
each file made costs about 0.2 ms on this machine's ext4 (so the lock is the directory's,
and the records are the launcher's and no more). ``exit.json``'s fsync is waited for after
the next attempt started.

A driver may also hand a start ahead: ``after <attempt_dir>NUL<predecessor_dir>`` (the two
paths apart by a NUL byte) asks for ``attempt_dir`` to be started the moment the task of
``predecessor_dir`` is gone (or at once when that attempt has ended already), so a short
attempt follows the one before it without a round trip through the driver. The driver
counts the successor in its predecessor's place (it asks no more of the machine), so its
capacity accounting stays exact; the supervisor needs nothing of the driver to apply the
rule, and a start handed ahead is an ordinary start when it is made (the same lock, the same
checks). A keeper writes its pid to a pipe shared by all keepers once its task and everything
the task spawned are gone, before it writes (and syncs) ``exit.json``: what waits behind it
starts then, while the records are written.

Invariants:

- An attempt is supervised by at most one keeper, ever: the keeper holds an exclusive
  ``flock`` on the attempt directory itself for its whole life (taken by the supervisor
  before the fork, inherited by the keeper, closed in the supervisor; never by the task, as
  the descriptor closes on exec), and a start finding the lock held, or ``launcher.json`` or
  ``exit.json`` present, starts nothing.
- Killing the supervisor loses nothing: keepers are their own sessions and outlive it, write
  their records and are found through them; a driver whose connection breaks starts a new
  supervisor and sends again the starts that no keeper recorded yet (the lock makes that
  safe), so a start in flight when it died is made once.
- A start handed ahead is made only once its predecessor's task is gone (its keeper said
  so, or ended), by this supervisor, or is forgotten: when the driver that sent it goes away
  (whoever takes its attempts over starts them, see ``attempts.take_over``) or with the
  supervisor itself (the driver sends it again as a plain start once it sees the predecessor
  ended).
- The socket is the singleton: binding its name fails while a supervisor lives, and the name
  goes with the process. Keepers close it right after the fork.
- The supervisor ends when no driver has been connected and no keeper has run for
  ``IDLE_EXIT_S``.
- Only the standard library, psutil and ``launcher`` are imported, and not the packages'
  ``__init__`` (see ``LEAN_START``): it is started once per project, but every keeper is a
  copy of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stowplan.providers import launcher
from stowplan.providers.launcher import (
    EXIT_FILE,
    LAUNCHER_FILE,
    LAUNCHER_LOG,
    LAUNCHES_FILE,
    SPEC_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    STOP_GRACE_S,
    ExitReason,
    scan_outputs,
    write_json_atomic,
)

SUPERVISOR_DIR = ".supervisor"
"""Under ``runs/``: the supervisor's ``pid`` record and its log."""
IDLE_EXIT_S = 5.0
_OOM_COUNTER: tuple[Path | None] | None = None
"""The memory cgroup's OOM kill counter, found once by the supervisor for all its keepers."""
FIRST_SAMPLE_S = 0.1
"""A keeper samples its task's memory first this long after the start: a process tree walk
costs milliseconds, more than a short trial runs."""


def socket_name(runs: Path) -> str:
    """The abstract socket name of the supervisor of ``runs`` (Linux: no path length limit,
    and the name vanishes with the process)."""
    digest = hashlib.sha256(str(Path(runs).absolute()).encode()).hexdigest()[:32]
    return f"\0stowplan-local-{digest}"


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


def _lock_fd(attempt_dir: Path) -> int:
    """A descriptor of ``attempt_dir`` itself, to ``flock``: the keeper's lock is the
    directory's, not a file's (a file made per attempt cost as much as a fork here)."""
    return os.open(attempt_dir, os.O_RDONLY | os.O_DIRECTORY)


LEGACY_LOCK = "keeper.lock"
"""The lock file of keepers started before the lock became the directory's (2026-12): one
such keeper may still be running an attempt after an upgrade, and is looked for too."""


def _held(path: Path, flags: int) -> bool:
    """Is ``path`` locked (``flock``) by someone now? False where it cannot be opened."""
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def keeper_runs(attempt_dir: Path) -> bool:
    """Does a keeper hold ``attempt_dir`` now (its lock, or an older keeper's lock file)?"""
    return _held(attempt_dir, os.O_RDONLY | os.O_DIRECTORY) or _held(
        attempt_dir / LEGACY_LOCK, os.O_RDONLY
    )


def _replace_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (readers see the old or the whole new file), unsynced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# -- the keeper: one attempt, in a fork of the supervisor -----------------------------------------


class _Spawned:
    """The task's main process, started by ``posix_spawn`` (``launcher._Child``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


_RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)
"""Signals Python ignores that a task gets back at their default (``subprocess`` does too)."""


def _spawn(argv: list[str], env: dict[str, str], out: int, err: int) -> int:
    """Start ``argv`` in a new session with ``out``/``err`` as its output and no input,
    looked up on ``env``'s PATH (not the keeper's), as ``subprocess`` does; raises the
    error of the first candidate that exists but cannot run, else ``FileNotFoundError``."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out, 1),
        (os.POSIX_SPAWN_DUP2, err, 2),
    ]
    name = argv[0]
    candidates = (
        [name] if os.path.dirname(name) else [os.path.join(d, name) for d in os.get_exec_path(env)]
    )
    failed: OSError | None = None
    for path in candidates:
        if len(candidates) > 1 and not os.access(path, os.X_OK):
            # A stat, not a vfork, for each directory before the right one; one that holds
            # the name but may not run it is the error, as an exec of it would say.
            if failed is None and os.path.exists(path):
                failed = PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            continue
        try:
            return os.posix_spawn(
                path, argv, env, file_actions=actions, setsid=True, setsigdef=_RESTORED
            )
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            failed = failed or e
    if failed is not None:
        raise failed
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


_BOOT_TIME: list[float] = []
"""The boot time and clock tick, read once by the supervisor for all its keepers."""


def _create_time(pid: int) -> float | None:
    """``psutil.Process(pid).create_time()``, the same value, read with one ``read``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = float(stat.rpartition(b")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    if not _BOOT_TIME:
        import psutil

        _BOOT_TIME.extend((psutil.boot_time(), float(os.sysconf("SC_CLK_TCK"))))
    return ticks / _BOOT_TIME[1] + _BOOT_TIME[0]


class _Keeper(launcher._Supervisor):
    """``launcher._Supervisor`` waiting on a pidfd and a signal pipe instead of ticking: a
    task's end is seen at once, and a keeper walks the process table only when the task left
    processes behind (as subreaper, no child left means no descendant left)."""

    def __init__(
        self, attempt_dir: Path, wake_fd: int, env: dict[str, str], freed_fd: int = -1
    ) -> None:
        super().__init__(attempt_dir)
        self._wake_fd = wake_fd
        self._freed_fd = freed_fd
        """Written (this keeper's pid) once the task and all it spawned are gone."""
        self._env = env
        """The environment of the driver that asked for the attempt (the launcher's own)."""
        self._create_time = _create_time(os.getpid())
        """This keeper's start time as psutil tells it, read without a ``psutil.Process``."""

    def my_create_time(self) -> float:
        if self._create_time is None:
            self._create_time = self.me.create_time()
        return self._create_time

    def base_env(self) -> dict[str, str]:
        """The driver's environment, sent when it connected (not this process's)."""
        return dict(self._env)

    def _no_children(self) -> bool:
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return False

    def descendants(self) -> list[Any]:
        if self._no_children():
            return []
        return super().descendants()

    def gone(self, pgid: int, within: float) -> bool:
        self.reap()
        if self.child_status is not None and self._no_children():
            return True
        return super().gone(pgid, within)

    def record_start(self) -> dict[str, Any]:
        # NOTE: as the launcher's, but launcher.json is not synced to the disk: it names
        # processes, which a power loss ends anyway (exit.json still is synced). Two syncs
        # were two thirds of a short attempt's cost.
        with open(self.dir / LAUNCHES_FILE, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {time.time():.6f}\n")
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "create_time": self.my_create_time(),
            "started_at": self.started_at,
        }
        _replace_json(self.dir / LAUNCHER_FILE, info)
        return info

    def freed(self) -> None:
        """Tell the supervisor that the task holds nothing of the machine any more, so what
        waits behind this attempt starts now, not after its records are written and synced."""
        if self._freed_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._freed_fd, struct.pack("=i", os.getpid()))
        os.close(self._freed_fd)
        self._freed_fd = -1

    def launch(self, spec: dict[str, Any], argv: list[str]) -> _Spawned | None:
        """As the launcher's, with ``posix_spawn`` (a vfork: the keeper's memory is not
        copied, and no Python runs between the fork and the exec)."""
        env = self.task_env(spec)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        out = os.open(self.dir / STDOUT_FILE, flags, 0o666)
        err = os.open(self.dir / STDERR_FILE, flags, 0o666)
        home = os.getcwd()
        try:
            # NOTE: posix_spawn has no working directory of its own: the keeper moves (it is
            # one thread), and back, so that nothing it imports later comes from the task.
            os.chdir(self.dir)
            try:
                pid = _spawn(argv, env, out, err)
            finally:
                os.chdir(home)
        except OSError as e:
            code = 127 if isinstance(e, FileNotFoundError) else 126
            os.write(err, f"stowplan: cannot start {argv[0]!r}: {e}\n".encode())
            self.finish("exited", exit_code=code, message=str(e))
            return None
        finally:
            os.close(out)
            os.close(err)
        self.child = _Spawned(pid)
        return self.child

    def _wait(self, pidfd: int, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([pidfd, self._wake_fd], [], [], max(0.0, timeout))
            if self._wake_fd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_fd, 512)

    def run(self) -> None:
        # NOTE: the per-attempt launcher's run() loop, with the tick replaced by waits on a
        # pidfd; starting the task is the launcher's (``launch``); the loops could become one.
        spec = json.loads((self.dir / SPEC_FILE).read_text(encoding="utf-8"))
        argv: list[str] = spec["argv"]
        timeout_s: float | None = spec.get("timeout_s")
        memory_limit: int | None = spec.get("memory_limit")
        outputs: list[str] = spec.get("outputs", [])
        grace = float(spec.get("stop_grace_s", STOP_GRACE_S))

        self.record_start()
        if (self.dir / EXIT_FILE).exists() or self.cancelled():
            if not (self.dir / EXIT_FILE).exists():
                self.finish("cancelled", message="cancelled before the task started")
            return
        oom_counter = _OOM_COUNTER[0] if _OOM_COUNTER else launcher.oom_counter_file()
        oom_before = launcher.read_oom_kills(oom_counter)
        self.task_started_mono = time.monotonic()

        child = self.launch(spec, argv)
        if child is None:
            return
        pgid = child.pid
        pidfd = os.pidfd_open(child.pid)
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "create_time": self.my_create_time(),
            "started_at": self.started_at,
            "child_pid": child.pid,
        }
        info["child_create_time"] = _create_time(child.pid)
        _replace_json(self.dir / LAUNCHER_FILE, info)

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_sample = time.monotonic() + min(FIRST_SAMPLE_S, launcher.MEMORY_EVERY_S)
        reason: ExitReason = "exited"
        while True:
            self.reap()
            if self.child_status is not None:
                break
            now = time.monotonic()
            if self.cancelled():
                reason = "cancelled"
                self.stop(pgid, first=signal.SIGTERM, grace=grace)
                break
            if deadline is not None and now >= deadline:
                reason = "timeout"
                self.stop(pgid, first=signal.SIGTERM, grace=grace)
                break
            if now >= next_sample:
                next_sample = now + launcher.MEMORY_EVERY_S
                rss = self.rss()
                self.peak_rss = max(self.peak_rss, rss)
                if memory_limit and rss > memory_limit:
                    reason = "memory"
                    self.stop(pgid, first=signal.SIGKILL, grace=grace)
                    break
            until = next_sample if deadline is None else min(next_sample, deadline)
            self._wait(pidfd, until - time.monotonic())
        os.close(pidfd)

        if reason == "exited":
            self.stop(pgid, first=signal.SIGTERM, grace=grace)
        self.freed()
        status = self.child_status
        exit_code = signum = None
        if status is not None:
            if os.WIFSIGNALED(status):
                signum = os.WTERMSIG(status)
            else:
                exit_code = os.waitstatus_to_exitcode(status)
        common: dict[str, Any] = {
            "exit_code": exit_code,
            "signal": signum,
            "memory_limit": memory_limit,
            "timeout_s": timeout_s,
        }
        if reason == "exited" and signum == signal.SIGKILL:
            common.update(self.memory_evidence(oom_counter, oom_before))
        if reason == "exited" and exit_code == 0:
            scan = scan_outputs(self.dir, outputs)
            if scan.missing or scan.refused:
                why: ExitReason = "missing_output" if scan.missing else "bad_output"
                self.finish(why, missing=scan.missing, refused=scan.refused, **common)
                return
        self.finish(reason, **common)


def _keep(attempt_dir: Path, env: dict[str, str], freed_fd: int = -1) -> int:
    """The keeper's life, in the fork (never returns to the supervisor's loop)."""
    os.setsid()
    with contextlib.suppress(OSError):  # what goes wrong is told where the launcher tells it
        log = os.open(attempt_dir / LAUNCHER_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log, 2)
        os.close(log)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    sup = _Keeper(attempt_dir, wake_r, env, freed_fd)
    signal.signal(signal.SIGTERM, sup.on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    launcher._become_subreaper()
    try:
        sup.run()
    except BaseException as e:
        if sup.child is not None:
            sup.signal_all(sup.child.pid, signal.SIGKILL)
            sup.reap()
        with contextlib.suppress(OSError):
            sup.finish("launcher_error", message=f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    return 0


# -- the supervisor --------------------------------------------------------------------------------


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.env: dict[str, str] = dict(os.environ)


class _Supervisor:
    def __init__(self, runs: Path, listener: socket.socket) -> None:
        self.runs = runs
        self.listener = listener
        self.clients: dict[int, _Client] = {}
        self.keepers: dict[int, tuple[Path, _Client | None]] = {}
        self.after: dict[Path, tuple[Path, _Client]] = {}
        """Starts handed ahead: predecessor attempt -> the attempt to start when it ends."""
        self.idle_since = time.monotonic()
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.freed_r, self.freed_w = os.pipe()
        """Keepers write their pid here once their task is gone (see ``_Keeper.freed``)."""
        os.set_blocking(self.freed_r, False)
        self.freed_dirs: set[Path] = set()
        """Attempts whose keeper runs on, writing records, after its task is gone."""

    def start(self, attempt_dir: Path, client: _Client) -> None:
        """Start ``attempt_dir``, and what was handed ahead of it when it has ended already."""
        while True:
            ended = self._start_one(attempt_dir, client)
            if not ended:
                return
            following = self.after.pop(attempt_dir, None)
            if following is None:
                return
            attempt_dir, client = following

    def start_after(self, attempt_dir: Path, predecessor: Path, client: _Client) -> None:
        """Start ``attempt_dir`` when the keeper of ``predecessor`` ends (at once when that
        attempt has ended)."""
        waiting = any(d == predecessor for d, _ in self.after.values()) or any(
            d == predecessor for d, _ in self.keepers.values()
        )
        if predecessor in self.freed_dirs or (not waiting and (predecessor / EXIT_FILE).exists()):
            self.start(attempt_dir, client)
            return
        # NOTE: a predecessor that is neither ours nor ended (a keeper of an earlier
        # supervisor) never ends here: the driver sends a plain start once it sees it end.
        self.after[predecessor] = (attempt_dir, client)

    def _start_one(self, attempt_dir: Path, client: _Client) -> bool:
        """Fork a keeper for ``attempt_dir``; ``True`` when the attempt has ended already."""
        try:
            fd = _lock_fd(attempt_dir)
        except OSError as e:
            self._send(client, f"failed {attempt_dir} {e}")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a keeper holds it: started already
            return False
        if _held(attempt_dir / LEGACY_LOCK, os.O_RDONLY):  # a keeper from before an upgrade
            os.close(fd)
            return False
        if (attempt_dir / EXIT_FILE).exists() or (attempt_dir / LAUNCHER_FILE).exists():
            os.close(fd)
            if (attempt_dir / EXIT_FILE).exists():
                self._send(client, f"done {attempt_dir}")
                return True
            return False
        pid = os.fork()
        if pid == 0:  # the keeper
            code = 1
            try:
                self.listener.close()
                for c in self.clients.values():
                    c.sock.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                os.close(self.freed_r)
                code = _keep(attempt_dir, client.env, self.freed_w)
            finally:
                os._exit(code)
        os.close(fd)  # the keeper holds the lock now
        self.keepers[pid] = (attempt_dir, client)
        return False

    def _send(self, client: _Client | None, line: str) -> None:
        if client is None or client.sock.fileno() < 0:
            return
        try:
            client.sock.sendall(line.encode() + b"\n")
        except OSError:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0:
            self.clients.pop(fd, None)
            client.sock.close()
        for pid, (d, c) in list(self.keepers.items()):
            if c is client:
                self.keepers[pid] = (d, None)
        # Its starts handed ahead are forgotten: a driver that went away started nothing more
        # (whoever takes its attempts over starts them), one that closed wants nothing more.
        self.after = {p: (d, c) for p, (d, c) in self.after.items() if c is not client}

    def reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            kept = self.keepers.pop(pid, None)
            if kept is None:
                continue
            self.freed_dirs.discard(kept[0])
            # The next attempt first: its start is what the driver would ask for on "done".
            following = self.after.pop(kept[0], None)
            if following is not None:
                self.start(*following)
            self._send(kept[1], f"done {kept[0]}")

    def freed(self) -> None:
        """Start what waits behind keepers whose task is gone (they still write records)."""
        try:
            data = os.read(self.freed_r, 4096)
        except (BlockingIOError, InterruptedError):
            return
        for (pid,) in struct.iter_unpack("=i", data[: len(data) // 4 * 4]):
            kept = self.keepers.get(pid)
            if kept is not None:
                self.freed_dirs.add(kept[0])
                following = self.after.pop(kept[0], None)
                if following is not None:
                    self.start(*following)

    def handle(self, client: _Client) -> None:
        try:
            data = client.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.buf += data
        *lines, client.buf = client.buf.split(b"\n")
        for raw in lines:
            verb, _, arg = raw.decode("utf-8", errors="replace").partition(" ")
            if verb == "env":
                client.env = json.loads(arg)
            elif verb == "start":
                self.start(Path(arg), client)
            elif verb == "after":
                attempt, _, predecessor = arg.partition("\0")
                self.start_after(Path(attempt), Path(predecessor), client)

    def serve(self) -> None:
        # What every keeper imports, imported once here (ctypes alone cost a keeper 3 ms),
        # and what every keeper would look up the same (each costs a fork a few tenths of
        # a millisecond of copied pages): keepers share the supervisor's memory cgroup.
        import subprocess  # noqa: F401

        global _OOM_COUNTER
        with contextlib.suppress(OSError, AttributeError):
            launcher.load_libc()
        _OOM_COUNTER = (launcher.oom_counter_file(),)
        _create_time(os.getpid())  # reads the boot time once, for every keeper

        # Keepers are forks: objects made so far are never collected, so that neither a
        # collection here nor one in a keeper writes to (and copies) the pages they share.
        gc.collect()
        gc.freeze()
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.listener.setblocking(False)
        while not self.stopping:
            fds: list[socket.socket | int] = [
                self.listener,
                self.wake_r,
                self.freed_r,
                *(c.sock for c in self.clients.values()),
            ]
            ready, _, _ = select.select(fds, [], [], 1.0)
            for r in ready:
                if r is self.listener:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        sock, _ = self.listener.accept()
                        sock.setblocking(True)
                        self.clients[sock.fileno()] = _Client(sock)
                elif r == self.freed_r:
                    self.freed()
                elif r == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                else:
                    assert isinstance(r, socket.socket)
                    client = self.clients.get(r.fileno())
                    if client is not None:
                        self.handle(client)
            self.reap()
            if self.clients or self.keepers:
                self.idle_since = time.monotonic()
            elif time.monotonic() - self.idle_since > IDLE_EXIT_S:
                return

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True


LEAN_START = """\
import importlib.machinery as m, importlib.util as u, sys
path = None
for name in ("stowplan", "stowplan.providers", "stowplan.providers.local"):
    spec = m.PathFinder.find_spec(name, path)
    if spec is None or spec.submodule_search_locations is None:
        break
    sys.modules[name] = u.module_from_spec(spec)
    path = spec.submodule_search_locations
from stowplan.providers.local.supervisor import main
sys.exit(main(sys.argv[1:]))
"""
"""How a driver starts the supervisor (``python -c LEAN_START RUNS_DIR``, in the import
root): as ``-m`` would, but the packages above this module are made without running their
``__init__``, which import most of stowplan (the spec models, the local driver). The
supervisor needs none of it, and each keeper is a fork of it: a 13 MiB process forks in
half the time of a 29 MiB one. Anything that cannot be found so is imported as usual."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m stowplan.providers.local.supervisor RUNS_DIR\n")
        return 2
    runs = Path(args[0]).absolute()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(socket_name(runs))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return 0  # one runs already
        raise
    listener.listen(128)
    if os.fork() != 0:
        # The driver waits for this first process only: once it exits, the socket listens.
        os._exit(0)
    os.setsid()
    me = Path(runs / SUPERVISOR_DIR)
    me.mkdir(parents=True, exist_ok=True)
    import psutil

    write_json_atomic(
        me / "pid", {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
    )
    _Supervisor(runs, listener).serve()
    return 0


# -- the driver's side --------------------------------------------------------------------------


class SupervisorClient:
    """A driver's connection to the supervisor of its ``runs/``, started when none listens.

    ``on_done(attempt_dir)`` is called from a reader thread when a keeper this connection
    started ended; ``on_lost()`` when the supervisor went away (the next ``start`` starts a
    new one). Both are held weakly, so the client never keeps its driver alive."""

    def __init__(
        self,
        runs: Path,
        *,
        import_root: Path,
        on_done: Callable[[Path], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.runs = Path(runs).absolute()
        self._import_root = import_root
        self._on_done = weakref.WeakMethod(on_done)
        self._on_lost = weakref.WeakMethod(on_lost)
        self._sock: socket.socket | None = None
        self._closed = False
        self._mutex = threading.Lock()
        self.spawned = 0
        """Supervisors this client started (a restart after one died counts)."""

    def start(self, attempt_dir: Path) -> bool:
        """Ask for a keeper of ``attempt_dir``; ``False`` when no supervisor can be reached."""
        line = f"start {attempt_dir}\n".encode()
        for _ in range(2):
            sock = self._connected()
            if sock is None:
                return False
            try:
                sock.sendall(line)
                return True
            except OSError:
                self._disconnect(sock)
        return False

    def connected(self) -> bool:
        return self._sock is not None

    def start_after(self, attempt_dir: Path, predecessor: Path) -> bool:
        """Ask for a keeper of ``attempt_dir`` once the keeper of ``predecessor`` ended (see
        the module doc); ``False`` when the supervisor that was asked to start
        ``predecessor`` cannot be reached: a new one would not know it."""
        with self._mutex:
            sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendall(f"after {attempt_dir}\0{predecessor}\n".encode())
        except OSError:
            self._disconnect(sock)
            return False
        return True

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _connected(self) -> socket.socket | None:
        with self._mutex:
            if self._sock is not None:
                return self._sock
            self._closed = False
            sock = self._connect()
            if sock is None:
                self._spawn()
                sock = self._connect()
            if sock is None:
                return None
            env = json.dumps(dict(os.environ))
            try:
                sock.sendall(f"env {env}\n".encode())
            except OSError:
                sock.close()
                return None
            self._sock = sock
        threading.Thread(
            target=self._read, args=(sock,), name="stowplan-local-supervisor", daemon=True
        ).start()
        return sock

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_name(self.runs))
        except OSError:
            sock.close()
            return None
        return sock

    def _spawn(self) -> None:
        import subprocess

        log_dir = self.runs / SUPERVISOR_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "log", "ab") as log:
            # NOTE: cwd is the import root for the reason start_launcher gives; the first
            # process exits once the socket listens, so this wait is short.
            proc = subprocess.Popen(
                [sys.executable, "-c", LEAN_START, str(self.runs)],
                cwd=self._import_root,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                close_fds=True,
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        self.spawned += 1

    def _disconnect(self, sock: socket.socket) -> None:
        with self._mutex:
            if self._sock is sock:
                self._sock = None
        sock.close()

    def _read(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                verb, _, arg = raw.decode("utf-8", errors="replace").partition(" ")
                done = self._on_done()
                if verb == "done" and done is not None:
                    done(Path(arg))
        with self._mutex:
            closed = self._closed
        self._disconnect(sock)
        lost = self._on_lost()
        if not closed and lost is not None:
            lost()


if __name__ == "__main__":
    sys.exit(main())
