"""One attempt's directory: the key index, the claim, the records read and written there, and
who supervises it.

Layout under the project's ``.stowplan/`` (``state_dir``)::

    runs/<run_id>/<attempt>/     one attempt: spec.json, launcher.json, exit.json, logs, files
    runs/.keys/<key>             idempotency key -> attempt directory (relative to runs/)

Everything here does blocking file and process I/O: the driver calls it from a worker thread,
never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import msgspec
import psutil
from msgspec import Struct, field

from stowplan.errors import ProviderError
from stowplan.providers.base import request_name
from stowplan.providers.launcher import (
    EXIT_FILE,
    LAUNCHER_FILE,
    LAUNCHER_LOG,
    SPEC_FILE,
    STDERR_FILE,
    write_json_atomic,
)
from stowplan.providers.local.render import SAFE_NAME, LocalRequest
from stowplan.providers.local.supervisor import keeper_runs

START_GRACE_S = 5.0
"""A start begun by a driver that died since is left to finish for this long (and for as long
as its launcher runs), then made again."""
# Import root of the stowplan package: the launcher's working directory (see start_launcher).
_IMPORT_ROOT = Path(__file__).resolve().parents[3]


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


class Claim(Struct, frozen=True):
    """Who claimed an attempt directory: a process, told apart from a reuse of its pid."""

    pid: int
    create_time: float


class SpecFile(Struct, frozen=True, kw_only=True):
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
    gpu_milli: int = 1000
    name: str = ""
    devices: list[int] | None = None
    claimed_by: Claim | None = None


_spec_decoder = msgspec.json.Decoder(SpecFile)


def read_launcher(attempt_dir: Path) -> LauncherRecord | None:
    try:
        return _launcher_decoder.decode((attempt_dir / LAUNCHER_FILE).read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def read_exit(attempt_dir: Path) -> ExitRecord | msgspec.DecodeError | None:
    """``exit.json``: ``None`` while there is none, the error when it cannot be decoded."""
    try:
        raw = (attempt_dir / EXIT_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _exit_decoder.decode(raw)
    except msgspec.DecodeError as e:
        return e


def has_ended(attempt_dir: Path) -> bool:
    return (attempt_dir / EXIT_FILE).exists()


def write_exit(attempt_dir: Path, reason: str, message: str) -> None:
    write_json_atomic(
        attempt_dir / EXIT_FILE,
        {"reason": reason, "message": message, "ended_at": time.time(), "peak_rss": 0},
    )


def stderr_tail(attempt_dir: Path, chars: int) -> bytes:
    """The last ``4 * chars`` bytes of the task's stderr (``b""`` when unreadable)."""
    try:
        with open(attempt_dir / STDERR_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * chars))
            return f.read()
    except OSError:
        return b""


def declared_outputs(attempt_dir: Path) -> list[str]:
    try:
        spec = msgspec.json.decode((attempt_dir / SPEC_FILE).read_bytes())
        return [str(o) for o in spec.get("outputs", [])]
    except (OSError, msgspec.DecodeError, AttributeError):
        return []


def declared_needs(attempt_dir: Path) -> tuple[float, int, int, int] | None:
    """The CPUs, memory, GPUs and thousandths of each GPU ``spec.json`` asks for, or
    ``None`` when unreadable."""
    try:
        spec = msgspec.json.decode((attempt_dir / SPEC_FILE).read_bytes())
        milli = int(spec.get("gpu_milli", 1000))
        return float(spec["cpus"]), int(spec["memory_limit"]), int(spec["gpus"]), milli
    except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError):
        return None


# -- processes ---------------------------------------------------------------------------------


def current_claim() -> Claim:
    me = psutil.Process()
    return Claim(pid=me.pid, create_time=me.create_time())


