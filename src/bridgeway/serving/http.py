"""HTTP/1.1 (and 1.0) on one connection: httptools parses, the ASGI app answers, in order.

One `Exchange` per request carries its scope, `receive` and `send`; its app coroutine runs as the
request's only task (the app's own coroutine, not one wrapped around it: every await level is
passed through again each time the request resumes). Pipelined requests wait in a queue and start
when the one before has answered. Reading pauses while a request body waits unconsumed above
`READ_HIGH_WATER`; `send` awaits the transport's drain above its write limit. Time-outs are
checked by the worker's once-a-second sweep against `head_since` (when the server began waiting
for the client), not by a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from bridgeway.errors import error_body
from bridgeway.observability.tracing import new_trace_id
from bridgeway.serving.outbox import HeldWrites, outbox

log = logging.getLogger("bridgeway.serving")

READ_HIGH_WATER = 256 * 1024  # request body buffered for the app before reading pauses
WRITE_HIGH_WATER = 256 * 1024  # response bytes queued in the transport before `send` waits
PIPELINE_HIGH_WATER = 16  # pipelined requests waiting for the one in flight before reading pauses

STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus if s.value >= 200
}
NO_BODY_STATUS = frozenset((204, 304))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
DISCONNECT = {"type": "http.disconnect"}
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
EMPTY_BODY = {"type": "http.request", "body": b"", "more_body": False}
# Extensions of this server's HTTP scopes, for an app that answers from callbacks (the proxy's
# common request, with no task and no coroutine):
# - `scope["extensions"][RESPOND](send, status, headers, body)` answers the request of that `send`
#   whole, as `http.response.start` and a final `http.response.body` would, in one write.
# - An app that finds RESPOND may return None from its call instead of an awaitable: it answers
#   later, by RESPOND from a callback, or hands the request to a coroutine with
#   `scope["extensions"][RUN](send, coroutine)`, which the server runs as the request's task.
# One shared dict for every scope: nothing per request, and no reference from the scope back to
# its exchange (a cycle only the garbage collector would free).
RESPOND = "bridgeway.respond"
RUN = "bridgeway.run"
# Response headers the server writes unless the app gave its own (a proxied answer's Date, say).
GIVEN_SERVER, GIVEN_DATE = 1, 2
# The lengths of the response header names the server acts on (a cheap test before lowercasing).
_NOTED_LENGTHS = frozenset(
    map(len, (b"content-length", b"connection", b"transfer-encoding", b"date", b"server"))
)


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = STATUS_LINES[status] = f"HTTP/1.1 {status} \r\n".encode("latin-1")
    return line


def checked_head(head: bytes, lines: int) -> bytes:
    """`head` as joined from `lines` CRLF-ended lines, refused if a CR or LF sat inside a name or
    value: it would split the response (header injection)."""
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise RuntimeError("response header with a CR or LF in it")
    return head


def plain_response(status: int, code: str, message: str, close: bool = True) -> bytes:
    """A complete response the server itself sends (400, 431, 500), in the gateway's error shape."""
    body = error_body(code, message, new_trace_id())
    return b"".join(
        (
            status_line(status),
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n",
            body,
        )
    )


