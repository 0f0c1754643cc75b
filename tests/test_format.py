"""The command line's sizes and durations (modelhost._format), which `ps` and `top` share."""

import pytest

from modelhost import _format

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (MiB - 1, "1024.0 KiB"), (300 * MiB, "300.0 MiB"), (int(2.1 * GiB), "2.1 GiB"),
    (2048 * GiB, "2048.0 GiB"),  # GiB at most
])
def test_size(value, text):
    assert _format.size(value) == text


def test_sizes_of_takes_the_unit_of_the_whole():
    assert _format.sizes_of([int(41.2 * GiB), int(79.6 * GiB)], int(79.6 * GiB)) == \
        "41.2 / 79.6 GiB"
    assert _format.sizes_of([512 * MiB, 2 * GiB], 2 * GiB) == "0.5 / 2.0 GiB"
    assert _format.sizes_of([12, 900], 900) == "12 / 900 B"


@pytest.mark.parametrize("value, text", [
    (None, "-"), (512, "512B"), (900 * 2**10, "900K"), (512 * MiB, "512M"),
    (int(2.3 * GiB), "2.3G"), (12 * GiB, "12G"),
])
def test_short_size(value, text):
    assert _format.short_size(value) == text


@pytest.mark.parametrize("seconds, text", [
    (None, "-"), (0, "0s"), (119.9, "119s"), (120, "2m"), (7199, "119m"), (7500, "2h05m"),
])
def test_duration(seconds, text):
    assert _format.duration(seconds) == text


@pytest.mark.parametrize("seconds, text", [
    (-3, "0s"), (42, "42s"), (250, "4m10s"), (7500, "2h05m"),
])
def test_countdown(seconds, text):
    assert _format.countdown(seconds) == text
