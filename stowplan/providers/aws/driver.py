"""The AWS driver: one EC2 instance per attempt, through aiobotocore.

What lives where: pools from API answers ``discover.py`` (pure), requests and the user-data
script ``render.py`` (pure), the state and error maps ``states.py`` (pure), the price table
``prices.py``. This module does the I/O.

Credentials are the SDK's (``profile``, else the default chain) or an STS lease of
``role_arn`` renewed by the SDK before it expires; they live in the session object only. The
SDK does not retry (``total_max_attempts = 1``; in the client config ``max_attempts`` counts
retries, not attempts): a throttled or failed call raises a retryable ``ProviderError`` and the
command shell retries with the same keys.

Idempotency: one instance per key, ever. EC2 honours ``ClientToken`` (the key), but moto does
not, and a retried submit carries new presigned URLs (EC2 then answers
``IdempotentParameterMismatch``), so submit first looks the key up with ``describe_instances``
filtered by ``tag:stowplan:key``, and looks again after a lost answer: found, it reports that
instance; not found after a lost answer, a retryable error (the shell's retry looks again).

Observation: one ``describe_instances`` per region per 200 keys, one S3 listing per run for
the exit records, one read per exit record seen for the first time; finished keys are cached.
Zones: each pool's instances go to the zones discovery found usable, spread by key; a zone
that ran out of capacity (``InsufficientInstanceCapacity``) is left out for ``NO_CAPACITY_S``,
a family at its vCPU quota for ``QUOTA_S``, an unsupported zone for good, and the core hears of
it through ``capacity_changes`` and re-places with what was learned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct, field

from stowplan.errors import ProviderError, SpecError
from stowplan.placement.problem import Pool
from stowplan.providers.aws import prices
from stowplan.providers.aws.discover import (
    Offer,
    RegionAnswers,
    is_glob,
    offers,
    type_info,
)
from stowplan.providers.aws.render import (
    TAG_KEY,
    TAG_PROVIDER,
    TAG_RUN,
    USER_DATA_MAX,
    AwsRequest,
    attempt_prefix,
    exit_prefix,
    plan_instances,
)
from stowplan.providers.aws.states import ErrorKind, ExitRecord, ec2_error, instance_state
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
SUBMIT_CONCURRENCY = 8
CAPACITY_QUEUE = 64
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


class Manifest(Struct, frozen=True, kw_only=True):
    """What submit leaves beside an attempt's objects, so a restarted driver can report it."""

    key: str
    run_id: str
    region: str
    pool: str
    outputs: dict[str, str] = field(default_factory=dict)


class Placed(Struct, kw_only=True):
    """What this driver knows of a key it submitted or found."""

    region: str
    run_id: str
    instance_id: str | None = None
    outputs: dict[str, str] | None = None
    """declared output -> S3 key; None until known (after a restart: from the manifest)."""


