"""The bundled, dated EC2 price table (``prices.json`` beside this module), or a user's own.

Used where the APIs give no price: on-demand prices always (the Pricing API is not queried),
spot prices when ``describe_spot_price_history`` has no recent real values, interruption
bands (no API gives them), and boot time estimates by instance family. The table states its
date, its source and its licence; ``describe()`` is what a ``stowplan prices`` command prints.

A band such as ``"5-10%"`` (the share of instances interrupted in a month) becomes a rate per
instance-hour, ``-ln(1 - p) / 730`` with ``p`` the band's midpoint (``interruption_bands``),
which is what ``Pool.interruption_rate`` means.

Billing (``bill``), the rule each attempt's recorded cost follows: EC2 bills an instance per
second with a 60-second minimum. An instance's attempts are billed for the time it was busy
with them: the union of their ``[started, ended]`` intervals, at least ``MIN_BILLED_S``. That
total is split across the attempts that shared the instance in proportion to each one's own
duration (two attempts packed side by side for an hour are billed half an hour each; one
alone for 10 s is billed 60 s). Dollars are billed seconds at the pool's hourly price: in a
run, the pool's price as last discovered (``pool_rate``: the table's on-demand price, or for a
spot pool the market's recent price where the API gives one, else the table's typical spot
price); from a table alone (``costs`` given a ``PriceTable``), the table's. What the bill has beyond
that, an instance's boot and its idle time before it shuts itself down (at most
``idle_shutdown``), belongs to no attempt and is not recorded, so recorded totals are a lower
bound of the bill; and a spot pool's real price is the market's, not the table's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from msgspec import Struct, field

from stowplan.errors import SpecError

if TYPE_CHECKING:
    from stowplan.placement.problem import Pool
    from stowplan.provenance.records import AttemptRecord
    from stowplan.provenance.store.runs import RunTables

BUNDLED = Path(__file__).with_name("prices.json")
HOURS_PER_MONTH = 730.0
MIN_BILLED_S = 60.0
"""EC2 bills an instance for at least a minute each time it starts."""


class TypePrice(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    on_demand: float
    spot: float | None = None
    interruption: str | None = None


class PriceTable(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    date: str
    source: str
    licence: str
    currency: str = "USD per instance-hour"
    compiled: str | None = None
    interruption_bands: dict[str, float] = field(default_factory=dict)
    boot_s: dict[str, float] = field(default_factory=dict)
    regions: dict[str, dict[str, TypePrice]] = field(default_factory=dict)

    def price(self, region: str, instance_type: str) -> TypePrice | None:
        return self.regions.get(region, {}).get(instance_type)

    def interruption_rate(self, region: str, instance_type: str) -> float | None:
        """Interruptions per instance-hour, from the type's band; None when not listed."""
        p = self.price(region, instance_type)
        if p is None or p.interruption is None or p.interruption not in self.interruption_bands:
            return None
        share = min(0.99, max(0.0, self.interruption_bands[p.interruption]))
        return -math.log1p(-share) / HOURS_PER_MONTH

    def boot_seconds(self, instance_type: str) -> float:
        family = instance_type.split(".", 1)[0]
        return self.boot_s.get(family, self.boot_s.get("default", 120.0))

    def describe(self, path: Path | None = None) -> str:
        """Where the table comes from, for people: its date, source and licence."""
        n = sum(len(t) for t in self.regions.values())
        head = f"EC2 price table of {self.date}" + (
            f" (compiled {self.compiled})" if self.compiled else ""
        )
        return (
            f"{head}: {n} prices in {', '.join(sorted(self.regions))}, {self.currency}\n"
            f"file: {path or BUNDLED}\nsource: {self.source}\nlicence: {self.licence}"
        )


_decoder = msgspec.json.Decoder(PriceTable)


@cache
def bundled() -> PriceTable:
    return _decoder.decode(BUNDLED.read_bytes())


