"""Test support: real processes on loopback (``procs``) and pytest fixtures (``fixtures``)."""

from tests.support.procs import (
    EXAMPLES,
    SERVICES,
    Proc,
    free_port,
    spawn_service,
    start_service,
    start_services,
    wait_http,
)

__all__ = [
    "EXAMPLES",
    "SERVICES",
    "Proc",
    "free_port",
    "spawn_service",
    "start_service",
    "start_services",
    "wait_http",
]
