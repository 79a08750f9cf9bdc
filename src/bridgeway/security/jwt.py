"""JSON Web Tokens: verification of tokens from configured issuers, and the gateway's own signing keys.

`JwtVerifier` trusts nothing a token says about how to check it. The unverified `iss` and `kid`
only choose a key, and every key is bound to one algorithm when it is loaded (RSA -> RS256,
EC P-256 -> ES256, Ed25519 -> EdDSA, a configured secret -> HS256); PyJWT then verifies with that
one algorithm. So `alg: none` and algorithm confusion (an HS256 token "signed" with a public key)
fail before any cryptography runs. Symmetric keys come only from config, never from a remote JWKS,
whose publisher could otherwise mint tokens. `exp` is required; `exp`, `nbf` and `iat` are
checked against the injected clock with the issuer's leeway.

A JWKS is cached per issuer for `jwks_cache`. A token with an unknown `kid` causes at most one
refetch, so an issuer's rotated key is picked up without a restart; such refetches are throttled
to one per 10 s per issuer so made-up kids cannot hammer the issuer, and concurrent callers share
one fetch.

`SigningKeys` keeps the gateway's Ed25519 keys in the state backend, so every worker and replica
signs with the same current key and verifies the previous one during the overlap. The whole key
ring is one record, created and rotated by compare-and-set, so racing replicas agree on one key.
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bridgeway.config.models import JwtIssuerConfig
from bridgeway.observability.logs import get_logger
from bridgeway.state import KV, VersionMismatch

__all__ = ["Claims", "InvalidToken", "JwtVerifier", "SigningKey", "SigningKeys", "load_public_key"]

log = get_logger("bridgeway.jwt")

FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1 << 20
UNKNOWN_KID_REFETCH_EVERY = 10.0
VERIFIED_CACHE_SECONDS = 60.0
VERIFIED_CACHE_MAX = 10_000

NAMESPACE = "_signing"
KEYRING = "keyring"
KEYRING_CACHE_SECONDS = 5.0
UNKNOWN_LOCAL_KID_RELOAD_EVERY = 1.0

_ASYMMETRIC = frozenset({"RS256", "ES256", "EdDSA"})
_JWK_ALGORITHMS = {("RSA", None): "RS256", ("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "EdDSA"}


class InvalidToken(Exception):
    """A token was refused; `reason` is short and safe to show (it never contains the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    issuer: str
    subject: str
    role: str | None  # None: no role maps; the caller refuses with 403
    expires_at: float | None
    jti: str | None  # for the caller's revocation check
    raw: dict  # the verified payload, shared by cache hits: read it, do not change it


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any  # a cryptography public key, or the HS256 secret bytes
    algorithm: str  # the one algorithm this key verifies


def _algorithm_of(key: Any) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256" if key.key_size >= 2048 else None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256" if isinstance(key.curve, ec.SECP256R1) else None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    return None


def load_public_key(pem: str, issuer: str = "") -> tuple[Any, str]:
    """A static PEM public key and the one algorithm it verifies; ValueError when it is unusable."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"issuer {issuer!r}: public_key is not a PEM public key") from None
    algorithm = _algorithm_of(key)
    if algorithm is None:
        raise ValueError(
            f"issuer {issuer!r}: public_key must be RSA (2048 bits or more), EC P-256 or Ed25519"
        )
    return key, algorithm


def _parse_jwks(document: Any) -> dict[str | None, _Key]:
    """kid -> key for every usable signing key; anything else in the document is skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str | None, _Key] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue  # encryption keys are not for us
        kty = jwk.get("kty")
        crv = None if kty == "RSA" else jwk.get("crv")
        if not isinstance(kty, str) or not isinstance(crv, str | None):
            continue  # one malformed key must not cost the issuer its whole set
        # oct is absent from the table on purpose: a symmetric key from a URL lets its publisher sign
        algorithm = _JWK_ALGORITHMS.get((kty, crv))
        if algorithm is None or jwk.get("alg", algorithm) != algorithm:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid = jwk.get("kid")
        # public keys only (a published private key is a leak, not a key), RSA of 2048 bits or more
        if _algorithm_of(key) == algorithm and (kid is None or isinstance(kid, str)):
            keys.setdefault(kid, _Key(key, algorithm))
    return keys


