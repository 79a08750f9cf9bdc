"""Who may call what: the caller is authenticated into a `Principal`, which is checked against
the roles and the clients table compiled from config.

A request's key (`Authorization: Bearer bw_...` or `X-API-Key: bw_...`) is consumed by the
gateway and never forwarded. Key records are cached for a second (never past the key's or the
token's own expiry), so the hot path rarely reads the state backend and a revocation still takes
effect everywhere within a second. The `admin` role may call everything; other roles get exactly
what their `allow` grants say, narrowed by the caller's own service list. A caller that is a client of the `clients:` table also draws from that
client's budgets.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
import time
from dataclasses import dataclass

from bridgeway.config.models import Config, Grant
from bridgeway.errors import GatewayError
from bridgeway.security.budgets import Budgets
from bridgeway.security.jwt import InvalidToken, JwtVerifier
from bridgeway.security.keys import PREFIX as KEY_PREFIX
from bridgeway.security.keys import KeyRecord, KeyStore
from bridgeway.security.oauth import TokenIssuer

ADMIN_ROLE = "admin"
CACHE_SECONDS = 1.0
_CHALLENGE = [(b"www-authenticate", b'Bearer realm="bridgeway"')]


class _Grant:
    __slots__ = ("service", "methods", "paths")

    def __init__(self, grant: Grant):
        self.service = grant.service
        self.methods = frozenset(m.upper() for m in grant.methods) if grant.methods else None
        self.paths = (
            re.compile("|".join(fnmatch.translate(p) for p in grant.paths)).match if grant.paths else None
        )

    def allows(self, service: str, method: str, path: str) -> bool:
        return (
            self.service in ("*", service)
            and (self.methods is None or method in self.methods)
            and (self.paths is None or self.paths(path) is not None)
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, however they proved it."""

    id: str  # "key:<id>", "client:<name>" or "jwt:<issuer>#<subject>": never a secret
    role: str
    services: frozenset[str] | None  # None: every service the role allows
    client: str | None = None  # the row of the clients table whose budgets apply
    models: tuple[str, ...] | None = None  # a key's own model globs, narrowing its role's
    budgets: tuple[dict, ...] = ()  # a key's own LLM budgets (else its role's apply)


# What a bearer token from an unknown issuer proves: nothing to the gateway (it may be the
# upstream's own); refused where authentication is required, passed on where it is not.
FOREIGN = Principal("foreign", "", frozenset())
# What `Access.cached` answers for a credential it has not seen within the last second.
UNKNOWN = Principal("unknown", "", frozenset())


