"""Hot-path upstream HTTP/1.1 client: keep-alive pool -> connection (asyncio.Protocol) -> response.

Why our own client: on this machine a granian proxy built on aiohttp's client reaches ~13% of
nginx's proxy throughput and httpx ~1.5%; the time goes into per-request machinery, not I/O.
This client keeps the per-request path to: pop an idle connection (O(1) LIFO stack), one write,
one future for the response head, httptools (llhttp, C) callbacks filling a response object.

Layering:
  UpstreamPool      -- one origin; idle stack, FIFO waiters, max_connections, idle expiry, retry
  _Connection       -- one socket; asyncio.Protocol feeding httptools.HttpResponseParser
  UpstreamResponse  -- status/headers at once; body buffered or streamed with back-pressure

TLS: a pool made with `ssl=` (an `ssl.SSLContext`) speaks HTTPS, SNI and certificate checks for
`host` (LLM providers are HTTPS). asyncio does the TLS in its transport, so nothing on the request
path changes; a plain pool passes `ssl=None`, as before.

A connection goes back to the pool by itself the moment its response is fully received (the body
is then held by the response object), so the connection is reusable while the proxy is still
sending the response downstream. `UpstreamResponse.release()` only has work to do when the body
was not fully received: it closes the connection (a half-read connection is never reused).
"""

from __future__ import annotations

import asyncio
import functools
import math
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Final

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from bridgeway.serving.outbox import HeldWrites, outbox

__all__ = [
    "Sent",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "default_ssl_context",
]

# Pause reading from the upstream socket when this much response body is buffered and not yet
# consumed; resume as soon as the consumer takes it. Bounds memory per streamed response.
HIGH_WATER: Final = 256 * 1024
# Bytes bodies up to this size are copied into the head buffer: one write, one syscall.
_COALESCE_BODY: Final = 64 * 1024
# Methods whose empty body is still announced with "Content-Length: 0".
_BODY_METHODS: Final = frozenset((b"POST", b"PUT", b"PATCH"))
_NO_BODY_STATUS: Final = frozenset((204, 304))
_FRAMING_LENGTHS: Final = frozenset((len(b"host"), len(b"content-length"), len(b"transfer-encoding")))
# A timer may run up to a clock tick early (uvloop counts whole milliseconds); asyncio's own
# loop treats what is due within its clock resolution as due, and so does the head timer.
_CLOCK_SLACK: Final = 0.001
_HEAD_END: Final = (b"", b"")  # joined with CRLF: the last line's CRLF and the blank line

# Connection states.
_BUSY: Final = 0
_IDLE: Final = 1
_CLOSED: Final = 2


# --------------------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    """Base of all upstream failures. Messages name the origin, never request headers/targets."""

    code: str = "UPSTREAM_ERROR"

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        # False only when no byte of the request reached the socket: safe to retry any method.
        self.request_sent = request_sent


class UpstreamConnectError(UpstreamError):
    code = "UPSTREAM_CONNECT"

    def __init__(self, message: str, *, request_sent: bool = False) -> None:
        super().__init__(message, request_sent=request_sent)


class UpstreamTimeout(UpstreamError):
    code = "UPSTREAM_TIMEOUT"


class UpstreamProtocolError(UpstreamError):
    code = "UPSTREAM_PROTOCOL"


class UpstreamClosed(UpstreamError):
    code = "UPSTREAM_CLOSED"

    def __init__(self, message: str, *, request_sent: bool = True, stale: bool = False) -> None:
        super().__init__(message, request_sent=request_sent)
        # True when the connection died before any response byte arrived: the signature of a
        # keep-alive connection the server had already closed (candidate for a transparent retry).
        self.stale = stale


# ------------------------------------------------------------------------------------- response


