"""The OAuth2 endpoints: token (client credentials), revocation, and the discovery documents.

They speak OAuth's own wire format (form-encoded requests, RFC 6749 5.2 error bodies), not the
gateway's error shape: OAuth client libraries parse exactly that.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qsl, unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bridgeway.api import context
from bridgeway.security.jwt import InvalidToken
from bridgeway.security.oauth import OAuthError

router = APIRouter(tags=["oauth"])
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def oauth_error(exc: OAuthError) -> JSONResponse:
    headers = dict(_NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="bridgeway"'
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description}, status_code=exc.status, headers=headers
    )


async def _form(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise OAuthError(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
    try:
        return dict(parse_qsl((await request.body()).decode(), strict_parsing=False))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(400, "invalid_request", "the body is not a valid form") from None


def _client(request: Request, form: dict[str, str]) -> str:
    """The authenticated client's id: HTTP Basic (RFC 6749 2.3.1: both parts form-encoded), or
    client_id and client_secret in the body."""
    issuer = request.app.state.gateway.oauth
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            client_id, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError(401, "invalid_client", "malformed Basic credentials") from None
        client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    else:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
    if not client_id or not secret or not issuer.authenticate_client(client_id, secret):
        context.audit(
            request, "auth.failed", outcome="failure", credential="client_secret", client_id=client_id[:100]
        )
        raise OAuthError(401, "invalid_client", "client authentication failed")
    request.state.actor = f"client:{client_id}"
    return client_id


@router.post("/oauth/token", summary="Client credentials grant: a short-lived signed JWT")
async def token(request: Request) -> Response:
    form = await _form(request)
    client_id = _client(request, form)
    if form.get("grant_type") != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type", "only grant_type=client_credentials is supported")
    issued = await request.app.state.gateway.oauth.issue(client_id)
    context.audit(request, "oauth.token_issued", expires_in=issued["expires_in"])
    return JSONResponse(issued, headers=_NO_STORE)


@router.post("/oauth/revoke", summary="Revoke a token (RFC 7009): refused on every replica")
async def revoke(request: Request) -> Response:
    gateway = request.app.state.gateway
    form = await _form(request)
    client_id = _client(request, form)
    token = form.get("token")
    if not token:
        raise OAuthError(400, "invalid_request", "token is required")
    try:
        claims = await gateway.verifier.verify(token)
    except InvalidToken:
        return Response(status_code=200)  # RFC 7009 2.2: an invalid token needs no revoking
    # A client revokes only its own tokens; others' are answered alike, so none can be probed.
    if claims.issuer == gateway.oauth.issuer and claims.subject == client_id:
        await gateway.oauth.revoke(claims)
        context.audit(request, "oauth.token_revoked", jti=claims.jti)
    return Response(status_code=200)


@router.get("/.well-known/jwks.json", summary="The public keys that verify the gateway's tokens")
async def jwks(request: Request) -> JSONResponse:
    keys = await request.app.state.gateway.oauth.signing.jwks()
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})


@router.get("/.well-known/openid-configuration", summary="Discovery: issuer, endpoints, algorithms")
async def discovery(request: Request) -> JSONResponse:
    base_url = str(request.base_url).rstrip("/")
    return JSONResponse(request.app.state.gateway.oauth.discovery(base_url))
