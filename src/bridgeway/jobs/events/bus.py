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
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


async def follow(
    log: EventLog, after: int, accept: Callable[[StoredEvent], bool], heartbeat: float
) -> AsyncIterator[list[StoredEvent]]:
    """Pages of accepted events after `after`, in order, for as long as the consumer pulls; an
    empty page when `heartbeat` seconds passed without one (the consumer sends a heartbeat)."""
    quiet_since = time.monotonic()
    while True:
        batch = await log.read(after, PAGE)
        if batch:
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
