"""Pure rendering: launches in, ``AwsRequest`` (one ``RunInstances`` each) out. No I/O.

Each attempt gets its own instance. Its ``RunInstances`` request carries the attempt's key as
``ClientToken`` and in the tag ``stowplan:key`` (with ``stowplan:run``, ``stowplan:project``,
``stowplan:provider``, ``stowplan:attempt``), shuts down into ``terminate``, asks for spot
through ``InstanceMarketOptions`` in a spot pool, and requires IMDSv2.

The user-data script needs no AWS credentials: it reaches S3 only through presigned URLs,
one per object (the payload of the attempt's files to GET; its stdout, stderr, each declared
output and its exit record to PUT). Presigning needs the clock and the credentials, so ``plan``
cannot do it and stays pure: the script starts with one ``STOWPLAN_URL_<slot>=...`` line per
slot, and ``AwsRequest.user_data(urls)`` writes those lines at submit. ``render()`` (what
``--dry-run`` prints) shows them as ``<presigned at submit: PUT s3://...>``, and the subnet
(the zone is chosen at submit from the zones discovery found usable) likewise. Nothing else
differs between the dry run and what is sent.

Every user string (task name, argv, environment values, output paths) is quoted with
``bash_quote``, which never emits a raw newline: each stays one word on its own line of the
script. The URL lines come first and are ours alone, so filling them cannot touch user text.

S3 layout under ``bucket`` (``s3://BUCKET/PREFIX``)::

    PREFIX/attempts/RUN/KEY/payload.tar.gz   the attempt's files (when it has any)
    PREFIX/attempts/RUN/KEY/stdout, stderr   uploaded every LOG_EVERY_S seconds and at the end
    PREFIX/attempts/RUN/KEY/outputs/PATH     each declared output (a directory: PATH.tar.gz)
    PREFIX/exit/RUN/KEY.json                 the exit record (``states.ExitRecord``)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import field

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.aws.discover import HARDWARE_PREFIX, PoolRef, parse_pool_id
from stowplan.providers.base import LaunchSpec, SingleRequest, command_of, request_name
from stowplan.providers.slurm.render import bash_quote
from stowplan.spec.models import AwsProviderConfig

USER_DATA_MAX = 16384
"""Bytes of user-data EC2 accepts (before base64)."""
URL_ESTIMATE = 1700
"""What plan assumes a presigned URL takes (with an STS session token) when it checks the
user-data size; submit checks the real size."""
LOG_EVERY_S = 15
"""Seconds between the instance's uploads of stdout and stderr (what ``logs -f`` sees)."""
LEASE_MAX_S = 7 * 86400
"""The longest a presigned URL is valid (SigV4)."""
LEASE_MARGIN_S = 3600
"""Lease beyond the attempt's timeout: boot, fetching the payload, uploading outputs."""
URL_END = "# stowplan: end of URLs"
TAG_KEY, TAG_RUN, TAG_PROJECT, TAG_PROVIDER, TAG_ATTEMPT = (
    "stowplan:key",
    "stowplan:run",
    "stowplan:project",
    "stowplan:provider",
    "stowplan:attempt",
)
_SAFE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\Z")


class AwsRequest(SingleRequest, frozen=True, kw_only=True):
    """One ``RunInstances`` call for one attempt. ``params`` is the call as sent, but for
    ``UserData`` (``user_data(urls)``) and the subnet (chosen at submit)."""

    pool: str
    region: str
    instance_type: str
    spot: bool
    run_id: str
    attempt: int
    params: dict[str, Any]
    script: str
    """the user-data after the URL lines."""
    slots: dict[str, tuple[str, str]]
    """URL slot -> (HTTP method, S3 object key)."""
    exit_key: str
    """the S3 object key of the exit record."""
    outputs: dict[str, str] = field(default_factory=dict)
    """declared output -> S3 object key where it is uploaded."""
    payload: bytes | None = None
    """the attempt's files as a gzipped tar (deterministic), uploaded at submit."""
    lease_s: int = LEASE_MAX_S
    """how long the presigned URLs stay valid."""
    bucket: str = ""

    def user_data(self, urls: Mapping[str, str]) -> str:
        """The script as sent: one line per URL slot, then ``script``."""
        missing = sorted(set(self.slots) - set(urls))
        if missing:
            raise ValueError(f"no URL for slot(s) {', '.join(missing)}")
        head = ["#!/bin/bash", f"# stowplan attempt {self.key}: run {self.run_id}"]
        head += [f"STOWPLAN_URL_{slot}={bash_quote(urls[slot])}" for slot in sorted(self.slots)]
        return "\n".join([*head, URL_END, self.script])

    def placeholder_urls(self) -> dict[str, str]:
        return {
            slot: f"<presigned at submit: {method} s3://{self.bucket}/{key}>"
            for slot, (method, key) in self.slots.items()
        }

    def render(self) -> str:
        shown = {
            **self.params,
            "SubnetId": "<chosen at submit: a configured subnet in a usable zone>",
            "UserData": "<the script below>",
        }
        text = (
            f"# RunInstances in {self.region} ({self.pool})\n"
            + json.dumps(shown, indent=2, sort_keys=True)
            + "\n# user-data\n"
            + self.user_data(self.placeholder_urls())
        )
        if self.payload is not None:
            digest = hashlib.sha256(self.payload).hexdigest()
            text += (
                f"# payload: {len(self.payload)} bytes, sha256 {digest}, PUT to "
                f"s3://{self.bucket}/{self.slots['payload'][1]} at submit\n"
            )
        return text


