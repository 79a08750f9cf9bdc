"""Human units in config: durations (`250ms`), sizes (`5MB`) and rates (`100/s`).

Parsed once at load time, so nothing on the request path ever reads a unit string again.
Errors are one line, `"<value>" is not a duration|size|rate`, so the config loader can put the
field path in front of them.

- Durations are seconds (float): `500us`, `250ms`, `1.5s`, `2m`, `1h`, `90d`, or a plain number
  of seconds. No sign, no spaces inside, no exponents.
- Sizes are bytes (int), 1024-based whatever the spelling, as nginx reads them: `KB` = `KiB` =
  `K` = 2**10 and so on up to `TB`; units are case-insensitive; a plain integer is bytes.
- Rates are `count/period`: the period is a unit (`s`, `sec`, `second`, `m`, `min`, `minute`,
  `h`, `hour`, `d`, `day`) or a duration (`2/500ms`, `20/10s`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Rate", "format_duration", "parse_duration", "parse_rate", "parse_size"]

# unit -> (multiplier, divisor): seconds = value * multiplier / divisor. Sub-second units divide
# so that "250ms" is exactly 0.25 (250 / 1000), not 250 * 0.001.
_DURATION_UNITS: dict[str, tuple[int, int]] = {
    "us": (1, 1_000_000),
    "µs": (1, 1_000_000),
    "ms": (1, 1000),
    "s": (1, 1),
    "m": (60, 1),
    "h": (3600, 1),
    "d": (86400, 1),
}
# Largest first, for format_duration.
_FORMAT_UNITS = ("d", "h", "m", "s", "ms", "us")

_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_DURATION = re.compile(rf"({_NUMBER})(us|µs|ms|s|m|h|d)?")
_SIZE = re.compile(rf"({_NUMBER})([kmgt](?:i?b)?|b)?", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_RATE_WORDS = {
    "sec": "1s", "second": "1s", "min": "1m", "minute": "1m", "hr": "1h", "hour": "1h", "day": "1d",
}  # fmt: skip


def _plain_number(value: object) -> float | None:
    """An int or float from YAML (bool is an int in Python, but never a quantity)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            return math.inf
    return None


def _duration_text(text: str, *, unit_required: bool) -> float | None:
    m = _DURATION.fullmatch(text.strip())
    if m is None or (unit_required and m.group(2) is None):
        return None
    mul, div = _DURATION_UNITS[m.group(2) or "s"]
    seconds = float(m.group(1)) * mul / div
    return seconds if math.isfinite(seconds) else None


def parse_duration(value: str | int | float) -> float:
    """Seconds from `"250ms"`, `"10s"`, `"2m"`, `"1h"`, `"90d"`, `"500us"` or a plain number."""
    number = _plain_number(value)
    if number is not None:
        seconds: float | None = number if number >= 0 and math.isfinite(number) else None
    else:
        seconds = _duration_text(value, unit_required=False) if isinstance(value, str) else None
    if seconds is None:
        raise ValueError(f'"{value}" is not a duration')
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest whole-number spelling that parses back exactly: 0.25 -> "250ms", 90 -> "90s".

    Values that are not a whole number of any unit (1e-7, 1.0000001) fall back to seconds.
    """
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{seconds!r} is not a duration")
    if seconds == 0:
        return "0s"
    for unit in _FORMAT_UNITS:
        mul, div = _DURATION_UNITS[unit]
        whole = round(seconds * div / mul)
        if whole >= 1 and whole * mul / div == seconds:
            return f"{whole}{unit}"
    text = repr(float(seconds))
    if "e" in text:  # too small for a plain decimal; precision below a microsecond is noise
        return f"{seconds * 1e6:.6f}".rstrip("0").rstrip(".") + "us"
    return text + "s"


def parse_size(value: str | int | float) -> int:
    """Bytes from `"5MB"`, `"512KB"`, `"1.5MB"`, `"5MiB"`, `"100B"` or an integer (1024-based)."""
    size: int | None = None
    if isinstance(value, bool):
        pass  # YAML `true` is not a size
    elif isinstance(value, int):
        size = value
    elif isinstance(value, float):
        size = int(value) if value.is_integer() else None
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        power = _SIZE_POWERS[(m.group(2) or "")[:1].lower()]
        number = float(m.group(1)) * 1024**power
        if power == 0 and "." not in m.group(1):
            size = int(m.group(1))  # exact, however long
        elif math.isfinite(number) and (power or number.is_integer()):  # no half bytes
            size = round(number)
    if size is None or size < 0:
        raise ValueError(f'"{value}" is not a size')
    return size


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `period` seconds."""

    count: int
    period: float

    def __post_init__(self) -> None:
        if self.count < 1 or not (math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"a rate needs a positive count and period, not {self.count}/{self.period}")

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        period = format_duration(self.period)
        if period[0] == "1" and period[1:].isalpha():
            period = period[1:]  # "100/s", not "100/1s"
        return f"{self.count}/{period}"


def parse_rate(value: str | Rate) -> Rate:
    """A `Rate` from `"100/s"`, `"1000/min"`, `"5/m"`, `"10/h"`, `"2/500ms"` or `"20/10s"`."""
    if isinstance(value, Rate):
        return value
    if isinstance(value, str):
        count, sep, period_text = value.partition("/")
        count = count.strip()
        period_text = period_text.strip()
        period_text = _RATE_WORDS.get(period_text.lower(), period_text)
        if period_text in _DURATION_UNITS:
            period_text = "1" + period_text  # "100/s" is "100/1s"
        period = _duration_text(period_text, unit_required=True)
        if sep and count.isascii() and count.isdigit() and int(count) >= 1 and period:
            return Rate(int(count), period)
    raise ValueError(f'"{value}" is not a rate')
