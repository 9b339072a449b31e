"""The AWS driver: elastic pools of EC2 instances running the stowplan agent, via aiobotocore.

What lives where: pools from API answers ``discover.py`` (pure), requests, the agent and the
attempt scripts ``render.py`` (pure; its docstring describes the agent, the inbox and the S3
layout), the state and error maps ``states.py`` (pure), the price table ``prices.py``. This
module does the I/O.

The core's model: ``provision(pool, count, token)`` starts agent instances, ``submit`` queues
attempts for their pools, the driver sends each queued attempt to an instance of its pool with
room (an inbox line; several at once when they fit the instance's shape) or, with none, to
follow one attempt sent there that needs as much (``after=``: the instance starts it when that
one ends; the pools' ``queue_depth`` of 1 lets the core submit that next wave early),
``terminate`` stops idle instances, and an agent with nothing to do for ``idle_shutdown``
seconds stops itself. Nothing is launched by ``submit``: with no instance in its pool an
attempt waits, QUEUED, for the core to provision one (discovery shows the pool's capacity: its
pending and running instances).

Credentials are the SDK's (``profile``, else the default chain) or an STS lease of ``role_arn``
renewed by the SDK before it expires (with a quarter of it left, at most 15 min); they live in
the session object only. Discovery's answers are kept: the instance types for the process, the
zones, subnets and spot prices for ``ANSWERS_TTL_S``. The SDK does not retry
(``total_max_attempts = 1``; in the client config ``max_attempts`` counts retries, not
attempts): a throttled or failed call raises a retryable ``ProviderError`` and the command
shell retries with the same keys or token.

Idempotency. Provision: the ``index``-th instance of a token is the agent ``TOKEN-INDEX``, its
``ClientToken`` and its ``stowplan:agent`` tag; EC2 honours the ClientToken, moto does not, so
provision first looks up the token's instances by tag and, after a lost answer, the agent's:
found, it is not launched again; not found, a retryable error (the shell's retry looks again).
Submit: the keys not known yet are written as ONE queue object per call,
``queue/BATCH.json`` (``render.batch_id`` of the keys), with ``If-None-Match: *``: a retry of
the same keys (a lost answer, a restart) is refused by S3 and reads the batch back instead of
writing it again. Dispatch: an attempt runs where its claim (``If-None-Match: *``) succeeded,
once, whatever was sent twice.

State: the queue and cancel objects, the inboxes, the agents' status objects and the claims in
S3 and the instances' tags are the truth; what this object holds is a cache a restarted driver
rebuilds from them (keys it does not know are looked up in the queue objects younger than
``QUEUE_LOOKBACK_S``, newest first;
the cancel objects are read back; the inboxes of live instances say where each was sent).

Observation, per ``describe``: one GET of the status object of each instance that has
unfinished attempts among the keys, then the fleet (one ``describe_instances`` per region, at
most every ``fleet_every_s`` and only when one of those instances has not changed its status
for that long: one that did is alive); nothing at all for attempts still waiting for an
instance. The
per-attempt objects (exit records, claims: one listing of their prefix for every run, or per
run when that takes fewer pages) are read only for attempts whose instance is gone or noticed,
whose claim was refused or whose process ended without an exit record. An attempt claimed by
an instance that is gone without an exit record failed with it (``states.gone_reason``: a spot
reclaim, or a spot notice, is PREEMPTED, anything else a node failure); one sent to a gone
instance but never claimed goes back to the queue. API calls so scale with submit calls,
instances and polls, not with attempts (presigning is local). Zones: each instance goes to a
zone discovery found usable, spread by agent id; a zone that ran out of capacity
(``InsufficientInstanceCapacity``) is left out for ``NO_CAPACITY_S``, a family at its vCPU
quota for ``QUOTA_S``, an unsupported zone for good, and the core hears of it through
``capacity_changes`` and re-places.

vCPU quotas, before a launch is refused: discovery reads the account's EC2 vCPU quotas of the
allowed types (Service Quotas ``GetServiceQuota``, one call per quota code and region) and the
account's pending and running instances (``describe_instances`` without the tag filter: what
other people and tools run counts too), at most every ``QUOTA_TTL_S``; this provider's own
instances are counted apart, fresh, from the fleet each discovery reads anyway. Each pool
carries what is left of its quota (``discover.py``) and the core launches within it. Where
Service Quotas does not answer (no ``servicequotas:GetServiceQuota`` permission, a region or
a test server without it) this is said once in the log and pools carry no quota: a launch
learns it when EC2 refuses one (above); discovery never fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct

from stowplan.errors import ProviderError, SpecError
from stowplan.placement.problem import Pool
from stowplan.providers.aws import prices
from stowplan.providers.aws.discover import (
    Offer,
    RegionAnswers,
    TypeInfo,
    allowed,
    is_glob,
    offers,
    parse_pool_id,
    type_info,
    vcpu_quota,
)
from stowplan.providers.aws.render import (
    AGENT_LEASE_S,
    LEASE_MARGIN_S,
    LEASE_MAX_S,
    TAG_AGENT,
    TAG_POOL,
    TAG_PROVIDER,
    TAG_STOPPED,
    AwsRequest,
    agent_id,
    attempt_prefix,
    batch_id,
    cancel_key,
    cancel_line,
    cancel_prefix,
    claim_prefix,
    exit_prefix,
    inbox_key,
    inbox_line,
    plan_agent,
    plan_attempts,
    queue_key,
    queue_prefix,
    status_key,
)
from stowplan.providers.aws.states import (
    AgentStatus,
    ErrorKind,
    ExitRecord,
    ec2_error,
    exit_state,
    gone_reason,
    parse_status,
)
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
)
from stowplan.spec.models import AwsProviderConfig, FailureClass

CONFIG_FILE = "stowplan.toml"
REQUEST_TIMEOUT_S = 60.0
FILTER_VALUES = 200
"""Values one EC2 filter takes."""
NO_CAPACITY_S = 600.0
QUOTA_S = 3600.0
LOG_POLL_S = 5.0
FLEET_EVERY_S = 10.0
"""``describe`` reads the fleet at most this often, and only while an instance with unfinished
attempts left its status unchanged that long (provision, terminate and discovery read it each
time): an instance gone is seen within twice this much more."""
FLEET_MOST_S = 60.0
"""``describe`` reads the fleet at least this often while attempts are unfinished."""
CAPACITY_QUEUE = 64
ANSWERS_TTL_S = 3600.0
"""How long a region's offerings, subnets and spot prices are kept (``_ANSWERS``)."""
QUEUE_LOOKBACK_S = AGENT_LEASE_S + LEASE_MARGIN_S
"""A restarted driver looks for a key it does not know in the queue objects younger than
this: an attempt queued before has run and ended (its agent halted when its lease did) or was
never sent; either way the core knows it already."""
_TYPES: dict[tuple[str, ...], list[TypeInfo]] = {}
"""(endpoint, credentials, region, allow-list) -> ``describe_instance_types``' answer: static
data, kept for the life of the process."""
_ANSWERS: dict[tuple[str, ...], tuple[float, RegionAnswers]] = {}
"""The same and the subnets and market -> (``time.monotonic()`` read, the region's answers):
kept ``ANSWERS_TTL_S``, so rediscovery (at every capacity change) costs no call."""
QUOTA_TTL_S = 300.0
"""How long a region's vCPU quotas and the account's use of them by others (``_QUOTAS``) are
kept; a launch refused for a quota (``VcpuLimitExceeded``) drops them."""
_QUOTAS: dict[tuple[str, ...], tuple[float, dict[str, float] | None, dict[str, float]]] = {}
"""(endpoint, credentials, provider, region, quota codes) -> (``time.monotonic()`` until when
it is kept, quota code -> its value (None: Service Quotas did not answer), quota code -> vCPUs
of the account's pending and running instances that are not this provider's)."""
_VCPUS: dict[tuple[str, str, str], int] = {}
"""(endpoint, region, instance type) -> its vCPUs, for types others run that are not allowed
here (static data, kept for the life of the process)."""
LIVE = frozenset({"pending", "running"})
"""Instance states that count as the pool's capacity and may be sent attempts."""
log = logging.getLogger(__name__)
_exit_decoder = msgspec.json.Decoder(ExitRecord)


