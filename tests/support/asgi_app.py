"""A small ASGI app that exercises the server (bridgeway.serving): echoes, streams, stalls,
WebSockets, a lifespan, and a SIGHUP handler. In-process tests read `EVENTS` and `GATES`;
`python -m bridgeway.serving tests.support.asgi_app:app` serves it as a real process.

    GET  /hello                 "hello" with a length
    POST /echo                  the body's size and sha256 (read as it streams)
    GET  /stream?n=N&size=S     N chunks of S bytes, no length (chunked)
    GET  /big?mb=N              N MiB in 64 KiB sends (a slow reader test)
    POST /gate/NAME             waits for GATES[NAME] before reading the body, then echoes
    GET  /watch/NAME            answers, reads, then records the disconnect in EVENTS[NAME]
    POST /partial/NAME          reads the body, records each message type in EVENTS[NAME]
    GET  /sleep?ms=N            answers after N ms
    GET  /pid                   the worker's pid
    GET  /boom                  raises before answering
    GET  /later?ms=N            answered N ms later from a timer (no task: RESPOND)
    GET  /handover              begun with no task, then served by a coroutine (RUN)
    GET  /raise-now             the app's call itself raises
    WS   /ws                    echo; "close:CODE" closes with CODE; "?refuse" refuses
$STARTUP_FAIL makes the start-up fail; $HUP_DIR gets a file per worker pid on each SIGHUP;
$CRASH_LOG makes each worker note its start's time there and exit at once (a crash, status 1).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qs

ORIGIN_DATE = "Tue, 01 Dec 2026 08:00:00 GMT"
EVENTS: dict[str, list[str]] = defaultdict(list)
GATES: dict[str, asyncio.Event] = defaultdict(asyncio.Event)


async def _reply(send, status: int, body: bytes, headers=()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _digest(receive) -> bytes:
    sha, size = hashlib.sha256(), 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"gone"
        sha.update(message.get("body", b""))
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            return b"%d %s" % (size, sha.hexdigest().encode())


async def _http(scope, receive, send) -> None:
    path = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if path == "/hello":
        await _reply(send, 200, b"hello")
    elif path == "/echo":
        await _reply(send, 200, await _digest(receive))
    elif path == "/dated":  # an app that names its own Date (as a proxied answer does)
        await _reply(send, 200, b"dated", [(b"date", ORIGIN_DATE.encode())])
    elif path == "/whole":  # the server's RESPOND extension: the answer in one call, no messages
        scope["extensions"]["bridgeway.respond"](send, 201, [(b"content-type", b"text/plain")], b"whole")
    elif path.startswith("/gate/"):
        await GATES[path[6:]].wait()
        await _reply(send, 200, await _digest(receive))
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(int(query.get("n", 3))):
            await send(
                {
                    "type": "http.response.body",
                    "body": b"%d" % i * int(query.get("size", 1)),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        for _ in range(int(query.get("mb", 1)) * 16):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path.startswith("/watch/"):
        name = path[7:]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started", "more_body": True})
        while (message := await receive())["type"] != "http.disconnect":
            EVENTS[name].append(message["type"])
        EVENTS[name].append("http.disconnect")
    elif path.startswith("/partial/"):
        name = path[9:]
        while True:
            message = await receive()
            EVENTS[name].append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        if EVENTS[name][-1] != "http.disconnect":
            await _reply(send, 200, b"whole")
    elif path == "/sleep":
        await asyncio.sleep(int(query.get("ms", 100)) / 1000)
        await _reply(send, 200, b"slept")
    elif path == "/pid":
        await _reply(send, 200, str(os.getpid()).encode())
    elif path == "/boom":
        raise RuntimeError("boom")
    else:
        await _reply(send, 404, b"no such path")


async def _websocket(scope, receive, send) -> None:
    await receive()  # websocket.connect
    if scope["query_string"] == b"refuse":
        await send({"type": "websocket.close", "code": 4403})
        return
    if scope["query_string"] == b"deny":  # a refusal with a response of the app's own
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"7")]
        await send({"type": "websocket.http.response.start", "status": 429, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": b'{"error":', "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b'"busy"}'})
        return
    chosen = scope["subprotocols"][0] if scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": chosen})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            EVENTS["ws"].append(f"disconnect {message['code']}")
            return
        text = message.get("text")
        if text is not None and text.startswith("close:"):
            await send({"type": "websocket.close", "code": int(text[6:]), "reason": "asked"})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


def _hup() -> None:
    directory = Path(os.environ["HUP_DIR"])
    path = directory / str(os.getpid())
    path.write_text(str(int(path.read_text()) + 1 if path.exists() else 1))


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if os.environ.get("CRASH_LOG"):
                with open(os.environ["CRASH_LOG"], "a") as log:
                    log.write(f"{time.monotonic()}\n")
                os._exit(1)
            if os.environ.get("STARTUP_FAIL"):
                await send({"type": "lifespan.startup.failed", "message": os.environ["STARTUP_FAIL"]})
                return
            if os.environ.get("HUP_DIR"):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _hup)
            EVENTS["lifespan"].append("startup")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            EVENTS["lifespan"].append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return


def app(scope, receive, send):
    """A plain function, as the gateway is: a few paths return None and answer from callbacks."""
    if scope["type"] == "http":
        extensions = scope["extensions"]
        path = scope["path"]
        loop = asyncio.get_running_loop()
        if path == "/later":  # answered by RESPOND from a timer: no task at all
            ms = int(parse_qs(scope["query_string"].decode())["ms"][0])
            loop.call_later(ms / 1000, extensions["bridgeway.respond"], send, 200, [], b"later")
            return None
        if path == "/handover":  # begun without a task, then handed to a coroutine by RUN
            loop.call_soon(extensions["bridgeway.run"], send, _reply(send, 200, b"handed over"))
            return None
        if path == "/raise-now":
            raise RuntimeError("raised before any coroutine")
    return _app(scope, receive, send)


async def _app(scope, receive, send) -> None:
    if scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)
