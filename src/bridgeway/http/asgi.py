"""Serve an ASGI application (HTTP only) from `bridgeway.http.server`: for the management API
(FastAPI), not the data plane, which uses `Request`/`Responder` directly.

No lifespan: the gateway starts and stops its own state. No WebSocket scopes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

from bridgeway.http.server import ClientGone, Handler, Request, Responder

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ASGI = {"version": "3.0", "spec_version": "2.4"}  # 2.4: send() raises OSError once the client is gone


def asgi_handler(
    app: ASGIApp, *, root_path: str = "", scheme: str = "http", server: tuple[str, int] | None = None
) -> Handler:
    """A handler for `serve()` that runs `app` for every request."""

    async def handler(request: Request, response: Responder) -> None:
        await app(build_scope(request, root_path, scheme, server), *_Exchange(request, response).channels())

    return handler


def build_scope(
    request: Request, root_path: str = "", scheme: str = "http", server: tuple[str, int] | None = None
) -> Scope:
    raw_path = request.raw_path
    return {
        "type": "http",
        "asgi": _ASGI,
        "http_version": request.http_version,
        "method": request.method,
        "scheme": scheme,
        # latin-1 maps every byte, so an odd byte in a path cannot fail the request here
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": request.query,
        "root_path": root_path,
        "headers": request.headers,
        "client": request.client,
        "server": server,
    }


class _Exchange:
    """One request's receive/send pair. A body of one message is sent with the head in one
    write (`Responder.send`); more messages stream (`start`, `write`, `end`)."""

    __slots__ = ("request", "response", "status", "headers", "body_sent", "done")

    def __init__(self, request: Request, response: Responder) -> None:
        self.request = request
        self.response = response
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_sent = False
        self.done: asyncio.Future[None] | None = None  # set when the response is complete

    def channels(self) -> tuple[Receive, Send]:
        return self.receive, self.send

    async def receive(self) -> Message:
        request = self.request
        if not self.body_sent:  # at least one http.request message, even for an empty body
            try:
                chunk = await request.read()
            except ClientGone:
                return {"type": "http.disconnect"}
            self.body_sent = request.body_done
            return {"type": "http.request", "body": chunk, "more_body": not self.body_sent}
        # After the body the only message left is the disconnect; a finished response counts
        # as one too (apps that listen for it while streaming must stop waiting).
        if not self.response.finished and not request.disconnected:
            loop = asyncio.get_running_loop()
            self.done = self.done or loop.create_future()
            await asyncio.wait((self.done, request.wait_disconnected()), return_when=asyncio.FIRST_COMPLETED)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        response = self.response
        if kind == "http.response.start":
            if self.status is not None:
                raise RuntimeError("http.response.start sent twice")
            self.status = int(message["status"])
            self.headers = [(bytes(name).lower(), bytes(value)) for name, value in message.get("headers", ())]
        elif kind == "http.response.body":
            if self.status is None:
                raise RuntimeError("http.response.body before http.response.start")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not response.started:
                if not more:
                    response.send(self.status, self.headers, body)
                    self._finished()
                    return
                response.start(self.status, self.headers)
            if response.finished:
                raise RuntimeError("response already complete")
            if more:
                await response.write(body)
            else:
                response.end(body)
                self._finished()
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r}")

    def _finished(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