def _reject(provider: str, launch: LaunchSpec, why: str) -> ProviderError:
    return ProviderError(f"attempt {launch.key!r}: {why}", provider=provider, retryable=False)


def client_token(key: str) -> str:
    """EC2's ClientToken (at most 64 ASCII characters): the key itself when it fits."""
    return key if len(key) <= 64 else hashlib.sha256(key.encode()).hexdigest()


def payload_of(files: Mapping[str, bytes]) -> bytes:
    """The files as a gzipped tar that depends on their names and contents alone."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _target(provider: str, launch: LaunchSpec, pools: Mapping[str, Pool]) -> PoolRef:
    ref = parse_pool_id(provider, launch.pool)
    if ref is None:
        raise _reject(
            provider,
            launch,
            f"pool {launch.pool!r} is not an instance type of this provider "
            f"(expected {provider}/REGION/TYPE or {provider}/REGION/TYPE/spot)",
        )
    pool = pools.get(launch.pool)
    if pool is not None:
        gpus = sum((pool.node.gpus if pool.node else {}).values())
        if launch.gpus > gpus:
            raise _reject(
                provider, launch, f"{ref.instance_type} has {gpus} GPU(s), {launch.gpus} asked"
            )
        if pool.hardware_class and pool.hardware_class != HARDWARE_PREFIX + ref.instance_type:
            raise _reject(provider, launch, f"pool {launch.pool!r} is not {ref.instance_type}")
    return ref


def _check(provider: str, launch: LaunchSpec) -> list[str]:
    if not _SAFE_ID.match(launch.run_id):
        raise _reject(provider, launch, f"run id {launch.run_id!r} is not a safe name")
    try:
        argv = command_of(launch)
    except ValueError as e:
        raise _reject(provider, launch, str(e)) from None
    if launch.image is not None:
        raise _reject(
            provider,
            launch,
            "the aws provider runs commands on the AMI as they are, not in containers; "
            "put what the task needs in the AMI and drop image",
        )
    if launch.secrets:
        raise _reject(provider, launch, "the aws provider does not resolve secrets yet")
    for path in [*launch.files, *launch.outputs]:
        parts = path.removesuffix("/").split("/")
        if not path or path.startswith("/") or ".." in parts or "\0" in path:
            raise _reject(provider, launch, f"{path!r} must be a relative path inside the attempt")
    return argv


def plan_instances(
    launches: Sequence[LaunchSpec],
    *,
    provider: str,
    project: str,
    config: AwsProviderConfig,
    pools: Sequence[Pool] = (),
    prefix: str = "sp",
) -> list[AwsRequest]:
    """One request per launch, in key order. Pure and deterministic."""
    by_id = {p.id: p for p in pools}
    out = []
    for launch in sorted(launches, key=lambda launch: launch.key):
        argv = _check(provider, launch)
        ref = _target(provider, launch, by_id)
        if ref.region not in config.regions:
            raise _reject(provider, launch, f"region {ref.region} is not configured")
        out.append(_render(launch, argv, ref, provider, project, config, prefix))
    return out


def attempt_prefix(config: AwsProviderConfig, run_id: str, key: str) -> str:
    """The S3 key prefix of one attempt's objects (no trailing slash)."""
    base = config.bucket_prefix + "/" if config.bucket_prefix else ""
    return f"{base}attempts/{run_id}/{key}"


