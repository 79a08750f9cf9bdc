"""The event bus through a real `bridgeway serve`, on SQLite, Redis and NATS: subscribers that
disconnect and reconnect with their last event id miss nothing (SSE and WebSocket), webhooks
deliver in order at least once to a receiver that fails some posts, and bad input and callers
are refused precisely."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from websockets.sync.client import connect as ws_connect

from bridgeway.jobs import signing
from tests.support.events import BACKENDS, backend_url, unique_name
from tests.support.gateway import start_gateway, wait_until
from tests.support.procs import HOST

HOOK_SECRET = "whsec-test-0123456789abcdef"


@pytest.fixture(scope="module", params=BACKENDS)
def gw(request, tmp_path_factory):
    url = backend_url(request.param, tmp_path_factory.mktemp("events"))
    name = unique_name()
    gateway = start_gateway(
        {
            "jobs": {"backend": url},
            "events": {
                "log": name,
                "heartbeat": "300ms",
                "delivery": {"backoff": "20ms", "max_backoff": "100ms", "lease": "3s"},
            },
            "roles": {
                "worker": {"events": [{"types": "job.*", "access": "publish"}]},
                "watcher": {"events": [{"types": "job.*", "access": "subscribe"}]},
            },
        }
    )
    try:
        gateway.backend = request.param
        yield gateway
    finally:
        gateway.stop()
        if not url.startswith("sqlite"):
            import asyncio

            from tests.support.events import drop

            asyncio.run(drop(url, name))


def publish(gw, events, headers=None):
    r = gw.request(
        "POST",
        "/api/v1/events",
        json.dumps(events).encode(),
        {**(headers if headers is not None else gw.admin_headers), "Content-Type": "application/json"},
    )
    return r


def ev(kind: str, i: int, **extra) -> dict:
    return {"event_type": kind, "source_service": "test", "payload": {"i": i}, **extra}


def last_id(gw) -> int:
    r = gw.api("GET", "/events?after=latest&limit=1")
    assert r.status == 200, r
    return int(r.json()["next"])


class SseClient:
    """A raw SSE reader: (id, data) pairs, heartbeats counted."""

    def __init__(self, gw, query: str, last_event_id: str | None = None, headers=None) -> None:
        self.conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        h = dict(gw.admin_headers if headers is None else headers)
        if last_event_id is not None:
            h["Last-Event-ID"] = last_event_id
        self.conn.request("GET", "/api/v1/events/stream?" + query, headers=h)
        self.resp = self.conn.getresponse()
        self.heartbeats = 0

    def next_event(self) -> tuple[str, dict]:
        event_id, data = None, None
        while True:
            line = self.resp.readline()
            assert line, "stream ended"
            line = line.rstrip(b"\r\n")
            if line.startswith(b"id: "):
                event_id = line[4:].decode()
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
            elif line == b": heartbeat":
                self.heartbeats += 1
            elif line == b"" and data is not None:
                return event_id, data

    def close(self) -> None:
        self.conn.close()


def test_sse_subscriber_that_reconnects_with_its_last_id_misses_nothing(gw):
    start = last_id(gw)
    sent = [ev("job.step", i) for i in range(40)]
    assert publish(gw, sent[:15]).status == 200
    seen: list[tuple[str, dict]] = []
    client = SseClient(gw, f"types=job.*&after={start}")
    assert client.resp.status == 200 and client.resp.headers["content-type"].startswith("text/event-stream")
    for _ in range(10):
        seen.append(client.next_event())
    client.close()  # gone mid-stream: events keep coming while it is away
    for i in range(15, 40, 5):
        assert publish(gw, sent[i : i + 5]).status == 200
    client = SseClient(gw, "types=job.*", last_event_id=seen[-1][0])
    while len(seen) < 40:
        seen.append(client.next_event())
    ids = [int(i) for i, _ in seen]
    assert ids == sorted(ids) and len(set(ids)) == 40, ids
    assert [d["payload"]["i"] for _, d in seen] == list(range(40))
    # idle: heartbeats keep the connection alive
    while (line := client.resp.readline()) != b": heartbeat\n":
        assert line, "stream ended"
    client.close()


def test_websocket_subscriber_that_reconnects_with_its_last_id_misses_nothing(gw):
    start = last_id(gw)
    url = f"ws://{HOST}:{gw.port}/api/v1/events/ws?types=job.*,order.*&after={start}"
    seen: list[tuple[str, dict]] = []
    with ws_connect(url, additional_headers=gw.admin_headers, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"type": "subscribed", "after": str(start)}
        assert publish(gw, [ev("job.a" if i % 2 else "order.b", i) for i in range(12)]).status == 200
        publish(gw, [ev("other.c", 99)])  # not subscribed: never delivered
        while len(seen) < 6:
            msg = json.loads(ws.recv(timeout=5))
            if "id" in msg:
                seen.append((msg["id"], msg["event"]))
    assert publish(gw, [ev("job.a" if i % 2 else "order.b", i) for i in range(12, 20)]).status == 200
    url = f"ws://{HOST}:{gw.port}/api/v1/events/ws?types=job.*,order.*&after={seen[-1][0]}"
    with ws_connect(url, additional_headers=gw.admin_headers, open_timeout=5) as ws:
        heartbeat = False
        while len(seen) < 20 or not heartbeat:
            msg = json.loads(ws.recv(timeout=5))
            if "id" in msg:
                seen.append((msg["id"], msg["event"]))
            heartbeat |= msg.get("type") == "heartbeat"
    ids = [int(i) for i, _ in seen]
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert [e["payload"]["i"] for _, e in seen] == list(range(20))


class Receiver:
    """A webhook receiver on loopback that refuses every third post (500) and records the rest,
    checking each signature."""

    def __init__(self) -> None:
        self.accepted: list[dict] = []
        self.posts = 0
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                if not signing.verify(
                    HOOK_SECRET.encode(), body, self.headers.get(signing.HEADER, ""), time.time()
                ):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                elif receiver.posts % 3 == 0:
                    self.send_response(500)
                else:
                    event = json.loads(body)
                    event["_seq"] = self.headers["X-Bridgeway-Event-Seq"]
                    receiver.accepted.append(event)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook?token=abc"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_delivers_in_order_at_least_once_signed_through_failures(gw):
    receiver = Receiver()
    name = f"hook-{unique_name()}"
    try:
        r = gw.api(
            "PUT",
            f"/events/webhooks/{name}",
            {"types": ["job.*"], "url": receiver.url, "secret": HOOK_SECRET, "service": "billing"},
        )
        assert r.status == 201, r
        assert HOOK_SECRET not in r.body.decode()
        events = [ev("job.done", i) for i in range(15)]
        events += [ev("user.created", 100)]  # another type
        events += [ev("job.done", 200, target_services=["search"])]  # addressed to another service
        events += [ev("job.done", 15, target_services=["billing", "search"])]
        assert publish(gw, events).status == 200
        wait_until(lambda: len(receiver.accepted) >= 16, timeout=20, what="16 deliveries")
        time.sleep(0.3)
        got = [e["payload"]["i"] for e in receiver.accepted]
        assert got == list(range(16)), got  # in order, each once here (a failed post is retried, not skipped)
        assert receiver.bad_signatures == 0
        assert receiver.posts > 16  # some posts failed and were retried
        listed = {w["name"]: w for w in gw.api("GET", "/events/webhooks").json()["webhooks"]}
        assert int(listed[name]["cursor"]) >= int(receiver.accepted[-1]["_seq"])
        metrics = gw.request("GET", "/metrics").body.decode()
        assert f'bridgeway_webhook_failures_total{{subscription="{name}"}}' in metrics
        assert f'bridgeway_events_delivered_total{{subscription="{name}"}} 16.0' in metrics
        # the receiver's query token never reaches the logs
        assert "token=abc" not in gw.logs()
    finally:
        gw.api("DELETE", f"/events/webhooks/{name}")
        receiver.close()


def test_bad_input_is_refused_precisely_and_stores_nothing(gw):
    before = last_id(gw)
    r = gw.request("POST", "/api/v1/events", b'{"event_type": ', {**gw.admin_headers})
    assert r.status == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = publish(gw, [ev("job.ok", 1), {"event_type": "bad type!", "payload": 1}, ev("job.ok", 2, extra=1)])
    assert r.status == 422
    message = r.json()["error"]["message"]
    assert "[1].event_type" in message and "[1].source_service: Field required" in message
    assert "[2].extra" in message
    r = publish(gw, ev("job.big", 1, payload="x" * 300_000))
    assert r.status == 413 and r.json()["error"]["code"] == "BODY_TOO_LARGE"
    # a body past the API's limit is refused on its Content-Length, before it is read
    r = gw.request("POST", "/api/v1/events", None, {**gw.admin_headers, "Content-Length": "2000000"})
    assert r.status == 413
    r = publish(gw, [])
    assert r.status == 400
    r = gw.api("GET", "/events/stream?after=yesterday")
    assert r.status == 400 and "not an event id" in r.json()["error"]["message"]
    r = gw.api("PUT", "/events/webhooks/x", {"types": [], "url": "ftp://x", "secret": "s"})
    assert r.status == 422 and "types" in r.json()["error"]["message"]
    assert last_id(gw) == before  # nothing half-written


def test_publish_and_subscribe_need_a_caller_granted_the_types(gw):
    r = gw.request("POST", "/api/v1/events", json.dumps(ev("job.x", 1)).encode())
    assert r.status == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED"
    worker = gw.api("POST", "/keys", {"name": "w", "role": "worker"}).json()["key"]
    watcher = gw.api("POST", "/keys", {"name": "s", "role": "watcher"}).json()["key"]
    as_worker = {"Authorization": f"Bearer {worker}"}
    as_watcher = {"Authorization": f"Bearer {watcher}"}
    assert publish(gw, ev("job.x", 1), as_worker).status == 200
    r = publish(gw, [ev("job.x", 2), ev("user.x", 3)], as_worker)
    assert r.status == 403 and "'user.x'" in r.json()["error"]["message"]
    assert publish(gw, ev("job.x", 1), as_watcher).status == 403  # subscribe is not publish
    assert gw.request("GET", "/api/v1/events/stream?types=*", headers=as_watcher).status == 403
    assert gw.request("GET", "/api/v1/events?types=user.*", headers=as_watcher).status == 403
    assert gw.request("GET", "/api/v1/events?types=job.*", headers=as_watcher).status == 200
    assert gw.request("GET", "/api/v1/events/stream?types=job.*", headers=as_worker).status == 403
    assert gw.request("GET", "/api/v1/events/webhooks", headers=as_watcher).status == 403
    with pytest.raises(Exception) as refused:  # noqa: B017 - the handshake is refused
        ws_connect(f"ws://{HOST}:{gw.port}/api/v1/events/ws?types=user.*", additional_headers=as_watcher)
    assert "403" in str(refused.value)


def test_a_config_webhook_is_delivered_by_one_of_two_workers_in_order(tmp_path):
    """Two workers share the SQLite file; the lease lets one deliver, so the receiver sees every
    event once (none fail here) and in order."""
    receiver = Receiver()
    receiver.posts = -(10**9)  # never refuse: duplicates would then only come from two deliverers
    gateway = start_gateway(
        {
            "events": {
                "log": unique_name(),
                "delivery": {"backoff": "20ms", "max_backoff": "100ms", "lease": "3s"},
                "webhooks": {"audit": {"types": ["*"], "url": receiver.url, "secret": HOOK_SECRET}},
            },
        },
        workers=2,
    )
    try:
        for i in range(0, 30, 3):  # several publishes, likely spread over both workers
            assert publish(gateway, [ev("job.done", j) for j in range(i, i + 3)]).status == 200
        wait_until(lambda: len(receiver.accepted) >= 30, timeout=20, what="30 deliveries")
        time.sleep(0.5)
        assert [e["payload"]["i"] for e in receiver.accepted] == list(range(30))
        [hook] = gateway.api("GET", "/events/webhooks").json()["webhooks"]
        assert hook["origin"] == "config" and HOOK_SECRET not in json.dumps(hook)
        assert gateway.api("DELETE", "/events/webhooks/audit").status == 409
    finally:
        gateway.stop()
        receiver.close()


def test_cli_publishes_and_tails_from_an_id(gw):
    if gw.backend != "sqlite":
        pytest.skip("the CLI speaks the HTTP API, the same on every backend: once is enough")
    import subprocess
    import sys

    env = {**os.environ, "BRIDGEWAY_URL": f"http://{HOST}:{gw.port}", "BRIDGEWAY_TOKEN": gw.token}
    start = last_id(gw)
    cli = [sys.executable, "-m", "bridgeway", "events"]
    out = subprocess.run(
        [*cli, "publish", "job.cli", "--payload", '{"n": 1}', "--event-id", "cli-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "cli-1"
    tail = subprocess.run(
        [*cli, "tail", "--types", "job.*", "--from", str(start), "--count", "1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert tail.returncode == 0, tail.stderr
    line = json.loads(tail.stdout)
    assert line["event"]["event_id"] == "cli-1" and line["event"]["payload"] == {"n": 1}
    bad = subprocess.run(
        [*cli, "publish", "job.x", "--payload", "{"], env=env, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 1 and "not JSON" in bad.stderr
