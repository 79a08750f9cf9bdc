"""Who calls the management API, and the admin check most of its routes depend on."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from fastapi import Request

from bridgeway.errors import GatewayError
from bridgeway.security.access import ADMIN_ROLE, FOREIGN, Principal

if TYPE_CHECKING:
    from bridgeway.server import Gateway

ADMIN_TOKEN = Principal("admin-token", ADMIN_ROLE, None)


async def caller_of(request: Request) -> Principal:
    """Who is calling the management API: the config's admin token (compared in constant time
    with its hash), or an API key. Raises 401 otherwise."""
    gateway: Gateway = request.app.state.gateway
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        expected = gateway.admin_token_sha256
        if expected is not None and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), expected):
            return ADMIN_TOKEN
        caller = await gateway.access.authenticate(token, cached=False)
        if caller is not None and caller is not FOREIGN:
            return caller
    raise GatewayError("UNAUTHENTICATED", "a valid admin bearer token or API key is required")


async def require_admin(request: Request) -> None:
    if (await caller_of(request)).role != ADMIN_ROLE:
        raise GatewayError("FORBIDDEN", "the management API needs the admin role")
