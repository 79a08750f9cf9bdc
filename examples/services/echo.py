"""Echo service: a plain ASGI app that reflects what it received, for proxy tests and the tour.

Serve it with::

    python -m bridgeway.serving --app-dir examples/services echo:app

Any path answers with JSON describing the request as received::

    {"instance", "method", "path", "raw_path", "query", "http_version", "scheme", "client",
     "headers": [[name, value], ...], "body_bytes", "body_sha256"}

The request body is hashed while it streams in, so a 1 GB upload needs no memory to speak of.

Special paths (exact):
    /status/{code}            answer with that status (200..599), echo JSON as body
    /delay/{ms}               wait ms milliseconds (after reading the body), then echo
    /bytes/{n}                n bytes of the pattern b"0123456789abcdef", in 64 KiB chunks, with
                              Content-Length; ?chunked=1 streams without Content-Length
    /stream/{n}               n chunks "chunk {i}\\n" with ?interval_ms=100 between them
    /sse/{n}                  text/event-stream, n events "id: i\\ndata: {...}\\n\\n", ?interval_ms=100
    /headers/{name}           echo JSON with each query parameter added as a response header, e.g.
                              /headers/a?cache-control=max-age%3D5 (for cache tests)
    /health                   200 {"status": "ok"} or 503 {"status": "failing"}
    POST /health/fail|ok      make /health fail or recover
    GET /count                {"counts": {"POST /x": 1, ...}, "total": N} requests served by this
                              process (per method + path; /count itself is not counted)
    POST /count/reset         reset the counters
    websocket at any path     echo every text/binary message back until the client closes

Every HTTP response carries ``X-Instance`` (env ``ECHO_NAME``, default ``echo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - orjson is a Bridgeway dependency
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


INSTANCE = os.environ.get("ECHO_NAME", "echo")
PATTERN = b"0123456789abcdef"
CHUNK = 64 * 1024
PATTERN_CHUNK = PATTERN * (CHUNK // len(PATTERN))  # every chunk starts at a multiple of 16
MAX_DELAY_MS = 600_000

_state: dict[str, Any] = {"healthy": True}
_counts: Counter[str] = Counter()

_INSTANCE_HEADER = (b"x-instance", INSTANCE.encode("latin-1"))
_JSON = (b"content-type", b"application/json")


def pattern_bytes(n: int) -> bytes:
    """The first n bytes that /bytes/{n} sends (for tests: compare or hash)."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


async def _read_body(receive: Any) -> tuple[int, str, bool]:
    """Drain the request body, hashing it incrementally. Returns (size, sha256 hex, disconnected)."""
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return size, digest.hexdigest(), True
        chunk = message.get("body", b"")
        if chunk:
            digest.update(chunk)
            size += len(chunk)
        if not message.get("more_body", False):
            return size, digest.hexdigest(), False


