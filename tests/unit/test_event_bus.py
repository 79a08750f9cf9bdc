"""Pure parts of the event bus: publish parsing, subscription filters, webhook back-off, config."""

from __future__ import annotations

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