def same_process(pid: int, create_time: float | None) -> bool:
    """Is ``pid`` alive and the process we recorded (not a reuse of its pid)?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except psutil.Error:
        return False


def launcher_runs(attempt_dir: Path) -> bool:
    """Does any process run the launcher of ``attempt_dir`` (see ``start_launcher``)?"""
    target = str(attempt_dir)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) >= 2 and cmd[-1] == target and "stowplan.providers.launcher" in cmd:
            return True
    return False


def begin_start(attempt_dir: Path) -> bool:
    """Begin the one start of an attempt: ``False`` when another start got there first."""
    try:
        # NOTE: created exclusively: the one start of this attempt, whichever instance of
        # the driver (in whichever process) got here first; the others start nothing.
        with open(attempt_dir / LAUNCHER_LOG, "xb"):
            return True
    except FileExistsError:
        return False


def start_launcher(attempt_dir: Path, *, begun: bool = False) -> subprocess.Popen[bytes] | None:
    """Start the attempt's own supervisor process; ``None`` when another start got there
    first (unless ``begun``: this caller began it), or when it could not start (recorded in
    ``exit.json``)."""
    if not begun and not begin_start(attempt_dir):
        return None
    try:
        with open(attempt_dir / LAUNCHER_LOG, "ab") as log:
            # NOTE: cwd is the package's import root, never the attempt directory: `-m`
            # puts cwd first on sys.path, and a task's files (a `json.py`, say) must not
            # shadow what the launcher imports. It also finds an uninstalled checkout.
            return subprocess.Popen(
                [sys.executable, "-m", "stowplan.providers.launcher", str(attempt_dir)],
                cwd=_IMPORT_ROOT,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                close_fds=True,
            )
    except OSError as e:
        write_exit(attempt_dir, "launcher_error", f"cannot start the supervisor: {e}")
        return None


# -- the key index and the claim -----------------------------------------------------------------


def _key_file(key: str) -> str:
    if SAFE_NAME.match(key):
        return key
    return "~" + hashlib.sha256(key.encode()).hexdigest()


class KeyIndex:
    """``runs/.keys``: which attempt directory each idempotency key names, cached once read."""

    def __init__(self, runs: Path, *, provider: str) -> None:
        self.runs = runs
        self._index = runs / ".keys"
        self._provider = provider
        self._dirs: dict[str, Path] = {}

    def remember(self, key: str, attempt_dir: Path) -> None:
        """Write the key index entry (before the claim) and check it names this attempt."""
        known = self.dir_for(key)
        if known is not None:
            if known != attempt_dir:
                raise ProviderError(
                    f"key {key!r} already names attempt {known}, not {attempt_dir}",
                    provider=self._provider,
                    retryable=False,
                )
            return
        try:
            stored = str(attempt_dir.relative_to(self.runs))
        except ValueError:
            stored = str(attempt_dir)
        self._index.mkdir(parents=True, exist_ok=True)
        entry = self._index / _key_file(key)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(stored + "\n", encoding="utf-8")
        os.replace(tmp, entry)
        self._dirs[key] = attempt_dir

    def dir_for(self, key: str) -> Path | None:
        known = self._dirs.get(key)
        if known is not None:
            return known
        try:
            stored = (self._index / _key_file(key)).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        attempt_dir = self.runs / stored
        self._dirs[key] = attempt_dir
        return attempt_dir


def claim(req: LocalRequest, me: Claim, *, provider: str) -> bool:
    """Claim the attempt directory and write what its launcher needs; ``False`` when it was
    claimed already (or could not be prepared, which ``exit.json`` then records)."""
    attempt_dir = Path(req.attempt_dir)
    try:
        attempt_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(attempt_dir)
    except FileExistsError:
        return False
    except OSError as e:
        raise ProviderError(
            f"cannot create {attempt_dir}: {e}", provider=provider, retryable=True
        ) from e
    try:
        for fname, data in req.files.items():
            path = attempt_dir / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        spec: dict[str, object] = {
            "key": req.key,
            "argv": req.argv,
            "env": req.env,
            "path_prefix": req.path_prefix,
            "timeout_s": req.timeout_s,
            "memory_limit": req.memory,
            "outputs": req.outputs,
            "cpus": req.cpus,
            "gpus": req.gpus,
            "name": req.task,
            "claimed_by": me,
        }
        if req.devices is not None:
            spec["devices"] = list(req.devices)
        if req.gpu_milli < 1000:
            spec["gpu_milli"] = req.gpu_milli
        # The env may carry resolved secrets: readable by the owner only.
        fd = os.open(attempt_dir / SPEC_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(spec))
    except OSError as e:
        try:
            write_exit(attempt_dir, "launcher_error", f"cannot prepare the attempt: {e}")
        except OSError:
            raise ProviderError(
                f"cannot prepare {attempt_dir}: {e}", provider=provider, retryable=True
            ) from e
        return False
    return True


def take_over(key: str, attempt_dir: Path, me: Claim) -> LocalRequest | Literal["other"] | None:
    """Who holds a claimed attempt without a supervisor: the request to queue when its claimer
    is dead (this instance takes it over), ``"other"`` while another live process holds it,
    and ``None`` when that is not known (no claimer recorded, this process, or a start that
    may still be under way)."""
    if has_ended(attempt_dir):
        return None
    try:
        spec = _spec_decoder.decode((attempt_dir / SPEC_FILE).read_bytes())
        run_id, attempt = attempt_dir.parent.name, int(attempt_dir.name)
    except (OSError, msgspec.DecodeError, ValueError):
        return None
    claimer = spec.claimed_by
    if claimer is None or claimer == me or spec.key != key:
        return None
    if same_process(claimer.pid, claimer.create_time):
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
        if (
            time.time() - begun < START_GRACE_S
            or keeper_runs(attempt_dir)
            or launcher_runs(attempt_dir)
        ):
            return None
        try:  # one instance moves the spent start aside; the start is again exclusive
            os.rename(log, attempt_dir / f"{LAUNCHER_LOG}.{int(begun * 1000)}")
        except FileNotFoundError:
            return None
    return LocalRequest(
        keys=(key,),
        name=request_name([key]),
        run_id=run_id,
        attempt=attempt,
        task=spec.name,
        attempt_dir=str(attempt_dir),
        argv=spec.argv,
        env=spec.env,
        path_prefix=spec.path_prefix,
        cpus=spec.cpus,
        memory=spec.memory_limit,
        gpus=spec.gpus,
        gpu_milli=spec.gpu_milli,
        timeout_s=spec.timeout_s,
        outputs=spec.outputs,
        devices=tuple(spec.devices) if spec.devices is not None else None,
    )