class _Issuer:
    """One issuer's rules (its config) and keys: static (secret, PEM, the gateway's own) or a cached JWKS."""

    def __init__(self, config: JwtIssuerConfig, *, local: bool = False) -> None:
        self.config = config
        self.local = local
        self.allowed = frozenset({"EdDSA"} if local else config.algorithms or _ASYMMETRIC)
        self.keys: dict[str | None, _Key] | None = None  # None: a JWKS not fetched yet
        if config.secret is not None:
            self.allowed = frozenset({"HS256"})
            self.keys = {None: _Key(config.secret.get_secret_value().encode(), "HS256")}
        elif config.public_key is not None:
            key, algorithm = load_public_key(config.public_key, config.issuer)
            self.allowed, self.keys = self.allowed & {algorithm}, {None: _Key(key, algorithm)}
        self.fetched_at = -math.inf
        self.refetched_at = -math.inf  # last refetch caused by an unknown kid
        self.fetch: asyncio.Future[bool] | None = None

    def role(self, payload: dict) -> str | None:
        value = payload.get(self.config.role_claim)
        if self.local:  # the gateway's own tokens name the role directly
            return value if isinstance(value, str) and value else None
        if isinstance(value, str):
            values = value.split()
        elif isinstance(value, list):
            values = [v for v in value if isinstance(v, str)]
        else:
            values = []
        roles = self.config.roles
        return next((roles[v] for v in values if v in roles), self.config.default_role)


def _pick(keys: dict[str | None, _Key], kid: str | None) -> _Key | None:
    if kid is None and len(keys) == 1:  # an issuer with one key may leave kid out
        return next(iter(keys.values()))
    return keys.get(kid)  # PyJWT has checked that a kid is a string


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_times(payload: dict, now: float, leeway: float) -> float:
    """The expiry, after checking exp, nbf and iat against `now` (PyJWT would use the real clock)."""
    if payload.get("exp") is None:
        raise InvalidToken("missing exp")
    if not all(_is_time(payload[c]) for c in ("exp", "nbf", "iat") if payload.get(c) is not None):
        raise InvalidToken("invalid claims")
    if payload["exp"] <= now - leeway:
        raise InvalidToken("expired")
    if any(payload.get(c) is not None and payload[c] > now + leeway for c in ("nbf", "iat")):
        raise InvalidToken("not yet valid")
    return float(payload["exp"])


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAudienceError) or (
        isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim == "aud"
    ):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid claims"