def exit_prefix(config: AwsProviderConfig, run_id: str) -> str:
    """The S3 key prefix of a run's exit records (with a trailing slash)."""
    base = config.bucket_prefix + "/" if config.bucket_prefix else ""
    return f"{base}exit/{run_id}/"


def _render(
    launch: LaunchSpec,
    argv: list[str],
    ref: PoolRef,
    provider: str,
    project: str,
    config: AwsProviderConfig,
    prefix: str,
) -> AwsRequest:
    name = request_name([launch.key], prefix)
    here = attempt_prefix(config, launch.run_id, launch.key)
    slots: dict[str, tuple[str, str]] = {
        "stdout": ("PUT", f"{here}/stdout"),
        "stderr": ("PUT", f"{here}/stderr"),
        "exit": ("PUT", f"{exit_prefix(config, launch.run_id)}{launch.key}.json"),
    }
    payload = payload_of(launch.files) if launch.files else None
    if payload is not None:
        slots["payload"] = ("GET", f"{here}/payload.tar.gz")
    outputs: dict[str, str] = {}
    for i, out in enumerate(launch.outputs):
        key = f"{here}/outputs/{out.removesuffix('/')}" + (".tar.gz" if out.endswith("/") else "")
        slots[f"output_{i}"] = ("PUT", key)
        outputs[out] = key
    timeout = None if launch.timeout_s is None else max(1, math.ceil(launch.timeout_s))
    lease = LEASE_MAX_S if timeout is None else min(LEASE_MAX_S, timeout + LEASE_MARGIN_S)
    script = _script(launch, argv, timeout, lease, int(config.idle_shutdown))
    tags = {
        "Name": name,
        TAG_KEY: launch.key,
        TAG_RUN: launch.run_id,
        TAG_PROJECT: project,
        TAG_PROVIDER: provider,
        TAG_ATTEMPT: str(launch.attempt),
    }
    tag_list = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
    params: dict[str, Any] = {
        "ImageId": config.ami_for(ref.region),
        "InstanceType": ref.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token(launch.key),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
    }
    if ref.spot:
        params["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            },
        }
    if config.security_groups:
        params["SecurityGroupIds"] = list(config.security_groups)
    if config.instance_profile is not None:
        ip = config.instance_profile
        params["IamInstanceProfile"] = {"Arn": ip} if ip.startswith("arn:") else {"Name": ip}
    request = AwsRequest(
        keys=(launch.key,),
        name=name,
        pool=launch.pool,
        region=ref.region,
        instance_type=ref.instance_type,
        spot=ref.spot,
        run_id=launch.run_id,
        attempt=launch.attempt,
        params=params,
        script=script,
        slots=slots,
        exit_key=slots["exit"][1],
        outputs=outputs,
        payload=payload,
        lease_s=lease,
        bucket=config.bucket_name,
    )
    estimate = len(request.user_data({s: "u" * URL_ESTIMATE for s in slots}).encode())
    if estimate > USER_DATA_MAX:
        raise _reject(
            provider,
            launch,
            f"its user-data would take about {estimate} bytes, more than EC2's "
            f"{USER_DATA_MAX}; move long arguments or environment values into files, or "
            "declare fewer outputs (a directory output counts once)",
        )
    return request


