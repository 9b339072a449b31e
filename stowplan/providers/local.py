"""The local driver: attempts run as processes on this machine, the embedded default.

Layout under the project's ``.stowplan/`` (``state_dir``)::

    runs/<run_id>/<attempt>/     one attempt: spec.json, launcher.json, exit.json, logs, files
    runs/.keys/<key>             idempotency key -> attempt directory (relative to runs/)

Each started attempt is supervised by its own launcher process (``launcher.py``) in a new
session, so attempts outlive a crashed control plane; everything this driver knows is on disk,
and a fresh instance over the same ``state_dir`` describes what an earlier one started.

Idempotency: the key index is written first, then the attempt directory is claimed with
``os.mkdir``. A submit that finds the directory claimed starts nothing and reports what is
there. A crash between the two leaves an index entry without a directory: ``UNKNOWN``, and a
retried submit claims it normally. The claimer records itself (pid and start time) in
``spec.json``; starting an attempt creates ``launcher.log`` exclusively first, so of all the
instances that may hold an attempt queued, exactly one starts it.

Concurrency: the driver counts the CPUs, memory and GPUs of the attempts it started (and of
running attempts an earlier instance started, once described) against the configured
capacity. Requests that do not fit wait in a FIFO, reported ``QUEUED``, and are started in
order as capacity frees; the queue is pumped on ``submit()``, ``describe()`` and ``cancel()``.
There is no backfilling: a large request at the head is not overtaken by small ones. A request
larger than the whole machine is started when nothing else of ours runs, so it is never stuck
forever; it may then be slow, or be killed by its own memory limit. The queue lives in memory;
an instance asked about an attempt that another process claimed and never started takes it
into its own queue once that process is dead (a killed provider actor's successor starts what
it had queued), and reports it ``QUEUED`` while that process lives. A start the dead process
had begun is made again once no launcher of that attempt runs (after ``START_GRACE_S``). A
claim whose claimer is unknown (this process, or none recorded) is ``QUEUED`` for
``QUEUED_GRACE_S``, then ``FAILED``/``LOST``, and the control plane retries it under a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import anyio
import msgspec
import psutil
from msgspec import Struct, field

from stowplan.errors import InternalError, ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Capabilities,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
)
from stowplan.providers.importhook import USED_FILE
from stowplan.providers.launcher import (
    EXIT_FILE,
    LAUNCHER_FILE,
    LAUNCHER_LOG,
    RESERVED_NAMES,
    SPEC_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    scan_outputs,
    write_json_atomic,
)
from stowplan.spec.models import FailureClass, LocalProviderConfig
from stowplan.spec.units import plural

QUEUED_GRACE_S = 30.0
"""A claimed attempt without a launcher is still starting for this long, then it is LOST."""
START_GRACE_S = 5.0
"""A start begun by a driver that died since is left to finish for this long (and for as long
as its launcher runs), then made again."""
STDERR_TAIL_CHARS = 500
LOG_POLL_S = 0.2
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Import root of the stowplan package: the launcher's working directory (see _start).
_IMPORT_ROOT = Path(__file__).resolve().parents[2]


class LocalRequest(ProviderRequest, frozen=True, kw_only=True):
    """Exactly what the local driver will run: a process with this argv, env and directory."""

    run_id: str
    attempt: int
    name: str
    attempt_dir: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Added to the stowplan process's environment (STOWPLAN_* included)."""
    path_prefix: str = ""
    """Prepended to PATH, so ``python`` is the interpreter running stowplan."""
    cpus: float = 1.0
    memory: int = 1 << 30
    gpus: int = 0
    timeout_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    def render(self) -> str:
        timeout = "none" if self.timeout_s is None else f"{self.timeout_s:g}s"
        lines = [
            f"# local attempt {self.key}: task {self.name}, run {self.run_id}, "
            f"attempt {self.attempt}",
            f"# needs cpus={self.cpus:g} memory={format_bytes(self.memory)} gpus={self.gpus} "
            f"timeout={timeout} (killed above its memory or past its timeout)",
        ]
        if self.outputs:
            lines.append(f"# outputs: {shlex.join(self.outputs)}")
        for fname in sorted(self.files):
            lines.append(f"# writes file {shlex.quote(fname)} ({len(self.files[fname])} bytes)")
        env = dict(self.env)
        assignments = [shlex.quote(f"{k}={v}") for k, v in sorted(env.items()) if k != "PATH"]
        if self.path_prefix:
            if "PATH" in env:
                assignments.append(shlex.quote(f"PATH={self.path_prefix}:{env['PATH']}"))
            else:
                assignments.append(f'PATH={shlex.quote(self.path_prefix)}:"$PATH"')
        elif "PATH" in env:
            assignments.append(shlex.quote(f"PATH={env['PATH']}"))
        lines.append(f"cd {shlex.quote(self.attempt_dir)}")
        lines.append(" ".join(["env", *assignments, shlex.join(self.argv)]))
        return "\n".join(lines)