class Access:
    """Compiled from one config; `check` runs once per /bridge request."""

    def __init__(
        self,
        config: Config,
        keys: KeyStore | None,
        limiter=None,
        *,
        verifier: JwtVerifier | None = None,
        oauth: TokenIssuer | None = None,
        clock=time.monotonic,
    ):
        self.required = config.auth.required
        self.roles = {name: [_Grant(g) for g in role.allow] for name, role in config.roles.items()}
        # Per role, the services granted whole (every method, every path): decided by name alone.
        self.whole_services = {
            name: frozenset(g.service for g in grants if g.methods is None and g.paths is None)
            for name, grants in self.roles.items()
        }
        self.kv_grants = {
            name: [(re.compile(fnmatch.translate(g.namespace)).match, g.access) for g in role.kv]
            for name, role in config.roles.items()
        }
        self.event_grants = {
            name: [(re.compile(fnmatch.translate(g.types)).match, g.access) for g in role.events]
            for name, role in config.roles.items()
        }
        self.queue_grants = {
            name: [(re.compile(fnmatch.translate(g.queue)).match, g.access) for g in role.queues]
            for name, role in config.roles.items()
        }
        self.model_grants = {
            name: re.compile("|".join(fnmatch.translate(m) for m in role.models)).match
            for name, role in config.roles.items()
            if role.models
        }
        self.clients = config.clients
        self.client_budgets = {
            name: Budgets(f"client {name!r}", client.limits, limiter)
            for name, client in config.clients.items()
            if client.limits
        }
        self.keys = keys
        self.verifier = verifier
        self.oauth = oauth
        self.clock = clock
        self._cache: dict[str, tuple[float, Principal | None]] = {}  # token -> (valid until, caller)

    async def identify(self, token: str | None) -> Principal | None:
        """The caller a request's credential proves (None: anonymous, where that is allowed);
        raises 401."""
        return self._admit(token, await self.authenticate(token) if token is not None else None)

    async def check(self, token: str | None, service: str, method: str, path: bytes) -> Principal | None:
        """The caller of a /bridge request, allowed to make it; raises 401 or 403."""
        caller = await self.authenticate(token) if token is not None else None
        return self.authorize(token, caller, service, method, path)

    def check_now(self, token: str | None, service: str, method: str, path: bytes) -> Principal | None:
        """`check` without an await when the answer is known (no credential, or one authenticated
        within the last second): the common case on the hot path. Returns UNKNOWN when the
        credential must be looked up first, and then the caller awaits `check`."""
        if token is None:
            return self.authorize(None, None, service, method, path)
        hit = self._cache.get(token)  # `cached`, inline: this runs once per request
        if hit is None or self.clock() >= hit[0]:
            return UNKNOWN
        return self.authorize(token, hit[1], service, method, path)

    def authorize(
        self, token: str | None, caller: Principal | None, service: str, method: str, path: bytes
    ) -> Principal | None:
        """The authenticated `caller` (of `token`) admitted and allowed this call; raises 401/403."""
        if caller is None or caller is FOREIGN:  # a principal needs no admission: it has a token
            caller = self._admit(token, caller)
        if caller is not None and caller.role != ADMIN_ROLE:
            if caller.services is not None and service not in caller.services:
                raise GatewayError("FORBIDDEN", f"this caller may not call service {service!r}")
            whole = self.whole_services.get(caller.role)
            if whole is not None and (service in whole or "*" in whole):
                return caller  # a grant of every method and path: no path to decode and match
            target = path.partition(b"?")[0].decode("latin-1")
            if not any(g.allows(service, method, target) for g in self.roles.get(caller.role, ())):
                raise GatewayError(
                    "FORBIDDEN", f"role {caller.role!r} may not {method} this path of {service!r}"
                )
        return caller

    def _admit(self, token: str | None, caller: Principal | None) -> Principal | None:
        if token is None:
            if self.required:
                raise GatewayError("UNAUTHENTICATED", "an API key is required", headers=_CHALLENGE)
            return None
        if caller is FOREIGN:  # a token for the upstream, from an issuer the gateway does not know
            if self.required:
                raise GatewayError("UNAUTHENTICATED", "the token's issuer is not trusted", headers=_CHALLENGE)
            return None
        if caller is None:
            raise GatewayError("UNAUTHENTICATED", "the credential is not valid", headers=_CHALLENGE)
        return caller

    def may_use_model(self, caller: Principal | None, model: str) -> bool:
        """Anonymous callers only get this far where authentication is not required."""
        if caller is None:
            return True
        if caller.models is not None and _globs(caller.models)(model) is None:
            return False
        if caller.role == ADMIN_ROLE:
            return True
        grant = self.model_grants.get(caller.role)
        return grant is not None and grant(model) is not None

    def may_use_kv(self, caller: Principal, namespace: str, write: bool) -> bool:
        if caller.role == ADMIN_ROLE:
            return True
        return any(
            match(namespace) and (access == "write" or not write)
            for match, access in self.kv_grants.get(caller.role, ())
        )

    def may_use_events(self, caller: Principal, types: str, access: str) -> bool:
        """Whether `caller` may publish (`access="publish"`) events of type `types`, or subscribe
        to the pattern `types`. A pattern is granted when it matches a grant's glob as a string
        ("job.*" is covered by "job.*" and "job.created" by "job.*"); streams additionally filter
        every event through `event_filter`, so a pattern that slips past this is still narrowed."""
        if caller.role == ADMIN_ROLE:
            return True
        return any(
            match(types) and granted == access for match, granted in self.event_grants.get(caller.role, ())
        )

    def event_filter(self, caller: Principal):
        """A predicate on event types the caller may receive; None when it may receive all."""
        if caller.role == ADMIN_ROLE:
            return None
        matches = [m for m, granted in self.event_grants.get(caller.role, ()) if granted == "subscribe"]
        return lambda event_type: any(m(event_type) for m in matches)

    def may_use_queue(self, caller: Principal, queue: str, consume: bool) -> bool:
        """produce: enqueue and read jobs; consume (which includes produce): claim, settle, dead list."""
        if caller.role == ADMIN_ROLE:
            return True
        return any(
            match(queue) and (access == "consume" or not consume)
            for match, access in self.queue_grants.get(caller.role, ())
        )

    def principal_of_key(self, record: KeyRecord) -> Principal:
        """A key acts as its client when it was issued to one: the client's role, services and
        budgets (narrowed further by the key's own service list)."""
        client = self.clients.get(record.client) if record.client else None
        own = {"models": record.models, "budgets": record.budgets}
        if client is None:
            services = frozenset(record.services) if record.services is not None else None
            return Principal(f"key:{record.id}", record.role, services, **own)
        services = _narrow(client.services, record.services)
        return Principal(f"key:{record.id}", client.role, services, record.client, **own)

    def principal_of_client(self, name: str) -> Principal | None:
        client = self.clients.get(name)
        if client is None:
            return None
        services = frozenset(client.services) if client.services is not None else None
        return Principal(f"client:{name}", client.role, services, name)

    async def _token_caller(self, token: str) -> tuple[Principal | None, float]:
        """A JWT's caller: a client of the table for the gateway's own tokens (unless revoked),
        else the issuer's subject with the role its claims map to; and the seconds until the
        token expires (how long that answer may be kept)."""
        if self.verifier is None:
            return FOREIGN, math.inf
        try:
            claims = await self.verifier.verify(token)
        except InvalidToken as exc:
            return (FOREIGN if exc.reason in ("unknown issuer", "malformed token") else None), math.inf
        left = self.verifier.seconds_left(claims)
        if self.oauth is not None and claims.issuer == self.oauth.issuer:
            if await self.oauth.revoked(claims.jti):
                return None, math.inf
            return self.principal_of_client(claims.subject), left
        return Principal(f"jwt:{claims.issuer}#{claims.subject}", claims.role or "", None), left

    def cached(self, token: str):
        """The caller `token` proved within the last second (None: it proved no one), else UNKNOWN."""
        hit = self._cache.get(token)
        if hit is not None and self.clock() < hit[0]:
            return hit[1]
        return UNKNOWN

    async def authenticate(self, token: str, *, cached: bool = True) -> Principal | None:
        """The caller a credential proves, or None. Answers are cached for a second, never past
        the credential's own expiry (`cached=False` for the management API, where a revocation
        must hold at once)."""
        if cached and (hit := self.cached(token)) is not UNKNOWN:
            return hit
        now = self.clock()
        if token.startswith(KEY_PREFIX):
            record = await self.keys.authenticate(token) if self.keys is not None else None
            caller = self.principal_of_key(record) if record is not None else None
            left = self.keys.seconds_left(record) if record is not None else math.inf
        else:
            caller, left = await self._token_caller(token)
        if len(self._cache) > 10_000:  # bounded: a flood of made-up tokens cannot grow it
            self._cache.clear()
        self._cache[token] = (now + min(CACHE_SECONDS, left), caller)
        return caller


@functools.lru_cache(maxsize=1024)
def _globs(patterns: tuple[str, ...]):
    """One compiled matcher per distinct list of globs (keys share few lists)."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)").match


def _narrow(a: list[str] | None, b) -> frozenset[str] | None:
    if a is None:
        return frozenset(b) if b is not None else None
    return frozenset(a) & frozenset(b) if b is not None else frozenset(a)
