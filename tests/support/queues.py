"""Gateways whose queues live on each of the three backends.

`queue_backend(kind)` yields the config fragment for a gateway on `kind` ("sqlite", "redis",
"nats"): nothing for SQLite (the gateway's own state file), else `jobs.backend` on the loopback
broker under a fresh `?prefix=` (the event log the gateway opens there goes under it too),
dropped when the block ends. Skips (or fails, under BRIDGEWAY_REQUIRE_SERVICES=1) when the
broker is absent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.services import NATS_URL, REDIS_URL, drop_nats_prefix, drop_redis_prefix, require_service

QUEUE_BACKENDS = ["sqlite", "redis", "nats"]


@contextmanager
def queue_backend(kind: str) -> Iterator[dict]:
    if kind == "sqlite":
        yield {}
        return
    require_service(kind)
    tag = f"bwtest-{uuid.uuid4().hex[:12]}"
    base, drop = (REDIS_URL, drop_redis_prefix) if kind == "redis" else (NATS_URL, drop_nats_prefix)
    try:
        yield {"jobs": {"backend": f"{base}?prefix={tag}"}}
    finally:
        asyncio.run(drop(tag))
