"""Pure rendering of sbatch scripts: launches in, ``SlurmRequest`` (job arrays) out. No I/O.

Launches placed in the same partition with the same shape (CPUs, memory, GPUs, time limit) are
one job array; array index ``i`` runs the ``i``-th launch in key order, and the script maps the
index to that trial's directory, environment and argv: its lines follow the script's final
``exit`` behind a ``#@@ INDEX`` line, and the element runs only those (``_render``). Over SSH
the submit program splits them into one file per element and submits a stub of about a
kilobyte; each element sources its own file, runs, and writes its end record.

Every string that comes from a user (argv, environment values, file names, task names in
comments) is quoted with ``bash_quote``, which never emits a raw newline or control character:
each user string stays on its own script line, so nothing a user writes can end a comment,
start an ``#SBATCH`` line or run as a command. Job names and comments are ours: they carry the
idempotency key of the array (a hash of its attempt keys), and each attempt key is listed in a
``# stowplan-key INDEX KEY RUN_ID ATTEMPT OUTPUTS`` line (outputs as ASCII JSON), which is how
a key is found again after a restart.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shlex
from collections.abc import Sequence
from typing import Literal

from msgspec import Struct, field

from stowplan.errors import ProviderError
from stowplan.providers.base import LaunchSpec, ProviderRequest, command_of, request_name

KEY_LINE = "# stowplan-key"
BRANCH = "#@@"
"""Starts each element's lines, after the script's final ``exit``."""
ELEMENTS_DIR = "elements"
"""In the array directory (SSH): file ``I`` holds element ``I``'s lines."""
END_SUFFIX = ".end"
"""``ELEMENTS_DIR/I.end``: element ``I``'s end record ``rc|start|end|node|gpus`` (epoch
seconds; ``gpus``: the GPU indices Slurm bound, comma-separated, empty for a CPU-only array or
where Slurm named none), written by the element as it exits (not by one that was killed)."""
_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]+$")
_GPU_TYPE = re.compile(r"^[A-Za-z0-9_.-]+$")


def bash_quote(s: str) -> str:
    """Quote ``s`` as one bash word that is always a single line.

    Printable text uses POSIX single quotes (``shlex.quote``); text with control characters
    (newlines included) uses bash's ``$'...'`` with every such character escaped.
    """
    if s and _SAFE.match(s):
        return s
    if not any(ord(c) < 32 or ord(c) == 127 for c in s):
        return shlex.quote(s)
    out = []
    for c in s:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif c == "'":
            out.append("\\'")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif o < 32 or o == 127:
            out.append(f"\\x{o:02x}")
        else:
            out.append(c)
    return "$'" + "".join(out) + "'"