class Exchange:
    """One request and its response: the ASGI `receive` and `send` of that request."""

    __slots__ = (
        "conn",
        "scope",
        "keep_alive",
        "head",
        "body",
        "buffered",
        "complete",
        "delivered",
        "waiter",
        "expect_continue",
        "started",
        "finished",
        "chunked",
        "status",
        "head_bytes",
        "given",
    )

    def __init__(self, conn: HttpProtocol, scope: dict, keep_alive: bool):
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head = scope["method"] == "HEAD"
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False  # the whole request body has arrived
        self.delivered = False  # ... and the app has taken all of it
        self.waiter: asyncio.Future | None = None
        self.expect_continue: bool | None = None  # unknown until the body is waited for (see below)
        self.started = False
        self.finished = False
        self.chunked = False
        self.status = 0
        self.head_bytes: bytes | None = None  # the response head, held to go out with the first body
        self.given = 0  # GIVEN_SERVER | GIVEN_DATE: the app's own, written instead of the server's

    # -- receive ------------------------------------------------------------------------------

    async def receive(self) -> dict:
        conn = self.conn
        if self.delivered or self.finished:
            # Nothing more to read: what is left to tell is that the client went away.
            if not conn.lost and not self.finished:
                await self._wait()
            return DISCONNECT
        if not self.body and not self.complete:
            if conn.lost:
                return DISCONNECT
            if self._wants_continue():
                self.expect_continue = False
                if not self.started:
                    conn.write(CONTINUE)
            conn.head_since = conn.server.now  # the body is waited for: see `timed_out`
            await self._wait()
            if conn.lost and not self.body:
                return DISCONNECT
        if not self.body and self.complete:
            self.delivered = True
            return EMPTY_BODY
        chunks = self.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.body = []
        self.buffered = 0
        self.delivered = self.complete
        if conn.reading_paused and conn.current is self:
            conn.resume_reading()
        return {"type": "http.request", "body": body, "more_body": not self.complete}

    def _wants_continue(self) -> bool:
        """`Expect: 100-continue` not yet answered. Looked up only when it matters (the app waits
        for a body not yet sent), not on every request."""
        if self.expect_continue is None:
            scope = self.scope
            self.expect_continue = scope["http_version"] == "1.1" and any(
                name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"]
            )
        return self.expect_continue

    async def _wait(self) -> None:
        self.waiter = self.conn.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- send -----------------------------------------------------------------------------------

    async def send(self, message: dict) -> None:
        kind = message["type"]
        conn = self.conn
        if kind == "http.response.body":
            if not self.started or self.finished:
                raise RuntimeError(
                    f"http.response.body {'after the response' if self.started else 'before start'}"
                )
            body = message.get("body", b"")
            more = message.get("more_body", False)
            head = self.head_bytes
            if head is not None:
                self.head_bytes = None
                head = self._finish_head(head, body, more)
            if conn.lost:
                if not more:
                    self.finished = True
                return
            if self.head or self.status in NO_BODY_STATUS:
                body = b""
            elif self.chunked and body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                self.finished = True
                if self.chunked:
                    body += b"0\r\n\r\n"
            if head is not None:
                self._write_head(head, body)
            elif body:
                conn.write(body)
            if self.finished:
                conn.response_done(self)  # a whole answer waits for the turn's end (`Outbox`)
            else:
                conn.flush()  # a stream goes out as it comes, under the transport's flow control
                if conn.write_paused:
                    await conn.drain()
            return
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = status = message["status"]
            self.head_bytes = self._head(status, message.get("headers", ()))
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r} on an HTTP request")

    def respond(self, status: int, headers, body: bytes) -> None:
        """The `RESPOND` extension: the whole response in one write."""
        if self.started:
            raise RuntimeError("a whole response after the response started")
        self.started = self.finished = True
        self.status = status
        head = self._finish_head(self._head(status, headers), body, False)
        conn = self.conn
        if conn.lost:
            return
        self._write_head(head, b"" if self.head or status in NO_BODY_STATUS else body)
        conn.response_done(self)

    def _write_head(self, head: bytes, body: bytes) -> None:
        """The head and the first body bytes: one write, unless the body is large (no copy)."""
        if len(body) < 65536:
            self.conn.write(head + body)
        else:
            self.conn.write(head)
            self.conn.write(body)

    def _head(self, status: int, headers) -> bytes:
        """The status line and the app's headers, checked; framing headers come in `_finish_head`."""
        lines = []
        for header in headers:
            name = header[0]
            if len(name) in _NOTED_LENGTHS:  # only these can be a header the server acts on
                lname = name.lower()
                if lname == b"content-length":
                    self.chunked = None  # a length given: neither chunked nor added
                elif lname == b"connection" and header[1].lower() == b"close":
                    self.keep_alive = False
                    continue  # written once in `_finish_head`
                elif lname == b"transfer-encoding":
                    continue  # the server frames the body itself
                elif lname == b"date":
                    self.given |= GIVEN_DATE
                elif lname == b"server":
                    self.given |= GIVEN_SERVER
            lines.append(b": ".join(header))
        if not lines:
            return status_line(status)
        lines.append(b"")  # the last header's CRLF
        return checked_head(status_line(status) + b"\r\n".join(lines), len(lines))

    def _finish_head(self, head: bytes, body: bytes, more: bool) -> bytes:
        conn = self.conn
        server = conn.server
        given = self.given
        if not given:
            extra = server.common_headers
        else:
            extra = (b"" if given & GIVEN_SERVER else server.server_header) + (
                b"" if given & GIVEN_DATE else server.date_header
            )
        if self.chunked is None:  # the app gave a length
            self.chunked = False
        elif self.status in NO_BODY_STATUS or self.status < 200:
            pass
        elif not more:
            extra += b"content-length: %d\r\n" % len(body)
        elif self.scope["http_version"] == "1.1":
            self.chunked = not self.head
            if self.chunked:
                extra += b"transfer-encoding: chunked\r\n"
        else:
            self.keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        if conn.closing or (not self.complete and self._wants_continue()):
            # Answered without asking for the body: the client may never send it, so close after.
            self.keep_alive = False
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        elif self.scope["http_version"] == "1.0":
            extra += b"connection: keep-alive\r\n"
        return head + extra + b"\r\n"

    def app_done(self, task: asyncio.Task) -> None:
        """The app's task ended: an unfinished response is answered 500 or cut."""
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("ASGI app raised on %s", self.scope.get("path"), exc_info=exc)
        conn = self.conn
        if not self.finished:
            if not self.started and not conn.lost:
                self.finished = True
                self.keep_alive = False
                conn.write(plain_response(500, "INTERNAL", "internal error"))
                conn.response_done(self)
            elif not conn.lost:
                if exc is None:
                    log.error("ASGI app returned before finishing its response on %s", self.scope.get("path"))
                conn.close()  # a cut stream: the client sees it end early
        if conn.task is task:
            conn.task = None


