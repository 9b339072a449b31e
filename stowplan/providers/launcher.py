"""The per-attempt supervisor: ``python -m stowplan.providers.launcher ATTEMPT_DIR``.

The local driver starts one launcher per attempt, in its own session; the launcher detaches
(forks, and its parent exits at once), so attempts outlive a crashed control plane and the
control plane holds no child process per attempt. The launcher owns exactly one attempt
directory and talks to the driver only through files in it:

``spec.json`` (read)
    Written by the driver before the launcher starts: argv, env, PATH prefix, timeout, memory
    limit, declared outputs, and optionally ``stop_grace_s``.
``launches`` (appended)
    One line ``"<pid> <time>"`` per launcher start, so a double start is visible.
``launcher.json`` (replaced atomically)
    ``{pid, create_time, started_at}``, then the same plus ``child_pid`` and
    ``child_create_time`` once the task runs. ``(pid, create_time)`` identifies this process
    even after its pid is reused.
``stdout.log``, ``stderr.log``
    The task's output streams.
``exit.json`` (replaced atomically, written last)
    ``{exit_code, signal, reason, started_at, ended_at, peak_rss, memory_limit, timeout_s,
    missing, refused, message}``, and for a task killed by a SIGKILL the launcher did not send,
    what is known about memory: ``oom_kills`` (OOM kills its memory cgroup counted during the
    attempt), ``kernel_oom`` (the kernel log names one of its processes), ``memory_available``
    (the least memory the machine had free at a sample) and ``memory_total``; ``null`` where
    unreadable. Its presence means the attempt is over.

Invariants:

- The task runs in its own process group with the attempt directory as its working directory.
  On Linux the launcher is also a child subreaper, so everything the task spawns, even a
  double-forked daemon, stays its descendant: memory is summed over all of it and all of it is
  stopped when the attempt ends. The launcher writes ``exit.json`` only once they are gone
  (or survived SIGKILL for a whole grace period).
- A cancel that lands before the task starts (``exit.json`` already present, or SIGTERM) means
  the task never starts. Both sides write first and check second: the launcher writes
  ``launcher.json`` then looks for ``exit.json``; the driver writes ``exit.json`` then looks
  for ``launcher.json`` and signals it.
- Only the standard library and psutil are imported: this process is started per attempt.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple, Protocol

import psutil

from stowplan.providers.importhook import HOOK_DIR, RECORD_IMPORTS_ENV, USED_FILE, USED_FILE_ENV

SPEC_FILE = "spec.json"
LAUNCHES_FILE = "launches"
LAUNCHER_FILE = "launcher.json"
EXIT_FILE = "exit.json"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
LAUNCHER_LOG = "launcher.log"
RESERVED_NAMES = frozenset(
    {
        SPEC_FILE,
        LAUNCHES_FILE,
        LAUNCHER_FILE,
        EXIT_FILE,
        STDOUT_FILE,
        STDERR_FILE,
        LAUNCHER_LOG,
        USED_FILE,
    }
)
"""Names in the attempt directory that belong to stowplan; task files may not use them."""

ExitReason = Literal[
    "exited", "timeout", "memory", "cancelled", "missing_output", "bad_output", "launcher_error"
]

STOP_GRACE_S = 5.0
"""Time between SIGTERM and SIGKILL when stopping a task on timeout, cancel or at its end
(``stop_grace_s`` in spec.json overrides it)."""
TICK_S = 0.05
"""How often exit, cancel and timeout are checked."""
MEMORY_EVERY_S = 0.5
"""How often the task's memory is sampled."""
_PR_SET_CHILD_SUBREAPER = 36
OUTPUT_FILES_MAX = 1_000_000
"""At most this many entries are looked at under an attempt's outputs (a bound, not a quota:
symbolic links inside the attempt directory could otherwise make a tree without end)."""
KMSG_MAX_BYTES = 16 << 20
"""At most this much of the kernel log is read when looking for an OOM kill."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OutputScan(NamedTuple):
    """What an attempt's declared outputs hold, once its task has ended."""

    files: dict[str, Path]
    """Artifact name -> real path of the file inside the attempt directory."""
    missing: list[str]
    """Declared outputs that do not exist."""
    refused: list[str]
    """``"<name>: <why>"`` for each output that exists but may not be stored."""


