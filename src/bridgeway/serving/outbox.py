"""Writes held to the end of the event loop's turn, then made together.

A write to a peer asleep in `epoll_wait` on another core wakes it, and the wake-up (an
inter-processor interrupt; in a VM, an exit to the hypervisor) costs the writer more than the
write: 15% of a proxied request's CPU, measured in `sock_def_readable`. One turn of the loop
handles the requests of every connection that became readable; if each answer went out at once,
each would wake its sleeping peer again. Held to the end of the turn, the writes go out back to
back: the first wakes the peer, and the rest find it awake. A held write waits only for the
callbacks of the current turn, a few microseconds.

A connection that writes through its `Outbox` writes only through it (`HeldWrites.write`) and
flushes before it closes its transport, so its bytes keep their order.
"""

from __future__ import annotations

import asyncio
from weakref import WeakKeyDictionary


class Outbox:
    """One loop's connections holding bytes this turn, flushed by one callback."""

    __slots__ = ("_loop", "_held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[HeldWrites] = []  # in the order they first wrote this turn

    def hold(self, writer: HeldWrites) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)  # runs after the turn's I/O callbacks
        self._held.append(writer)

    def _flush(self) -> None:
        held = self._held
        self._held = []
        for writer in held:
            writer.flush()


_OUTBOXES: WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = WeakKeyDictionary()


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The outbox of `loop`."""
    box = _OUTBOXES.get(loop)
    if box is None:
        box = _OUTBOXES[loop] = Outbox(loop)
    return box


class HeldWrites:
    """A protocol's writes through its loop's `Outbox`. Its class gives the slots `transport`,
    `outbox` and `held` (None, or the bytes held this turn)."""

    __slots__ = ()
    transport: asyncio.Transport
    outbox: Outbox
    held: list[bytes] | None

    def write(self, data: bytes) -> None:
        held = self.held
        if held is None:
            self.held = [data]
            self.outbox.hold(self)
        else:
            held.append(data)

    def flush(self) -> None:
        """Write what is held now; a transport closed meanwhile (aborted, or lost) drops it."""
        held = self.held
        if held is None:
            return
        self.held = None
        transport = self.transport
        if not transport.is_closing():
            if len(held) == 1:
                transport.write(held[0])
            else:
                transport.writelines(held)
