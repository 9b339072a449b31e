"""How the Slurm driver reaches a cluster: the transports behind one small interface.

``SSHBackend`` runs Slurm's commands on the login node (``ssh.py``); ``RestBackend``
(``rest.py``) talks to slurmrestd. The driver keeps the key index, the finished reports and
the mapping to reports; a backend only finds, submits, observes, cancels and reads, each once
(no retries: the command shell retries a retryable ``ProviderError``).
"""

from __future__ import annotations

import abc
import hashlib
import shlex
from collections.abc import Callable, Mapping, Sequence

from stowplan.errors import ProviderError
from stowplan.providers.slurm.parse import (
    SACCT_FORMAT,
    SECTION,
    SQUEUE_FORMAT,
    JobRow,
    PartitionFacts,
    cluster_name,
    parse_end_records,
    parse_key_lines,
    parse_partitions,
    parse_pending,
    parse_sacct,
    parse_scheduler,
    parse_squeue,
    split_sections,
)
from stowplan.providers.slurm.render import BRANCH, ELEMENTS_DIR, KEY_LINE, SlurmRequest
from stowplan.providers.slurm.ssh import COMMAND_TIMEOUT_S, Completed, SSHTransport

EXIT_REJECTED, EXIT_TRANSIENT = 65, 75
TRIED = "tried"
"""In an array directory: a submit of it reached sbatch (or was about to)."""
TRANSIENT_MESSAGES = (
    "Socket timed out",
    "Unable to contact slurm controller",
    "temporarily unable",
    "Resource temporarily unavailable",
    "Zero Bytes were transmitted",
    "Connection refused",
)

KeyInfo = tuple[str, int, str, int, list[str]]
"""array name, index, run id, attempt, declared outputs."""