def load(
    path: str | None, *, field_path: str = "prices", file: str | None = "stowplan.toml"
) -> PriceTable:
    """The bundled table, or the one at ``path`` (a ``SpecError`` naming ``file`` and
    ``field_path`` when it cannot be read)."""
    if path is None:
        return bundled()
    src = Path(path).expanduser()
    try:
        return _decoder.decode(src.read_bytes())
    except OSError as e:
        problem = f"cannot be read ({e.strerror or type(e).__name__})"
    except msgspec.ValidationError as e:
        problem = f"is not a price table: {e}"
    except msgspec.DecodeError as e:
        problem = f"is not JSON: {e}"
    raise SpecError(
        f"price table {path!r} {problem}",
        file=file,
        path=field_path,
        hint="give a JSON file in the format of the bundled table (stowplan/providers/aws/"
        "prices.json), or leave prices out to use the bundled one",
    )


class PriceRow(Struct, frozen=True, kw_only=True):
    """One line of a price table, as ``stowplan prices`` shows it."""

    region: str
    instance_type: str
    on_demand: float
    spot: float | None
    interruption: str | None


def rows(table: PriceTable, region: str | None = None) -> list[PriceRow]:
    """The table's prices by region, then by family and size (``g5.2xlarge`` before
    ``g5.12xlarge``), optionally of one region only."""
    out = [
        PriceRow(
            region=r,
            instance_type=t,
            on_demand=p.on_demand,
            spot=p.spot,
            interruption=p.interruption,
        )
        for r, types in table.regions.items()
        if region is None or r == region
        for t, p in types.items()
    ]
    out.sort(key=lambda row: (row.region, *_type_order(row.instance_type)))
    return out


_SIZES = ("nano", "micro", "small", "medium", "large", "xlarge")


def _type_order(instance_type: str) -> tuple[str, int, str]:
    family, _, size = instance_type.partition(".")
    if size in _SIZES:
        return family, _SIZES.index(size), size
    n = size.removesuffix("xlarge")
    if n.isdigit() and size.endswith("xlarge"):
        return family, len(_SIZES) - 1 + int(n), size
    return family, 10**6, size  # metal and the like, last


# ---- billing: the rule is in the module docstring ------------------------------------------


class Busy(Struct, frozen=True, kw_only=True):
    """One finished attempt on one instance: what billing needs to know of it."""

    key: str
    instance: str
    started_at: float
    ended_at: float


def bill(attempts: Sequence[Busy], *, min_billed_s: float = MIN_BILLED_S) -> dict[str, float]:
    """Billed seconds of each attempt (by key): per instance, the union of its attempts'
    intervals (at least ``min_billed_s``) split by each attempt's share of their durations.

    Pure and order-free: an instance's attempts are billed together, so pass every finished
    attempt of an instance (a later one changes the earlier ones' shares when they overlap)."""
    by_instance: dict[str, list[Busy]] = {}
    for a in attempts:
        by_instance.setdefault(a.instance, []).append(a)
    out: dict[str, float] = {}
    for group in by_instance.values():
        group.sort(key=lambda a: (a.started_at, a.key))
        busy = 0.0
        start = end = -math.inf
        for a in group:
            s, e = a.started_at, max(a.started_at, a.ended_at)
            if s > end:
                busy += max(0.0, end - start) if end > -math.inf else 0.0
                start, end = s, e
            else:
                end = max(end, e)
        busy += max(0.0, end - start)
        billed = max(min_billed_s, busy)
        durations = [max(0.0, a.ended_at - a.started_at) for a in group]
        total = sum(durations)
        for a, d in zip(group, durations, strict=True):
            share = d / total if total > 0 else 1.0 / len(group)
            out[a.key] = billed * share
    return out


def usd(billed_s: float, price_per_hour: float) -> float:
    """Dollars for ``billed_s`` seconds at ``price_per_hour``, rounded to a millionth."""
    return round(billed_s * price_per_hour / 3600.0, 6)


