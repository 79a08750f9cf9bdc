"""API keys: created once, stored only as hashes, found by a short public id, checked in
constant time, revocable, and rotated with a grace period during which the old key still works.

A key reads `bw_<id>_<secret>`: the id (10 hex characters) finds the record, the secret (32
random bytes, URL-safe) proves possession. Only SHA-256 of the secret is kept; a 256-bit random
secret needs no slow hash. Records live in the state backend (namespace `_keys`), so every worker
and replica sees a revocation at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass

import orjson

from bridgeway.state import KV, VersionMismatch

NAMESPACE = "_keys"
PREFIX = "bw_"
_HEX_ID = re.compile(r"[0-9a-f]{10}")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    role: str
    services: tuple[str, ...] | None  # None: every service the role allows
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    secret_sha256: str = ""
    previous_sha256: str | None = None  # the key before the last rotation...
    previous_until: float | None = None  # ...accepted until then
    client: str | None = None  # issued to this client of the clients table: acts as it
    models: tuple[str, ...] | None = None  # public model globs it may use (narrowing its role's)
    budgets: tuple[dict, ...] = ()  # its own LLM budgets ({period, usd, tokens}); else its role's

    def public(self) -> dict:
        """What the API and CLI show: never a hash."""
        out = dataclasses.asdict(self)
        for field in ("secret_sha256", "previous_sha256"):
            out.pop(field)
        out["services"] = list(self.services) if self.services is not None else None
        out["models"] = list(self.models) if self.models is not None else None
        out["budgets"] = list(self.budgets)
        return out

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(token: str) -> tuple[str, str] | None:
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 10 or not secret:
        return None
    return key_id, secret


def public_id(token: str) -> str | None:
    """The id of a token shaped like a key, else None. The id is public (it only finds the
    record), so logs and the audit log may name it when a token is refused."""
    parts = _split(token)
    return parts[0] if parts is not None and _HEX_ID.fullmatch(parts[0]) else None


class KeyStore:
    def __init__(self, kv: KV, clock=time.time):
        self.kv = kv
        self.clock = clock

    async def create(
        self,
        name: str,
        role: str,
        *,
        services: list[str] | None = None,
        expires_in: float | None = None,
        client: str | None = None,
        models: list[str] | None = None,
        budgets: list[dict] | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key; the returned token is the only time its secret exists outside the caller."""
        now = self.clock()
        while True:  # ids are random; a clash is astronomically rare but must not overwrite
            key_id, secret = secrets.token_hex(5), secrets.token_urlsafe(32)
            record = KeyRecord(
                id=key_id,
                name=name,
                role=role,
                services=tuple(services) if services is not None else None,
                created_at=now,
                expires_at=now + expires_in if expires_in else None,
                secret_sha256=_digest(secret),
                client=client,
                models=tuple(models) if models is not None else None,
                budgets=tuple(budgets or ()),
            )
            if await self._store(record, create=True):
                return f"{PREFIX}{key_id}_{secret}", record

    async def authenticate(self, token: str) -> KeyRecord | None:
        """The record of a valid, active key, else None (the same answer for every kind of wrong)."""
        parts = _split(token)
        if parts is None:
            return None
        record = await self.get(parts[0])
        if record is None:
            return None
        now = self.clock()
        given = _digest(parts[1])
        current = hmac.compare_digest(given, record.secret_sha256)
        previous = (
            record.previous_sha256 is not None
            and record.previous_until is not None
            and now < record.previous_until
            and hmac.compare_digest(given, record.previous_sha256)
        )
        return record if (current or previous) and record.active(now) else None

    def seconds_left(self, record: KeyRecord) -> float:
        """How long `record` stays accepted as it is now: until it expires or a rotation's grace
        for the previous secret ends (whichever secret was shown, the shorter bounds a cache)."""
        now = self.clock()
        ends = [t for t in (record.expires_at, record.previous_until) if t is not None and t > now]
        return min(ends) - now if ends else math.inf

    async def get(self, key_id: str) -> KeyRecord | None:
        entry = await self.kv.get(NAMESPACE, key_id)
        if entry is None:
            return None
        data = orjson.loads(entry.value)
        data["services"] = tuple(data["services"]) if data["services"] is not None else None
        if data.get("models") is not None:
            data["models"] = tuple(data["models"])
        data["budgets"] = tuple(data.get("budgets") or ())
        return KeyRecord(**data)

    async def list(self) -> list[KeyRecord]:
        out, after = [], None
        while page := await self.kv.list(NAMESPACE, limit=500, after=after):
            out += [r for key, _ in page if (r := await self.get(key)) is not None]
            after = page[-1][0]
        return out

    async def revoke(self, key_id: str) -> KeyRecord | None:
        record = await self.get(key_id)
        if record is None:
            return None
        if record.revoked_at is None:
            record = dataclasses.replace(record, revoked_at=self.clock())
            await self._store(record)
        return record

    async def rotate(self, key_id: str, grace: float) -> tuple[str, KeyRecord] | None:
        """A new secret for the same key; the old one keeps working for `grace` seconds."""
        record = await self.get(key_id)
        if record is None or not record.active(self.clock()):
            return None
        secret = secrets.token_urlsafe(32)
        record = dataclasses.replace(
            record,
            secret_sha256=_digest(secret),
            previous_sha256=record.secret_sha256,
            previous_until=self.clock() + grace,
        )
        await self._store(record)
        return f"{PREFIX}{key_id}_{secret}", record

    async def _store(self, record: KeyRecord, *, create: bool = False) -> bool:
        data = dataclasses.asdict(record)
        data["services"] = list(record.services) if record.services is not None else None
        data["models"] = list(record.models) if record.models is not None else None
        data["budgets"] = list(record.budgets)
        try:
            await self.kv.put(NAMESPACE, record.id, orjson.dumps(data), if_version=0 if create else None)
        except VersionMismatch:
            return False
        return True
