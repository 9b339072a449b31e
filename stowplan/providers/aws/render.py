"""Pure rendering. No I/O.

Two kinds of request, after the core's two verbs:

- ``AgentRequest`` (``plan_agent``, for ``provision``): one ``RunInstances`` call that starts one
  instance of an elastic pool, running the *agent*. Its ``ClientToken`` is the agent's id
  (``TOKEN-INDEX``: the provision token and the instance's index), and it carries the tags
  ``stowplan:agent``, ``stowplan:pool``, ``stowplan:token``, ``stowplan:provider`` and
  ``stowplan:project``; it shuts down into ``terminate``, asks for spot through
  ``InstanceMarketOptions`` in a spot pool, and requires IMDSv2.
- ``AwsRequest`` (``plan_attempts``, for ``submit``): one attempt to queue for its pool: its
  script, the S3 objects it reads and writes, and what it needs of an instance.

The protocol is batched so that the control plane's API calls scale with submit batches,
instances and polls, not with attempts (presigning a URL is local: no API call):

- submit writes ONE queue object per batch, ``queue/BATCH.json`` (``BATCH`` = ``batch_id`` of
  the batch's keys), with ``If-None-Match: *``: a retried submit of the same keys finds it and
  writes nothing again; a restarted control plane reads the batches back (newest first) to
  learn the keys it does not know.
- dispatch carries each attempt's script (with its presigned URLs, gzipped, base64) in the
  instance's inbox line: one inbox PUT per instance per dispatch round, no object per attempt.
- each agent keeps a *status* object, ``agents/AGENT/status``, that only it writes (one
  presigned PUT URL in its user-data): a line per attempt it claimed, was refused, or saw
  end (``exit KEY CODE REASON STARTED ENDED``, copied from the attempt's own exit record). The
  control plane reads one status object per instance with unfinished attempts per poll, and
  falls back to the per-attempt objects (exit records, claims: the truth) only for attempts
  whose instance is gone or whose status says nothing certain.

The agent needs no AWS credentials. Its user-data holds two presigned URLs: a GET of its
*inbox*, an object only the control plane writes, and a PUT of its *status*. S3 URLs cannot
list, so the control plane does the dispatching: it sends an attempt to an instance with room
by appending a line to that instance's inbox, with presigned URLs (made at that moment, valid
for the attempt's lease) to claim the attempt, read the claim back and write a setup-failure
exit record, and the attempt script itself (``code=``). The agent polls its inbox; for each new
line it *claims* the attempt (a PUT of ``claims/RUN/KEY.json`` carrying ``If-None-Match: *``,
signed into the URL, so S3 refuses a second claim: two instances never run one attempt,
whatever the control plane believed), then decodes the script and runs it in the background,
several at once as the control plane packs them, and notes each step in its status (uploaded
when it changed, at most once per poll). A line with ``after=KEY`` waits, unclaimed, until the
attempt ``KEY`` it follows no longer runs there (ended, refused, cancelled, never taken), then
is taken in its place: the control plane sends the next wave with the current one, in the same
inbox write, and the instance starts it as room frees without waiting for a poll. An inbox line
``cancel KEY`` kills that attempt (or skips it, not started). With nothing running and nothing
new for ``idle_shutdown`` seconds the agent shuts the instance down, which terminates it; it
also halts when its inbox URL's lease (``AGENT_LEASE_S``) ends. On a spot instance it polls the
instance metadata service (IMDSv2) for ``spot/instance-action``: when an interruption notice
appears it kills its running attempts, writes each an exit record with the reason ``preempted``
(the core retries them elsewhere as PREEMPTED, not as failures), notes ``notice`` in its status
(the control plane sends it nothing more) and takes nothing new.

The attempt script (``AwsRequest.user_data(urls)``, carried in its inbox line) needs no
credentials either: it reaches S3 only through presigned URLs, one per object (the payload to
GET; stdout, stderr, each declared output and the exit record to PUT). Presigning needs the
clock and the credentials, so ``plan`` cannot do it and stays pure: the script starts with one
``STOWPLAN_URL_<slot>=...`` line per slot, written at dispatch. ``render()`` (what ``--dry-run``
prints) shows them as ``<presigned at dispatch: PUT s3://...>``.

Every user string (task name, argv, environment values, output paths) is quoted with
``bash_quote``, which never emits a raw newline: each stays one word on its own line of the
script. The URL lines come first and are ours alone, so filling them cannot touch user text.
The agent reads its inbox as data, never as code: each field is checked against a pattern.

S3 layout under ``bucket`` (``s3://BUCKET/PREFIX``)::

    PREFIX/queue/BATCH.json                  a submitted batch of attempts (``QueueBatch``)
    PREFIX/cancels/BATCH.json                keys cancelled together (``CancelBatch``)
    PREFIX/agents/AGENT/inbox                what was sent to an instance (control plane only)
    PREFIX/agents/AGENT/status               what the instance did (that instance only)
    PREFIX/claims/RUN/KEY.json               the claim of the instance that took the attempt
    PREFIX/attempts/RUN/KEY/payload.tar.gz   the attempt's files (when it has any)
    PREFIX/attempts/RUN/KEY/stdout, stderr   uploaded every LOG_EVERY_S seconds and at the end
    PREFIX/attempts/RUN/KEY/outputs/PATH     each declared output (a directory: PATH.tar.gz)
    PREFIX/exit/RUN/KEY.json                 the exit record (``states.ExitRecord``)
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import Struct, field

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.aws.discover import HARDWARE_PREFIX, PoolRef, parse_pool_id
from stowplan.providers.base import LaunchSpec, SingleRequest, command_of, request_name
from stowplan.providers.slurm.render import bash_quote
from stowplan.spec.models import AwsProviderConfig

USER_DATA_MAX = 16384
"""Bytes of user-data EC2 accepts (before base64)."""
LOG_EVERY_S = 15
"""Seconds between the instance's uploads of stdout and stderr (what ``logs -f`` sees)."""
LEASE_MAX_S = 7 * 86400
"""The longest a presigned URL is valid (SigV4)."""
LEASE_MARGIN_S = 3600
"""Lease beyond the attempt's timeout: fetching the payload, uploading outputs."""
AGENT_LEASE_S = LEASE_MAX_S
"""How long an agent's inbox URL is valid; the agent halts when it ends."""
AGENT_POLL_S = 5
"""Seconds between the agent's reads of its inbox."""
URL_END = "# stowplan: end of URLs"
TAG_KEY, TAG_RUN, TAG_PROJECT, TAG_PROVIDER, TAG_ATTEMPT = (
    "stowplan:key",
    "stowplan:run",
    "stowplan:project",
    "stowplan:provider",
    "stowplan:attempt",
)
TAG_AGENT, TAG_POOL, TAG_TOKEN, TAG_STOPPED = (
    "stowplan:agent",
    "stowplan:pool",
    "stowplan:token",
    "stowplan:stopped-by",
)
_SAFE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\Z")
AGENT_ID = re.compile(r"\A[0-9a-z][-0-9a-z]{0,62}\Z")


