"""The `floor` row of bench/llm.py: the server stack Bridgeway runs on, without Bridgeway.

An ASGI app on bridgeway.serving (1 worker, as `bridgeway serve` runs) that reads the request
body, makes one call over the gateway's own pooled upstream client (`UpstreamPool`) to the fake
OpenAI provider, and answers the provider's body as it came: no authentication, no routing, no
JSON parsing, no translation. What Bridgeway's rows cost above this row is the gateway's own
work; this row's cost is the HTTP server, the event loop and the socket system calls.

    BENCH_UPSTREAM_PORT=PORT python -m bridgeway.serving --app-dir bench llm_floor_app:app
"""

from __future__ import annotations

import os

from bridgeway.dataplane.upstream import UpstreamPool

_TARGET = b"/v1/chat/completions"
_HEADERS = ((b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench-upstream"))
_JSON = [(b"content-type", b"application/json")]
_pool: UpstreamPool | None = None


async def app(scope, receive, send) -> None:
    global _pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if _pool is None:  # made in the worker's running loop
        _pool = UpstreamPool("127.0.0.1", int(os.environ["BENCH_UPSTREAM_PORT"]))
    resp = await _pool.request(b"POST", _TARGET, _HEADERS, body)
    try:
        answer = await resp.read()
    finally:
        resp.release()
    await send({"type": "http.response.start", "status": resp.status, "headers": _JSON})
    await send({"type": "http.response.body", "body": answer})
