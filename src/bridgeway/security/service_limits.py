"""A service's `limits`, compiled once: which budget a request draws from, and the answer.

Each limit is a GCRA budget per service, or per client address (`per: ip`), optionally only for
upstream paths matching a glob. A request draws from every limit that applies; the first one
exhausted answers 429 with `Retry-After` and the IETF `RateLimit` headers, and an admitted request
carries the headers of its tightest budget. When the shared limiter (Redis) cannot be reached the
limit fails open or closed as configured, and that is logged and counted, never silent.
"""

from __future__ import annotations

import fnmatch
import re
import time

from bridgeway.config.models import LimitConfig
from bridgeway.errors import GatewayError
from bridgeway.observability.logs import get_logger
from bridgeway.observability.metrics import ServiceMetrics
from bridgeway.security.limits import LimiterUnavailable, MemoryLimiter, ratelimit_headers

log = get_logger("bridgeway.limits")
_LOG_EVERY = 10.0  # seconds between two "limiter unavailable" log lines of one service


class _Limit:
    __slots__ = ("config", "key", "path")

    def __init__(self, service: str, index: int, config: LimitConfig):
        self.config = config
        self.key = f"{service}:{index}:"
        self.path = re.compile(fnmatch.translate(config.path)).match if config.path else None


class ServiceLimits:
    __slots__ = ("service", "limits", "limiter", "metrics", "_logged_at")

    def __init__(self, service: str, configs: list[LimitConfig], limiter, metrics: ServiceMetrics):
        self.service = service
        self.limits = [_Limit(service, i, c) for i, c in enumerate(configs)]
        self.limiter = limiter
        self.metrics = metrics
        self._logged_at = float("-inf")

    async def check(self, path: bytes, client: str, key_id: str | None) -> list[tuple[bytes, bytes]]:
        """Draw from every applicable budget; raise RATE_LIMITED, or return the headers to add.
        A `per: key` limit applies to requests made with an API key (anonymous ones share one)."""
        tightest = None
        for limit in self.limits:
            if limit.path is not None and not limit.path(path.partition(b"?")[0].decode("latin-1")):
                continue
            per = limit.config.per
            key = limit.key + (client if per == "ip" else (key_id or "-") if per == "key" else "")
            rate = limit.config.rate
            try:
                if isinstance(self.limiter, MemoryLimiter):
                    decision = self.limiter.check(key, rate)  # no await on the in-process path
                else:
                    decision = await self.limiter.hit(key, rate)
            except LimiterUnavailable:
                self._unavailable(limit.config.on_unavailable)
                if limit.config.on_unavailable == "closed":
                    raise GatewayError(
                        "RATE_LIMITED",
                        "the rate limiter is unavailable and this limit fails closed",
                        headers=[(b"retry-after", b"1")],
                    ) from None
                continue
            if not decision.allowed:
                raise GatewayError(
                    "RATE_LIMITED",
                    f"rate limit of {rate.count} per {rate.period:g}s exceeded for service {self.service!r}",
                    headers=ratelimit_headers(decision, rate),
                )
            if tightest is None or decision.remaining < tightest[0].remaining:
                tightest = (decision, rate)
        return ratelimit_headers(*tightest) if tightest else []

    def _unavailable(self, mode: str) -> None:
        self.metrics.limiter_unavailable += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.error(
                "rate_limiter_unavailable",
                service=self.service,
                fail=mode,
                count=self.metrics.limiter_unavailable,
            )
