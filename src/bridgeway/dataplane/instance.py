"""One upstream instance and what the balancer, proxy and health checker know about it.

The proxy bumps `inflight` around each request, feeds `observe_latency` and
`outlier.record`; the active health checker feeds `health.record`; balancers read
`available(now)`, `inflight` and `load(now)`. All pure; the clock is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from math import exp
from typing import Any
from urllib.parse import urlsplit

__all__ = ["DECAY_SECONDS", "ActiveHealth", "Instance", "OutlierDetector"]

# Peak-EWMA decay constant (Finagle and linkerd use 10s): how fast old latency stops mattering.
DECAY_SECONDS = 10.0
# Load of an instance with requests in flight but no latency sample yet: worse than any measured
# one, so a new instance gets one request at a time until it has answered once (as Finagle does).
_UNMEASURED_PENALTY = 1e9


class ActiveHealth:
    """Verdicts of the active health checker, with hysteresis: `unhealthy_threshold`
    consecutive failures take an instance out, `healthy_threshold` consecutive passes bring it
    back. Starts healthy, so a fresh gateway serves before the first check round."""

    __slots__ = ("healthy_threshold", "unhealthy_threshold", "healthy", "successes", "failures")

    def __init__(self, healthy_threshold: int = 2, unhealthy_threshold: int = 3) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy = True  # read-only outside this class
        self.successes = 0  # consecutive passes while unhealthy
        self.failures = 0  # consecutive failures while healthy

    def record(self, ok: bool) -> bool:
        """One check result; True if it flipped `healthy`."""
        if self.healthy:
            self.failures = 0 if ok else self.failures + 1
            if self.failures < self.unhealthy_threshold:
                return False
        else:
            self.successes = self.successes + 1 if ok else 0
            if self.successes < self.healthy_threshold:
                return False
        self.healthy = not self.healthy
        self.successes = self.failures = 0
        return True


class OutlierDetector:
    """Passive ejection from live traffic, as Envoy does it.

    `consecutive_failures` failed requests in a row eject the instance for
    `base_ejection * times_ejected`, capped at `max_ejection`, so an instance that keeps failing
    stays out longer each time. Results that arrive while ejected are ignored (they come from
    requests sent before), so it returns with a clean count. Each full `base_ejection` period
    spent back in service forgives one past ejection.
    """

    __slots__ = (
        "consecutive_failures", "base_ejection", "max_ejection",
        "failures", "times_ejected", "ejected_until", "_forgive_from",
    )  # fmt: skip

    def __init__(
        self, consecutive_failures: int = 5, base_ejection: float = 30.0, max_ejection: float = 300.0
    ) -> None:
        if consecutive_failures < 1 or not 0 < base_ejection <= max_ejection:
            raise ValueError("outlier detection needs failures >= 1 and 0 < base_ejection <= max_ejection")
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.failures = 0
        self.times_ejected = 0  # as of the last record(); decays lazily
        self.ejected_until = -math.inf
        self._forgive_from = -math.inf  # when the current forgiveness period started

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def record(self, ok: bool, now: float) -> bool:
        """One request's result; True if this failure ejected the instance."""
        if now < self.ejected_until:
            return False
        if ok:
            self.failures = 0
            return False
        self.failures += 1
        if self.failures < self.consecutive_failures:
            return False
        self._forgive(now)
        self.times_ejected += 1
        self.failures = 0
        self.ejected_until = now + min(self.base_ejection * self.times_ejected, self.max_ejection)
        self._forgive_from = self.ejected_until
        return True

    def _forgive(self, now: float) -> None:
        if self.times_ejected:
            periods = int((now - self._forgive_from) // self.base_ejection)
            if periods > 0:
                self.times_ejected = max(0, self.times_ejected - periods)
                self._forgive_from += periods * self.base_ejection


@dataclass(slots=True, eq=False)
class Instance:
    """An upstream instance, e.g. `http://127.0.0.1:9101` or `http://10.0.0.7:8000/api`.

    Compared and hashed by identity: two registrations of the same URL are two instances.
    `expires_at` (monotonic seconds) is the TTL of a registered instance; None never expires.
    """

    url: str
    source: str = "config"  # "config" or "registered"
    expires_at: float | None = None
    health: ActiveHealth = field(default_factory=ActiveHealth)
    outlier: OutlierDetector = field(default_factory=OutlierDetector)
    inflight: int = 0
    host: str = field(init=False)
    port: int = field(init=False)
    base_path: str = field(init=False)  # "" or "/api": prefixed to every upstream request path
    latency_ewma: float = field(default=0.0, init=False)  # seconds, as of `latency_at`
    latency_at: float | None = field(default=None, init=False)  # None until the first sample

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http":
            raise ValueError(f'"{self.url}" is not an instance URL: only http://host:port is supported')
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f'"{self.url}" is not an instance URL: the port is invalid') from None
        if not parts.hostname or parts.username is not None or parts.query or parts.fragment:
            raise ValueError(f'"{self.url}" is not an instance URL: expected http://host:port[/path]')
        self.host = parts.hostname
        self.port = 80 if port is None else port
        self.base_path = parts.path.rstrip("/")

    @classmethod
    def from_url(cls, url: str, **fields: Any) -> Instance:
        """The same as `Instance(url, **fields)`; reads well at call sites that build from config."""
        return cls(url, **fields)

    def available(self, now: float) -> bool:
        """May the balancer send a request here: healthy, not ejected, not expired."""
        return (
            self.health.healthy
            and now >= self.outlier.ejected_until
            and (self.expires_at is None or now < self.expires_at)
        )

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def observe_latency(self, seconds: float, now: float) -> None:
        """Fold in one response time: a peak replaces the estimate at once (react to trouble
        fast), lower samples pull it down with weight growing with the time since the last."""
        if seconds >= self.latency_ewma or self.latency_at is None:
            self.latency_ewma = seconds
        else:
            w = exp(-max(0.0, now - self.latency_at) / DECAY_SECONDS)
            self.latency_ewma = self.latency_ewma * w + seconds * (1.0 - w)
        self.latency_at = now

    def load(self, now: float) -> float:
        """Peak-EWMA cost for p2c: latency estimate * (inflight + 1), lower is better.

        Between samples the estimate fades toward zero, so an instance that stopped getting
        traffic because it was slow is tried again (Finagle and linkerd do the same)."""
        at = self.latency_at
        if at is None:
            return _UNMEASURED_PENALTY * self.inflight
        age = now - at
        if age > 0.0:
            return self.latency_ewma * exp(-age / DECAY_SECONDS) * (self.inflight + 1)
        return self.latency_ewma * (self.inflight + 1)

    def snapshot(self, now: float) -> dict[str, Any]:
        """For the admin API."""
        ejected_for = max(0.0, self.outlier.ejected_until - now)
        return {
            "url": self.url,
            "source": self.source,
            "available": self.available(now),
            "healthy": self.health.healthy,
            "ejected": ejected_for > 0,
            "ejected_for": round(ejected_for, 3),
            "inflight": self.inflight,
            "latency_ms": round(self.latency_ewma * 1000.0, 3),
            "expires_in": None if self.expires_at is None else round(max(0.0, self.expires_at - now), 3),
        }
