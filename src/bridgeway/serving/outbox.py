"""Writes held to the end of the event loop's turn, then made together.

A write to a peer asleep in `epoll_wait` on another core wakes it, and the wake-up (an
inter-processor interrupt; in a VM, an exit to the hypervisor) costs the writer more than the
write: 15% of a proxied request's CPU, measured in `sock_def_readable`. One turn of the loop
handles the requests of every connection that became readable; if each answer went out at once,
each would wake its sleeping peer again. So the turn's first write goes at once (alone in its
turn, with one client, it would gain nothing by waiting, and its peer works while the turn goes
on), and the rest of those made from callbacks are held to the end of the turn and go out back to
back: the first of them wakes the peer, and the others find it awake. A held write waits only for
the callbacks of the current turn. Writes from tasks go at once (`Outbox.now` says why).

A connection that writes through its `Outbox` writes through `HeldWrites.write`, and flushes
before it touches its transport itself: to close it, or to write a streamed body straight to it
under the transport's flow control. So its bytes keep their order.
"""

from __future__ import annotations

import asyncio
from weakref import WeakKeyDictionary


class Outbox:
    """One loop's connections holding bytes this turn, flushed by one callback."""

    __slots__ = ("_loop", "_held", "_turn")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[HeldWrites] = []  # in the order they first wrote this turn
        self._turn = False  # a write was made this turn; `_flush` ends the turn

    def now(self) -> bool:
        """Whether a write may go out at once: the turn's first does (alone in its turn, with one
        client, it would gain nothing by waiting, and going now its peer works while the turn
        goes on), and so does a task's. A task runs among the loop's ready callbacks, and a
        flush it scheduled would run only after the next batch of I/O callbacks: with work that
        hops between tasks (an LLM request waiting on its budget's group commit) that cost more
        latency than the batching saved. The hold is for the callbacks of the proxy's common
        request, which answer from I/O callbacks and the futures they complete."""
        if self._turn:
            return asyncio.current_task(self._loop) is not None
        self._turn = True
        self._loop.call_soon(self._flush)  # runs after the turn's I/O callbacks
        return True

    def hold(self, writer: HeldWrites) -> None:
        self._held.append(writer)

    def _flush(self) -> None:
        self._turn = False
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
        if held is not None:
            held.append(data)
        elif self.outbox.now():
            self.transport.write(data)
        else:
            self.held = [data]
            self.outbox.hold(self)

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
