"""A lean HTTP/1.1 server: one asyncio.Protocol per connection, httptools (llhttp) parsing, one
task per request, no ASGI dictionaries on the way.

Why: under granian one request costs ~70 us of server machinery on one core (its Rust I/O
threads contend with the Python thread). Here the per-request path is: httptools callbacks
fill a `Request`, one task runs the handler, `Responder.send` writes the whole response in one
`transport.write`.

Layering:
  HttpServer    -- the listening socket, the set of connections, timeouts (one sweeper), shutdown
  HttpProtocol  -- one client connection: parser callbacks, keep-alive, pipelining, flow control
  Request       -- one request's head and its body (whole or streamed, with back-pressure)
  Responder     -- one response: `send` (one shot) or `start` / `write` / `end`; `abort`; `detach`
  Detached, tunnel -- after an Upgrade (101) or CONNECT, the raw client socket spliced to another

Disconnects: once the client is gone, `Request.disconnected` is True, `wait_disconnected()`
resolves, body reads raise `ClientGone`, and so does every write (`send`, `start`, `write`,
`end`). `ClientGone` escaping a handler is swallowed by the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from socket import socket
from typing import Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from bridgeway.errors import error_body
from bridgeway.observability.tracing import new_trace_id

__all__ = [
    "BodyTooLarge",
    "ClientGone",
    "Detached",
    "Handler",
    "HttpServer",
    "Limits",
    "Request",
    "RequestTimeout",
    "Responder",
    "serve",
    "tunnel",
]

log = logging.getLogger("bridgeway.http")


# ------------------------------------------------------------------------------ limits, errors


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits. Times in seconds; checked by one sweeper per server, so they
    fire within `min(1 s, shortest / 4)` of their deadline."""

    max_head_bytes: int = 64 * 1024  # request line + headers; more -> 431 and close
    header_timeout: float = 30.0  # from the first byte of a head to its end (slowloris)
    keepalive_timeout: float = 60.0  # idle between requests
    body_timeout: float = 60.0  # a handler waiting for the next body chunk -> 408
    send_timeout: float = 60.0  # the client not reading a response we write -> close
    linger_timeout: float = 5.0  # draining an unread request body after the response, before close
    body_high_water: int = 256 * 1024  # unconsumed request body buffered before pausing reads
    max_pipelined: int = 64  # requests queued behind the one being answered; more -> close

    def tick(self) -> float:
        shortest = min(
            self.header_timeout,
            self.keepalive_timeout,
            self.body_timeout,
            self.send_timeout,
            self.linger_timeout,
        )
        return max(0.01, min(1.0, shortest / 4))


class ClientGone(ConnectionError):
    """The client disconnected: nothing more can be read from it or sent to it."""


class BodyTooLarge(Exception):
    """The request body exceeds the limit the handler gave (answered 413 if it escapes)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class RequestTimeout(Exception):
    """The client stopped sending the request body (answered 408 if it escapes)."""


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the protocol's `_reject` says why."""


Handler = Callable[["Request", "Responder"], Awaitable[None]]

# ----------------------------------------------------------------------------- serialisation

_STATUS_LINES: Final = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in HTTPStatus}
_NO_BODY_STATUS: Final = frozenset((204, 304))
# Header names the server looks at in a response: content-length (14), transfer-encoding (17),
# connection and keep-alive (10). Comparing lengths first skips lower() for most headers.
_FRAMING_LENGTHS: Final = frozenset((10, 14, 17))
_METHODS: Final = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_COALESCE: Final = 64 * 1024  # bodies up to this size are copied behind the head: one write

_date_second = 0
_date_line = b""