def _base(config: AwsProviderConfig) -> str:
    return config.bucket_prefix + "/" if config.bucket_prefix else ""


def attempt_prefix(config: AwsProviderConfig, run_id: str, key: str) -> str:
    """The S3 key prefix of one attempt's objects (no trailing slash)."""
    return f"{_base(config)}attempts/{run_id}/{key}"


def exit_prefix(config: AwsProviderConfig, run_id: str) -> str:
    """The S3 key prefix of a run's exit records (with a trailing slash)."""
    return f"{_base(config)}exit/{run_id}/"


def claim_prefix(config: AwsProviderConfig, run_id: str) -> str:
    """The S3 key prefix of a run's claims (with a trailing slash)."""
    return f"{_base(config)}claims/{run_id}/"


def batch_id(keys: Sequence[str]) -> str:
    """The name of the queue (or cancel) object of a batch of keys: it depends on the set of
    keys alone, so a retried call with the same keys names the same object."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:32]


def queue_prefix(config: AwsProviderConfig) -> str:
    return f"{_base(config)}queue/"


def queue_key(config: AwsProviderConfig, batch: str) -> str:
    return f"{queue_prefix(config)}{batch}.json"


def cancel_prefix(config: AwsProviderConfig) -> str:
    return f"{_base(config)}cancels/"


def cancel_key(config: AwsProviderConfig, batch: str) -> str:
    return f"{cancel_prefix(config)}{batch}.json"


def inbox_key(config: AwsProviderConfig, agent: str) -> str:
    return f"{_base(config)}agents/{agent}/inbox"


def status_key(config: AwsProviderConfig, agent: str) -> str:
    return f"{_base(config)}agents/{agent}/status"


def agent_id(token: str, index: int) -> str:
    """The id of the ``index``-th instance a provision with ``token`` starts: its ClientToken
    and its ``stowplan:agent`` tag."""
    return f"{token}-{index}"


class AwsRequest(SingleRequest, frozen=True, kw_only=True):
    """One attempt to queue for its pool. ``user_data(urls)`` is the attempt script as an
    instance runs it (uploaded at dispatch, with the URLs presigned then)."""

    pool: str
    region: str
    instance_type: str
    spot: bool
    run_id: str
    attempt: int
    cpus: float
    memory: int
    gpus: int
    script: str
    """the attempt script after the URL lines."""
    slots: dict[str, tuple[str, str]]
    """URL slot -> (HTTP method, S3 object key)."""
    exit_key: str
    """the S3 object key of the exit record."""
    outputs: dict[str, str] = field(default_factory=dict)
    """declared output -> S3 object key where it is uploaded."""
    payload: bytes | None = None
    """the attempt's files as a gzipped tar (deterministic), uploaded at submit."""
    lease_s: int = LEASE_MAX_S
    """how long the attempt's presigned URLs stay valid."""
    bucket: str = ""
    claim_key: str = ""

    def user_data(self, urls: Mapping[str, str]) -> str:
        """The attempt script as run: one line per URL slot, then ``script``."""
        missing = sorted(set(self.slots) - set(urls))
        if missing:
            raise ValueError(f"no URL for slot(s) {', '.join(missing)}")
        head = ["#!/bin/bash", f"# stowplan attempt {self.key}: run {self.run_id}"]
        head += [f"STOWPLAN_URL_{slot}={bash_quote(urls[slot])}" for slot in sorted(self.slots)]
        return "\n".join([*head, URL_END, self.script])

    def placeholder_urls(self) -> dict[str, str]:
        return {
            slot: f"<presigned at dispatch: {method} s3://{self.bucket}/{key}>"
            for slot, (method, key) in self.slots.items()
        }

    def render(self) -> str:
        text = (
            f"# queue for {self.pool} ({self.region}): needs cpus={self.cpus:g} "
            f"memory={self.memory} gpus={self.gpus}; an instance of the pool claims it at "
            f"s3://{self.bucket}/{self.claim_key} and runs the script below, carried in its inbox "
            "line\n# attempt script\n" + self.user_data(self.placeholder_urls())
        )
        if self.payload is not None:
            digest = hashlib.sha256(self.payload).hexdigest()
            text += (
                f"# payload: {len(self.payload)} bytes, sha256 {digest}, PUT to "
                f"s3://{self.bucket}/{self.slots['payload'][1]} at submit\n"
            )
        return text