class Ec2Error(ProviderError):
    """An AWS error answer, with its code and what it means (``states.ec2_error``)."""

    def __init__(self, provider: str, op: str, code: str, message: str) -> None:
        self.code = code
        self.kind = ec2_error(code)
        super().__init__(
            f"{op}: {code}: {message}",
            provider=provider,
            retryable=self.kind in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT),
        )


class AnswerLost(ProviderError):
    """No answer came (connection refused, reset or timed out): the call may have happened."""


class QueueBatch(Struct, frozen=True, kw_only=True):
    """Attempts submitted together, as stored at ``queue/BATCH.json`` (payloads apart)."""

    requests: list[AwsRequest]


class CancelBatch(Struct, frozen=True, kw_only=True):
    """Keys cancelled together, as stored at ``cancels/BATCH.json``."""

    keys: list[str]


class Claim(Struct, frozen=True, kw_only=True):
    key: str
    agent: str
    at: float = 0.0


class Item(Struct, kw_only=True):
    """A queued attempt as this driver knows it."""

    request: AwsRequest
    cancelled: bool = False
    agent: str | None = None
    """the agent it was sent to (None: waiting in the queue)."""
    after: str | None = None
    """the attempt it follows there: the agent holds it, unclaimed, while that one runs."""


class Agent(Struct, kw_only=True):
    """An instance running the agent, as ``describe_instances`` and its inbox show it."""

    id: str
    pool: str
    region: str
    instance_id: str
    state: str = "pending"
    reason: str = ""
    """``StateReason.Code``"""
    zone: str | None = None
    launched: float = 0.0
    stopped_by: str = ""
    lines: list[str] = msgspec.field(default_factory=list)
    """its inbox, as last written"""
    seq: int = 0
    loaded: bool = False
    """whether ``lines`` were read back (or written) by this driver"""
    status: AgentStatus | None = None
    """its status object, as last read"""
    final: bool = False
    """``status`` was read after the instance was gone: nothing more will come"""
    noticed: bool = False
    """its status says the spot interruption notice came: it takes nothing new"""
    body: bytes = b""
    """its status object as last read"""
    changed_at: float = -math.inf
    """``time.monotonic()`` when a read found its status changed: it was alive then"""

    @property
    def live(self) -> bool:
        return self.state in LIVE and not self.stopped_by and not self.noticed


def _after_of(fields: Sequence[str]) -> str | None:
    """The ``after=`` field of an inbox line (split), if any."""
    return next((f[6:] for f in fields[3:] if f.startswith("after=")), None)


def _needs_s(req: AwsRequest) -> float:
    """Seconds of an agent's lease an attempt needs left to be sent there: its lease, or,
    without a timeout (a lease as long as an agent's), ``LEASE_MARGIN_S``: it runs until the
    agent's lease ends at most."""
    return req.lease_s if req.lease_s < AGENT_LEASE_S else LEASE_MARGIN_S


