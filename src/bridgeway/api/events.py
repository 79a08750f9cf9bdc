"""/api/v1/events: publish events, read the log, follow it live (SSE, WebSocket), manage webhooks.

Who may: admins everything; other callers the event types their role's `events` grants name,
to publish or to subscribe (webhook management is for admins). A live stream starts after the
position the client names (`Last-Event-ID`, `after` or `from`: a sequence number, `earliest`
or `latest`, the default), so a client that reconnects with the last id it saw misses nothing,
or, when retention trimmed events it had not read, is told so (`event: gap`, `{"type": "gap"}`).
Live streams are capped per worker and per caller (`events.streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from bridgeway.api.auth import caller_of, refuse, require_admin
from bridgeway.api.context import audit
from bridgeway.config.models import WebhookConfig
from bridgeway.errors import GatewayError, error_body
from bridgeway.jobs.events import bus
from bridgeway.jobs.events.webhooks import (
    CURSORS_NS,
    DEAD_NS,
    REPLAY_NS,
    WEBHOOKS_NS,
    Subscription,
    dead_key,
    purge,
    start_cursor,
)
from bridgeway.observability.tracing import new_trace_id
from bridgeway.security import outbound
from bridgeway.state import VersionMismatch

router = APIRouter(tags=["events"])
WebhookName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


def _gateway(request):
    return request.app.state.gateway


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.post("/events", summary="Publish one event (an object) or a batch (a list of them)")
async def publish(request: Request) -> Response:
    gateway = _gateway(request)
    caller = await caller_of(request)
    try:
        events = bus.parse_events(await request.body(), gateway.config.events.max_payload, time.time())
    except bus.BadEvents as exc:
        raise GatewayError(exc.code, str(exc)) from None
    for event in events:
        if not gateway.access.may_use_events(caller, event.event_type, "publish"):
            raise refuse(
                request, caller, f"role {caller.role!r} may not publish events of type {event.event_type!r}"
            )
    return _json({"events": await bus.publish(gateway.event_log, events)})


async def _subscriber(connection, types: str, service: str | None):
    """The caller and the filter its subscription applies, or 401/403."""
    gateway = _gateway(connection)
    caller = await caller_of(connection)
    patterns = [p.strip() for p in types.split(",") if p.strip()]
    if not patterns:
        raise GatewayError("BAD_REQUEST", "types: name at least one event type or glob, e.g. job.*")
    for pattern in patterns:
        if len(pattern) > 200:
            raise GatewayError("BAD_REQUEST", "types: a pattern is at most 200 characters")
        if not gateway.access.may_use_events(caller, pattern, "subscribe"):
            raise refuse(connection, caller, f"role {caller.role!r} may not subscribe to {pattern!r}")
    return caller, bus.event_filter(patterns, service, gateway.access.event_filter(caller))


async def _position(connection, *given: str | None) -> int:
    """The first of `given` that is set: a sequence number, `earliest` (0) or `latest` (default)."""
    value = next((v for v in given if v not in (None, "")), "latest").strip()
    if value == "latest":
        return await _gateway(connection).event_log.last()
    if value == "earliest":
        return 0
    if not value.isdigit() or len(value) > 19:
        raise GatewayError(
            "BAD_REQUEST", f"resume position {value[:40]!r} is not an event id (a number), earliest or latest"
        )
    return int(value)


Types = Annotated[str, Query(description='comma-separated event types or globs, e.g. "job.*,user.created"')]
Service = Annotated[str | None, Query(description="only events with no target_services or naming this one")]
After = Annotated[str | None, Query(description="the last event id seen; earliest or latest")]


@router.get("/events", summary="Read the log: events after a position, a page at a time")
async def read_events(
    request: Request,
    types: Types = "*",
    service: Service = None,
    after: After = "earliest",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    _, accept = await _subscriber(request, types, service)
    log = _gateway(request).event_log
    position = await _position(request, after)
    out: list[bytes] = []
    # a bounded scan: up to 10 pages of the log for one page of matching events
    for _ in range(10):
        batch = await log.read(position, limit)
        if not batch:
            break
        position = batch[-1].seq
        out += [_wire(e) for e in batch if accept(e)]
        if len(out) >= limit:
            out = out[:limit]
            position = int(orjson.loads(out[-1])["id"])
            break
    return Response(
        b'{"events":[' + b",".join(out) + b'],"next":"%d"}' % position, media_type="application/json"
    )


def _wire(event) -> bytes:
    """An event as the API, the WebSocket and `bridgeway events tail` see it: its id and itself."""
    return b'{"id":"%d","event":%s}' % (event.seq, event.body)


def _live_streams(connection) -> bus.LiveStreams:
    """This worker's live streams (one API app per worker)."""
    app_state = connection.app.state
    if not hasattr(app_state, "live_streams"):
        app_state.live_streams = bus.LiveStreams()
    return app_state.live_streams


