"""Dead letters racing their replay and their webhook's deletion, against a real receiver on
loopback. The interleavings the scheduler rarely produces are forced: the API's step runs
between two of the deliverer's awaits (or the other way round), through the real functions.
The endpoints are called over HTTP on a gateway served in this test's event loop, so a test can
step in between its requests and its deliverer."""

from __future__ import annotations

import asyncio
import socket
import threading
import types

import aiohttp
import orjson
import pytest
import yaml

from bridgeway.api import events as api
from bridgeway.config.loader import load_config
from bridgeway.config.models import EventDeliveryConfig
from bridgeway.jobs.events.log import StoredEvent
from bridgeway.jobs.events.webhooks import (
    CURSORS_NS,
    DEAD_NS,
    REPLAY_NS,
    DeadLetter,
    Subscription,
    WebhookDelivery,
    _Cursor,
    _Lease,
    dead_key,
)
from bridgeway.server import Gateway
from bridgeway.serving import Settings
from bridgeway.serving.worker import Lifespan, Worker
from tests.support.events import unique_name
from tests.support.procs import HOST
from tests.support.sink import Sink

NAME = "hook"
SECRET = "whsec-races-0123456789abcdef"
TOKEN = "admin-races-0123456789abcdef"


@pytest.fixture
def refusing():
    sink = Sink(lambda req: 500)  # a receiver that stays down
    yield sink
    sink.close()


@pytest.fixture
async def deliverer(kv, refusing):
    """A started deliverer on `kv` holding NAME's lease and cursor, and NAME's subscription to
    `refusing`."""
    delivery = WebhookDelivery(None, kv, EventDeliveryConfig(max_attempts=1))
    await delivery.start()
    lease = _Lease(kv, NAME, delivery.owner, 15.0)
    assert await lease.acquire()
    entry = await kv.put(CURSORS_NS, NAME, b"0")
    sub = Subscription(NAME, ("*",), refusing.url, b"k", None, "latest", 5.0)
    yield delivery, sub, lease, _Cursor(kv, NAME, 0, entry.version)
    await delivery.stop()


async def bury(kv, seq: int) -> str:
    event = StoredEvent(seq, f"e{seq}", "job.done", b'{"n":%d}' % seq)
    await kv.put(DEAD_NS + NAME, dead_key(seq), DeadLetter(event, 3, 1.0, 2.0, "status 500").encode())
    return dead_key(seq)


async def keys(kv, namespace: str) -> list[str]:
    return [key for key, _ in await kv.list(namespace + NAME, limit=100)]


async def test_a_letter_asked_again_while_its_replay_is_refused_stays_to_be_replayed(kv, deliverer):
    """The replay is refused, the deliverer buries the letter again, the admin replays it again
    before the deliverer clears its replay entry: that entry is the new request, not the old."""
    delivery, sub, lease, cursor = deliverer
    gateway = types.SimpleNamespace(state=kv)
    key = await bury(kv, 7)
    await api._replay(gateway, NAME, key, await kv.get(DEAD_NS + NAME, key))

    real_bury = delivery._bury

    async def bury_then_replayed_again(sub, cursor, dead, position):
        await real_bury(sub, cursor, dead, position)
        # POST .../dead-letters/7/replay, answered between the deliverer's two writes
        await api._replay(gateway, NAME, key, await kv.get(DEAD_NS + NAME, key))

    delivery._bury = bury_then_replayed_again
    await delivery._replay(sub, lease, cursor)
    assert await keys(kv, DEAD_NS) == [] and await keys(kv, REPLAY_NS) == [key]  # not in neither


async def test_a_letter_replayed_and_refused_while_it_is_being_moved_stays_dead(kv, deliverer):
    """The deliverer replays the letter, is refused and buries it again between the API putting
    it in the replay list and taking it out of the dead letters: it stays a dead letter."""
    delivery, sub, lease, cursor = deliverer
    gateway = types.SimpleNamespace(state=kv)
    key = await bury(kv, 8)
    real_put = kv.put

    async def put_then_deliverer_runs(namespace, *args, **kwargs):
        entry = await real_put(namespace, *args, **kwargs)
        if namespace == REPLAY_NS + NAME:
            kv.put = real_put
            await delivery._replay(sub, lease, cursor)  # the deliverer's next pass, in between
        return entry

    kv.put = put_then_deliverer_runs
    await api._replay(gateway, NAME, key, await kv.get(DEAD_NS + NAME, key))
    assert await keys(kv, DEAD_NS) == [key] and await keys(kv, REPLAY_NS) == []
    letter = DeadLetter.decode((await kv.get(DEAD_NS + NAME, key)).value)
    assert letter.attempts == 1  # the replay's failure, not the first one's


# -- through the API, on a gateway served in this loop -----------------------------------------


