"""The slurmrestd transport (OpenAPI ``v0.0.38``, Slurm 22.05) with JWT authentication.

The token is read at call time from the environment variable named by ``rest_token_env``
(default ``SLURM_JWT``, as ``scontrol token`` prints it); it is sent in a header and never
stored or logged. The job's shape is sent as JSON properties taken from the rendered script's
own ``#SBATCH`` lines (slurmrestd does not read them), so ``--dry-run`` still shows the truth.

Quirks of this API version:

- NOTE: slurmrestd cannot create directories, so the script opens its own log files (the
  request's ``self_logging`` rendering) and the job starts in ``/tmp``; ``workdir`` must be
  absolute and writable by the token's user.
- NOTE: ``/slurm/v0.0.38/jobs`` reports ``exit_code`` as a wait status (3 << 8 for exit 3);
  ``/slurmdb/v0.0.38/jobs`` reports 0 for failed array elements, so its state is used but its
  exit code only when the controller has forgotten the job.
- There is no remote lock: a submit retried after a lost answer looks the job name up first
  (live jobs, then accounting), which covers a lost answer but not two submitters at once.
  A first try (the driver's own index has no try of it) is sent without that lookup.
- An accounting query matching nothing answers 200 with an error "Nothing found with query".
- Logs cannot be read over REST (no file access): ``logs()`` needs the SSH transport.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stowplan.errors import ProviderError
from stowplan.providers.slurm.backend import TRANSIENT_MESSAGES, Backend, KeyInfo
from stowplan.providers.slurm.parse import (
    JobRow,
    NodeShape,
    PartitionFacts,
    all_active,
    expand_hostlist,
    parse_gres,
    shapes_of,
)
from stowplan.providers.slurm.render import SlurmRequest, sbatch_options
from stowplan.providers.slurm.ssh import TransportLost
from stowplan.spec.models import SlurmProviderConfig

API = "v0.0.38"
TIMEOUT_S = 30.0
_USABLE = ("idle", "mixed", "allocated", "completing")
_PATH = "/usr/local/bin:/usr/bin:/bin"


def _time_minutes(value: str) -> int:
    days, _, clock = value.partition("-") if "-" in value else ("0", "", value)
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days) * 1440 + h * 60 + m + (1 if s else 0)


def job_properties(req: SlurmRequest) -> dict[str, Any]:
    """The JSON job description of a rendered request, from its own ``#SBATCH`` lines."""
    opts = sbatch_options(req.script)
    job: dict[str, Any] = {
        "name": opts["job-name"],
        "comment": opts.get("comment", ""),
        "array": opts["array"],
        "nodes": 1,
        "tasks": 1,
        "cpus_per_task": int(opts["cpus-per-task"]),
        "memory_per_node": int(opts["mem"].rstrip("M")),
        "current_working_directory": "/tmp",
        "standard_output": "/dev/null",
        "standard_error": "/dev/null",
        "requeue": False,
        "environment": {"PATH": _PATH},
    }
    for opt, prop in (("partition", "partition"), ("account", "account"), ("qos", "qos")):
        if opt in opts:
            job[prop] = opts[opt]
    if "gres" in opts:
        job["gpus_per_node"] = opts["gres"].removeprefix("gpu:")
    if "time" in opts:
        job["time_limit"] = _time_minutes(opts["time"])
    return job


