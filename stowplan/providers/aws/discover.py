"""EC2 answers -> elastic pools. Pure: the driver makes the calls and hands the answers in.

One pool per (region, instance type, market): the on-demand pool ``NAME/REGION/TYPE`` and,
with ``spot = "prefer"`` or ``"only"``, the spot pool ``NAME/REGION/TYPE/spot`` (with
``prefer`` both are offered and the solver weighs price against interruption risk). A pool has
no free capacity of its own (``cpus = 0``): it is elastic, ``max_instances`` instances of shape
``node`` at ``price_per_hour`` each, ready ``boot_s`` after launch.

A type is offered in a region only in zones where ``describe_instance_type_offerings`` lists it
and, when ``subnets`` are configured, where one of them lies: a zone without a subnet or without
the type is never tried. A (type, zone, market) the driver learned to be out of capacity, or a
family whose vCPU quota was reached, is left out until the driver forgets it.

vCPU quotas. EC2 limits the vCPUs of an account's running instances per region, per market
and per group of families (``VCPU_QUOTAS``: one quota for all G and VT on-demand instances,
another for their spot instances, ...). When Service Quotas answers, every pool carries its
quota (``Pool.quota``): the group ``aws:REGION:ec2/CODE`` its launches share, the quota's
value, what the account's running instances (whoever launched them) leave of it, and the
vCPUs one instance takes; the core launches no more across the group than that. A type one
instance of which is more than the whole quota is left out, with how to ask for more.
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from msgspec import Struct, field

from stowplan.placement.problem import Pool, PoolQuota, Shape
from stowplan.providers.aws.prices import PriceTable
from stowplan.providers.kubernetes.discover import gpu_model_of
from stowplan.spec.models import AwsProviderConfig

SPOT_FRESH_S = 7 * 86400.0
"""A spot price older than this is not a current value (moto answers with 2006's)."""
SPOT_MIN_USD = 0.001
"""Below this, an answer is a placeholder, not a price (moto answers 0.00001)."""
HARDWARE_PREFIX = "aws:"
QUEUE_DEPTH = 32.0
"""``Pool.queue_depth`` of every pool: the driver queues attempts itself and sends each to an
instance of its pool as room frees there (the next one ahead, in the same inbox write), so the
core may keep up to this many waves of the instances' capacity submitted; its ``backlog_s``
bounds that to about 30 s of work, so a sweep of short trials goes out in a few submit calls
(one queue object each) and hour-long trials are not queued at all."""


STANDARD_FAMILIES = frozenset({"a", "c", "d", "h", "i", "im", "is", "m", "r", "t", "z"})
"""Leading letters of the types the Standard (A, C, D, H, I, M, R, T, Z) quotas cover."""
QUOTA_CLASSES = {
    **{f: "standard" for f in STANDARD_FAMILIES},
    "g": "g",
    "gr": "g",
    "vt": "g",
    "p": "p",
    "f": "f",
    "inf": "inf",
    "x": "x",
    "dl": "dl",
    "trn": "trn",
    "hpc": "hpc",
    "u": "u",
}
"""Leading letters of an instance type -> the quota class it counts against."""
VCPU_QUOTAS: dict[tuple[str, bool], tuple[str, str]] = {
    ("standard", False): ("L-1216C47A", "Standard (A, C, D, H, I, M, R, T, Z) on-demand vCPUs"),
    ("standard", True): ("L-34B43A08", "Standard (A, C, D, H, I, M, R, T, Z) spot vCPUs"),
    ("g", False): ("L-DB2E81BA", "G and VT on-demand vCPUs"),
    ("g", True): ("L-3819A6DF", "G and VT spot vCPUs"),
    ("p", False): ("L-417A185B", "P on-demand vCPUs"),
    ("p", True): ("L-7212CCBC", "P4, P3 and P2 spot vCPUs"),
    ("p5", True): ("L-C4BD4855", "P5 spot vCPUs"),
    ("f", False): ("L-74FC7D96", "F on-demand vCPUs"),
    ("f", True): ("L-88CF9481", "F spot vCPUs"),
    ("inf", False): ("L-1945791B", "Inf on-demand vCPUs"),
    ("inf", True): ("L-B5D1601B", "Inf spot vCPUs"),
    ("x", False): ("L-7295265B", "X on-demand vCPUs"),
    ("x", True): ("L-E3A00192", "X spot vCPUs"),
    ("dl", False): ("L-6E869C2A", "DL on-demand vCPUs"),
    ("dl", True): ("L-85EED4F7", "DL spot vCPUs"),
    ("trn", False): ("L-2C3B7624", "Trn on-demand vCPUs"),
    ("trn", True): ("L-6B0D517C", "Trn spot vCPUs"),
    ("hpc", False): ("L-F7808C92", "HPC on-demand vCPUs"),
    ("u", False): ("L-43DA4232", "High Memory on-demand vCPUs"),
}
"""(quota class, spot) -> (Service Quotas code of service ``ec2``, what it counts), as
``aws service-quotas list-service-quotas --service-code ec2`` names them. Spot P instances
have two: P5 apart from P4, P3 and P2 (a newer P family has none here: it is learned when
a launch is refused, as for any type without a quota)."""


def vcpu_quota(instance_type: str, spot: bool) -> tuple[str, str] | None:
    """The (code, what it counts) of the vCPU quota a running ``instance_type`` counts
    against in its market; None where ``VCPU_QUOTAS`` knows none."""
    letters = re.match(r"[a-z]+", instance_type.lower())
    klass = QUOTA_CLASSES.get(letters[0]) if letters else None
    if klass == "p" and spot:
        family = instance_type.split(".", 1)[0].lower()
        if family.startswith("p5"):
            klass = "p5"
        elif family[:2] not in ("p2", "p3", "p4"):
            return None
    return VCPU_QUOTAS.get((klass, spot)) if klass else None


def quota_group(region: str, code: str) -> str:
    return f"aws:{region}:ec2/{code}"


def pool_id(provider: str, region: str, instance_type: str, spot: bool) -> str:
    return f"{provider}/{region}/{instance_type}" + ("/spot" if spot else "")


class PoolRef(Struct, frozen=True, kw_only=True):
    """What a pool id says: where and what to launch."""

    region: str
    instance_type: str
    spot: bool


def parse_pool_id(provider: str, pool: str) -> PoolRef | None:
    """The inverse of ``pool_id``; None for an id that is not one of ``provider``'s pools."""
    parts = pool.split("/")
    if len(parts) not in (3, 4) or parts[0] != provider or not parts[1] or not parts[2]:
        return None
    if len(parts) == 4 and parts[3] != "spot":
        return None
    return PoolRef(region=parts[1], instance_type=parts[2], spot=len(parts) == 4)


def allowed(instance_type: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(instance_type, p) for p in patterns)


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class TypeInfo(Struct, frozen=True, kw_only=True):
    """One instance type as ``describe_instance_types`` gives it."""

    name: str
    vcpus: int
    memory: int
    """bytes"""
    gpus: dict[str, int] = field(default_factory=dict)
    family: str = ""


def type_info(raw: Mapping[str, Any]) -> TypeInfo:
    """One ``InstanceTypes`` entry of ``describe_instance_types``."""
    name = str(raw["InstanceType"])
    gpus: dict[str, int] = {}
    for g in (raw.get("GpuInfo") or {}).get("Gpus") or []:
        model = gpu_model_of(str(g.get("Name") or "unknown"))
        gpus[model] = gpus.get(model, 0) + int(g.get("Count") or 0)
    return TypeInfo(
        name=name,
        vcpus=int((raw.get("VCpuInfo") or {}).get("DefaultVCpus") or 0),
        memory=int((raw.get("MemoryInfo") or {}).get("SizeInMiB") or 0) << 20,
        gpus={k: v for k, v in gpus.items() if v > 0},
        family=name.split(".", 1)[0],
    )


def spot_price(rows: Sequence[Mapping[str, Any]], zones: Sequence[str], now: float) -> float | None:
    """The median over ``zones`` of each zone's latest real spot price; None when the API gave
    no recent real values (then the table's typical price is used)."""
    latest: dict[str, tuple[float, float]] = {}
    for r in rows:
        zone = str(r.get("AvailabilityZone") or "")
        ts = r.get("Timestamp")
        when = ts.timestamp() if isinstance(ts, datetime) else 0.0
        try:
            price = float(r.get("SpotPrice") or 0.0)
        except ValueError:
            continue
        if zone not in zones or now - when > SPOT_FRESH_S or price < SPOT_MIN_USD:
            continue
        if zone not in latest or when > latest[zone][0]:
            latest[zone] = (when, price)
    if not latest:
        return None
    return float(statistics.median(p for _, p in latest.values()))


class RegionAnswers(Struct, frozen=True, kw_only=True):
    """What the driver learned of one region by its calls."""

    region: str
    types: list[TypeInfo]
    zones: dict[str, list[str]]
    """instance type -> zones offering it (``describe_instance_type_offerings``)."""
    subnet_zones: dict[str, str] = field(default_factory=dict)
    """configured subnet in this region -> its zone."""
    spot_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """instance type -> ``SpotPriceHistory`` rows."""


class Offer(Struct, frozen=True, kw_only=True):
    """A pool and the zones (with their subnets) where its instances may be launched."""

    pool: Pool
    zones: list[str]
    subnets: dict[str, str] = field(default_factory=dict)
    """zone -> the configured subnet to launch into there."""
    price_source: str = ""


def offers(
    provider: str,
    config: AwsProviderConfig,
    answers: RegionAnswers,
    table: PriceTable,
    *,
    now: float,
    unavailable: Mapping[tuple[str, str, bool], str] | None = None,
    quotas: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[list[Offer], list[str]]:
    """The pools of one region, sorted by id, and notes on what was left out and why.

    ``unavailable`` maps (instance type, zone, spot) to why the driver will not try that zone
    for now (capacity ran out; the type is unsupported there), and (family, "*", spot) to why
    the family is at its vCPU quota. ``quotas`` maps a vCPU quota's code to (its value, what
    the account's running instances leave of it); a code missing (or ``quotas`` None) is not
    known: its pools carry no quota."""
    unavailable = unavailable or {}
    quotas = quotas or {}
    region = answers.region
    notes: list[str] = []
    out: list[Offer] = []
    markets = {"never": [False], "prefer": [False, True], "only": [True]}[config.spot]
    by_zone_subnet: dict[str, str] = {}
    for subnet, zone in sorted(answers.subnet_zones.items()):
        by_zone_subnet.setdefault(zone, subnet)
    for info in sorted(answers.types, key=lambda t: t.name):
        if not allowed(info.name, config.instance_types):
            continue
        zones = sorted(answers.zones.get(info.name, []))
        if config.subnets:
            zones = [z for z in zones if z in by_zone_subnet]
        if not zones:
            notes.append(
                f"{region}/{info.name}: no zone offers it"
                + (" where a configured subnet lies" if config.subnets else "")
            )
            continue
        for spot in markets:
            usable = [z for z in zones if (info.name, z, spot) not in unavailable]
            quota = unavailable.get((info.family, "*", spot))
            if quota is not None or not usable:
                why = quota or "; ".join(sorted({unavailable[(info.name, z, spot)] for z in zones}))
                notes.append(f"{pool_id(provider, region, info.name, spot)}: left out: {why}")
                continue
            listed = table.price(region, info.name)
            source = "table"
            price: float | None = None
            if spot:
                price = spot_price(answers.spot_rows.get(info.name, []), usable, now)
                source = "api"
                if price is None:
                    price, source = (listed.spot if listed else None), "table"
            elif listed is not None:
                price = listed.on_demand
            if price is None or price <= 0:
                notes.append(
                    f"{pool_id(provider, region, info.name, spot)}: left out: no price known "
                    f"(not in the price table of {table.date}); add it to a table of your own "
                    "(prices = 'file.json')"
                )
                continue
            most = config.max_instances
            if config.max_hourly_usd is not None:
                most = min(most, math.floor(config.max_hourly_usd / price))
            if most < 1:
                notes.append(
                    f"{pool_id(provider, region, info.name, spot)}: left out: one instance costs "
                    f"${price:.3f}/h, more than max_hourly_usd = {config.max_hourly_usd}"
                )
                continue
            share: PoolQuota | None = None
            known = vcpu_quota(info.name, spot)
            if known is not None and known[0] in quotas:
                code, what = known
                limit, left = quotas[code]
                if info.vcpus > limit:
                    notes.append(
                        f"{pool_id(provider, region, info.name, spot)}: left out: one instance "
                        f"takes {info.vcpus} vCPUs, more than the account quota {code} ({what}) "
                        f"of {limit:g} in {region}; ask AWS for more (aws service-quotas "
                        f"request-service-quota-increase --service-code ec2 --quota-code {code} "
                        f"--region {region} --desired-value N)"
                    )
                    continue
                share = PoolQuota(
                    group=quota_group(region, code),
                    name=f"{code} ({what})",
                    limit=limit,
                    left=max(0.0, left),
                    per_instance=float(info.vcpus),
                )
            rate = table.interruption_rate(region, info.name) if spot else 0.0
            pool = Pool(
                id=pool_id(provider, region, info.name, spot),
                provider=provider,
                kind="cloud",
                site=region,
                region=region,
                node=Shape(cpus=float(info.vcpus), memory=info.memory, gpus=dict(info.gpus)),
                price_per_hour=round(price, 6),
                spot=spot,
                interruption_rate=rate if rate is not None else 0.0,
                max_instances=most,
                boot_s=table.boot_seconds(info.name),
                hardware_class=HARDWARE_PREFIX + info.name,
                queue_depth=QUEUE_DEPTH,
                quota=share,
            )
            out.append(
                Offer(
                    pool=pool,
                    zones=usable,
                    subnets={z: by_zone_subnet[z] for z in usable if z in by_zone_subnet},
                    price_source=source,
                )
            )
    out.sort(key=lambda o: o.pool.id)
    return out, notes