class ExitRecord(Struct, frozen=True, kw_only=True):
    """``exit.json``, as the launcher (or a cancel before start) writes it."""

    reason: str
    exit_code: int | None = None
    signal: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    peak_rss: int = 0
    memory_limit: int | None = None
    timeout_s: float | None = None
    missing: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """``"<output>: <why>"`` for each declared output that may not be stored."""
    message: str = ""
    oom_kills: int | None = None
    """OOM kills the task's memory cgroup counted during the attempt (``None``: unreadable)."""
    kernel_oom: bool | None = None
    """Whether the kernel's log names one of the task's processes as OOM-killed."""
    memory_available: int | None = None
    """The least memory the machine had available at one of the launcher's samples."""
    memory_total: int | None = None


class LauncherRecord(Struct, frozen=True, kw_only=True):
    """``launcher.json``: who supervises the attempt, and its task once started."""

    pid: int
    create_time: float
    started_at: float | None = None
    child_pid: int | None = None
    child_create_time: float | None = None


_exit_decoder = msgspec.json.Decoder(ExitRecord)
_launcher_decoder = msgspec.json.Decoder(LauncherRecord)


class _Claim(Struct, frozen=True):
    """Who claimed an attempt directory: a process, told apart from a reuse of its pid."""

    pid: int
    create_time: float


class _SpecFile(Struct, frozen=True, kw_only=True):
    """What the driver reads back from ``spec.json`` to start an attempt another instance
    claimed (the launcher reads the same file with the standard library)."""

    key: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    path_prefix: str = ""
    timeout_s: float | None = None
    memory_limit: int = 1 << 30
    outputs: list[str] = field(default_factory=list)
    cpus: float = 1.0
    gpus: int = 0
    name: str = ""
    claimed_by: _Claim | None = None


_spec_decoder = msgspec.json.Decoder(_SpecFile)

# Signals a program raises on itself when it crashes: its own bug, like a non-zero exit.
CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGILL, signal.SIGSYS, signal.SIGTRAP}
)


def classify_exit(
    info: ExitRecord, *, stderr_tail: str = ""
) -> tuple[ProviderState, FailureClass | None, str]:
    """Map an exit record to our state, failure class and a message for people. Total."""
    tail = f": {stderr_tail}" if stderr_tail else ""
    match info.reason:
        case "cancelled":
            return ProviderState.CANCELLED, None, info.message or "cancelled"
        case "timeout":
            limit = "its" if info.timeout_s is None else f"the {info.timeout_s:g} s"
            return ProviderState.FAILED, FailureClass.TIMEOUT, f"killed after {limit} timeout"
        case "memory":
            limit = "its limit" if info.memory_limit is None else format_bytes(info.memory_limit)
            return (
                ProviderState.FAILED,
                FailureClass.OUT_OF_MEMORY,
                f"killed: memory use reached {format_bytes(info.peak_rss)}, over the declared "
                f"limit of {limit}",
            )
        case "missing_output" | "bad_output":
            return ProviderState.FAILED, FailureClass.USER_ERROR, _outputs_message(info)
        case "launcher_error":
            return (
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                f"supervisor failed: {info.message or 'no reason recorded'}",
            )
        case "exited":
            if info.signal is not None:
                name = _signal_name(info.signal)
                if info.signal == signal.SIGKILL:
                    # NOTE: we send SIGKILL only with reason timeout/memory/cancelled; this one
                    # came from the kernel's OOM killer or from outside (kill -9, preemption).
                    oom = _oom_evidence(info)
                    if oom:
                        return ProviderState.FAILED, FailureClass.OUT_OF_MEMORY, f"{oom}{tail}"
                    return (
                        ProviderState.FAILED,
                        FailureClass.NODE_FAILURE,
                        f"killed by signal 9 from outside (SIGKILL, not sent by stowplan; "
                        f"{_no_oom_evidence(info)}){tail}",
                    )
                if info.signal in CRASH_SIGNALS:
                    return ProviderState.FAILED, FailureClass.USER_ERROR, f"crashed: {name}{tail}"
                return ProviderState.FAILED, FailureClass.NODE_FAILURE, f"killed by {name}{tail}"
            if info.exit_code == 0:
                return ProviderState.SUCCEEDED, None, ""
            if info.exit_code is not None:
                return (
                    ProviderState.FAILED,
                    FailureClass.USER_ERROR,
                    f"exit code {info.exit_code}{tail}",
                )
            return (
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                "the exit record has neither an exit code nor a signal",
            )
        case _:
            return (
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                f"unrecognised exit reason {info.reason!r}",
            )


