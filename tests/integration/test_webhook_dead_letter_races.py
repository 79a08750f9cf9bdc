"""Dead letters racing their replay and their webhook's deletion, against a real receiver on
loopback. The interleavings the scheduler rarely produces are forced: the API's step runs
between two of the deliverer's awaits (or the other way round), through the real functions.
The endpoints are called over HTTP on a gateway served in this test's event loop, so a test can
step in between its requests and its deliverer."""

from __future__ import annotations

import types

import pytest

from bridgeway.api import events as api
from bridgeway.config.models import EventDeliveryConfig
from bridgeway.jobs.events.log import StoredEvent
from bridgeway.jobs.events.webhooks import (
    DEAD_NS,
    REPLAY_NS,
    DeadLetter,
    Subscription,
    WebhookDelivery,
    _Lease,
    dead_key,
)
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
    """A started deliverer on `kv` holding NAME's lease, and NAME's subscription to `refusing`."""
    delivery = WebhookDelivery(None, kv, EventDeliveryConfig(max_attempts=1))
    await delivery.start()
    lease = _Lease(kv, NAME, delivery.owner, 15.0)
    assert await lease.acquire()
    sub = Subscription(NAME, ("*",), refusing.url, b"k", None, "latest", 5.0)
    yield delivery, sub, lease
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
    delivery, sub, lease = deliverer
    gateway = types.SimpleNamespace(state=kv)
    key = await bury(kv, 7)
    await api._replay(gateway, NAME, key, await kv.get(DEAD_NS + NAME, key))

    real_bury = delivery._bury

    async def bury_then_replayed_again(sub, dead):
        await real_bury(sub, dead)
        # POST .../dead-letters/7/replay, answered between the deliverer's two writes
        await api._replay(gateway, NAME, key, await kv.get(DEAD_NS + NAME, key))

    delivery._bury = bury_then_replayed_again
    await delivery._replay(sub, lease)
    assert await keys(kv, DEAD_NS) == [] and await keys(kv, REPLAY_NS) == [key]  # not in neither


async def test_a_letter_replayed_and_refused_while_it_is_being_moved_stays_dead(kv, deliverer):
    """The deliverer replays the letter, is refused and buries it again between the API putting
    it in the replay list and taking it out of the dead letters: it stays a dead letter."""
    delivery, sub, lease = deliverer
    gateway = types.SimpleNamespace(state=kv)
    key = await bury(kv, 8)
    real_put = kv.put

    async def put_then_deliverer_runs(namespace, *args, **kwargs):
        entry = await real_put(namespace, *args, **kwargs)
        if namespace == REPLAY_NS + NAME:
            kv.put = real_put
            await delivery._replay(sub, lease)  # the deliverer's next pass, in between
        return entry

    kv.put = put_then_deliverer_runs
    await api._replay(gateway, NAME, key, await kv.get(DEAD_NS + NAME, key))
    assert await keys(kv, DEAD_NS) == [key] and await keys(kv, REPLAY_NS) == []
    letter = DeadLetter.decode((await kv.get(DEAD_NS + NAME, key)).value)
    assert letter.attempts == 1  # the replay's failure, not the first one's