def respond(send, status: int, headers, body: bytes) -> None:
    """The `RESPOND` extension: `send` is the one this server gave with the scope."""
    send.__self__.respond(status, headers, body)


def run(send, coroutine) -> None:
    """The `RUN` extension: the request of `send`, answered by no one yet, goes on in `coroutine`."""
    exchange = send.__self__
    exchange.conn._run(exchange, coroutine)


HTTP_EXTENSIONS = {RESPOND: respond, RUN: run}


async def failing(exc: BaseException):
    """A coroutine that raises `exc`: an error met before any coroutine ran, raised where a
    coroutine's own would be handled."""
    raise exc


class HttpProtocol(HeldWrites, asyncio.Protocol):
    """One client connection: parse, dispatch to the app, write its answers in request order."""

    # Slots: thousands of idle keep-alive connections each hold one of these.
    __slots__ = (
        "server",
        "app",
        "loop",
        "transport",
        "outbox",
        "held",
        "parser",
        "client",
        "local",
        "scheme",
        "lost",
        "closing",
        "reading_paused",
        "write_paused",
        "drain_waiter",
        "current",
        "pipeline",
        "task",
        "upgrade",
        "ws",
        "url",
        "headers",
        "head_size",
        "parsing",
        "head_since",
        "head_started",
        "in_head",
        "pending_head",
    )

    def __init__(self, server):
        self.server = server  # the worker's shared state: app, settings, connections, clock
        self.app = server.app
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.outbox = outbox(self.loop)  # every write goes through it (`HeldWrites`)
        self.held: list[bytes] | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = None
        self.local = None
        self.scheme = "http"
        self.lost = False
        self.closing = False  # shutting down: finish the current response, then close
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future | None = None
        self.current: Exchange | None = None
        self.pipeline: list[Exchange] = []  # pipelined requests waiting for the current one
        self.task: asyncio.Task | None = None  # the current request's app
        self.upgrade: dict | None = None  # the scope of a WebSocket upgrade being read
        self.ws = None  # the WebSocketSession once upgraded
        # the request being parsed
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.parsing: Exchange | None = None
        self.head_since: float | None = None  # when the awaited head (or body) was first waited for
        self.head_started = False  # some of that head has arrived
        self.in_head = False  # the parser is inside a head
        self.pending_head = 0  # bytes fed while inside one head (a header line never ending)

    # -- connection -----------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.head_since = self.server.now
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.server.connections.discard(self)
        if self.ws is not None:
            self.ws.connection_lost()
        for exchange in (self.current, *self.pipeline):
            if exchange is not None:
                exchange.wake()
        self.pipeline.clear()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.lost:
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def close(self) -> None:
        """Close after what is held is written (`transport.close` writes what it buffered)."""
        self.flush()
        self.transport.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.data_received(data)
            return
        try:
            self.parser.feed_data(data)
            if self.in_head:
                self.pending_head += len(data)
                # Bytes of this read before the head began count too: the bound is one read over.
                if self.pending_head > self.server.max_header_size + len(data):
                    self.head_size = -1
                    raise httptools.HttpParserError("head too large")
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :] if exc.args else b"")
        except httptools.HttpParserError as exc:
            if self.head_size < 0:  # the head grew past the limit (see on_header)
                self._refuse(431, "REQUEST_HEADER_FIELDS_TOO_LARGE", "request head too large")
            else:
                self._refuse(400, "BAD_REQUEST", f"malformed request: {_reason(exc)}")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """A request that cannot be parsed: answer it (unless another answer is under way), close."""
        if self.lost:
            return
        current = self.current
        if current is None or (current is self.parsing and not current.started):
            # Nothing answered yet on this connection's current request (its body may be what broke).
            if current is not None:
                current.finished = True
            self.write(plain_response(status, code, message))
            self.close()
        elif current is self.parsing:
            self.close()  # its body broke after the answer began: cut (the app sees a disconnect)
        else:
            # A pipelined request broke: the one in flight finishes, then the connection closes.
            self.pipeline.clear()
            current.keep_alive = False
            self.pause_reading()

    def timed_out(self, now: float) -> bool:
        """Close when the client is waited for too long: a head (idle keep-alive, or a head that
        trickles in), or a body the server wants. A body is timed only while it is wanted, so a
        slow app or a paused read never counts against the client: while the app waits in
        `receive` (`body_timeout` between reads: each wait stamps `head_since`), and after an
        answer that came before the whole body (`body_timeout` for all the rest, stamped in
        `response_done`). The rest is read and dropped rather than the connection closed at once:
        closing with unread bytes sends a reset that can destroy the answer before the client
        reads it (nginx drains it too, bounded, for the same reason); a body that ends in time
        leaves the connection kept alive."""
        since = self.head_since
        if since is None:
            return False
        current = self.current
        if current is not None:
            if current.complete or current.waiter is None:
                return False  # a request in flight whose app is not waiting for its body
            limit = self.server.body_timeout
        elif self.parsing is not None:
            limit = self.server.body_timeout  # the rest of the body of a request already answered
        else:
            limit = self.server.header_timeout if self.head_started else self.server.keepalive_timeout
        if now - since < limit:
            return False
        self.close()
        return True

    def shutdown(self) -> None:
        """Stop taking requests: an idle connection closes now, a busy one after its answer."""
        self.closing = True
        if self.ws is not None:
            self.ws.shutdown()
        elif self.current is None:
            self.close()
        else:
            self.pipeline.clear()

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.in_head = True
        self.pending_head = 0
        if not self.head_started:
            self.head_started = True
            self.head_since = self.server.now

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.server.max_header_size:
            self.head_size = -1
            raise ValueError("head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Checked against the limit once the head is complete; a head that keeps growing is
        # stopped in data_received (pending_head).
        self.head_size += len(name) + len(value) + 4
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.head_size > self.server.max_header_size:
            self.head_size = -1
            raise ValueError("head too large")  # httptools turns this into a parser error
        parser = self.parser
        url = self.url
        raw_path, _, query = url.partition(b"?")
        if not raw_path.startswith(b"/"):
            if raw_path == b"*" or raw_path.startswith((b"http://", b"https://")):
                parsed = httptools.parse_url(url)
                raw_path, query = parsed.path or b"/", parsed.query or b""
            else:
                raise ValueError("bad request target")
        raw_path, _, _ = raw_path.partition(b"#")
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method()
        method = METHODS.get(method) or method.decode("ascii")
        version = parser.get_http_version()
        headers = self.headers
        self.headers = self.url = None  # the scope holds them now; an idle connection holds nothing
        server = self.server
        upgrade = parser.should_upgrade()
        if upgrade and method == "GET" and _is_websocket(headers):
            scope = {
                "type": "websocket",
                "asgi": server.asgi_websocket,
                "http_version": version,
                "scheme": "wss" if self.scheme == "https" else "ws",
                "path": path,
                "raw_path": raw_path,
                "query_string": query,
                "root_path": "",
                "headers": headers,
                "client": self.client,
                "server": self.local,
                "subprotocols": _subprotocols(headers),
                # The app may refuse the handshake with a real HTTP response (status, body).
                "extensions": {"websocket.http.response": {}},
            }
            if server.state is not None:
                scope["state"] = server.state.copy()
            self.upgrade = scope
            self.head_since = None
            return
        scope = {
            "type": "http",
            "asgi": server.asgi_http,
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": self.scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "extensions": HTTP_EXTENSIONS,
        }
        if server.state is not None:
            scope["state"] = server.state.copy()
        keep_alive = parser.should_keep_alive() and not upgrade and not self.closing
        exchange = Exchange(self, scope, keep_alive)
        self.parsing = exchange
        self.head_since = None
        if self.current is None:
            self._start(exchange)
        else:
            self.pipeline.append(exchange)
            if len(self.pipeline) >= PIPELINE_HIGH_WATER:
                # A client pipelining faster than it is answered waits in its socket, not in
                # our memory (one read's worth of requests may still land past the mark).
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None or exchange.finished:
            return  # the app answered without reading: the rest of the body is dropped
        exchange.body.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > READ_HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        if exchange is None:
            return  # a WebSocket upgrade request
        self.parsing = None
        exchange.complete = True
        exchange.wake()
        if self.current is None and not self.pipeline and exchange.finished:
            if self._keeps(exchange):
                self._await_head()
            else:
                self.close()  # the body of an answer that closes, read out (`response_done`)

    # -- dispatch ------------------------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.current = exchange
        try:
            coroutine = self.app(exchange.scope, exchange.receive, exchange.send)
        except Exception as exc:
            coroutine = failing(exc)  # its task fails at once: `app_done` logs it and answers 500
        if coroutine is not None:  # None: the app answers from callbacks (see `RUN`)
            self._run(exchange, coroutine)

    def _run(self, exchange: Exchange, coroutine) -> None:
        self.task = task = self.loop.create_task(coroutine)
        task.add_done_callback(exchange.app_done)

    def response_done(self, exchange: Exchange) -> None:
        """The answer is written: the next pipelined request starts, or the connection closes."""
        if exchange is not self.current:
            return
        self.current = None
        exchange.wake()  # a receive() waiting for the disconnect: the request is over
        if not self._keeps(exchange):
            if exchange.complete or exchange.expect_continue:
                self.close()
            else:
                # Closed with the body still arriving, the kernel would answer its next bytes
                # with a reset, which can destroy the answer before the client reads it: the
                # rest is read and dropped first (`on_message_complete` closes; `timed_out` bounds
                # it). A client that expected 100-continue and was not told to send closes now.
                self.head_since = self.server.now
            return
        if self.pipeline:
            self._start(self.pipeline.pop(0))
        elif exchange.complete:
            self._await_head()
        else:
            self.head_since = self.server.now  # answered before its body arrived: see `timed_out`
        if self.reading_paused and len(self.pipeline) < PIPELINE_HIGH_WATER:
            self.resume_reading()

    def _keeps(self, exchange: Exchange) -> bool:
        """The connection stays open for another request after `exchange`."""
        return exchange.keep_alive and not self.closing

    def _await_head(self) -> None:
        self.head_started = False
        self.head_since = self.server.now

    def _upgraded(self, rest: bytes) -> None:
        scope = self.upgrade
        if scope is None:
            # Some other upgrade (h2c...): served as plain HTTP/1.1, then the connection closes.
            for exchange in (self.current, *self.pipeline):
                if exchange is not None:
                    exchange.keep_alive = False
            return
        if self.current is not None:
            self._refuse(400, "BAD_REQUEST", "WebSocket upgrade behind a pipelined request")
            return
        from bridgeway.serving.websocket import WebSocketSession

        self.flush()  # the answer before the upgrade goes first: the session writes directly
        self.ws = WebSocketSession(self, scope)
        self.ws.start(rest)


def _is_websocket(headers) -> bool:
    return any(name == b"upgrade" and value.lower() == b"websocket" for name, value in headers)


def _subprotocols(headers) -> list[str]:
    out = []
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            out.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
    return out


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:100]
