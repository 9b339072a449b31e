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
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from msgspec import Struct, field

from stowplan.placement.problem import Pool, Shape
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
) -> tuple[list[Offer], list[str]]:
    """The pools of one region, sorted by id, and notes on what was left out and why.

    ``unavailable`` maps (instance type, zone, spot) to why the driver will not try that zone
    for now (capacity ran out; the type is unsupported there), and (family, "*", spot) to why
    the family is at its vCPU quota."""
    unavailable = unavailable or {}
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