def format_time_limit(seconds: float) -> str:
    """``--time`` as ``D-HH:MM:SS``, rounded up to whole minutes (Slurm's granularity).

    NOTE: always explicit: Slurm reads ``"1:30"`` as 1 min 30 s while our specs read it as
    1 h 30 min, so we never pass a user's spelling through.
    """
    minutes = max(1, math.ceil(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00"


def memory_mb(memory: int) -> int:
    return max(1, math.ceil(memory / (1 << 20)))


def partition_of(pool: str) -> str | None:
    """Pool ids are ``PROVIDER/PARTITION``; a bare provider name means the default partition."""
    return pool.split("/", 1)[1] if "/" in pool else None


class SlurmMember(Struct, frozen=True, kw_only=True):
    """One attempt in a job array."""

    index: int
    key: str
    run_id: str
    attempt: int
    name: str
    attempt_dir: str
    """Relative to the login directory unless the configured workdir is absolute."""
    outputs: list[str] = field(default_factory=list)


class SlurmRequest(ProviderRequest, frozen=True, kw_only=True):
    """One sbatch submission: a job array of ``members`` (``keys`` in index order); ``name`` is
    the job name."""

    job_dir: str
    """Where the script is written and sbatch runs; logs go to ``logs/INDEX.{out,err}``."""
    partition: str | None
    members: list[SlurmMember]
    script: str

    def render(self) -> str:
        return self.script

    def log_path(self, index: int, stream: Literal["stdout", "stderr"]) -> str:
        return f"{self.job_dir}/logs/{index}.{'out' if stream == 'stdout' else 'err'}"


class Shape(Struct, frozen=True, array_like=True, order=True):
    """One array's element shape: what each of its ``nodes`` nodes gives an element."""

    pool: str
    cpus: int
    memory_mb: int
    gpus: int
    gpu_types: tuple[str, ...]
    time_s: int
    nodes: int = 1


def _reject(provider: str, launch: LaunchSpec, why: str) -> ProviderError:
    return ProviderError(f"attempt {launch.key!r}: {why}", provider=provider, retryable=False)


def _shape(launch: LaunchSpec) -> Shape:
    k = max(1, launch.nodes)  # a gang's totals, per node
    return Shape(
        pool=launch.pool,
        cpus=max(1, math.ceil(launch.cpus / k)),
        memory_mb=memory_mb(launch.memory // k),
        gpus=launch.gpus // k,
        gpu_types=tuple(sorted(launch.gpu_types)),
        time_s=0 if launch.timeout_s is None else math.ceil(launch.timeout_s),
        nodes=k,
    )


_OWN_VARS = "__sp_"
"""The prefix of the job script's own shell variables (where the element's end record goes,
when it began, the node and GPUs it was bound to)."""


def _check(provider: str, launch: LaunchSpec) -> list[str]:
    """The argv to run; raises ``ProviderError`` (not retryable) for what Slurm cannot take."""
    if not _SAFE_ID.match(launch.run_id):
        raise _reject(provider, launch, f"run id {launch.run_id!r} is not a safe directory name")
    if not _SAFE_ID.match(launch.key):
        raise _reject(provider, launch, "the idempotency key is not a safe name")
    try:
        argv = command_of(launch)
    except ValueError as e:
        raise _reject(provider, launch, str(e)) from None
    for var in [*launch.env, *launch.secrets]:
        if var.startswith(_OWN_VARS):  # else sourcing the element's lines would change them
            raise _reject(
                provider,
                launch,
                f"environment variable {var!r}: names starting with {_OWN_VARS} are the job "
                "script's own; rename it",
            )
    for path in [*launch.files, *launch.outputs]:
        parts = path.split("/")
        if not path or path.startswith("/") or ".." in parts or "\0" in path:
            raise _reject(provider, launch, f"{path!r} must be a relative path inside the attempt")
    for t in launch.gpu_types:
        if not _GPU_TYPE.match(t):
            raise _reject(provider, launch, f"GPU type {t!r} is not a Slurm GRES type name")
    part = partition_of(launch.pool)
    if part is not None and not _PARTITION.match(part):
        raise _reject(provider, launch, f"partition {part!r} is not a Slurm partition name")
    return argv


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH --name=value`` options of a script, up to its first command."""
    out: dict[str, str] = {}
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH --"):
            name, _, value = line[len("#SBATCH --") :].partition("=")
            out[name] = value
        elif line.strip() and not line.startswith("#"):
            break
    return out


def array_name(prefix: str, keys: Sequence[str]) -> str:
    """The job name of an array: derived from its attempt keys alone (``request_name``), so a
    retry renders it again and finds the job that has it."""
    return request_name(keys, prefix)


def plan_arrays(
    launches: Sequence[LaunchSpec],
    *,
    provider: str,
    workdir: str,
    prefix: str = "sp",
    max_array_size: int = 1000,
    max_concurrent: int | None = None,
    account: str | None = None,
    qos: str | None = None,
    gpu_types: dict[str, tuple[str, ...]] | None = None,
    self_logging: bool = False,
) -> list[SlurmRequest]:
    """Group launches into job arrays and render each one's script. Pure and deterministic.

    ``gpu_types`` maps a pool to the GPU types it has (from ``discover``): a launch that
    accepts several types gets the first its partition has; with none known, any GPU.
    """
    groups: dict[Shape, list[tuple[LaunchSpec, list[str]]]] = {}
    for launch in launches:
        argv = _check(provider, launch)
        groups.setdefault(_shape(launch), []).append((launch, argv))
    requests: list[SlurmRequest] = []
    for shape in sorted(groups):
        members = sorted(groups[shape], key=lambda m: m[0].key)
        for start in range(0, len(members), max_array_size):
            chunk = members[start : start + max_array_size]
            requests.append(
                _render(
                    shape,
                    chunk,
                    workdir=workdir,
                    prefix=prefix,
                    max_concurrent=max_concurrent,
                    account=account,
                    qos=qos,
                    known_types=(gpu_types or {}).get(shape.pool, ()),
                    self_logging=self_logging,
                )
            )
    return requests


# The GPU indices Slurm bound to an element of a GPU array (cons_tres picks them; sbatch
# cannot ask for given indices): SLURM_JOB_GPUS, else CUDA_VISIBLE_DEVICES (which a
# cgroup-constrained node may number from 0 instead), anything but digits and commas dropped
# (UUIDs, MIG names). They come from the environment: ``parse.parse_devices`` checks them
# again before they are believed.
_BOUND_GPUS = [
    "  __sp_g=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}",
    "  case $__sp_g in *[!0-9,]*) __sp_g= ;; esac",
]


def _gres(shape: Shape, known_types: tuple[str, ...]) -> str:
    kind = next((t for t in shape.gpu_types if t in known_types), None)
    if kind is None and len(shape.gpu_types) == 1:
        kind = shape.gpu_types[0]
    return f"gpu:{kind}:{shape.gpus}" if kind else f"gpu:{shape.gpus}"


def _render(
    shape: Shape,
    chunk: list[tuple[LaunchSpec, list[str]]],
    *,
    workdir: str,
    prefix: str,
    max_concurrent: int | None,
    account: str | None,
    qos: str | None,
    known_types: tuple[str, ...],
    self_logging: bool = False,
) -> SlurmRequest:
    keys = [launch.key for launch, _ in chunk]
    name = array_name(prefix, keys)
    job_dir = f"{workdir.rstrip('/') or '/'}/jobs/{name}"
    partition = partition_of(shape.pool)
    n = len(chunk)
    array = f"0-{n - 1}" if n > 1 else "0"
    if max_concurrent is not None and n > 1:
        array += f"%{max_concurrent}"
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --comment=stowplan:{name}",
        f"#SBATCH --array={array}",
    ]
    if partition is not None:
        head.append(f"#SBATCH --partition={partition}")
    if account is not None:
        head.append(f"#SBATCH --account={account}")
    if qos is not None:
        head.append(f"#SBATCH --qos={qos}")
    if shape.nodes > 1:
        # a gang: one task per node, each with the node's part; the script runs on the first
        # and starts the work on the others itself (srun)
        head += [f"#SBATCH --nodes={shape.nodes}", "#SBATCH --ntasks-per-node=1"]
    else:
        head += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
    head += [
        f"#SBATCH --cpus-per-task={shape.cpus}",
        f"#SBATCH --mem={shape.memory_mb}M",
    ]
    if shape.gpus:
        head.append(f"#SBATCH --gres={_gres(shape, known_types)}")
    if shape.time_s:
        head.append(f"#SBATCH --time={format_time_limit(shape.time_s)}")
    head += [
        "#SBATCH --output=logs/%a.out",
        "#SBATCH --error=logs/%a.err",
        "#SBATCH --open-mode=append",
        "#SBATCH --no-requeue",
        f"# stowplan array {name}: {n} attempt(s)",
    ]
    head += [
        f"{KEY_LINE} {i} {launch.key} {launch.run_id} {launch.attempt} "
        + json.dumps(list(launch.outputs), separators=(",", ":"))
        for i, (launch, _) in enumerate(chunk)
    ]
    # Past this line sbatch reads no more options: everything below is plain shell.
    body = [
        "set -u",
        'cd -- "$HOME" || exit 70' if not workdir.startswith("/") else ":",
    ]
    if self_logging:
        # for submitters that cannot create the log directory (slurmrestd)
        logs = bash_quote(f"{job_dir}/logs")
        index = '"${SLURM_ARRAY_TASK_ID:-0}"'
        body += [
            f"mkdir -p -- {logs} || exit 70",
            f"exec >>{logs}/{index}.out 2>>{logs}/{index}.err",
        ]
    # NOTE: bash parses a whole ``case`` before it runs a branch, so with one every element
    # parsed every element's lines (0.75 MB and about 25 ms of CPU each for 1,000 no-ops).
    # Over SSH the submit program splits the branches into one file each (``ELEMENTS_DIR``)
    # and gives sbatch a stub with ``STOWPLAN_ELEMENTS`` set: an element sources its own
    # file (no awk, no second bash). Run whole (REST, or by hand), the script cuts its own
    # lines out of itself (``$0``: slurmd's copy) with awk; bash never reads past the
    # ``exit`` that ends the common part.
    missing = 'echo "stowplan: array index ${SLURM_ARRAY_TASK_ID:-unset} has no attempt" >&2'
    body += [
        'if [ -n "${STOWPLAN_ELEMENTS:-}" ]; then',
        "  __sp_t0=${EPOCHREALTIME:-}",
        # where it runs, read before the element's own lines (which may export anything)
        "  __sp_n=${SLURMD_NODENAME:-}",
        "  case $__sp_n in *[!A-Za-z0-9._-]*) __sp_n= ;; esac",
        *(_BOUND_GPUS if shape.gpus else ["  __sp_g="]),
        '  __sp_e="$STOWPLAN_ELEMENTS/${SLURM_ARRAY_TASK_ID:-}"',
        f'  [ -f "$__sp_e" ] || {{ {missing}; exit 70; }}',
        '  . "$__sp_e" || exit 70',
        "else",
        '  branch=$(awk -v i="${SLURM_ARRAY_TASK_ID:-}" '
        f'\'f && /^{BRANCH} /{{exit}} f; $0 == "{BRANCH} " i {{f=1}}\' "$0") || exit 70',
        f'  [ -n "$branch" ] || {{ {missing}; exit 70; }}',
        '  eval "$branch"',
        "fi",
    ]
    branches: list[str] = []
    members: list[SlurmMember] = []
    for i, (launch, argv) in enumerate(chunk):
        attempt_dir = f"{workdir.rstrip('/') or '/'}/runs/{launch.run_id}/{launch.attempt}"
        members.append(
            SlurmMember(
                index=i,
                key=launch.key,
                run_id=launch.run_id,
                attempt=launch.attempt,
                name=launch.name,
                attempt_dir=attempt_dir,
                outputs=list(launch.outputs),
            )
        )
        branches.append(f"{BRANCH} {i}")
        branches.append(f"  # task {bash_quote(launch.name)}, run {launch.run_id}")
        d = bash_quote(attempt_dir)
        # the SSH submit program makes every attempt directory at once (``SUBMIT_PROGRAM``):
        # an element then runs no mkdir of its own
        branches.append(f"  __sp_d={d}")
        branches.append(
            '  cd -- "$__sp_d" 2>/dev/null || { mkdir -p -- "$__sp_d" && cd -- "$__sp_d"; } '
            "|| exit 70"
        )
        for fname in sorted(launch.files):
            data = base64.b64encode(launch.files[fname]).decode() or "''"
            target = bash_quote(fname)
            branches.append(f"  printf %s {data} | base64 -d > {target} || exit 70")
        env = {
            **launch.env,
            "STOWPLAN_RUN_ID": launch.run_id,
            "STOWPLAN_ATTEMPT": str(launch.attempt),
            "STOWPLAN_KEY": launch.key,
        }
        for k in sorted(env):
            branches.append(f"  export {k}={bash_quote(env[k])}")
        branches.append('  export STOWPLAN_ATTEMPT_DIR="$PWD"')
        branches.append(f"  outputs=({' '.join(bash_quote(o) for o in launch.outputs)})")
        branches.append("  " + " ".join(bash_quote(a) for a in argv) + " </dev/null")
        branches.append("  rc=$?")
    body += [
        # NOTE: an output that resolves outside the attempt directory (a symlink to
        # /etc/hostname, say) fails the attempt here, before anything reads it
        'if [ "$rc" -eq 0 ] && [ "${#outputs[@]}" -gt 0 ]; then',
        "  here=$(pwd -P)",
        '  for o in "${outputs[@]}"; do',
        '    if [ ! -e "$o" ]; then echo "stowplan: declared output $o is missing" >&2; rc=1',
        '    else real=$(realpath -e -- "$o") || real=/',
        '      case "$real/" in "$here"/?*) ;; *) rc=1',
        '        echo "stowplan: declared output $o leads outside the attempt directory" >&2;;',
        "      esac",
        "    fi",
        "  done",
        "fi",
        # its end record (``END_SUFFIX``), which the driver's describe reads with the queue: an
        # element seen ending here needs no sacct (bash 5 times; empty with an older bash).
        # NOTE: none for a command killed by a signal (status 128+): scancel, the time limit
        # and preemption send SIGTERM, and accounting names those ends (CANCELLED, TIMEOUT)
        'if [ -n "${STOWPLAN_ELEMENTS:-}" ] && [ "$rc" -lt 128 ]; then',
        '  printf \'%s|%s|%s|%s|%s\\n\' "$rc" "$__sp_t0" "${EPOCHREALTIME:-}" "$__sp_n" \\',
        f'    "$__sp_g" > "$__sp_e{END_SUFFIX}" 2>/dev/null || :',
        "fi",
        'exit "$rc"',
    ]
    return SlurmRequest(
        keys=tuple(keys),
        name=name,
        job_dir=job_dir,
        partition=partition,
        members=members,
        script="\n".join(head + body + branches) + "\n",
    )
