"""The bundled, dated EC2 price table (``prices.json`` beside this module), or a user's own.

Used where the APIs give no price: on-demand prices always (the Pricing API is not queried),
spot prices when ``describe_spot_price_history`` has no recent real values, interruption
bands (no API gives them), and boot time estimates by instance family. The table states its
date, its source and its licence; ``describe()`` is what a ``stowplan prices`` command prints.

A band such as ``"5-10%"`` (the share of instances interrupted in a month) becomes a rate per
instance-hour, ``-ln(1 - p) / 730`` with ``p`` the band's midpoint (``interruption_bands``),
which is what ``Pool.interruption_rate`` means.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import msgspec
from msgspec import Struct, field

from stowplan.errors import SpecError

BUNDLED = Path(__file__).with_name("prices.json")
HOURS_PER_MONTH = 730.0


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


def load(path: str | None, *, field_path: str = "prices") -> PriceTable:
    """The bundled table, or the one at ``path`` (a ``SpecError`` naming ``field_path`` when it
    cannot be read)."""
    if path is None:
        return bundled()
    file = Path(path).expanduser()
    try:
        return _decoder.decode(file.read_bytes())
    except OSError as e:
        problem = f"cannot be read ({e.strerror or type(e).__name__})"
    except msgspec.ValidationError as e:
        problem = f"is not a price table: {e}"
    except msgspec.DecodeError as e:
        problem = f"is not JSON: {e}"
    raise SpecError(
        f"price table {path!r} {problem}",
        file="stowplan.toml",
        path=field_path,
        hint="give a JSON file in the format of the bundled table (stowplan/providers/aws/"
        "prices.json), or leave prices out to use the bundled one",
    )
