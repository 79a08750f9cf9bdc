"""The management API (/api/v1), FastAPI with its OpenAPI at /docs.

It talks to the very objects the data plane uses (the gateway's registry), so there is one
truth. Every route requires the admin role (the config's admin token or an admin API key), except
the KV store and the event bus, which roles may be granted namespaces and event types of, and the
routing decision (/ai/route), which answers any caller about the models its role may use; errors
leave in the gateway's one shape.
Refused callers and the changes admitted ones make are recorded in the audit log.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from bridgeway import __version__
from bridgeway.api import ai, audit, context, events, keys, kv, oauth, queues, services, spend
from bridgeway.api.auth import require_admin
from bridgeway.errors import GatewayError, error_body
from bridgeway.observability.tracing import new_span_id, traceparent
from bridgeway.security.oauth import OAuthError

if TYPE_CHECKING:
    from bridgeway.server import Gateway

_CODES = {
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
}


def _error(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> Response:
    trace_id, flags = context.trace(request)
    body = error_body(code, message, trace_id)
    headers = {**(headers or {}), "traceparent": traceparent(trace_id, new_span_id(), flags).decode()}
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _problem(err: dict) -> str:
    """`field: why`, as config errors read."""
    if err["type"] == "json_invalid":
        return f"body: not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
    field = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
    return f"{field}: {str(err['msg']).removeprefix('Value error, ')}"


def _gateway_error(request: Request, exc: GatewayError) -> Response:
    headers = {name.decode(): value.decode() for name, value in exc.headers}  # e.g. Retry-After
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="bridgeway"'
    return _error(request, exc.status, exc.code, exc.message, headers)


# The queue calls producers and workers make by the thousand: POST .../{queue}/jobs|claim|settle.
_QUEUE_CALL = re.compile(r"/api/v1/queues/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/(jobs|claim|settle)")
_QUEUE_HANDLERS = {"jobs": queues.enqueue, "claim": queues.claim, "settle": queues.settle}


def queue_call(scope: dict):
    """(handler, queue) when the request is one of the hot queue calls, else None."""
    if scope["method"] != "POST" or (match := _QUEUE_CALL.fullmatch(scope["path"])) is None:
        return None
    return _QUEUE_HANDLERS[match[2]], match[1]


async def serve_queue_call(api: FastAPI, call, scope: dict, receive, send) -> None:
    """The same handlers as the routes in api/queues.py, given a Starlette Request directly:
    FastAPI's per-request machinery (routing, dependencies, middleware) is most of the time of
    a small call, and an idle queue's latency is two such calls (measured: ~2 ms of ~2.1 ms
    in-process for a single-job enqueue). Errors leave in the same shape."""
    handler, queue = call
    request = Request({**scope, "app": api, "path_params": {"queue": queue}}, receive)
    try:
        response = await handler(request, queue)
    except GatewayError as exc:
        response = _gateway_error(request, exc)
    except Exception:  # noqa: BLE001 - as FastAPI would: logged, answered 500 in the one shape
        api.state.gateway.log.exception("internal_error", route=scope["path"])
        response = _error(request, 500, "INTERNAL", "internal error")
    await response(scope, receive, send)


def build_api(gateway: Gateway) -> FastAPI:
    api = FastAPI(
        title="Bridgeway management API",
        version=__version__,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    api.state.gateway = gateway
    for router in (services.router, keys.router, audit.router, spend.router):
        api.include_router(router, prefix=context.PREFIX, dependencies=[Depends(require_admin)])
    # The KV store is also for services: a role's `kv` grants open namespaces to its callers.
    api.include_router(kv.router, prefix=context.PREFIX, dependencies=[Depends(kv.require_kv_access)])
    # The routing decision: any authenticated caller, about the models its role may use.
    api.include_router(ai.router, prefix=context.PREFIX)
    # Events: roles may be granted event types; each route checks its caller itself.
    api.include_router(events.router, prefix=context.PREFIX)
    # Queues check their callers per route: roles may be granted queues to produce or consume.
    api.include_router(queues.router, prefix=context.PREFIX)
    api.include_router(oauth.router)  # its own client authentication, its own error shape

    @api.exception_handler(OAuthError)
    async def oauth_failure(request: Request, exc: OAuthError):
        return oauth.oauth_error(exc)

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError):
        return _gateway_error(request, exc)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, _CODES.get(exc.status_code, "BAD_REQUEST"), str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(
            request, 422, "VALIDATION_ERROR", "; ".join(map(_problem, exc.errors())) or "invalid request"
        )

    return api
