"""A pull worker: async functions become job handlers.

    worker = Worker(client, concurrency=64)

    @worker.job("emails")
    async def send(job: Job) -> dict | None:
        ...                       # return -> ack (the value goes to the job's callback)
                                  # raise  -> nack: retried with the queue's back-off
                                  # raise RetryLater(30) -> retried in 30 s; raise Bury -> dead now
    await worker.run()            # until worker.stop(), then in-flight jobs finish

Per queue, one loop long-polls a claim for as many jobs as it has room for (never more than
`concurrency` in memory), runs each handler in its own task, and a settler sends outcomes back
in batches, each settle call claiming the next jobs in the same round trip (a busy queue costs
one call per batch, and several batches can be in flight). Jobs held for more than half their
lease are extended, so a long handler keeps its job; a killed worker's leases simply expire and
the jobs go to another claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bridgeway.sdk.client import BridgewayError, Client, Job

Handler = Callable[[Job], Awaitable[Any]]
log = logging.getLogger("bridgeway.worker")


class RetryLater(Exception):  # noqa: N818 - reads as what the handler asks for
    """Raise from a handler to have the job tried again after `delay` seconds."""

    def __init__(self, delay: float, reason: str = "retry later"):
        super().__init__(reason)
        self.delay = delay


class Bury(Exception):  # noqa: N818
    """Raise from a handler to send the job to the dead-letter set at once (a poison job)."""


class _QueueRunner:
    def __init__(self, worker: Worker, queue: str, handler: Handler):
        self.worker = worker
        self.queue = queue
        self.handler = handler
        self.running: dict[str, tuple[asyncio.Task, Job]] = {}
        self.pending: list[dict] = []  # outcomes not yet sent
        self.settling = 0  # outcomes sent, not yet answered
        self.claiming = 0  # jobs asked for by calls not yet answered
        self.sends: set[asyncio.Task] = set()  # settle calls in flight
        self.room = asyncio.Event()
        self.flush_now = asyncio.Event()
        self.lost = 0  # outcomes refused: the lease had been lost

    def free(self) -> int:
        """Jobs this runner may still ask for. Done jobs hold their leases until settled, and
        jobs asked for count from the asking: the worker never holds more than `concurrency`."""
        w = self.worker
        return w.concurrency - len(self.running) - len(self.pending) - self.settling - self.claiming

    def least(self) -> int:
        """The fewest jobs worth a claim while busy: a quarter of a batch, not one per job."""
        return max(1, min(self.worker.batch, self.worker.concurrency) // 4)

    def start(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            self.running[job.id] = (loop.create_task(self.run_one(job)), job)

    async def claim_loop(self) -> None:
        w = self.worker
        while not w._stopping:
            free = self.free()
            # Busy: wait for a quarter of the room, so claims come in batches, not one per
            # finished job; the settle calls claim the room their outcomes leave as they go.
            busy = self.running or self.pending or self.sends
            if free <= 0 or (busy and free < self.least()):
                self.room.clear()
                await self.room.wait()
                continue
            want = min(free, w.batch)
            self.claiming += want
            try:
                jobs = await w.client.queues.claim(self.queue, want, wait=w.poll, lease=w.lease)
            except BridgewayError as exc:
                if w._stopping:
                    return
                log.warning("claim on %s failed: %s", self.queue, exc)
                await asyncio.sleep(1.0)
                continue
            finally:
                self.claiming -= want
            self.start(jobs)

    async def run_one(self, job: Job) -> None:
        outcome: dict[str, Any] = {"id": job.id, "lease": job.lease}
        try:
            result = await self.handler(job)
            outcome |= {"action": "ack"} | ({"result": result} if result is not None else {})
        except RetryLater as exc:
            outcome |= {"action": "nack", "delay": exc.delay, "error": str(exc)[:500]}
        except Bury as exc:
            outcome |= {"action": "bury", "error": str(exc)[:500] or "buried by the handler"}
        except asyncio.CancelledError:
            raise  # stopped: the lease expires and the job goes to another claim
        except Exception as exc:  # noqa: BLE001 - any failure of a handler is a nack
            outcome |= {"action": "nack", "error": f"{exc.__class__.__name__}: {exc}"[:500]}
        finally:
            self.running.pop(job.id, None)
        self.pending.append(outcome)
        if len(self.pending) in (1, self.worker.batch):
            self.flush_now.set()

    async def settle_loop(self) -> None:
        w = self.worker
        next_extend = time.monotonic() + w.lease / 4
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush_now.wait(), w.lease / 8)
            self.flush_now.clear()
            if 0 < len(self.pending) < w.batch and not w._stopping:
                await asyncio.sleep(w.settle_every)  # let the jobs finishing now join the batch
            self.flush()
            if time.monotonic() >= next_extend:
                next_extend = time.monotonic() + w.lease / 4
                await self.extend()
            if w._stopping and not self.running and not self.pending:
                await asyncio.gather(*self.sends, return_exceptions=True)
                if not self.pending:
                    return

    def flush(self) -> None:
        """Send the outcomes waiting, a batch per call, each call also claiming the room its
        outcomes leave (one round trip per batch, not two). A part batch waits while a call is
        in flight, so outcomes that trickle in still go in batches; full ones go at once."""
        w = self.worker
        while self.pending and (len(self.pending) >= w.batch or not self.sends):
            batch, self.pending = self.pending[: w.batch], self.pending[w.batch :]
            # The batch is out of `pending` and not yet in `settling`: its room is in `free()`.
            # Less room than a claim is worth (an idle queue's long poll holds it): settle only.
            want = min(w.batch, self.free())
            if w._stopping or want < self.least():
                want = 0
            self.settling += len(batch)
            self.claiming += want
            task = asyncio.get_running_loop().create_task(self.send(batch, want))
            self.sends.add(task)
            task.add_done_callback(self.sends.discard)

    async def send(self, batch: list[dict], want: int) -> None:
        queues = self.worker.client.queues
        jobs: list[Job] = []
        try:
            if want:
                results, jobs = await queues.settle_and_claim(
                    self.queue, batch, want, lease=self.worker.lease
                )
            else:
                results = await queues.settle(self.queue, batch)
            self.lost += sum(1 for r in results if r["status"] == 409)
        except BridgewayError as exc:
            log.warning("settle on %s failed (%s); the leases will expire", self.queue, exc)
        finally:
            self.settling -= len(batch)
            self.claiming -= want
        self.start(jobs)  # after a stop too: `Worker.run` waits for the calls in flight first
        self.room.set()
        if self.pending:
            self.flush_now.set()

    async def extend(self) -> None:
        """Extend the leases of jobs that have used half of theirs."""
        now = time.time()
        due = [job for _, job in self.running.values() if job.lease_until - now < self.worker.lease / 2]
        if not due:
            return
        outcomes = [
            {"id": j.id, "lease": j.lease, "action": "extend", "lease_for": self.worker.lease} for j in due
        ]
        try:
            results = await self.worker.client.queues.settle(self.queue, outcomes)
        except BridgewayError as exc:
            log.warning("extending leases on %s failed: %s", self.queue, exc)
            return
        for job, result in zip(due, results, strict=True):
            if "lease_until" in result:
                job.lease_until = result["lease_until"]


class Worker:
    def __init__(
        self,
        client: Client,
        *,
        concurrency: int = 32,
        batch: int = 100,
        lease: float = 30.0,
        poll: float = 5.0,
        settle_every: float = 0.005,
        grace: float = 30.0,
    ):
        """`concurrency`: jobs running at once per queue; `batch`: most jobs per claim and per
        settle; `lease`: seconds a claimed job is held (extended while its handler runs);
        `poll`: how long a claim waits for work; `grace`: how long `stop` lets jobs finish."""
        self.client = client
        self.concurrency = concurrency
        self.batch = batch
        self.lease = lease
        self.poll = poll
        self.settle_every = settle_every
        self.grace = grace
        self.handlers: dict[str, Handler] = {}
        self.runners: dict[str, _QueueRunner] = {}
        self._stopping = False
        self._stopped = asyncio.Event()

    def job(self, queue: str) -> Callable[[Handler], Handler]:
        """Decorator: `handler(job)` runs for every job of `queue`."""

        def register(handler: Handler) -> Handler:
            self.handlers[queue] = handler
            return handler

        return register

    async def run(self) -> None:
        """Consume until `stop()`; then jobs in flight finish (up to `grace`) and are settled."""
        self._stopping = False
        self.runners = {q: _QueueRunner(self, q, h) for q, h in self.handlers.items()}
        claims = [asyncio.create_task(r.claim_loop()) for r in self.runners.values()]
        settlers = [asyncio.create_task(r.settle_loop()) for r in self.runners.values()]
        await self._stopped.wait()
        for task in claims:
            task.cancel()  # a long-polled claim may be in flight: its jobs' leases expire
        await asyncio.gather(*claims, return_exceptions=True)
        # Settle calls in flight claim no more once stopping, but jobs they claimed before join
        # the running ones, to finish with them.
        await asyncio.gather(*(t for r in self.runners.values() for t in r.sends), return_exceptions=True)
        running = [task for r in self.runners.values() for task, _ in r.running.values()]
        if running:
            _, late = await asyncio.wait(running, timeout=self.grace)
            for task in late:
                task.cancel()
            for runner in self.runners.values():
                runner.running.clear()
        for runner in self.runners.values():
            runner.flush_now.set()
        await asyncio.gather(*settlers, return_exceptions=True)

    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        for runner in self.runners.values():
            runner.room.set()
