"""The event log on each of its three backends, under a fresh name per test, dropped afterwards.

event_log   function scope, parametrised over sqlite / redis / nats: an open `EventLog`
jobs_backend  function scope, parametrised the same way: (backend URL, unique log name), for
            gateways started on it; the log is dropped at teardown
"""

from __future__ import annotations

import uuid

import pytest

from bridgeway.jobs.events.log import Retention, open_event_log
from tests.support.services import REDIS_URL, require_service

NATS_URL = "nats://127.0.0.1:4222"
BACKENDS = ["sqlite", "redis", "nats"]


def backend_url(kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    require_service(kind)
    return REDIS_URL if kind == "redis" else NATS_URL


def unique_name() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


async def drop(url: str, name: str) -> None:
    if url.startswith("sqlite"):
        return  # the file lives in tmp_path
    log = open_event_log(url, name, Retention())
    try:
        await log.drop()
    finally:
        await log.close()


@pytest.fixture(params=BACKENDS)
async def event_log(request, tmp_path):
    url, name = backend_url(request.param, tmp_path), unique_name()
    log = open_event_log(url, name, Retention(dedupe_window=60.0))
    try:
        yield log
    finally:
        await log.close()
        await drop(url, name)


@pytest.fixture(params=BACKENDS)
async def jobs_backend(request, tmp_path):
    url, name = backend_url(request.param, tmp_path), unique_name()
    try:
        yield url, name
    finally:
        await drop(url, name)