def _date_header() -> bytes:
    """`date: ...\\r\\n`, formatted once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid status {status}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def _error_response(status: int, code: str, message: str) -> bytes:
    body = error_body(code, message, new_trace_id())
    return b"".join(
        (
            _status_line(status),
            _date_header(),
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        )
    )


# ------------------------------------------------------------------------------------ request


class Request:
    """One request: its head at once, its body read whole (`body`) or streamed (`stream`)."""

    __slots__ = (
        "method",
        "raw_path",
        "query",
        "headers",
        "client",
        "http_version",
        "keep_alive",
        "upgrade",
        "_conn",
        "_chunks",
        "_buffered",
        "_complete",
        "_waiter",
        "_error",
        "_continue_checked",
    )

    def __init__(self, conn: HttpProtocol) -> None:
        self.method = ""
        self.raw_path = b""  # the whole target until the head is complete, then the path alone
        self.query = b""
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased
        self.client = conn._client
        self.http_version = "1.1"
        self.keep_alive = True
        self.upgrade = False  # Upgrade + Connection: upgrade, or CONNECT: see Responder.detach
        self._conn = conn
        self._chunks: list[bytes] | None = None
        self._buffered = 0
        self._complete = False  # the parser saw the end of this message
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._continue_checked = False

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path!r}>"

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (`name` in lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content_length(self) -> int | None:
        value = self.header(b"content-length")
        return None if value is None else int(value)  # the parser already checked the digits

    @property
    def chunked(self) -> bool:
        return self.header(b"transfer-encoding") is not None  # the parser insists on a final chunked

    @property
    def body_done(self) -> bool:
        """The whole body was received and handed out."""
        return self._complete and not self._chunks

    @property
    def disconnected(self) -> bool:
        return self._conn._gone

    def wait_disconnected(self) -> asyncio.Future[None]:
        """A future resolved when the client disconnects (shared: do not cancel it)."""
        return self._conn._gone_future()

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body. Raises BodyTooLarge beyond `limit` bytes, ClientGone, RequestTimeout."""
        if limit is not None:
            length = self.content_length
            if length is not None and length > limit:
                raise BodyTooLarge(limit)
        if self._complete:  # usual for small bodies: they came with the head
            data = self._take() if self._chunks else b""
        else:
            parts = []
            size = 0
            while chunk := await self.read():
                size += len(chunk)
                if limit is not None and size > limit:
                    raise BodyTooLarge(limit)
                parts.append(chunk)
            data = b"".join(parts)
        if limit is not None and len(data) > limit:
            raise BodyTooLarge(limit)
        return data

    async def stream(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """The body chunk by chunk as it arrives; reading pauses while the consumer lags."""
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if limit is not None and size > limit:
                raise BodyTooLarge(limit)
            yield chunk

    async def read(self) -> bytes:
        """Everything buffered so far as one chunk, waiting if nothing is; b"" at the end."""
        while True:
            if self._chunks:
                return self._take()
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            conn = self._conn
            if not self._continue_checked:
                self._continue_checked = True
                conn._maybe_continue(self)
            loop = conn._loop
            waiter = self._waiter = loop.create_future()
            conn._deadline = loop.time() + conn._limits.body_timeout
            try:
                await waiter
            finally:
                self._waiter = None
                if conn._current is self:
                    conn._deadline = 0.0

    # -- fed by the connection ---------------------------------------------------------------

    def _take(self) -> bytes:
        chunks = cast(list[bytes], self._chunks)
        self._chunks = None
        self._buffered = 0
        conn = self._conn
        if conn._paused & _BODY:
            conn._resume(_BODY)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _feed(self, data: bytes) -> None:
        if self._chunks is None:
            self._chunks = [data]
        else:
            self._chunks.append(data)
        self._buffered += len(data)
        if self._waiter is not None:
            self._wake()
        if self._buffered > self._conn._limits.body_high_water:
            self._conn._pause(_BODY)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()


# ---------------------------------------------------------------------------------- responder

_NEW: Final = 0
_STARTED: Final = 1
_DONE: Final = 2


class Responder:
    """Writes one response. Either `send(status, headers, body)` (one write), or `start`, any
    number of `await write(chunk)`, then `end()`. Framing: a content-length header the handler
    gives is sent as is; `send` computes it; otherwise chunked (HTTP/1.1) or close-delimited
    (HTTP/1.0). The server owns Transfer-Encoding and Connection (`connection: close` from the
    handler is honoured). All writes raise ClientGone once the client is gone."""

    __slots__ = ("status", "_conn", "_req", "_state", "_chunked", "_remaining", "_no_body", "_keep_alive")

    def __init__(self, conn: HttpProtocol, req: Request) -> None:
        self.status = 0
        self._conn = conn
        self._req = req
        self._state = _NEW
        self._chunked = False
        self._remaining: int | None = None  # bytes still owed under a content-length
        self._no_body = False
        self._keep_alive = False

    @property
    def started(self) -> bool:
        return self._state != _NEW

    @property
    def finished(self) -> bool:
        return self._state == _DONE

    def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        """The whole response in one transport write."""
        if self._state != _NEW:
            raise RuntimeError("response already started")
        conn = self._conn
        if conn._gone:
            self._state = _DONE
            raise ClientGone
        head = self._head(status, headers, len(body))
        self._state = _DONE
        transport = conn.transport
        if not body or self._no_body:
            transport.write(head)
        elif len(body) <= _COALESCE:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        conn._response_done(self._req, self._keep_alive)

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the head now; the body follows with `write` and `end`. Status 101 sends the
        headers as given and expects `detach()` next."""
        if self._state != _NEW:
            raise RuntimeError("response already started")
        conn = self._conn
        if conn._gone:
            self._state = _DONE
            raise ClientGone
        if status == 101:
            if not self._req.upgrade:
                raise RuntimeError("101 answers an Upgrade request only")
            head = b"".join([_status_line(101), *[b"%s: %s\r\n" % h for h in headers], b"\r\n"])
            _check_head(head, len(headers) + 2)
            self.status = 101
            self._no_body = True
        else:
            head = self._head(status, headers, None)
        self._state = _STARTED
        conn.transport.write(head)

    async def write(self, chunk: bytes) -> None:
        """One body chunk; waits while the client's socket buffer is full."""
        if self._state != _STARTED:
            raise RuntimeError("write() needs start() first" if self._state == _NEW else "response finished")
        conn = self._conn
        if conn._gone:
            raise ClientGone
        n = len(chunk)
        if not n or self._no_body:
            return
        transport = conn.transport
        if self._chunked:
            if n <= _COALESCE:
                transport.write(b"%x\r\n%s\r\n" % (n, chunk))
            else:
                transport.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
        else:
            if self._remaining is not None:
                self._remaining -= n
                if self._remaining < 0:
                    self.abort()
                    raise ValueError("response body is longer than its content-length")
            transport.write(chunk)
        if conn._write_paused:
            await conn._drain()

    def end(self, body: bytes = b"") -> None:
        """The last of the body (may be empty); the response is complete."""
        if self._state != _STARTED:
            raise RuntimeError("end() needs start() first" if self._state == _NEW else "response finished")
        conn = self._conn
        if conn._gone:
            self._state = _DONE
            raise ClientGone
        if self.status == 101:
            raise RuntimeError("a 101 response is followed by detach(), not end()")
        transport = conn.transport
        if self._no_body:
            pass
        elif self._chunked:
            if body:
                transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            else:
                transport.write(_LAST_CHUNK)
        else:
            if body:
                transport.write(body)
            if self._remaining is not None and self._remaining != len(body):
                self.abort()
                raise ValueError("response body length does not match its content-length")
        self._state = _DONE
        conn._response_done(self._req, self._keep_alive)

    def abort(self) -> None:
        """Cut the response: the connection is closed at once, the client sees a truncated body.
        No-op once the response has finished."""
        if self._state == _DONE:
            return
        self._state = _DONE
        self._conn._abort()

    def detach(self) -> Detached:
        """Take the raw client connection after an Upgrade or CONNECT request: after `start(101,
        ...)`, or before any response when the caller writes the head itself. The server forgets
        the connection; pass the result to `tunnel()` (or `Detached.switch`)."""
        req = self._req
        if not req.upgrade:
            raise RuntimeError("detach() needs an Upgrade or CONNECT request")
        if self._state == _DONE or (self._state == _STARTED and self.status != 101):
            raise RuntimeError("response already sent")
        conn = self._conn
        if conn._gone:
            raise ClientGone
        self._state = _DONE
        return conn._detach()

    # -- internals ------------------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], body_len: int | None) -> bytes:
        """Serialise the head; settle framing and keep-alive. `body_len` is known for `send`."""
        req = self._req
        self.status = status
        self._no_body = self._chunked = False
        self._remaining = None
        parts = [_status_line(status), _date_header()]
        append = parts.append
        length: bytes | None = None
        close = False
        for header in headers:
            name = header[0]
            if len(name) in _FRAMING_LENGTHS:
                lname = name.lower()
                if lname == b"content-length":
                    length = header[1]
                elif lname == b"connection":
                    close = b"close" in header[1].lower()
                    continue
                elif lname == b"transfer-encoding" or lname == b"keep-alive":
                    continue
            append(b"%s: %s\r\n" % header)
        # An unread body, an Upgrade answered normally or a closing server end the connection.
        keep_alive = (
            req.keep_alive and not close and req._complete and not req.upgrade and not self._conn._closing
        )
        if status < 200 or status in _NO_BODY_STATUS:
            self._no_body = True
        elif req.method == "HEAD":
            self._no_body = True
            if length is None and body_len:
                append(b"content-length: %d\r\n" % body_len)  # given the GET body: announce its size
        elif length is not None:
            if body_len is None:
                self._remaining = int(length)
            elif int(length) != body_len:
                raise ValueError("content-length header does not match the body")
        elif body_len is not None:
            append(b"content-length: %d\r\n" % body_len)
        elif req.http_version == "1.1":
            self._chunked = True
            append(b"transfer-encoding: chunked\r\n")
        else:
            keep_alive = False  # HTTP/1.0 without a length: the end of the body is the close
        if not keep_alive:
            append(b"connection: close\r\n")
        elif req.http_version == "1.0":
            append(b"connection: keep-alive\r\n")
        append(b"\r\n")
        self._keep_alive = keep_alive
        head = b"".join(parts)
        _check_head(head, len(parts))
        return head


def _check_head(head: bytes, lines: int) -> None:
    # One CR and one LF per line: a CR or LF inside a name or value would split the response.
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("CR or LF in a response header")


# ---------------------------------------------------------------------------------- connection

# Reasons reading from the client is paused (bits): the handler lags behind the body; requests
# are queued behind the one being answered; an upgrade waits for its tunnel; a parse error.
_BODY: Final = 1
_PIPELINE: Final = 2
_UPGRADE: Final = 4
_STOPPED: Final = 8


class HttpProtocol(asyncio.Protocol):
    """One client connection. Parser callbacks build requests; the first complete head becomes
    the current request (its handler runs in a task), later ones queue until it is answered."""

    __slots__ = (
        "_server",
        "_loop",
        "_limits",
        "transport",
        "_parser",
        "_client",
        # requests
        "_parsing",
        "_in_head",
        "_head_bytes",
        "_current",
        "_responder",
        "_pipeline",
        "_task",
        "_reject",
        # connection state
        "_paused",
        "_write_paused",
        "_drain_waiter",
        "_deadline",
        "_write_deadline",
        "_closing",
        "_lingering",
        "_gone",
        "_gone_waiter",
        "_early",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server._loop
        self._limits = server.limits
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self._parser = HttpRequestParser(self)
        self._client: tuple[str, int] = ("", 0)
        self._parsing: Request | None = None  # the message the parser is in
        self._in_head = False
        self._head_bytes = 0
        self._current: Request | None = None  # the request being answered
        self._responder: Responder | None = None
        self._pipeline: deque[Request] | None = None  # complete heads waiting their turn
        self._task: asyncio.Task[None] | None = None
        self._reject: tuple[int, str, str] | None = None
        self._paused = 0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # read side: head, keep-alive idle, body wait, linger (0 = none)
        self._write_deadline = 0.0  # the client not reading (0 = none)
        self._closing = False  # no request after the current one
        self._lingering = False
        self._gone = False
        self._gone_waiter: asyncio.Future[None] | None = None
        self._early: bytes | None = None  # bytes after an upgrade head, held for the tunnel

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._client = (peer[0], peer[1])
        self._deadline = self._loop.time() + self._limits.header_timeout
        server = self._server
        server._conns.add(self)
        if server._closing:
            self._closing = True
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._early is not None:  # upgraded: the bytes belong to the tunnel (reading is paused)
            self._early += data
            return
        if self._lingering:
            return
        if self._in_head or self._parsing is None:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._early = data[exc.args[0] :]
            self._pause(_UPGRADE)
            return
        except HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self._in_head and self._head_bytes > self._limits.max_head_bytes:
            self._fail_head(431, "HEADERS_TOO_LARGE", "request headers are too large")

    def eof_received(self) -> bool | None:
        # A client that half-closes is treated as gone (as nginx does): close, which calls
        # connection_lost and tells a handler still running.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._deadline = self._write_deadline = 0.0
        self._server._forget(self)
        for req in (self._current, self._parsing):
            if req is not None:
                req._fail(ClientGone("client disconnected"))
        self._pipeline = None
        self._wake_drain()
        waiter = self._gone_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_deadline = self._loop.time() + self._limits.send_timeout

    def resume_writing(self) -> None:
        self._write_paused = False
        self._write_deadline = 0.0
        self._wake_drain()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request(self)
        self._in_head = True
        if self._current is None:
            self._deadline = self._loop.time() + self._limits.header_timeout

    def on_url(self, url: bytes) -> None:
        req = cast(Request, self._parsing)
        req.raw_path += url  # llhttp may call this several times for one target

    def on_header(self, name: bytes, value: bytes) -> None:
        cast(Request, self._parsing).headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = cast(Request, self._parsing)
        self._in_head = False
        limits = self._limits
        # The byte count includes whatever followed the head in the same reads: measure exactly
        # only when the cheap count is over the limit.
        if self._head_bytes > limits.max_head_bytes and _head_size(req) > limits.max_head_bytes:
            self._reject = (431, "HEADERS_TOO_LARGE", "request headers are too large")
            raise _Reject
        self._head_bytes = 0
        parser = self._parser
        method = parser.get_method()
        req.method = _METHODS.get(method) or method.decode("ascii")
        target = req.raw_path
        if target[:1] == b"/":  # origin-form, the usual case
            req.raw_path, _, req.query = target.partition(b"?")
        elif req.method != "CONNECT" and target != b"*":  # absolute-form
            url = parse_url(target)
            req.raw_path = url.path or b"/"
            req.query = url.query or b""
        req.http_version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        if self._current is None:
            self._dispatch(req)
            return
        pipeline = self._pipeline
        if pipeline is None:
            pipeline = self._pipeline = deque()
        if len(pipeline) >= limits.max_pipelined:
            self._closing = True  # answer what is queued, then close
            raise _Reject
        pipeline.append(req)
        self._pause(_PIPELINE)

    def on_body(self, body: bytes) -> None:
        cast(Request, self._parsing)._feed(body)

    def on_message_complete(self) -> None:
        req = cast(Request, self._parsing)
        self._parsing = None
        req._complete = True
        if req._waiter is not None:
            req._wake()

    # -- requests ------------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        self._current = req
        resp = self._responder = Responder(self, req)
        self._deadline = 0.0
        self._task = self._loop.create_task(self._run(req, resp))

    async def _run(self, req: Request, resp: Responder) -> None:
        try:
            await self._server.handler(req, resp)
        except ClientGone:
            resp._state = _DONE
        except BodyTooLarge as exc:
            self._answer_error(resp, 413, "BODY_TOO_LARGE", str(exc))
        except RequestTimeout:
            self._answer_error(resp, 408, "REQUEST_TIMEOUT", "the request body did not arrive in time")
        except asyncio.CancelledError:
            resp.abort()
            raise
        except Exception:
            log.exception("handler failed: %s %s", req.method, req.raw_path[:200])
            self._answer_error(resp, 500, "INTERNAL", "internal error")
        else:
            if resp._state == _STARTED:
                resp.abort()  # returned mid-body: the client must see a cut, not an end
            elif resp._state == _NEW:
                log.error("handler returned without responding: %s %s", req.method, req.raw_path[:200])
                self._answer_error(resp, 500, "INTERNAL", "internal error")

    def _answer_error(self, resp: Responder, status: int, code: str, message: str) -> None:
        if resp._state == _NEW and not self._gone:
            body = error_body(code, message, new_trace_id())
            resp.send(status, [(b"content-type", b"application/json")], body)
        else:
            resp.abort()

    def _response_done(self, req: Request, keep_alive: bool) -> None:
        """The response is written: serve the next queued request, wait for one, or close."""
        self._current = None
        self._responder = None
        if not keep_alive or self._closing:
            if not req._complete:
                self._linger()
            else:
                self._close()
            return
        pipeline = self._pipeline
        if pipeline:
            self._dispatch(pipeline.popleft())
            if not pipeline:
                self._resume(_PIPELINE)
            return
        self._deadline = self._loop.time() + (
            self._limits.header_timeout if self._in_head else self._limits.keepalive_timeout
        )

    def _maybe_continue(self, req: Request) -> None:
        """Answer `Expect: 100-continue` once the handler asks for a body not yet arriving."""
        resp = self._responder
        if (
            req is self._current
            and resp is not None
            and resp._state == _NEW
            and req.http_version == "1.1"
            and (req.header(b"expect") or b"").lower() == b"100-continue"
        ):
            self.transport.write(_CONTINUE)

    # -- errors, closing -------------------------------------------------------------------------

    def _parse_failed(self, exc: HttpParserError) -> None:
        self._parsing = None
        self._in_head = False
        if self._current is not None or self._pipeline:
            # Answer what is in progress in order, then close; the bad bytes are dropped.
            self._closing = True
            self._pause(_STOPPED)
            return
        status, code, message = self._reject or (400, "BAD_REQUEST", "malformed HTTP request")
        self._fail_head(status, code, message)

    def _fail_head(self, status: int, code: str, message: str) -> None:
        """Refuse a request before its handler runs: answer, then close."""
        self._parsing = None
        self._in_head = False
        if self._current is not None or self._pipeline:
            self._closing = True
            self._pause(_STOPPED)
            return
        self.transport.write(_error_response(status, code, message))
        self._linger()

    def _close(self) -> None:
        self._closing = True
        self.transport.close()

    def _linger(self) -> None:
        """Close after a response while the client may still be sending: stop writing (FIN),
        read and drop what still comes for a while, so the client reads our answer instead of
        a reset, then close."""
        self._closing = True
        self._lingering = True
        self._pipeline = None
        transport = self.transport
        if self._paused:
            self._paused = 0
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._deadline = self._loop.time() + self._limits.linger_timeout

    def _abort(self) -> None:
        self._closing = True
        self._current = None
        self._responder = None
        self.transport.abort()

    def _expire(self, now: float) -> None:
        """A deadline passed (called by the server's sweeper)."""
        if 0.0 < self._write_deadline <= now:
            self.transport.abort()  # the client stopped reading what we send
            return
        self._deadline = 0.0
        current = self._current
        if current is not None:
            if current._waiter is not None:
                current._fail(RequestTimeout())
        elif self._lingering:
            self.transport.abort()
        elif self._parsing is None:
            self.transport.close()  # idle keep-alive connection
        else:
            self._fail_head(408, "REQUEST_TIMEOUT", "the request head did not arrive in time")

    def _shutdown(self) -> None:
        """The server is closing: close now if idle, else after the current response."""
        self._closing = True
        if self._current is None and self._parsing is None:
            self.transport.close()

    # -- flow control ------------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and not self._gone:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._gone:
                self.transport.resume_reading()

    async def _drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter
        if self._gone:
            raise ClientGone("client disconnected")

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _gone_future(self) -> asyncio.Future[None]:
        waiter = self._gone_waiter
        if waiter is None or waiter.cancelled():
            waiter = self._gone_waiter = self._loop.create_future()
            if self._gone:
                waiter.set_result(None)
        return waiter

    def _detach(self) -> Detached:
        self._server._forget(self)
        self._current = None
        self._responder = None
        self._deadline = self._write_deadline = 0.0
        early = self._early or b""
        self._early = b""  # anything more that arrives before the switch is kept too
        return Detached(self, early)


def _head_size(req: Request) -> int:
    return len(req.raw_path) + sum(len(name) + len(value) + 4 for name, value in req.headers)


# ------------------------------------------------------------------------------------ tunnels


class Detached:
    """A client connection handed over by `Responder.detach()`. Reading is paused until
    `switch()` installs another protocol (`tunnel()` does it for you)."""

    __slots__ = ("transport", "early", "_conn")

    def __init__(self, conn: HttpProtocol, early: bytes) -> None:
        self.transport = conn.transport
        self.early = early  # bytes the client sent after the upgrade head
        self._conn = conn

    def switch(self, protocol: asyncio.Protocol) -> None:
        """Install `protocol` on the client transport, replay the early bytes, resume reading."""
        conn = self._conn
        early = self.early + (conn._early or b"")
        self.early = conn._early = b""
        self.transport.set_protocol(protocol)
        if conn._gone:  # lost before the switch: tell the new protocol
            protocol.connection_lost(None)
            return
        if early:
            protocol.data_received(early)
        self.transport.resume_reading()


class _Pipe(asyncio.Protocol):
    """One side of a tunnel: what its transport reads, the peer's transport writes. A full
    write buffer on one side pauses reading on the other."""

    __slots__ = ("transport", "peer", "eof", "closed", "_done")

    def __init__(self, transport: asyncio.Transport, done: Callable[[], None]) -> None:
        self.transport = transport
        self.peer: _Pipe = None  # type: ignore[assignment]  # paired by tunnel()
        self.eof = False
        self.closed = False
        self._done = done

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        peer = self.peer.transport
        if self.peer.eof or not peer.can_write_eof():
            peer.close()
            return None
        peer.write_eof()  # half-close: the other direction keeps flowing
        return True

    def pause_writing(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:  # tunnel() may report a loss that happened before the switch
            return
        self.closed = True
        self.peer.transport.close()
        self._done()


async def tunnel(client: Detached, upstream: asyncio.Transport, upstream_early: bytes = b"") -> None:
    """Splice a detached client connection and an upstream transport until both are closed.

    `upstream` is a connection the caller opened and whose response head (the 101) it read;
    pause its reading once the head is in and pass the bytes that followed the head as
    `upstream_early`. Cancelling the call aborts both sides."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    open_sides = 2

    def side_done() -> None:
        nonlocal open_sides
        open_sides -= 1
        if open_sides == 0 and not finished.done():
            finished.set_result(None)

    server = client._conn._server
    down = _Pipe(client.transport, side_done)
    up = _Pipe(upstream, side_done)
    down.peer, up.peer = up, down
    server._tunnels.add(client.transport)
    try:
        upstream.set_protocol(up)
        if upstream.is_closing():
            up.connection_lost(None)
        elif upstream_early:
            client.transport.write(upstream_early)
        client.switch(down)  # replays the client's early bytes upstream
        upstream.resume_reading()
        await finished
    except BaseException:
        client.transport.abort()
        upstream.abort()
        raise
    finally:
        server._tunnels.discard(client.transport)
        server._forget(None)


# ------------------------------------------------------------------------------------- server


class HttpServer:
    """The listening socket and its connections. `close()` stops accepting, closes idle
    connections and lets in-flight requests finish until the grace period ends."""

    def __init__(self, handler: Handler, limits: Limits | None = None) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self._loop = asyncio.get_running_loop()
        self._conns: set[HttpProtocol] = set()
        self._tunnels: set[asyncio.BaseTransport] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._force: asyncio.TimerHandle | None = None
        self._closing = False
        self._all_gone: asyncio.Future[None] | None = None

    async def listen(
        self, host: str | None, port: int | None, *, sock: socket | None, reuse_port: bool, backlog: int
    ) -> None:
        self._server = await self._loop.create_server(
            lambda: HttpProtocol(self), host, port, sock=sock, reuse_port=reuse_port or None, backlog=backlog
        )
        self._sweeper = self._loop.call_later(self.limits.tick(), self._sweep)

    @property
    def sockets(self) -> tuple[socket, ...]:
        return tuple(self._server.sockets) if self._server else ()

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._conns)

    def close(self, grace: float = 30.0) -> None:
        """Stop accepting; close idle connections now, busy ones after their response, and
        abort whatever is left (connections, tunnels, handler tasks) after `grace` seconds."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn._shutdown()
        self._force = self._loop.call_later(grace, self._force_close)

    async def wait_closed(self) -> None:
        """Wait until every connection and tunnel has ended (call close() first)."""
        if self._conns or self._tunnels:
            self._all_gone = self._loop.create_future()
            await self._all_gone
        if self._server is not None:
            await self._server.wait_closed()
        for handle in (self._sweeper, self._force):
            if handle is not None:
                handle.cancel()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    # -- internals -----------------------------------------------------------------------------

    def _forget(self, conn: HttpProtocol | None) -> None:
        if conn is not None:
            self._conns.discard(conn)
        waiter = self._all_gone
        if waiter is not None and not self._conns and not self._tunnels and not waiter.done():
            waiter.set_result(None)

    def _sweep(self) -> None:
        """One timer for all connections: a deadline is a float compare per connection per tick,
        instead of a timer handle created and cancelled per request."""
        now = self._loop.time()
        expired = [c for c in self._conns if 0.0 < c._deadline <= now or 0.0 < c._write_deadline <= now]
        for conn in expired:
            conn._expire(now)
        self._sweeper = self._loop.call_later(self.limits.tick(), self._sweep)

    def _force_close(self) -> None:
        for conn in list(self._conns):
            if conn._task is not None and not conn._task.done():
                conn._task.cancel()
            conn.transport.abort()
        for transport in list(self._tunnels):
            transport.abort()


async def serve(
    handler: Handler,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    *,
    sock: socket | None = None,
    reuse_port: bool = False,
    backlog: int = 2048,
    limits: Limits | None = None,
) -> HttpServer:
    """Listen and serve `handler` for every request. With `sock`, host and port are ignored."""
    server = HttpServer(handler, limits)
    if sock is not None:
        host = port = None
    await server.listen(host, port, sock=sock, reuse_port=reuse_port, backlog=backlog)
    return server