class Backend(abc.ABC):
    """One cluster's transport. Every method may raise ``ProviderError``."""

    provider: str
    _connects: int = 0
    locked_submit: bool = False
    """Whether ``submit`` itself is safe to repeat (it looks the name up under a lock)."""

    @property
    def connects(self) -> int:
        """Connections opened so far (a diagnostic: a dropped one is replaced)."""
        return self._connects

    @property
    def commands(self) -> int:
        """Remote commands (or requests) started so far, every try counted."""
        return 0

    @abc.abstractmethod
    async def discover(
        self, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        """Cluster name, partitions, pending CPU-seconds by partition (of jobs whose name
        ``ours`` does not claim: the core counts its own queued work as leases)."""

    @abc.abstractmethod
    async def find(self, name: str, job_dir: str) -> str | None:
        """The job id of the array named ``name`` (written under ``job_dir``), live or
        accounted, if there is one. A submit of it still in progress is waited for where the
        backend can (the SSH submit program's lock)."""

    @abc.abstractmethod
    async def submit(self, req: SlurmRequest, *, first: bool = False) -> str:
        """Submit the array; its job id. ``ProviderError`` with ``retryable`` on failure.
        ``first``: the driver never tried this request before (a backend may then skip
        looking for an earlier submit of it where its own records agree)."""

    reads_files: bool = False
    """Whether ``observe`` reads the elements' end records (``render.END_SUFFIX``)."""

    @abc.abstractmethod
    async def observe(
        self,
        names: Sequence[str],
        since_days: int,
        elements: Sequence[str] = (),
        *,
        end_files: Mapping[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> tuple[list[JobRow], ...]:
        """(live rows from the controller, accounting rows, rows from end records) for jobs
        with these names. ``elements``: the element ids (``JOB_INDEX``) the caller waits on;
        a backend may skip accounting while every one of them is still pending or running in
        the queue or has its end record (none given: accounting is always read).
        ``end_files``: element id -> the path of its end record, read where ``reads_files``;
        ``wait_s``: how long to wait, at most, until every element waited on has one (the
        queue is then not asked at all)."""

    @abc.abstractmethod
    async def lookup(
        self, workdir: str, keys: Sequence[str]
    ) -> tuple[dict[str, KeyInfo], dict[str, str]]:
        """Attempt keys found in job scripts on the cluster, and array name -> job id."""

    @abc.abstractmethod
    async def cancel(self, element_ids: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def read_file(self, path: str, offset: int) -> bytes | None: ...

    async def aclose(self) -> None:
        return None


# The remote submit program. $1: the array directory, $2: the job name, $3: the script's
# SHA-256, $4: "first" when the driver never tried this request before; the script on stdin.
SUBMIT_PROGRAM = rf"""
set -eu
d=$1; name=$2
mkdir -p -- "$d/logs"
w=${{d%/jobs/*}}; w=$(cd -- "${{w:-/}}" && pwd)
cd -- "$d"
exec 9>>.lock
flock -w 100 9 || {{ echo "stowplan: $d is locked by another submit" >&2; exit 75; }}
cat > job.sh.tmp
if [ -s jobid ]; then cat jobid; exit 0; fi
# a connection lost mid-upload leaves a truncated script: never submit one
sum=$(sha256sum < job.sh.tmp) && [ "${{sum%% *}}" = "$3" ] || {{
  echo "stowplan: the job script arrived incomplete" >&2; exit 75; }}
here=$(pwd -P)
# {TRIED} is written (under the lock) before sbatch is: where it is missing and the driver
# never tried this request, no sbatch of it ever ran, and the queue need not be asked
if [ -e {TRIED} ] || [ "${{4:-}}" != first ]; then
  if ! q=$(squeue -h --me --name="$name" -o '%F|%Z' 2>sq.err); then
    cat sq.err >&2; exit 75
  fi
  a=$(sacct -X -n -P --name="$name" -S now-60days -o JobID,WorkDir 2>/dev/null || true)
  # only a job of this user started from this very directory is this request's (the same
  # keys in another project or workdir name another job)
  found=$(printf '%s\n%s\n' "$q" "$a" | awk -F'|' -v d="$here" '
    $2 == d {{ sub(/_.*/, "", $1); if ($1 ~ /^[0-9]+$/) {{ print $1; exit }} }}')
  if [ -n "$found" ]; then printf '%s\n' "$found" > jobid; cat jobid; exit 0; fi
fi
mv job.sh.tmp job.sh
# every element's lines in a file of its own, and every attempt directory made now (in one
# process): an element sources its file and runs (render.py)
rm -rf -- {ELEMENTS_DIR}; mkdir -- {ELEMENTS_DIR}
awk -v e={ELEMENTS_DIR} '/^{BRANCH} [0-9]+$/ {{ if (f != "") close(f); f = e "/" $2; next }}
  f != "" {{ print > f }}' job.sh
awk '/^set -u$/ {{ exit }} $1 == "#" && $2 == "{KEY_LINE[2:]}" {{ print "runs/" $5 "/" $6 }}' \
  job.sh | (cd -- "$w" && xargs -r mkdir -p --) || true
# sbatch is given a stub: the #SBATCH lines, where the elements are, and the common part of
# job.sh, so slurmctld stores and sends each element about a kilobyte, not every element's
# lines
{{ sed -n '1,/^set -u$/{{/^#!/p;/^#SBATCH /p}}' job.sh
  printf 'STOWPLAN_ELEMENTS=%q\n' "$here/{ELEMENTS_DIR}"
  sed -n '/^set -u$/,/^exit "\$rc"$/p' job.sh; }} > submit.sh
: > {TRIED}
if ! out=$(sbatch --parsable submit.sh 2>sbatch.err); then cat sbatch.err >&2; exit 65; fi
printf '%s\n' "${{out%%;*}}" > jobid.tmp
mv jobid.tmp jobid
cat jobid
"""

# $1: the array directory, $2: the job name. Waits for a submit of it still in progress (its
# lock), then prints the job id if the array was submitted (nothing otherwise).
FIND_PROGRAM = r"""
set -eu
d=$1; name=$2
# no directory: no submit of this request ever ran here (the submit makes it first)
[ -d "$d" ] || exit 0
cd -- "$d"
exec 9>>.lock
flock -w 100 9 || { echo "stowplan: $d is locked by another submit" >&2; exit 75; }
if [ -s jobid ]; then cat jobid; exit 0; fi
here=$(pwd -P)
if ! q=$(squeue -h --me --name="$name" -o '%F|%Z' 2>&1); then printf '%s\n' "$q" >&2; exit 75; fi
a=$(sacct -X -n -P --name="$name" -S now-60days -o JobID,WorkDir 2>/dev/null || true)
printf '%s\n%s\n' "$q" "$a" | awk -F'|' -v d="$here" '
  $2 == d { sub(/_.*/, "", $1); if ($1 ~ /^[0-9]+$/) { print $1; exit } }'
"""

# $1: workdir; keys on stdin. Prints the key lines of job scripts, then every known job id.
LOOKUP_PROGRAM = rf"""
cd -- "$1" 2>/dev/null && cd jobs 2>/dev/null || exit 0
grep -H -F -f - -- */job.sh 2>/dev/null | grep -F ':# stowplan-key ' || true
echo '{SECTION}'
grep -H . -- */jobid 2>/dev/null || true
"""

# $1: comma-separated job names, $2: sacct start, $3: how many fifths of a second to wait, at
# most, until every element waited on has its end record. On stdin, one line per element
# waited on: its id (``JOB_INDEX``), a tab, and its end record's path (empty: none).
# Prints the end records found (``JOB_INDEX|rc|start|end|node``); then, unless every element
# waited on has one, squeue (which must answer), and sacct (which may be disabled) only when
# an element without an end record is no longer pending or running in the queue, or when no
# elements were given.
DESCRIBE_PROGRAM = rf"""
want=$(cat)
ended=
scan() {{
  open=
  while IFS=$'\t' read -r id f; do
    [ -n "$id" ] || continue
    line=
    if [ -n "$f" ] && [ -s "$f" ]; then IFS= read -r line < "$f" || :; fi
    if [ -n "$line" ]; then ended+="$id|$line"$'\n'; else open+="$id"$'\t'"$f"$'\n'; fi
  done <<< "$1"
}}
scan "$want"
n=0
while [ -n "$open" ] && [ "$n" -lt "${{3:-0}}" ]; do sleep 0.2; n=$((n + 1)); scan "$open"; done
printf '%s' "$ended"
echo '{SECTION}'
[ -z "$want" ] || [ -n "$open" ] || exit 0
q=$(squeue -h -r --me --name="$1" -o '{SQUEUE_FORMAT}') || exit 75
printf '%s\n' "$q"
echo '{SECTION}'
gone=$( {{ printf '%s' "$open"; echo '{SECTION}'; printf '%s\n' "$q"; }} | awk -F'|' '
  !sep && $0 == "{SECTION}" {{ sep = 1; next }}
  !sep {{ sub(/\t.*/, ""); if ($0 != "") want[$0] = 1; next }}
  $5 == "PENDING" || $5 == "RUNNING" || $5 == "CONFIGURING" {{ delete want[$1 "_" $2] }}
  END {{ n = 0; for (k in want) n++; print n }}')
if [ -z "$want" ] || [ "$gone" != 0 ]; then
  sacct -X -n -P --name="$1" -S "$2" --format='{SACCT_FORMAT}' 2>/dev/null || true
fi
"""
WAIT_STEP_S = 0.2
"""How often the describe program looks for end records while it waits."""

DISCOVER_PROGRAM = rf"""
scontrol show config | grep -E '^(ClusterName|SchedulerType|SchedulerParameters|MaxJobCount) ' \
  || true
echo '{SECTION}'
scontrol -o show partition || exit 75
echo '{SECTION}'
scontrol -o show node || exit 75
echo '{SECTION}'
squeue -h -r -o '%P|%C|%l|%t|%j' || true
"""


class SSHBackend(Backend):
    """Slurm's commands on the login node. Each call is ONE remote command line built from
    quoted words; multi-step work runs as a fixed bash program with user data as ``$1..``."""

    locked_submit = True
    reads_files = True

    def __init__(self, provider: str, transport: SSHTransport, env: dict[str, str]) -> None:
        self.provider = provider
        self.transport = transport
        self.env = env

    @property
    def connects(self) -> int:
        return self.transport.connects

    @property
    def commands(self) -> int:
        return self.transport.commands

    def command(self, argv: Sequence[str]) -> str:
        env = [f"{k}={v}" for k, v in sorted(self.env.items())]
        return shlex.join(["env", *env, *argv] if env else list(argv))

    def program(self, program: str, *args: str) -> str:
        return self.command(["bash", "-c", program, "stowplan", *args])

    def _error(self, what: str, res: Completed, *, retryable: bool = True) -> ProviderError:
        why = (res.stderr.strip() or res.stdout.strip() or f"exit {res.rc}")[-2000:]
        return ProviderError(f"{what}: {why}", provider=self.provider, retryable=retryable)

    async def discover(
        self, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        res = await self.transport.run(self.program(DISCOVER_PROGRAM), repeatable=True)
        sections = split_sections(res.stdout)
        if res.rc != 0 or len(sections) != 4:
            raise self._error("cannot read partitions", res)
        config, partitions, nodes, queue = sections
        jobs = str(sum(1 for line in queue.splitlines() if line.strip()))
        return (
            cluster_name(config),
            parse_partitions(partitions, nodes, parse_scheduler(config, jobs)),
            parse_pending(queue, ours),
        )

    async def find(self, name: str, job_dir: str) -> str | None:
        res = await self.transport.run(self.program(FIND_PROGRAM, job_dir, name), repeatable=True)
        if res.rc != 0:
            raise self._error("cannot look the job up", res)
        job_id = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        return job_id if job_id.isdigit() else None

    async def submit(self, req: SlurmRequest, *, first: bool = False) -> str:
        digest = hashlib.sha256(req.script.encode()).hexdigest()
        # safe to repeat: the program finds a job submitted by an earlier try
        res = await self.transport.run(
            self.program(
                SUBMIT_PROGRAM, req.job_dir, req.name, digest, "first" if first else "again"
            ),
            stdin=req.script,
            repeatable=True,
        )
        job_id = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        if res.rc == 0 and job_id.isdigit():
            return job_id
        why = res.stderr.strip() or res.stdout.strip()
        rejected = res.rc == EXIT_REJECTED and not any(t in why for t in TRANSIENT_MESSAGES)
        raise self._error(
            "sbatch refused the job" if rejected else "submit", res, retryable=not rejected
        )

    async def observe(
        self,
        names: Sequence[str],
        since_days: int,
        elements: Sequence[str] = (),
        *,
        end_files: Mapping[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> tuple[list[JobRow], ...]:
        ends = end_files or {}
        lines = []
        for e in elements:
            f = ends.get(e, "")
            lines.append(f"{e}\t{f if f.isprintable() else ''}\n")
        steps = max(0, int(wait_s / WAIT_STEP_S)) if ends else 0
        res = await self.transport.run(
            self.program(DESCRIBE_PROGRAM, ",".join(names), f"now-{since_days}days", str(steps)),
            stdin="".join(lines),
            timeout=COMMAND_TIMEOUT_S + steps * WAIT_STEP_S,
            repeatable=True,
        )
        if res.rc != 0:
            raise self._error("squeue failed", res)
        sections = split_sections(res.stdout)
        ended = parse_end_records(sections[0])
        live = parse_squeue(sections[1]) if len(sections) > 1 else []
        accounted = parse_sacct(sections[2]) if len(sections) > 2 else []
        return live, accounted, ended

    async def lookup(
        self, workdir: str, keys: Sequence[str]
    ) -> tuple[dict[str, KeyInfo], dict[str, str]]:
        res = await self.transport.run(
            self.program(LOOKUP_PROGRAM, workdir),
            stdin="".join(k + "\n" for k in keys),
            repeatable=True,
        )
        if res.rc != 0:
            raise self._error("key lookup failed", res)
        sections = split_sections(res.stdout)
        job_ids: dict[str, str] = {}
        for line in (sections[1] if len(sections) > 1 else "").splitlines():
            path, _, jid = line.partition(":")
            if jid.strip().isdigit():
                job_ids[path.split("/")[0]] = jid.strip()
        return parse_key_lines(sections[0]), job_ids

    async def cancel(self, element_ids: Sequence[str]) -> None:
        res = await self.transport.run(self.command(["scancel", *element_ids]), repeatable=True)
        # scancel of a finished job complains and exits non-zero: cancelling is idempotent
        benign = ("already completing or completed", "Invalid job id")
        if res.rc != 0 and not any(b in res.stderr for b in benign):
            raise self._error("scancel failed", res)

    async def read_file(self, path: str, offset: int) -> bytes | None:
        return await self.transport.read_file(path, offset)

    async def aclose(self) -> None:
        await self.transport.aclose()