class AwsProvider(Provider):
    poll_min = 2.0
    poll_max = 30.0

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
                {Capability.RUNS, Capability.GPUS, Capability.LOGS, Capability.CANCEL_MEMBER}
            ),
            why_not={
                Capability.CONTAINERS: "the aws provider runs commands on the AMI as they are; "
                "put what the task needs in the AMI and drop the image",
                Capability.SECRETS: "the aws provider does not resolve secrets (Secrets "
                "Manager) yet",
                Capability.ARRAYS: "each attempt gets its own instance",
                Capability.ELASTIC: "instances are launched by submit, one per attempt; "
                "provision/terminate of shared instances is not built yet",
            },
            notes=(
                "on-demand prices come from a bundled, dated table (stowplan.providers.aws."
                "prices); spot prices from the API when it has recent values",
                "logs reach S3 every 15 s; `logs -f` shows them with that delay",
                "with role_arn, presigned URLs stop working when the STS lease they were made "
                "with expires: an attempt must end within session_duration",
            ),
        )
        self.table = prices.load(config.prices, field_path=f"$.providers.{name}.prices")
        self._session: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[tuple[str, str], Any] = {}
        self._client_lock = asyncio.Lock()
        self._offers: dict[str, Offer] = {}
        self._unavailable: dict[tuple[str, str, bool], tuple[str, float]] = {}
        self._placed: dict[str, Placed] = {}
        self._finished: dict[str, Report] = {}
        self._capacity: asyncio.Queue[str] = asyncio.Queue(CAPACITY_QUEUE)
        self.notes: list[str] = []
        """what the last discovery left out, and why."""
        self.calls: Counter[str] = Counter()
        """API calls made, by operation (a diagnostic, and the benchmark's count)."""

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

            creds = AioRefreshableCredentials.create_from_metadata(
                metadata=await lease(), refresh_using=lease, method="sts-assume-role"
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
        ec2 = await self._client("ec2", region)
        raw = await self._pages(
            ec2,
            "describe_instance_types",
            "InstanceTypes",
            Filters=[{"Name": "instance-type", "Values": list(self.config.instance_types)}],
        )
        types = [type_info(t) for t in raw]
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
        return RegionAnswers(
            region=region,
            types=types,
            zones=zones,
            subnet_zones=subnet_zones,
            spot_rows=spot_rows,
        )

    def _still_unavailable(self) -> dict[tuple[str, str, bool], str]:
        now = time.monotonic()
        for k in [k for k, (_, until) in self._unavailable.items() if until <= now]:
            del self._unavailable[k]
        return {k: why for k, (why, _) in self._unavailable.items()}

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
        unavailable = self._still_unavailable()
        now = time.time()
        pools: list[Pool] = []
        notes: list[str] = []
        found_offers: dict[str, Offer] = {}
        for a in answers:
            got, why = offers(
                self.name, self.config, a, self.table, now=now, unavailable=unavailable
            )
            notes += why
            for o in got:
                found_offers[o.pool.id] = o
                pools.append(o.pool)
        self._offers = found_offers
        self.notes = notes
        return sorted(pools, key=lambda p: p.id)

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return list(
            plan_instances(
                launches,
                provider=self.name,
                project=self.project,
                config=self.config,
                pools=facts.pools,
            )
        )

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        for req in requests:
            if not isinstance(req, AwsRequest):
                raise ProviderError(
                    f"not an AWS request: {type(req).__name__}",
                    provider=self.name,
                    retryable=False,
                )
        gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def one(req: AwsRequest) -> Report:
            async with gate:
                return await self._submit_one(req)

        return list(await asyncio.gather(*(one(r) for r in requests if isinstance(r, AwsRequest))))

    async def _find(
        self, keys: Sequence[str], regions: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Instances carrying these keys (``tag:stowplan:key``), by key: one
        ``describe_instances`` per region and 200 keys. Of several (never made by us), the
        latest launched."""
        found: dict[str, dict[str, Any]] = {}
        for region in regions or self.config.regions:
            ec2 = await self._client("ec2", region)
            for i in range(0, len(keys), FILTER_VALUES):
                reservations = await self._pages(
                    ec2,
                    "describe_instances",
                    "Reservations",
                    Filters=[
                        {"Name": f"tag:{TAG_KEY}", "Values": list(keys[i : i + FILTER_VALUES])},
                        {"Name": f"tag:{TAG_PROVIDER}", "Values": [self.name]},
                    ],
                )
                for res in reservations:
                    for inst in res.get("Instances") or []:
                        tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
                        key = tags.get(TAG_KEY)
                        if key is None:
                            continue
                        inst = {**inst, "_region": region, "_tags": tags}
                        prev = found.get(key)
                        if prev is None or str(inst.get("LaunchTime", "")) > str(
                            prev.get("LaunchTime", "")
                        ):
                            found[key] = inst
        for key, inst in found.items():
            placed = self._placed.get(key)
            if placed is None:
                run = inst["_tags"].get(TAG_RUN, "")
                self._placed[key] = placed = Placed(region=inst["_region"], run_id=run)
            placed.instance_id = str(inst["InstanceId"])
        return found

    def _instance_report(self, key: str, inst: Mapping[str, Any], how: str) -> Report:
        state, failure, message = instance_state(inst, None)
        if state in TERMINAL_PROVIDER_STATES:
            # its end is decided by describe (the exit record may be there)
            state, failure = ProviderState.RUNNING, None
        zone = (inst.get("Placement") or {}).get("AvailabilityZone")
        return Report(
            key=key,
            state=state,
            failure=failure,
            job_id=str(inst.get("InstanceId")),
            node=zone,
            message=f"{how}: {message}",
        )

    def _zone_for(self, req: AwsRequest) -> tuple[str, str | None] | None:
        offer = self._offers.get(req.pool)
        if offer is None:
            return None
        unavailable = self._still_unavailable()
        zones = [z for z in offer.zones if (req.instance_type, z, req.spot) not in unavailable]
        if not zones:
            return None
        pick = zones[int(hashlib.sha256(req.key.encode()).hexdigest(), 16) % len(zones)]
        return pick, offer.subnets.get(pick)

    def _learn(self, what: tuple[str, str, bool], why: str, for_s: float) -> None:
        self._unavailable[what] = (why, time.monotonic() + for_s)
        with contextlib.suppress(asyncio.QueueFull):
            self._capacity.put_nowait(why)

    async def _submit_one(self, req: AwsRequest) -> Report:
        key = req.key
        if key in self._finished:
            return self._finished[key]
        found = await self._find([key], [req.region])
        if key in found:
            return self._instance_report(key, found[key], "launched before")
        if req.pool not in self._offers:
            await self.discover()
        where = self._zone_for(req)
        if where is None:
            return Report(
                key=key,
                state=ProviderState.FAILED,
                failure=FailureClass.PROVIDER_TRANSIENT,
                message=f"{req.pool}: no usable zone now (capacity or quota learned, or the "
                "type is not offered where a subnet is configured)",
            )
        zone, subnet = where
        s3 = await self._s3()
        bucket = self.config.bucket_name
        manifest = Manifest(
            key=key, run_id=req.run_id, region=req.region, pool=req.pool, outputs=req.outputs
        )
        here = attempt_prefix(self.config, req.run_id, key)
        await self._call(
            s3,
            "put_object",
            Bucket=bucket,
            Key=f"{here}/manifest.json",
            Body=msgspec.json.encode(manifest),
        )
        if req.payload is not None:
            await self._call(
                s3, "put_object", Bucket=bucket, Key=req.slots["payload"][1], Body=req.payload
            )
        urls = {}
        for slot, (method, obj) in req.slots.items():
            self.calls["presign"] += 1
            urls[slot] = await s3.generate_presigned_url(
                "get_object" if method == "GET" else "put_object",
                Params={"Bucket": bucket, "Key": obj},
                ExpiresIn=req.lease_s,
            )
        user_data = req.user_data(urls)
        if len(user_data.encode()) > USER_DATA_MAX:
            return Report(
                key=key,
                state=ProviderState.FAILED,
                failure=FailureClass.PROVIDER_REJECTED,
                message=f"user-data of {len(user_data.encode())} bytes is more than EC2's "
                f"{USER_DATA_MAX}; move long arguments or environment values into files",
            )
        params = dict(req.params, UserData=user_data)
        if subnet is not None:
            params["SubnetId"] = subnet
        else:
            params["Placement"] = {"AvailabilityZone": zone}
        self._placed[key] = Placed(region=req.region, run_id=req.run_id, outputs=req.outputs)
        ec2 = await self._client("ec2", req.region)
        try:
            got = await self._call(ec2, "run_instances", **params)
        except AnswerLost:
            # the launch may have happened: look once; a retry of the submit looks again
            found = await self._find([key], [req.region])
            if key in found:
                return self._instance_report(key, found[key], "launched (its answer was lost)")
            raise
        except Ec2Error as e:
            return await self._launch_failed(req, zone, e)
        inst = (got.get("Instances") or [{}])[0]
        self._placed[key].instance_id = str(inst.get("InstanceId"))
        return self._instance_report(key, inst, f"launched in {zone}")

    async def _launch_failed(self, req: AwsRequest, zone: str, e: Ec2Error) -> Report:
        key, market = req.key, "spot" if req.spot else "on-demand"
        family = req.instance_type.split(".", 1)[0]
        if e.kind is ErrorKind.ALREADY:
            found = await self._find([req.key], [req.region])
            if req.key in found:
                return self._instance_report(req.key, found[req.key], "launched before")
            raise ProviderError(
                f"{e.message}; its instance is not visible yet",
                provider=self.name,
                retryable=True,
            )
        if e.retryable:
            raise e
        failure = FailureClass.PROVIDER_TRANSIENT
        if e.kind is ErrorKind.NO_CAPACITY:
            self._learn(
                (req.instance_type, zone, req.spot),
                f"{req.instance_type} {market} in {zone}: {e.code}",
                NO_CAPACITY_S,
            )
        elif e.kind is ErrorKind.QUOTA:
            self._learn(
                (family, "*", req.spot), f"{family} {market} in {req.region}: {e.code}", QUOTA_S
            )
        elif e.kind is ErrorKind.UNSUPPORTED:
            self._learn(
                (req.instance_type, zone, req.spot),
                f"{req.instance_type} in {zone}: {e.code}",
                math.inf,
            )
        elif e.kind is ErrorKind.REJECTED:
            failure = FailureClass.PROVIDER_REJECTED
        else:
            return Report(key=key, state=ProviderState.UNKNOWN, message=e.message)
        return Report(key=key, state=ProviderState.FAILED, failure=failure, message=e.message)

    # -- describe -----------------------------------------------------------------------------

    async def _exit_records(self, keys: Sequence[str]) -> dict[str, ExitRecord]:
        """The exit records of ``keys`` (those placed with a known run): one listing per run,
        one read per record."""
        by_run: dict[str, list[str]] = {}
        for k in keys:
            p = self._placed.get(k)
            if p is not None and p.run_id:
                by_run.setdefault(p.run_id, []).append(k)
        if not by_run:
            return {}
        s3 = await self._s3()
        bucket = self.config.bucket_name
        out: dict[str, ExitRecord] = {}
        for run, run_keys in sorted(by_run.items()):
            prefix = exit_prefix(self.config, run)
            listed = await self._pages_s3(s3, bucket, prefix)
            for k in run_keys:
                if f"{prefix}{k}.json" not in listed:
                    continue
                body = await self._get(s3, f"{prefix}{k}.json")
                if body is None:
                    continue
                try:
                    out[k] = _exit_decoder.decode(body)
                except msgspec.DecodeError:
                    continue  # a partial upload: read again at the next describe
        return out

    async def _pages_s3(self, s3: Any, bucket: str, prefix: str) -> set[str]:
        names: set[str] = set()
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = await self._call(s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, **extra)
            names.update(str(o["Key"]) for o in page.get("Contents") or [])
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

    async def _outputs(self, key: str) -> dict[str, str]:
        p = self._placed[key]
        if p.outputs is None:
            s3 = await self._s3()
            body = await self._get(
                s3, f"{attempt_prefix(self.config, p.run_id, key)}/manifest.json"
            )
            p.outputs = dict(msgspec.json.decode(body, type=Manifest).outputs) if body else {}
        bucket = self.config.bucket_name
        return {name: f"s3://{bucket}/{obj}" for name, obj in p.outputs.items()}

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        pending = [k for k in keys if k not in self._finished]
        instances: dict[str, dict[str, Any]] = {}
        if pending:
            known: dict[str, list[str]] = {}
            unknown: list[str] = []
            for k in pending:
                p = self._placed.get(k)
                if p is None:
                    unknown.append(k)
                else:
                    known.setdefault(p.region, []).append(k)
            for region, ks in sorted(known.items()):
                instances.update(await self._find(ks, [region]))
            if unknown:
                instances.update(await self._find(unknown))
        records = await self._exit_records(pending)
        out: list[Report] = []
        for k in keys:
            cached = self._finished.get(k)
            if cached is not None:
                out.append(cached)
                continue
            report = await self._report(k, instances.get(k), records.get(k))
            if report.state in TERMINAL_PROVIDER_STATES:
                self._finished[k] = report
            out.append(report)
        return out

    async def _report(
        self, key: str, inst: Mapping[str, Any] | None, record: ExitRecord | None
    ) -> Report:
        placed = self._placed.get(key)
        iid = str(inst.get("InstanceId")) if inst else (placed.instance_id if placed else None)
        if inst is None and record is None:
            if placed is not None and placed.instance_id is not None:
                return Report(
                    key=key,
                    state=ProviderState.FAILED,
                    failure=FailureClass.NODE_FAILURE,
                    job_id=iid,
                    message=f"instance {iid} is gone without an exit record",
                )
            return Report(key=key, state=ProviderState.UNKNOWN, message="no instance has this key")
        state, failure, message = instance_state(inst or {"InstanceId": iid}, record)
        if failure is FailureClass.PREEMPTED:
            with contextlib.suppress(asyncio.QueueFull):
                self._capacity.put_nowait(f"a spot instance was reclaimed ({iid})")
        zone = ((inst or {}).get("Placement") or {}).get("AvailabilityZone")
        return Report(
            key=key,
            state=state,
            failure=failure,
            job_id=iid,
            node=zone,
            exit_code=record.exit_code if record else None,
            message=message,
            started_at=record.started_at if record else None,
            ended_at=record.ended_at if record else None,
            outputs=await self._outputs(key) if state is ProviderState.SUCCEEDED else {},
        )

    async def capacity_changes(self) -> AsyncIterator[str]:
        """A reason each time a launch learned that a zone ran out of capacity, a family
        reached its quota, or a spot instance was reclaimed. One consumer."""
        while True:
            yield await self._capacity.get()

    # -- cancel / logs ------------------------------------------------------------------------

    async def cancel(self, keys: Sequence[str]) -> None:
        todo = [k for k in keys if k not in self._finished]
        unknown = [k for k in todo if (p := self._placed.get(k)) is None or p.instance_id is None]
        if unknown:
            await self._find(unknown)
        by_region: dict[str, list[str]] = {}
        for k in todo:
            p = self._placed.get(k)
            if p is not None and p.instance_id is not None:
                by_region.setdefault(p.region, []).append(p.instance_id)
        for region, ids in sorted(by_region.items()):
            ec2 = await self._client("ec2", region)
            for i in range(0, len(ids), 1000):
                try:
                    await self._call(ec2, "terminate_instances", InstanceIds=ids[i : i + 1000])
                except Ec2Error as e:
                    if e.code != "InvalidInstanceID.NotFound":
                        raise

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        if key not in self._placed:
            await self._find([key])
        placed = self._placed.get(key)
        if placed is None:
            return
        s3 = await self._s3()
        obj = f"{attempt_prefix(self.config, placed.run_id, key)}/{stream}"
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
