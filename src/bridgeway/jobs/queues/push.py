"""Push delivery: per push queue, a loop in each gateway worker that POSTs jobs to a service
route, with /bridge semantics (the service's balancer, breaker, pool, retries and timeouts,
through `call_upstream`), and the loop that posts callbacks.

Back-pressure: a loop claims only as many jobs as it has free concurrency, so a slow service
leaves the jobs in the backend, never in this process's memory; a job is leased while in flight,
and a crashed worker's leases expire and the jobs go to another claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import aiohttp
import orjson

from bridgeway.dataplane.proxy import Call, call_upstream
from bridgeway.dataplane.upstream import UpstreamError
from bridgeway.errors import GatewayError
from bridgeway.jobs import signing
from bridgeway.jobs.queues.backend import Job, Outcome
from bridgeway.jobs.queues.policy import Bury
from bridgeway.jobs.queues.service import CALLBACK_POLICY, CALLBACKS, Queues
from bridgeway.observability import logs
from bridgeway.observability.tracing import new_span_id, new_trace_id, traceparent
from bridgeway.security import outbound

if TYPE_CHECKING:
    from bridgeway.dataplane.service import Registry

CLAIM_AT_MOST = 256
MAX_RESULT = 64 * 1024  # a service's answer up to this size goes into the job's callback
CALLBACK_CONCURRENCY = 32
CALLBACK_LEASE = 60.0
CALLBACK_TIMEOUT = 10.0
STOP_GRACE = 5.0  # seconds in-flight deliveries get to finish on shutdown


class _Loop:
    """Claim as many jobs as there is room for, deliver each in its own task, settle."""

    def __init__(self, queues: Queues, name: str):
        self.queues = queues
        self.name = name
        self.inflight: set[asyncio.Task] = set()
        self._room = asyncio.Event()
        self._task: asyncio.Task | None = None
        # Outcomes wait here for the settler, which writes them a batch per transaction.
        self._outcomes: list[Outcome] = []
        self._callbacks: dict[str, tuple[str, object]] = {}
        self._to_settle = asyncio.Event()
        self._settler: asyncio.Task | None = None
        self._stopping = False
        self.log = logs.get_logger()

    def concurrency(self) -> int:
        raise NotImplementedError

    def lease(self) -> float:
        raise NotImplementedError

    async def deliver(self, job: Job) -> None:
        raise NotImplementedError

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self._settler = loop.create_task(self._settle_forever())

    def finish(self, outcome: Outcome, callback: tuple[str, object] | None = None) -> None:
        self._outcomes.append(outcome)
        if callback is not None:
            self._callbacks[outcome.job_id] = callback
        self._to_settle.set()

    async def _settle_forever(self) -> None:
        while True:
            await self._to_settle.wait()
            self._to_settle.clear()
            await self._settle_pending()

    async def _settle_pending(self) -> None:
        while self._outcomes:
            outcomes, callbacks = self._outcomes, self._callbacks
            self._outcomes, self._callbacks = [], {}
            try:
                await self.queues.settle(self.name, outcomes, callbacks)
            except Exception:  # noqa: BLE001 - unsettled jobs' leases expire; they are tried again
                self.log.warning("queue_settle_failed", queue=self.name, jobs=len(outcomes), exc_info=True)

    async def _run(self) -> None:
        backend = self.queues.backend
        while not self._stopping:
            concurrency = self.concurrency()
            free = concurrency - len(self.inflight)
            # Busy: wait for a quarter of the room, so claims come in batches, not one per
            # finished job (each claim is a write transaction).
            if free <= 0 or (self.inflight and free < max(1, concurrency // 4)):
                self._room.clear()
                await self._room.wait()
                continue
            try:
                jobs = await backend.claim(
                    self.name, min(free, CLAIM_AT_MOST), self.lease(), self.queues.clock()
                )
            except Exception:  # noqa: BLE001 - a busy or broken backend: try again shortly
                self.log.warning("queue_claim_failed", queue=self.name, exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if not jobs:
                await backend.wait(self.name, 1.0)
                continue
            for job in jobs:
                task = asyncio.get_running_loop().create_task(self._guarded(job))
                self.inflight.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.inflight.discard(task)
        self._room.set()

    async def _guarded(self, job: Job) -> None:
        try:
            await self.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the lease expires and the job is tried again
            self.log.exception("queue_delivery_failed", queue=self.name, job_id=job.id)

    async def stop(self) -> None:
        self._stopping = True
        self._room.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.inflight:
            # Deliveries cut short keep their lease; it expires and the jobs are handed out again.
            await asyncio.wait(self.inflight, timeout=STOP_GRACE)
            for task in list(self.inflight):
                task.cancel()
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler
        await self._settle_pending()


class PushLoop(_Loop):
    """Deliver jobs of one push queue to its service route."""

    def __init__(self, queues: Queues, name: str, registry: Registry):
        super().__init__(queues, name)
        self.registry = registry

    def concurrency(self) -> int:
        queue = self.queues.queues.get(self.name)
        return queue.config.concurrency if queue is not None else 0

    def lease(self) -> float:
        queue = self.queues.queues.get(self.name)
        return queue.config.lease if queue is not None else 30.0  # removed: its loop is stopping

    async def deliver(self, job: Job) -> None:
        queue = self.queues.queues.get(self.name)
        if queue is None or queue.config.deliver is None:
            return  # the queue left the config, or became pull: its lease expires, it waits
        route = queue.config.deliver
        ok, error, result = False, None, None
        service = self.registry.services.get(route.service)
        if service is None:
            error = f"no service named {route.service!r}"
        else:
            call = Call()
            call.target = route.path.encode()
            call.trace_id = new_trace_id()
            call.headers = [
                *((name.encode(), value.encode()) for name, value in job.headers.items()),
                (b"content-type", b"application/json"),
                (b"x-bridgeway-job-id", job.id.encode()),
                (b"x-bridgeway-attempt", str(job.attempts).encode()),
                (b"x-bridgeway-queue", self.name.encode()),
                (b"traceparent", traceparent(call.trace_id, new_span_id())),
            ]
            try:
                resp, inst = await call_upstream(service, route.method, call, job.payload, time.monotonic())
                try:
                    body = await _read_small(resp)
                finally:
                    inst.inflight -= 1
                    resp.release()
                ok = 200 <= resp.status < 300
                if ok and job.callback_url and len(body) <= MAX_RESULT:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        result = orjson.loads(body) if body else None
                error = None if ok else f"{route.service} answered {resp.status}"
            except GatewayError as exc:
                error = f"{exc.code}: {exc.message}"
            except UpstreamError as exc:  # the answer broke off mid-body
                error = f"{exc.code}: {route.service} broke off its answer"
        outcome = self.queues.outcome(queue, job, ok, error, None, self.queues.clock())
        self.finish(outcome, (job.callback_url, result) if job.callback_url else None)


async def _read_small(resp) -> bytes:
    """The answer when it is at most MAX_RESULT bytes (its connection then goes back to the
    pool); a larger one is left unread, and `release` closes its connection."""
    if resp.complete:
        return await resp.read()
    parts, size = [], 0
    async for chunk in resp:
        size += len(chunk)
        if size > MAX_RESULT:
            return b""
        parts.append(chunk)
    return b"".join(parts)


class CallbackLoop(_Loop):
    """Post callbacks (jobs of the internal `_callbacks` queue), signed, retried per
    CALLBACK_POLICY; aiohttp, as for every outbound call that is not a service route."""

    def __init__(self, queues: Queues):
        super().__init__(queues, CALLBACKS)
        # connections vetted (SSRF), by the policy of the config serving at the time
        self._http = outbound.PolicySession(lambda: queues.outbound, CALLBACK_TIMEOUT)

    def concurrency(self) -> int:
        return CALLBACK_CONCURRENCY

    def lease(self) -> float:
        return CALLBACK_LEASE

    async def deliver(self, job: Job) -> None:
        url, source = job.headers.get("url", ""), job.headers.get("queue", "")
        queue = self.queues.queues.get(source)
        secret = queue.callback_secret if queue is not None else None
        ok, error = False, None
        if secret is None:
            error = f"queue {source!r} has no callback_secret now"
        elif not (verdict := outbound.check_url(url, self.queues.outbound)).allowed:
            error = f"callback refused by the outbound policy: {verdict.reason}"
        else:
            headers = {
                "Content-Type": "application/json",
                signing.HEADER: signing.sign(secret, job.payload, time.time()),
                "X-Bridgeway-Callback-Attempt": str(job.attempts),
            }
            session = await self._http.get()
            try:
                async with session.post(url, data=job.payload, headers=headers, allow_redirects=False) as r:
                    await r.read()
                    ok = 200 <= r.status < 300
                    error = None if ok else f"callback answered {r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"callback failed: {outbound.describe(exc)}"
        now = self.queues.clock()
        if ok:
            outcome = Outcome(job.id, job.lease or "", "ack")
        else:
            decision = CALLBACK_POLICY.after_failure(job.attempts, job.max_attempts, now, self.queues.draw())
            outcome = (
                Outcome(job.id, job.lease or "", "bury", error=error)
                if isinstance(decision, Bury)
                else Outcome(job.id, job.lease or "", "retry", at=decision.at, error=error)
            )
            self.log.warning("callback_failed", queue=source, job_id=job.id, error=error)
        self.finish(outcome)

    async def stop(self) -> None:
        await super().stop()
        await self._http.close()


class Delivery:
    """The push loops of one worker, kept in step with the config."""

    def __init__(self, queues: Queues, registry: Registry):
        self.queues = queues
        self.registry = registry
        self.loops: dict[str, _Loop] = {}

    def apply(self) -> None:
        """Start loops for push queues that have none; stop those of queues no longer pushed."""
        wanted = {name for name, q in self.queues.queues.items() if q.config.deliver is not None}
        wanted.add(CALLBACKS)
        loop = asyncio.get_running_loop()
        for name in list(self.loops):
            if name not in wanted:
                loop.create_task(self.loops.pop(name).stop())
        for name in wanted - self.loops.keys():
            runner: _Loop = (
                CallbackLoop(self.queues) if name == CALLBACKS else PushLoop(self.queues, name, self.registry)
            )
            self.loops[name] = runner
            runner.start()

    async def stop(self) -> None:
        await asyncio.gather(*(runner.stop() for runner in self.loops.values()))
        self.loops.clear()
