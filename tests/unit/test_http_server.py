"""bridgeway.http.server against raw sockets on 127.0.0.1 (port 0): what a client sees on the wire.

Every scenario runs on the stdlib loop (pytest-asyncio) and again on uvloop, the gateway's loop,
via test_scenarios_on_uvloop at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from bridgeway.http import ClientGone, Limits, Request, Responder, serve, tunnel
from bridgeway.http.asgi import asgi_handler

WAIT = 5.0  # upper bound for any single wait in these tests

# ------------------------------------------------------------------------------------ client


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    chunked: bool = False


class Client:
    """One raw connection: write bytes, read responses (Content-Length, chunked, or to EOF)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def get(self, path: str = "/", extra: str = "") -> Response:
        await self.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
        return await self.response()

    async def response(self, method: str = "GET") -> Response:
        return await asyncio.wait_for(self._response(method), WAIT)

    async def _response(self, method: str) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (101, 204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if headers.get(b"transfer-encoding") == b"chunked":
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                body += (await self.reader.readexactly(size + 2))[:-2]
                if size == 0:
                    return Response(status, headers, bytes(body), chunked=True)
        if b"content-length" in headers:
            return Response(status, headers, await self.reader.readexactly(int(headers[b"content-length"])))
        return Response(status, headers, await self.reader.read())

    async def closed_by_server(self) -> bytes:
        """Read until EOF (fails if the server keeps the connection open); returns what came."""
        return await asyncio.wait_for(self.reader.read(), WAIT)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# ----------------------------------------------------------------------------------- handlers


async def hello(request: Request, response: Responder) -> None:
    response.send(200, [(b"content-type", b"text/plain")], b"hello " + request.raw_path)


async def echo(request: Request, response: Responder) -> None:
    """Echo the body; report what the server parsed in headers."""
    body = await request.body(limit=1 << 20)
    response.send(
        200,
        [
            (b"x-method", request.method.encode()),
            (b"x-query", request.query),
            (b"x-chunked", b"1" if request.chunked else b"0"),
            (b"x-length", str(request.content_length).encode()),
        ],
        body,
    )


def json_of(resp: Response) -> dict:
    return json.loads(resp.body)


# ------------------------------------------------------------------------------ keep-alive, GET


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with await serve(hello) as server:
        client = await Client.open(server.port)
        for i in range(5):
            resp = await client.get(f"/n{i}?x=1")
            assert resp.status == 200
            assert resp.body == f"hello /n{i}".encode()  # raw_path excludes the query
            assert resp.headers[b"content-length"] == str(len(resp.body)).encode()
            assert b"date" in resp.headers
            assert b"connection" not in resp.headers
        assert server.connections == 1
        await client.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: Request, response: Responder) -> None:
        if request.raw_path == b"/slow":
            await asyncio.sleep(0.1)  # the second request must still wait its turn
        response.send(200, [], request.raw_path)

    async with await serve(slow_first) as server:
        client = await Client.open(server.port)
        await client.send(
            b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /third HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        assert [(await client.response()).body for _ in range(3)] == [b"/slow", b"/second", b"/third"]
        await client.close()


async def test_absolute_form_target_and_query() -> None:
    async with await serve(echo) as server:
        client = await Client.open(server.port)
        await client.send(b"GET http://example.com/a/b?q=1&r=2 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        resp = await client.response()
        assert resp.headers[b"x-query"] == b"q=1&r=2"
        await client.close()


# ------------------------------------------------------------------------------- request bodies


async def test_post_with_content_length() -> None:
    async with await serve(echo) as server:
        client = await Client.open(server.port)
        await client.send(b"POST /e?k=v HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"hello world")
        assert resp.headers[b"x-length"] == b"11" and resp.headers[b"x-chunked"] == b"0"
        assert resp.headers[b"x-query"] == b"k=v"
        # the body arriving in pieces, after the head
        await client.send(b"PUT /e HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nab")
        await asyncio.sleep(0.05)
        await client.send(b"cdef")
        assert (await client.response()).body == b"abcdef"
        await client.close()


async def test_post_with_chunked_body() -> None:
    async with await serve(echo) as server:
        client = await Client.open(server.port)
        await client.send(b"POST /e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.05)
        await client.send(b"6\r\n world\r\n0\r\n\r\n")
        resp = await client.response()
        assert resp.body == b"hello world"
        assert resp.headers[b"x-chunked"] == b"1" and resp.headers[b"x-length"] == b"None"
        await client.close()


async def test_20mb_streamed_upload_is_buffered_boundedly() -> None:
    total = 20 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    seen: dict[str, object] = {}

    async def consume_slowly(request: Request, response: Responder) -> None:
        digest = hashlib.sha256()
        biggest = size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
            biggest = max(biggest, len(chunk))
            await asyncio.sleep(0.001)  # a consumer slower than loopback
        seen.update(biggest=biggest, size=size)
        response.send(200, [], digest.hexdigest().encode())

    limits = Limits(body_high_water=256 * 1024)
    async with await serve(consume_slowly, limits=limits) as server:
        client = await Client.open(server.port)
        await client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        expected = hashlib.sha256()
        for _ in range(total // len(piece)):
            expected.update(piece)
            await client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        await client.send(b"0\r\n\r\n")
        resp = await client.response()
        assert resp.body == expected.hexdigest().encode()
        assert seen["size"] == total
        # Everything buffered comes out as one chunk: reading paused at the high-water mark, so
        # no chunk exceeds it by more than one socket read.
        assert seen["biggest"] <= limits.body_high_water + 512 * 1024
        await client.close()


async def test_body_over_the_handlers_limit_is_413() -> None:
    async def small(request: Request, response: Responder) -> None:
        await request.body(limit=10)
        response.send(200, [], b"unreachable")

    async with await serve(small) as server:
        client = await Client.open(server.port)
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
        resp = await client.response()
        assert resp.status == 413 and json_of(resp)["error"]["code"] == "BODY_TOO_LARGE"
        # chunked: the limit is found while reading
        client2 = await Client.open(server.port)
        await client2.send(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n" + b"y" * 20
        )
        assert (await client2.response()).status == 413
        await client.close()
        await client2.close()


async def test_expect_100_continue_is_answered_when_the_body_is_read() -> None:
    async with await serve(echo) as server:
        client = await Client.open(server.port)
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = await client.response()
        assert interim.status == 100
        await client.send(b"body")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"body")
        await client.close()


async def test_expect_100_continue_is_not_sent_when_the_handler_answers_first() -> None:
    async with await serve(hello) as server:
        client = await Client.open(server.port)
        await client.send(
            b"POST /no HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        resp = await client.response()
        assert resp.status == 200
        # the body never came: the connection cannot be reused
        assert resp.headers[b"connection"] == b"close"
        assert await client.closed_by_server() == b""
        await client.close()


# -------------------------------------------------------------------------------- response forms


async def test_chunked_response_when_the_length_is_unknown() -> None:
    async def stream(request: Request, response: Responder) -> None:
        response.start(200, [(b"content-type", b"text/plain")])
        for i in range(3):
            await response.write(b"part%d;" % i)
        response.end(b"last")

    async with await serve(stream) as server:
        client = await Client.open(server.port)
        for _ in range(2):  # still keep-alive after a chunked response
            resp = await client.get()
            assert resp.chunked and resp.body == b"part0;part1;part2;last"
            assert b"content-length" not in resp.headers
        await client.close()


async def test_a_date_from_the_handler_replaces_the_servers() -> None:
    async def dated(request: Request, response: Responder) -> None:
        response.send(200, [(b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT")], b"x")

    async with await serve(dated) as server:
        client = await Client.open(server.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.lower().count(b"date:") == 1 and b"2030" in head
        await client.close()


async def test_content_length_response_from_handler_header() -> None:
    async def sized(request: Request, response: Responder) -> None:
        response.start(200, [(b"Content-Length", b"10")])
        await response.write(b"01234")
        response.end(b"56789")

    async with await serve(sized) as server:
        client = await Client.open(server.port)
        resp = await client.get()
        assert not resp.chunked and resp.body == b"0123456789"
        assert (await client.get()).status == 200
        await client.close()


async def test_head_response_has_headers_but_no_body() -> None:
    async with await serve(hello) as server:
        client = await Client.open(server.port)
        await client.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = await client.response("HEAD")
        assert resp.status == 200 and resp.headers[b"content-length"] == b"8"  # len(b"hello /h")
        # no body bytes were sent: the next response parses cleanly
        assert (await client.get("/next")).body == b"hello /next"
        await client.close()


async def test_no_content_response_has_no_framing() -> None:
    async def empty(request: Request, response: Responder) -> None:
        response.send(204, [])

    async with await serve(empty) as server:
        client = await Client.open(server.port)
        resp = await client.get()
        assert resp.status == 204 and b"content-length" not in resp.headers
        assert (await client.get()).status == 204
        await client.close()


async def test_http10_streams_close_delimited_and_keeps_alive_with_a_length() -> None:
    async def both(request: Request, response: Responder) -> None:
        if request.raw_path == b"/stream":
            response.start(200, [])
            await response.write(b"abc")
            response.end(b"def")
        else:
            response.send(200, [], b"fixed")

    async with await serve(both) as server:
        client = await Client.open(server.port)
        await client.send(b"GET /fixed HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await client.response()
        assert resp.body == b"fixed" and resp.headers[b"connection"] == b"keep-alive"
        await client.send(b"GET /stream HTTP/1.0\r\n\r\n")
        resp = await client.response()
        assert resp.body == b"abcdef" and b"transfer-encoding" not in resp.headers
        assert resp.headers[b"connection"] == b"close"
        await client.close()


async def test_connection_close_from_the_client_or_the_handler_closes_after_the_response() -> None:
    async def closing(request: Request, response: Responder) -> None:
        headers = [(b"connection", b"close")] if request.raw_path == b"/bye" else []
        response.send(200, headers, b"ok")

    async with await serve(closing) as server:
        for extra, path in (("Connection: close\r\n", "/"), ("", "/bye")):
            client = await Client.open(server.port)
            resp = await client.get(path, extra)
            assert resp.headers[b"connection"] == b"close"
            assert await client.closed_by_server() == b""
            await client.close()


async def test_write_waits_while_the_client_does_not_read() -> None:
    total = 64 * 1024 * 1024
    block = b"z" * (256 * 1024)
    progress = {"sent": 0}

    async def big(request: Request, response: Responder) -> None:
        response.start(200, [(b"content-length", str(total).encode())])
        for _ in range(total // len(block)):
            await response.write(block)
            progress["sent"] += len(block)
        response.end()

    async with await serve(big) as server:
        client = await Client.open(server.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.3)
        assert progress["sent"] < total  # held back by the unread socket, not buffered in memory
        resp = await client.response()
        assert len(resp.body) == total and progress["sent"] == total
        await client.close()


# ------------------------------------------------------------------------- errors and protections


async def test_malformed_request_is_400_and_closed() -> None:
    async with await serve(hello) as server:
        for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
            client = await Client.open(server.port)
            await client.send(garbage)
            resp = await client.response()
            assert resp.status == 400
            assert json_of(resp)["error"]["code"] == "BAD_REQUEST"
            assert json_of(resp)["error"]["trace_id"]
            assert await client.closed_by_server() == b""
            await client.close()


async def test_conflicting_framing_is_refused() -> None:
    async with await serve(echo) as server:
        client = await Client.open(server.port)
        await client.send(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        assert (await client.response()).status == 400
        await client.close()


async def test_oversized_headers_are_431_and_closed() -> None:
    limits = Limits(max_head_bytes=8 * 1024)
    async with await serve(hello, limits=limits) as server:
        # the whole head at once
        client = await Client.open(server.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        resp = await client.response()
        assert resp.status == 431 and json_of(resp)["error"]["code"] == "HEADERS_TOO_LARGE"
        assert await client.closed_by_server() == b""
        await client.close()
        # a head that never ends: refused once past the limit, not buffered forever
        client = await Client.open(server.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        for _ in range(20):
            await client.send(b"X-Pad: " + b"b" * 1000 + b"\r\n")
        assert (await client.response()).status == 431
        await client.close()
        # a body larger than the head limit is not mistaken for a big head
        client = await Client.open(server.port)
        await client.send(b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 50000\r\n\r\n" + b"c" * 50_000)
        assert (await client.response()).status == 200
        await client.close()


async def test_header_read_timeout_closes_a_slow_head() -> None:
    async with await serve(hello, limits=Limits(header_timeout=0.3)) as server:
        client = await Client.open(server.port)
        started = time.monotonic()
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # and nothing more
        resp = await client.response()
        assert resp.status == 408 and json_of(resp)["error"]["code"] == "REQUEST_TIMEOUT"
        assert await client.closed_by_server() == b""
        assert 0.2 <= time.monotonic() - started < 2.0
        # a connection that never sends a byte is closed too
        silent = await Client.open(server.port)
        assert await silent.closed_by_server() == b""
        await client.close()
        await silent.close()


async def test_keep_alive_idle_timeout_closes() -> None:
    async with await serve(hello, limits=Limits(keepalive_timeout=0.3)) as server:
        client = await Client.open(server.port)
        assert (await client.get()).status == 200
        started = time.monotonic()
        assert await client.closed_by_server() == b""  # closed silently
        assert 0.2 <= time.monotonic() - started < 2.0
        await client.close()


async def test_body_timeout_is_408() -> None:
    async with await serve(echo, limits=Limits(body_timeout=0.3)) as server:
        client = await Client.open(server.port)
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        resp = await client.response()
        assert resp.status == 408
        await client.close()


async def test_handler_errors_become_500_and_the_connection_survives() -> None:
    async def faulty(request: Request, response: Responder) -> None:
        if request.raw_path == b"/raise":
            raise RuntimeError("boom")
        if request.raw_path == b"/crlf":
            response.send(200, [(b"x-evil", b"a\r\nset-cookie: b")], b"")
        if request.raw_path == b"/ok":
            response.send(200, [], b"ok")
        # anything else returns without answering

    async with await serve(faulty) as server:
        client = await Client.open(server.port)
        for path in ("/raise", "/crlf", "/silent"):
            resp = await client.get(path)
            assert resp.status == 500 and json_of(resp)["error"]["code"] == "INTERNAL"
            assert b"boom" not in resp.body
        assert (await client.get("/ok")).body == b"ok"
        await client.close()


# ------------------------------------------------------------------------- disconnects and abort


async def test_client_disconnect_mid_response_is_seen_by_the_handler() -> None:
    seen: dict[str, object] = {}
    done = asyncio.Event()

    async def sse(request: Request, response: Responder) -> None:
        try:
            response.start(200, [(b"content-type", b"text/event-stream")])
            await response.write(b"data: first\n\n")
            await asyncio.wait_for(request.wait_disconnected(), WAIT)
            seen["disconnected"] = request.disconnected
            try:
                await response.write(b"data: late\n\n")
            except ClientGone:
                seen["write_after"] = "ClientGone"
        finally:
            done.set()

    async with await serve(sse) as server:
        client = await Client.open(server.port)
        await client.send(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(client.reader.readuntil(b"data: first\n\n"), WAIT)
        await client.close()
        await asyncio.wait_for(done.wait(), WAIT)
        assert seen == {"disconnected": True, "write_after": "ClientGone"}


async def test_client_disconnect_while_the_handler_reads_the_body() -> None:
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def reader(request: Request, response: Responder) -> None:
        try:
            await request.body()
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            done.set()

    async with await serve(reader) as server:
        client = await Client.open(server.port)
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\npartial")
        await asyncio.sleep(0.05)
        await client.close()
        await asyncio.wait_for(done.wait(), WAIT)
        assert len(errors) == 1 and isinstance(errors[0], ClientGone)


async def test_abort_cuts_the_response() -> None:
    async def cut(request: Request, response: Responder) -> None:
        response.start(200, [])
        await response.write(b"partial")
        response.abort()

    async with await serve(cut) as server:
        client = await Client.open(server.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            raw = await client.closed_by_server()
        except ConnectionResetError:
            raw = b""  # an abort may reset before the client read the first bytes
        assert b"0\r\n\r\n" not in raw  # never a final chunk: the client knows it was cut
        await client.close()


# --------------------------------------------------------------------------------- upgrade tunnel


class _HeadReader(asyncio.Protocol):
    """The proxy side of an upgrade: read the upstream's response head, then pause reading."""

    def __init__(self) -> None:
        self.buf = b""
        self.head: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.head.done() and b"\r\n\r\n" in self.buf:
            assert self.transport is not None
            self.transport.pause_reading()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            self.head.set_result((head, rest))


async def test_upgrade_detach_and_tunnel_relays_both_ways() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\nwelcome;"
        )
        while data := await reader.read(65536):  # echo until the client half-closes
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    tunnels_done = asyncio.Event()

    async def proxy(request: Request, response: Responder) -> None:
        assert request.upgrade
        loop = asyncio.get_running_loop()
        transport, side = await loop.create_connection(_HeadReader, "127.0.0.1", up_port)
        transport.write(b"GET /ws HTTP/1.1\r\nHost: up\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
        head, early = await asyncio.wait_for(side.head, WAIT)
        assert head.startswith(b"HTTP/1.1 101")
        response.start(101, [(b"upgrade", b"test"), (b"connection", b"Upgrade")])
        await tunnel(response.detach(), transport, early)
        tunnels_done.set()

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]
    async with await serve(proxy) as server:
        client = await Client.open(server.port)
        # the client's first frame travels in the same packet as its upgrade request
        await client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\nping;")
        resp = await client.response()
        assert resp.status == 101 and resp.headers[b"upgrade"] == b"test"
        assert server.connections == 0  # the server let go of the detached connection
        got = b""
        while len(got) < len(b"welcome;PING;"):
            got += await asyncio.wait_for(client.reader.read(100), WAIT)
        assert got == b"welcome;PING;"
        big = b"x" * (3 * 1024 * 1024)  # more than the socket buffers: exercises flow control
        client.writer.write(big)
        received = 0
        while received < len(big):
            received += len(await asyncio.wait_for(client.reader.read(1 << 20), WAIT))
        client.writer.write_eof()  # half-close: the upstream ends, then so does the tunnel
        assert await client.closed_by_server() == b""
        await asyncio.wait_for(tunnels_done.wait(), WAIT)
        await client.close()
    up.close()


async def test_upgrade_answered_normally_closes_the_connection() -> None:
    async with await serve(hello) as server:
        client = await Client.open(server.port)
        resp = await client.get("/", "Upgrade: h2c\r\nConnection: Upgrade\r\n")
        assert resp.status == 200 and resp.headers[b"connection"] == b"close"
        assert await client.closed_by_server() == b""
        await client.close()


# ---------------------------------------------------------------------------------------- shutdown


async def test_graceful_close_finishes_in_flight_and_closes_idle() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: Request, response: Responder) -> None:
        if request.raw_path == b"/slow":
            entered.set()
            await release.wait()
        response.send(200, [], b"done")

    server = await serve(slow)
    port = server.port
    idle = await Client.open(port)
    assert (await idle.get()).status == 200
    busy = await Client.open(port)
    await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.wait_for(entered.wait(), WAIT)

    server.close(grace=WAIT)
    assert await idle.closed_by_server() == b""  # idle keep-alive: closed at once
    with pytest.raises(OSError):
        await Client.open(port)  # no longer accepting
    release.set()
    resp = await busy.response()
    assert resp.body == b"done" and resp.headers[b"connection"] == b"close"
    await asyncio.wait_for(server.wait_closed(), WAIT)
    assert server.connections == 0
    await idle.close()
    await busy.close()


async def test_close_aborts_what_outlives_the_grace_period() -> None:
    cancelled = asyncio.Event()

    async def stuck(request: Request, response: Responder) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await serve(stuck)
    client = await Client.open(server.port)
    await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0.05)
    started = time.monotonic()
    server.close(grace=0.2)
    await asyncio.wait_for(server.wait_closed(), WAIT)
    assert time.monotonic() - started < 2.0
    assert cancelled.is_set()
    with contextlib.suppress(ConnectionResetError):  # aborted: a reset is as good as an EOF
        assert await client.closed_by_server() == b""
    await client.close()


# ------------------------------------------------------------------------------------------- ASGI


class Item(BaseModel):
    name: str
    qty: int


def _fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, q: str | None = None) -> dict:
        return {"id": item_id, "q": q}

    @app.post("/items")
    async def create(item: Item) -> dict:
        return {"created": item.name, "qty": item.qty * 2}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[str]:
            for i in range(3):
                yield f"{i};"

        return StreamingResponse(parts(), media_type="text/plain")

    return app


async def test_asgi_adapter_serves_fastapi() -> None:
    async with await serve(asgi_handler(_fastapi_app())) as server:
        client = await Client.open(server.port)
        resp = await client.get("/items/7?q=x%20y")
        assert resp.status == 200 and json_of(resp) == {"id": 7, "q": "x y"}
        assert resp.headers[b"content-type"] == b"application/json"

        body = b'{"name": "bolt", "qty": 21}'
        await client.send(
            b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        resp = await client.response()
        assert resp.status == 200 and json_of(resp) == {"created": "bolt", "qty": 42}

        await client.send(b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n")
        await client.send(b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"nam\r\n')
        await client.send(b'14\r\ne": "nut", "qty": 1}\r\n0\r\n\r\n')
        assert json_of(await client.response()) == {"created": "nut", "qty": 2}

        resp = await client.get("/nowhere")
        assert resp.status == 404 and json_of(resp) == {"detail": "Not Found"}

        resp = await client.get("/stream")
        assert resp.status == 200 and resp.chunked and resp.body == b"0;1;2;"
        await client.close()


# ----------------------------------------------------------------------------------------- uvloop

_SCENARIOS = [
    fn
    for name, fn in sorted(globals().items())
    if name.startswith("test_") and asyncio.iscoroutinefunction(fn) and fn.__code__.co_argcount == 0
]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[fn.__name__[5:] for fn in _SCENARIOS])
def test_scenarios_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())  # type: ignore[arg-type]
