"""Compiled `limits`: which budgets a request draws from, and the answer when one is spent.

Budgets belong to a service (`services.X.limits`, per service, per client address or per caller)
or to a client of the authorization matrix (`clients.X.limits`, shared by all of that client's
calls, optionally only to one service). A budget is a rate (GCRA) or a number of requests in
flight (a concurrency slot, held until the response ends). A request draws from every budget
that applies; the first one spent answers 429 with `Retry-After` (and the IETF `RateLimit`
headers for rates), and an admitted request carries the headers of its tightest rate. When the
shared limiter (Redis) cannot be reached a budget fails open or closed as configured, and that is
logged and counted, never silent.
"""

from __future__ import annotations

import fnmatch
import re
import time

from bridgeway.config.models import ClientLimitConfig, LimitConfig
from bridgeway.config.units import Rate
from bridgeway.errors import GatewayError
from bridgeway.observability.logs import get_logger
from bridgeway.observability.metrics import ServiceMetrics
from bridgeway.security.limits import Decision, LimiterUnavailable, MemoryLimiter, ratelimit_headers

Tightest = tuple[Decision, Rate] | None
log = get_logger("bridgeway.limits")
_LOG_EVERY = 10.0  # seconds between two "limiter unavailable" log lines of one owner
_BUSY = [(b"retry-after", b"1")]
_SCOPES_MAX = 10_000


class _Budget:
    """One budget compiled from its config: plain attributes, since the hot path reads them per
    request and every read of a pydantic field goes through the model's __getattr__ hook."""

    __slots__ = (
        "key", "path", "service", "everywhere", "per", "rate", "concurrency", "on_unavailable", "_scopes",
    )  # fmt: skip

    def __init__(self, owner: str, index: int, config: LimitConfig | ClientLimitConfig):
        self.key = f"{owner.replace(' ', ':')}:{index}:"
        self.path = re.compile(fnmatch.translate(config.path)).match if config.path else None
        self.service = getattr(config, "service", None)
        self.everywhere = self.service is None and self.path is None  # applies without a look
        self.per = getattr(config, "per", "service")  # a client's budget is the client's own
        self.rate: Rate | None = config.rate
        self.concurrency: int | None = config.concurrency
        self.on_unavailable = config.on_unavailable
        self._scopes: dict[str, str] = {}  # client address or caller -> its limiter key

    def applies(self, service: str, path: bytes) -> bool:
        return (self.service is None or self.service == service) and (
            self.path is None or self.path(path.partition(b"?")[0].decode("latin-1")) is not None
        )

    def scope(self, client_ip: str, caller: str | None) -> str:
        """This budget's limiter key for a request. Made once per address or caller: a string
        built per request would also be hashed anew by the limiter's dict."""
        per = self.per
        if per != "ip" and per != "key":
            return self.key
        who = client_ip if per == "ip" else caller or "-"
        key = self._scopes.get(who)
        if key is None:
            if len(self._scopes) >= _SCOPES_MAX:  # bounded: a flood of addresses cannot grow it
                self._scopes.clear()
            key = self._scopes[who] = self.key + who
        return key


class Held:
    """Concurrency slots a request holds until its response has ended."""

    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: list[tuple[object, str, str | None]] = []  # (limiter, key, token)

    async def release(self) -> None:
        for limiter, key, token in self.slots:
            if isinstance(limiter, MemoryLimiter):
                limiter.release(key)
            else:
                await limiter.release(key, token)
        self.slots.clear()

    def release_now(self) -> None:
        """`release` for slots that are all in-process (the only kind `draw_now` takes)."""
        for limiter, key, _ in self.slots:
            limiter.release(key)
        self.slots.clear()


