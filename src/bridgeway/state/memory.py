"""In-process KV: a sorted key list per namespace. For one process (tests, laptop)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from bridgeway.state.base import Entry, check_put, check_version

SWEEP_EVERY = 30.0  # seconds between opportunistic sweeps of expired entries


class MemoryKV:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._data: dict[str, dict[str, Entry]] = {}
        self._keys: dict[str, list[str]] = {}  # sorted keys per namespace
        self._next_sweep = clock() + SWEEP_EVERY

    def _live(self, ns: str, key: str, now: float) -> Entry | None:
        entry = self._data.get(ns, {}).get(key)
        if entry is not None and not entry.live(now):
            self._remove(ns, key)
            return None
        return entry

    def _remove(self, ns: str, key: str) -> None:
        del self._data[ns][key]
        keys = self._keys[ns]
        del keys[bisect.bisect_left(keys, key)]

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        for ns, entries in self._data.items():
            for key in [k for k, e in entries.items() if not e.live(now)]:
                self._remove(ns, key)

    async def get(self, namespace: str, key: str) -> Entry | None:
        return self._live(namespace, key, self._clock())

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_version: int | None = None,
    ) -> Entry:
        now = self._clock()
        value, expires_at = check_put(value, ttl, if_version, now)
        if now >= self._next_sweep:
            self._sweep(now)
        current = self._live(namespace, key, now)
        check_version(namespace, key, if_version, current and current.version)
        entry = Entry(value, (current.version if current else 0) + 1, expires_at)
        entries = self._data.setdefault(namespace, {})
        if current is None:
            bisect.insort(self._keys.setdefault(namespace, []), key)
        entries[key] = entry
        return entry

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        current = self._live(namespace, key, self._clock())
        check_version(namespace, key, if_version, current and current.version)
        if current is None:
            return False
        self._remove(namespace, key)
        return True

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 100, after: str | None = None
    ) -> list[tuple[str, Entry]]:
        keys, entries = self._keys.get(namespace, []), self._data.get(namespace, {})
        now = self._clock()
        if after is not None and after >= prefix:
            i = bisect.bisect_right(keys, after)
        else:
            i = bisect.bisect_left(keys, prefix)
        out: list[tuple[str, Entry]] = []
        expired: list[str] = []
        while i < len(keys) and len(out) < limit and keys[i].startswith(prefix):
            key = keys[i]
            if entries[key].live(now):
                out.append((key, entries[key]))
            else:
                expired.append(key)
            i += 1
        for key in expired:
            self._remove(namespace, key)
        return out

    async def close(self) -> None:
        self._data.clear()
        self._keys.clear()
