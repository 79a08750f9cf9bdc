"""Retry policy: which failures may be retried, how long to wait, and a budget that keeps
retries from multiplying load on a backend that is already failing (Finagle/Envoy style).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["IDEMPOTENT_METHODS", "RetryBudget", "backoff", "is_retryable"]

# RFC 9110 9.2.2; POST and PATCH may have done their work even when the response never came.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def is_retryable(method: str, *, request_sent: bool, retry_non_idempotent: bool) -> bool:
    """A failure before any byte was sent is always safe to retry; after that only idempotent
    methods (exact, upper-case names as on the wire), unless the route opts in."""
    return not request_sent or retry_non_idempotent or method in IDEMPOTENT_METHODS


def backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry): "full jitter",
    uniform in [0, min(cap, base * 2**attempt)), with `rand` in [0, 1) from the caller's RNG."""
    if attempt < 0 or not 0.0 <= rand < 1.0:
        raise ValueError("backoff needs attempt >= 0 and 0 <= rand < 1")
    return rand * min(cap, base * (1 << min(attempt, 62)))  # the shift caps before float overflow


class RetryBudget:
    """Retries allowed in the last `window` seconds: `ratio` of the original requests in that
    window plus a reserve of `min_per_second * window`, so a quiet service can still retry.

    Call `record_request` for every original request (not for retries: retries that earned
    budget would let a failing backend feed itself). Counts live in a ring of one-second
    buckets, so the window is whole seconds (rounded up) and memory is O(window).
    """

    __slots__ = (
        "ratio",
        "reserve",
        "_n",
        "_requests",
        "_retries",
        "_second",
        "_total_requests",
        "_total_retries",
    )

    def __init__(self, ratio: float = 0.2, min_per_second: float = 3.0, window: float = 10.0) -> None:
        if not (ratio >= 0 and min_per_second >= 0 and window > 0 and math.isfinite(window)):
            raise ValueError("retry budget needs ratio >= 0, min_per_second >= 0 and window > 0")
        self.ratio = ratio
        self.reserve = min_per_second * window
        self._n = max(1, math.ceil(window))
        self._requests = [0] * self._n
        self._retries = [0] * self._n
        self._second: int | None = None  # the newest bucket's second; None before any event
        self._total_requests = 0
        self._total_retries = 0

    def record_request(self, now: float) -> None:
        second = self._second
        # Within the newest bucket's second (nearly every request) nothing leaves the window.
        i = second % self._n if second is not None and second <= now < second + 1 else self._advance(now)
        self._requests[i] += 1
        self._total_requests += 1

    def try_spend(self, now: float) -> bool:
        """True, and the retry is counted, if one more retry stays within budget."""
        i = self._advance(now)
        if self._total_retries + 1 > self.ratio * self._total_requests + self.reserve:
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def snapshot(self, now: float) -> dict[str, Any]:
        """For the admin API: counts in the window and the retries still allowed."""
        self._advance(now)
        allowed = self.ratio * self._total_requests + self.reserve - self._total_retries
        return {
            "requests": self._total_requests,
            "retries": self._total_retries,
            "available": max(0, math.floor(allowed)),
        }

    def _advance(self, now: float) -> int:
        """Drop buckets that left the window; the index of `now`'s bucket."""
        second = math.floor(now)
        last = self._second
        if last is None or second - last >= self._n:
            self._requests = [0] * self._n
            self._retries = [0] * self._n
            self._total_requests = self._total_retries = 0
        elif second > last:
            requests, retries, n = self._requests, self._retries, self._n
            for s in range(last + 1, second + 1):
                j = s % n
                self._total_requests -= requests[j]
                self._total_retries -= retries[j]
                requests[j] = retries[j] = 0
        else:
            return last % self._n  # same second, or a clock that stepped back: stay put
        self._second = second
        return second % self._n
