"""Pure parts of the event bus: publish parsing, subscription filters, webhook back-off, config."""

from __future__ import annotations

import time

import orjson
import pytest

from bridgeway.config import ConfigError
from bridgeway.config.loader import load_config
from bridgeway.jobs.events.bus import BadEvents, event_filter, parse_events
from bridgeway.jobs.events.log import StoredEvent
from bridgeway.jobs.events.webhooks import backoff


def test_parse_fills_id_and_timestamp_and_names_every_problem():
    [e] = parse_events(b'{"event_type": "job.done", "source_service": "sim"}', 1000, 0.0)
    body = orjson.loads(e.body)
    assert body["event_id"] == e.event_id and body["timestamp"] == "1970-01-01T00:00:00.000Z"
    with pytest.raises(BadEvents) as bad:
        parse_events(b'[{"event_type": "a"}, 3, {"event_type": "a b", "source_service": "s"}]', 1000, 0.0)
    assert bad.value.problems == [
        "[0].source_service: Field required",
        "[1]: an event is a JSON object",
        "[2].event_type: String should match pattern '^[A-Za-z0-9_.:-]+$'",
    ]
    with pytest.raises(BadEvents) as big:
        parse_events(b'{"event_type": "a", "source_service": "s", "payload": "%s"}' % (b"x" * 900), 500, 0.0)
    assert big.value.code == "BODY_TOO_LARGE"


def test_filter_applies_types_grants_and_target_service():
    def stored(kind: str, targets: list[str]) -> StoredEvent:
        return StoredEvent(1, "i", kind, orjson.dumps({"target_services": targets}))

    accept = event_filter(["job.*"], "billing", lambda t: t != "job.secret")
    assert accept(stored("job.done", []))
    assert accept(stored("job.done", ["billing", "x"]))
    assert not accept(stored("job.done", ["search"]))
    assert not accept(stored("user.created", []))
    assert not accept(stored("job.secret", []))


def test_backoff_doubles_up_to_the_cap_with_jitter_below_it():
    assert backoff(1, 0.5, 60, 0.999) == pytest.approx(0.5, rel=1e-3)
    assert backoff(3, 0.5, 60, 0.0) == 1.0  # half of 2.0
    assert backoff(30, 0.5, 60, 0.5) == pytest.approx(45.0)


def test_webhook_config_is_validated(tmp_path, monkeypatch):
    path = tmp_path / "bw.yaml"
    path.write_text("events:\n  webhooks:\n    h: {types: [], url: 'ftp://x', secret: ''}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert any("types" in p for p in exc.value.problems)
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    path.write_text(
        "events:\n  webhooks:\n    h: {types: ['job.*'], url: 'http://127.0.0.1:9/x', secret: '${env:HOOK_SECRET}'}\n"
    )
    hook = load_config(path).events.webhooks["h"]
    assert hook.secret.get_secret_value() == "s3cret" and hook.start == "latest"


def test_a_delivery_is_given_up_after_its_attempts_or_its_age():
    from bridgeway.config.models import EventDeliveryConfig
    from bridgeway.jobs.events.webhooks import exhausted

    limits = EventDeliveryConfig(max_attempts=3, max_age="1m")
    assert not exhausted(2, 1000.0, 1059.0, limits)
    assert exhausted(3, 1000.0, 1001.0, limits)  # attempts
    assert exhausted(1, 1000.0, 1060.0, limits)  # age since the first failure


def test_dead_letters_keep_the_event_as_posted():
    from bridgeway.jobs.events.webhooks import DeadLetter, dead_key

    event = StoredEvent(42, "e-1", "job.done", b'{"event_type":"job.done","payload":{"i":1}}')
    letter = DeadLetter(event, 5, 10.0, 20.0, "status 500")
    assert DeadLetter.decode(letter.encode()) == letter
    assert orjson.loads(letter.encode())["id"] == "42"
    assert dead_key(9) < dead_key(10) < dead_key(100)  # the KV's order is the log's


def test_live_streams_are_capped_per_worker_and_per_caller():
    from bridgeway.config.models import EventStreamsConfig
    from bridgeway.errors import GatewayError
    from bridgeway.jobs.events.bus import LiveStreams

    limits = EventStreamsConfig(max_per_worker=3, max_per_key=2)
    streams = LiveStreams()
    streams.take("key:a", limits)
    streams.take("key:a", limits)
    with pytest.raises(GatewayError) as refused:
        streams.take("key:a", limits)
    assert refused.value.status == 429 and refused.value.headers == [(b"retry-after", b"5")]
    streams.take("key:b", limits)
    with pytest.raises(GatewayError) as refused:
        streams.take("key:c", limits)
    assert refused.value.status == 503 and refused.value.code == "STREAMS_AT_CAPACITY"
    streams.give("key:a")
    streams.take("key:c", limits)  # a slot given back is free again
    for caller in ("key:a", "key:b", "key:c"):
        streams.give(caller)
    assert streams.total == 0 and streams.by_caller == {}


async def test_follow_signals_a_gap_when_retention_trimmed_the_resumed_position(tmp_path):
    from bridgeway.jobs.events.bus import Gap, follow
    from bridgeway.jobs.events.log import NewEvent, Retention, SqliteEventLog

    log = SqliteEventLog(str(tmp_path / "e.db"), "gap", Retention(max_count=10))
    try:
        now = time.time()
        await log.append([NewEvent(f"e{i}", "job.x", b"{}", now) for i in range(30)])  # keeps 21..30
        pages = follow(log, 5, lambda e: True, heartbeat=60)
        assert await anext(pages) == Gap(5, 21)
        assert [e.seq for e in await anext(pages)] == list(range(21, 31))
        # a position still held: no gap
        pages = follow(log, 25, lambda e: True, heartbeat=60)
        assert [e.seq for e in await anext(pages)] == list(range(26, 31))
        # earliest (0): whatever the log holds, nothing to signal
        pages = follow(log, 0, lambda e: True, heartbeat=60)
        assert [e.seq for e in await anext(pages)] == list(range(21, 31))
        # everything after the position trimmed: the gap names the next id to come
        await log.append([NewEvent(f"f{i}", "job.x", b"{}", 1.0) for i in range(3)])  # too old
        assert await log.trim(now) == 3
        pages = follow(log, 30, lambda e: True, heartbeat=60)
        assert await anext(pages) == Gap(30, 34)
    finally:
        await log.close()
