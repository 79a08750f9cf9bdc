"""Pytest fixtures that run the sample services as real processes on loopback.

Enable them from ``tests/conftest.py`` with::

    pytest_plugins = ["tests.support.fixtures"]

Fixtures
    echo_service      function scope: a fresh echo (counters at zero, healthy); X-Instance "echo"
    echo              module scope: one echo shared by the module's tests (and their gateways)
    kv                function scope, parametrised: the state backend on memory, SQLite and Redis
                      (a fresh prefix, deleted afterwards); one test, three backends
    sim_service       module scope: one simulator (slower to start); X-Instance "sim".
                      Its LRU cache and heartbeat counter are shared by the module's tests.
    service_factory   function scope: ``service_factory(count=1, name="echo", prefix=None,
                      env=None) -> list[Proc]`` starts ``count`` instances concurrently, named
                      ``{prefix}-{i}`` (ECHO_NAME / SIM_NAME), all stopped at teardown. A test
                      may ``.kill()`` or ``.stop()`` one early; teardown tolerates that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest

from bridgeway.state import open_state
from tests.support.procs import Proc, start_service, start_services
from tests.support.services import drop_redis_kv, open_redis_kv

ServiceFactory = Callable[..., list[Proc]]


@pytest.fixture
def echo_service() -> Iterator[Proc]:
    proc = start_service("echo")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def echo() -> Iterator[Proc]:
    proc = start_service("echo")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def sim_service() -> Iterator[Proc]:
    proc = start_service("sim")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def service_factory() -> Iterator[ServiceFactory]:
    started: list[Proc] = []

    def factory(
        count: int = 1, name: str = "echo", prefix: str | None = None, env: Mapping[str, str] | None = None
    ) -> list[Proc]:
        procs = start_services(name, count, prefix=prefix, env=env)
        started.extend(procs)
        return procs

    try:
        yield factory
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def kv(request, tmp_path):
    if request.param == "memory":
        store = open_state("memory://")
    elif request.param == "sqlite":
        store = open_state(f"sqlite:///{tmp_path / 'state.db'}")
    else:
        store = await open_redis_kv()
    try:
        yield store
    finally:
        if request.param == "redis":
            await drop_redis_kv(store)
        await store.close()
