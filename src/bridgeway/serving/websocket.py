"""A WebSocket on a connection that asked to upgrade: the ASGI `websocket` scope over the
`websockets` library's sans-I/O `ServerProtocol` (it does the handshake checks, the framing,
ping/pong and the close handshake; this module moves bytes and ASGI messages).

The app's accept answers the handshake (101); a close before it refuses it (403), and so does a
response of its own through the `websocket.http.response` extension (any status and body). Received
messages wait in a queue for the app's `receive`; reading pauses while that queue holds more than
`QUEUE_HIGH_WATER` messages. A message over `max_message_size` closes with 1009.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from websockets.exceptions import InvalidHandshake
from websockets.frames import Close, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from bridgeway.serving.http import checked_head, status_line

log = logging.getLogger("bridgeway.serving")

QUEUE_HIGH_WATER = 64  # received messages the app has not taken before reading pauses
CLOSE_TIMEOUT = 5.0  # after our close frame, how long the client gets to answer it


class WebSocketSession:
    def __init__(self, conn, scope: dict):
        self.conn = conn
        self.scope = scope
        self.max_size = conn.server.ws_max_message_size
        self.protocol = ServerProtocol(max_size=self.max_size, select_subprotocol=lambda *_: None)
        self.handshake = None  # the 101 response, computed before the app runs
        self.accepted = False
        self.closed = False  # the app's side is over (it closed, or was told of the disconnect)
        self.connect_sent = False
        self.messages: deque[dict] = deque()
        self.early: list[bytes] = []  # bytes that came before the app accepted
        self.waiter: asyncio.Future | None = None
        self.fragments: list[bytes] = []
        self.fragment_opcode: Opcode | None = None
        self.fragment_size = 0
        self.disconnect_code: int | None = None
        self.task: asyncio.Task | None = None
        self.close_timer = False
        self.denial: tuple[int, list, list[bytes]] | None = None  # a refusal's status, headers, body

    def start(self, rest: bytes) -> None:
        # The library parses the request itself before it reads frames: it is given the head again.
        scope = self.scope
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        head = [b"GET %b HTTP/1.1\r\n" % target]
        head.extend(b"%b: %b\r\n" % pair for pair in scope["headers"])
        head.append(b"\r\n")
        self.protocol.receive_data(b"".join(head))
        events = self.protocol.events_received()
        if not events or not isinstance(events[0], Request):
            self.conn.transport.close()
            return
        response = self.protocol.accept(events[0])
        if response.status_code != 101:
            # Not a valid handshake (no key, a wrong version...): the library's answer, then close.
            self.protocol.send_response(response)
            self._flush()
            self.conn.transport.close()
            return
        self.handshake = response
        loop = self.conn.loop
        self.task = loop.create_task(self.conn.app(self.scope, self.receive, self.send))
        self.task.add_done_callback(self._app_done)
        if rest:
            self.data_received(rest)

    # -- network side -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.accepted:
            # A client may send right after its request; keep that until accepted (bounded).
            self.early.append(data)
            if sum(map(len, self.early)) > (self.max_size or 1 << 20):
                self.conn.transport.close()
            return
        self.protocol.receive_data(data)
        self._take_events()

    def _take_events(self) -> None:
        for frame in self.protocol.events_received():
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    self._deliver(opcode, frame.data)
                else:
                    self.fragment_opcode, self.fragments, self.fragment_size = (
                        opcode,
                        [frame.data],
                        len(frame.data),
                    )
            elif opcode is Opcode.CONT:
                self.fragments.append(frame.data)
                self.fragment_size += len(frame.data)
                if self.max_size is not None and self.fragment_size > self.max_size:
                    self.protocol.fail(1009, f"message over {self.max_size} bytes")
                    self.fragments = []
                    break
                if frame.fin:
                    data = b"".join(self.fragments)
                    self.fragments = []
                    self._deliver(self.fragment_opcode, data)
            elif opcode is Opcode.CLOSE:
                close = Close.parse(frame.data) if frame.data else None
                self._disconnected(close.code if close is not None else 1005)
        self._flush()
        if self.protocol.close_expected():
            if self.disconnect_code is None:  # the library failed the connection (1002, 1009...)
                sent = self.protocol.close_sent
                self._disconnected(sent.code if sent is not None else 1006)
            self._close_soon()
        if len(self.messages) > QUEUE_HIGH_WATER:
            self.conn.pause_reading()

    def _deliver(self, opcode: Opcode, data: bytes) -> None:
        if opcode is Opcode.TEXT:
            try:
                message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self.protocol.fail(1007, "invalid UTF-8 in a text message")
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.messages.append(message)
        self._wake()

    def _disconnected(self, code: int) -> None:
        if self.disconnect_code is None:
            self.disconnect_code = code
            self._wake()

    def connection_lost(self) -> None:
        self._disconnected(1006)
        if self.conn.drain_waiter is not None and not self.conn.drain_waiter.done():
            self.conn.drain_waiter.set_result(None)

    def shutdown(self) -> None:
        """The worker stops: close with 1001 (going away)."""
        if self.accepted and self.protocol.state is State.OPEN:
            self.protocol.send_close(1001, "server shutting down")
            self._flush()
            self._close_soon()
        elif not self.accepted:
            self.conn.transport.close()

    def _flush(self) -> None:
        transport = self.conn.transport
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            elif not transport.is_closing():
                transport.close()  # the library's end of stream: ours to close as the server

    def _close_soon(self) -> None:
        """Our close frame is out: the client closes the TCP connection, or we do after a while."""
        if not self.close_timer:
            self.close_timer = True
            self.conn.loop.call_later(CLOSE_TIMEOUT, self.conn.transport.close)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- ASGI side --------------------------------------------------------------------------------

    async def receive(self) -> dict:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        while not self.messages:
            if self.disconnect_code is not None or self.closed:
                self.closed = True
                return {"type": "websocket.disconnect", "code": self.disconnect_code or 1006}
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.messages.popleft()
        if self.conn.reading_paused and len(self.messages) <= QUEUE_HIGH_WATER // 2:
            self.conn.resume_reading()
        return message

    async def send(self, message: dict) -> None:
        kind = message["type"]
        conn = self.conn
        if kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            if conn.lost or self.protocol.state is not State.OPEN:
                return  # gone: the app learns it from receive()
            text = message.get("text")
            if text is not None:
                self.protocol.send_text(text.encode())
            else:
                self.protocol.send_binary(message.get("bytes") or b"")
            self._flush()
            if conn.write_paused:
                await conn.drain()
        elif kind == "websocket.accept":
            if self.accepted:
                raise RuntimeError("websocket.accept sent twice")
            self._accept(message)
        elif kind == "websocket.http.response.start":
            if self.accepted or self.denial is not None:
                raise RuntimeError("websocket.http.response.start after the handshake was answered")
            self.denial = (message["status"], list(message.get("headers") or ()), [])
        elif kind == "websocket.http.response.body":
            if self.denial is None:
                raise RuntimeError("websocket.http.response.body before its start")
            self.denial[2].append(message.get("body", b""))
            if not message.get("more_body", False):
                self._deny()
        elif kind == "websocket.close":
            code = message.get("code", 1000)
            if not self.accepted:
                # Refused before the handshake finished: a plain 403, as ASGI servers answer.
                if not conn.lost:
                    self.protocol.send_response(self.protocol.reject(403, "WebSocket refused\n"))
                    self._flush()
                    conn.transport.close()
            elif self.protocol.state is State.OPEN and not conn.lost:
                self.protocol.send_close(code, message.get("reason") or "")
                self._flush()
                self._close_soon()
            self.closed = True
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    def _deny(self) -> None:
        """The app's own refusal of the handshake, sent whole, then the connection closes."""
        status, headers, parts = self.denial
        self.closed = True
        if self.conn.lost:
            return
        body = b"".join(parts)
        lines = [status_line(status)]
        lines += [
            b"%b: %b\r\n" % (name, value) for name, value in headers if name.lower() != b"content-length"
        ]
        data = checked_head(b"".join(lines), len(lines))
        data += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.conn.transport.write(data + body)
        self.conn.transport.close()

    def _accept(self, message: dict) -> None:
        response = self.handshake
        subprotocol = message.get("subprotocol")
        if subprotocol is not None:
            if subprotocol not in self.scope["subprotocols"]:
                raise RuntimeError(f"subprotocol {subprotocol!r} was not offered by the client")
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        for name, value in message.get("headers") or ():
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        self.accepted = True
        early = b"".join(self.early)
        self.early = []
        if self.conn.lost:
            return
        try:
            self.protocol.send_response(response)
        except InvalidHandshake:  # pragma: no cover - checked in start()
            self.conn.transport.close()
            return
        self._flush()
        if early:
            self.data_received(early)

    def _app_done(self, task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("ASGI app raised on WebSocket %s", self.scope.get("path"), exc_info=exc)
        conn = self.conn
        if conn.lost:
            return
        if not self.accepted:
            if self.denial is not None and not self.closed:  # a refusal the app left unfinished
                self._deny()
            elif not self.closed:  # ended without accepting: refused
                self.protocol.send_response(self.protocol.reject(500 if exc else 403, "WebSocket refused\n"))
                self._flush()
            conn.transport.close()
        elif self.protocol.state is State.OPEN:
            self.protocol.send_close(1011 if exc else 1000, "")
            self._flush()
            self._close_soon()
