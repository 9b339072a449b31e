"""The local driver's plan: a launch checked and rendered into the exact process it will run.
Pure: nothing here touches the disk (``plan()`` and ``--dry-run`` print what ``submit`` starts)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

from msgspec import field

from stowplan.errors import ProviderError
from stowplan.providers.base import LaunchSpec, SingleRequest, command_of, request_name
from stowplan.providers.launcher import RESERVED_NAMES
from stowplan.spec.units import plural

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
"""A name used as one path component as it is (run ids; keys, else hashed)."""


class LocalRequest(SingleRequest, frozen=True, kw_only=True):
    """Exactly what the local driver will run: a process with this argv, env and directory."""

    run_id: str
    attempt: int
    task: str
    attempt_dir: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Added to the stowplan process's environment (STOWPLAN_* included)."""
    path_prefix: str = ""
    """Prepended to PATH, so ``python`` is the interpreter running stowplan."""
    cpus: float = 1.0
    memory: int = 1 << 30
    gpus: int = 0
    gpu_milli: int = 1000
    """thousandths of each GPU: below 1000, a share of its one leased device."""
    timeout_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    devices: tuple[int, ...] | None = None
    """the GPU indices the core leased it (``CUDA_VISIBLE_DEVICES``); None: no lease."""

    def gpu_text(self) -> str:
        """``2``, or ``0.25`` for a share of one GPU."""
        return f"{self.gpu_milli / 1000:g}" if self.gpus == 1 else str(self.gpus)

    def render(self) -> str:
        timeout = "none" if self.timeout_s is None else f"{self.timeout_s:g}s"
        lines = [
            f"# local attempt {self.key}: task {self.task}, run {self.run_id}, "
            f"attempt {self.attempt}",
            f"# needs cpus={self.cpus:g} memory={format_bytes(self.memory)} gpus={self.gpu_text()} "
            f"timeout={timeout} (killed above its memory or past its timeout)",
        ]
        if self.outputs:
            lines.append(f"# outputs: {shlex.join(self.outputs)}")
        for fname in sorted(self.files):
            lines.append(f"# writes file {shlex.quote(fname)} ({len(self.files[fname])} bytes)")
        env = dict(self.env)
        if self.devices is not None:  # the lease wins over the task's own value
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.devices)
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


def format_bytes(n: int) -> str:
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _reject(provider: str, launch: LaunchSpec, why: str) -> ProviderError:
    return ProviderError(f"attempt {launch.key!r}: {why}", provider=provider, retryable=False)


def plan_one(
    launch: LaunchSpec, *, provider: str, runs: Path, path_prefix: str, has_gpus: bool
) -> LocalRequest:
    """Check ``launch`` and render it to run in ``runs/<run_id>/<attempt>``; pure."""
    if not SAFE_NAME.match(launch.run_id):
        raise _reject(provider, launch, f"run id {launch.run_id!r} is not a safe directory name")
    try:
        argv = command_of(launch)
    except ValueError as e:
        raise _reject(provider, launch, str(e)) from None
    if launch.gpus > 0 and not has_gpus:
        raise _reject(
            provider, launch, f"needs {plural(launch.gpus, 'GPU')}; this provider has none"
        )
    if launch.memory < 0:
        raise _reject(provider, launch, "memory is negative")
    if launch.image is not None:
        raise _reject(
            provider, launch, f"names image {launch.image!r}; this provider runs no containers"
        )
    if launch.secrets:
        raise _reject(provider, launch, "names secrets; this provider has no secret store")
    for fname in launch.files:
        _check_relative(provider, launch, "files", fname)
    for out in launch.outputs:
        _check_relative(provider, launch, "outputs", out)
    attempt_dir = runs / launch.run_id / str(launch.attempt)
    env = dict(launch.env)
    env["STOWPLAN_RUN_ID"] = launch.run_id
    env["STOWPLAN_ATTEMPT"] = str(launch.attempt)
    env["STOWPLAN_ATTEMPT_DIR"] = str(attempt_dir)
    devices = launch.lease.devices if launch.lease is not None else None
    return LocalRequest(
        keys=(launch.key,),
        name=request_name([launch.key]),
        run_id=launch.run_id,
        attempt=launch.attempt,
        task=launch.name,
        attempt_dir=str(attempt_dir),
        argv=argv,
        env=env,
        path_prefix=path_prefix,
        cpus=launch.cpus,
        memory=launch.memory,
        gpus=launch.gpus,
        gpu_milli=launch.gpu_milli if launch.gpus == 1 else 1000,
        timeout_s=launch.timeout_s,
        outputs=list(launch.outputs),
        files=dict(launch.files),
        devices=devices,
    )


def _check_relative(provider: str, launch: LaunchSpec, what: str, name: str) -> None:
    parts = PurePosixPath(name).parts
    if (
        not name.strip()
        or "\0" in name
        or name.startswith("/")
        or ".." in parts
        or not parts
        or parts[0] in RESERVED_NAMES
    ):
        raise _reject(
            provider,
            launch,
            f"{what}: {name!r} must be a relative path inside the attempt directory, "
            f"not one of {sorted(RESERVED_NAMES)}",
        )
