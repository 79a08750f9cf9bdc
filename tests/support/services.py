"""The real servers the tests use on loopback, and one rule for when one is absent.

Absent means skip with the reason, except under ``BRIDGEWAY_REQUIRE_SERVICES=1`` (CI), where it
fails: a suite that silently skipped its Redis tests would prove nothing.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"
SERVICES = {
    "redis": 6379,
    "postgres": 5432,
    "nats": 4222,
    "rabbitmq": 5672,
}


def absent(reason: str) -> None:
    """Skip the test with ``reason``, or fail it when services are required."""
    if os.environ.get("BRIDGEWAY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (required: BRIDGEWAY_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def require_service(name: str) -> None:
    """Skip (or fail) unless ``name`` accepts TCP connections on its port on 127.0.0.1."""
    port = SERVICES[name]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        absent(f"{name} not reachable on 127.0.0.1:{port}")


def require_redis() -> None:
    require_service("redis")


async def open_redis_kv():
    """A Redis state backend under a fresh key prefix (skips or fails when Redis is absent)."""
    try:
        from bridgeway.state.redis import RedisKV
    except ImportError:
        absent("redis client not installed (pip install 'redis[hiredis]')")
    kv = RedisKV(REDIS_URL, prefix=f"bwtest-{uuid.uuid4().hex}")
    try:
        await kv.ping()
    except Exception as exc:  # redis-py wraps socket errors in its own ConnectionError
        await kv.close()
        absent(f"Redis not reachable on 127.0.0.1:6379 ({exc.__class__.__name__})")
    return kv


async def drop_redis_kv(kv) -> None:
    """Delete every key under the backend's test prefix."""
    keys = [k async for k in kv._redis.scan_iter(match=f"{kv._prefix}:*", count=500)]
    if keys:
        await kv._redis.delete(*keys)


async def drop_redis_prefix(prefix: str) -> None:
    """Delete every Redis key under `prefix:` (what a queue backend opened with ?prefix= wrote)."""
    from bridgeway.state.resp import RespClient

    client = RespClient(REDIS_URL, timeout=5.0)
    try:
        cursor = b"0"
        while True:
            cursor, keys = await client.execute("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000)
            if keys:
                await client.execute("UNLINK", *keys)
            if cursor == b"0":
                break
    finally:
        await client.close()


async def drop_redis_keys(keys: list[str], prefix: str | None = None) -> None:
    """Delete these Redis keys, and every key under `prefix:` when given."""
    from bridgeway.state.resp import RespClient

    client = RespClient(REDIS_URL, timeout=5.0)
    try:
        if keys:
            await client.execute("UNLINK", *keys)
    finally:
        await client.close()
    if prefix:
        await drop_redis_prefix(prefix)


NATS_URL = "nats://127.0.0.1:4222"


async def drop_nats_prefix(prefix: str) -> None:
    """Delete the JetStream streams (and KV buckets) whose names start with `prefix`."""
    import nats

    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(prefix) or name.startswith(f"KV_{prefix}"):
                await js.delete_stream(name)
    finally:
        await nc.close()
