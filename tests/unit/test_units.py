"""Sizes and durations are shown one way everywhere: bytes in powers of 1024, durations as 9m50s."""

from __future__ import annotations

import pytest

from ava.units import format_duration, format_size


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.85, "850ms"),
        (0.9996, "1s"),
        (4.2, "4s"),
        (9.96, "10s"),
        (42, "42s"),
        (59.6, "1m00s"),
        (590.0, "9m50s"),
        (3720, "1h02m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
        (None, "-"),
    ],
)
def test_durations_read_as_minutes_and_seconds_never_as_590_0s(seconds: float | None, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0B"),
        (512, "512B"),
        (4096, "4.0KiB"),
        (16 << 20, "16.0MiB"),
        (int(1.2 * 2**30), "1.2GiB"),
        (5 << 40, "5.0TiB"),
        (3 << 50, "3.0PiB"),
        (None, "-"),
    ],
)
def test_sizes_read_in_powers_of_1024(value: int | None, shown: str) -> None:
    assert format_size(value) == shown


def test_an_unknown_value_shows_as_the_caller_says() -> None:
    assert format_size(None, unknown="?") == "?"
    assert format_duration(None, unknown="never") == "never"