class _LiveResponse(StreamingResponse):
    """A streaming response that gives its live-stream slot back when it ends, however it ends."""

    def __init__(self, content, release) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get("/events/stream", summary="Follow the log as server-sent events; resumes from Last-Event-ID")
async def stream(
    request: Request,
    types: Types = "*",
    service: Service = None,
    after: After = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
) -> StreamingResponse:
    caller, accept = await _subscriber(request, types, service)
    gateway = _gateway(request)
    position = await _position(request, request.headers.get("last-event-id"), after, from_)
    heartbeat = gateway.config.events.heartbeat

    async def body():
        yield b"retry: 1000\n: subscribed after %d\n\n" % position
        async for page in bus.follow(gateway.event_log, position, accept, heartbeat):
            if isinstance(page, bus.Gap):
                # its id moves the client's Last-Event-ID past the gap: a reconnect resumes there
                yield b'event: gap\nid: %d\ndata: {"after":"%d","first":"%d"}\n\n' % (
                    page.first - 1,
                    page.after,
                    page.first,
                )
            elif not page:
                yield b": heartbeat\n\n"
            else:
                yield b"".join(b"id: %d\ndata: %s\n\n" % (e.seq, e.body) for e in page)

    streams = _live_streams(request)
    streams.take(caller.id, gateway.config.events.streams)  # last: nothing after it can fail
    return _LiveResponse(body(), lambda: streams.give(caller.id))


@router.websocket("/events/ws")
async def websocket(
    ws: WebSocket,
    types: str = "*",
    service: str | None = None,
    after: str | None = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
) -> None:
    """Follow the log over a WebSocket: text messages `{"id": "12", "event": {...}}`, in order;
    `{"type": "heartbeat"}` while idle; `{"type": "gap", "after": "5", "first": "21"}` when
    retention trimmed events before they were sent. Reconnect with `?after=<last id>` to resume.
    A refused handshake is answered with the standard error and its HTTP status (401, 403, 429, 503)."""
    gateway = _gateway(ws)
    streams = _live_streams(ws)
    try:
        caller, accept = await _subscriber(ws, types, service)
        position = await _position(ws, after, from_)
        streams.take(caller.id, gateway.config.events.streams)
    except GatewayError as exc:
        await _refuse_handshake(ws, exc)
        return
    try:
        await ws.accept()
        await _send_events(ws, gateway, position, accept)
    finally:
        streams.give(caller.id)