class JwtVerifier:
    """Verifies bearer tokens of the configured issuers (and, with `local`, the gateway's own).

    `fetch(url)` may replace the aiohttp download of a JWKS; it returns the parsed document."""

    def __init__(
        self,
        issuers: list[JwtIssuerConfig],
        *,
        local: SigningKeys | None = None,
        local_issuer: str | None = None,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self._issuers = {config.issuer: _Issuer(config) for config in issuers}
        self._local = local
        if (local is None) != (local_issuer is None):
            raise ValueError("local and local_issuer go together")
        if local_issuer is not None:
            if local_issuer in self._issuers:
                raise ValueError(f"issuer {local_issuer!r} is both configured and the gateway's own")
            # defaults only (leeway 30 s, no audience, role and sub claims): trusted, so not validated
            self._issuers[local_issuer] = _Issuer(
                JwtIssuerConfig.model_construct(issuer=local_issuer), local=True
            )
        self._clock = clock
        self._fetch = fetch
        self._session: aiohttp.ClientSession | None = None
        self._verified: dict[str, tuple[Claims, float]] = {}  # token -> (claims, trusted until)

    async def verify(self, token: str) -> Claims:
        """The token's claims, or InvalidToken with a short reason."""
        now = self._clock()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        try:  # unverified: only to choose the issuer and key
            header = jwt.get_unverified_header(token)
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except (jwt.PyJWTError, TypeError, AttributeError):
            raise InvalidToken("malformed token") from None
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken("unknown issuer")
        alg = header.get("alg")
        if alg not in issuer.allowed:  # before any fetch: `none` and confused algorithms stop here
            raise InvalidToken("algorithm not allowed")
        key = await self._key(issuer, header.get("kid"))
        if alg != key.algorithm:
            raise InvalidToken("algorithm not allowed")
        config = issuer.config
        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                issuer=config.issuer,
                audience=config.audience,
                # times are checked below with the injected clock
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": config.audience is not None,
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(_reason(exc)) from None
        expires_at = _check_times(payload, now, config.leeway)
        subject = payload.get(config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("missing subject")
        jti = payload.get("jti")
        claims = Claims(
            iss, subject, issuer.role(payload), expires_at, jti if isinstance(jti, str) else None, payload
        )
        if len(self._verified) >= VERIFIED_CACHE_MAX:  # bounded: a flood of valid tokens cannot grow it
            self._verified.clear()
        self._verified[token] = (claims, min(expires_at, now + VERIFIED_CACHE_SECONDS))
        return claims

    def seconds_left(self, claims: Claims) -> float:
        """Seconds until the verified token's `exp` on this verifier's clock (as its own cache)."""
        return claims.expires_at - self._clock() if claims.expires_at is not None else math.inf

    async def _key(self, issuer: _Issuer, kid: Any) -> _Key:
        if issuer.local:
            public = await self._local.public_key(kid) if isinstance(kid, str) else None
            if public is None:
                raise InvalidToken("unknown kid")
            return _Key(public, "EdDSA")
        if issuer.config.jwks is None:
            return next(iter(issuer.keys.values()))
        now = self._clock()
        refreshed = issuer.keys is None or now - issuer.fetched_at >= issuer.config.jwks_cache
        if refreshed:
            await self._refresh(issuer)
            if issuer.keys is None:
                raise InvalidToken("issuer keys unavailable")
            # a failed refresh keeps the last set in use; the next token tries again
        key = _pick(issuer.keys, kid)
        if key is None and not refreshed:
            # A rotated key at the issuer; one refetch (shared with any already under way), throttled.
            if issuer.fetch is None and now - issuer.refetched_at < UNKNOWN_KID_REFETCH_EVERY:
                raise InvalidToken("unknown kid")
            issuer.refetched_at = now
            if not await self._refresh(issuer):
                raise InvalidToken("issuer keys unavailable")
            key = _pick(issuer.keys, kid)
        if key is None:
            raise InvalidToken("unknown kid")
        return key

    async def _refresh(self, issuer: _Issuer) -> bool:
        """Fetch the issuer's JWKS, or join the fetch already under way; True when it succeeded."""
        if issuer.fetch is None:
            issuer.fetch = asyncio.ensure_future(self._download(issuer))
        # shielded: one caller giving up (a cancelled request) must not cancel everyone's fetch
        return await asyncio.shield(issuer.fetch)

    async def _download(self, issuer: _Issuer) -> bool:
        try:
            keys = _parse_jwks(await self._get_json(issuer.config.jwks))
        except Exception as exc:  # noqa: BLE001 - any failure means "no new keys"; callers decide
            log.warning("jwks_fetch_failed", issuer=issuer.config.issuer, error=exc.__class__.__name__)
            return False
        else:
            issuer.keys, issuer.fetched_at = keys, self._clock()
            return True
        finally:
            issuer.fetch = None

    async def _get_json(self, url: str) -> Any:
        if self._fetch is not None:
            return await self._fetch(url)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))
        async with self._session.get(url, headers={"accept": "application/json"}) as response:
            if response.status != 200:
                raise ValueError(f"JWKS answered {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
        return orjson.loads(body)

    async def aclose(self) -> None:
        fetches = [i.fetch for i in self._issuers.values() if i.fetch is not None]
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: ed25519.Ed25519PrivateKey
    public_key: ed25519.Ed25519PublicKey
    created_at: float
    retired_at: float | None = None  # replaced by a newer key then; verifies for `overlap` more

    @classmethod
    def from_private(
        cls, kid: str, private: ed25519.Ed25519PrivateKey, created_at: float, retired_at: float | None = None
    ) -> SigningKey:
        return cls(kid, private, private.public_key(), created_at, retired_at)

    def jwk(self) -> dict:
        x = _b64url(self.public_key.public_bytes_raw())
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": "EdDSA", "use": "sig"}


def _encode_ring(keys: list[SigningKey]) -> bytes:
    return orjson.dumps(
        {
            "keys": [
                {
                    "kid": k.kid,
                    "private": base64.b64encode(k.private_key.private_bytes_raw()).decode(),
                    "created_at": k.created_at,
                    "retired_at": k.retired_at,
                }
                for k in keys
            ]
        }
    )


def _decode_ring(value: bytes) -> list[SigningKey]:
    return [
        SigningKey.from_private(
            k["kid"],
            ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(k["private"])),
            k["created_at"],
            k["retired_at"],
        )
        for k in orjson.loads(value)["keys"]
    ]


