"""Bridgeway's own HTTP/1.1 + WebSocket ASGI server (uvloop + httptools, `websockets` for framing).

    serve(load_app, Settings(host=..., port=...), workers=N)   # from Python
    python -m bridgeway.serving module:app --host H --port P [--workers N] [--factory]

Modules: `http` (one connection: parsing, keep-alive, pipelining, flow control), `websocket`
(the upgrade and the ASGI websocket scope), `outbox` (writes held to the end of the loop's turn,
shared with the upstream client), `worker` (one process: loop, lifespan, time-outs,
graceful stop), `supervisor` (the shared socket, the workers, signals).
"""

from bridgeway.serving.supervisor import serve
from bridgeway.serving.worker import Settings

__all__ = ["Settings", "serve"]