def _epoch(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def rows_of_jobs(jobs: list[dict[str, Any]], names: set[str] | None) -> list[JobRow]:
    """``/slurm/v0.0.38/jobs`` records -> one row per array element (pending ranges expanded)."""
    out: list[JobRow] = []
    for j in jobs:
        name = str(j.get("name", ""))
        if names is not None and name not in names:
            continue
        status = j.get("exit_code")
        code = sig = None
        if isinstance(status, int):
            code, sig = (status >> 8) & 0xFF, (status & 0x7F) or None
        common: dict[str, Any] = {
            "name": name,
            "state": str(j.get("job_state", "")),
            "node": j.get("nodes") or None,
            "exit_code": code,
            "signal": sig,
            "started_at": _epoch(j.get("start_time")),
            "ended_at": _epoch(j.get("end_time")),
            "reason": "" if j.get("state_reason") in (None, "None") else str(j["state_reason"]),
        }
        array_id = j.get("array_job_id") or 0
        task = j.get("array_task_id")
        if array_id and isinstance(task, int):
            out.append(JobRow(job_id=str(array_id), index=task, **common))
        elif array_id and j.get("array_task_string"):
            spec = str(j["array_task_string"]).split("%", 1)[0]
            for part in spec.split(","):
                lo, _, hi = part.partition("-")
                if lo.isdigit() and (not hi or hi.isdigit()):
                    for i in range(int(lo), int(hi or lo) + 1):
                        out.append(JobRow(job_id=str(array_id), index=i, **common))
        else:
            out.append(JobRow(job_id=str(j.get("job_id")), index=None, **common))
    return out


def rows_of_db_jobs(jobs: list[dict[str, Any]]) -> list[JobRow]:
    out: list[JobRow] = []
    for j in jobs:
        array = j.get("array") or {}
        state = (j.get("state") or {}).get("current", "")
        times = j.get("time") or {}
        exit_code = (j.get("exit_code") or {}).get("return_code")
        row: dict[str, Any] = {
            "name": str(j.get("name", "")),
            "state": str(state),
            "node": j.get("nodes") or None,
            "exit_code": exit_code if isinstance(exit_code, int) else None,
            "started_at": _epoch(times.get("start")),
            "ended_at": _epoch(times.get("end")),
        }
        if array.get("job_id") and isinstance(array.get("task_id"), int):
            out.append(JobRow(job_id=str(array["job_id"]), index=array["task_id"], **row))
        else:
            out.append(JobRow(job_id=str(j.get("job_id")), index=None, **row))
    return out


class RestBackend(Backend):
    def __init__(self, provider: str, config: SlurmProviderConfig) -> None:
        assert config.rest_url is not None  # checked by the config
        self.provider = provider
        self.url = config.rest_url.rstrip("/")
        self.user = config.user
        self.token_env = config.rest_token_env
        self._client: Any = None
        self._requests = 0

    @property
    def commands(self) -> int:
        return self._requests

    def _headers(self) -> dict[str, str]:
        token = os.environ.get(self.token_env)
        if not token:
            raise ProviderError(
                f"slurmrestd needs a JWT in ${self.token_env} (e.g. from `scontrol token`)",
                provider=self.provider,
                retryable=False,
            )
        headers = {"X-SLURM-USER-TOKEN": token}
        if self.user:
            headers["X-SLURM-USER-NAME"] = self.user
        return headers

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, timeout=TIMEOUT_S)
            self._connects += 1
        self._requests += 1
        try:
            r = await self._client.request(method, path, json=body, headers=self._headers())
        except httpx.HTTPError as e:
            # the request may have reached slurmrestd: for a submit, the outcome is unknown
            raise TransportLost(
                f"slurmrestd {method} {path}: {type(e).__name__}: {e}",
                provider=self.provider,
                retryable=True,
            ) from None
        if r.status_code in (401, 403):
            raise ProviderError(
                f"slurmrestd refused the token for {self.user or 'the token user'} "
                f"(HTTP {r.status_code}); renew ${self.token_env}",
                provider=self.provider,
                retryable=False,
            )
        try:
            data: dict[str, Any] = r.json()
        except ValueError:
            data = {}
        errors = [e.get("error") or e.get("description") or str(e) for e in data.get("errors", [])]
        # NOTE: an accounting query that matches nothing answers 200 with this "error"
        errors = [e for e in errors if "Nothing found" not in str(e)]
        if r.status_code >= 400 or errors:
            why = "; ".join(str(e) for e in errors) or r.text[:500]
            retryable = r.status_code >= 500 and any(t in why for t in TRANSIENT_MESSAGES)
            raise ProviderError(
                f"slurmrestd {method} {path}: HTTP {r.status_code}: {why}",
                provider=self.provider,
                retryable=retryable or r.status_code in (502, 503, 504),
            )
        return data

    async def discover(
        self, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        parts = (await self._call("GET", f"/slurm/{API}/partitions")).get("partitions", [])
        nodes = {n["name"]: n for n in (await self._call("GET", f"/slurm/{API}/nodes"))["nodes"]}
        jobs = (await self._call("GET", f"/slurm/{API}/jobs")).get("jobs", [])
        out = []
        for p in parts:
            members = expand_hostlist(str(p.get("nodes", "")))
            cpus = memory = 0
            gpus: dict[str, int] = {}
            shapes: list[NodeShape] = []
            for n in members:
                rec = nodes.get(n)
                if rec is None or str(rec.get("state", "")).lower() not in _USABLE:
                    continue
                if any(f in ("DRAIN", "DOWN", "FAIL") for f in rec.get("state_flags", [])):
                    continue
                cpus += int(rec.get("cpus", 0))
                memory += int(rec.get("real_memory", 0)) << 20
                node_gpus = parse_gres(str(rec.get("gres", "")))
                for kind, count in node_gpus.items():
                    gpus[kind] = gpus.get(kind, 0) + count
                shapes.append(
                    NodeShape(
                        cpus=int(rec.get("cpus", 0)),
                        memory=int(rec.get("real_memory", 0)) << 20,
                        gpus=node_gpus,
                    )
                )
            limit = p.get("max_time_limit")
            out.append(
                PartitionFacts(
                    name=str(p["name"]),
                    up=p.get("state") == "UP",
                    nodes=members,
                    cpus=cpus,
                    memory=memory,
                    gpus=gpus,
                    node_shapes=shapes_of(shapes),
                    max_time_s=float(limit) * 60 if isinstance(limit, int) and limit > 0 else None,
                    default="default" in [str(f).lower() for f in p.get("flags", [])],
                )
            )
        pending: dict[str, float] = {}
        for j in jobs:
            if j.get("job_state") != "PENDING" or (ours and ours(str(j.get("name", "")))):
                continue
            limit = j.get("time_limit")
            seconds = float(limit) * 60 if isinstance(limit, int) and limit > 0 else 3600.0
            for part in str(j.get("partition", "")).split(","):
                pending[part] = pending.get(part, 0.0) + int(j.get("cpus", 1)) * seconds
        return None, out, pending

    async def find(self, name: str, job_dir: str = "") -> str | None:
        for row in rows_of_jobs((await self._call("GET", f"/slurm/{API}/jobs"))["jobs"], {name}):
            return row.job_id
        db = await self._call("GET", f"/slurmdb/{API}/jobs?job_name={name}")
        for row in rows_of_db_jobs(db.get("jobs", [])):
            if row.name == name:
                return row.job_id
        return None

    async def submit(self, req: SlurmRequest, *, first: bool = False) -> str:
        # a request tried before may have been submitted by that try: look its name up (two
        # GETs); a first try has nothing to find
        if not first:
            found = await self.find(req.name, req.job_dir)
            if found is not None:
                return found
        data = await self._call(
            "POST", f"/slurm/{API}/job/submit", {"script": req.script, "job": job_properties(req)}
        )
        job_id = data.get("job_id")
        if not isinstance(job_id, int):
            raise ProviderError(
                f"slurmrestd answered without a job id: {data}",
                provider=self.provider,
                retryable=True,
            )
        return str(job_id)

    async def observe(
        self,
        names: Sequence[str],
        since_days: int,
        elements: Sequence[str] = (),
        *,
        end_files: Mapping[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> tuple[list[JobRow], ...]:
        # no file access: no end records, and nothing to wait on remotely
        live = rows_of_jobs((await self._call("GET", f"/slurm/{API}/jobs"))["jobs"], set(names))
        if elements and all_active(live, elements):
            return live, []
        db = await self._call("GET", f"/slurmdb/{API}/jobs?job_name={','.join(names)}")
        return live, rows_of_db_jobs(db.get("jobs", []))

    async def lookup(
        self, workdir: str, keys: Sequence[str]
    ) -> tuple[dict[str, KeyInfo], dict[str, str]]:
        return {}, {}  # no file access: only the local index knows keys

    async def cancel(self, element_ids: Sequence[str]) -> None:
        for element in element_ids:
            try:
                await self._call("DELETE", f"/slurm/{API}/job/{element}")
            except ProviderError as e:
                if "already completing or completed" not in str(e) and "Invalid job id" not in str(
                    e
                ):
                    raise

    async def read_file(self, path: str, offset: int) -> bytes | None:
        raise ProviderError(
            "logs cannot be read through slurmrestd; use transport = 'ssh' for logs",
            provider=self.provider,
            retryable=False,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