@pytest.fixture
async def gateway(tmp_path):
    config = {
        "listen": f"{HOST}:1",  # not used: the test binds its own socket
        "admin": {"token": TOKEN},
        "state": f"sqlite:///{tmp_path / 'state.db'}",
        "events": {
            "log": unique_name(),
            "delivery": {"backoff": "10ms", "max_backoff": "20ms", "lease": "3s", "max_attempts": 1},
        },
    }
    path = tmp_path / "bridgeway.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = Gateway(load_config(str(path)), str(path))
    lifespan = Lifespan(gw)
    assert await lifespan.startup()
    worker = Worker(gw, Settings(), asyncio.get_running_loop())
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(16)
    sock.setblocking(False)
    await worker.start(sock)
    base = f"http://{HOST}:{sock.getsockname()[1]}/api/v1"

    async def call(method: str, path: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else orjson.dumps(body)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with session.request(method, base + path, data=data, headers=headers) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if r.content_type == "application/json" else raw

    async with aiohttp.ClientSession() as session:
        yield gw, call
    await worker.stop()
    await lifespan.shutdown()


async def until(predicate, what: str, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        while not (found := await predicate()):
            await asyncio.sleep(0.02)
    assert found, what
    return found


def event(i: int) -> dict:
    return {"event_type": "job.done", "source_service": "test", "payload": {"i": i}}


async def test_replaying_all_moves_each_dead_letter_once_while_the_receiver_stays_down(
    gateway, refusing, monkeypatch
):
    gw, call = gateway
    status, _ = await call(
        "PUT", f"/events/webhooks/{NAME}", {"types": ["*"], "url": refusing.url, "secret": SECRET}
    )
    assert status == 201
    assert (await call("POST", "/events", [event(i) for i in range(3)]))[0] == 200

    async def three_dead():
        return len(await keys(gw.state, DEAD_NS)) == 3

    await until(three_dead, "three dead letters")
    moved = []
    real_replay = api._replay

    async def replay_and_wait_until_refused_again(gateway, name, key, entry):
        moved.append(key)
        assert len(moved) <= 6, "the same dead letters moved again and again"
        await real_replay(gateway, name, key, entry)

        async def buried_again():
            return await gateway.state.get(REPLAY_NS + name, key) is None

        await until(buried_again, "the deliverer refused the replay")

    monkeypatch.setattr(api, "_replay", replay_and_wait_until_refused_again)
    status, body = await call("POST", f"/events/webhooks/{NAME}/dead-letters/replay")
    assert (status, body) == (202, {"replaying": 3})
    assert moved == sorted(set(moved)) and len(moved) == 3
    assert len(await keys(gw.state, DEAD_NS)) == 3 and await keys(gw.state, REPLAY_NS) == []


@pytest.fixture
def holding():
    """A receiver that holds each post until `answer` is set, then refuses it."""
    received, answer = threading.Event(), threading.Event()

    def slow_refusal(req):
        received.set()
        answer.wait(10)
        return 500

    sink = Sink(slow_refusal)
    yield sink, received, answer
    answer.set()
    sink.close()


async def delete_mid_post(call, holding) -> dict:
    """Make NAME, publish an event, delete NAME while the event's post is held, then let the
    post be refused. Returns the webhook, to make it again."""
    sink, received, answer = holding
    hook = {"types": ["*"], "url": sink.url, "secret": SECRET}
    assert (await call("PUT", f"/events/webhooks/{NAME}", hook))[0] == 201
    assert (await call("POST", "/events", [event(0)]))[0] == 200
    assert await asyncio.to_thread(received.wait, 10)
    assert (await call("DELETE", f"/events/webhooks/{NAME}"))[0] == 204
    answer.set()
    return hook


async def test_a_webhook_deleted_mid_post_leaves_nothing_to_its_namesake(gateway, holding):
    """Deleted while its post is in flight, refused after: the deliverer must not bury it (nor
    write its cursor) after the purge, where a webhook made again under the name would find it."""
    gw, call = gateway
    hook = await delete_mid_post(call, holding)
    await asyncio.sleep(0.5)  # time for a post still in flight to be refused and buried
    assert await keys(gw.state, DEAD_NS) == []
    assert await gw.state.get(CURSORS_NS, NAME) is None
    assert (await call("PUT", f"/events/webhooks/{NAME}", hook))[0] == 201
    status, body = await call("GET", f"/events/webhooks/{NAME}/dead-letters")
    assert (status, body["dead_letters"]) == (200, [])


async def test_a_webhook_deleted_mid_post_on_another_replica_leaves_nothing_to_its_namesake(gateway, holding):
    """As above, but the post in flight is another replica's, which the API's `forget` cannot
    stop: its cursor moves by compare-and-set, so it finds the cursor gone, writes nothing back
    and takes back the dead letter it wrote after the purge."""
    gw, call = gateway
    await gw.webhooks.stop()  # this replica delivers nothing: the other one does
    other = WebhookDelivery(gw.webhooks.log, gw.state, gw.webhooks.delivery)
    await other.start()
    try:
        await delete_mid_post(call, holding)

        async def ended():
            return NAME not in other._running or other._running[NAME][1].done()

        await until(ended, "the other replica's deliverer stopped")
        assert await keys(gw.state, DEAD_NS) == []
        assert await gw.state.get(CURSORS_NS, NAME) is None
    finally:
        await other.stop()
