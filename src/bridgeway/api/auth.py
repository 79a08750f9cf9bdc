"""Who calls the management API, and the admin check most of its routes depend on."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from fastapi import Request

from bridgeway.api import context
from bridgeway.errors import GatewayError
from bridgeway.security.access import ADMIN_ROLE, FOREIGN, Principal
from bridgeway.security.keys import public_id

if TYPE_CHECKING:
    from bridgeway.server import Gateway

ADMIN_TOKEN = Principal("admin:token", ADMIN_ROLE, None)


def credential_kind(token: str | None) -> str:
    """What a refused credential was, for the audit log: never the credential itself."""
    if not token:
        return "none"
    return "api_key" if token.startswith("bw_") else "jwt" if token.count(".") == 2 else "bearer"


async def caller_of(request: Request) -> Principal:
    """Who is calling the management API: the config's admin token (compared in constant time
    with its hash), an API key or a token. Raises 401 otherwise. Sets `request.state.actor` for
    the audit records the routers make."""
    gateway: Gateway = request.app.state.gateway
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if token:
        expected = gateway.admin_token_sha256
        if expected is not None and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), expected):
            request.state.actor = ADMIN_TOKEN.id
            return ADMIN_TOKEN
        caller = await gateway.access.authenticate(token, cached=False)
        if caller is not None and caller is not FOREIGN:
            request.state.actor = caller.id
            return caller
    error = GatewayError("UNAUTHENTICATED", "a valid admin bearer token, API key or token is required")
    # The kind of credential and a key's public id, never the token: a wrong admin token is
    # often a real one with a typo.
    context.audit(
        request,
        "auth.failed",
        outcome="failure",
        credential=credential_kind(token),
        key_id=public_id(token) if token else None,
        reason=error.message,
    )
    raise error


def refuse(request: Request, caller: Principal, message: str) -> GatewayError:
    context.audit(request, "access.forbidden", outcome="failure", role=caller.role, reason=message)
    return GatewayError("FORBIDDEN", message)


async def require_admin(request: Request) -> None:
    caller = await caller_of(request)
    if caller.role != ADMIN_ROLE:
        raise refuse(request, caller, "the management API needs the admin role")
