"""What the management API knows about the request in hand: its trace, who is calling (set by
`require_admin`), and the audit record of what they did. Shared by the app and its routers."""

from __future__ import annotations

from fastapi import Request

from bridgeway.observability.tracing import new_trace_id, parse_traceparent

PREFIX = "/api/v1"  # where every router is mounted


def trace(request: Request) -> tuple[str, str]:
    """(trace_id, flags): continued from the request's traceparent, or started; one per request,
    so an error body and the audit record name the same trace."""
    traced = getattr(request.state, "trace", None)
    if traced is None:
        parent = parse_traceparent(request.headers.get("traceparent", "").encode() or None)
        traced = request.state.trace = parent or (new_trace_id(), "01")
    return traced


def request_fields(request: Request) -> dict:
    """The request's part of an audit record."""
    route = getattr(request.scope.get("route"), "path", None)
    if route is not None and not route.startswith(PREFIX):  # FastAPI versions differ on this
        route = PREFIX + route
    return {
        "trace_id": trace(request)[0],
        "route": route,
        "method": request.scope.get("method", "WEBSOCKET"),
        "path": request.url.path,
        "address": request.client.host if request.client else None,
    }


def audit(request: Request, event: str, *, outcome: str = "success", **details) -> None:
    """Record `event` as done by this request's caller (None until authenticated)."""
    request.app.state.gateway.audit.record(
        event,
        actor=getattr(request.state, "actor", None),
        outcome=outcome,
        **request_fields(request),
        **details,
    )
