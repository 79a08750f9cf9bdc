"""bridgeway.serving, the HTTP/1.1 + WebSocket server, against real sockets on loopback.

Most tests run a worker in the test's own event loop (to look at its connections' buffers);
the process tests (graceful stop, respawn, SIGHUP relay, start-up failures) run
`python -m bridgeway.serving` on tests/support/asgi_app.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
import time
import urllib.request

import pytest
import websockets

from bridgeway.serving import Settings
from bridgeway.serving.http import PIPELINE_HIGH_WATER, READ_HIGH_WATER, WRITE_HIGH_WATER
from bridgeway.serving.worker import STARTUP_FAILED, Lifespan, Worker
from tests.support import asgi_app
from tests.support.asgi_app import EVENTS, GATES
from tests.support.gateway import _children
from tests.support.procs import ROOT, Proc, free_port


@pytest.fixture
async def serve():
    """serve(**settings) -> (worker, port): the test app on a worker in this loop."""
    workers = []

    async def start(**settings) -> tuple[Worker, int]:
        EVENTS.clear()
        GATES.clear()
        worker = Worker(asgi_app.app, Settings(**settings), asyncio.get_running_loop())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        await worker.start(sock)
        workers.append(worker)
        return worker, sock.getsockname()[1]

    yield start
    for worker in workers:
        await worker.stop()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-cased), body by length, chunks or close."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            body += chunk[:-2]
            if size == 0:
                break
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read()
    return status, headers, body


async def exchange(port: int, data: bytes, responses: int = 1, head: bool = False):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = []
    for _ in range(responses):
        out.append(await asyncio.wait_for(read_response(reader), 10))
    writer.close()
    return out


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    return await asyncio.wait_for(reader.read(), timeout) == b""


# -- HTTP/1.1 ----------------------------------------------------------------------------------


async def test_keep_alive_and_pipelined_requests_answer_in_order(serve):
    _, port = await serve()
    requests = (
        b"GET /sleep?ms=150 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    (s1, h1, b1), (s2, _, b2), (s3, h3, b3) = await exchange(port, requests, responses=3)
    assert (s1, b1) == (200, b"slept")  # the slow first one still comes first
    assert b2 == b"3 " + hashlib.sha256(b"abc").hexdigest().encode()
    assert (s3, b3) == (200, b"hello")
    assert h1["server"] == "bridgeway" and "date" in h1 and "connection" not in h3


async def test_an_apps_own_date_is_written_instead_of_the_servers(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /dated HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while data.count(b"\r\n\r\n") < 2 or not data.endswith(b"hello"):
        data += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    dated, plain = (part.lower() for part in data.split(b"dated", 1))
    assert dated.count(b"\r\ndate: ") == 1 and asgi_app.ORIGIN_DATE.lower().encode() in dated
    assert dated.count(b"\r\nserver: bridgeway\r\n") == 1
    assert plain.count(b"\r\ndate: ") == 1 and asgi_app.ORIGIN_DATE.lower().encode() not in plain


async def test_the_respond_extension_answers_whole_and_keeps_the_connection(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\nHEAD /whole HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert (status, body) == (201, b"whole")
    assert headers["content-length"] == "5" and headers["server"] == "bridgeway" and "date" in headers
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # HEAD: the head alone
    assert head.startswith(b"HTTP/1.1 201 ") and b"content-length: 5\r\n" in head
    assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"hello"  # kept alive, in order
    writer.close()


async def test_an_app_may_answer_from_callbacks_without_a_task(serve):
    """An app that returns None answers later by RESPOND, or hands the request to a coroutine
    by RUN; pipelined requests still get their answers in order, on the one connection."""
    _, port = await serve()
    requests = (
        b"GET /later?ms=100 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /handover HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    (s1, h1, b1), (s2, _, b2), (s3, _, b3) = await exchange(port, requests, responses=3)
    assert (s1, b1, h1["content-length"]) == (200, b"later", "5")
    assert (s2, b2) == (200, b"handed over")
    assert (s3, b3) == (200, b"hello")


async def test_an_app_whose_call_raises_is_answered_500_and_the_server_goes_on(serve):
    _, port = await serve()
    ((status, _, body),) = await exchange(port, b"GET /raise-now HTTP/1.1\r\nHost: x\r\n\r\n", responses=1)
    assert status == 500 and b"INTERNAL" in body
    ((status, _, body),) = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", responses=1)
    assert (status, body) == (200, b"hello")


async def test_a_client_pipelining_faster_than_answers_is_held_in_its_socket(serve):
    worker, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 400
    writer.write(b"GET /sleep?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.05)  # the slow one is in flight; now many small ones, a few per write
    for _ in range(n // 8):
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n" * 8)
        await asyncio.sleep(0.001)
    [conn] = worker.connections
    assert conn.reading_paused and len(conn.pipeline) < n  # bounded, the rest not read yet
    assert len(conn.pipeline) >= PIPELINE_HIGH_WATER
    first = await asyncio.wait_for(read_response(reader), 10)
    assert first[2] == b"slept"
    for _ in range(n):  # every one answered, in order, once reading resumed
        assert (await asyncio.wait_for(read_response(reader), 10))[2] == b"hello"
    writer.close()


async def test_connection_close_and_http10(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"hello", "close")
    assert await closed_by_server(reader)
    # HTTP/1.0 and a body of unknown length: the close ends it
    [(status, headers, body)] = await exchange(port, b"GET /stream?n=3&size=2 HTTP/1.0\r\n\r\n")
    assert (status, body) == (200, b"001122") and "transfer-encoding" not in headers
    # HTTP/1.0 keep-alive is honoured and said so
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, body, headers["connection"]) == (200, b"hello", "keep-alive")
    writer.close()


async def test_chunked_upload_and_download(serve):
    _, port = await serve()
    parts = [os.urandom(n) for n in (1, 1000, 70_000)]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    [(status, _, body)] = await exchange(
        port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    whole = b"".join(parts)
    assert (status, body) == (200, b"%d %s" % (len(whole), hashlib.sha256(whole).hexdigest().encode()))
    [(status, headers, body)] = await exchange(port, b"GET /stream?n=4&size=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert headers["transfer-encoding"] == "chunked" and body == b"000111222333"


async def test_large_upload_is_streamed_with_reading_paused(serve):
    """The app does not read yet: the server buffers about READ_HIGH_WATER, not the upload."""
    worker, port = await serve()
    size = 64 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /gate/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"z" * 65536
    sent = 0
    with pytest.raises(TimeoutError):  # the client's writes stall: the server stopped reading
        async with asyncio.timeout(2):
            while sent < size:
                writer.write(block)
                sent += len(block)
                await writer.drain()
    [conn] = worker.connections
    assert conn.reading_paused and conn.current.buffered <= READ_HIGH_WATER + 256 * 1024
    assert sent < size
    GATES["up"].set()
    while sent < size:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    status, _, body = await asyncio.wait_for(read_response(reader), 30)
    assert status == 200 and body.startswith(b"%d " % size)
    writer.close()


async def test_expect_100_continue(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    status, _, body = await read_response(reader)
    assert status == 200 and body.startswith(b"5 ")
    # answered without reading: no 100, and the connection closes (the body may never come)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"hello", "close")
    assert await closed_by_server(reader)


async def test_head_sends_headers_without_a_body(serve):
    _, port = await serve()
    requests = b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(requests)
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"content-length: 5\r\n" in head
    # no body: the next bytes are the second response
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",  # CL + TE
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    ],
    ids=["garbage", "cl-and-te", "bad-chunk-size", "two-lengths", "space-in-name"],
)
async def test_malformed_requests_get_400_then_close(serve, request_bytes):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 400 and headers["connection"] == "close"
    assert set(json.loads(body)["error"]) == {"code", "message", "trace_id", "timestamp"}
    assert await closed_by_server(reader)


async def test_oversized_head_gets_431(serve):
    _, port = await serve(max_header_size=4096)
    for request in (
        b"GET /hello HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 5000 + b"\r\n\r\n",
        b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 50) for i in range(200)) + b"\r\n",
        b"GET /" + b"u" * 5000 + b" HTTP/1.1\r\n\r\n",
    ):
        [(status, headers, _)] = await exchange(port, request)
        assert status == 431 and headers["connection"] == "close"
    # just under the limit still passes
    [(status, _, _)] = await exchange(port, b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
    assert status == 200


async def test_a_head_that_never_ends_is_refused_without_buffering_it(serve):
    worker, port = await serve(max_header_size=4096)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nX-Endless: ")
    for _ in range(6):  # a header line that does not end, in several reads; then the client waits
        writer.write(b"a" * 1024)
        await asyncio.sleep(0.05)
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 431


async def test_disconnect_mid_body_reaches_the_app(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /partial/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    for _ in range(100):
        if EVENTS["cut"][-1:] == ["http.disconnect"]:
            break
        await asyncio.sleep(0.02)
    assert EVENTS["cut"][0] == "http.request" and EVENTS["cut"][-1] == "http.disconnect"


async def test_disconnect_after_the_body_reaches_a_streaming_app(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /watch/sse HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"started" in await asyncio.wait_for(reader.readuntil(b"started"), 5)
    writer.close()
    for _ in range(100):
        if "http.disconnect" in EVENTS["sse"]:
            break
        await asyncio.sleep(0.02)
    assert EVENTS["sse"] == ["http.request", "http.disconnect"]


async def test_slow_reader_bounds_the_write_buffer(serve):
    worker, port = await serve()
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /big?mb=64 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(1.0)  # the client reads nothing: the kernel's buffers fill, then ours
        [conn] = worker.connections
        assert conn.write_paused
        assert conn.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + 70_000
        received = bytearray()
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
    assert received.count(b"x") == 64 * 1024 * 1024


async def test_an_app_error_before_the_answer_is_a_500_in_the_error_shape(serve):
    _, port = await serve()
    [(status, headers, body)] = await exchange(port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 500 and json.loads(body)["error"]["code"] == "INTERNAL"


async def test_scope_carries_what_the_gateway_reads(serve):
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    worker, port = await serve()
    worker.app = app
    [(status, headers, _)] = await exchange(
        port, b"GET /a%2Fb/c%20d?x=1&y=%20 HTTP/1.1\r\nHost: H\r\nX-Up: V\r\n\r\n"
    )
    assert status == 204 and "content-length" not in headers
    assert seen["path"] == "/a/b/c d" and seen["raw_path"] == b"/a%2Fb/c%20d"
    assert seen["query_string"] == b"x=1&y=%20" and seen["method"] == "GET"
    assert seen["http_version"] == "1.1" and seen["scheme"] == "http" and seen["root_path"] == ""
    assert (b"x-up", b"V") in seen["headers"] and (b"host", b"H") in seen["headers"]
    assert seen["client"][0] == "127.0.0.1" and seen["server"] == ("127.0.0.1", port)


async def test_idle_and_slow_heads_time_out(serve):
    _, port = await serve(keepalive_timeout=1.0, header_timeout=1.0)
    idle_reader, _ = await asyncio.open_connection("127.0.0.1", port)
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
    slow_writer.write(b"GET /hello HTTP/1.1\r\n")  # slowloris: a head that never completes
    started = time.monotonic()
    assert await closed_by_server(idle_reader) and await closed_by_server(slow_reader)
    assert 0.9 < time.monotonic() - started < 4


async def test_a_body_still_due_after_an_early_answer_times_out(serve):
    # /hello answers without reading the body (as a 401 to a POST does); the client then stalls.
    _, port = await serve(body_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and body == b"hello" and "connection" not in headers
    started = time.monotonic()
    assert await closed_by_server(reader, 4)
    assert 0.5 < time.monotonic() - started < 3.5
    # The rest of the body arriving in time keeps the connection for the next request.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
    assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"hello"
    writer.write(b"def" + b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"hello"
    writer.close()


async def test_an_early_answer_on_a_closing_connection_is_not_lost_to_a_reset(serve):
    # HTTP/1.0 without keep-alive: the connection closes after the answer. Closed while the body
    # still arrives, the kernel answers the client's next bytes with a reset, which throws away
    # the answer the client has not read yet; so the rest of the body is read out first.
    _, port = await serve(body_timeout=2.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /hello HTTP/1.0\r\nContent-Length: 300000\r\n\r\n" + b"a" * 1000)
    await asyncio.sleep(0.3)  # answered by now, the body not yet read
    for _ in range(30):  # the rest of the body, as a client that sends before it reads does
        writer.write(b"a" * 9900)
        await writer.drain()
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.2)
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert (status, body) == (200, b"hello") and headers["connection"] == "close"
    assert await closed_by_server(reader, 4)  # ... and closed once the body is in
    writer.close()


async def test_a_body_the_app_waits_for_times_out_between_reads(serve):
    _, port = await serve(body_timeout=2.0)
    # A body that arrives in pieces, each well within the time-out, is read whole ...
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):  # 3.2 s in all, longer than the time-out
        await asyncio.sleep(0.4)
        writer.write(b"a")
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and body == b"8 " + hashlib.sha256(b"a" * 8).hexdigest().encode()
    writer.close()
    # ... one that stops is cut, and the app sees the client go.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /partial/stall HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    started = time.monotonic()
    assert await closed_by_server(reader, 5)
    assert 1.0 < time.monotonic() - started < 4.5
    for _ in range(50):
        if EVENTS["stall"][-1:] == ["http.disconnect"]:
            break
        await asyncio.sleep(0.02)
    assert EVENTS["stall"] == ["http.request", "http.disconnect"]


# -- WebSocket ---------------------------------------------------------------------------------


async def test_websocket_echo_subprotocol_and_close_codes(serve):
    _, port = await serve()
    url = f"ws://127.0.0.1:{port}/ws"
    async with websockets.connect(url, subprotocols=["v2", "v1"]) as ws:
        assert ws.subprotocol == "v2"
        await ws.send("text")
        assert await ws.recv() == "text"
        await ws.send(b"\x00bytes")
        assert await ws.recv() == b"\x00bytes"
        await ws.ping()
        await ws.send("x" * 200_000)  # fragmented by nothing, but large
        assert len(await ws.recv()) == 200_000
        await ws.send("close:4001")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4001 and closed.value.rcvd.reason == "asked"
    async with websockets.connect(url) as ws:
        await ws.close(code=4002)
    for _ in range(50):
        if "disconnect 4002" in EVENTS["ws"]:
            break
        await asyncio.sleep(0.02)
    assert "disconnect 4002" in EVENTS["ws"]


async def test_websocket_refused_before_accept_is_403(serve):
    _, port = await serve()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{port}/ws?refuse")
    assert refused.value.response.status_code == 403


async def test_websocket_refused_with_the_apps_own_response(serve):
    _, port = await serve()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{port}/ws?deny")
    response = refused.value.response
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7" and response.headers["Content-Type"] == "application/json"
    assert bytes(response.body) == b'{"error":"busy"}'


async def test_websocket_message_size_limit(serve):
    _, port = await serve(ws_max_message_size=1000)
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send("a" * 900)
        assert await ws.recv() == "a" * 900
        await ws.send("b" * 2000)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1009


# -- processes -----------------------------------------------------------------------------------


def start_server(*args: str, env: dict | None = None, workers: int = 1) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "bridgeway.serving", "tests.support.asgi_app:app", "--port", str(port)]
    return Proc([*cmd, "--workers", str(workers), *args], port=port, env=env, cwd=ROOT, name="serving")


def get(proc: Proc, path: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(proc.url + path, timeout=timeout) as r:
        return r.read()


def worker_pids(proc: Proc) -> set[int]:
    return set(_children(proc.pid))


def test_graceful_stop_finishes_the_request_in_flight():
    with start_server() as proc:
        proc.wait_ready("/hello")
        result = {}

        def slow():
            result["body"] = get(proc, "/sleep?ms=1500")

        import threading

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.4)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", proc.port), timeout=1).recv(1)
        thread.join(10)
        assert result["body"] == b"slept"
        assert proc.popen.wait(10) == 0
    assert "Traceback" not in proc.logs()


def test_a_worker_that_dies_is_replaced():
    with start_server(workers=2) as proc:
        proc.wait_ready("/hello")
        deadline = time.monotonic() + 10
        while len(worker_pids(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = worker_pids(proc)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        while time.monotonic() < deadline:
            now = worker_pids(proc)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.05)
        assert len(now) == 2 and victim not in now
        for _ in range(10):
            assert get(proc, "/hello") == b"hello"
        assert f"worker {victim} died unexpectedly" in proc.logs()


def test_a_worker_that_keeps_dying_at_start_is_restarted_with_a_growing_delay(tmp_path):
    starts = tmp_path / "starts"
    with start_server(env={"CRASH_LOG": str(starts)}) as proc:
        time.sleep(2.5)
        assert proc.alive
    times = [float(line) for line in starts.read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Restarts after 0.1, 0.2, 0.4, 0.8 s ... (plus each worker's own short life): not a fork loop.
    assert 3 <= len(times) <= 7, gaps
    assert all(gap >= 0.1 * 2**i for i, gap in enumerate(gaps)), gaps
    assert "after starting (exit status 1); starting a new one in 0.4s" in proc.logs()


def test_sighup_reaches_every_worker(tmp_path):
    with start_server(workers=2, env={"HUP_DIR": str(tmp_path)}) as proc:
        proc.wait_ready("/hello")
        deadline = time.monotonic() + 10
        while len(worker_pids(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # both workers through their start-up (the handler is set there)
        os.kill(proc.pid, signal.SIGHUP)
        pids = {str(p) for p in worker_pids(proc)}
        while {p.name for p in tmp_path.iterdir()} != pids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {p.name for p in tmp_path.iterdir()} == pids
        assert proc.alive and get(proc, "/hello") == b"hello"


def test_failed_startup_exits_non_zero_with_the_reason():
    proc = start_server(env={"STARTUP_FAIL": "no database today"})
    try:
        assert proc.popen.wait(15) == STARTUP_FAILED
    finally:
        proc.stop()
    assert "startup failed: no database today" in proc.logs()


def test_port_in_use_fails_loudly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = Proc(
            [sys.executable, "-m", "bridgeway.serving", "tests.support.asgi_app:app", "--port", str(port)],
            cwd=ROOT,
            name="serving",
        )
        try:
            assert proc.popen.wait(15) == 1
        finally:
            proc.stop()
    assert f"cannot listen on 127.0.0.1:{port}" in proc.logs()


async def test_an_app_without_lifespan_support_is_served_anyway():
    async def plain(scope, receive, send):
        assert scope["type"] == "http", "no lifespan here"

    lifespan = Lifespan(plain)
    assert await lifespan.startup()
    await lifespan.shutdown()
