"""The event bus's limits through a real `bridgeway serve` (SQLite): a webhook that always fails
an event dead-letters it after its attempts and goes on, replay and purge; webhooks and
callbacks refused where the outbound policy says (at registration, and at connect time for a
name); a resumed stream told of the events retention trimmed; live streams capped."""

from __future__ import annotations

import http.client
import json

import pytest
from websockets.sync.client import connect as ws_connect

from tests.support.events import unique_name
from tests.support.gateway import start_gateway, wait_until
from tests.support.procs import HOST
from tests.support.sink import Sink

SECRET = "whsec-hardening-0123456789abcdef"
QUICK = {"backoff": "10ms", "max_backoff": "20ms", "lease": "3s", "max_attempts": 3}


def ev(kind: str, i: int) -> dict:
    return {"event_type": kind, "source_service": "test", "payload": {"i": i}}


def publish(gw, events) -> None:
    r = gw.api("POST", "/events", events)
    assert r.status == 200, r


def payloads(sink: Sink) -> list[int]:
    with sink.lock:
        return [json.loads(r.body)["payload"]["i"] for r in sink.requests]


@pytest.fixture(scope="module")
def gw():
    gateway = start_gateway(
        {
            "events": {"log": unique_name(), "delivery": QUICK},
            "queues": {"pulled": {"callback_secret": SECRET}},
        }
    )
    yield gateway
    gateway.stop()


def test_an_event_always_refused_goes_to_the_dead_letters_and_delivery_moves_on(gw):
    refuse = {"poison": True}
    sink = Sink(lambda req: 500 if refuse["poison"] and b'"i":0' in req.body else 200)
    name = f"hook-{unique_name()}"
    try:
        r = gw.api("PUT", f"/events/webhooks/{name}", {"types": ["job.*"], "url": sink.url, "secret": SECRET})
        assert r.status == 201, r
        publish(gw, [ev("job.done", 0), ev("job.done", 1), ev("job.done", 2)])
        wait_until(lambda: payloads(sink)[-2:] == [1, 2], timeout=15, what="the events after the poison")
        assert payloads(sink) == [0, 0, 0, 1, 2]  # three attempts (the config's), then the next events
        [dead] = gw.api("GET", f"/events/webhooks/{name}/dead-letters").json()["dead_letters"]
        assert dead["attempts"] == 3 and dead["problem"] == "status 500"
        assert dead["event"]["payload"] == {"i": 0} and dead["event_type"] == "job.done"
        metrics = gw.request("GET", "/metrics").body.decode()
        assert f'bridgeway_webhook_dead_letters_total{{subscription="{name}"}} 1.0' in metrics
        assert "webhook_dead_lettered" in gw.logs()

        # replayed once the receiver accepts it: posted again, and no longer a dead letter
        refuse["poison"] = False
        r = gw.api("POST", f"/events/webhooks/{name}/dead-letters/{dead['id']}/replay")
        assert r.status == 202 and r.json() == {"replaying": 1}
        wait_until(lambda: payloads(sink)[-1:] == [0], timeout=10, what="the replayed event")
        replayed = sink.requests[-1]
        assert replayed.headers["x-bridgeway-event-seq"] == dead["id"]  # the same event, the same id
        wait_until(
            lambda: (
                gw.api("GET", f"/events/webhooks/{name}/dead-letters").json()
                == {"dead_letters": [], "next": None, "replaying": 0}
            ),
            timeout=5,
            what="the dead letter gone",
        )
        assert gw.api("POST", f"/events/webhooks/{name}/dead-letters/{dead['id']}/replay").status == 404

        # refused again on replay: a dead letter again; replay all, then purge
        refuse["poison"] = True
        publish(gw, [ev("job.done", 0), ev("job.done", 0)])
        wait_until(
            lambda: len(gw.api("GET", f"/events/webhooks/{name}/dead-letters").json()["dead_letters"]) == 2,
            timeout=15,
            what="two dead letters",
        )
        r = gw.api("POST", f"/events/webhooks/{name}/dead-letters/replay")
        assert r.status == 202 and r.json() == {"replaying": 2}
        wait_until(
            lambda: (
                gw.api("GET", f"/events/webhooks/{name}/dead-letters").json()["replaying"] == 0
                and len(gw.api("GET", f"/events/webhooks/{name}/dead-letters").json()["dead_letters"]) == 2
            ),
            timeout=15,
            what="both refused again",
        )
        r = gw.api("DELETE", f"/events/webhooks/{name}/dead-letters")
        assert r.status == 200 and r.json() == {"purged": 2}
        assert gw.api("GET", f"/events/webhooks/{name}/dead-letters").json()["dead_letters"] == []
        assert gw.api("GET", "/events/webhooks/nosuch/dead-letters").status == 404
    finally:
        gw.api("DELETE", f"/events/webhooks/{name}")
        sink.close()