class UpstreamResponse:
    """Status and headers of an upstream response; the body buffered or streamed.

    `complete` is True once the upstream has sent the whole body; everything not yet consumed
    is then buffered here, so `await read()` returns without waiting (send it in one message).
    """

    __slots__ = (
        "status",
        "headers",
        "keep_alive",
        "complete",
        "_conn",
        "_chunks",
        "_buffered",
        "_waiter",
        "_error",
        "read_timeout",
    )

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        conn: _Connection,
        read_timeout: float | None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self.complete = False
        self._conn: _Connection | None = conn  # set to None once the connection is no longer ours
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        # Idle limit while waiting for each body chunk; the caller may change it after the head.
        self.read_timeout = read_timeout

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} complete={self.complete}>"

    def body(self) -> bytes:
        """The whole (remaining) body of a `complete` response, without an await: the proxy's
        common case, where a coroutine for `read()` would be made only to return at once."""
        chunks = self._chunks
        self._chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self) -> bytes:
        """The whole (remaining) body. Meant for small bodies; use `async for` to stream."""
        if self.complete:
            return self.body()
        parts = [chunk async for chunk in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        # Yields everything buffered so far as one chunk (fewer downstream sends), then waits.
        while True:
            if self._chunks:
                return self._take()
            if self.complete:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            conn = self._conn
            if conn is None:  # released by the caller while iterating
                raise UpstreamClosed("response released before the body was read")
            loop = conn._loop
            waiter = self._waiter = loop.create_future()
            timeout = self.read_timeout
            timer = None if timeout is None else loop.call_at(loop.time() + timeout, self._on_timeout)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()

    def release(self) -> None:
        """Give the connection back. Idempotent; call it in a `finally`.

        A fully received response has already returned its connection to the pool, so this is a
        no-op then; otherwise (abandoned, cancelled, failed mid-body) the connection is closed.
        """
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()

    # -- internals, driven by _Connection -------------------------------------------------------

    def _take(self) -> bytes:
        chunks = self._chunks
        self._chunks = []
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn._reading_paused:
            conn._resume_reading()
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self._error = error
        self._conn = None
        self._wake()

    def _on_timeout(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self.complete:
            return
        conn = self._conn
        self._fail(UpstreamTimeout("upstream read timed out between body chunks"))
        if conn is not None:
            conn.abort()


# ----------------------------------------------------------------------------------- connection


class _Connection(HeldWrites, asyncio.Protocol):
    """One keep-alive socket to the origin. Parser callbacks build the current response."""

    __slots__ = (
        "_pool",
        "_loop",
        "transport",
        "outbox",
        "held",
        "_parser",
        "_state",
        "reused",
        "idle_since",
        # per request
        "_head_fut",
        "_resp",
        "_headers",
        "_read_timeout",
        "_is_head",
        "_got_data",
        "_req_done",
        "_keep_alive",
        "_eof_body",
        "_reset_parser",
        "_stray",
        # flow control
        "_write_paused",
        "_drain_fut",
        "_reading_paused",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool._loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.outbox = outbox(self._loop)  # every write goes through it (`HeldWrites`)
        self.held: list[bytes] | None = None
        self._parser = HttpResponseParser(self)
        self._state = _BUSY
        self.reused = False
        self.idle_since = 0.0
        self._head_fut: asyncio.Future[UpstreamResponse] | None = None
        self._resp: UpstreamResponse | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._read_timeout: float | None = None
        self._is_head = False
        self._got_data = False
        self._req_done = False
        self._keep_alive = False
        self._eof_body = False
        self._reset_parser = False
        self._stray = False
        self._write_paused = False
        self._drain_fut: asyncio.Future[None] | None = None
        self._reading_paused = False

    # -- request side -----------------------------------------------------------------------------

    def begin(
        self, is_head: bool, read_timeout: float | None, req_done: bool
    ) -> asyncio.Future[UpstreamResponse]:
        """Arm the connection for one request; returns the future of the response head."""
        fut = self._head_fut = self._loop.create_future()
        if self._headers:  # trailers of the previous response landed here
            self._headers = []
        self._is_head = is_head
        self._read_timeout = read_timeout
        self._got_data = False
        self._req_done = req_done
        self._eof_body = False
        return fut

    async def drain(self, timeout: float | None) -> None:
        """Wait until the transport's write buffer is below its high-water mark (or the
        connection is gone / the response head arrived -- the caller re-checks). An upstream
        that stops reading for `timeout` seconds fails with UpstreamTimeout."""
        if not self._write_paused or self._state == _CLOSED:
            return
        loop = self._loop
        fut = self._drain_fut = loop.create_future()
        timer = None if timeout is None else loop.call_at(loop.time() + timeout, _expire_drain, fut)
        try:
            await fut
        finally:
            self._drain_fut = None
            if timer is not None:
                timer.cancel()

    def abort(self) -> None:
        """Close now and never reuse. Idempotent.

        A response still streaming from this connection fails (its reader wakes up); the head
        future is left to its owner, who is the one closing the connection in that phase."""
        state = self._state
        if state == _CLOSED:
            return
        self._state = _CLOSED
        pool = self._pool
        if state == _IDLE:
            pool._idle.remove(self)  # rare (expiry/server close): O(max_idle) is fine
        self._head_fut = None
        resp = self._resp
        if resp is not None:
            self._resp = None
            if resp._error is None and not resp.complete:
                resp._fail(UpstreamClosed("upstream connection closed before the body was complete"))
        self._wake_drain()
        if self.transport is not None:
            self.transport.abort()  # abort, not close: never flush half a request body
        pool._conn_closed(self)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_data = True
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            self._protocol_error("upstream switched protocols unexpectedly")
            return
        except HttpParserError as exc:
            self._protocol_error(f"invalid HTTP response from upstream: {exc}")
            return
        if self._stray:  # bytes nobody asked for: the connection is out of sync
            self._protocol_error("unexpected data from upstream")
        elif self._reset_parser:
            # HEAD: llhttp cannot be told to skip the announced body, so start a fresh parser.
            self._reset_parser = False
            self._parser = HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        fut = self._head_fut
        if fut is not None and not fut.done():
            if self._got_data:
                err = UpstreamClosed("upstream closed the connection while sending the response head")
            else:
                err = UpstreamClosed("upstream closed the connection before responding", stale=True)
            fut.set_exception(err)
        resp = self._resp
        if resp is not None and not resp.complete:
            if self._eof_body and exc is None:
                # Body delimited by connection close: a clean EOF is its normal end.
                self._resp = None
                resp.complete = True
                resp._conn = None
                resp._wake()
            else:
                resp._fail(UpstreamClosed("upstream closed the connection before the body was complete"))
        self.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            # 1xx (e.g. 100 Continue) is informational: drop it and wait for the real head
            # (its on_message_complete finds no response and is ignored). 101 makes the parser
            # raise HttpParserUpgrade right after this callback.
            self._headers = []
            return
        fut = self._head_fut
        if fut is None:
            self._stray = True
            return
        self._head_fut = None
        keep_alive = self._keep_alive = parser.should_keep_alive()
        headers = self._headers
        # The response owns `headers` now; trailers (and the next head) go to a fresh list.
        self._headers = []
        resp = self._resp = UpstreamResponse(status, headers, keep_alive, self, self._read_timeout)
        if self._is_head:
            self._reset_parser = True
            self._finish()
        elif not keep_alive:
            self._eof_body = status not in _NO_BODY_STATUS and _reads_until_eof(headers)
        if not fut.done():
            fut.set_result(resp)
        if self._drain_fut is not None:
            self._wake_drain()  # an early response stops a body upload

    def on_body(self, body: bytes) -> None:
        resp = self._resp
        if resp is None:  # HEAD body we decided to skip, or stray bytes
            return
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._waiter is not None:
            resp._wake()
        if resp._buffered > HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        # No response here means a 1xx, a HEAD response already finished, or stray bytes.
        if self._resp is not None:
            self._finish()

    # -- internals --------------------------------------------------------------------------------

    def _finish(self) -> None:
        """The response is fully received: hand the connection back (or close it)."""
        resp = self._resp
        self._resp = None
        if resp is not None:
            resp.complete = True
            resp._conn = None
            if resp._waiter is not None:
                resp._wake()
        if self._keep_alive and self._req_done and self._state == _BUSY:
            if self._reading_paused:
                self._resume_reading()
            self.reused = True
            self._pool._release(self)
        else:
            self.abort()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._state != _CLOSED:
            self.transport.resume_reading()

    def _wake_drain(self) -> None:
        fut = self._drain_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _protocol_error(self, message: str) -> None:
        self._fail_all(UpstreamProtocolError(message))

    def _fail_all(self, err: UpstreamError) -> None:
        """Fail whoever waits on this connection with `err`, then close it."""
        fut = self._head_fut
        if fut is not None and not fut.done():
            fut.set_exception(err)
        resp = self._resp
        if resp is not None and not resp.complete:
            resp._fail(err)
        self.abort()


def _reads_until_eof(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when the body is delimited by connection close (no Content-Length, not chunked).

    Only called for responses the parser already said cannot keep the connection alive."""
    has_length = False
    te: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            has_length = True
        elif lname == b"transfer-encoding":
            te = value
    if te is not None:
        return not te.rstrip().lower().endswith(b"chunked")
    return not has_length


# ----------------------------------------------------------------------------------------- pool


class Sent:
    """A request `UpstreamPool.send_now` wrote: its connection, and the future of its head."""

    __slots__ = ("conn", "head")

    def __init__(self, conn: _Connection, head: asyncio.Future[UpstreamResponse]) -> None:
        self.conn = conn
        self.head = head


@functools.cache
def default_ssl_context() -> _ssl.SSLContext:
    """The system's trusted CAs, hostname checks on, HTTP/1.1 offered by ALPN. One per process:
    building a context loads the CA bundle, which takes milliseconds."""
    context = _ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamPool:
    """Keep-alive connections to one origin (host, port).

    Idle connections form a LIFO stack (the hottest socket is reused; the coldest expire at the
    bottom), waiters a FIFO queue; every operation is O(1) per request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 512,
        max_idle: int = 128,
        idle_timeout: float = 60.0,
        connect_timeout: float = 5.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.host = host
        self.port = port
        self.ssl = ssl
        # SNI and the certificate check use the host name (the connect timeout bounds the handshake).
        self._server_hostname = host if ssl is not None else None
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use
        self._idle: deque[_Connection] = deque()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._n_waiting = 0
        self._open = 0  # connections alive or being connected (slots in use)
        self._conns: set[_Connection] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Response heads awaited, by deadline, under one timer armed for the earliest: a loop
        # timer made and cancelled per request cost ~6k instructions on uvloop.
        self._head_due: dict[asyncio.Future[UpstreamResponse], float] = {}
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_timer_at = math.inf
        self._closed = False
        authority = f"[{host}]" if ":" in host else host
        self._origin = f"{authority}:{port}"
        # HTTPS on its default port is named without it, as browsers and SDKs do.
        host_value = authority if ssl is not None and port == 443 else self._origin
        self._host_header = b"Host: " + host_value.encode("ascii")

    def __repr__(self) -> str:
        return f"<UpstreamPool {self._origin} {self.stats}>"

    @property
    def stats(self) -> dict[str, int]:
        idle = len(self._idle)
        return {"open": self._open, "idle": idle, "busy": self._open - idle, "waiting": self._n_waiting}

    # -- the request ------------------------------------------------------------------------------

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] = b"",
        *,
        read_timeout: float | None = None,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        The caller must call `release()` on the response (in a `finally`)."""
        if type(body) is bytes or isinstance(body, (bytearray, memoryview)):
            head = self._head(method, target, headers, len(body), None)
            if body and len(body) <= _COALESCE_BODY:
                head += body
                body = b""
            stream = None
        else:
            stream = body
            head = self._head(method, target, headers, content_length, content_length is None)
            body = b""
        is_head = method == b"HEAD"

        retried = False
        while True:
            # The hottest idle connection first; a retry prefers a new one (`_acquire(fresh)`).
            conn = None if retried else self._take_idle()
            if conn is None:
                try:
                    conn = await self._acquire(fresh=retried)
                except UpstreamConnectError as exc:
                    exc.request_sent = retried  # on the retry, the first attempt's bytes were sent
                    raise
            fut = conn.begin(is_head, read_timeout, stream is None)
            try:
                conn.write(head)
                if body:
                    conn.write(body)
                if stream is not None:
                    await self._send_stream(conn, fut, stream, content_length, read_timeout)
                if read_timeout is None:
                    return await fut
                # The pool's one head timer instead of asyncio.wait_for (no extra task) or a timer
                # per request; awaited here, not in a helper coroutine: one await level less to
                # pass on the resume.
                self._time_head(fut, read_timeout)
                try:
                    return await fut
                finally:
                    self._head_due.pop(fut, None)
            except UpstreamClosed as exc:
                conn.abort()
                # A reused keep-alive connection the server had closed: nothing of the response
                # arrived, and a bytes body can be sent again, so retry once on a new connection.
                if exc.stale and conn.reused and stream is None and not retried:
                    retried = True
                    continue
                raise
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # Head already in (we were cancelled while resuming): the response owns the
                    # connection now; release() closes it unless it was fully received.
                    fut.result().release()
                else:
                    conn.abort()
                raise

    def send_now(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], read_timeout: float
    ) -> Sent | None:
        """`request` without a coroutine, for a request with no body: written at once on the
        hottest idle connection, or None when there is none (the caller then awaits `request`).
        The caller waits on `Sent.head` (a future, timed out after `read_timeout`) and then takes
        the response from `settle`."""
        conn = self._take_idle()
        if conn is None:
            return None
        head = conn.begin(method == b"HEAD", read_timeout, True)
        conn.write(self._head(method, target, headers, 0, None))
        self._time_head(head, read_timeout)
        return Sent(conn, head)

    def settle(self, sent: Sent) -> UpstreamResponse:
        """The response of a `send_now` whose head future is done; raises its UpstreamError (the
        connection is then closed). A stale keep-alive connection raises UpstreamClosed with
        `stale` set, and the request may be sent again (`request` does that by itself)."""
        head = sent.head
        self._head_due.pop(head, None)
        try:
            return head.result()
        except UpstreamClosed as exc:
            exc.stale = exc.stale and sent.conn.reused
            sent.conn.abort()
            raise
        except BaseException:
            sent.conn.abort()
            raise

    def _head(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        length: int | None,
        chunked: bool | None,
    ) -> bytes:
        """Serialise the request head. The client owns the framing headers: any Content-Length /
        Transfer-Encoding from the caller is dropped and replaced by the right one."""
        # Lines joined once with CRLF: `b": ".join(header)` costs less than formatting each line.
        lines = [b"%s %s HTTP/1.1" % (method, target)]
        append = lines.append
        has_host = False
        for header in headers:
            name = header[0]
            if len(name) in _FRAMING_LENGTHS:  # cheap pre-check before lowercasing
                lname = name.lower()
                if lname == b"host":
                    has_host = True
                elif lname == b"content-length" or lname == b"transfer-encoding":
                    continue
            append(b": ".join(header))
        if not has_host:
            append(self._host_header)
        if chunked:
            append(b"Transfer-Encoding: chunked")
        elif length is not None and (length or method in _BODY_METHODS):
            append(b"Content-Length: %d" % length)
        lines += _HEAD_END
        return b"\r\n".join(lines)

    async def _send_stream(
        self,
        conn: _Connection,
        fut: asyncio.Future[UpstreamResponse],
        stream: AsyncIterator[bytes],
        content_length: int | None,
        read_timeout: float | None,
    ) -> None:
        """Copy an async-iterator body to the socket, waiting on write flow control so memory
        stays bounded. Stops early if the upstream answers (or dies) before the body is sent."""
        chunked = content_length is None
        sent = 0
        conn.flush()  # the head first; the body goes out as it comes, under flow control
        async for chunk in stream:
            if conn._state == _CLOSED or fut.done():
                return  # early response or connection gone: `await fut` tells which
            n = len(chunk)
            if not n:
                continue
            if chunked:
                conn.transport.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
            else:
                sent += n
                if sent > content_length:  # type: ignore[operator]
                    raise ValueError("request body is longer than its declared content_length")
                conn.transport.write(chunk)
            if conn._write_paused:
                await conn.drain(read_timeout)
        if conn._state == _CLOSED or fut.done():
            return
        if chunked:
            conn.transport.write(b"0\r\n\r\n")
        elif sent != content_length:
            raise ValueError("request body is shorter than its declared content_length")
        conn._req_done = True

    # -- connection management --------------------------------------------------------------------

    async def _acquire(self, fresh: bool = False) -> _Connection:
        """An idle connection (LIFO), a new one if under max_connections, else wait (FIFO).
        `fresh` prefers a new connection over possibly stale idle ones (used for the retry)."""
        while True:
            if not (fresh and self._open < self.max_connections):
                conn = self._take_idle()
                if conn is not None:
                    return conn
            if self._closed:
                raise UpstreamConnectError(f"upstream pool for {self._origin} is closed")
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if self._open < self.max_connections:
                self._open += 1
                return await self._connect()
            conn_or_slot = await self._wait_turn()
            if conn_or_slot is None:  # a slot was freed for us
                return await self._connect()
            if conn_or_slot._state != _CLOSED:
                return conn_or_slot

    async def _wait_turn(self) -> _Connection | None:
        """Queue FIFO until a connection is handed over (or a slot, as None)."""
        fut: asyncio.Future[_Connection | None] = self._loop.create_future()
        self._waiters.append(fut)
        self._n_waiting += 1
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed something just as we were cancelled: pass it on, don't leak it.
                got = fut.result()
                if got is None:
                    self._free_slot()
                else:
                    self._release(got)
            raise
        finally:
            self._n_waiting -= 1

    async def _connect(self) -> _Connection:
        """Open a connection in a slot already counted in _open; frees the slot on failure."""
        loop = self._loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self._server_hostname,
                )
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectError(f"connect to {self._origin} timed out") from None
            if isinstance(exc, _ssl.SSLError):  # certificate errors included
                reason = (
                    getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
                )
                raise UpstreamConnectError(f"TLS handshake with {self._origin} failed: {reason}") from None
            if isinstance(exc, OSError):
                reason = exc.strerror or type(exc).__name__
                raise UpstreamConnectError(f"connect to {self._origin} failed: {reason}") from None
            raise
        if self._closed:
            conn.abort()  # frees the slot
            raise UpstreamConnectError(f"upstream pool for {self._origin} is closed")
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """A connection is free: give it to the oldest waiter, else push it on the idle stack."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if len(self._idle) >= self.max_idle or self._closed:
            conn.abort()
            return
        conn._state = _IDLE
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_at(conn.idle_since + self.idle_timeout, self._sweep)

    def _take_idle(self) -> _Connection | None:
        """The hottest idle connection the server has not closed, or None (closed ones found on
        the way are dropped)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn._state = _BUSY
            if not conn.transport.is_closing():
                return conn
            conn.abort()
        return None

    def _time_head(self, head: asyncio.Future[UpstreamResponse], timeout: float) -> None:
        """Fail `head` if it has not come within `timeout`, on the pool's one head timer."""
        deadline = self._head_due[head] = self._loop.time() + timeout
        if deadline < self._head_timer_at:
            self._arm_head_timer(deadline)

    def _arm_head_timer(self, at: float) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer_at = at
        self._head_timer = self._loop.call_at(at, self._expire_heads)

    def _expire_heads(self) -> None:
        """Fail the heads whose deadline has passed, and arm the timer for the next deadline."""
        self._head_timer = None
        self._head_timer_at = math.inf
        due = self._head_due
        now = self._loop.time() + _CLOCK_SLACK
        for fut in [fut for fut, at in due.items() if at <= now]:
            del due[fut]
            _expire_head(fut)
        if due:
            self._arm_head_timer(min(due.values()))

    def _conn_closed(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter, _open unchanged
                return
        self._open -= 1

    def _sweep(self) -> None:
        """Close idle connections older than idle_timeout (oldest are at the left)."""
        self._sweep_handle = None
        idle = self._idle
        deadline = self._loop.time() - self.idle_timeout
        while idle and idle[0].idle_since <= deadline:
            idle[0].abort()
        if idle:
            self._sweep_handle = self._loop.call_at(idle[0].idle_since + self.idle_timeout, self._sweep)

    async def close(self) -> None:
        """Close every connection (idle and busy) and refuse new requests."""
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer, self._head_timer_at = None, math.inf
        # Waiters first, so the slots freed below are not handed to them.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamConnectError(f"upstream pool for {self._origin} is closed"))
        for conn in list(self._conns):
            conn._fail_all(UpstreamClosed(f"upstream pool for {self._origin} was closed"))


def _expire_head(fut: asyncio.Future[UpstreamResponse]) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout("upstream did not send a response head in time"))


def _expire_drain(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout("upstream stopped reading the request body"))
