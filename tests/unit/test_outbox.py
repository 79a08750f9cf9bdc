"""The Outbox on real sockets: in a turn's callbacks the first write goes at once and the rest when
the turn ends, in order per connection; a task's writes go at once."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bridgeway.serving.outbox import HeldWrites, outbox


class Writer(HeldWrites, asyncio.Protocol):
    __slots__ = ("transport", "outbox", "held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.outbox = outbox(loop)
        self.held = None

    def connection_made(self, transport) -> None:
        self.transport = transport


async def connected(n: int) -> list[tuple[Writer, socket.socket]]:
    loop = asyncio.get_running_loop()
    pairs = []
    for _ in range(n):
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        _, writer = await loop.connect_accepted_socket(lambda: Writer(loop), sock=ours)
        pairs.append((writer, peer))
    return pairs


def received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b"(nothing yet)"


async def in_a_callback(fn):
    """Run `fn` as a plain loop callback (as the proxy's I/O and future callbacks run), not in a
    task; returns what it returned."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(lambda: done.set_result(fn()))
    return await done


async def test_a_callbacks_first_write_goes_at_once_the_rest_when_the_turn_ends_in_order():
    pairs = await connected(2)
    (first, first_peer), (second, second_peer) = pairs

    def burst():
        first.write(b"head0,")  # the turn's first write: at once
        first.write(b"body0")  # held behind it
        second.write(b"head1,")
        second.write(b"body1")
        return received(first_peer), received(second_peer)

    assert await in_a_callback(burst) == (b"head0,", b"(nothing yet)")
    await asyncio.sleep(0)
    assert received(first_peer) == b"body0"
    assert received(second_peer) == b"head1,body1"  # one write
    assert await in_a_callback(lambda: (second.write(b"next turn"), received(second_peer))[1]) == b"next turn"
    for writer, peer in pairs:
        writer.transport.close()
        peer.close()


async def test_a_tasks_writes_go_at_once():
    [(writer, peer)] = await connected(1)
    writer.write(b"one,")
    writer.write(b"two")  # not the turn's first, but a task's: a flush would wait for the next I/O
    assert received(peer) == b"one,two"
    writer.transport.close()
    peer.close()


async def test_a_transport_gone_before_the_flush_drops_what_was_held():
    [(writer, peer), (other, other_peer)] = await connected(2)

    def burst():
        other.write(b"first")  # the turn's first write, so the next one is held
        writer.write(b"never sent")
        writer.transport.abort()

    await in_a_callback(burst)
    await asyncio.sleep(0)  # the flush found it closing and wrote nothing (and raised nothing)
    assert writer.held is None
    peer.setblocking(True)
    peer.settimeout(2)
    assert peer.recv(100) == b""
    for sock in (peer, other_peer):
        sock.close()
    other.transport.close()


# The gateway's loop: the same scenarios again on uvloop.
_SCENARIOS = [
    fn for name, fn in sorted(globals().items()) if name.startswith("test_") and name != "test_on_uvloop"
]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[fn.__name__[5:] for fn in _SCENARIOS])
def test_on_uvloop(scenario) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())
