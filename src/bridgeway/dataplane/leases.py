"""Where run-time registrations (instance leases) live, so that every worker sees them.

One process keeps them in memory. Several workers share a small SQLite file (WAL mode) that
each worker reconciles with its registry once a second; the shared state backends of a
scaled-out deployment will plug in behind the same three calls. Expiry times are wall-clock
seconds here, since they cross processes.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Protocol


class Leases(Protocol):
    shared: bool

    def put(self, service: str, url: str, expires_at: float) -> None: ...
    def delete(self, service: str, url: str) -> None: ...
    def live(self) -> list[tuple[str, str, float]]: ...


class MemoryLeases:
    shared = False

    def __init__(self) -> None:
        self._leases: dict[tuple[str, str], float] = {}

    def put(self, service: str, url: str, expires_at: float) -> None:
        self._leases[service, url] = expires_at

    def delete(self, service: str, url: str) -> None:
        self._leases.pop((service, url), None)

    def live(self) -> list[tuple[str, str, float]]:
        now = time.time()
        return [(s, u, t) for (s, u), t in self._leases.items() if t > now]


class SqliteLeases:
    shared = True

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS leases (service TEXT, url TEXT, expires_at REAL, PRIMARY KEY (service, url))"
        )

    def put(self, service: str, url: str, expires_at: float) -> None:
        self._db.execute(
            "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (service, url) DO UPDATE SET expires_at = excluded.expires_at",
            (service, url, expires_at),
        )

    def delete(self, service: str, url: str) -> None:
        self._db.execute("DELETE FROM leases WHERE service = ? AND url = ?", (service, url))

    def live(self) -> list[tuple[str, str, float]]:
        now = time.time()
        self._db.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
        return self._db.execute("SELECT service, url, expires_at FROM leases").fetchall()