def test_metadata_addresses_are_refused_at_registration(gw):
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0/",
    ):
        r = gw.api("PUT", "/events/webhooks/steal", {"types": ["*"], "url": url, "secret": SECRET})
        assert r.status == 400, r
        error = r.json()["error"]
        assert error["code"] == "URL_NOT_ALLOWED" and error["message"].startswith(
            "url: refused by the outbound"
        )
    assert gw.api("GET", "/events/webhooks/steal/dead-letters").status == 404  # nothing stored
    r = gw.api(
        "POST",
        "/queues/pulled/jobs",
        {"payload": {}, "callback_url": "http://169.254.169.254/latest/meta-data/iam"},
    )
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "URL_NOT_ALLOWED"
    assert (
        "callback_url: refused by the outbound policy: 169.254.169.254 is link-local"
        in r.json()["error"]["message"]
    )
    r = gw.api("POST", "/queues/pulled/jobs", {"payload": {}, "callback_url": "http://127.0.0.1:9/cb"})
    assert r.status == 201, r  # loopback stays allowed by default


def test_a_reload_changes_the_outbound_policy_for_webhooks_and_callbacks():
    config = {
        "events": {"log": unique_name(), "delivery": QUICK},
        "queues": {"pulled": {"callback_secret": SECRET}},
    }
    gateway = start_gateway(config)
    hook = {"types": ["*"], "url": "http://127.0.0.1:9/hook", "secret": SECRET}
    job = {"payload": {}, "callback_url": "http://127.0.0.1:9/cb"}
    try:
        assert gateway.api("PUT", "/events/webhooks/before", hook).status == 201
        assert gateway.api("POST", "/queues/pulled/jobs", job).status == 201
        gateway.rewrite({**config, "outbound": {"deny": ["127.0.0.0/8"]}})
        assert gateway.api("POST", "/admin/reload").status == 200
        for r in (
            gateway.api("PUT", "/events/webhooks/after", hook),
            gateway.api("POST", "/queues/pulled/jobs", job),
        ):
            assert r.status == 400 and r.json()["error"]["code"] == "URL_NOT_ALLOWED", r
            assert "127.0.0.1 is in outbound.deny" in r.json()["error"]["message"]
    finally:
        gateway.stop()


def test_a_reloaded_deny_list_refuses_posts_on_connections_already_open():
    """`localhost` is a name: vetted when a connection to it is made. A webhook and a callback
    are posted there, over keep-alive connections; after a reload denies 127.0.0.0/8 the next
    ones are refused, not posted on the connections still open."""
    sink = Sink()
    port = sink.url.rpartition(":")[2]
    config = {
        "events": {"log": unique_name(), "delivery": QUICK},
        "services": {"worker": {"instances": [sink.url]}},  # a service route: not an outbound post
        "queues": {"noted": {"deliver": {"service": "worker", "path": "/run"}, "callback_secret": SECRET}},
    }
    gateway = start_gateway(config)
    hook = {"types": ["*"], "url": f"http://localhost:{port}/hook", "secret": SECRET}
    job = {"payload": {}, "callback_url": f"http://localhost:{port}/cb"}

    def posted(path: str) -> int:
        with sink.lock:
            return sum(r.path == path for r in sink.requests)

    try:
        assert gateway.api("PUT", "/events/webhooks/kept", hook).status == 201
        publish(gateway, [ev("job.done", 1)])
        assert gateway.api("POST", "/queues/noted/jobs", job).status == 201
        wait_until(lambda: posted("/hook") == 1 and posted("/cb") == 1, timeout=10, what="both posted")

        gateway.rewrite({**config, "outbound": {"deny": ["127.0.0.0/8"]}})
        assert gateway.api("POST", "/admin/reload").status == 200
        publish(gateway, [ev("job.done", 2)])
        assert gateway.api("POST", "/queues/noted/jobs", job).status == 201
        dead = wait_until(
            lambda: gateway.api("GET", "/events/webhooks/kept/dead-letters").json()["dead_letters"],
            timeout=15,
            what="the webhook refused",
        )
        assert "127.0.0.1 is in outbound.deny" in dead[0]["problem"]
        wait_until(
            lambda: "callback failed: refused by the outbound policy" in gateway.logs(),
            timeout=10,
            what="the callback refused",
        )
        assert (posted("/hook"), posted("/cb"), posted("/run")) == (1, 1, 2)
    finally:
        gateway.stop()
        sink.close()