class AgentRequest(Struct, frozen=True, kw_only=True):
    """One ``RunInstances`` call starting one agent instance. ``params`` is the call as sent,
    but for ``UserData`` (``user_data(inbox_url)``) and the subnet (chosen at launch)."""

    agent: str
    pool: str
    region: str
    instance_type: str
    spot: bool
    params: dict[str, Any]
    script: str
    inbox_key: str
    status_key: str = ""
    bucket: str = ""

    def user_data(self, inbox_url: str, status_url: str) -> str:
        head = [
            "#!/bin/bash",
            f"# stowplan agent {self.agent} of {self.pool}",
            f"STOWPLAN_URL_inbox={bash_quote(inbox_url)}",
            f"STOWPLAN_URL_status={bash_quote(status_url)}",
        ]
        return "\n".join([*head, URL_END, self.script])

    def render(self) -> str:
        shown = {
            **self.params,
            "SubnetId": "<chosen at launch: a configured subnet in a usable zone>",
            "UserData": "<the script below>",
        }
        return (
            f"# RunInstances in {self.region} ({self.pool})\n"
            + json.dumps(shown, indent=2, sort_keys=True)
            + "\n# user-data\n"
            + self.user_data(
                f"<presigned at launch: GET s3://{self.bucket}/{self.inbox_key}>",
                f"<presigned at launch: PUT s3://{self.bucket}/{self.status_key}>",
            )
        )


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
    if pool is not None and pool.node is not None:
        gpus = sum(pool.node.gpus.values())
        if launch.gpus > gpus:
            raise _reject(
                provider, launch, f"{ref.instance_type} has {gpus} GPU(s), {launch.gpus} asked"
            )
        if launch.cpus > pool.node.cpus or launch.memory > pool.node.memory:
            raise _reject(
                provider,
                launch,
                f"{ref.instance_type} has {pool.node.cpus:g} vCPUs and "
                f"{pool.node.memory >> 20} MiB; {launch.cpus:g} and {launch.memory >> 20} asked",
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


def plan_attempts(
    launches: Sequence[LaunchSpec],
    *,
    provider: str,
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
        out.append(_render(launch, argv, ref, config, prefix))
    return out


def _render(
    launch: LaunchSpec,
    argv: list[str],
    ref: PoolRef,
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
    return AwsRequest(
        keys=(launch.key,),
        name=name,
        pool=launch.pool,
        region=ref.region,
        instance_type=ref.instance_type,
        spot=ref.spot,
        run_id=launch.run_id,
        attempt=launch.attempt,
        cpus=launch.cpus,
        memory=launch.memory,
        gpus=launch.gpus,
        script=_script(launch, argv, timeout),
        slots=slots,
        exit_key=slots["exit"][1],
        outputs=outputs,
        payload=payload,
        lease_s=lease,
        bucket=config.bucket_name,
        claim_key=f"{claim_prefix(config, launch.run_id)}{launch.key}.json",
    )


def plan_agent(
    *,
    provider: str,
    project: str,
    config: AwsProviderConfig,
    pool: str,
    agent: str,
) -> AgentRequest:
    """The ``RunInstances`` call of one agent instance of ``pool``. Pure."""
    ref = parse_pool_id(provider, pool)
    if ref is None or ref.region not in config.regions:
        raise ProviderError(
            f"pool {pool!r} is not an instance type of this provider",
            provider=provider,
            retryable=False,
        )
    if not AGENT_ID.match(agent):
        raise ProviderError(
            f"agent id {agent!r} is not a DNS label", provider=provider, retryable=False
        )
    tags = {
        "Name": f"stowplan-{agent}",
        TAG_AGENT: agent,
        TAG_POOL: pool,
        TAG_TOKEN: agent.rsplit("-", 1)[0],
        TAG_PROJECT: project,
        TAG_PROVIDER: provider,
    }
    tag_list = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
    params: dict[str, Any] = {
        "ImageId": config.ami_for(ref.region),
        "InstanceType": ref.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token(agent),
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
    script = "\n".join(
        [
            f"agent={agent} idle={int(config.idle_shutdown)} lease={AGENT_LEASE_S} "
            f"poll={AGENT_POLL_S} spot={int(ref.spot)}",
            _AGENT,
        ]
    )
    return AgentRequest(
        agent=agent,
        pool=pool,
        region=ref.region,
        instance_type=ref.instance_type,
        spot=ref.spot,
        params=params,
        script=script + "\n",
        inbox_key=inbox_key(config, agent),
        status_key=status_key(config, agent),
        bucket=config.bucket_name,
    )


def pack_script(script: str) -> str:
    """An attempt script as the ``code`` field of an inbox line: gzipped, base64, one word."""
    return base64.b64encode(gzip.compress(script.encode(), mtime=0)).decode()


def inbox_line(
    seq: int,
    key: str,
    urls: Mapping[str, str],
    script: str | None = None,
    *,
    after: str | None = None,
) -> str:
    """The inbox line that sends attempt ``key`` to an agent: ``SEQ run KEY NAME=VALUE...``
    (URL slots ``claim`` PUT with If-None-Match, ``claimed`` GET, ``exit`` PUT; ``code``: the
    attempt script, ``pack_script``; ``after``: the attempt it waits for, sent before)."""
    fields = dict(urls)
    if script is not None:
        fields["code"] = pack_script(script)
    if after is not None:
        fields["after"] = after
    for name, url in fields.items():
        if not re.fullmatch(r"[a-z_]+", name) or any(c.isspace() for c in url):
            raise ValueError(f"inbox field {name!r} cannot go on one line")
    return " ".join([str(seq), "run", key, *(f"{n}={fields[n]}" for n in sorted(fields))])


def cancel_line(seq: int, key: str) -> str:
    return f"{seq} cancel {key}"


# The agent: the user-data of every instance. Variables it reads from its environment, which
# the test suite sets to run it as a local process and cloud-init sets none of:
# STOWPLAN_ROOT (where attempts run; /var/lib/stowplan), STOWPLAN_HALT (a program run instead
# of `shutdown -h now`), STOWPLAN_POLL (seconds between reads of the inbox) and STOWPLAN_IMDS
# (the instance metadata service; a fake one on the loopback in tests).
_AGENT = r"""set -u
umask 022
root=${STOWPLAN_ROOT:-/var/lib/stowplan}
poll=${STOWPLAN_POLL:-$poll}
imds=${STOWPLAN_IMDS:-http://169.254.169.254}
home=$root/agent/$agent
mkdir -p -- "$home" && : > "$home/status" || exit 70
curl_() { curl -fsS --retry 5 --retry-connrefused --retry-delay 2 "$@"; }
halt() { if [ -n "${STOWPLAN_HALT:-}" ]; then "$STOWPLAN_HALT"; else shutdown -h now; fi; }
booted=$(date +%s) quiet=$booted last=0 dirty=1 noticed=
declare -A pids=() cancelled=() took=() exits=() started=() held=() after=()
note() { printf '%s\n' "$*" >> "$home/status"; dirty=1; }
field() { # NAME FIELDS...: the value of field NAME among NAME=VALUE fields
  local want=$1 kv; shift
  for kv in "$@"; do [ "${kv%%=*}" = "$want" ] && { printf %s "${kv#*=}"; return 0; }; done
  return 1
}
record() { # KEY CODE REASON: write the attempt's exit record here (it could not write it)
  local now; now=$(date +%s)
  printf '{"key":"%s","exit_code":%d,"reason":"%s","started_at":%d,"ended_at":%d}\n' \
    "$1" "$2" "$3" "${started[$1]:-$now}" "$now" > "$home/$1.exit"
  curl_ -o /dev/null -X PUT --upload-file "$home/$1.exit" "${exits[$1]}"
  note exit "$1" "$2" "$3" "${started[$1]:-$now}" "$now"
}
take() { # KEY FIELDS...: claim the attempt, decode its script, start it
  local key=$1 claim claimed code run; shift
  [ -z "${took[$key]:-}" ] || return 0  # sent twice (a restarted control plane): run once
  took[$key]=1
  claim=$(field claim "$@") && claimed=$(field claimed "$@") && code=$(field code "$@") \
    && exits[$key]=$(field exit "$@") || return 0
  printf '{"key":"%s","agent":"%s","at":%d}\n' "$key" "$agent" "$(date +%s)" > "$home/claim"
  if ! curl -fsS -o /dev/null -X PUT -H 'If-None-Match: *' --upload-file "$home/claim" \
      "$claim"; then
    # refused (another instance has it) or its answer lost: the claim says whose it is
    curl_ -o "$home/claimed" "$claimed" && grep -q "\"agent\":\"$agent\"" "$home/claimed" \
      || { note refused "$key"; return 0; }
  fi
  note claimed "$key"
  started[$key]=$(date +%s)
  run=$home/$key.sh
  case $code in
    ''|*[!A-Za-z0-9+/=]*) record "$key" 70 setup; return 0 ;;
  esac
  if ! printf %s "$code" | base64 -d | gzip -dc > "$run"; then
    record "$key" 70 setup
    return 0
  fi
  ( exec setsid bash "$run" ) </dev/null >> "$home/$key.log" 2>&1 &
  pids[$key]=$!
}
ended() { # KEY: its process ended; note its exit as its script recorded it
  local line=
  read -r line < "$root/attempts/$1/exit.line" 2>/dev/null
  case $line in
    *[!0-9a-z\ ]*|'') note ended "$1" ;;
    *) note exit "$1" $line ;;
  esac
}
notice() { # whether the spot interruption notice is out (IMDSv2)
  local token
  token=$(curl -fsS -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
    "$imds/latest/api/token" 2>/dev/null) || return 1
  curl -fsS -m 2 -o /dev/null -H "X-aws-ec2-metadata-token: $token" \
    "$imds/latest/meta-data/spot/instance-action" 2>/dev/null
}
while :; do
  now=$(date +%s)
  for key in "${!pids[@]}"; do
    kill -0 "${pids[$key]}" 2>/dev/null && continue
    wait "${pids[$key]}" 2>/dev/null
    unset "pids[$key]"
    ended "$key"
  done
  if [ "$spot" = 1 ] && [ -z "$noticed" ] && notice; then
    # the instance is about to be reclaimed: what runs here is preempted; take nothing new
    noticed=1
    for key in "${!pids[@]}"; do
      pkill -KILL -s "${pids[$key]}"
      wait "${pids[$key]}" 2>/dev/null
      unset "pids[$key]"
      if [ -s "$root/attempts/$key/exit.line" ]; then ended "$key"
      else record "$key" 143 preempted; fi
    done
    note notice
  fi
  new=0
  if curl_ -o "$home/inbox" "$STOWPLAN_URL_inbox" 2>/dev/null; then
    while read -r -a f; do
      [ "${#f[@]}" -ge 3 ] && [ "${f[1]}" = cancel ] || continue
      case ${f[2]} in ''|*[!0-9a-z-]*) continue ;; esac
      cancelled[${f[2]}]=1
      # the attempt is a session of its own (timeout makes a process group in it)
      if [ -n "${pids[${f[2]}]:-}" ]; then pkill -TERM -s "${pids[${f[2]}]}"; fi
    done < "$home/inbox"
    while read -r -a f; do
      [ "${#f[@]}" -ge 3 ] || continue
      case ${f[0]} in ''|*[!0-9]*) continue ;; esac
      case ${f[2]} in ''|*[!0-9a-z-]*) continue ;; esac
      [ "${f[0]}" -gt "$last" ] || continue
      last=${f[0]} new=1
      [ "${f[1]}" = run ] && [ -z "${cancelled[${f[2]}]:-}" ] && [ -z "$noticed" ] || continue
      # after=KEY: hold it, unclaimed, while KEY runs (or is held) here
      dep=$(field after "${f[@]:3}") || dep=
      case $dep in *[!0-9a-z-]*) continue ;; esac
      if [ -n "$dep" ] && { [ -n "${pids[$dep]:-}" ] || [ -n "${held[$dep]:-}" ]; }; then
        held[${f[2]}]="${f[*]:3}" after[${f[2]}]=$dep
        continue
      fi
      take "${f[2]}" "${f[@]:3}"
    done < "$home/inbox"
  fi
  for key in "${!held[@]}"; do
    if [ -n "${cancelled[$key]:-}" ] || [ -n "$noticed" ]; then
      unset "held[$key]"
      continue
    fi
    dep=${after[$key]}
    { [ -n "${pids[$dep]:-}" ] || [ -n "${held[$dep]:-}" ]; } && continue
    read -r -a f <<< "${held[$key]}"
    unset "held[$key]"
    new=1
    take "$key" "${f[@]}"
  done
  if [ "$dirty" = 1 ] && curl_ -o /dev/null -X PUT --upload-file "$home/status" \
      "$STOWPLAN_URL_status" 2>/dev/null; then
    dirty=0
  fi
  if [ "$new" = 1 ] || [ "${#pids[@]}" -gt 0 ] || [ "${#held[@]}" -gt 0 ]; then
    quiet=$now
  elif [ $((now - quiet)) -ge "$idle" ] && [ "$dirty" = 0 ]; then
    halt
    exit 0
  fi
  if [ $((now - booted)) -ge "$lease" ]; then halt; exit 0; fi
  sleep "$poll"
done"""

# The parts of the attempt script that carry no user text.
_PRELUDE = r"""set -u
umask 022
root=${STOWPLAN_ROOT:-/var/lib/stowplan}
dir=$root/runs/$run/$attempt
meta=$root/attempts/$key
started=$(date +%s)
curl_() { curl -fsS --retry 5 --retry-connrefused --retry-delay 2 "$@"; }
put() { curl_ -o /dev/null -X PUT --upload-file "$1" "$2"; }
finish() {
  printf '{"key":"%s","exit_code":%d,"reason":"%s","started_at":%d,"ended_at":%d}\n' \
    "$key" "$1" "$2" "$started" "$(date +%s)" > "$meta/exit.json"
  put "$meta/stdout" "$STOWPLAN_URL_stdout"
  put "$meta/stderr" "$STOWPLAN_URL_stderr"
  put "$meta/exit.json" "$STOWPLAN_URL_exit"
  printf '%d %s %d %d\n' "$1" "$2" "$started" "$(date +%s)" > "$meta/exit.line"
  exit "$1"
}
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


def _script(launch: LaunchSpec, argv: list[str], timeout: int | None) -> str:
    lines = [
        f"# task {bash_quote(launch.name)}, attempt {launch.attempt}",
        f"key={launch.key} run={launch.run_id} attempt={launch.attempt}",
        f"log_every={LOG_EVERY_S}",
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
