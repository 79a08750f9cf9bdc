"""Durable job queues: the backend contract, its three backends, delivery and retries."""

from __future__ import annotations

from bridgeway.jobs.queues.backend import QueueBackend

_SCHEMES = "sqlite:///path.db, sqlite:///:memory:"


def open_queue_backend(url: str, *, retention: float = 7 * 86400.0) -> QueueBackend:
    """The queue backend named by `url` (Config.jobs_backend); ValueError if not understood.
    `retention`: how long done jobs stay readable."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"jobs backend URL {url!r} has no scheme; expected one of {_SCHEMES}")
    if scheme == "sqlite":
        if not rest.startswith("/") or not rest[1:]:
            raise ValueError(
                f"jobs backend URL {url!r}: expected sqlite:///relative/path.db or sqlite:///:memory:"
            )
        from bridgeway.jobs.queues.sqlite import SqliteQueue

        return SqliteQueue(rest[1:], retention=retention)
    # redis:// (Redis Streams) and nats:// (JetStream) branches go here.
    raise ValueError(f"jobs backend URL {url!r}: unknown scheme {scheme!r}; expected one of {_SCHEMES}")