def scan_outputs(root: Path, declared: Sequence[str]) -> OutputScan:
    """Expand and check the outputs ``declared`` by an attempt whose directory is ``root``.

    An output names a file or a directory (a trailing ``/`` says it must be a directory). A
    directory stands for every file under it, each an artifact named by its path: ``d/`` (or
    ``d``) holding ``a.txt`` and ``sub/b.txt`` gives ``d/a.txt`` and ``d/sub/b.txt``; an
    empty directory gives none. A declared file keeps its declared name.

    Symbolic links are followed only while they stay inside ``root``; they are stored as the
    content they lead to. Refused: a path that leads out of ``root`` (a link, or a path through
    a linked directory), into stowplan's own files there or ``root`` itself, a link loop, and
    anything that is neither a regular file nor a directory (reading a FIFO would block).
    Never raises over what the task left behind.
    """
    real_root = Path(os.path.realpath(root))
    files: dict[str, Path] = {}
    missing: list[str] = []
    refused: list[str] = []
    budget = OUTPUT_FILES_MAX
    for name in declared:
        clean = PurePosixPath(name).as_posix()
        path = root / clean
        if not os.path.lexists(path):
            missing.append(name)
            continue
        real, why = _inside(real_root, path)
        if real is None:
            refused.append(f"{name}: {why}")
            continue
        kind, why = _kind(real)
        if kind == "missing":
            missing.append(name)
        elif kind == "file" and not name.endswith("/"):
            files[name] = real
        elif kind == "file":
            refused.append(f"{name}: declared as a directory, but is a file")
        elif kind != "dir":
            refused.append(f"{name}: {why}")
        else:
            # Depth first, in name order; each entry remembers the directories above it, so a
            # link back up is a loop, not a tree without end.
            stack: list[tuple[Path, str, tuple[Path, ...]]] = [(real, clean, (real,))]
            while stack and budget > 0:
                folder, prefix, chain = stack.pop()
                try:
                    with os.scandir(folder) as it:
                        entries = sorted(it, key=lambda e: e.name)
                except OSError as e:
                    refused.append(f"{prefix}/: cannot be read: {e.strerror or e}")
                    continue
                below: list[tuple[Path, str, tuple[Path, ...]]] = []
                for entry in entries:
                    budget -= 1
                    if budget <= 0:
                        refused.append(f"{name}: more than {OUTPUT_FILES_MAX} entries")
                        break
                    art = f"{prefix}/{entry.name}"
                    target: Path | None = Path(entry.path)
                    if entry.is_symlink():
                        target, why = _inside(real_root, Path(entry.path))
                        if target is None:
                            refused.append(f"{art}: {why}")
                            continue
                    assert target is not None
                    kind, why = _kind(target)
                    if kind == "file":
                        files[art] = target
                    elif kind == "dir" and target in chain:
                        refused.append(f"{art}: a symbolic link loop")
                    elif kind == "dir":
                        below.append((target, art, (*chain, target)))
                    elif kind == "missing":
                        refused.append(f"{art}: a symbolic link to {target}, which does not exist")
                    else:
                        refused.append(f"{art}: {why}")
                stack.extend(reversed(below))
    return OutputScan(files=files, missing=missing, refused=refused)


def _inside(real_root: Path, path: Path) -> tuple[Path | None, str]:
    """``path``'s real path if it stays inside the attempt directory, else why not."""
    real = Path(os.path.realpath(path))
    try:
        rel = real.relative_to(real_root)
    except ValueError:
        return None, f"leads to {real}, outside the attempt directory"
    if not rel.parts:
        return None, "leads to the attempt directory itself"
    if rel.parts[0] in RESERVED_NAMES:
        return None, f"leads to stowplan's own {rel.parts[0]}"
    return real, ""


