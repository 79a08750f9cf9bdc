"""The SDK's pull worker against a real gateway: batches, retries with back-off, a poison job
to the dead letters, lease extension for long jobs, graceful stop, and a worker key whose role
may only consume its queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from bridgeway.sdk import Bury, Client, Job, RetryLater, Worker
from tests.support.gateway import GatewayProc, start_gateway

QUICK = {"base": "10ms", "max": "20ms"}


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProc]:
    config = {
        "roles": {"worker": {"queues": [{"queue": "pulled", "access": "consume"}]}},
        "queues": {
            "pulled": {"max_attempts": 3, "backoff": QUICK},
            "long": {"lease": "1s"},
            "stopping": {},
        },
    }
    proc = start_gateway(config)
    yield proc
    proc.stop()


def client(gw: GatewayProc, key: str | None = None) -> Client:
    return Client(f"http://127.0.0.1:{gw.port}", api_key=key or gw.token)


async def run_until(worker: Worker, done, timeout: float = 15.0) -> None:
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + timeout
    try:
        while not await done():
            assert time.monotonic() < deadline, "the worker did not finish in time"
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


async def test_worker_processes_retries_and_buries(gw: GatewayProc):
    key = gw.api("POST", "/keys", {"name": "w", "role": "worker"}).json()["key"]
    async with client(gw) as admin, client(gw, key) as bw:
        ids = await admin.queues.enqueue_many("pulled", [{"payload": i} for i in range(400)])
        flaky = await admin.queues.enqueue("pulled", "flaky")
        later = await admin.queues.enqueue("pulled", "later")
        poison = await admin.queues.enqueue("pulled", "poison")
        buried = await admin.queues.enqueue("pulled", "bury")
        seen: list = []
        worker = Worker(bw, concurrency=50, batch=100, poll=0.5)

        @worker.job("pulled")
        async def handle(job: Job):
            seen.append(job.payload)
            if job.payload == "flaky" and job.attempts == 1:
                raise ValueError("first try fails")
            if job.payload == "later" and job.attempts == 1:
                raise RetryLater(0.2)
            if job.payload == "poison":
                raise RuntimeError("never works")
            if job.payload == "bury":
                raise Bury("malformed")
            return {"double": job.payload * 2} if isinstance(job.payload, int) else None

        async def done() -> bool:
            states = [(await admin.queues.get(i))["state"] for i in (flaky, later, poison, buried, ids[-1])]
            return states == ["done", "done", "dead", "dead", "done"]

        await run_until(worker, done)
        assert sorted(p for p in seen if isinstance(p, int)) == list(range(400))  # each once
        assert seen.count("poison") == 3 and seen.count("bury") == 1
        dead = await admin.queues.get(poison)
        assert "RuntimeError: never works" in dead["last_error"] and dead["attempts"] == 3
        assert (await admin.queues.get(flaky))["attempts"] == 2
        assert worker.runners["pulled"].lost == 0


async def test_long_jobs_keep_their_lease(gw: GatewayProc):
    async with client(gw) as bw:
        job_id = await bw.queues.enqueue("long", "slow")
        runs = []
        worker = Worker(bw, lease=1.0, poll=0.2)

        @worker.job("long")
        async def handle(job: Job):
            runs.append(job.attempts)
            await asyncio.sleep(2.5)  # longer than the lease: extended while it runs

        async def done() -> bool:
            return (await bw.queues.get(job_id))["state"] == "done"

        await run_until(worker, done)
        assert runs == [1]


async def test_stop_lets_running_jobs_finish(gw: GatewayProc):
    async with client(gw) as bw:
        ids = await bw.queues.enqueue_many("stopping", [{"payload": i} for i in range(5)])
        started = asyncio.Event()
        worker = Worker(bw, poll=0.2)

        @worker.job("stopping")
        async def handle(job: Job):
            started.set()
            await asyncio.sleep(0.5)

        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 5)
        worker.stop()
        await asyncio.wait_for(task, 10)
        states = {(await bw.queues.get(i))["state"] for i in ids}
        assert states == {"done"}
