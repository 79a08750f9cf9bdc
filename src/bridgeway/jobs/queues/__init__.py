"""Durable job queues: the backend contract, its three backends, delivery and retries.

`open_queue_backend` is synchronous for every backend, like `open_state` and `open_event_log`:
it builds the handle and checks the URL; a backend connects in its async `open()`, which the
gateway awaits at start-up (a broker that is down fails the start with its error) and which
every call also runs on first use.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

from bridgeway.jobs.queues.backend import QueueBackend

DEFAULT_RETENTION = 7 * 86400.0
_SCHEMES = "sqlite:///path.db, sqlite:///:memory:, redis://host:port/db, nats://host:port"


def _split_prefix(url: str, default: str) -> tuple[str, str]:
    """`scheme://host/db?prefix=name` -> (the URL without the query, the prefix). The prefix keeps
    apart the queues of several deployments (or tests) sharing one Redis or NATS."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    prefix = options.pop("prefix", default)
    if options:
        raise ValueError(f"jobs backend URL: unknown option(s) {', '.join(sorted(options))}; known: prefix")
    if prefix == default:
        return urlunsplit(parts._replace(query="")), prefix
    if not prefix or not prefix.replace("-", "").replace("_", "").isalnum():
        raise ValueError("jobs backend URL: prefix must be letters, digits, '-' or '_'")
    return urlunsplit(parts._replace(query="")), prefix


def open_queue_backend(url: str, *, retention: float = DEFAULT_RETENTION) -> QueueBackend:
    """The queue backend named by `url` (Config.jobs_backend), not yet connected; ValueError if
    not understood. redis:// and nats:// take an optional `?prefix=` (default `bw`). Terminal
    jobs stay readable for `retention` seconds."""
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
    if scheme == "redis":
        from bridgeway.jobs.queues.redis import RedisQueueBackend

        base, prefix = _split_prefix(url, "bw")
        return RedisQueueBackend(base, prefix=prefix, retention=retention)
    if scheme == "nats":
        from bridgeway.jobs.queues.nats import NatsQueueBackend

        base, prefix = _split_prefix(url, "bw")
        return NatsQueueBackend(base, prefix=prefix, retention=retention)
    raise ValueError(f"jobs backend URL {url!r}: unknown scheme {scheme!r}; expected one of {_SCHEMES}")