NEAR_LIMIT = 0.9
"""A task that was seen using this share of its memory limit, or a machine seen with less than
``1 - NEAR_LIMIT`` of its memory available, may have been OOM-killed between two samples."""


def _oom_evidence(info: ExitRecord) -> str:
    """Why an unexplained SIGKILL is taken for the OOM killer's, or ``""`` when nothing says so."""
    if info.oom_kills:
        return (
            "killed by the kernel's out-of-memory killer (its memory cgroup counted "
            f"{info.oom_kills} OOM kill{'s' if info.oom_kills != 1 else ''} during the attempt)"
        )
    if info.kernel_oom:
        return "killed by the kernel's out-of-memory killer (the kernel log names it)"
    if info.memory_limit and info.peak_rss >= NEAR_LIMIT * info.memory_limit:
        return (
            f"killed by SIGKILL, not sent by stowplan, after using {format_bytes(info.peak_rss)}"
            f" of its {format_bytes(info.memory_limit)} limit: most likely out of memory"
        )
    if (
        info.memory_available is not None
        and info.memory_total
        and info.memory_available < (1 - NEAR_LIMIT) * info.memory_total
    ):
        return (
            "killed by SIGKILL, not sent by stowplan, while the machine had only "
            f"{format_bytes(info.memory_available)} of {format_bytes(info.memory_total)} "
            "available: most likely the kernel's out-of-memory killer"
        )
    return ""


def _no_oom_evidence(info: ExitRecord) -> str:
    """What was checked before calling a SIGKILL an outside one."""
    checks = [
        "its memory cgroup counted no OOM kill"
        if info.oom_kills is not None
        else "its memory cgroup's OOM count was unreadable",
        "the kernel log names no OOM kill of it"
        if info.kernel_oom is not None
        else "the kernel log was unreadable",
    ]
    used = f"it used at most {format_bytes(info.peak_rss)}"
    if info.memory_limit:
        used += f" of its {format_bytes(info.memory_limit)} limit"
    return "; ".join([*checks, used])


def _outputs_message(info: ExitRecord) -> str:
    parts = []
    if info.missing:
        parts.append(f"declared outputs are missing: {', '.join(info.missing)}")
    if info.refused:
        parts.append(f"declared outputs refused: {'; '.join(info.refused)}")
    code = "exited 0" if info.exit_code == 0 else "ended"
    return f"{code} but " + "; ".join(parts or ["declared outputs could not be checked"])


def format_bytes(n: int) -> str:
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def tail_text(data: bytes, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last whole lines of ``data`` that fit in ``limit`` characters."""
    text = data.decode("utf-8", errors="replace").rstrip()
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    newline = cut.find("\n")
    return cut[newline + 1 :] if 0 <= newline < len(cut) - 1 else cut


def _key_file(key: str) -> str:
    if _SAFE_NAME.match(key):
        return key
    return "~" + hashlib.sha256(key.encode()).hexdigest()


def _same_process(pid: int, create_time: float | None) -> bool:
    """Is ``pid`` alive and the process we recorded (not a reuse of its pid)?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except psutil.Error:
        return False


def _launcher_runs(attempt_dir: Path) -> bool:
    """Does any process run the launcher of ``attempt_dir`` (see ``_start`` for its argv)?"""
    target = str(attempt_dir)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) >= 2 and cmd[-1] == target and "stowplan.providers.launcher" in cmd:
            return True
    return False