class Budgets:
    __slots__ = ("owner", "budgets", "limiter", "local", "holds", "lease", "_logged_at")

    def __init__(self, owner: str, configs, limiter, lease: float = 300.0):
        """`owner` names the budgets in keys, messages and logs: "service 'sim'", "client 'agi'"."""
        self.owner = owner
        self.budgets = [_Budget(owner, i, c) for i, c in enumerate(configs)]
        self.limiter = limiter
        self.local = isinstance(limiter, MemoryLimiter)  # answers without I/O: `draw_now`
        # Some budget counts requests in flight: a request then holds slots (`Held`) until it ends.
        self.holds = any(budget.concurrency is not None for budget in self.budgets)
        self.lease = lease  # a Redis slot outlives a crashed holder by at most this long
        self._logged_at = float("-inf")

    def draw_now(
        self,
        service: str,
        path: bytes,
        client_ip: str,
        caller: str | None,
        held: Held | None,
        tightest: Tightest = None,
    ) -> Tightest:
        """`draw` for the in-process limiter (`self.local`), without an await: a MemoryLimiter
        answers at once and never is unavailable, and on the hot path a coroutine per draw cost
        more than the GCRA step itself."""
        limiter = self.limiter
        for budget in self.budgets:
            if not (budget.everywhere or budget.applies(service, path)):
                continue
            key = budget.scope(client_ip, caller)
            if budget.concurrency is not None:
                if not limiter.acquire(key, budget.concurrency):
                    raise self._busy(budget.concurrency)
                held.slots.append((limiter, key, ""))
                continue
            rate = budget.rate
            decision = limiter.check(key, rate)  # `_tighter`, inline: this runs once per request
            if not decision.allowed:
                raise self._denied(decision, rate)
            if tightest is None or decision.remaining < tightest[0].remaining:
                tightest = (decision, rate)
        return tightest

    async def draw(
        self,
        service: str,
        path: bytes,
        client_ip: str,
        caller: str | None,
        metrics: ServiceMetrics,
        held: Held | None,
        tightest: Tightest = None,
    ) -> Tightest:
        """Draw from every applicable budget; raise RATE_LIMITED, or return the tightest rate
        budget so far (its headers go on the response). Slots taken go into `held`, which the
        caller releases when the response has ended (None where no budget `holds` any)."""
        if self.local:
            return self.draw_now(service, path, client_ip, caller, held, tightest)
        limiter = self.limiter
        for budget in self.budgets:
            if not (budget.everywhere or budget.applies(service, path)):
                continue
            key = budget.scope(client_ip, caller)
            try:
                if budget.concurrency is not None:
                    token = await limiter.acquire(key, budget.concurrency, self.lease)
                    if token is None:
                        raise self._busy(budget.concurrency)
                    held.slots.append((limiter, key, token))
                    continue
                decision = await limiter.hit(key, budget.rate)
            except LimiterUnavailable:
                self._unavailable(budget.on_unavailable, metrics)
                if budget.on_unavailable == "closed":
                    raise GatewayError(
                        "RATE_LIMITED",
                        "the rate limiter is unavailable and this limit fails closed",
                        headers=_BUSY,
                    ) from None
                continue
            tightest = self._tighter(decision, budget.rate, tightest)
        return tightest

    def _busy(self, concurrency: int) -> GatewayError:
        return GatewayError(
            "RATE_LIMITED", f"{concurrency} requests of {self.owner} are already in flight", headers=_BUSY
        )

    def _denied(self, decision: Decision, rate: Rate) -> GatewayError:
        return GatewayError(
            "RATE_LIMITED",
            f"rate limit of {rate.count} per {rate.period:g}s exceeded for {self.owner}",
            headers=ratelimit_headers(decision, rate),
        )

    def _tighter(self, decision: Decision, rate: Rate, tightest: Tightest) -> Tightest:
        """Raise RATE_LIMITED for a denied decision; else the tighter of it and `tightest`."""
        if not decision.allowed:
            raise self._denied(decision, rate)
        if tightest is None or decision.remaining < tightest[0].remaining:
            return (decision, rate)
        return tightest

    def _unavailable(self, mode: str, metrics: ServiceMetrics) -> None:
        metrics.limiter_unavailable += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.error(
                "rate_limiter_unavailable", limits=self.owner, fail=mode, count=metrics.limiter_unavailable
            )
