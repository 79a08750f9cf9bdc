"""The retry policy: what a failed attempt becomes. Pure: the clock and the random draw are
passed in, so every branch is tested without sleeping.

Back-off is exponential with full jitter (AWS architecture blog, "Exponential Backoff And
Jitter"): the n-th retry waits a uniform draw in [0, min(max_delay, base * 2**(n-1))], which
spreads a burst of failures instead of retrying them in lock-step. A job that has used its
`max_attempts` is buried in the dead-letter set instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Retry:
    at: float  # wall clock when the job is due again


@dataclass(frozen=True, slots=True)
class Bury:
    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base: float = 1.0  # seconds: the ceiling of the first retry's wait
    max_delay: float = 300.0  # seconds: the ceiling of any wait

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base < 0 or self.max_delay < 0:
            raise ValueError("max_attempts >= 1 and non-negative delays")

    def delay(self, attempts: int, draw: float) -> float:
        """The wait after failed attempt number `attempts` (1 = the first), `draw` in [0, 1)."""
        exponent = min(max(attempts - 1, 0), 62)  # 2**62 s is past any max_delay; avoids overflow
        return draw * min(self.max_delay, self.base * 2.0**exponent)

    def after_failure(
        self, attempts: int, max_attempts: int | None, now: float, draw: float, delay: float | None = None
    ) -> Retry | Bury:
        """A failed attempt (`attempts` used so far, this one included): retried at a time, or
        buried. `max_attempts` is the job's own (it may have been enqueued under an older
        config); `delay` is a delay the worker asked for (a nack), which replaces the back-off."""
        limit = max_attempts if max_attempts is not None else self.max_attempts
        if attempts >= limit:
            return Bury(f"failed {attempts} attempt{'s' if attempts != 1 else ''}")
        wait = self.delay(attempts, draw) if delay is None else max(0.0, delay)
        return Retry(now + wait)