def test_a_name_resolving_to_a_denied_address_is_refused_at_connect_time(tmp_path):
    """`localhost` passes registration (a name); it resolves to 127.0.0.1, which the deny list
    refuses when the gateway connects: nothing reaches the receiver, the event is dead-lettered
    with the reason."""
    sink = Sink()
    port = sink.url.rpartition(":")[2]
    gateway = start_gateway(
        {
            "events": {"log": unique_name(), "delivery": QUICK},
            "outbound": {"deny": ["127.0.0.0/8", "::1/128"]},
        }
    )
    try:
        r = gateway.api("PUT", "/events/webhooks/local", {"types": ["*"], "url": sink.url, "secret": SECRET})
        assert r.status == 400 and "127.0.0.1 is in outbound.deny" in r.json()["error"]["message"]
        url = f"http://localhost:{port}/hook"
        r = gateway.api("PUT", "/events/webhooks/byname", {"types": ["*"], "url": url, "secret": SECRET})
        assert r.status == 201, r
        publish(gateway, [ev("job.done", 1)])
        dead = wait_until(
            lambda: gateway.api("GET", "/events/webhooks/byname/dead-letters").json()["dead_letters"],
            timeout=15,
            what="the refused event dead-lettered",
        )
        assert "refused by the outbound policy" in dead[0]["problem"]
        assert "outbound.deny" in dead[0]["problem"]
        assert sink.requests == []
    finally:
        gateway.stop()
        sink.close()


def sse_lines(gw, query: str, headers: dict) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
    conn.request("GET", "/api/v1/events/stream?" + query, headers=headers)
    return conn.getresponse(), conn


def test_a_resumed_stream_is_told_of_the_events_retention_trimmed(tmp_path):
    gateway = start_gateway({"events": {"log": unique_name(), "retention": {"max_count": 10}}})
    try:
        publish(gateway, [ev("job.step", i) for i in range(30)])  # the first append trims: 21..30 stay
        resp, conn = sse_lines(gateway, "types=job.*", {**gateway.admin_headers, "Last-Event-ID": "5"})
        assert resp.status == 200
        lines = []
        while not any(line.startswith(b"id: 21") for line in lines):
            line = resp.readline()
            assert line, "stream ended"
            lines.append(line.rstrip(b"\n"))
        conn.close()
        gap = lines.index(b"event: gap")
        assert lines[gap + 1 : gap + 3] == [b"id: 20", b'data: {"after":"5","first":"21"}']
        url = f"ws://{HOST}:{gateway.port}/api/v1/events/ws?types=job.*&after=5"
        with ws_connect(url, additional_headers=gateway.admin_headers, open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5)) == {"type": "subscribed", "after": "5"}
            assert json.loads(ws.recv(timeout=5)) == {"type": "gap", "after": "5", "first": "21"}
            assert json.loads(ws.recv(timeout=5))["id"] == "21"
    finally:
        gateway.stop()


def test_live_streams_beyond_the_cap_are_refused_with_retry_after(tmp_path):
    gateway = start_gateway(
        {"events": {"log": unique_name(), "streams": {"max_per_worker": 3, "max_per_key": 2}}}
    )
    held = []
    try:
        key = gateway.api("POST", "/keys", {"name": "k", "role": "admin"}).json()["key"]
        as_key = {"Authorization": f"Bearer {key}"}
        for _ in range(2):
            resp, conn = sse_lines(gateway, "types=*", as_key)
            assert resp.status == 200
            held.append(conn)
        resp, conn = sse_lines(gateway, "types=*", as_key)  # the key's third
        body = json.loads(resp.read())
        assert resp.status == 429 and resp.headers["retry-after"] == "5"
        assert body["error"]["code"] == "TOO_MANY_STREAMS" and set(body["error"]) >= {"trace_id", "timestamp"}
        conn.close()
        resp, conn = sse_lines(gateway, "types=*", gateway.admin_headers)  # another caller: room
        assert resp.status == 200
        held.append(conn)
        resp, conn = sse_lines(gateway, "types=*", gateway.admin_headers)  # the worker's fourth
        assert resp.status == 503 and resp.headers["retry-after"] == "1"
        assert json.loads(resp.read())["error"]["code"] == "STREAMS_AT_CAPACITY"
        conn.close()
        with pytest.raises(Exception) as refused:  # noqa: B017 - the handshake is refused
            ws_connect(
                f"ws://{HOST}:{gateway.port}/api/v1/events/ws", additional_headers=gateway.admin_headers
            )
        assert "HTTP 503" in str(refused.value)
        # a stream that ends gives its slot back
        held.pop().close()

        def room() -> bool:
            resp, conn = sse_lines(gateway, "types=*", gateway.admin_headers)
            held.append(conn)
            return resp.status == 200

        wait_until(room, timeout=5, what="the slot given back")
    finally:
        for conn in held:
            conn.close()
        gateway.stop()
