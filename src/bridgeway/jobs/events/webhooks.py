"""Webhook subscriptions: events posted to a URL at least once, in order, HMAC-signed.

A subscription is declared in config (`events.webhooks`) or made through the API (stored in
the state KV, `_events_webhooks`). Each has a durable cursor in the state backend (the sequence
number of the last event its receiver accepted) and a lease: every gateway worker, on every
replica, runs a `WebhookDelivery`, and each subscription is delivered by whichever worker holds
its lease, so by one at a time. The lease is a KV entry with a TTL, taken with create-only and
renewed with compare-and-set; a worker that dies stops renewing and another takes over from the
cursor within one lease period.

In order: a subscription's events are posted one at a time, and the cursor moves past an event
only once its receiver answered 2xx; a failure is retried with exponential back-off (with
jitter, capped), for as long as it takes, holding up the events behind it. At least once: the
cursor is saved after the post, so a worker that dies between the two, or loses its lease
mid-post, makes the next owner post that event again. Receivers dedupe by `X-Bridgeway-Event-Id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass

import aiohttp
import orjson

from bridgeway.config.models import EventDeliveryConfig, WebhookConfig
from bridgeway.jobs import signing
from bridgeway.jobs.events import metrics as event_metrics
from bridgeway.jobs.events.bus import event_filter
from bridgeway.jobs.events.log import EventLog
from bridgeway.observability import logs
from bridgeway.state import KV, VersionMismatch

WEBHOOKS_NS = "_events_webhooks"  # API-managed subscriptions
CURSORS_NS = "_events_cursors"
LEASES_NS = "_events_leases"
RECONCILE_EVERY = 1.0  # seconds between two looks at which subscriptions exist and are free


@dataclass(frozen=True, slots=True)
class Subscription:
    name: str
    types: tuple[str, ...]
    url: str
    secret: bytes
    service: str | None
    start: str
    timeout: float

    @classmethod
    def of(cls, name: str, config: WebhookConfig) -> Subscription:
        return cls(
            name,
            tuple(config.types),
            config.url,
            config.secret.get_secret_value().encode(),
            config.service,
            config.start,
            config.timeout,
        )


def backoff(failures: int, base: float, cap: float, rand: float) -> float:
    """Seconds to wait after `failures` consecutive failures: doubling from `base`, at most
    `cap`, and between half and all of that (`rand` in [0, 1)) so retries do not march in step."""
    ceiling = min(cap, base * 2 ** max(0, failures - 1))
    return ceiling * (0.5 + rand / 2)


async def start_cursor(state: KV, log: EventLog, sub: Subscription) -> None:
    """Where a subscription begins when it has no cursor yet: the end of the log for `latest`
    (events published from now on), the beginning for `earliest`. Create-only, so a cursor
    that exists is never moved back."""
    position = await log.last() if sub.start == "latest" else 0
    with contextlib.suppress(VersionMismatch):
        await state.put(CURSORS_NS, sub.name, str(position).encode(), if_version=0)


class LeaseLost(Exception):
    pass


class _Lease:
    def __init__(self, state: KV, name: str, owner: bytes, seconds: float) -> None:
        self.state, self.name, self.owner, self.seconds = state, name, owner, seconds
        self.version = 0
        self.renew_at = 0.0

    async def acquire(self) -> bool:
        try:
            entry = await self.state.put(LEASES_NS, self.name, self.owner, ttl=self.seconds, if_version=0)
        except VersionMismatch:
            return False
        self.version, self.renew_at = entry.version, time.monotonic() + self.seconds / 3
        return True

    async def keep(self) -> None:
        """Renew when a third of the lease has passed; LeaseLost when another worker has it."""
        if time.monotonic() < self.renew_at:
            return
        try:
            entry = await self.state.put(
                LEASES_NS, self.name, self.owner, ttl=self.seconds, if_version=self.version
            )
        except VersionMismatch:
            raise LeaseLost(self.name) from None
        self.version, self.renew_at = entry.version, time.monotonic() + self.seconds / 3

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self.state.delete(LEASES_NS, self.name, if_version=self.version)


class WebhookDelivery:
    """One worker's share of webhook delivery: takes the leases of free subscriptions and
    delivers them, until the worker stops or another takes a lease over."""

    def __init__(self, log: EventLog, state: KV, delivery: EventDeliveryConfig) -> None:
        self.log, self.state, self.delivery = log, state, delivery
        self.configured: dict[str, Subscription] = {}
        self.owner = uuid.uuid4().hex.encode()
        self._running: dict[str, tuple[Subscription, asyncio.Task]] = {}
        self._loop: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self.logger = logs.get_logger()

    def configure(self, webhooks: dict[str, WebhookConfig], delivery: EventDeliveryConfig) -> None:
        self.configured = {name: Subscription.of(name, w) for name, w in webhooks.items()}
        self.delivery = delivery

    async def start(self) -> None:
        for sub in self.configured.values():
            await start_cursor(self.state, self.log, sub)
        self._session = aiohttp.ClientSession()
        self._loop = asyncio.create_task(self._reconcile_forever())

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(BaseException):
                await self._loop
        for _, task in list(self._running.values()):
            task.cancel()
        for _, task in list(self._running.values()):
            with contextlib.suppress(BaseException):
                await task
        if self._session is not None:
            await self._session.close()

    async def subscriptions(self) -> dict[str, Subscription]:
        subs = dict(self.configured)
        after = None
        while True:
            page = await self.state.list(WEBHOOKS_NS, limit=500, after=after)
            for name, entry in page:
                if name not in subs:
                    data = orjson.loads(entry.value)
                    subs[name] = Subscription.of(name, WebhookConfig.model_validate(data))
            if len(page) < 500:
                return subs
            after = page[-1][0]

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self._reconcile()
            except Exception:  # noqa: BLE001 - the state backend may be away; try again soon
                self.logger.warning("webhook_reconcile_failed", exc_info=True)
            await asyncio.sleep(RECONCILE_EVERY)

    async def _reconcile(self) -> None:
        subs = await self.subscriptions()
        for name, (sub, task) in list(self._running.items()):
            if task.done() or subs.get(name) != sub:  # gone, changed, or its lease was lost
                task.cancel()
                del self._running[name]
        for name, sub in subs.items():
            if name in self._running:
                continue
            lease = _Lease(self.state, name, self.owner, self.delivery.lease)
            if await lease.acquire():
                self._running[name] = (sub, asyncio.create_task(self._deliver(sub, lease)))

    async def _deliver(self, sub: Subscription, lease: _Lease) -> None:
        accept = event_filter(list(sub.types), sub.service, None)
        try:
            entry = await self.state.get(CURSORS_NS, sub.name)
            if entry is None:  # made through the API on another replica an instant ago
                await start_cursor(self.state, self.log, sub)
                entry = await self.state.get(CURSORS_NS, sub.name)
            cursor = int(entry.value) if entry is not None else 0
            while True:
                await lease.keep()
                batch = await self.log.read(cursor, 100)
                if not batch:
                    event_metrics.subscription_lag(sub.name, 0)
                    await self.log.wait(cursor, self.delivery.lease / 3)
                    continue
                event_metrics.subscription_lag(sub.name, max(0, await self.log.last() - cursor))
                for event in batch:
                    if accept(event):
                        await self._post_until_accepted(sub, lease, event)
                        event_metrics.delivered(sub.name)
                        await self.state.put(CURSORS_NS, sub.name, str(event.seq).encode())
                    cursor = event.seq
                # past the events it does not want, too, so a restart does not read them again
                await self.state.put(CURSORS_NS, sub.name, str(cursor).encode())
        except LeaseLost:
            self.logger.info("webhook_lease_lost", subscription=sub.name)
        finally:
            event_metrics.subscription_lag(sub.name, None)
            await lease.release()

    async def _post_until_accepted(self, sub: Subscription, lease: _Lease, event) -> None:
        failures = 0
        while True:
            await lease.keep()
            problem = await self._post(sub, event)
            if problem is None:
                return
            failures += 1
            event_metrics.webhook_failed(sub.name)
            wait = backoff(failures, self.delivery.backoff, self.delivery.max_backoff, random.random())
            # the URL may carry a token in its query: name the subscription, never the URL
            self.logger.warning(
                "webhook_failed",
                subscription=sub.name,
                seq=event.seq,
                problem=problem,
                retry_in=round(wait, 3),
            )
            await asyncio.sleep(wait)

    async def _post(self, sub: Subscription, event) -> str | None:
        """None when the receiver accepted the event, else what went wrong."""
        headers = {
            "Content-Type": "application/json",
            signing.HEADER: signing.sign(sub.secret, event.body, time.time()),
            "X-Bridgeway-Event-Id": event.event_id,
            "X-Bridgeway-Event-Seq": str(event.seq),
            "X-Bridgeway-Event-Type": event.event_type,
            "X-Bridgeway-Subscription": sub.name,
        }
        try:
            async with self._session.post(
                sub.url, data=event.body, headers=headers, timeout=aiohttp.ClientTimeout(total=sub.timeout)
            ) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"status {resp.status}"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as exc:
            return type(exc).__name__
