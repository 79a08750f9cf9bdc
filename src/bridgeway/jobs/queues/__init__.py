"""Durable job queues: the backend contract, its three backends, delivery and retries."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

from bridgeway.jobs.queues.backend import QueueBackend

DEFAULT_RETENTION = 7 * 86400.0


def _split_prefix(url: str, default: str) -> tuple[str, str]:
    """`scheme://host/db?prefix=name` -> (the URL without the query, the prefix). The prefix keeps
    apart the queues of several deployments (or tests) sharing one Redis or NATS."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    prefix = options.pop("prefix", default)
    if options:
        raise ValueError(f"jobs backend URL: unknown option(s) {', '.join(sorted(options))}; known: prefix")
    if not prefix or not prefix.replace("-", "").replace("_", "").isalnum():
        raise ValueError("jobs backend URL: prefix must be letters, digits, '-' or '_'")
    return urlunsplit(parts._replace(query="")), prefix


async def open_queue_backend(url: str, *, retention: float = DEFAULT_RETENTION) -> QueueBackend:
    """The backend a URL names, connected: `redis://host:port/db` (Redis Streams) or
    `nats://host:port` (JetStream), each with an optional `?prefix=` (default `bw`). Terminal
    jobs stay readable for `retention` seconds."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "redis":
        from bridgeway.jobs.queues.redis import RedisQueueBackend

        base, prefix = _split_prefix(url, "bw")
        backend = RedisQueueBackend(base, prefix=prefix, retention=retention)
        try:
            await backend.ping()
        except BaseException:
            await backend.close()
            raise
        return backend
    if scheme == "nats":
        from bridgeway.jobs.queues.nats import NatsQueueBackend

        base, prefix = _split_prefix(url, "bw")
        return await NatsQueueBackend.connect(base, prefix=prefix, retention=retention)
    raise ValueError(f"jobs backend URL: unknown scheme {scheme!r}; expected sqlite://, redis:// or nats://")