class _Started(Struct, kw_only=True):
    """Capacity held by an attempt this instance started (or found running)."""

    dir: Path
    cpus: float
    memory: int
    gpus: int
    since: float
    launcher: subprocess.Popen[bytes] | None = None
    """The launcher's short-lived parent, which exits as soon as the launcher detaches."""


class LocalProvider(Provider):
    def __init__(self, name: str, config: LocalProviderConfig, *, state_dir: Path) -> None:
        self.name = name
        self.config = config
        self._runs = Path(state_dir).absolute() / "runs"
        self._index = self._runs / ".keys"
        self._cpus = float(config.cpus or os.cpu_count() or 1)
        self._memory = (
            config.memory if isinstance(config.memory, int) else psutil.virtual_memory().total
        )
        self._gpus = config.gpus or 0
        self._host = socket.gethostname()
        me = psutil.Process()
        self._me = _Claim(pid=me.pid, create_time=me.create_time())
        self._path_prefix = str(Path(sys.executable).parent) if sys.executable else ""
        self.capabilities = Capabilities(
            gpus=self._gpus > 0,
            arrays=False,
            cannot={
                "arrays": "each trial is its own process; there is no array to batch into",
                "gpu_isolation": "GPUs are counted, not assigned: a task sees every GPU",
            },
        )
        self._dirs: dict[str, Path] = {}
        self._queue: deque[LocalRequest] = deque()
        self._queued: set[str] = set()
        self._started: dict[str, _Started] = {}
        self._finished: dict[str, Report] = {}
        self._used: dict[bytes, bytes] = {}

    # -- discover / plan -----------------------------------------------------------------------

    async def discover(self) -> list[Pool]:
        return [
            Pool(
                id=self.name,
                provider=self.name,
                kind="local",
                site=self.config.site,
                cpus=self._cpus,
                memory=self._memory,
                gpus={"unknown": self._gpus} if self._gpus else {},
                price_per_hour=0.0,
                hardware_class=f"cpu={platform.machine() or 'unknown'}",
            )
        ]

    def plan(self, launches: Sequence[LaunchSpec]) -> list[ProviderRequest]:
        return [self._plan_one(launch) for launch in launches]

    def _reject(self, launch: LaunchSpec, why: str) -> ProviderError:
        return ProviderError(f"attempt {launch.key!r}: {why}", provider=self.name, retryable=False)

    def _plan_one(self, launch: LaunchSpec) -> LocalRequest:
        if not _SAFE_NAME.match(launch.run_id):
            raise self._reject(launch, f"run id {launch.run_id!r} is not a safe directory name")
        if launch.attempt < 0:
            raise self._reject(launch, f"attempt number {launch.attempt} is negative")
        if launch.argv is not None and launch.script is None:
            if not launch.argv:
                raise self._reject(launch, "argv is empty")
            argv = list(launch.argv)
        elif launch.script is not None and launch.argv is None:
            argv = ["bash", "-euo", "pipefail", "-c", launch.script]
        else:
            raise self._reject(launch, "give exactly one of argv or script")
        if launch.gpus > 0 and not self._gpus:
            raise self._reject(
                launch, f"needs {plural(launch.gpus, 'GPU')}; this provider has none"
            )
        if launch.memory < 0:
            raise self._reject(launch, "memory is negative")
        for k, v in launch.env.items():
            if not _ENV_NAME.match(k):
                raise self._reject(launch, f"env: {k!r} is not a variable name")
            if "\0" in v:
                raise self._reject(launch, f"env: {k} contains a NUL byte")
        if any("\0" in a for a in argv):
            raise self._reject(launch, "the command contains a NUL byte")
        for fname in launch.files:
            self._check_relative(launch, "files", fname)
        for out in launch.outputs:
            self._check_relative(launch, "outputs", out)
        attempt_dir = self._runs / launch.run_id / str(launch.attempt)
        env = dict(launch.env)
        env["STOWPLAN_RUN_ID"] = launch.run_id
        env["STOWPLAN_ATTEMPT"] = str(launch.attempt)
        env["STOWPLAN_ATTEMPT_DIR"] = str(attempt_dir)
        return LocalRequest(
            key=launch.key,
            run_id=launch.run_id,
            attempt=launch.attempt,
            name=launch.name,
            attempt_dir=str(attempt_dir),
            argv=argv,
            env=env,
            path_prefix=self._path_prefix,
            cpus=launch.cpus,
            memory=launch.memory,
            gpus=launch.gpus,
            timeout_s=launch.timeout_s,
            outputs=list(launch.outputs),
            files=dict(launch.files),
        )

    def _check_relative(self, launch: LaunchSpec, what: str, name: str) -> None:
        parts = PurePosixPath(name).parts
        if (
            not name.strip()
            or "\0" in name
            or name.startswith("/")
            or ".." in parts
            or not parts
            or parts[0] in RESERVED_NAMES
        ):
            raise self._reject(
                launch,
                f"{what}: {name!r} must be a relative path inside the attempt directory, "
                f"not one of {sorted(RESERVED_NAMES)}",
            )

    # -- submit --------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        keys = []
        for req in requests:
            if not isinstance(req, LocalRequest):
                raise InternalError(
                    f"{self.name}: the local driver got a {type(req).__name__}, not a LocalRequest"
                )
            self._accept(req)
            keys.append(req.key)
        self._pump()
        return [self._describe_one(key) for key in keys]

    def _accept(self, req: LocalRequest) -> None:
        """Claim the attempt directory and queue the request; do nothing if already claimed."""
        attempt_dir = Path(req.attempt_dir)
        self._remember(req.key, attempt_dir)
        try:
            attempt_dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(attempt_dir)
        except FileExistsError:
            return
        except OSError as e:
            raise ProviderError(
                f"cannot create {attempt_dir}: {e}", provider=self.name, retryable=True
            ) from e
        try:
            for fname, data in req.files.items():
                path = attempt_dir / fname
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            spec = {
                "key": req.key,
                "argv": req.argv,
                "env": req.env,
                "path_prefix": req.path_prefix,
                "timeout_s": req.timeout_s,
                "memory_limit": req.memory,
                "outputs": req.outputs,
                "cpus": req.cpus,
                "gpus": req.gpus,
                "name": req.name,
                "claimed_by": self._me,
            }
            # The env may carry resolved secrets: readable by the owner only.
            fd = os.open(attempt_dir / SPEC_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(spec))
        except OSError as e:
            try:
                self._write_exit(attempt_dir, "launcher_error", f"cannot prepare the attempt: {e}")
            except OSError:
                raise ProviderError(
                    f"cannot prepare {attempt_dir}: {e}", provider=self.name, retryable=True
                ) from e
            return
        self._queue.append(req)
        self._queued.add(req.key)

    def _remember(self, key: str, attempt_dir: Path) -> None:
        """Write the key index entry (before the claim) and check it names this attempt."""
        known = self._dir_for(key)
        if known is not None:
            if known != attempt_dir:
                raise ProviderError(
                    f"key {key!r} already names attempt {known}, not {attempt_dir}",
                    provider=self.name,
                    retryable=False,
                )
            return
        try:
            stored = str(attempt_dir.relative_to(self._runs))
        except ValueError:
            stored = str(attempt_dir)
        self._index.mkdir(parents=True, exist_ok=True)
        entry = self._index / _key_file(key)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(stored + "\n", encoding="utf-8")
        os.replace(tmp, entry)
        self._dirs[key] = attempt_dir

    def _dir_for(self, key: str) -> Path | None:
        known = self._dirs.get(key)
        if known is not None:
            return known
        try:
            stored = (self._index / _key_file(key)).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        attempt_dir = self._runs / stored
        self._dirs[key] = attempt_dir
        return attempt_dir

    # -- the FIFO and capacity -----------------------------------------------------------------

    def _pump(self) -> None:
        """Release capacity of ended attempts, then start queued ones in order while they fit."""
        for key, held in list(self._started.items()):
            if held.launcher is not None:
                code = held.launcher.poll()  # reaps it once it has detached
                if code and not (held.dir / EXIT_FILE).exists():
                    # It failed before detaching (it forks first), so nothing else will write.
                    self._write_exit(
                        held.dir,
                        "launcher_error",
                        f"exited with code {code} before starting the task; "
                        f"see {held.dir / LAUNCHER_LOG}",
                    )
            if (held.dir / EXIT_FILE).exists() or not self._supervised(held):
                del self._started[key]
        while self._queue:
            req = self._queue[0]
            attempt_dir = Path(req.attempt_dir)
            if (attempt_dir / EXIT_FILE).exists():  # cancelled by another instance
                self._queue.popleft()
                self._queued.discard(req.key)
                continue
            if self._started and not self._fits(req):
                break
            self._queue.popleft()
            self._queued.discard(req.key)
            self._start(req)

    def _supervised(self, held: _Started) -> bool:
        if held.launcher is not None:
            code = held.launcher.poll()
            if code is None:
                return True  # still detaching
            if code != 0:
                return False  # failed before it could supervise anything
        rec = self._read_launcher(held.dir)
        if rec is None:  # detached, not yet recorded
            return time.time() - held.since < QUEUED_GRACE_S
        return _same_process(rec.pid, rec.create_time)

    def _fits(self, req: LocalRequest) -> bool:
        cpus = sum(h.cpus for h in self._started.values()) + req.cpus
        memory = sum(h.memory for h in self._started.values()) + req.memory
        gpus = sum(h.gpus for h in self._started.values()) + req.gpus
        return cpus <= self._cpus + 1e-9 and memory <= self._memory and gpus <= self._gpus

    def _start(self, req: LocalRequest) -> None:
        attempt_dir = Path(req.attempt_dir)
        try:
            # NOTE: created exclusively: the one start of this attempt, whichever instance of
            # the driver (in whichever process) got here first; the others start nothing.
            with open(attempt_dir / LAUNCHER_LOG, "xb") as log:
                # NOTE: cwd is the package's import root, never the attempt directory: `-m`
                # puts cwd first on sys.path, and a task's files (a `json.py`, say) must not
                # shadow what the launcher imports. It also finds an uninstalled checkout.
                launcher = subprocess.Popen(
                    [sys.executable, "-m", "stowplan.providers.launcher", str(attempt_dir)],
                    cwd=_IMPORT_ROOT,
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    close_fds=True,
                )
        except FileExistsError:
            return
        except OSError as e:
            self._write_exit(attempt_dir, "launcher_error", f"cannot start the supervisor: {e}")
            return
        self._started[req.key] = _Started(
            dir=attempt_dir,
            cpus=req.cpus,
            memory=req.memory,
            gpus=req.gpus,
            since=time.time(),
            launcher=launcher,
        )

    def _adopt(self, key: str, attempt_dir: Path) -> None:
        """Count a running attempt that an earlier instance started against our capacity."""
        if key in self._started:
            return
        try:
            spec = msgspec.json.decode((attempt_dir / SPEC_FILE).read_bytes())
            cpus, memory, gpus = float(spec["cpus"]), int(spec["memory_limit"]), int(spec["gpus"])
        except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError):
            return
        self._started[key] = _Started(
            dir=attempt_dir, cpus=cpus, memory=memory, gpus=gpus, since=time.time()
        )

    # -- describe ------------------------------------------------------------------------------

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        self._pump()
        return [self._describe_one(key) for key in keys]

    def _describe_one(self, key: str) -> Report:
        cached = self._finished.get(key)
        if cached is not None:
            return cached
        attempt_dir = self._dir_for(key)
        if attempt_dir is None:
            return Report(key=key, state=ProviderState.UNKNOWN)
        ended = self._ended(key, attempt_dir)
        if ended is not None:
            return ended
        rec = self._read_launcher(attempt_dir)
        if rec is not None:
            if _same_process(rec.pid, rec.create_time):
                self._adopt(key, attempt_dir)
                return Report(
                    key=key,
                    state=ProviderState.RUNNING,
                    job_id=str(rec.pid),
                    node=self._host,
                    started_at=rec.started_at,
                )
            ended = self._ended(key, attempt_dir)  # it may have finished just now
            if ended is not None:
                return ended
            message = f"supervisor (pid {rec.pid}) died without recording how the attempt ended"
            if rec.child_pid is not None and _same_process(rec.child_pid, rec.child_create_time):
                message += f"; its task (pid {rec.child_pid}) still runs: cancel it to stop it"
            return self._report(key, ProviderState.FAILED, FailureClass.NODE_FAILURE, message, rec)
        if not attempt_dir.exists():
            return Report(key=key, state=ProviderState.UNKNOWN)
        if key in self._queued:
            return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        held = self._started.get(key)
        if held is None:
            queued_by = self._reclaim(key, attempt_dir)
            if queued_by is not None:
                if queued_by == "us":
                    self._pump()
                return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        try:
            # Dequeued by us: the age of the start; otherwise the age of the claim.
            since = held.since if held is not None else attempt_dir.stat().st_mtime
        except FileNotFoundError:
            return Report(key=key, state=ProviderState.UNKNOWN)
        age = time.time() - since
        if age < QUEUED_GRACE_S:
            return Report(key=key, state=ProviderState.QUEUED, node=self._host)
        return self._report(
            key,
            ProviderState.FAILED,
            FailureClass.LOST,
            f"no supervisor recorded itself in {age:.0f} s (the driver that queued it went "
            "away, or its start failed)",
        )

    def _reclaim(self, key: str, attempt_dir: Path) -> Literal["us", "other"] | None:
        """Who holds a claimed attempt without a supervisor, taking it into our queue when its
        claimer is dead: ``"us"`` then, ``"other"`` while another live process holds it, and
        None when that is not known (no claimer recorded, this process, or a start that may
        still be under way)."""
        if (attempt_dir / EXIT_FILE).exists():
            return None
        try:
            spec = _spec_decoder.decode((attempt_dir / SPEC_FILE).read_bytes())
            run_id, attempt = attempt_dir.parent.name, int(attempt_dir.name)
        except (OSError, msgspec.DecodeError, ValueError):
            return None
        claim = spec.claimed_by
        if claim is None or claim == self._me or spec.key != key:
            return None
        if _same_process(claim.pid, claim.create_time):
            return "other"
        log = attempt_dir / LAUNCHER_LOG
        try:
            begun = log.stat().st_mtime
        except FileNotFoundError:
            begun = None
        if begun is not None:
            # NOTE: the claimer died while starting it. Ray kills a worker's children with it,
            # so the launcher's first process (a child until it detaches) may have died too;
            # one that lives shows its command line. Start it again only when none does.
            if time.time() - begun < START_GRACE_S or _launcher_runs(attempt_dir):
                return None
            try:  # one instance moves the spent start aside; the start is again exclusive
                os.rename(log, attempt_dir / f"{LAUNCHER_LOG}.{int(begun * 1000)}")
            except FileNotFoundError:
                return None
        self._queue.append(
            LocalRequest(
                key=key,
                run_id=run_id,
                attempt=attempt,
                name=spec.name,
                attempt_dir=str(attempt_dir),
                argv=spec.argv,
                env=spec.env,
                path_prefix=spec.path_prefix,
                cpus=spec.cpus,
                memory=spec.memory_limit,
                gpus=spec.gpus,
                timeout_s=spec.timeout_s,
                outputs=spec.outputs,
            )
        )
        self._queued.add(key)
        return "us"

    def _report(
        self,
        key: str,
        state: ProviderState,
        failure: FailureClass | None,
        message: str,
        rec: LauncherRecord | None = None,
    ) -> Report:
        return Report(
            key=key,
            state=state,
            failure=failure,
            message=message,
            job_id=None if rec is None else str(rec.pid),
            node=self._host,
            started_at=None if rec is None else rec.started_at,
        )

    def _ended(self, key: str, attempt_dir: Path) -> Report | None:
        """The terminal report from ``exit.json``, cached; ``None`` while there is none."""
        try:
            raw = (attempt_dir / EXIT_FILE).read_bytes()
        except FileNotFoundError:
            return None
        rec = self._read_launcher(attempt_dir)
        try:
            info = _exit_decoder.decode(raw)
        except msgspec.DecodeError as e:
            return self._report(
                key, ProviderState.FAILED, FailureClass.NODE_FAILURE, f"unreadable exit.json: {e}"
            )
        tail = ""
        if info.reason == "exited" and info.exit_code != 0:
            tail = self._stderr_tail(attempt_dir)
        state, failure, message = classify_exit(info, stderr_tail=tail)
        outputs: dict[str, str] = {}
        if state is ProviderState.SUCCEEDED:
            # Checked again here, with the launcher's rule: what is reported is exactly what
            # may be stored (files inside the attempt directory, directories expanded), and a
            # run whose outputs cannot all be stored does not succeed.
            scan = scan_outputs(attempt_dir, self._declared_outputs(attempt_dir))
            if scan.missing or scan.refused:
                info = msgspec.structs.replace(
                    info, reason="bad_output", missing=scan.missing, refused=scan.refused
                )
                state, failure, message = classify_exit(info)
            else:
                outputs = {name: str(path) for name, path in scan.files.items()}
        report = Report(
            key=key,
            state=state,
            failure=failure,
            message=message,
            job_id=None if rec is None else str(rec.pid),
            node=self._host,
            exit_code=info.exit_code,
            started_at=info.started_at,
            ended_at=info.ended_at,
            outputs=outputs,
            used=self._used_record(attempt_dir),
        )
        self._finished[key] = report
        return report

    def _used_record(self, attempt_dir: Path) -> bytes | None:
        """What the attempt's Python processes imported (the launcher's import hook wrote it
        beside the attempt), encoded once; equal records share one object in memory."""
        from stowplan.provenance.imports import read_used

        rec = read_used(attempt_dir / USED_FILE)
        if rec is None:
            return None
        data = msgspec.json.encode(rec)
        return self._used.setdefault(data, data)

    def _declared_outputs(self, attempt_dir: Path) -> list[str]:
        try:
            spec = msgspec.json.decode((attempt_dir / SPEC_FILE).read_bytes())
            return [str(o) for o in spec.get("outputs", [])]
        except (OSError, msgspec.DecodeError, AttributeError):
            return []

    def _stderr_tail(self, attempt_dir: Path) -> str:
        try:
            with open(attempt_dir / STDERR_FILE, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4 * STDERR_TAIL_CHARS))
                return tail_text(f.read())
        except OSError:
            return ""

    def _read_launcher(self, attempt_dir: Path) -> LauncherRecord | None:
        try:
            return _launcher_decoder.decode((attempt_dir / LAUNCHER_FILE).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def _write_exit(self, attempt_dir: Path, reason: str, message: str) -> None:
        write_json_atomic(
            attempt_dir / EXIT_FILE,
            {"reason": reason, "message": message, "ended_at": time.time(), "peak_rss": 0},
        )

    # -- cancel --------------------------------------------------------------------------------

    async def cancel(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._cancel_one(key)
        self._pump()

    def _cancel_one(self, key: str) -> None:
        if key in self._finished:
            return
        attempt_dir = self._dir_for(key)
        if attempt_dir is None or not attempt_dir.exists():
            return
        if (attempt_dir / EXIT_FILE).exists():
            return
        if key in self._queued:
            self._queued.discard(key)
            self._queue = deque(r for r in self._queue if r.key != key)
            self._write_exit(attempt_dir, "cancelled", "cancelled before it started")
            return
        rec = self._read_launcher(attempt_dir)
        if rec is None:
            # Claimed but not supervised yet: its launcher is starting, or another instance
            # holds it queued. Record the cancel first, then look again for a launcher: one
            # that starts after this sees exit.json and runs nothing (see launcher.py).
            self._write_exit(attempt_dir, "cancelled", "cancelled before it started")
            rec = self._read_launcher(attempt_dir)
            if rec is None:
                return
        if _same_process(rec.pid, rec.create_time):
            # The launcher stops the task's processes and records the cancel.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rec.pid, signal.SIGTERM)
        elif rec.child_pid is not None and _same_process(rec.child_pid, rec.child_create_time):
            # The supervisor died and left its task running: stop the task's process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.child_pid, signal.SIGKILL)

    # -- logs ----------------------------------------------------------------------------------

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        attempt_dir = self._dir_for(key)
        if attempt_dir is None:
            raise ProviderError(f"no attempt with key {key!r}", provider=self.name, retryable=False)
        path = attempt_dir / (STDOUT_FILE if stream == "stdout" else STDERR_FILE)
        f = None
        try:
            while True:
                # Decide before reading, so the last read after the end drains the file.
                done = not follow or self._describe_one(key).state in TERMINAL_PROVIDER_STATES
                if f is None:
                    with contextlib.suppress(FileNotFoundError):
                        f = open(path, "rb")  # noqa: SIM115 (kept open across polls)
                if f is not None:
                    while chunk := f.read(1 << 16):
                        yield chunk
                if done:
                    return
                self._pump()
                await anyio.sleep(LOG_POLL_S)
        finally:
            if f is not None:
                f.close()

    async def aclose(self) -> None:
        """Reap finished supervisors. Running attempts go on; queued ones are never started."""
        for held in self._started.values():
            if held.launcher is not None:
                held.launcher.poll()
