"""UpstreamPool against real loopback servers (asyncio streams on 127.0.0.1, port 0): no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
import ssl as ssl_module
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bridgeway.dataplane.upstream import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
    default_ssl_context,
)
from tests.support.tls import LocalCA

# Async tests run on the stdlib loop via pytest-asyncio (asyncio_mode = "auto"); the same
# scenarios run again on uvloop, the gateway's loop, by test_scenarios_on_uvloop at the end.

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running `handler` per connection; counts accepted connections."""

    def __init__(self, handler: Handler, ssl: ssl_module.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl
        self.accepted = 0
        self.closed = 0  # connections that ended (handler returned or peer closed)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a handler cancelled at teardown ends quietly (3.11 streams log it otherwise)
        finally:
            self.closed += 1
            writer.close()
            self._tasks.discard(task)


async def read_request(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes] | None:
    """Read one request: (head lines, body). None at EOF. Handles Content-Length and chunked."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    fields = {ln.split(b":", 1)[0].strip().lower(): ln.split(b":", 1)[1].strip() for ln in lines[1:]}
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
        return lines, bytes(body)
    length = int(fields.get(b"content-length", b"0"))
    return lines, await reader.readexactly(length)


def header(lines: list[bytes], name: bytes) -> list[bytes]:
    return [ln.split(b":", 1)[1].strip() for ln in lines[1:] if ln.split(b":", 1)[0].lower() == name]


def respond(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


async def keepalive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with its method, target and body."""
    while (req := await read_request(reader)) is not None:
        lines, body = req
        writer.write(
            respond(lines[0] + b"|" + body, extra=b"X-Seen-Host: " + header(lines, b"host")[0] + b"\r\n")
        )
        await writer.drain()


@contextlib.asynccontextmanager
async def pool_for(server: Server, **kw: object) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool("127.0.0.1", server.port, **kw)  # type: ignore[arg-type]
    try:
        yield pool
    finally:
        await pool.close()


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------- basics


async def test_get_and_post() -> None:
    async with Server(keepalive_echo) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/a?b=1", [(b"Accept", b"*/*")])
        try:
            assert resp.status == 200
            assert resp.complete
            assert (b"X-Seen-Host", b"127.0.0.1:%d" % srv.port) in resp.headers
            assert await resp.read() == b"GET /a?b=1 HTTP/1.1|"
        finally:
            resp.release()
        resp = await pool.request(b"POST", b"/p", [(b"Content-Type", b"text/plain")], b"payload")
        assert await resp.read() == b"POST /p HTTP/1.1|payload"
        resp.release()
        resp.release()  # idempotent


async def test_framing_headers_are_owned_by_the_client() -> None:
    seen: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            seen.append(req[0])
            writer.write(respond(req[1]))

    async with Server(handler) as srv, pool_for(srv) as pool:
        hdrs = [(b"host", b"example.org"), (b"Content-Length", b"999"), (b"Transfer-Encoding", b"gzip")]
        resp = await pool.request(b"POST", b"/", hdrs, b"abc")
        assert await resp.read() == b"abc"
        resp = await pool.request(b"POST", b"/", [], b"")
        assert await resp.read() == b""
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b""
    assert header(seen[0], b"host") == [b"example.org"]
    assert header(seen[0], b"content-length") == [b"3"]
    assert header(seen[0], b"transfer-encoding") == []
    assert header(seen[1], b"content-length") == [b"0"]  # POST announces an empty body
    assert header(seen[2], b"content-length") == []  # GET without body: no framing header


async def test_large_bytes_body_is_sent_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(respond(hashlib.sha256(req[1]).hexdigest().encode()))

    body = bytes(range(256)) * 4096  # 1 MiB: written after the head, not copied into it
    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"PUT", b"/", [], body)
        assert await resp.read() == hashlib.sha256(body).hexdigest().encode()


async def test_keep_alive_reuses_one_connection() -> None:
    async with Server(keepalive_echo) as srv, pool_for(srv) as pool:
        for i in range(20):
            resp = await pool.request(b"GET", b"/%d" % i, [])
            assert (await resp.read()).startswith(b"GET /%d " % i)
            resp.release()
        assert srv.accepted == 1
        assert pool.stats == {"open": 1, "idle": 1, "busy": 0, "waiting": 0}

        async def one(i: int) -> bytes:
            r = await pool.request(b"GET", b"/%d" % i, [])
            try:
                return await r.read()
            finally:
                r.release()

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert all(r.startswith(b"GET /%d " % i) for i, r in enumerate(results))
        assert srv.accepted <= 50
        assert pool.stats["busy"] == 0


async def test_chunked_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n")

    async with Server(handler) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request(b"GET", b"/", [])
            assert await resp.read() == b"hello world"
            assert resp.headers == [(b"Transfer-Encoding", b"chunked")]  # trailers are not headers
            resp.release()
        assert srv.accepted == 1


async def test_streaming_response_arrives_incrementally() -> None:
    second = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await second.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/stream", [], read_timeout=5.0)
        try:
            assert not resp.complete
            it = aiter(resp)
            assert await anext(it) == b"first"
            assert not second.is_set()
            second.set()
            assert await anext(it) == b"second"
            with pytest.raises(StopAsyncIteration):
                await anext(it)
            assert resp.complete
        finally:
            resp.release()
        assert pool.stats["idle"] == 1


async def test_informational_100_continue_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            writer.write(respond(b"done", b"201 Created"))

    async with Server(handler) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request(b"POST", b"/", [(b"Expect", b"100-continue")], b"x")
            assert resp.status == 201
            assert resp.headers == [(b"Content-Length", b"4")]
            assert await resp.read() == b"done"
        assert srv.accepted == 1


# ---------------------------------------------------------------------------- bodies without body


async def test_head_response_has_no_body_and_connection_is_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            if req[0][0].startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(respond(b"get-body"))

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"HEAD", b"/", [], read_timeout=2.0)
        assert resp.status == 200 and resp.complete
        assert (b"Content-Length", b"1000") in resp.headers
        assert await resp.read() == b""
        resp.release()
        resp = await pool.request(b"GET", b"/", [], read_timeout=2.0)
        assert await resp.read() == b"get-body"
        assert srv.accepted == 1


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_no_content_statuses(status: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 " + status + b"\r\nETag: x\r\n\r\n")

    async with Server(handler) as srv, pool_for(srv) as pool:
        for _ in range(3):
            resp = await pool.request(b"GET", b"/", [], read_timeout=2.0)
            assert resp.complete
            assert await resp.read() == b""
        assert srv.accepted == 1


async def test_body_delimited_by_eof() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart1-")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part2")
        await writer.drain()
        # returning closes the connection: that ends the body

    async with Server(handler) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request(b"GET", b"/", [], read_timeout=2.0)
            assert not resp.keep_alive
            assert await resp.read() == b"part1-part2"
            resp.release()
        assert srv.accepted == 2  # never reused
        await until(lambda: pool.stats["open"] == 0)


async def test_connection_close_header_is_honoured() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(respond(b"bye", extra=b"Connection: close\r\n"))

    async with Server(handler) as srv, pool_for(srv) as pool:
        for _ in range(2):
            resp = await pool.request(b"GET", b"/", [])
            assert await resp.read() == b"bye"
        assert srv.accepted == 2
        assert pool.stats["open"] == 0


# ------------------------------------------------------------------------------- large streams


async def test_streamed_upload_50mb_chunked_bounded_memory() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        digest = hashlib.sha256()
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await reader.readexactly(2)
                break
            digest.update(await reader.readexactly(size))
            await reader.readexactly(2)
        writer.write(respond(digest.hexdigest().encode()))
        await writer.drain()

    expected = hashlib.sha256()

    async def gen() -> AsyncIterator[bytes]:
        for i in range(800):  # 800 x 64 KiB = 50 MiB, each chunk a fresh object
            chunk = bytes([i % 251]) * 65536
            expected.update(chunk)
            yield chunk

    async with Server(handler) as srv, pool_for(srv) as pool:
        tracemalloc.start()
        try:
            resp = await pool.request(b"POST", b"/upload", [], gen(), read_timeout=30.0)
            digest = await resp.read()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert digest == expected.hexdigest().encode()
        assert peak < 16 * 1024 * 1024, f"upload buffered {peak} bytes"


async def test_streamed_upload_with_content_length() -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            got.append(b"\n".join(req[0]))
            writer.write(respond(hashlib.sha256(req[1]).hexdigest().encode()))

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 100_000

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"PUT", b"/", [], gen(), content_length=1_000_000)
        assert await resp.read() == hashlib.sha256(b"z" * 1_000_000).hexdigest().encode()
        assert b"Content-Length: 1000000" in got[0] and b"chunked" not in got[0]
        assert pool.stats["idle"] == 1  # fully sent, fully read: reusable

        with pytest.raises(ValueError):
            await pool.request(b"PUT", b"/", [], gen(), content_length=10)
        assert pool.stats["open"] <= 1


async def test_download_50mb_slow_consumer_bounded_memory() -> None:
    size = 50 * 1024 * 1024
    block = b"d" * (1024 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await read_request(reader)

    async with Server(handler) as srv, pool_for(srv) as pool:
        tracemalloc.start()
        try:
            resp = await pool.request(b"GET", b"/big", [], read_timeout=10.0)
            received = 0
            paused_seen = False
            try:
                async for chunk in resp:
                    received += len(chunk)
                    conn = resp._conn
                    paused_seen = paused_seen or (conn is not None and conn._reading_paused)
                    await asyncio.sleep(0.001)  # slow consumer
            finally:
                resp.release()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received == size
        assert peak < 16 * 1024 * 1024, f"download buffered {peak} bytes"
        assert pool.stats["idle"] == 1


# -------------------------------------------------------------------------------------- errors


async def test_connect_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    pool = UpstreamPool("127.0.0.1", port, connect_timeout=2.0)
    with pytest.raises(UpstreamConnectError) as info:
        await pool.request(b"POST", b"/", [(b"Authorization", b"Bearer secret-token")], b"x")
    assert info.value.request_sent is False
    assert info.value.code == "UPSTREAM_CONNECT"
    assert "secret-token" not in str(info.value)
    assert pool.stats == {"open": 0, "idle": 0, "busy": 0, "waiting": 0}
    await pool.close()


async def test_read_timeout_waiting_for_head() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with Server(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(UpstreamTimeout) as info:
            await pool.request(b"GET", b"/", [(b"Cookie", b"secret")], read_timeout=0.1)
        assert info.value.code == "UPSTREAM_TIMEOUT" and info.value.request_sent
        assert "secret" not in str(info.value)
        assert pool.stats["open"] == 0


async def test_head_deadlines_share_one_timer_and_each_fires_on_time() -> None:
    """The pool's one head timer: a later request with a shorter timeout still times out first,
    an answered request leaves nothing behind, and the timer is gone once nothing waits."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, _ = await read_request(reader)
        target = lines[0].split(b" ")[1]
        if target == b"/fast":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        await asyncio.sleep(10)

    async with Server(handler) as srv, pool_for(srv) as pool:
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def timed_out_after(timeout: float, delay: float) -> float:
            await asyncio.sleep(delay)
            with pytest.raises(UpstreamTimeout):
                await pool.request(b"GET", b"/slow", [], read_timeout=timeout)
            return loop.time() - started

        answered = await pool.request(b"GET", b"/fast", [], read_timeout=5.0)
        assert answered.status == 200 and await answered.read() == b"ok"
        answered.release()
        long, short = await asyncio.gather(timed_out_after(0.6, 0.0), timed_out_after(0.2, 0.05))
        # Each at its own deadline, in order; a timer may run a clock tick (1 ms on uvloop) early.
        tick = 0.002
        assert 0.2 - tick <= short < long and 0.6 - tick <= long < 2.0
        assert pool._head_due == {}
        assert pool._head_timer is None  # re-armed only while heads are awaited


async def test_read_timeout_between_chunks() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(10)

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [], read_timeout=0.1)
        try:
            chunks = []
            with pytest.raises(UpstreamTimeout):
                async for chunk in resp:
                    chunks.append(chunk)
            assert chunks == [b"abc"]
        finally:
            resp.release()
        assert pool.stats["open"] == 0


async def test_server_closes_mid_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        try:
            with pytest.raises(UpstreamClosed) as info:
                async for _ in resp:
                    pass
            assert info.value.code == "UPSTREAM_CLOSED"
        finally:
            resp.release()
        with pytest.raises(UpstreamClosed):
            await resp.read()  # the error sticks
        assert pool.stats["open"] == 0


async def test_server_closes_before_responding_on_fresh_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with Server(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(UpstreamClosed) as info:
            await pool.request(b"GET", b"/", [])
        assert info.value.request_sent
        assert srv.accepted == 1  # a fresh connection is not retried


async def test_garbage_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(UpstreamProtocolError) as info:
            await pool.request(b"GET", b"/", [])
        assert info.value.code == "UPSTREAM_PROTOCOL"
        assert pool.stats["open"] == 0


async def test_garbage_in_chunked_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nZZZ\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        with pytest.raises(UpstreamProtocolError):
            await resp.read()
        resp.release()
        assert pool.stats["open"] == 0


# ------------------------------------------------------------------------ keep-alive lifecycle


async def test_server_closing_idle_connection_is_handled() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(respond(b"once"))  # keep-alive response, then the server closes anyway
        await writer.drain()

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"once"
        await until(lambda: pool.stats["open"] == 0)  # connection_lost removed it from the stack
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"once"
        assert srv.accepted == 2


def stale_after_one():
    """A handler whose first connection answers once, then reads the next request and drops it
    (the server closed its side just as the client reused it); later connections answer all."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first, answered = connections == 1, 0
        while await read_request(reader) is not None:
            if first and answered:
                return
            answered += 1
            writer.write(respond(b"ok"))
            await writer.drain()

    return handler


async def test_stale_connection_is_retried_once_for_bytes_body() -> None:
    async with Server(stale_after_one()) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"ok"
        resp = await pool.request(b"POST", b"/", [], b"body")  # reused, dies, retried
        assert await resp.read() == b"ok"
        assert srv.accepted == 2


async def test_stale_connection_not_retried_for_streamed_body() -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"a"

    async with Server(stale_after_one()) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"ok"
        with pytest.raises(UpstreamClosed) as info:
            await pool.request(b"POST", b"/", [], gen())
        assert info.value.request_sent
        assert srv.accepted == 1


async def test_send_now_writes_on_an_idle_connection_and_settle_gives_the_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            writer.write(respond(request[0][0].split(b" ")[1]))  # the target, as the body
            await writer.drain()

    async with Server(handler) as srv, pool_for(srv) as pool:
        assert pool.send_now(b"GET", b"/first", [], 5.0) is None  # no idle connection yet
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"/"
        sent = pool.send_now(b"GET", b"/now", [(b"x-a", b"1")], 5.0)
        assert sent is not None and pool.stats["busy"] == 1
        await sent.head
        resp = pool.settle(sent)
        assert (resp.status, resp.complete, resp.body()) == (200, True, b"/now")
        assert pool.stats == {"open": 1, "idle": 1, "busy": 0, "waiting": 0} and srv.accepted == 1


async def test_settle_tells_a_stale_connection_from_a_failed_request() -> None:
    async with Server(stale_after_one()) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"ok"
        sent = pool.send_now(b"GET", b"/", [], 5.0)
        with contextlib.suppress(UpstreamClosed):
            await sent.head
        with pytest.raises(UpstreamClosed) as info:
            pool.settle(sent)
        assert info.value.stale  # nothing came back on a reused connection: safe to send again
        assert pool.stats["open"] == 0


async def test_send_now_times_out_a_head_that_never_comes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(respond(b"ok"))
        await writer.drain()
        await read_request(reader)
        await asyncio.sleep(5)  # the second request hangs

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"ok"
        sent = pool.send_now(b"GET", b"/", [], 0.2)
        with contextlib.suppress(UpstreamTimeout):
            await asyncio.wait_for(sent.head, 3)
        with pytest.raises(UpstreamTimeout):
            pool.settle(sent)
        assert pool.stats["open"] == 0  # a connection whose answer is late is never reused


async def test_unsolicited_data_on_idle_connection_closes_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(respond(b"ok"))
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(respond(b"nobody asked"))  # out of sync from here on
            await writer.drain()

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"ok"
        await until(lambda: pool.stats["open"] == 0)
        resp = await pool.request(b"GET", b"/", [])
        assert await resp.read() == b"ok"
        assert srv.accepted == 2


async def test_idle_connections_expire() -> None:
    async with Server(keepalive_echo) as srv, pool_for(srv, idle_timeout=0.1) as pool:
        resp = await pool.request(b"GET", b"/", [])
        await resp.read()
        assert pool.stats["idle"] == 1
        await until(lambda: srv.closed == 1)
        assert pool.stats == {"open": 0, "idle": 0, "busy": 0, "waiting": 0}
        resp = await pool.request(b"GET", b"/", [])
        assert (await resp.read()).startswith(b"GET")


async def test_max_idle_caps_the_stack() -> None:
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await gate.wait()
            writer.write(respond(b"x"))

    async with Server(handler) as srv, pool_for(srv, max_idle=2) as pool:
        tasks = [asyncio.create_task(pool.request(b"GET", b"/", [])) for _ in range(5)]
        await until(lambda: srv.accepted == 5)
        gate.set()
        for r in await asyncio.gather(*tasks):
            await r.read()
        assert pool.stats == {"open": 2, "idle": 2, "busy": 0, "waiting": 0}


async def test_max_connections_waiters_are_served_fifo() -> None:
    order: list[bytes] = []
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            order.append(req[0][0].split()[1])
            await gate.wait()
            writer.write(respond(b"r"))

    async with Server(handler) as srv, pool_for(srv, max_connections=2) as pool:

        async def call(i: int) -> None:
            r = await pool.request(b"GET", b"/%d" % i, [])
            await r.read()
            r.release()

        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(call(i)))
            await asyncio.sleep(0.01)  # fix the arrival order
        assert pool.stats == {"open": 2, "idle": 0, "busy": 2, "waiting": 6}
        gate.set()
        await asyncio.gather(*tasks)
        assert sorted(order[:2]) == [b"/0", b"/1"]
        assert order[2:] == [b"/%d" % i for i in range(2, 8)]
        assert srv.accepted == 2
        assert pool.stats["waiting"] == 0


async def test_cancelled_waiter_does_not_leak_its_turn() -> None:
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await gate.wait()
            writer.write(respond(b"r"))

    async with Server(handler) as srv, pool_for(srv, max_connections=1) as pool:
        first = asyncio.create_task(pool.request(b"GET", b"/", []))
        await until(lambda: srv.accepted == 1)
        doomed = asyncio.create_task(pool.request(b"GET", b"/", []))
        third = asyncio.create_task(pool.request(b"GET", b"/", []))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.set()
        await (await first).read()
        await (await third).read()
        assert doomed.cancelled()
        assert pool.stats == {"open": 1, "idle": 1, "busy": 0, "waiting": 0}


# -------------------------------------------------------------------------------- cancellation


async def test_cancel_while_waiting_for_head_closes_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client goes away

    async with Server(handler) as srv, pool_for(srv) as pool:
        task = asyncio.create_task(pool.request(b"GET", b"/", []))
        await until(lambda: srv.accepted == 1)
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.stats == {"open": 0, "idle": 0, "busy": 0, "waiting": 0}
        await until(lambda: srv.closed == 1)


async def test_cancel_mid_body_then_release_closes_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await reader.read()

    async with Server(handler) as srv, pool_for(srv) as pool:

        async def consume() -> None:
            resp = await pool.request(b"GET", b"/", [])
            try:
                async for _ in resp:
                    pass
            finally:
                resp.release()

        task = asyncio.create_task(consume())
        await until(lambda: srv.accepted == 1)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.stats["open"] == 0
        await until(lambda: srv.closed == 1)


async def test_release_from_another_task_wakes_the_reader() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await reader.read()

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"GET", b"/", [])
        assert await anext(aiter(resp)) == b"abc"
        reader = asyncio.create_task(resp.read())
        await asyncio.sleep(0.02)
        resp.release()
        with pytest.raises(UpstreamClosed):
            await reader
        assert pool.stats["open"] == 0


async def test_cancel_during_streamed_upload_closes_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    started = asyncio.Event()

    async def gen() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        started.set()
        await asyncio.sleep(10)
        yield b"b"

    async with Server(handler) as srv, pool_for(srv) as pool:
        task = asyncio.create_task(pool.request(b"POST", b"/", [], gen()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.stats["open"] == 0
        await until(lambda: srv.closed == 1)


async def test_early_response_stops_upload() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(respond(b"too big", b"413 Payload Too Large", b"Connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(0.2)

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10_000):
            yield b"u" * 65536
            await asyncio.sleep(0)

    async with Server(handler) as srv, pool_for(srv) as pool:
        resp = await pool.request(b"POST", b"/", [], gen(), read_timeout=5.0)
        assert resp.status == 413
        assert await resp.read() == b"too big"
        resp.release()
        assert pool.stats["open"] == 0


async def test_upload_to_upstream_that_stops_reading_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(10)  # never reads the body: the socket buffers fill up

    async def gen() -> AsyncIterator[bytes]:
        chunk = b"s" * 65536
        for _ in range(4096):  # up to 256 MiB; flow control must stop us long before
            yield chunk

    async with Server(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(UpstreamTimeout) as info:
            await pool.request(b"PUT", b"/", [], gen(), read_timeout=0.3)
        assert info.value.request_sent
        assert pool.stats["open"] == 0


async def test_body_iterator_error_propagates_and_closes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def gen() -> AsyncIterator[bytes]:
        yield b"a"
        raise RuntimeError("client went away")

    async with Server(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(RuntimeError, match="client went away"):
            await pool.request(b"POST", b"/", [], gen())
        assert pool.stats["open"] == 0
        await until(lambda: srv.closed == 1)


async def test_pool_close_closes_everything() -> None:
    async with Server(keepalive_echo) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        resp = await pool.request(b"GET", b"/", [])
        await resp.read()
        await pool.close()
        assert pool.stats["open"] == 0
        await until(lambda: srv.closed == 1)
        with pytest.raises(UpstreamConnectError):
            await pool.request(b"GET", b"/", [])


# ---------------------------------------------------------------------------------------- TLS


@functools.cache
def certs() -> LocalCA:
    return LocalCA.make(["localhost"])


async def test_tls_requests_share_one_connection_with_sni() -> None:
    server_names: list[str | None] = []
    context = certs().server_context()
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)  # type: ignore[assignment]
    async with Server(keepalive_echo, ssl=context) as srv:
        pool = UpstreamPool("localhost", srv.port, ssl=certs().client_context())
        try:
            for i in range(3):
                resp = await pool.request(b"POST", b"/chat", [], b"hi %d" % i)
                assert await resp.read() == b"POST /chat HTTP/1.1|hi %d" % i
                assert (b"X-Seen-Host", b"localhost:%d" % srv.port) in resp.headers
            assert srv.accepted == 1
            assert server_names == ["localhost"]
        finally:
            await pool.close()


async def test_tls_streamed_response_arrives_whole() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, more than HIGH_WATER: reading pauses and resumes

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(payload), 65536):
            piece = payload[i : i + 65536]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with Server(handler, ssl=certs().server_context()) as srv:
        pool = UpstreamPool("localhost", srv.port, ssl=certs().client_context())
        try:
            resp = await pool.request(b"GET", b"/big", [])
            digest = hashlib.sha256()
            async for chunk in resp:
                digest.update(chunk)
                await asyncio.sleep(0)
            assert digest.digest() == hashlib.sha256(payload).digest()
        finally:
            await pool.close()


async def test_tls_untrusted_certificate_is_a_connect_error() -> None:
    async with Server(keepalive_echo, ssl=certs().server_context()) as srv:
        pool = UpstreamPool("localhost", srv.port, ssl=default_ssl_context())
        try:
            with pytest.raises(UpstreamConnectError, match="TLS handshake with localhost:.* failed") as info:
                await pool.request(b"GET", b"/", [])
            assert info.value.request_sent is False
            assert pool.stats["open"] == 0
        finally:
            await pool.close()


async def test_tls_certificate_for_another_host_is_refused() -> None:
    async with Server(keepalive_echo, ssl=certs().server_context()) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port, ssl=certs().client_context())  # cert names localhost
        try:
            with pytest.raises(UpstreamConnectError, match="mismatch"):
                await pool.request(b"GET", b"/", [])
        finally:
            await pool.close()


def test_tls_default_port_is_left_out_of_the_host_header() -> None:
    context = default_ssl_context()
    assert UpstreamPool("api.example.com", 443, ssl=context)._host_header == b"Host: api.example.com"
    assert UpstreamPool("api.example.com", 8443, ssl=context)._host_header == b"Host: api.example.com:8443"
    assert UpstreamPool("example.com", 443)._host_header == b"Host: example.com:443"  # plain: as it was
    assert default_ssl_context() is context  # built once


# ------------------------------------------------------------------------------------- uvloop

_SCENARIOS = [
    fn
    for name, fn in sorted(globals().items())
    if name.startswith("test_") and asyncio.iscoroutinefunction(fn) and fn.__code__.co_argcount == 0
]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[fn.__name__[5:] for fn in _SCENARIOS])
def test_scenarios_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())  # type: ignore[arg-type]
