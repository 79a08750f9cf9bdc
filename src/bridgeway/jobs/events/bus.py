"""The event bus: what a published event is, who may see it, and how a subscriber follows the log.

Publishing validates each event (`EventIn`), fills `event_id` and `timestamp` when absent, and
appends the batch to the log: the answer names each event's sequence number, the id subscribers
resume from. A subscriber follows the log from a position at its own pace (`follow`): it reads a
page only when it has sent the last one, so a slow client holds one page in the gateway's memory,
never a growing backlog, and the log, not a buffer, is what it catches up from.
"""

from __future__ import annotations

import fnmatch
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bridgeway.config.models import EventStreamsConfig
from bridgeway.errors import GatewayError
from bridgeway.jobs.events import metrics as event_metrics
from bridgeway.jobs.events.log import EventLog, NewEvent, StoredEvent

PAGE = 100  # events read from the log at a time by one subscriber
MAX_BATCH = 1000  # events in one publish call
Name = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")


class EventIn(BaseModel):
    """One event as a publisher sends it."""

    model_config = ConfigDict(extra="forbid")

    event_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    event_type: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    source_service: str = Name
    target_services: list[str] = Field([], max_length=100)
    payload: Any = None
    timestamp: datetime | None = None
    correlation_id: str | None = Field(None, min_length=1, max_length=128)
    version: int | str = 1


class BadEvents(ValueError):
    """What is wrong with a publish body: `problems` as `field: why`, `status` 400/413/422."""

    def __init__(self, problems: list[str], code: str = "VALIDATION_ERROR") -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.code = code


def new_event_id() -> str:
    """Time-ordered (ms since the epoch, hex) then random: readable and unique without a round trip."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


def parse_events(body: bytes, max_event: int, now: float) -> list[NewEvent]:
    """A publish body (one event object, or a list of them) -> events ready to append, or
    BadEvents naming every problem by its place."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadEvents([f"body: not valid JSON ({exc})"], "BAD_REQUEST") from None
    batch = isinstance(data, list)
    items = data if batch else [data]
    if not items:
        raise BadEvents(["body: an empty list publishes nothing"], "BAD_REQUEST")
    if len(items) > MAX_BATCH:
        raise BadEvents([f"body: at most {MAX_BATCH} events per call, got {len(items)}"], "BODY_TOO_LARGE")
    problems: list[str] = []
    events: list[NewEvent] = []
    for i, item in enumerate(items):
        where = f"[{i}]." if batch else ""
        if not isinstance(item, dict):
            problems.append(f"{where.rstrip('.') or 'body'}: an event is a JSON object")
            continue
        try:
            event = EventIn.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"]) or "event"
                problems.append(f"{where}{field}: {err['msg']}")
            continue
        record = event.model_dump()
        record["event_id"] = event.event_id or new_event_id()
        stamp = event.timestamp or datetime.fromtimestamp(now, UTC)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        record["timestamp"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        encoded = orjson.dumps(record)
        if len(encoded) > max_event:
            raise BadEvents(
                [f"{where}payload: the event is {len(encoded)} bytes, above the limit of {max_event}"],
                "BODY_TOO_LARGE",
            )
        events.append(NewEvent(record["event_id"], event.event_type, encoded, now))
    if problems:
        raise BadEvents(problems)
    return events


async def publish(log: EventLog, events: list[NewEvent]) -> list[dict]:
    stored = await log.append(events)
    created = sum(1 for _, new in stored if new)
    event_metrics.published(created, len(stored) - created)
    return [
        {"event_id": e.event_id, "id": str(seq), "duplicate": not new}
        for e, (seq, new) in zip(events, stored, strict=True)
    ]


def type_matcher(patterns: list[str]) -> Callable[[str], bool]:
    match = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
    return lambda event_type: match(event_type) is not None


def event_filter(
    types: list[str], service: str | None, allowed: Callable[[str], bool] | None
) -> Callable[[StoredEvent], bool]:
    """What one subscription receives: its type patterns, the caller's grants, and, with a
    service, the events addressed to everyone (no target_services) or to that service."""
    wanted = type_matcher(types)

    def accept(event: StoredEvent) -> bool:
        if not wanted(event.event_type) or (allowed is not None and not allowed(event.event_type)):
            return False
        if service is None:
            return True
        targets = orjson.loads(event.body).get("target_services") or []
        return not targets or service in targets

    return accept


@dataclass(frozen=True, slots=True)
class Gap:
    """Events after `after` up to `first` (excluded) are no longer in the log: retention trimmed
    them before this subscriber read them. `first` is the first id that may still come."""

    after: int
    first: int


async def follow(
    log: EventLog, after: int, accept: Callable[[StoredEvent], bool], heartbeat: float
) -> AsyncIterator[list[StoredEvent] | Gap]:
    """Pages of accepted events after `after`, in order, for as long as the consumer pulls; an
    empty page when `heartbeat` seconds passed without one (the consumer sends a heartbeat); a
    `Gap` when events after the position were trimmed before they were read (after 0,
    `earliest`, there is nothing to miss: it starts from what the log holds).

    Sequence numbers are dense (1, 2, 3, ... on every backend), so an event read after `after`
    whose number is not `after + 1` means the ones between were trimmed."""
    quiet_since = time.monotonic()
    while True:
        batch = await log.read(after, PAGE)
        if not batch:
            # Appended and trimmed while unread? The newest number first, then a second read:
            # an event appended in between is then read, never mistaken for a gap.
            newest = await log.last()
            if newest > after:
                batch = await log.read(after, PAGE)
                if not batch:
                    if after:
                        yield Gap(after, newest + 1)
                    after = newest
                    continue
        if batch:
            if after and batch[0].seq > after + 1:
                yield Gap(after, batch[0].seq)
            after = batch[-1].seq
            page = [e for e in batch if accept(e)]
            if page:
                yield page
                quiet_since = time.monotonic()
                continue
        elif (left := heartbeat - (time.monotonic() - quiet_since)) > 0:
            await log.wait(after, left)
            continue
        if time.monotonic() - quiet_since >= heartbeat:
            yield []
            quiet_since = time.monotonic()


class LiveStreams:
    """The live streams (SSE, WebSocket) one worker serves, in all and per caller: a slot is
    taken before a stream starts and given back when it ends, so a flood of subscribers is
    answered with an error instead of holding the worker's memory."""

    def __init__(self) -> None:
        self.total = 0
        self.by_caller: dict[str, int] = {}

    def take(self, caller: str, limits: EventStreamsConfig) -> None:
        """A slot for `caller`, or GatewayError: 503 when the worker is full, 429 when the caller is."""
        if self.total >= limits.max_per_worker:
            raise GatewayError(
                "STREAMS_AT_CAPACITY",
                f"this worker serves {self.total} live streams, its limit (events.streams.max_per_worker)",
                headers=[(b"retry-after", b"1")],
            )
        held = self.by_caller.get(caller, 0)
        if held >= limits.max_per_key:
            raise GatewayError(
                "TOO_MANY_STREAMS",
                f"{caller} holds {held} live streams on this worker, its limit (events.streams.max_per_key)",
                headers=[(b"retry-after", b"5")],
            )
        self.total += 1
        self.by_caller[caller] = held + 1

    def give(self, caller: str) -> None:
        self.total -= 1
        if (held := self.by_caller[caller] - 1) > 0:
            self.by_caller[caller] = held
        else:
            del self.by_caller[caller]
