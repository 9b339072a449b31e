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
    missing, message}``. Its presence means the attempt is over.

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
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import psutil

SPEC_FILE = "spec.json"
LAUNCHES_FILE = "launches"
LAUNCHER_FILE = "launcher.json"
EXIT_FILE = "exit.json"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
LAUNCHER_LOG = "launcher.log"
RESERVED_NAMES = frozenset(
    {SPEC_FILE, LAUNCHES_FILE, LAUNCHER_FILE, EXIT_FILE, STDOUT_FILE, STDERR_FILE, LAUNCHER_LOG}
)
"""Names in the attempt directory that belong to stowplan; task files may not use them."""

ExitReason = Literal["exited", "timeout", "memory", "cancelled", "missing_output", "launcher_error"]

STOP_GRACE_S = 5.0
"""Time between SIGTERM and SIGKILL when stopping a task on timeout, cancel or at its end
(``stop_grace_s`` in spec.json overrides it)."""
TICK_S = 0.05
"""How often exit, cancel and timeout are checked."""
MEMORY_EVERY_S = 0.5
"""How often the task's memory is sampled."""
_PR_SET_CHILD_SUBREAPER = 36


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class _Supervisor:
    def __init__(self, attempt_dir: Path) -> None:
        self.dir = attempt_dir
        self.cancel_requested = False
        self.child: subprocess.Popen[bytes] | None = None
        self.child_status: int | None = None
        self.started_at = time.time()
        self.peak_rss = 0
        self.me = psutil.Process()

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
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

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

        env = dict(os.environ)
        env.update(spec.get("env", {}))
        prefix = spec.get("path_prefix")
        if prefix:
            env["PATH"] = prefix + os.pathsep + env["PATH"] if env.get("PATH") else prefix

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
                return

        child = self.child
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
        if reason == "exited" and exit_code == 0:
            missing = [o for o in outputs if not (self.dir / o).exists()]
            if missing:
                self.finish("missing_output", missing=missing, **common)
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
