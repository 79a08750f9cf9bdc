import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.config.units import Rate, format_duration, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("90d", 90 * 86400.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        (".5s", 0.5),
        ("0s", 0.0),
        (" 10s ", 10.0),
        ("10", 10.0),
        ("0.1", 0.1),
        (5, 5.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "bad",
    ["2 secs", "", "-1s", "abc", "1e3s", "1.s", "10S", "1m30s", "s", "10 s", "inf", "nan", "٣s"],
)
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError) as err:
        parse_duration(bad)
    assert str(err.value) == f'"{bad}" is not a duration'


@pytest.mark.parametrize("bad", [-1, -0.5, True, None, math.inf, math.nan, 10**400, [1]])
def test_parse_duration_rejects_non_strings(bad):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(bad)


def test_error_message_exact():
    with pytest.raises(ValueError) as err:
        parse_duration("2 secs")
    assert str(err.value) == '"2 secs" is not a duration'


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (10, "10s"),
        (1.5, "1500ms"),
        (90, "90s"),
        (120, "2m"),
        (3600, "1h"),
        (129600, "36h"),
        (90 * 86400, "90d"),
        (0.0005, "500us"),
        (0.001, "1ms"),
        (1.0000001, "1.0000001s"),
        (1e-7, "0.1us"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1, math.inf, math.nan])
def test_format_duration_rejects(bad):
    with pytest.raises(ValueError):
        format_duration(bad)


@given(st.integers(min_value=0, max_value=10**15))
def test_duration_round_trips_whole_microseconds(micros):
    seconds = micros / 1_000_000
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.floats(min_value=1e-4, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_duration_round_trips_any_float_in_range(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([("us", 1e-6), ("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
)
def test_parse_duration_scales_by_unit(n, unit):
    suffix, scale = unit
    assert parse_duration(f"{n}{suffix}") == pytest.approx(n * scale, rel=1e-12)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5MB", 5 * 2**20),
        ("512KB", 512 * 2**10),
        ("1GB", 2**30),
        ("100B", 100),
        ("1.5MB", 1572864),
        ("5MiB", 5 * 2**20),
        ("2KiB", 2048),
        ("1GiB", 2**30),
        ("2TB", 2 * 2**40),
        ("3k", 3072),
        ("3M", 3 * 2**20),
        ("10mb", 10 * 2**20),
        ("1024", 1024),
        (" 1KB ", 1024),
        ("0B", 0),
        (1024, 1024),
        (2.0, 2),
        (2**70, 2**70),
        ("123456789012345678901234567890", 123456789012345678901234567890),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("bad", ["5 MB", "", "-1MB", "1.5B", "1.5", "x", "MB", "5XB", "1ki", "5MBs"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError) as err:
        parse_size(bad)
    assert str(err.value) == f'"{bad}" is not a size'


@pytest.mark.parametrize("bad", [-1, 1.5, True, None, math.inf, math.nan])
def test_parse_size_rejects_non_strings(bad):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["KB", "KiB", "MB", "MiB", "GB", "GiB"]))
def test_size_units_are_1024_based(n, unit):
    power = {"K": 1, "M": 2, "G": 3}[unit[0]]
    assert parse_size(f"{n}{unit}") == n * 1024**power


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/s", 100, 1.0),
        ("1000/min", 1000, 60.0),
        ("5/m", 5, 60.0),
        ("10/h", 10, 3600.0),
        ("2/500ms", 2, 0.5),
        ("20/10s", 20, 10.0),
        ("3/sec", 3, 1.0),
        ("3/second", 3, 1.0),
        ("4/hour", 4, 3600.0),
        ("7/d", 7, 86400.0),
        ("7/day", 7, 86400.0),
        (" 100 / s ", 100, 1.0),
    ],
)
def test_parse_rate(text, count, period):
    rate = parse_rate(text)
    assert rate == Rate(count, period)
    assert rate.per_second == count / period


@pytest.mark.parametrize(
    "bad", ["100", "100/", "/s", "0/s", "-1/s", "1.5/s", "100/5", "100/x", "100/0s", "a/s", "1/2/s"]
)
def test_parse_rate_rejects(bad):
    with pytest.raises(ValueError) as err:
        parse_rate(bad)
    assert str(err.value) == f'"{bad}" is not a rate'


def test_parse_rate_rejects_non_strings():
    with pytest.raises(ValueError, match='"5" is not a rate'):
        parse_rate(5)


def test_parse_rate_passes_a_rate_through():
    rate = Rate(1, 2.0)
    assert parse_rate(rate) is rate


def test_rate_validates_and_is_frozen():
    with pytest.raises(ValueError):
        Rate(0, 1.0)
    with pytest.raises(ValueError):
        Rate(1, 0.0)
    with pytest.raises(AttributeError):
        Rate(1, 1.0).count = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("100/s", "100/s"),
        ("1000/min", "1000/m"),
        ("2/500ms", "2/500ms"),
        ("20/10s", "20/10s"),
        ("1/day", "1/d"),
    ],
)
def test_rate_str(text, shown):
    assert str(parse_rate(text)) == shown


@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=1, max_value=10**12))
def test_rate_str_round_trips(count, period_micros):
    rate = Rate(count, period_micros / 1_000_000)
    assert parse_rate(str(rate)) == rate
