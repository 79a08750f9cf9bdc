"""Who may call what: API keys on /bridge routes, checked against roles compiled from config.

A request's key (`Authorization: Bearer bw_...` or `X-API-Key: bw_...`) is consumed by the
gateway and never forwarded. Key records are cached for a second, so the hot path rarely reads
the state backend and a revocation still takes effect everywhere within a second. The `admin`
role may call everything; other roles get exactly what their `allow` grants say, narrowed by the
key's own service list.
"""

from __future__ import annotations

import fnmatch
import re
import time

from bridgeway.config.models import Config, Grant
from bridgeway.errors import GatewayError
from bridgeway.security.keys import KeyRecord, KeyStore

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


class Access:
    """Compiled from one config; `check` runs once per /bridge request."""

    def __init__(self, config: Config, keys: KeyStore | None, clock=time.monotonic):
        self.required = config.auth.required
        self.roles = {name: [_Grant(g) for g in role.allow] for name, role in config.roles.items()}
        self.keys = keys
        self.clock = clock
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    async def check(self, token: str | None, service: str, method: str, path: bytes) -> KeyRecord | None:
        """The caller's key record (None when anonymous is allowed); raises 401 or 403."""
        if token is None:
            if self.required:
                raise GatewayError("UNAUTHENTICATED", "an API key is required", headers=_CHALLENGE)
            return None
        record = await self._authenticate(token)
        if record is None:
            raise GatewayError("UNAUTHENTICATED", "the API key is not valid", headers=_CHALLENGE)
        if record.role != ADMIN_ROLE:
            if record.services is not None and service not in record.services:
                raise GatewayError("FORBIDDEN", f"this key may not call service {service!r}")
            target = path.partition(b"?")[0].decode("latin-1")
            if not any(g.allows(service, method, target) for g in self.roles.get(record.role, ())):
                raise GatewayError(
                    "FORBIDDEN", f"role {record.role!r} may not {method} this path of {service!r}"
                )
        return record

    async def _authenticate(self, token: str) -> KeyRecord | None:
        now = self.clock()
        cached = self._cache.get(token)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        record = await self.keys.authenticate(token) if self.keys is not None else None
        if len(self._cache) > 10_000:  # bounded: a flood of made-up tokens cannot grow it
            self._cache.clear()
        self._cache[token] = (now, record)
        return record
