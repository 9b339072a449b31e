"""Human units: memory sizes and durations."""

from __future__ import annotations

import math

import pytest

from stowplan.spec.units import format_size, parse_duration, parse_size

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GiB),
        ("4gib", 4 * GiB),
        ("4 GiB", 4 * GiB),
        ("4Gi", 4 * GiB),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 1024**2),
        ("1.5G", 1_500_000_000),
        ("1.5GiB", 3 * GiB // 2),
        ("2KB", 2000),
        ("2KiB", 2048),
        ("1TB", 10**12),
        ("1TiB", 1024**4),
        ("0.5KiB", 512),
        ("100", 100),
        ("100B", 100),
        (4096, 4096),
        (1073741824, GiB),
        (2048.0, 2048),
    ],
)
def test_parse_size_accepts(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.01KB", 2010), ("4.06KB", 4060), ("8.03KB", 8030), ("1.15KB", 1150), ("0.1GB", 10**8)],
)
def test_parse_size_decimal_fractions_are_exact(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4GX", "four GiB", "GiB", "", "1e9", "4 G i B", "-1GiB"])
def test_parse_size_rejects_text_and_names_units(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size") as info:
        parse_size(text)
    message = str(info.value)
    for unit in ("KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"):
        assert unit in message


@pytest.mark.parametrize("value", [0, -1, -4096, "0GiB", "0", 0.25, "0.1B"])
def test_parse_size_rejects_non_positive(value: int | float | str) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_size(value)


@pytest.mark.parametrize("value", [math.inf, math.nan, -math.inf])
def test_parse_size_rejects_non_finite_with_value_error(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_size(value)


def test_parse_size_rejects_booleans() -> None:
    with pytest.raises(ValueError, match="boolean"):
        parse_size(True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("30m", 1800.0),
        ("30min", 1800.0),
        ("2h", 7200.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        (" 2h ", 7200.0),
        ("1:30:00", 5400.0),
        ("0:00:01", 1.0),
        ("1:30", 5400.0),  # H:MM (NB: Slurm's --time reads "1:30" as M:SS)
        ("1-00:00:00", 86400.0),
        ("2-01:02:03", 2 * 86400.0 + 3600 + 120 + 3),
        ("1-12:00", 86400.0 + 12 * 3600),
    ],
)
def test_parse_duration_accepts(value: int | float | str, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("text", ["soon", "30x", "2 hours", "1:2:3:4", "h", "-5m", "1::00"])
def test_parse_duration_rejects_text_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as info:
        parse_duration(text)
    assert "'30m'" in str(info.value)
    assert "'1:30:00'" in str(info.value)


@pytest.mark.parametrize("value", [0, -1, "0s", "0:00:00", 0.0])
def test_parse_duration_rejects_non_positive(value: int | float | str) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_duration(value)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_parse_duration_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize("text", ["1:75:00", "0:10:60", "1:60"])
def test_parse_duration_rejects_clock_minutes_or_seconds_over_59(text: str) -> None:
    with pytest.raises(ValueError, match="up to 59"):
        parse_duration(text)


def test_parse_duration_rejects_booleans() -> None:
    with pytest.raises(ValueError, match="boolean"):
        parse_duration(False)


@pytest.mark.parametrize(
    ("n", "text"),
    [(4 * GiB, "4GiB"), (1536, "1.5KiB"), (100, "100B"), (1024**4, "1TiB"), (1024, "1KiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n", [1, 1023, 1024, 3 * 1024**2, 7 * GiB, 2 * 1024**4])
def test_format_size_round_trips_whole_units(n: int) -> None:
    assert parse_size(format_size(n)) == n
