"""Bridgeway state: one async KV interface, three backends, chosen by URL.

- ``memory://``: one process.
- ``sqlite:///./bridgeway.db``: the embedded default; the path follows ``sqlite:///``
  (relative), ``sqlite:////abs/path.db`` is absolute.
- ``redis://127.0.0.1:6379/0`` (or ``rediss://``): shared across replicas.
"""

from __future__ import annotations

from bridgeway.state.base import KV, Entry, VersionMismatch

__all__ = ["KV", "Entry", "VersionMismatch", "open_state"]

_SCHEMES = "memory://, sqlite:///path/to.db, redis://host:port/db"


def open_state(url: str) -> KV:
    """Open the state backend named by `url`; ValueError if the URL is not understood."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"state URL {url!r} has no scheme; expected one of {_SCHEMES}")
    scheme = scheme.lower()
    if scheme == "memory":
        if rest.strip("/"):
            raise ValueError(f"state URL {url!r}: memory:// takes no host or path")
        from bridgeway.state.memory import MemoryKV

        return MemoryKV()
    if scheme == "sqlite":
        if not rest.startswith("/") or not rest[1:]:
            raise ValueError(
                f"state URL {url!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        from bridgeway.state.sqlite import SqliteKV

        return SqliteKV(rest[1:])
    if scheme in ("redis", "rediss"):
        if not rest or rest.startswith("/"):
            raise ValueError(f"state URL {url!r}: expected redis://host:port/db")
        try:
            from bridgeway.state.redis import RedisKV
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ValueError(
                f"state URL {url!r} needs the redis client: pip install 'bridgeway[redis]'"
            ) from exc
        return RedisKV(url)
    raise ValueError(f"state URL {url!r}: unknown scheme {scheme!r}; expected one of {_SCHEMES}")
