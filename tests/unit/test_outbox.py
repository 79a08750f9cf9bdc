"""The Outbox on real sockets: a turn's writes go out when the turn ends, in order per connection."""

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


async def test_the_writes_of_a_turn_go_out_when_it_ends_in_order_per_connection():
    pairs = await connected(2)
    for i, (writer, _) in enumerate(pairs):
        writer.write(b"head%d," % i)
        writer.write(b"body%d" % i)
    assert [received(peer) for _, peer in pairs] == [b"(nothing yet)"] * 2  # held
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [received(peer) for _, peer in pairs] == [b"head0,body0", b"head1,body1"]
    pairs[0][0].write(b"next turn")  # held again, and flushed again
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert received(pairs[0][1]) == b"next turn"
    for writer, peer in pairs:
        writer.transport.close()
        peer.close()


async def test_a_transport_gone_before_the_flush_drops_what_was_held():
    [(writer, peer)] = await connected(1)
    writer.write(b"never sent")
    writer.transport.abort()
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the flush found it closing and wrote nothing (and raised nothing)
    assert writer.held is None
    peer.setblocking(True)
    peer.settimeout(2)
    assert peer.recv(100) == b""
    peer.close()


# The gateway's loop: the same scenarios again on uvloop.
_SCENARIOS = [fn for name, fn in sorted(globals().items()) if name.startswith("test_")]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[fn.__name__[5:] for fn in _SCENARIOS])
def test_on_uvloop(scenario) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())