def hourly(table: PriceTable, region: str, instance_type: str, spot: bool) -> float | None:
    """The hourly price billing uses: on-demand, or the typical spot price (on-demand when the
    table lists none, an upper bound); None when the table does not know the type."""
    p = table.price(region, instance_type)
    if p is None:
        return None
    if spot and p.spot is not None:
        return p.spot
    return p.on_demand


class Rate(Struct, frozen=True, kw_only=True):
    """What one elastic pool's attempts are billed at: its instance type, market and hourly
    price (the control plane takes them from the pool as last discovered)."""

    instance_type: str
    spot: bool
    per_hour: float


def pool_rate(pool: Pool) -> Rate | None:
    """The rate of a priced elastic pool (``Pool.price_per_hour`` per instance-hour); None for
    any other. Its instance type is the pool's hardware class less the provider kind's
    prefix (``aws:g5.xlarge`` -> ``g5.xlarge``)."""
    if not pool.elastic or pool.price_per_hour <= 0:
        return None
    kind = pool.hardware_class.partition(":")
    return Rate(
        instance_type=kind[2] if kind[1] else (pool.hardware_class or pool.id),
        spot=pool.spot,
        per_hour=pool.price_per_hour,
    )


def costs(
    provider: str, table: PriceTable | Mapping[str, Rate], attempts: Sequence[AttemptRecord]
) -> list[AttemptRecord]:
    """The cost of each of ``provider``'s finished attempts among ``attempts``, as key-only
    updates for ``RunStore.update_attempts`` (instance type, market, billed seconds, dollars).

    ``table`` is a price table (an AWS pool id says the region, type and market to look up)
    or the rate of each pool by id (``pool_rate``: any priced elastic provider).

    Pass every attempt that ran on the instances concerned (``RunStore.attempts_on``): they are
    billed together. Attempts still running, of another provider, on a pool that is not one of
    ``provider``'s, or of a type the table does not price are left out."""
    from stowplan.provenance.records import AttemptRecord

    busy: list[Busy] = []
    where: dict[str, Rate] = {}
    for a in attempts:
        if a.provider != provider or not a.job_id or a.started_at is None:
            continue
        if a.ended_at is None:
            continue
        rate = _rate(provider, table, a.pool)
        if rate is None:
            continue
        busy.append(
            Busy(key=a.key, instance=a.job_id, started_at=a.started_at, ended_at=a.ended_at)
        )
        where[a.key] = rate
    billed = bill(busy)
    state = {a.key: a.state for a in attempts}
    return [
        AttemptRecord(
            key=key,
            run_id="",
            attempt=0,
            provider="",
            pool="",
            state=state[key],
            instance_type=where[key].instance_type,
            market="spot" if where[key].spot else "on-demand",
            billed_s=round(s, 3),
            usd=usd(s, where[key].per_hour),
        )
        for key, s in sorted(billed.items())
    ]


def _rate(provider: str, table: PriceTable | Mapping[str, Rate], pool: str) -> Rate | None:
    if not isinstance(table, PriceTable):
        return table.get(pool)
    from stowplan.providers.aws.discover import parse_pool_id

    ref = parse_pool_id(provider, pool)
    if ref is None:
        return None
    price = hourly(table, ref.region, ref.instance_type, ref.spot)
    if price is None:
        return None
    return Rate(instance_type=ref.instance_type, spot=ref.spot, per_hour=price)


def record_costs(
    store: RunTables,
    provider: str,
    table: PriceTable | Mapping[str, Rate],
    keys: Sequence[str],
) -> int:
    """Bill the attempts ``keys`` of ``provider`` that have ended, with every other attempt of
    their instances, and write their costs to ``store``; returns how many were written.

    The control plane's one call (``StoreActor.record_costs``), after it recorded a batch of
    reports of a priced elastic provider, with the rates of its pools as last discovered."""
    if not keys:
        return 0
    shared = store.attempts_on(provider, store.job_ids(provider, keys))
    updates = costs(provider, table, shared)
    if updates:
        store.update_attempts(updates)
    return len(updates)
