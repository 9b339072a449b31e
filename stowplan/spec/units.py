"""Parsing of the human units users write (memory sizes, durations), and the limits of every
number the schema takes.

The limits are what the rest of the system can represent and a person can mean: integer
placement units (thousandths of a CPU, MiB) in int64, SQLite's signed 64-bit integers, numpy's
and scipy's seeds. They are defined here once; the spec models, the placement problem and the
CLI flags all check against these constants, and each error names the limit it broke.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Final

MAX_CPUS: Final = 2**20
"""CPUs one task or one provider's node may have (1,048,576)."""
MAX_GPUS: Final = 2**16
"""GPUs one task or one provider may have (65,536)."""
MAX_BYTES: Final = 2**60
"""Largest memory, data or bandwidth size, in bytes (1 EiB)."""
MAX_DURATION_S: Final = 10 * 365 * 86400
"""Longest timeout, walltime, runtime estimate or backoff: 10 years, in seconds."""
MAX_COUNT: Final = 2**31 - 1
"""Largest count a user may give (max_concurrent, quotas): a signed 32-bit integer."""
MAX_SWEEP_SIZE: Final = 10**7
"""Most trials one experiment may expand to, whatever policy.max_sweep_size says."""
MAX_SEED: Final = 2**63 - 1
"""Seeds are 0 to 2**63 - 1: numpy's PCG64 and scipy's Sobol take no negative seed, and runs
are stored with their seed in a signed 64-bit integer."""
MAX_INT: Final = 2**63 - 1
"""Integers anywhere else (sweep values, int ranges) fit a signed 64-bit integer."""
MAX_PRIORITY: Final = 2**31 - 1
"""Priorities are -(2**31 - 1) to 2**31 - 1."""
MAX_WEIGHT: Final = 1e6
"""Placement weights, prices per GB and queue factors: at most a million."""
MAX_BUDGET_S: Final = 86400.0
"""Solver budget: at most a day of deterministic solver time."""

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_CLOCK_RE = re.compile(r"^\s*(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?\s*$")


def parse_size(value: int | float | str) -> int:
    """Return a size in bytes: ``4GiB``, ``512MB``, ``1.5G``, or a plain number of bytes.

    Raises ValueError with the accepted units when the text is not a size.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as '4GiB', got a boolean")
    if isinstance(value, int | float):
        # not (value > 0) also rejects NaN; int(inf) would raise OverflowError, not ValueError
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"size must be a positive, finite number of bytes, got {value}")
        if int(value) <= 0:
            raise ValueError(f"size must be a positive, finite number of bytes, got {value}")
        return _bounded_size(int(value), value)
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if len(value) > 64 or not m or unit not in _SIZE_UNITS:
        raise ValueError(
            f"{value!r} is not a size; write a number with a unit such as '512MiB', '4GiB' or "
            "'2GB' (binary: KiB MiB GiB TiB, decimal: KB MB GB TB)"
        )
    # exact decimal arithmetic: in floats "2.01KB" would be 2009 bytes
    size = int(Decimal(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return _bounded_size(size, value)


def _bounded_size(size: int, value: object) -> int:
    if size > MAX_BYTES:
        raise ValueError(f"size must be at most 1 EiB ({MAX_BYTES:,} bytes), got {value!r}")
    return size


def parse_duration(value: int | float | str) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1:30:00"`` or ``"1-00:00:00"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30m', got a boolean")
    if isinstance(value, int | float):
        # float(10**400) would raise OverflowError: too large is infinite, and refused below
        seconds = float(value) if abs(value) < 1e300 else math.inf
    else:
        if len(value) > 64:
            raise ValueError(f"{value[:20]!r}... is not a duration; it is {len(value)} characters")
        m = _DURATION_RE.match(value)
        c = _CLOCK_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
        elif c:
            days, a, b, s = c.groups()
            if s is None:  # H:MM
                hours, minutes, secs = int(a), int(b), 0
            else:
                hours, minutes, secs = int(a), int(b), int(s)
            if minutes >= 60 or secs >= 60:
                raise ValueError(f"{value!r} is not a clock time; minutes and seconds go up to 59")
            seconds = float(int(days or 0) * 86400 + hours * 3600 + minutes * 60 + secs)
        else:
            raise ValueError(
                f"{value!r} is not a duration; write seconds (90), a unit ('30m', '2h', '1d') "
                "or a clock ('1:30:00', '2-00:00:00')"
            )
    if not seconds > 0 or not math.isfinite(seconds):  # not (x > 0) also rejects NaN
        raise ValueError(f"duration must be positive and finite, got {value!r}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration must be at most 10 years ({MAX_DURATION_S:,} s), got {value!r}")
    return seconds


def format_size(n: int) -> str:
    """Render bytes with binary units, as users write them."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


_IRREGULAR: Final = {"entry": "entries", "GPU(s)": "GPUs", "is": "are", "was": "were"}


def plural(n: float, noun: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs``, ``0 runs``, ``1 CPU``, ``1.5 CPUs``: a count and its noun.

    ``many`` is the plural when it is not the noun plus ``s`` (a few irregular ones are known).
    """
    count = f"{n:g}" if isinstance(n, float) else str(n)
    if n == 1:
        return f"{count} {noun}"
    return f"{count} {many or _IRREGULAR.get(noun) or noun + 's'}"


def verb(n: float, one: str, many: str) -> str:
    """``waits`` for one, ``wait`` for several: the verb that agrees with a count."""
    return one if n == 1 else many
