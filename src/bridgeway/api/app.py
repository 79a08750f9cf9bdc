"""The management API (/api/v1), FastAPI with its OpenAPI at /docs.

It talks to the very objects the data plane uses (the gateway's registry), so there is one
truth. Every route requires the admin bearer token; errors leave in the gateway's one shape.
Refused callers and the changes admitted ones make are recorded in the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from bridgeway import __version__
from bridgeway.api import audit, context, keys, kv, services
from bridgeway.errors import GatewayError, error_body
from bridgeway.observability.tracing import new_span_id, traceparent
from bridgeway.security.keys import public_id

if TYPE_CHECKING:
    from bridgeway.server import Gateway

ADMIN_ROLE = "admin"
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


async def require_admin(request: Request) -> None:
    """The config's admin token (compared in constant time with its hash), or an API key with
    the admin role. Sets `request.state.actor` for the audit records the routers make."""
    gateway: Gateway = request.app.state.gateway
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    credential = "none"
    if scheme.lower() == "bearer" and token:
        expected = gateway.admin_token_sha256
        if expected is not None and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), expected):
            request.state.actor = "admin:token"
            return
        key = await gateway.keys.authenticate(token)
        if key is not None:
            request.state.actor = f"key:{key.id}"
            role = gateway.access.principal_of_key(key).role
            if role != ADMIN_ROLE:
                error = GatewayError("FORBIDDEN", "the management API needs a key with the admin role")
                context.audit(request, "access.forbidden", outcome="failure", role=role, reason=error.message)
                raise error
            return
        credential = "api_key" if token.startswith("bw_") else "bearer"
    error = GatewayError("UNAUTHENTICATED", "a valid admin bearer token or admin API key is required")
    # The kind of credential and a key's public id, never the token: a wrong admin token is
    # often a real one with a typo.
    key_id = public_id(token) if credential == "api_key" else None
    context.audit(
        request, "auth.failed", outcome="failure", credential=credential, key_id=key_id, reason=error.message
    )
    raise error


def build_api(gateway: Gateway) -> FastAPI:
    api = FastAPI(
        title="Bridgeway management API",
        version=__version__,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    api.state.gateway = gateway
    for router in (services.router, kv.router, keys.router, audit.router):
        api.include_router(router, prefix=context.PREFIX, dependencies=[Depends(require_admin)])

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError):
        headers = {"WWW-Authenticate": 'Bearer realm="bridgeway"'} if exc.status == 401 else None
        return _error(request, exc.status, exc.code, exc.message, headers)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, _CODES.get(exc.status_code, "BAD_REQUEST"), str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(
            request, 422, "VALIDATION_ERROR", "; ".join(map(_problem, exc.errors())) or "invalid request"
        )

    return api
