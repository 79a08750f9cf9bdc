"""WebSocket proxying: accept the client once the upstream accepted, then pump frames both ways.

Off the hot path, so it uses aiohttp's client. The upstream is chosen by the service's balancer
and guarded by its breaker like any request; the upstream's chosen subprotocol is passed back.
The caller is authenticated and authorised like any /bridge request (rate limits are not drawn:
a connection is not a request).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bridgeway.dataplane.proxy import HOP_BY_HOP, parse_target
from bridgeway.dataplane.service import Service
from bridgeway.errors import GatewayError
from bridgeway.security.access import Access

# The handshake headers aiohttp writes itself.
_HANDSHAKE = HOP_BY_HOP | {
    b"host",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"content-length",
}


def _credential(headers) -> tuple[str | None, list[tuple[str, str]]]:
    """The caller's credential, and the headers to forward: a gateway key is consumed, a JWT
    passed on, as on HTTP routes."""
    credential = None
    out = []
    for name, value in headers:
        if name in _HANDSHAKE:
            continue
        if name == b"authorization" and value[:10].lower() in (b"bearer bw_", b"bearer eyj"):
            credential = value[7:].strip().decode("latin-1")
            if value[7:10] == b"bw_":
                continue
        elif name == b"x-api-key" and value.startswith(b"bw_"):
            credential = value.strip().decode("latin-1")
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    return credential, out


async def proxy_websocket(
    service: Service, scope: dict, receive, send, prefix_len: int, access: Access
) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    credential, headers = _credential(scope["headers"])
    try:
        target = parse_target(scope, prefix_len)
        if credential is not None or access.required:
            await access.check(credential, service.name, "GET", target)
    except GatewayError as exc:
        # Closing before the accept refuses the handshake (the server answers 403).
        await send({"type": "websocket.close", "code": {401: 4401, 403: 4403}.get(exc.status, 1008)})
        return
    now = time.monotonic()
    inst = service.balancer.pick(service.instances, now)
    ticket = service.breaker.admit(now) if inst is not None else None
    if ticket is None:
        await send({"type": "websocket.close", "code": 1013})  # try again later
        return
    url = "ws" + inst.url[4:] + service.base_paths[inst.url].decode() + target.decode("latin-1")
    session = aiohttp.ClientSession(auto_decompress=False)
    inst.inflight += 1
    try:
        try:
            upstream = await session.ws_connect(
                url,
                headers=headers,
                protocols=scope.get("subprotocols") or (),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                max_msg_size=0,
                autoping=True,
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            service.breaker.record(ticket, False, time.monotonic())
            inst.outlier.record(False, time.monotonic())
            await send({"type": "websocket.close", "code": 1014})  # bad gateway
            return
        service.breaker.record(ticket, True, time.monotonic())
        await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
        await _pump(upstream, receive, send)
    finally:
        inst.inflight -= 1
        await session.close()


async def _pump(upstream: aiohttp.ClientWebSocketResponse, receive, send) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=message.get("code", 1000))
                return
            if message.get("text") is not None:
                await upstream.send_str(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])

    async def upstream_to_client() -> None:
        async for msg in upstream:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
        await send({"type": "websocket.close", "code": upstream.close_code or 1000})

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
