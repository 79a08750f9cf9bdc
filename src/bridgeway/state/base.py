"""The state interface: one small async KV contract shared by every backend.

Values are opaque bytes. Each key carries a version (1 on create, +1 on every write) used for
compare-and-set, and an optional wall-clock expiry. Expired entries are invisible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    version: int  # starts at 1, +1 on every write of that key
    expires_at: float | None  # wall-clock seconds (time.time()), None = no TTL

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


class VersionMismatch(Exception):
    """A conditional write found another version; `current` is None when the key does not exist."""

    def __init__(self, namespace: str, key: str, expected: int, current: int | None) -> None:
        super().__init__(
            f"version mismatch for {namespace!r}/{key!r}: expected {expected}, current {current}"
        )
        self.namespace = namespace
        self.key = key
        self.expected = expected
        self.current = current


@runtime_checkable
class KV(Protocol):
    async def get(self, namespace: str, key: str) -> Entry | None: ...

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_version: int | None = None,
    ) -> Entry:
        """Write `value`. if_version=None: unconditional; 0: only if absent; n>0: only if the
        current version is n. Otherwise raise VersionMismatch. Atomic."""
        ...

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool: ...

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 100, after: str | None = None
    ) -> list[tuple[str, Entry]]:
        """Live entries whose key starts with `prefix`, in lexicographic order, strictly after
        `after`, at most `limit`."""
        ...

    async def close(self) -> None: ...


def check_put(
    value: bytes, ttl: float | None, if_version: int | None, now: float | None = None
) -> tuple[bytes, float | None]:
    """Validate put arguments; return (value as bytes, absolute expiry or None)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"value must be bytes, not {type(value).__name__}")
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
    if if_version is not None and if_version < 0:
        raise ValueError(f"if_version must be >= 0, got {if_version!r}")
    expires_at = None if ttl is None else (time.time() if now is None else now) + ttl
    return bytes(value), expires_at


def check_version(namespace: str, key: str, if_version: int | None, current: int | None) -> None:
    """Raise VersionMismatch unless `current` (None = absent) satisfies `if_version`."""
    if if_version is not None and if_version != (current or 0):
        raise VersionMismatch(namespace, key, if_version, current)


def prefix_end(prefix: str) -> str | None:
    """Smallest string greater than every string starting with `prefix` (None: no upper bound).

    Code-point order equals UTF-8 byte order, so this bound also holds for SQLite's BINARY
    collation and Redis ZRANGEBYLEX."""
    p = prefix.rstrip("\U0010ffff")
    if not p:
        return None
    nxt = ord(p[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # skip surrogates, which cannot be encoded
        nxt = 0xE000
    return p[:-1] + chr(nxt)