class SigningKeys:
    """Ed25519 (EdDSA) keys kept in the state backend (namespace "_signing"), shared by every worker and replica.

    The ring is one record, newest key first, private keys as raw bytes in base64. It is read at
    most every 5 s per instance, so a rotation by another replica is seen within that time.
    `overlap` must outlast the longest lifetime of a token this gateway issues."""

    def __init__(
        self,
        kv: KV,
        *,
        rotate_every: float = 7 * 86400,
        overlap: float = 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kv = kv
        self._rotate_every = rotate_every
        self._overlap = overlap
        self._clock = clock
        self._ring: tuple[float, int, list[SigningKey]] | None = None  # (read at, version, keys)
        self._reloaded_at = -math.inf

    async def current(self) -> SigningKey:
        """The key that signs now: created when there is none, rotated when it is too old."""
        while True:
            version, keys = await self._load()
            now = self._clock()
            if keys and now - keys[0].created_at < self._rotate_every:
                return keys[0]
            keys = self._rotated(keys, now)
            if await self._store(version, keys):
                return keys[0]
            # another replica created or rotated first: the next round reads and uses its key

    async def rotate(self) -> str:
        """A new current key; the previous ones stay published and valid for `overlap`."""
        while True:
            version, keys = await self._load(fresh=True)
            keys = self._rotated(keys, self._clock())
            if await self._store(version, keys):
                return keys[0].kid

    async def jwks(self) -> dict:
        """The public keys for a /.well-known/jwks.json: the current key (created or rotated as
        `current` does) and the previous ones within overlap."""
        await self.current()
        _, keys = await self._load()
        now = self._clock()
        return {"keys": [k.jwk() for k in keys if self._valid(k, now)]}

    async def sign(self, claims: dict) -> str:
        """A compact JWT of `claims` (the caller sets iss, sub, exp...) signed by the current key."""
        key = await self.current()
        return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})

    async def public_key(self, kid: str) -> ed25519.Ed25519PublicKey | None:
        """The public key of `kid` while it may verify, else None."""
        _, keys = await self._load()
        key = next((k for k in keys if k.kid == kid), None)
        now = self._clock()
        if key is None and now - self._reloaded_at >= UNKNOWN_LOCAL_KID_RELOAD_EVERY:
            # maybe a key another replica created since our last read; throttled against made-up kids
            self._reloaded_at = now
            _, keys = await self._load(fresh=True)
            key = next((k for k in keys if k.kid == kid), None)
        return key.public_key if key is not None and self._valid(key, now) else None

    def _valid(self, key: SigningKey, now: float) -> bool:
        return key.retired_at is None or now < key.retired_at + self._overlap

    def _rotated(self, keys: list[SigningKey], now: float) -> list[SigningKey]:
        new = SigningKey.from_private(secrets.token_urlsafe(12), ed25519.Ed25519PrivateKey.generate(), now)
        kept = [
            k if k.retired_at is not None else replace(k, retired_at=now) for k in keys if self._valid(k, now)
        ]
        return [new, *kept]

    async def _load(self, *, fresh: bool = False) -> tuple[int, list[SigningKey]]:
        now = self._clock()
        if not fresh and self._ring is not None and now - self._ring[0] < KEYRING_CACHE_SECONDS:
            return self._ring[1], self._ring[2]
        entry = await self._kv.get(NAMESPACE, KEYRING)
        version, keys = (0, []) if entry is None else (entry.version, _decode_ring(entry.value))
        self._ring = (now, version, keys)
        return version, keys

    async def _store(self, version: int, keys: list[SigningKey]) -> bool:
        """Compare-and-set of the whole ring (version 0: only if absent); False when another won."""
        try:
            entry = await self._kv.put(NAMESPACE, KEYRING, _encode_ring(keys), if_version=version)
        except VersionMismatch:
            self._ring = None
            return False
        self._ring = (self._clock(), entry.version, keys)
        return True