# The parts of the user-data script that carry no user text. Variables the script reads from
# its environment: STOWPLAN_ROOT (where attempts run; /var/lib/stowplan) and STOWPLAN_HALT (a
# program run instead of `shutdown -h now`), which the test suite sets to run the script as a
# local process; cloud-init sets neither.
_PRELUDE = r"""set -u
umask 022
root=${STOWPLAN_ROOT:-/var/lib/stowplan}
dir=$root/runs/$run/$attempt
meta=$root/attempts/$key
started=$(date +%s)
curl_() { curl -fsS --retry 5 --retry-connrefused --retry-delay 2 "$@"; }
put() { curl_ -o /dev/null -X PUT --upload-file "$1" "$2"; }
halt() { if [ -n "${STOWPLAN_HALT:-}" ]; then "$STOWPLAN_HALT"; else shutdown -h now; fi; }
finish() {
  kill "$watchdog" 2>/dev/null
  printf '{"key":"%s","exit_code":%d,"reason":"%s","started_at":%d,"ended_at":%d}\n' \
    "$key" "$1" "$2" "$started" "$(date +%s)" > "$meta/exit.json"
  put "$meta/stdout" "$STOWPLAN_URL_stdout"
  put "$meta/stderr" "$STOWPLAN_URL_stderr"
  put "$meta/exit.json" "$STOWPLAN_URL_exit"
  sleep "$idle"
  halt
  exit "$1"
}
# background loops sleep in a child they kill when told to stop, so nothing outlives them
( trap 'kill "$s" 2>/dev/null; exit 0' TERM; sleep "$lease" & s=$!; wait "$s"; halt ) \
  >/dev/null 2>&1 &
watchdog=$!
mkdir -p -- "$dir" "$meta" && : > "$meta/stdout" && : > "$meta/stderr" || finish 70 setup
out_file() {
  if [ ! -e "$1" ]; then
    echo "stowplan: declared output $1 is missing" >> "$meta/stderr"; rc=1; reason=outputs
  else
    real=$(realpath -e -- "$1") || real=/
    case "$real/" in
      "$here"/?*) put "$1" "$2" || { rc=70; reason=setup; } ;;
      *) echo "stowplan: declared output $1 leads outside the attempt directory" \
           >> "$meta/stderr"; rc=1; reason=outputs ;;
    esac
  fi
}
out_dir() {
  if [ ! -d "$1" ]; then
    echo "stowplan: declared output directory $1 is missing" >> "$meta/stderr"; rc=1
    reason=outputs
  else
    tar -czf "$meta/output.tar.gz" -- "$1" && put "$meta/output.tar.gz" "$2" \
      || { rc=70; reason=setup; }
  fi
}"""

_FETCH = r"""if ! curl_ -o "$meta/payload.tar.gz" "$STOWPLAN_URL_payload" \
  || ! tar -xzf "$meta/payload.tar.gz" -C "$dir" --no-same-owner; then
  echo "stowplan: could not fetch the attempt's files" >> "$meta/stderr"; finish 70 setup
fi"""

_WAIT = r"""pid=$!
( trap 'kill "$s" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "$log_every" & s=$!; wait "$s"
    put "$meta/stdout" "$STOWPLAN_URL_stdout"; put "$meta/stderr" "$STOWPLAN_URL_stderr"
  done ) >/dev/null 2>&1 &
pusher=$!
wait "$pid"
rc=$?
kill "$pusher" 2>/dev/null
wait "$pusher" 2>/dev/null
reason=exit"""


def _script(launch: LaunchSpec, argv: list[str], timeout: int | None, lease: int, idle: int) -> str:
    lines = [
        f"# task {bash_quote(launch.name)}, attempt {launch.attempt}",
        f"key={launch.key} run={launch.run_id} attempt={launch.attempt}",
        f"idle={idle} lease={lease} log_every={LOG_EVERY_S}",
        _PRELUDE,
    ]
    if launch.files:
        lines.append(_FETCH)
    lines.append('cd -- "$dir" || finish 70 setup')
    lines.append("here=$(pwd -P)")
    env = {
        **launch.env,
        "STOWPLAN_RUN_ID": launch.run_id,
        "STOWPLAN_ATTEMPT": str(launch.attempt),
        "STOWPLAN_KEY": launch.key,
    }
    lines.append("(")
    lines += [f"  export {k}={bash_quote(env[k])}" for k in sorted(env)]
    lines.append('  export STOWPLAN_ATTEMPT_DIR="$here"')
    run = " ".join(bash_quote(a) for a in argv)
    if timeout is not None:
        run = f"timeout -k 30 {timeout} {run}"
    lines.append(f"  exec {run}")
    lines.append(') </dev/null >> "$meta/stdout" 2>> "$meta/stderr" &')
    lines.append(_WAIT)
    if timeout is not None:
        lines.append('if [ "$rc" -eq 124 ]; then reason=timeout; fi')
    if launch.outputs:
        lines.append('if [ "$rc" -eq 0 ]; then')
        for i, out in enumerate(launch.outputs):
            fn = "out_dir" if out.endswith("/") else "out_file"
            path = bash_quote(out.removesuffix("/"))
            lines.append(f'  {fn} {path} "$STOWPLAN_URL_output_{i}"')
        lines.append("fi")
    lines.append('finish "$rc" "$reason"')
    return "\n".join(lines) + "\n"
