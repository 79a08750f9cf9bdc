"""The gateway as a small OAuth2 authorization server for machine clients (client credentials).

A client of the `clients:` table that has a `secret` may trade it at `POST /oauth/token` for a
short-lived JWT signed with the gateway's own Ed25519 keys (`SigningKeys`, shared through the
state backend, rotated with overlap). Anyone can verify such a token with the published
`/.well-known/jwks.json`; the gateway itself accepts it on /bridge as that client.

Revocation (`POST /oauth/revoke`, RFC 7009) writes the token's `jti` to the state backend until
the token would have expired anyway; every worker and replica reads it there, behind the one
second cache of `Access`, so a revoked token is refused everywhere within a second.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from bridgeway.config.models import Config
from bridgeway.security.jwt import Claims, SigningKeys
from bridgeway.state import KV

REVOKED = "_revoked"
_NO_SECRET = hashlib.sha256(b"no client has this secret").digest()


class OAuthError(Exception):
    """An answer in RFC 6749 5.2's shape: `{"error": code, "error_description": ...}`."""

    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class TokenIssuer:
    def __init__(self, config: Config, signing: SigningKeys, kv: KV, clock=time.time):
        self.settings = config.auth.oauth
        self.issuer = config.auth.oauth.issuer
        self.signing = signing
        self.kv = kv
        self.clock = clock
        self.clients = config.clients
        # Only hashes are held, and compared in constant time.
        self._secrets = {
            name: hashlib.sha256(c.secret.get_secret_value().encode()).digest()
            for name, c in config.clients.items()
            if c.secret is not None
        }

    def authenticate_client(self, client_id: str, secret: str) -> bool:
        # An unknown client costs the same comparison as a known one: no timing tells them apart.
        expected = self._secrets.get(client_id, _NO_SECRET)
        given = hashlib.sha256(secret.encode()).digest()
        return hmac.compare_digest(given, expected) and client_id in self._secrets

    async def issue(self, client_id: str) -> dict:
        """An access token for an authenticated client, in RFC 6749 5.1's shape."""
        now = int(self.clock())
        ttl = int(self.settings.token_ttl)
        client = self.clients[client_id]
        claims = {
            "iss": self.issuer,
            "sub": client_id,
            "aud": self.settings.audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(12),
            "client_id": client_id,
            "role": client.role,
        }
        token = await self.signing.sign(claims)
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl}

    async def revoke(self, claims: Claims) -> None:
        if claims.jti is None:
            return
        remaining = (claims.expires_at or self.clock()) - self.clock()
        if remaining > 0:
            await self.kv.put(REVOKED, claims.jti, b"", ttl=remaining + 60)  # + the clocks' leeway

    async def revoked(self, jti: str | None) -> bool:
        return jti is not None and await self.kv.get(REVOKED, jti) is not None

    def discovery(self, base_url: str) -> dict:
        """A minimal /.well-known/openid-configuration for a client-credentials server."""
        return {
            "issuer": self.issuer,
            "token_endpoint": f"{base_url}/oauth/token",
            "revocation_endpoint": f"{base_url}/oauth/revoke",
            "jwks_uri": f"{base_url}/.well-known/jwks.json",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "response_types_supported": ["token"],
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
        }