def _describe(scope: dict, size: int, sha: str) -> dict[str, Any]:
    raw_path = scope.get("raw_path") or scope["path"].encode()
    client = scope.get("client")
    return {
        "instance": INSTANCE,
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": raw_path.decode("latin-1"),
        "query": scope.get("query_string", b"").decode("latin-1"),
        "http_version": scope.get("http_version"),
        "scheme": scope.get("scheme"),
        "client": list(client) if client else None,
        "headers": [[k.decode("latin-1").lower(), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_bytes": size,
        "body_sha256": sha,
    }


async def _send_json(send: Any, status: int, obj: Any, head: bool = False, extra: list | None = None) -> None:
    body = b"" if status in (204, 304) else dumps(obj)
    headers = [_JSON, _INSTANCE_HEADER, *(extra or ())]
    if status not in (204, 304):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _query(scope: dict) -> dict[str, str]:
    qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {k: v[-1] for k, v in qs.items()}


def _int_arg(text: str, lo: int, hi: int) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if lo <= value <= hi else None


class _Watch:
    """Watch for the client going away while we stream a response.

    Once the request body has been read, the next ``receive()`` only returns when the client
    disconnects. Granian does not raise from ``send`` after a disconnect, so streaming loops
    check ``gone`` (and sleep on ``wait``) to stop promptly instead of generating into the void.
    """

    def __init__(self, receive: Any) -> None:
        self.event = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.event.set()

    @property
    def gone(self) -> bool:
        return self.event.is_set()

    async def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the client disconnected meanwhile."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), seconds)
        return self.gone

    def close(self) -> None:
        self._task.cancel()


async def _stream_bytes(send: Any, watch: _Watch, n: int, chunked: bool) -> None:
    headers = [(b"content-type", b"application/octet-stream"), _INSTANCE_HEADER]
    if not chunked:
        headers.append((b"content-length", str(n).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    remaining = n
    while remaining > 0 and not watch.gone:
        size = min(CHUNK, remaining)
        remaining -= size
        chunk = PATTERN_CHUNK if size == CHUNK else PATTERN_CHUNK[:size]
        await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
    if n == 0:
        await send({"type": "http.response.body", "body": b""})


async def _stream_lines(send: Any, watch: _Watch, n: int, interval: float, sse: bool) -> None:
    ctype = b"text/event-stream" if sse else b"text/plain; charset=utf-8"
    headers = [(b"content-type", ctype), (b"cache-control", b"no-cache"), _INSTANCE_HEADER]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(n):
        if i and await watch.wait(interval):
            return
        if sse:
            data = b"id: %d\ndata: " % i + dumps({"i": i, "instance": INSTANCE}) + b"\n\n"
        else:
            data = b"chunk %d\n" % i
        await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _http(scope: dict, receive: Any, send: Any) -> None:
    method: str = scope["method"]
    path: str = scope["path"]
    head = method == "HEAD"

    if path == "/count":
        await _read_body(receive)
        await _send_json(send, 200, {"counts": dict(_counts), "total": sum(_counts.values())}, head)
        return
    if path == "/count/reset" and method == "POST":
        await _read_body(receive)
        _counts.clear()
        await _send_json(send, 200, {"counts": {}, "total": 0})
        return
    _counts[f"{method} {path}"] += 1

    size, sha, gone = await _read_body(receive)
    if gone:
        return
    echo = _describe(scope, size, sha)

    if path == "/health":
        ok = _state["healthy"]
        await _send_json(send, 200 if ok else 503, {"status": "ok" if ok else "failing"}, head)
        return
    if path in ("/health/fail", "/health/ok") and method == "POST":
        _state["healthy"] = path == "/health/ok"
        await _send_json(send, 200, {"status": "ok" if _state["healthy"] else "failing"})
        return

    prefix, _, arg = path[1:].partition("/")
    if arg and "/" not in arg:
        if prefix == "status":
            code = _int_arg(arg, 200, 599)
            if code is None:
                await _send_json(send, 400, {"error": "status must be an integer 200..599"})
            else:
                await _send_json(send, code, echo, head)
            return
        if prefix == "delay":
            ms = _int_arg(arg, 0, MAX_DELAY_MS)
            if ms is None:
                await _send_json(send, 400, {"error": f"delay must be an integer 0..{MAX_DELAY_MS} ms"})
                return
            watch = _Watch(receive)
            try:
                if await watch.wait(ms / 1000.0):
                    return  # the caller gave up (e.g. a gateway timeout): nothing to answer
            finally:
                watch.close()
            await _send_json(send, 200, echo, head)
            return
        if prefix == "headers":
            extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in _query(scope).items()]
            await _send_json(send, 200, echo, head, extra)
            return
        if prefix in ("bytes", "stream", "sse"):
            n = _int_arg(arg, 0, 1 << 40)
            if n is None:
                await _send_json(send, 400, {"error": f"{prefix} count must be a non-negative integer"})
                return
            q = _query(scope)
            interval_ms = _int_arg(q.get("interval_ms", "100"), 0, MAX_DELAY_MS)
            if interval_ms is None:
                await _send_json(send, 400, {"error": f"interval_ms must be an integer 0..{MAX_DELAY_MS}"})
                return
            watch = _Watch(receive)
            try:
                if prefix == "bytes":
                    await _stream_bytes(send, watch, n, q.get("chunked", "0") not in ("", "0", "false"))
                else:
                    await _stream_lines(send, watch, n, interval_ms / 1000.0, sse=prefix == "sse")
            finally:
                watch.close()
            return

    await _send_json(send, 200, echo, head)


async def _websocket(scope: dict, receive: Any, send: Any) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    _counts[f"WS {scope['path']}"] += 1
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
        elif kind == "websocket.disconnect":
            return


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict, receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "http":
        await _http(scope, receive, send)
    elif kind == "websocket":
        await _websocket(scope, receive, send)
    elif kind == "lifespan":
        await _lifespan(receive, send)
