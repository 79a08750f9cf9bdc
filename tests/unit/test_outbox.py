"""The Outbox on real sockets: a turn's first write goes at once, the rest when the turn ends, in
order per connection."""

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


async def test_the_first_write_of_a_turn_goes_at_once_the_rest_when_it_ends_in_order():
    pairs = await connected(2)
    (first, first_peer), (second, second_peer) = pairs
    first.write(b"head0,")  # the turn's first write: at once
    first.write(b"body0")  # held behind it
    second.write(b"head1,")
    second.write(b"body1")
    assert received(first_peer) == b"head0,"
    assert received(second_peer) == b"(nothing yet)"
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert received(first_peer) == b"body0"
    assert received(second_peer) == b"head1,body1"  # one write
    second.write(b"next turn")  # a new turn's first: at once again
    assert received(second_peer) == b"next turn"
    for writer, peer in pairs:
        writer.transport.close()
        peer.close()


async def test_a_transport_gone_before_the_flush_drops_what_was_held():
    [(writer, peer), (other, other_peer)] = await connected(2)
    other.write(b"first")  # the turn's first write, so the next one is held
    writer.write(b"never sent")
    writer.transport.abort()
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the flush found it closing and wrote nothing (and raised nothing)
    assert writer.held is None
    peer.setblocking(True)
    peer.settimeout(2)
    assert peer.recv(100) == b""
    for sock in (peer, other_peer):
        sock.close()
    other.transport.close()


# The gateway's loop: the same scenarios again on uvloop.
_SCENARIOS = [fn for name, fn in sorted(globals().items()) if name.startswith("test_")]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[fn.__name__[5:] for fn in _SCENARIOS])
def test_on_uvloop(scenario) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())