class AwsProvider(Provider):
    poll_min = 5.0
    """an instance notes what it did at most once per AGENT_POLL_S (5 s): polling faster
    reads the same news again (each poll costs API calls by instance)"""
    poll_max = 30.0
    fleet_every_s = FLEET_EVERY_S
    """how stale the fleet (``describe_instances``) may be when ``describe`` reads it"""

    def __init__(
        self,
        name: str,
        config: AwsProviderConfig,
        *,
        state_dir: Path,
        project: str | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.project = project or Path(state_dir).absolute().parent.name or "default"
        self.capabilities = Capabilities(
            has=frozenset(
                {
                    Capability.RUNS,
                    Capability.GPUS,
                    Capability.LOGS,
                    Capability.CANCEL_MEMBER,
                    Capability.ELASTIC,
                    Capability.OUTPUTS,
                }
            ),
            why_not={
                Capability.CONTAINERS: "the aws provider runs commands on the AMI as they are; "
                "put what the task needs in the AMI and drop the image",
                Capability.SECRETS: "the aws provider does not resolve secrets (Secrets "
                "Manager) yet",
                Capability.ARRAYS: "each attempt is queued on its own; instances take "
                "several at once when they fit",
            },
            notes=(
                "on-demand prices come from a bundled, dated table (stowplan.providers.aws."
                "prices); spot prices from the API when it has recent values",
                "logs reach S3 every 15 s; `logs -f` shows them with that delay",
                "with role_arn, presigned URLs stop working when the STS lease they were made "
                "with expires: an instance must end within session_duration",
                "the AMI needs bash, curl, tar, setsid and timeout (any Amazon Linux or Ubuntu "
                "AMI has them)",
            ),
        )
        self.table = prices.load(config.prices, field_path=f"$.providers.{name}.prices")
        self._session: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[tuple[str, str], Any] = {}
        self._client_lock = asyncio.Lock()
        self._lock = asyncio.Lock()
        """serialises what reads and changes the queue, the fleet and the inboxes."""
        self._offers: dict[str, Offer] = {}
        self._most: dict[str, int] = {}
        """pool -> the most instances it may have at once (config and max_hourly_usd)."""
        self._unavailable: dict[tuple[str, str, bool], tuple[str, float]] = {}
        self._items: dict[str, Item] = {}
        self._batches: set[str] = set()
        """queue objects read or written by this driver"""
        self._cancels: set[str] = set()
        """cancel objects read or written by this driver"""
        self._cancelled: set[str] = set()
        """keys those cancel"""
        self._payloads: set[str] = set()
        """payload objects this driver wrote"""
        self._agents: dict[str, Agent] = {}
        self._fleet_seen = False
        self._fleet_at = -math.inf
        """``time.monotonic()`` of the last read of every region"""
        self._finished: dict[str, Report] = {}
        self._capacity: asyncio.Queue[str] = asyncio.Queue(CAPACITY_QUEUE)
        self.notes: list[str] = []
        """what the last discovery left out, and why."""
        self._quota_said = False
        """whether the log was told that Service Quotas did not answer (said once)."""
        self.calls: Counter[str] = Counter()
        """API calls made, by operation (a diagnostic, and the benchmark's count)."""
        self.wall: Callable[[], float] = time.time
        """the wall clock S3's LastModified is compared with (a test moves it)."""
        self.sts_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        """the clock an STS lease's expiry is compared with (a test moves it)."""

    # -- the SDK edge -------------------------------------------------------------------------

    async def _base_session(self) -> Any:
        from aiobotocore.session import AioSession  # type: ignore[import-untyped]

        return AioSession(profile=self.config.profile)

    async def _get_session(self) -> Any:
        if self._session is not None:
            return self._session
        session = await self._base_session()
        if self.config.role_arn is not None:
            from aiobotocore.credentials import (  # type: ignore[import-untyped]
                AioRefreshableCredentials,
            )

            base = session
            role = self.config.role_arn
            duration = int(float(self.config.session_duration))

            async def lease() -> dict[str, str]:
                async with base.create_client("sts", config=self._sdk_config()) as sts:
                    got = await self._call(
                        sts,
                        "assume_role",
                        RoleArn=role,
                        RoleSessionName=f"stowplan-{self.name}"[:64],
                        DurationSeconds=duration,
                    )
                c = got["Credentials"]
                return {
                    "access_key": c["AccessKeyId"],
                    "secret_key": c["SecretAccessKey"],
                    "token": c["SessionToken"],
                    "expiry_time": c["Expiration"].isoformat(),
                }

            first = await lease()
            # NOTE: the SDK renews 15 min before expiry (10 min: it must); a lease of 15 min
            # would be renewed at every call: renew at a quarter of it left (a sixth: must)
            creds = AioRefreshableCredentials(
                access_key=first["access_key"],
                secret_key=first["secret_key"],
                token=first["token"],
                expiry_time=datetime.fromisoformat(first["expiry_time"]),
                refresh_using=lease,
                method="sts-assume-role",
                time_fetcher=lambda: self.sts_clock(),
                advisory_timeout=min(15 * 60, duration // 4),
                mandatory_timeout=min(10 * 60, duration // 6),
            )
            session = await self._base_session()
            session._credentials = creds  # NOTE: aiobotocore's way to hand a session credentials
        self._session = session
        return session

    def _sdk_config(self, **extra: Any) -> Any:
        from aiobotocore.config import AioConfig  # type: ignore[import-untyped]

        return AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},  # no SDK retries
            connect_timeout=10,
            read_timeout=REQUEST_TIMEOUT_S,
            **extra,
        )

    async def _client(self, service: str, region: str) -> Any:
        async with self._client_lock:
            client = self._clients.get((service, region))
            if client is None:
                session = await self._get_session()
                extra = {"signature_version": "s3v4"} if service == "s3" else {}
                client = await self._stack.enter_async_context(
                    session.create_client(
                        service, region_name=region, config=self._sdk_config(**extra)
                    )
                )
                self._clients[(service, region)] = client
            return client

    async def _s3(self) -> Any:
        return await self._client("s3", self.config.regions[0])

    async def _call(self, client: Any, op: str, **kwargs: Any) -> Any:
        """One API call, bounded in time, its errors translated once."""
        from botocore.exceptions import (  # type: ignore[import-untyped]
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        self.calls[op] += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await getattr(client, op)(**kwargs)
        except ClientError as e:
            err = e.response.get("Error") or {}
            code = str(err.get("Code") or "Unknown")
            raise Ec2Error(self.name, op, code, str(err.get("Message") or "")) from None
        except (
            EndpointConnectionError,
            ConnectionClosedError,
            ConnectTimeoutError,
            ReadTimeoutError,
            TimeoutError,
            OSError,
        ) as e:
            raise AnswerLost(
                f"{op}: no answer ({type(e).__name__})", provider=self.name, retryable=True
            ) from None
        except BotoCoreError as e:
            # credentials missing, a parameter the SDK refused: trying again will not help
            raise ProviderError(
                f"{op}: {type(e).__name__}: {e}", provider=self.name, retryable=False
            ) from None
        except Exception as e:
            if type(e).__module__.startswith("aiohttp"):
                raise AnswerLost(
                    f"{op}: no answer ({type(e).__name__})", provider=self.name, retryable=True
                ) from None
            raise

    async def _pages(self, client: Any, op: str, key: str, **kwargs: Any) -> list[Any]:
        out: list[Any] = []
        token: str | None = None
        while True:
            page = await self._call(client, op, **kwargs, **({"NextToken": token} if token else {}))
            out.extend(page.get(key) or [])
            token = page.get("NextToken")
            if not token:
                return out

    # -- discover / plan ----------------------------------------------------------------------

    def _spec_error(self, field_path: str, message: str, hint: str) -> SpecError:
        return SpecError(
            message, file=CONFIG_FILE, path=f"$.providers.{self.name}.{field_path}", hint=hint
        )

    async def _answers(self, region: str) -> RegionAnswers:
        """What discovery asks EC2 of ``region``: the instance types (once per process), the
        zones offering them, the subnets' zones and spot prices (at most every
        ``ANSWERS_TTL_S``)."""
        ec2 = await self._client("ec2", region)
        cfg = self.config
        who = (
            str(getattr(ec2.meta, "endpoint_url", "")),
            cfg.profile or "",
            cfg.role_arn or "",
            region,
            *cfg.instance_types,
        )
        full = (*who, "|", cfg.spot, *cfg.subnets)
        cached = _ANSWERS.get(full)
        if cached is not None and time.monotonic() - cached[0] < ANSWERS_TTL_S:
            return cached[1]
        began = time.monotonic()
        types = _TYPES.get(who)
        if types is None:
            raw = await self._pages(
                ec2,
                "describe_instance_types",
                "InstanceTypes",
                Filters=[{"Name": "instance-type", "Values": list(cfg.instance_types)}],
            )
            types = _TYPES[who] = [type_info(t) for t in raw]
        names = sorted({t.name for t in types})
        zones: dict[str, list[str]] = {}
        for i in range(0, len(names), FILTER_VALUES):
            for o in await self._pages(
                ec2,
                "describe_instance_type_offerings",
                "InstanceTypeOfferings",
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": names[i : i + FILTER_VALUES]}],
            ):
                zones.setdefault(str(o["InstanceType"]), []).append(str(o["Location"]))
        subnet_zones: dict[str, str] = {}
        if self.config.subnets:
            for s in await self._pages(
                ec2,
                "describe_subnets",
                "Subnets",
                Filters=[{"Name": "subnet-id", "Values": list(self.config.subnets)}],
            ):
                subnet_zones[str(s["SubnetId"])] = str(s["AvailabilityZone"])
        spot_rows: dict[str, list[dict[str, Any]]] = {}
        if self.config.spot != "never" and names:
            for i in range(0, len(names), FILTER_VALUES):
                for r in await self._pages(
                    ec2,
                    "describe_spot_price_history",
                    "SpotPriceHistory",
                    InstanceTypes=names[i : i + FILTER_VALUES],
                    ProductDescriptions=["Linux/UNIX"],
                    StartTime=time.time() - 3600,
                ):
                    spot_rows.setdefault(str(r["InstanceType"]), []).append(r)
        answers = RegionAnswers(
            region=region,
            types=types,
            zones=zones,
            subnet_zones=subnet_zones,
            spot_rows=spot_rows,
        )
        _ANSWERS[full] = (began, answers)
        return answers

    def _quota_key(self, ec2: Any, region: str, codes: Sequence[str]) -> tuple[str, ...]:
        cfg = self.config
        who = str(getattr(ec2.meta, "endpoint_url", ""))
        return (who, cfg.profile or "", cfg.role_arn or "", self.name, region, *codes)

    def _quota_codes(self, answers: RegionAnswers) -> list[str]:
        """The vCPU quotas the allowed types of a region count against, in their markets."""
        markets = {"never": [False], "prefer": [False, True], "only": [True]}[self.config.spot]
        return sorted(
            {
                q[0]
                for t in answers.types
                if allowed(t.name, self.config.instance_types)
                for spot in markets
                if (q := vcpu_quota(t.name, spot)) is not None
            }
        )

    async def _quota_use(
        self, answers: RegionAnswers
    ) -> tuple[dict[str, float] | None, dict[str, float]]:
        """The vCPU quotas of a region's allowed types (code -> value; None: Service Quotas
        did not answer) and the vCPUs the account's pending and running instances that are
        not this provider's take from each (kept ``QUOTA_TTL_S``)."""
        region = answers.region
        codes = self._quota_codes(answers)
        if not codes:
            return None, {}
        ec2 = await self._client("ec2", region)
        key = self._quota_key(ec2, region, codes)
        cached = _QUOTAS.get(key)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1], cached[2]
        began = time.monotonic()
        limits: dict[str, float] = {}
        try:
            sq = await self._client("service-quotas", region)
            for code in codes:
                got = await self._call(sq, "get_service_quota", ServiceCode="ec2", QuotaCode=code)
                limits[code] = float((got.get("Quota") or {})["Value"])
            used = await self._others_vcpus(ec2, key[0], answers, limits)
        except (ProviderError, KeyError, TypeError, ValueError) as e:
            if not self._quota_said:
                self._quota_said = True
                log.warning(
                    "%s: the account's EC2 vCPU quotas could not be read in %s (%s): pools "
                    "carry no quota, and a launch learns one when EC2 refuses it "
                    "(VcpuLimitExceeded); allow servicequotas:GetServiceQuota to plan within "
                    "them",
                    self.name,
                    region,
                    e,
                )
            again = isinstance(e, ProviderError) and e.retryable
            _QUOTAS[key] = (began + (QUOTA_TTL_S if again else ANSWERS_TTL_S), None, {})
            return None, {}
        _QUOTAS[key] = (began + QUOTA_TTL_S, limits, used)
        return limits, used

    async def _others_vcpus(
        self, ec2: Any, endpoint: str, answers: RegionAnswers, limits: dict[str, float]
    ) -> dict[str, float]:
        """Quota code (of ``limits``) -> vCPUs of the account's pending and running instances
        in the region that are not this provider's: ``describe_instances`` without the tag
        filter, and ``describe_instance_types`` once for a type others run that is not
        allowed here."""
        region = answers.region
        reservations = await self._pages(
            ec2,
            "describe_instances",
            "Reservations",
            Filters=[{"Name": "instance-state-name", "Values": sorted(LIVE)}],
        )
        vcpus = {t.name: t.vcpus for t in answers.types}
        rows: list[tuple[str, str]] = []
        for r in reservations:
            for inst in r.get("Instances") or []:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
                if tags.get(TAG_PROVIDER) == self.name:
                    continue  # this provider's own: counted from the fleet, fresh
                itype = str(inst.get("InstanceType") or "")
                q = vcpu_quota(itype, inst.get("InstanceLifecycle") == "spot")
                if q is not None and q[0] in limits:
                    rows.append((q[0], itype))
        unknown = sorted(
            {t for _, t in rows if t not in vcpus and (endpoint, region, t) not in _VCPUS}
        )
        for i in range(0, len(unknown), 100):
            for raw in await self._pages(
                ec2, "describe_instance_types", "InstanceTypes", InstanceTypes=unknown[i : i + 100]
            ):
                info = type_info(raw)
                _VCPUS[(endpoint, region, info.name)] = info.vcpus
        used: dict[str, float] = {}
        for code, itype in rows:
            n = vcpus.get(itype) or _VCPUS.get((endpoint, region, itype), 0)
            used[code] = used.get(code, 0.0) + n
        return used

    def _own_vcpus(self, answers: RegionAnswers) -> dict[str, float]:
        """Quota code -> vCPUs of this provider's pending and running instances in the
        region, as the fleet read last shows them (those asked to stop count until gone)."""
        vcpus = {t.name: t.vcpus for t in answers.types}
        out: dict[str, float] = {}
        for a in self._agents.values():
            ref = parse_pool_id(self.name, a.pool)
            if a.region != answers.region or a.state not in LIVE or ref is None:
                continue
            q = vcpu_quota(ref.instance_type, ref.spot)
            if q is not None:
                out[q[0]] = out.get(q[0], 0.0) + vcpus.get(ref.instance_type, 0)
        return out

    def _still_unavailable(self) -> dict[tuple[str, str, bool], str]:
        now = time.monotonic()
        for k in [k for k, (_, until) in self._unavailable.items() if until <= now]:
            del self._unavailable[k]
        return {k: why for k, (why, _) in self._unavailable.items()}

    def _learn(self, what: tuple[str, str, bool], why: str, for_s: float) -> None:
        self._unavailable[what] = (why, time.monotonic() + for_s)
        self._changed(why)

    def _changed(self, why: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._capacity.put_nowait(why)

    async def discover(self) -> list[Pool]:
        answers = await asyncio.gather(*(self._answers(r) for r in self.config.regions))
        for i, t in enumerate(self.config.instance_types):
            if is_glob(t):
                continue
            missing = [a.region for a in answers if t not in {x.name for x in a.types}]
            if missing:
                raise self._spec_error(
                    f"instance_types[{i}]",
                    f"instance type {t!r} does not exist in {', '.join(missing)}",
                    "check the name (aws ec2 describe-instance-types), or use a pattern such "
                    "as 'g5.*' to take what each region has",
                )
        if self.config.subnets:
            found = {s for a in answers for s in a.subnet_zones}
            for i, s in enumerate(self.config.subnets):
                if s not in found:
                    raise self._spec_error(
                        f"subnets[{i}]",
                        f"subnet {s!r} is in none of the regions {', '.join(self.config.regions)}",
                        "give subnets of the configured regions, or add the subnet's region",
                    )
        use = await asyncio.gather(*(self._quota_use(a) for a in answers))
        async with self._lock:
            await self._refresh()
            unavailable = self._still_unavailable()
            now = time.time()
            notes: list[str] = []
            found_offers: dict[str, Offer] = {}
            for a, (limits, others) in zip(answers, use, strict=True):
                quotas = None
                if limits is not None:
                    own = self._own_vcpus(a)
                    quotas = {
                        code: (limit, limit - others.get(code, 0.0) - own.get(code, 0.0))
                        for code, limit in limits.items()
                    }
                got, why = offers(
                    self.name,
                    self.config,
                    a,
                    self.table,
                    now=now,
                    unavailable=unavailable,
                    quotas=quotas,
                )
                notes += why
                for o in got:
                    found_offers[o.pool.id] = o
            self._offers = found_offers
            self._most = {pid: o.pool.max_instances for pid, o in found_offers.items()}
            self.notes = notes
            live = Counter(a.pool for a in self._agents.values() if a.live)
            pools = []
            for pid, o in sorted(found_offers.items()):
                n, node = live[pid], o.pool.node
                assert node is not None  # offers() gives every pool its shape
                pools.append(
                    msgspec.structs.replace(
                        o.pool,
                        cpus=n * node.cpus,
                        memory=n * node.memory,
                        gpus={m: n * c for m, c in node.gpus.items() if n},
                        max_instances=max(0, self._most[pid] - n),
                    )
                )
            return pools

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return list(
            plan_attempts(launches, provider=self.name, config=self.config, pools=facts.pools)
        )

    # -- the fleet ----------------------------------------------------------------------------

    async def _instances(self, region: str, filters: list[dict[str, Any]]) -> list[Any]:
        ec2 = await self._client("ec2", region)
        reservations = await self._pages(
            ec2,
            "describe_instances",
            "Reservations",
            Filters=[{"Name": f"tag:{TAG_PROVIDER}", "Values": [self.name]}, *filters],
        )
        return [i for r in reservations for i in r.get("Instances") or []]

    async def tagged_instances(self, regions: Sequence[str] | None = None) -> list[tuple[str, Any]]:
        """Every instance tagged as this provider's (``stowplan:provider``), whatever its
        state, in each configured region (or ``regions``): ``(region, describe_instances
        entry)``. What ``stowplan gc`` looks at."""
        out: list[tuple[str, Any]] = []
        for region in regions or self.config.regions:
            out += [(region, inst) for inst in await self._instances(region, [])]
        return out

    async def terminate_instances(self, region: str, instance_ids: Sequence[str]) -> None:
        """Terminate the instances ``instance_ids`` of ``region`` (500 a call); idempotent:
        one already gone is not an error. What ``stowplan gc --yes`` does to strays."""
        ec2 = await self._client("ec2", region)
        ids = list(dict.fromkeys(instance_ids))
        for i in range(0, len(ids), 500):
            try:
                await self._call(ec2, "terminate_instances", InstanceIds=ids[i : i + 500])
            except Ec2Error as e:
                if e.code != "InvalidInstanceID.NotFound":
                    raise

    def _see(self, region: str, inst: Any) -> Agent | None:
        """Take in one ``describe_instances`` entry; the agent it is (None: not an agent)."""
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
        aid, pool = tags.get(TAG_AGENT), tags.get(TAG_POOL)
        if aid is None or pool is None:
            return None
        state = str((inst.get("State") or {}).get("Name") or "")
        agent = self._agents.get(aid)
        if agent is None:
            launched = inst.get("LaunchTime")
            agent = self._agents[aid] = Agent(
                id=aid,
                pool=pool,
                region=region,
                instance_id=str(inst["InstanceId"]),
                launched=launched.timestamp() if hasattr(launched, "timestamp") else time.time(),
            )
        elif agent.live and state not in LIVE:
            self._changed(f"instance {agent.instance_id} of {pool} is {state}")
        agent.state = state
        agent.reason = str((inst.get("StateReason") or {}).get("Code") or "")
        agent.zone = (inst.get("Placement") or {}).get("AvailabilityZone")
        agent.stopped_by = tags.get(TAG_STOPPED, agent.stopped_by)
        return agent

    async def _refresh(self, regions: Sequence[str] | None = None) -> None:
        """Read the fleet: one ``describe_instances`` per region; the inboxes of live
        instances this driver has not written (after a restart) are read back."""
        began = time.monotonic()
        for region in regions or self.config.regions:
            for inst in await self._instances(region, []):
                self._see(region, inst)
        self._fleet_seen = True
        if regions is None or set(regions) >= set(self.config.regions):
            self._fleet_at = began
        s3 = await self._s3()
        for agent in sorted(self._agents.values(), key=lambda a: a.id):
            if agent.loaded or not agent.live:
                continue
            body = await self._get(s3, inbox_key(self.config, agent.id))
            agent.lines = (body or b"").decode().splitlines()
            agent.loaded = True
            for line in agent.lines:
                f = line.split()
                if len(f) >= 3 and f[0].isdigit():
                    agent.seq = max(agent.seq, int(f[0]))
                    item = self._items.get(f[2])
                    if f[1] == "run" and item is not None and item.agent is None:
                        item.agent, item.after = agent.id, _after_of(f)

    def _busy(self) -> dict[str, list[Item]]:
        """agent -> the unfinished attempts sent to it."""
        out: dict[str, list[Item]] = {}
        for k, item in self._items.items():
            if item.agent is not None and k not in self._finished:
                out.setdefault(item.agent, []).append(item)
        return out

    def _behind(self, item: Item) -> bool:
        """Whether ``item`` waits at its agent for an attempt that still runs there."""
        if item.after is None or item.after in self._finished:
            return False
        first = self._items.get(item.after)
        return first is not None and first.agent == item.agent

    async def _dispatch(self) -> None:
        """Send each waiting attempt to a live instance of its pool with room for it (the one
        with least room left that fits); then each still waiting to follow an attempt sent
        there that needs as much or more, one per attempt (its next wave: the instance starts
        it when that one ends, without waiting for a poll); then write the inboxes that
        changed."""
        waiting = [
            i
            for k, i in self._items.items()
            if i.agent is None and not i.cancelled and k not in self._finished
        ]
        if not waiting:
            return
        if not self._fleet_seen:
            await self._refresh()
        busy = self._busy()
        now = time.time()
        free: dict[str, tuple[float, int, int]] = {}
        ends: dict[str, list[Item]] = {}
        """agent -> attempts that run there and no attempt follows yet"""
        for a in self._agents.values():
            offer = self._offers.get(a.pool)
            if not a.live or offer is None or offer.pool.node is None:
                continue
            node = offer.pool.node
            cpus, mem, gpus = node.cpus, node.memory, sum(node.gpus.values())
            mine = busy.get(a.id, [])
            followed = {i.after for i in mine if self._behind(i)}
            for i in mine:
                if self._behind(i):
                    continue
                cpus, mem, gpus = (
                    cpus - i.request.cpus,
                    mem - i.request.memory,
                    gpus - i.request.gpus,
                )
                if i.request.key not in followed and not i.cancelled:
                    ends.setdefault(a.id, []).append(i)
            free[a.id] = (cpus, mem, gpus)
        changed: set[str] = set()
        later: list[Item] = []
        for item in waiting:
            req = item.request
            fits = [
                (g, c, aid)
                for aid, (c, m, g) in free.items()
                if self._agents[aid].pool == req.pool
                and g >= req.gpus
                and c >= req.cpus - 1e-9
                and m >= req.memory
                and self._agents[aid].launched + AGENT_LEASE_S - now > _needs_s(req)
            ]
            if not fits:
                later.append(item)
                continue
            _, _, aid = min(fits)
            agent = self._agents[aid]
            left = int(agent.launched + AGENT_LEASE_S - now)
            await self._send(item, agent, min(req.lease_s, left))
            c, m, g = free[aid]
            free[aid] = (c - req.cpus, m - req.memory, g - req.gpus)
            ends.setdefault(aid, []).append(item)
            changed.add(aid)
        for item in later:
            req = item.request
            behind = [
                (first.request.gpus, first.request.cpus, first.request.memory, first.request.key)
                for aid, firsts in ends.items()
                if self._agents[aid].pool == req.pool
                for first in firsts
                if first.request.gpus >= req.gpus
                and first.request.cpus >= req.cpus - 1e-9
                and first.request.memory >= req.memory
                # its URLs must outlast the one before it, then itself
                and first.request.lease_s + req.lease_s <= LEASE_MAX_S
                and self._agents[aid].launched + AGENT_LEASE_S - now
                > first.request.lease_s + _needs_s(req)
            ]
            if not behind:
                continue
            first = self._items[min(behind)[3]]
            assert first.agent is not None  # in ends: sent
            agent = self._agents[first.agent]
            ends[agent.id].remove(first)
            lease = first.request.lease_s + req.lease_s
            await self._send(item, agent, lease, after=first.request.key)
            changed.add(agent.id)
        await self._write_inboxes(changed)

    async def _presign(self, method: str, obj: str, expires: int, **params: str) -> str:
        s3 = await self._s3()
        self.calls["presign"] += 1
        url: str = await s3.generate_presigned_url(
            "get_object" if method == "GET" else "put_object",
            Params={"Bucket": self.config.bucket_name, "Key": obj, **params},
            ExpiresIn=expires,
        )
        return url

    async def _send(
        self, item: Item, agent: Agent, lease_s: int, *, after: str | None = None
    ) -> None:
        """Add the attempt's line to ``agent``'s inbox (written by ``_write_inboxes``): its
        script with fresh URLs valid ``lease_s`` seconds, presigned here (no API call), and
        the attempt it follows there (``after``)."""
        req = item.request
        lease = max(1, lease_s)
        urls = {
            slot: await self._presign(method, obj, lease)
            for slot, (method, obj) in req.slots.items()
        }
        line = {
            "claim": await self._presign("PUT", req.claim_key, lease, IfNoneMatch="*"),
            "claimed": await self._presign("GET", req.claim_key, lease),
            "exit": urls["exit"],
        }
        agent.seq += 1
        agent.lines.append(inbox_line(agent.seq, req.key, line, req.user_data(urls), after=after))
        agent.loaded = True
        item.agent, item.after = agent.id, after

    async def _write_inboxes(self, agents: set[str]) -> None:
        s3 = await self._s3()
        for aid in sorted(agents):
            agent = self._agents[aid]
            # lines of finished attempts are dropped; cancel lines stay (one may be running)
            agent.lines = [
                line
                for line in agent.lines
                if not (line.split()[1:2] == ["run"] and line.split()[2] in self._finished)
            ]
            await self._call(
                s3,
                "put_object",
                Bucket=self.config.bucket_name,
                Key=inbox_key(self.config, aid),
                Body="".join(f"{line}\n" for line in agent.lines).encode(),
            )

    # -- provision / terminate ----------------------------------------------------------------

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        ref = parse_pool_id(self.name, pool)
        if ref is None or count < 1:
            raise ProviderError(
                f"cannot provision {count} instance(s) of {pool!r}: not a pool of this provider",
                provider=self.name,
                retryable=False,
            )
        if pool not in self._offers:
            await self.discover()
        async with self._lock:
            offer = self._offers.get(pool)
            if offer is None:
                why = "; ".join(n for n in self.notes if n.startswith(pool + ":"))
                raise ProviderError(
                    f"{pool}: not offered now" + (f" ({why})" if why else ""),
                    provider=self.name,
                    retryable=False,
                )
            await self._refresh([ref.region])  # the token's instances, launched before?
            mine = {a.id: a for a in self._agents.values() if a.id.rsplit("-", 1)[0] == token}
            others = sum(1 for a in self._agents.values() if a.pool == pool and a.live) - sum(
                1 for a in mine.values() if a.live
            )
            want = min(count, self._most.get(pool, 0) - others)
            if want < 1 and not mine:
                raise ProviderError(
                    f"{pool}: all {self._most.get(pool, 0)} instances it may have are running "
                    "(max_instances, max_hourly_usd)",
                    provider=self.name,
                    retryable=False,
                )
            failed: ProviderError | None = None
            for index in range(want):
                aid = agent_id(token, index)
                if aid in mine:
                    continue
                try:
                    mine[aid] = await self._launch(pool, aid)
                except Ec2Error as e:
                    if e.retryable:
                        raise
                    failed = e
                    break
            if not mine:
                assert failed is not None
                raise ProviderError(str(failed), provider=self.name, retryable=False)
            await self._dispatch()
            return [mine[a].instance_id for a in sorted(mine, key=lambda a: int(a.rsplit("-")[-1]))]

    def _zone_for(self, pool: str, agent: str) -> tuple[str, str | None] | None:
        offer = self._offers.get(pool)
        ref = parse_pool_id(self.name, pool)
        if offer is None or ref is None:
            return None
        unavailable = self._still_unavailable()
        zones = [z for z in offer.zones if (ref.instance_type, z, ref.spot) not in unavailable]
        if not zones:
            return None
        pick = zones[int(hashlib.sha256(agent.encode()).hexdigest(), 16) % len(zones)]
        return pick, offer.subnets.get(pick)

    async def _find_agent(self, region: str, aid: str) -> Agent | None:
        for inst in await self._instances(region, [{"Name": f"tag:{TAG_AGENT}", "Values": [aid]}]):
            agent = self._see(region, inst)
            if agent is not None and agent.id == aid:
                return agent
        return None

    async def _launch(self, pool: str, aid: str) -> Agent:
        """Start the agent ``aid`` of ``pool`` (one ``RunInstances``), unless it exists."""
        req = plan_agent(
            provider=self.name, project=self.project, config=self.config, pool=pool, agent=aid
        )
        where = self._zone_for(pool, aid)
        if where is None:
            raise Ec2Error(
                self.name, "RunInstances", "InsufficientInstanceCapacity", f"{pool}: no usable zone"
            )
        zone, subnet = where
        url = await self._presign("GET", req.inbox_key, AGENT_LEASE_S)
        status_url = await self._presign("PUT", req.status_key, AGENT_LEASE_S)
        params = dict(req.params, UserData=req.user_data(url, status_url))
        if subnet is not None:
            params["SubnetId"] = subnet
        else:
            params["Placement"] = {"AvailabilityZone": zone}
        ec2 = await self._client("ec2", req.region)
        try:
            got = await self._call(ec2, "run_instances", **params)
        except AnswerLost:
            # the launch may have happened: look once; a retried provision looks again
            found = await self._find_agent(req.region, aid)
            if found is not None:
                return found
            raise
        except Ec2Error as e:
            if e.kind is ErrorKind.ALREADY:
                found = await self._find_agent(req.region, aid)
                if found is not None:
                    return found
                raise ProviderError(
                    f"{e.message}; its instance is not visible yet",
                    provider=self.name,
                    retryable=True,
                ) from None
            self._learn_from(req.instance_type, req.spot, req.region, zone, e)
            raise
        inst = (got.get("Instances") or [{}])[0]
        agent = self._see(req.region, {**inst, "Tags": params["TagSpecifications"][0]["Tags"]})
        assert agent is not None  # our own tags
        agent.loaded = True  # its inbox is ours from the start: empty
        return agent

    def _learn_from(self, itype: str, spot: bool, region: str, zone: str, e: Ec2Error) -> None:
        market = "spot" if spot else "on-demand"
        family = itype.split(".", 1)[0]
        if e.kind is ErrorKind.NO_CAPACITY:
            self._learn((itype, zone, spot), f"{itype} {market} in {zone}: {e.code}", NO_CAPACITY_S)
        elif e.kind is ErrorKind.QUOTA:
            for k in [k for k in _QUOTAS if k[3:5] == (self.name, region)]:
                del _QUOTAS[k]  # someone else launched meanwhile: read the use again
            self._learn((family, "*", spot), f"{family} {market} in {region}: {e.code}", QUOTA_S)
        elif e.kind is ErrorKind.UNSUPPORTED:
            self._learn((itype, zone, spot), f"{itype} in {zone}: {e.code}", math.inf)

    async def terminate(self, pool: str, count: int, token: str) -> None:
        ref = parse_pool_id(self.name, pool)
        if ref is None:
            raise ProviderError(
                f"cannot terminate instances of {pool!r}: not a pool of this provider",
                provider=self.name,
                retryable=False,
            )
        async with self._lock:
            await self._refresh([ref.region])
            if any(a.stopped_by == token for a in self._agents.values()):
                return  # done before
            busy = self._busy()
            idle = sorted(
                (
                    a
                    for a in self._agents.values()
                    if a.pool == pool and a.live and not busy.get(a.id)
                ),
                key=lambda a: (-a.launched, a.id),
            )[:count]
            if not idle:
                return
            ec2 = await self._client("ec2", ref.region)
            ids = [a.instance_id for a in idle]
            await self._call(
                ec2, "create_tags", Resources=ids, Tags=[{"Key": TAG_STOPPED, "Value": token}]
            )
            for a in idle:
                a.stopped_by = token
            try:
                await self._call(ec2, "terminate_instances", InstanceIds=ids)
            except Ec2Error as e:
                if e.code != "InvalidInstanceID.NotFound":
                    raise

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        reqs: list[AwsRequest] = []
        for req in requests:
            if not isinstance(req, AwsRequest):
                raise ProviderError(
                    f"not an AWS request: {type(req).__name__}",
                    provider=self.name,
                    retryable=False,
                )
            reqs.append(req)
        s3 = await self._s3()
        bucket = self.config.bucket_name
        known: list[str] = []
        async with self._lock:
            fresh: dict[str, AwsRequest] = {}
            for req in reqs:
                if req.key in self._items or req.key in self._finished:
                    known.append(req.key)
                else:
                    fresh.setdefault(req.key, req)
            for req in fresh.values():
                obj = req.slots["payload"][1] if req.payload is not None else None
                if obj is not None and obj not in self._payloads:
                    await self._call(s3, "put_object", Bucket=bucket, Key=obj, Body=req.payload)
                    self._payloads.add(obj)
            if fresh:
                batch = QueueBatch(
                    requests=[msgspec.structs.replace(r, payload=None) for r in fresh.values()]
                )
                name = queue_key(self.config, batch_id(list(fresh)))
                try:
                    await self._call(
                        s3,
                        "put_object",
                        Bucket=bucket,
                        Key=name,
                        Body=msgspec.json.encode(batch),
                        IfNoneMatch="*",
                    )
                except Ec2Error as e:
                    if e.code not in ("PreconditionFailed", "412"):
                        raise
                    known += fresh  # queued before (a lost answer, a restart): read it back
                else:
                    self._batches.add(name)
                    for r in batch.requests:
                        self._items[r.key] = Item(request=r)
            await self._dispatch()
        before = {r.key: r for r in await self.describe(known)} if known else {}
        return [
            before.get(r.key)
            or Report(key=r.key, state=ProviderState.QUEUED, message=f"queued for {r.pool}")
            for r in reqs
        ]

    # -- describe -----------------------------------------------------------------------------

    async def _load(self, keys: Sequence[str]) -> None:
        """Read back the queued attempts among ``keys`` this driver does not know (after a
        restart): the queue objects younger than ``QUEUE_LOOKBACK_S``, newest first, until
        each is found or none is left unread (a key in none stays unknown: UNKNOWN); then
        every cancel object not read yet, and the inboxes already read back say where they
        were sent."""
        missing = {k for k in keys if k not in self._items and k not in self._finished}
        if not missing:
            return
        s3 = await self._s3()
        listed = await self._pages_s3(s3, self.config.bucket_name, queue_prefix(self.config))
        assert listed is not None  # no page limit
        oldest = self.wall() - QUEUE_LOOKBACK_S
        for name in sorted(listed, key=lambda n: (-listed[n], n)):
            if not missing or listed[name] < oldest:
                break
            if name in self._batches:
                continue
            body = await self._get(s3, name)
            self._batches.add(name)
            try:
                batch = msgspec.json.decode(body or b"", type=QueueBatch)
            except msgspec.DecodeError:
                continue
            for req in batch.requests:
                if req.key not in self._items and req.key not in self._finished:
                    self._items[req.key] = Item(request=req)
                missing.discard(req.key)
        cancels = await self._pages_s3(s3, self.config.bucket_name, cancel_prefix(self.config))
        assert cancels is not None
        for name in sorted(set(cancels) - self._cancels):
            body = await self._get(s3, name)
            self._cancels.add(name)
            with contextlib.suppress(msgspec.DecodeError):
                self._cancelled.update(msgspec.json.decode(body or b"", type=CancelBatch).keys)
        for k in self._cancelled:
            if k in self._items:
                self._items[k].cancelled = True
        for agent in self._agents.values():  # sent before a restart?
            if not agent.loaded:
                continue
            for line in agent.lines:
                f = line.split()
                item = self._items.get(f[2]) if len(f) >= 3 and f[1] == "run" else None
                if item is not None and item.agent is None:
                    item.agent, item.after = agent.id, _after_of(f)

    async def _listed(self, keys: Sequence[str], prefix_of: Any) -> set[str]:
        """The keys of ``keys`` with an object under ``prefix_of(config, run)``: one listing
        of the prefix of every run (a sweep is one run per trial) while that takes fewer pages
        than one listing per run, else one listing per run."""
        by_run: dict[str, list[str]] = {}
        for k in keys:
            by_run.setdefault(self._items[k].request.run_id, []).append(k)
        s3 = await self._s3()
        out: set[str] = set()
        if len(by_run) > 1:
            run = next(iter(by_run))
            whole = prefix_of(self.config, run).removesuffix(f"{run}/")
            names = await self._pages_s3(
                s3, self.config.bucket_name, whole, most_pages=len(by_run) - 1
            )
            if names is not None:
                return {
                    k
                    for run, run_keys in by_run.items()
                    for k in run_keys
                    if f"{prefix_of(self.config, run)}{k}.json" in names
                }
        for run, run_keys in sorted(by_run.items()):
            prefix = prefix_of(self.config, run)
            names = await self._pages_s3(s3, self.config.bucket_name, prefix)
            assert names is not None  # no page limit
            out.update(k for k in run_keys if f"{prefix}{k}.json" in names)
        return out

    async def _exit_record(self, key: str) -> ExitRecord | None:
        body = await self._get(await self._s3(), self._items[key].request.exit_key)
        if body is None:
            return None
        try:
            return _exit_decoder.decode(body)
        except msgspec.DecodeError:
            return None  # a partial upload: read again at the next describe

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        """One ``describe_instances`` per region, one GET of the status of each instance
        with unfinished attempts among ``keys``; the per-attempt objects (exit records,
        claims) only for attempts whose instance is gone or whose status is not certain."""
        async with self._lock:
            pending = [k for k in dict.fromkeys(keys) if k not in self._finished]
            if pending and not self._fleet_seen:
                await self._refresh()
            if pending:
                await self._load(pending)
            items = {k: self._items[k] for k in pending if k in self._items}
            busy = {i.agent for i in items.values() if i.agent}
            statuses = await self._statuses(busy)
            if pending and self._fleet_stale(busy):
                await self._refresh()
                gone = {a for a in busy if a in self._agents and self._agents[a].state not in LIVE}
                statuses.update(await self._statuses(gone))  # their last word
            reports: dict[str, Report] = {}
            check: list[str] = []
            for k in pending:
                item = items.get(k)
                if item is None:
                    reports[k] = Report(
                        key=k, state=ProviderState.UNKNOWN, message="no attempt has this key"
                    )
                    continue
                quick = self._from_status(item, statuses)
                if quick is None:
                    check.append(k)
                else:
                    reports[k] = quick
            if check:
                exits = await self._listed(check, exit_prefix)
                claims = await self._listed(check, claim_prefix)
                for k in check:
                    item = items[k]
                    record = await self._exit_record(k) if k in exits else None
                    st = statuses.get(item.agent or "")
                    ended = st is not None and k in st.ended
                    reports[k] = await self._report(item, record, k in claims, ended=ended)
            for k, report in reports.items():
                if report.state in TERMINAL_PROVIDER_STATES:
                    self._finished[k] = report
            await self._dispatch()
        return [self._finished.get(k) or reports[k] for k in keys]

    def _fleet_stale(self, busy: set[str]) -> bool:
        """Whether ``describe`` reads the fleet: every ``fleet_every_s``, unless each instance
        with unfinished attempts changed its status within that time (it is alive; the fleet
        is read at least every ``FLEET_MOST_S`` all the same)."""
        now = time.monotonic()
        age = now - self._fleet_at
        if age < self.fleet_every_s:
            return False
        if age >= FLEET_MOST_S:
            return True
        agents = [self._agents.get(a) for a in busy]
        return not all(
            a is not None and a.live and now - a.changed_at < self.fleet_every_s for a in agents
        )

    async def _statuses(self, agents: set[str]) -> dict[str, AgentStatus]:
        """The status objects of ``agents`` (read once more after an instance is gone, then
        kept: nothing more comes)."""
        s3 = await self._s3()
        out: dict[str, AgentStatus] = {}
        for aid in sorted(agents):
            agent = self._agents.get(aid)
            if agent is None:
                continue
            if not agent.final or agent.status is None:
                gone = agent.state not in LIVE
                body = await self._get(s3, status_key(self.config, aid)) or b""
                if body != agent.body:
                    agent.body, agent.changed_at = body, time.monotonic()
                agent.status = parse_status(body.decode(errors="replace"))
                agent.final = gone
                if agent.status.noticed and not agent.noticed:
                    agent.noticed = True
                    self._changed(f"instance {agent.instance_id} of {agent.pool}: spot notice")
            out[aid] = agent.status
        return out

    def _from_status(self, item: Item, statuses: dict[str, AgentStatus]) -> Report | None:
        """The report its instance's status gives; None: look at the per-attempt objects."""
        req = item.request
        key = req.key
        if item.agent is None:
            if item.cancelled:
                return Report(key=key, state=ProviderState.CANCELLED, message="cancelled")
            return Report(
                key=key,
                state=ProviderState.QUEUED,
                message=f"waiting for an instance of {req.pool}",
            )
        agent = self._agents.get(item.agent)
        st = statuses.get(item.agent)
        if agent is None or st is None:
            return None
        record = st.exits.get(key)
        if record is not None:
            return self._exit_report(item, agent, record)
        if key in st.refused or key in st.ended or not agent.live:
            return None
        iid, zone = agent.instance_id, agent.zone
        if item.cancelled:
            return Report(
                key=key, state=ProviderState.CANCELLED, message="cancelled", job_id=iid, node=zone
            )
        if key in st.claimed:
            return Report(
                key=key,
                state=ProviderState.RUNNING,
                message=f"running on {iid}",
                job_id=iid,
                node=zone,
            )
        return Report(key=key, state=ProviderState.QUEUED, message=f"sent to {iid}")

    def _exit_report(self, item: Item, agent: Agent | None, record: ExitRecord) -> Report:
        req = item.request
        iid = agent.instance_id if agent else None
        state, failure = exit_state(record)
        how = f"exit code {record.exit_code}" + (
            f" ({record.reason})" if record.reason != "exit" else ""
        )
        return Report(
            key=req.key,
            state=state,
            failure=failure,
            exit_code=record.exit_code,
            message=f"instance {iid}: {how}",
            started_at=record.started_at,
            ended_at=record.ended_at,
            outputs=self._outputs(req) if state is ProviderState.SUCCEEDED else {},
            job_id=iid,
            node=agent.zone if agent else None,
        )

    async def _report(
        self, item: Item, record: ExitRecord | None, claimed: bool, *, ended: bool = False
    ) -> Report:
        """The report the per-attempt objects give (``ended``: its instance's status says
        its process ended without an exit record)."""
        req = item.request
        key = req.key
        agent = self._agents.get(item.agent) if item.agent else None
        if claimed and (agent is None or not agent.live or ended):
            # who took it (after a restart, or sent twice): its claim says
            body = await self._get(await self._s3(), req.claim_key)
            with contextlib.suppress(msgspec.DecodeError):
                if body is not None:
                    owner = self._agents.get(msgspec.json.decode(body, type=Claim).agent)
                    if owner is not None and owner is not agent:
                        agent, ended = owner, False
                        item.agent = owner.id  # its status tells the rest
        iid = agent.instance_id if agent else None
        zone = agent.zone if agent else None
        if record is not None:
            return self._exit_report(item, agent, record)
        if item.cancelled:
            return Report(
                key=key, state=ProviderState.CANCELLED, message="cancelled", job_id=iid, node=zone
            )
        if claimed and ended:
            return Report(
                key=key,
                state=ProviderState.FAILED,
                failure=FailureClass.NODE_FAILURE,
                message=f"instance {iid}: the attempt ended without an exit record",
                job_id=iid,
                node=zone,
            )
        if claimed:
            if agent is not None and agent.live:
                return Report(
                    key=key,
                    state=ProviderState.RUNNING,
                    message=f"running on {agent.instance_id}",
                    job_id=iid,
                    node=zone,
                )
            code = agent.reason if agent is not None else ""
            if agent is not None and agent.noticed and not code:
                code = "Server.SpotInstanceTermination"  # its notice came: being reclaimed
            state, failure = gone_reason(code)
            return Report(
                key=key,
                state=state,
                failure=failure,
                message=f"instance {iid} is gone without an exit record: " + (code or "?"),
                job_id=iid,
                node=zone,
            )
        if agent is not None and not agent.live:
            # sent to an instance that went away before taking it: requeue
            item.agent, item.after = None, None
            agent = None
        how = f"sent to {agent.instance_id}" if agent else f"waiting for an instance of {req.pool}"
        return Report(key=key, state=ProviderState.QUEUED, message=how)

    def _outputs(self, req: AwsRequest) -> dict[str, str]:
        bucket = self.config.bucket_name
        return {name: f"s3://{bucket}/{obj}" for name, obj in req.outputs.items()}

    async def capacity_changes(self) -> AsyncIterator[str]:
        """A reason each time a launch learned that a zone ran out of capacity or a family
        reached its quota, or an instance went away. One consumer."""
        while True:
            yield await self._capacity.get()

    async def _pages_s3(
        self, s3: Any, bucket: str, prefix: str, *, most_pages: int | None = None
    ) -> dict[str, float] | None:
        """The object keys under ``prefix`` (with their LastModified); None if they take more
        than ``most_pages``."""
        names: dict[str, float] = {}
        token: str | None = None
        pages = 0
        while True:
            if most_pages is not None and pages >= most_pages:
                return None
            pages += 1
            extra = {"ContinuationToken": token} if token else {}
            page = await self._call(s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, **extra)
            for o in page.get("Contents") or []:
                when = o.get("LastModified")
                names[str(o["Key"])] = when.timestamp() if hasattr(when, "timestamp") else 0.0
            token = page.get("NextContinuationToken")
            if not token:
                return names

    async def _get(self, s3: Any, key: str, offset: int = 0) -> bytes | None:
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            got = await self._call(
                s3, "get_object", Bucket=self.config.bucket_name, Key=key, **extra
            )
        except Ec2Error as e:
            if e.code in ("NoSuchKey", "InvalidRange", "404", "416"):
                return None
            raise
        async with got["Body"] as body:
            data: bytes = await body.read()
        return data

    # -- cancel / logs ------------------------------------------------------------------------

    async def cancel(self, keys: Sequence[str]) -> None:
        """One cancel object for the keys cancelled now (what a restarted driver reads back),
        then a ``cancel`` line in the inbox of each instance they were sent to."""
        s3 = await self._s3()
        async with self._lock:
            if not self._fleet_seen:
                await self._refresh()
            await self._load(keys)
            now = [
                k
                for k in dict.fromkeys(keys)
                if k not in self._finished and k in self._items and not self._items[k].cancelled
            ]
            if not now:
                return
            name = cancel_key(self.config, batch_id(now))
            await self._call(
                s3,
                "put_object",
                Bucket=self.config.bucket_name,
                Key=name,
                Body=msgspec.json.encode(CancelBatch(keys=sorted(now))),
            )
            self._cancels.add(name)
            self._cancelled.update(now)
            changed: set[str] = set()
            for k in now:
                item = self._items[k]
                item.cancelled = True
                agent = self._agents.get(item.agent) if item.agent else None
                if agent is not None and agent.state in LIVE:
                    agent.seq += 1
                    agent.lines.append(cancel_line(agent.seq, k))
                    changed.add(agent.id)
            await self._write_inboxes(changed)

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        async with self._lock:
            await self._load([key])
            item = self._items.get(key)
        if item is None:
            return
        s3 = await self._s3()
        obj = f"{attempt_prefix(self.config, item.request.run_id, key)}/{stream}"
        offset = 0
        while True:
            done = not follow or (await self.describe([key]))[0].state in TERMINAL_PROVIDER_STATES
            data = await self._get(s3, obj, offset)
            if data:
                offset += len(data)
                yield data
            if done:
                return
            await asyncio.sleep(LOG_POLL_S)

    async def aclose(self) -> None:
        self._clients.clear()
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
