"""Webhook subscriptions: events posted to a URL at least once, in order, HMAC-signed.

A subscription is declared in config (`events.webhooks`) or made through the API (stored in
the state KV, `_events_webhooks`). Each has a durable cursor in the state backend (the sequence
number of the last event its receiver accepted) and a lease: every gateway worker, on every
replica, runs a `WebhookDelivery`, and each subscription is delivered by whichever worker holds
its lease, so by one at a time. The lease is a KV entry with a TTL, taken with create-only and
renewed with compare-and-set; a worker that dies stops renewing and another takes over from the
cursor within one lease period.

In order: a subscription's events are posted one at a time, and the cursor moves past an event
once its receiver answered 2xx; a failure is retried with exponential back-off (with jitter,
capped), holding up the events behind it, until `events.delivery.max_attempts` posts or
`max_age` since the first failure. Then the event becomes a dead letter of that subscription
(stored in the state KV beside the cursors, before the cursor moves on) and delivery goes on
with the next event: one event a receiver always refuses does not block it for ever. A dead
letter asked to be replayed (through the API) is posted again by the subscription's deliverer,
before the events after its cursor, with the same attempts; refused again, it is a dead letter
again. At least once: the cursor is saved after the post, so a worker that dies between the
two, or loses its lease mid-post, makes the next owner post that event again. Receivers dedupe
by `X-Bridgeway-Event-Id`. The cursor moves by compare-and-set on the version its deliverer
last wrote: a deliverer that finds it deleted (its webhook was, on some replica, while it
posted) or moved (another took the lease over meanwhile) stops and writes nothing back.

Where it posts is vetted by the outbound policy (`bridgeway.security.outbound`): the URL before
each post, every address its host resolves to at connect time; redirects are not followed.
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
from bridgeway.jobs.events.log import EventLog, StoredEvent
from bridgeway.observability import logs
from bridgeway.security import outbound
from bridgeway.state import KV, VersionMismatch

WEBHOOKS_NS = "_events_webhooks"  # API-managed subscriptions
CURSORS_NS = "_events_cursors"
LEASES_NS = "_events_leases"
DEAD_NS = "_events_dead:"  # + subscription name: the events it gave up on, by sequence number
REPLAY_NS = "_events_replay:"  # + subscription name: dead letters asked to be posted again
RECONCILE_EVERY = 1.0  # seconds between two looks at which subscriptions exist and are free
REPLAY_POLL = 1.0  # seconds an idle deliverer waits before it looks for replays again


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


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a subscription gave up on, with what happened to it."""

    event: StoredEvent
    attempts: int
    first_failure: float  # unix seconds
    last_failure: float
    problem: str  # the last failure, in a few words (never the URL)

    def encode(self) -> bytes:
        e = self.event
        return orjson.dumps(
            {
                "id": str(e.seq),
                "event_id": e.event_id,
                "event_type": e.event_type,
                "attempts": self.attempts,
                "first_failure": self.first_failure,
                "last_failure": self.last_failure,
                "problem": self.problem,
                "event": orjson.Fragment(e.body),  # the event as posted, kept past the log's retention
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> DeadLetter:
        d = orjson.loads(raw)
        event = StoredEvent(int(d["id"]), d["event_id"], d["event_type"], orjson.dumps(d["event"]))
        return cls(event, d["attempts"], d["first_failure"], d["last_failure"], d["problem"])


def dead_key(seq: int) -> str:
    """Zero-padded, so the KV's lexicographic order is the log's."""
    return f"{seq:020d}"


def exhausted(attempts: int, first_failure: float, now: float, delivery: EventDeliveryConfig) -> bool:
    """After `attempts` failed posts, the first at `first_failure`: give the event up?"""
    return attempts >= delivery.max_attempts or now - first_failure >= delivery.max_age


async def purge(state: KV, namespace: str) -> int:
    """Delete every entry of `namespace`; how many there were."""
    count = 0
    while page := await state.list(namespace, limit=500):
        for key, _ in page:
            count += await state.delete(namespace, key)
    return count


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


async def _end(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it has ended (and released its lease). `wait` rather than
    `await task`, so a cancellation of the caller is not taken for the task's and swallowed."""
    task.cancel()
    await asyncio.wait({task})


class LeaseLost(Exception):
    pass


class CursorMoved(Exception):
    """The cursor is not as this deliverer last wrote it: deleted with its webhook (on any
    replica), or moved by a deliverer that took the lease over while this one was posting."""


class _Cursor:
    """A subscription's cursor as its deliverer last wrote it. Each move is a compare-and-set on
    that version, so a cursor deleted with its webhook is never written back."""

    def __init__(self, state: KV, name: str, position: int, version: int) -> None:
        self.state, self.name, self.position, self.version = state, name, position, version

    async def move(self, position: int) -> None:
        try:
            entry = await self.state.put(
                CURSORS_NS, self.name, str(position).encode(), if_version=self.version
            )
        except VersionMismatch:
            raise CursorMoved(self.name) from None
        self.position, self.version = position, entry.version


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
        self._reconciling = asyncio.Lock()  # `forget` waits out a reconcile that may start a task
        self._loop: asyncio.Task | None = None
        self.policy = outbound.OutboundPolicy()  # the config's, from `configure`
        self._http = outbound.PolicySession(lambda: self.policy)
        self.logger = logs.get_logger()

    def configure(
        self,
        webhooks: dict[str, WebhookConfig],
        delivery: EventDeliveryConfig,
        policy: outbound.OutboundPolicy,
    ) -> None:
        self.configured = {name: Subscription.of(name, w) for name, w in webhooks.items()}
        self.delivery = delivery
        self.policy = policy

    async def start(self) -> None:
        for sub in self.configured.values():
            await start_cursor(self.state, self.log, sub)
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
        await self._http.close()

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
        async with self._reconciling:
            subs = await self.subscriptions()
            for name, (sub, task) in list(self._running.items()):
                if task.done() or subs.get(name) != sub:  # gone, changed, or its lease was lost
                    del self._running[name]
                    await _end(task)
            for name, sub in subs.items():
                if name in self._running:
                    continue
                lease = _Lease(self.state, name, self.owner, self.delivery.lease)
                if await lease.acquire():
                    self._running[name] = (sub, asyncio.create_task(self._deliver(sub, lease)))

    async def forget(self, name: str) -> None:
        """Stop delivering `name` in this worker and wait until its task has ended, so nothing
        it was doing (a dead letter, a cursor) is written after the caller purges its state.
        The subscription must be gone already, or the next reconcile starts it again."""
        async with self._reconciling:
            if (running := self._running.pop(name, None)) is not None:
                await _end(running[1])

    async def _deliver(self, sub: Subscription, lease: _Lease) -> None:
        accept = event_filter(list(sub.types), sub.service, None)
        try:
            entry = await self.state.get(CURSORS_NS, sub.name)
            if entry is None:  # made through the API on another replica an instant ago
                await start_cursor(self.state, self.log, sub)
                entry = await self.state.get(CURSORS_NS, sub.name)
                if entry is None:  # ... and deleted since
                    return
            cursor = _Cursor(self.state, sub.name, int(entry.value), entry.version)
            # A cursor made again under the name starts at version 1: from here on this one's
            # is at least 2, so it never matches a namesake's first.
            await cursor.move(cursor.position)
            while True:
                await lease.keep()
                await self._replay(sub, lease, cursor)
                batch = await self.log.read(cursor.position, 100)
                if not batch:
                    newest = await self.log.last()
                    if newest > cursor.position and not await self.log.read(cursor.position, 1):
                        # appended after the cursor and trimmed by retention before delivery
                        self.logger.warning(
                            "webhook_events_expired",
                            subscription=sub.name,
                            after=cursor.position,
                            upto=newest,
                        )
                        await cursor.move(newest)
                        continue
                    event_metrics.subscription_lag(sub.name, 0)
                    await self.log.wait(cursor.position, min(REPLAY_POLL, self.delivery.lease / 3))
                    continue
                event_metrics.subscription_lag(sub.name, max(0, await self.log.last() - cursor.position))
                for event in batch:
                    if accept(event):
                        dead = await self._post_until_done(sub, lease, event)
                        if dead is None:
                            event_metrics.delivered(sub.name)
                            await cursor.move(event.seq)
                        else:
                            await self._bury(sub, cursor, dead, event.seq)
                # past the events it does not want, too, so a restart does not read them again
                if batch[-1].seq != cursor.position:
                    await cursor.move(batch[-1].seq)
        except LeaseLost:
            self.logger.info("webhook_lease_lost", subscription=sub.name)
        except CursorMoved:
            self.logger.info("webhook_cursor_moved", subscription=sub.name)
        finally:
            event_metrics.subscription_lag(sub.name, None)
            await lease.release()

    async def _replay(self, sub: Subscription, lease: _Lease, cursor: _Cursor) -> None:
        """Post the dead letters asked to be replayed, oldest first; each leaves the replay list
        once accepted (and its dead letter goes) or given up on again (a dead letter again)."""
        for key, entry in await self.state.list(REPLAY_NS + sub.name, limit=100):
            letter = DeadLetter.decode(entry.value)
            dead = await self._post_until_done(sub, lease, letter.event)
            if dead is None:
                event_metrics.delivered(sub.name)
                await self.state.delete(DEAD_NS + sub.name, key)
                self.logger.info("webhook_replayed", subscription=sub.name, seq=letter.event.seq)
            else:
                await self._bury(sub, cursor, dead, cursor.position)
            # only the entry posted: the API may have moved the letter just buried back in
            # meanwhile, and that request is still to be served
            with contextlib.suppress(VersionMismatch):
                await self.state.delete(REPLAY_NS + sub.name, key, if_version=entry.version)

    async def _bury(self, sub: Subscription, cursor: _Cursor, dead: DeadLetter, position: int) -> None:
        """Keep `dead` as a dead letter, then move the cursor to `position` (where it is, for a
        replay). The letter goes first, so the cursor never passes an event that is neither
        delivered nor kept; if the cursor was deleted meanwhile, so was the webhook, whose
        purge may have run before the letter was written: it is taken back."""
        key = dead_key(dead.event.seq)
        await self.state.put(DEAD_NS + sub.name, key, dead.encode())
        try:
            await cursor.move(position)
        except CursorMoved:
            if await self.state.get(CURSORS_NS, sub.name) is None:
                await self.state.delete(DEAD_NS + sub.name, key)
            raise
        event_metrics.dead_lettered(sub.name)
        self.logger.error(
            "webhook_dead_lettered",
            subscription=sub.name,
            seq=dead.event.seq,
            event_id=dead.event.event_id,
            attempts=dead.attempts,
            problem=dead.problem,
        )

    async def _post_until_done(
        self, sub: Subscription, lease: _Lease, event: StoredEvent
    ) -> DeadLetter | None:
        """None once the receiver accepted the event; its dead letter when the attempts ran out."""
        failures, first_failure = 0, 0.0
        while True:
            await lease.keep()
            problem = await self._post(sub, event)
            if problem is None:
                return None
            failures += 1
            now = time.time()
            first_failure = first_failure or now
            event_metrics.webhook_failed(sub.name)
            if exhausted(failures, first_failure, now, self.delivery):
                return DeadLetter(event, failures, first_failure, now, problem)
            wait = backoff(failures, self.delivery.backoff, self.delivery.max_backoff, random.random())
            # the URL may carry a token in its query: name the subscription, never the URL
            self.logger.warning(
                "webhook_failed",
                subscription=sub.name,
                seq=event.seq,
                problem=problem,
                attempt=failures,
                retry_in=round(wait, 3),
            )
            await asyncio.sleep(wait)

    async def _post(self, sub: Subscription, event: StoredEvent) -> str | None:
        """None when the receiver accepted the event, else what went wrong."""
        if not (verdict := outbound.check_url(sub.url, self.policy)).allowed:
            return f"refused by the outbound policy: {verdict.reason}"
        headers = {
            "Content-Type": "application/json",
            signing.HEADER: signing.sign(sub.secret, event.body, time.time()),
            "X-Bridgeway-Event-Id": event.event_id,
            "X-Bridgeway-Event-Seq": str(event.seq),
            "X-Bridgeway-Event-Type": event.event_type,
            "X-Bridgeway-Subscription": sub.name,
        }
        session = await self._http.get()
        try:
            async with session.post(
                sub.url,
                data=event.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=sub.timeout),
                allow_redirects=False,  # a redirect could lead where the policy would refuse
            ) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"status {resp.status}"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as exc:
            return outbound.describe(exc)
