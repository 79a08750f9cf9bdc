"""The real servers the tests use on loopback, and one rule for when one is absent.

Absent means skip with the reason, except under ``BRIDGEWAY_REQUIRE_SERVICES=1`` (CI), where it
fails: a suite that silently skipped its Redis tests would prove nothing.
"""

from __future__ import annotations

import os
import socket

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