def _kind(path: Path) -> tuple[str, str]:
    """``("file" | "dir" | "missing" | "other", why)`` for a real path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", ""
    except OSError as e:
        return "other", f"cannot be read: {e.strerror or e}"
    if stat.S_ISREG(st.st_mode):
        if not os.access(path, os.R_OK):
            return "other", "cannot be read: permission denied"
        return "file", ""
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket or device"
    return "other", f"is {what}, not a regular file or a directory"


def oom_counter_file(
    proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")
) -> Path | None:
    """The file counting OOM kills in this process's memory cgroup: cgroup v2
    ``memory.events`` or v1 ``memory.oom_control`` (both have an ``oom_kill`` line); ``None``
    when neither can be read."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        rel = path.strip().lstrip("/")
        if hierarchy == "0" and not controllers:
            candidates.append(mount / rel / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(mount / "memory" / rel / "memory.oom_control")
    for candidate in candidates:
        if read_oom_kills(candidate) is not None:
            return candidate
    return None


def read_oom_kills(path: Path | None) -> int | None:
    """The ``oom_kill`` counter in a cgroup's memory events file; ``None`` when unreadable."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


_KMSG_KILLED = re.compile(r"Killed process (\d+)|oom-kill:.*?[,:]pid=(\d+)")


def oom_killed_pids(records: Iterable[str], *, since_us: int = 0) -> set[int]:
    """Pids the kernel's OOM killer names in ``/dev/kmsg`` records
    (``"prio,seq,usec,flags;message"``) stamped at or after ``since_us``."""
    pids: set[int] = set()
    for record in records:
        header, _, message = record.partition(";")
        fields = header.split(",")
        with contextlib.suppress(IndexError, ValueError):
            if int(fields[2]) < since_us:
                continue
        for m in _KMSG_KILLED.finditer(message):
            pids.add(int(m.group(1) or m.group(2)))
    return pids


def read_kmsg(path: Path = Path("/dev/kmsg")) -> list[str] | None:
    """The kernel log records still in its buffer; ``None`` when it cannot be read (it often
    may not be: ``dmesg_restrict``, containers, other systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records: list[str] = []
    size = 0
    try:
        while size < KMSG_MAX_BYTES:
            try:
                chunk = os.read(fd, 8192)  # one record per read
            except BlockingIOError:
                break  # read everything there is
            except BrokenPipeError:
                # Overwritten while we read: go on with the next (counted, so this ends).
                size += 1024
                continue
            except OSError:
                return None  # a log read in part proves nothing
            if not chunk:
                break
            size += len(chunk)
            records.append(chunk.decode("utf-8", errors="replace"))
    finally:
        os.close(fd)
    return records


_libc: Any = None


def load_libc() -> Any:
    """The C library, loaded once (the local supervisor loads it before forking keepers)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return int(load_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class _Child(Protocol):
    """The task's main process as the supervisor knows it (a ``Popen``, or a spawned pid)."""

    pid: int
    returncode: int | None


class _Supervisor:
    def __init__(self, attempt_dir: Path) -> None:
        self.dir = attempt_dir
        self.cancel_requested = False
        self.child: _Child | None = None
        self.child_status: int | None = None
        self.started_at = time.time()
        self.peak_rss = 0
        self.task_started_mono = time.monotonic()
        self.pids: set[int] = set()
        """Every process of the task seen at a memory sample, to find in the kernel's log."""
        self.memory_available: int | None = None
        """The least memory the machine had available at a sample."""

    @functools.cached_property
    def me(self) -> psutil.Process:
        """This process, made when first needed (a local keeper, a fork, may never need it)."""
        return psutil.Process()

    # -- signals and bookkeeping -------------------------------------------------------------

    def on_sigterm(self, signum: int, frame: object) -> None:
        self.cancel_requested = True

    def cancelled(self) -> bool:
        # A method, not the attribute: the signal handler changes it behind the checker's back.
        return self.cancel_requested

    def record_start(self) -> dict[str, Any]:
        with open(self.dir / LAUNCHES_FILE, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {time.time():.6f}\n")
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "create_time": self.me.create_time(),
            "started_at": self.started_at,
        }
        write_json_atomic(self.dir / LAUNCHER_FILE, info)
        return info

    def finish(self, reason: ExitReason, **fields: Any) -> None:
        record: dict[str, Any] = {
            "exit_code": None,
            "signal": None,
            "reason": reason,
            "started_at": self.started_at,
            "ended_at": time.time(),
            "peak_rss": self.peak_rss,
            "missing": [],
            "refused": [],
            "message": "",
        }
        record.update(fields)
        write_json_atomic(self.dir / EXIT_FILE, record)

    # -- the task's processes ----------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: the task, and orphans handed to us as subreaper."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_status = status
                # Popen never saw this wait; tell it, so it does not think the child runs.
                self.child.returncode = os.waitstatus_to_exitcode(status)

    def descendants(self) -> list[psutil.Process]:
        try:
            procs = self.me.children(recursive=True)
        except psutil.Error:
            return []
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def rss(self) -> int:
        total = 0
        for p in self.descendants():
            self.pids.add(p.pid)
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        with contextlib.suppress(psutil.Error, OSError):
            available = psutil.virtual_memory().available
            if self.memory_available is None or available < self.memory_available:
                self.memory_available = available
        return total

    def memory_evidence(self, counter: Path | None, oom_before: int | None) -> dict[str, Any]:
        """What is known about memory when the task died of a SIGKILL we did not send."""
        after = read_oom_kills(counter)
        kmsg = read_kmsg()
        if self.child is not None:
            self.pids.add(self.child.pid)
        since_us = int((self.task_started_mono - 1.0) * 1e6)
        total: int | None = None
        with contextlib.suppress(psutil.Error, OSError):
            total = psutil.virtual_memory().total
        return {
            "oom_kills": None if after is None or oom_before is None else after - oom_before,
            "kernel_oom": None
            if kmsg is None
            else bool(self.pids & oom_killed_pids(kmsg, since_us=since_us)),
            "memory_available": self.memory_available,
            "memory_total": total,
        }

    def group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def signal_all(self, pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for p in self.descendants():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    def gone(self, pgid: int, within: float) -> bool:
        """Wait up to ``within`` seconds for the task and everything it spawned to be gone."""
        deadline = time.monotonic() + within
        while True:
            self.reap()
            if (
                self.child_status is not None
                and not self.group_alive(pgid)
                and not self.descendants()
            ):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(TICK_S)

    def stop(self, pgid: int, *, first: int, grace: float) -> None:
        """Signal the task's processes with ``first``; SIGKILL whatever is left after ``grace``.

        A process that survives SIGKILL too (stuck in the kernel) is given up on after another
        ``grace``: the attempt still ends, and its exit record says what is known.
        """
        self.signal_all(pgid, first)
        if not self.gone(pgid, grace):
            self.signal_all(pgid, signal.SIGKILL)
            self.gone(pgid, grace)

    # -- the attempt -------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        """The environment the task's starts from: this process's."""
        return dict(os.environ)

    def task_env(self, spec: dict[str, Any]) -> dict[str, str]:
        """The task's environment: ``base_env`` with the spec's variables, PATH and hooks."""
        env = self.base_env()
        env.update(spec.get("env", {}))
        devices = spec.get("devices")
        if devices is not None:  # the lease: the devices the core placed it on, and no others
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(int(d)) for d in devices)
        prefix = spec.get("path_prefix")
        if prefix:
            env["PATH"] = prefix + os.pathsep + env["PATH"] if env.get("PATH") else prefix
        if env.get(RECORD_IMPORTS_ENV, "1") != "0":
            # Python started by the task records the distributions it imported (see
            # providers/importhook), for the reuse check; it chains to any sitecustomize.
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = HOOK_DIR + os.pathsep + old if old else HOOK_DIR
            env[USED_FILE_ENV] = str(self.dir / USED_FILE)
        return env

    def launch(self, spec: dict[str, Any], argv: list[str]) -> _Child | None:
        """Start the task in its own session, in the attempt directory, with its environment
        and its output files; None when it could not start (the exit record says why)."""
        env = self.task_env(spec)
        with (
            open(self.dir / STDOUT_FILE, "ab") as out,
            open(self.dir / STDERR_FILE, "ab") as err,
        ):
            try:
                self.child = subprocess.Popen(
                    argv,
                    cwd=self.dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                code = 127 if isinstance(e, FileNotFoundError) else 126
                err.write(f"stowplan: cannot start {argv[0]!r}: {e}\n".encode())
                self.finish("exited", exit_code=code, message=str(e))
                return None
        return self.child

    def run(self) -> None:
        spec = json.loads((self.dir / SPEC_FILE).read_text(encoding="utf-8"))
        argv: list[str] = spec["argv"]
        timeout_s: float | None = spec.get("timeout_s")
        memory_limit: int | None = spec.get("memory_limit")
        outputs: list[str] = spec.get("outputs", [])
        grace = float(spec.get("stop_grace_s", STOP_GRACE_S))

        self.record_start()
        if (self.dir / EXIT_FILE).exists() or self.cancelled():
            # Cancelled before the task started. An exit.json written by the driver stays.
            if not (self.dir / EXIT_FILE).exists():
                self.finish("cancelled", message="cancelled before the task started")
            return
        # The task inherits our memory cgroup: count its OOM kills from here.
        oom_counter = oom_counter_file()
        oom_before = read_oom_kills(oom_counter)
        self.task_started_mono = time.monotonic()

        child = self.launch(spec, argv)
        if child is None:
            return
        pgid = child.pid
        info = {
            "pid": os.getpid(),
            "create_time": self.me.create_time(),
            "started_at": self.started_at,
            "child_pid": child.pid,
        }
        with contextlib.suppress(psutil.Error):
            info["child_create_time"] = psutil.Process(child.pid).create_time()
        write_json_atomic(self.dir / LAUNCHER_FILE, info)

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_sample = time.monotonic()
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
                next_sample = now + MEMORY_EVERY_S
                rss = self.rss()
                self.peak_rss = max(self.peak_rss, rss)
                if memory_limit and rss > memory_limit:
                    reason = "memory"
                    # Past its limit a task only grows: no grace.
                    self.stop(pgid, first=signal.SIGKILL, grace=grace)
                    break
            time.sleep(TICK_S)

        if reason == "exited":
            # The task's main process ended; whatever it left running ends with it.
            self.stop(pgid, first=signal.SIGTERM, grace=grace)
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
            # Not ours (we kill only on timeout, memory or cancel): find out whether memory ran
            # out, so an outside kill is not taken for an OOM kill, nor the other way round.
            common.update(self.memory_evidence(oom_counter, oom_before))
        if reason == "exited" and exit_code == 0:
            scan = scan_outputs(self.dir, outputs)
            if scan.missing or scan.refused:
                why: ExitReason = "missing_output" if scan.missing else "bad_output"
                self.finish(why, missing=scan.missing, refused=scan.refused, **common)
                return
        self.finish(reason, **common)


def main(argv: list[str] | None = None) -> int:
    """Supervise one attempt. Detaches first (the caller's child exits at once and the
    supervisor goes on as an orphan) unless ``--foreground`` is given."""
    args = sys.argv[1:] if argv is None else argv
    foreground = "--foreground" in args
    args = [a for a in args if a != "--foreground"]
    if len(args) != 1:
        sys.stderr.write(
            "usage: python -m stowplan.providers.launcher [--foreground] ATTEMPT_DIR\n"
        )
        return 2
    if not foreground and hasattr(os, "fork") and os.fork() != 0:
        # The control plane only ever waits for this short-lived parent: a long-lived process
        # never holds a child handle (and a zombie) per attempt.
        os._exit(0)
    sup = _Supervisor(Path(args[0]).absolute())
    signal.signal(signal.SIGTERM, sup.on_sigterm)
    _become_subreaper()
    try:
        sup.run()
    except BaseException as e:
        # Never leave a task running unsupervised, and always say why the attempt ended.
        if sup.child is not None:
            sup.signal_all(sup.child.pid, signal.SIGKILL)
            sup.reap()
        message = f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            sup.finish("launcher_error", message=message)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