async def _refuse_handshake(ws: WebSocket, exc: GatewayError) -> None:
    """The standard error as the handshake's HTTP answer where the server can send one (ours
    can: bridgeway.serving), with its status and Retry-After; else a close before accepting (a 403)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        body = error_body(exc.code, exc.message, new_trace_id())
        headers = {k.decode(): v.decode() for k, v in exc.headers}
        await ws.send_denial_response(Response(body, exc.status, headers, media_type="application/json"))
    else:
        await ws.close(code=4000 + exc.status, reason=exc.message[:120])


async def _send_events(ws: WebSocket, gateway, position: int, accept) -> None:
    async def send_events():
        await ws.send_text(f'{{"type":"subscribed","after":"{position}"}}')
        async for page in bus.follow(gateway.event_log, position, accept, gateway.config.events.heartbeat):
            if isinstance(page, bus.Gap):
                await ws.send_text(f'{{"type":"gap","after":"{page.after}","first":"{page.first}"}}')
            elif not page:
                await ws.send_text('{"type":"heartbeat"}')
            else:
                for e in page:
                    await ws.send_text(_wire(e).decode())

    sender = asyncio.create_task(send_events())
    try:
        # the client says nothing more; receiving notices when it leaves
        while not sender.done():
            receiving = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait({sender, receiving}, return_when=asyncio.FIRST_COMPLETED)
            if receiving in done and receiving.result()["type"] == "websocket.disconnect":
                break
            if receiving not in done:
                receiving.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender


# -- webhooks (admins) ---------------------------------------------------------------------------


def _describe(name: str, sub: Subscription, origin: str, cursor: int | None) -> dict:
    return {
        "name": name,
        "origin": origin,
        "types": list(sub.types),
        "url": sub.url,
        "service": sub.service,
        "start": sub.start,
        "timeout": sub.timeout,
        "cursor": None if cursor is None else str(cursor),
    }


@router.get("/events/webhooks", summary="Webhook subscriptions, from config and the API, with cursors")
async def list_webhooks(request: Request) -> Response:
    await require_admin(request)
    gateway = _gateway(request)
    out = []
    configured = gateway.webhooks.configured
    for name, sub in sorted((await gateway.webhooks.subscriptions()).items()):
        entry = await gateway.state.get(CURSORS_NS, name)
        cursor = int(entry.value) if entry is not None else None
        out.append(_describe(name, sub, "config" if name in configured else "api", cursor))
    return _json({"webhooks": out})


@router.put("/events/webhooks/{name}", summary="Create or replace a webhook subscription")
async def put_webhook(request: Request, name: WebhookName) -> Response:
    await require_admin(request)
    gateway = _gateway(request)
    if name in gateway.webhooks.configured:
        raise GatewayError("CONFLICT", f"webhook {name!r} is declared in the config; change it there")
    try:
        config = WebhookConfig.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise GatewayError("VALIDATION_ERROR", "; ".join(problems)) from None
    if not (verdict := outbound.check_url(config.url, gateway.outbound)).allowed:
        raise GatewayError("URL_NOT_ALLOWED", f"url: refused by the outbound policy: {verdict.reason}")
    stored = config.model_dump(mode="json") | {"secret": config.secret.get_secret_value()}
    existed = await gateway.state.get(WEBHOOKS_NS, name) is not None
    sub = Subscription.of(name, config)
    await start_cursor(gateway.state, gateway.event_log, sub)  # before it exists: nothing is missed
    await gateway.state.put(WEBHOOKS_NS, name, orjson.dumps(stored))
    audit(request, "webhook.updated" if existed else "webhook.created", webhook=name, types=list(sub.types))
    entry = await gateway.state.get(CURSORS_NS, name)
    return _json(_describe(name, sub, "api", int(entry.value) if entry else None), 200 if existed else 201)


@router.delete(
    "/events/webhooks/{name}", status_code=204, summary="Delete an API-made webhook and its cursor"
)
async def delete_webhook(request: Request, name: WebhookName) -> Response:
    await require_admin(request)
    gateway = _gateway(request)
    if name in gateway.webhooks.configured:
        raise GatewayError("CONFLICT", f"webhook {name!r} is declared in the config; remove it there")
    if not await gateway.state.delete(WEBHOOKS_NS, name):
        raise GatewayError("NOT_FOUND", f"no webhook named {name!r}")
    # a post in flight here would write its dead letter or cursor back after the purge
    await gateway.webhooks.forget(name)
    await gateway.state.delete(CURSORS_NS, name)
    await purge(gateway.state, REPLAY_NS + name)
    await purge(gateway.state, DEAD_NS + name)
    audit(request, "webhook.deleted", webhook=name)
    return Response(status_code=204)


# -- dead letters (admins) -------------------------------------------------------------------------

DeadLetterId = Annotated[str, Path(pattern=r"^[0-9]{1,19}$", description="the event's id (sequence number)")]


async def _webhook(request: Request, name: str):
    """The gateway, once the caller is an admin and `name` a webhook; else 401/403/404."""
    await require_admin(request)
    gateway = _gateway(request)
    if name not in gateway.webhooks.configured and await gateway.state.get(WEBHOOKS_NS, name) is None:
        raise GatewayError("NOT_FOUND", f"no webhook named {name!r}")
    return gateway


@router.get(
    "/events/webhooks/{name}/dead-letters",
    summary="Events a webhook gave up on after its attempts, oldest first, a page at a time",
)
async def list_dead_letters(
    request: Request,
    name: WebhookName,
    after: Annotated[
        str | None, Query(pattern=r"^[0-9]{1,19}$", description="the last id of the page before")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    gateway = await _webhook(request, name)
    page = await gateway.state.list(
        DEAD_NS + name, limit=limit, after=dead_key(int(after)) if after else None
    )
    replaying = len(await gateway.state.list(REPLAY_NS + name, limit=1000))
    following = b'"%d"' % int(page[-1][0]) if len(page) == limit else b"null"
    return Response(
        b'{"dead_letters":[%s],"next":%s,"replaying":%d}'
        % (b",".join(entry.value for _, entry in page), following, replaying),
        media_type="application/json",
    )


async def _replay(gateway, name: str, key: str, entry) -> None:
    """Hand a dead letter to the subscription's deliverer: in the replay list first, then out
    of the dead letters, so a crash in between leaves it in both, never in neither."""
    await gateway.state.put(REPLAY_NS + name, key, entry.value)
    # only the version copied: the deliverer may already have replayed it and buried it again
    with contextlib.suppress(VersionMismatch):
        await gateway.state.delete(DEAD_NS + name, key, if_version=entry.version)


@router.post(
    "/events/webhooks/{name}/dead-letters/{id}/replay",
    status_code=202,
    summary="Post one dead letter again (before the events after the cursor)",
)
async def replay_dead_letter(request: Request, name: WebhookName, id: DeadLetterId) -> Response:  # noqa: A002
    gateway = await _webhook(request, name)
    key = dead_key(int(id))
    entry = await gateway.state.get(DEAD_NS + name, key)
    if entry is None:
        raise GatewayError("NOT_FOUND", f"webhook {name!r} has no dead letter {id}")
    await _replay(gateway, name, key, entry)
    audit(request, "webhook.replayed", webhook=name, events=1)
    return _json({"replaying": 1}, 202)


@router.post(
    "/events/webhooks/{name}/dead-letters/replay", status_code=202, summary="Post every dead letter again"
)
async def replay_dead_letters(request: Request, name: WebhookName) -> Response:
    gateway = await _webhook(request, name)
    count, after = 0, None
    # one pass in key order: a letter refused again while this runs is not moved (or counted)
    # twice, and a receiver still down does not keep the loop going
    while page := await gateway.state.list(DEAD_NS + name, limit=500, after=after):
        for key, entry in page:
            await _replay(gateway, name, key, entry)
        count += len(page)
        after = page[-1][0]
    audit(request, "webhook.replayed", webhook=name, events=count)
    return _json({"replaying": count}, 202)


@router.delete("/events/webhooks/{name}/dead-letters", summary="Drop every dead letter of a webhook")
async def purge_dead_letters(request: Request, name: WebhookName) -> Response:
    gateway = await _webhook(request, name)
    count = await purge(gateway.state, DEAD_NS + name)
    audit(request, "webhook.purged", webhook=name, events=count)
    return _json({"purged": count})


@router.delete("/events/webhooks/{name}/dead-letters/{id}", status_code=204, summary="Drop one dead letter")
async def purge_dead_letter(request: Request, name: WebhookName, id: DeadLetterId) -> Response:  # noqa: A002
    gateway = await _webhook(request, name)
    if not await gateway.state.delete(DEAD_NS + name, dead_key(int(id))):
        raise GatewayError("NOT_FOUND", f"webhook {name!r} has no dead letter {id}")
    audit(request, "webhook.purged", webhook=name, events=1)
    return Response(status_code=204)
