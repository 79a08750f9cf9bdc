"""The queue service: what the HTTP API, the push loops and the metrics share, over one backend.

It owns the decisions the backend does not make: producers' input checked and turned into
`NewJob`s (ids time-ordered, payloads valid JSON within the queue's size limit, a batch refused
whole), long-polled claims, outcomes turned into backend actions with the retry policy, and
callbacks. A callback is a job on the internal `_callbacks` queue, enqueued *before* the job it
reports on is settled: a crash in between redelivers the job, and the callback's idempotency key
keeps it single, so a callback is never lost and not sent twice for one outcome.

Queues exist when the config names them (`queues:`); each keeps its retry policy and limits in a
`CompiledQueue`, swapped whole on a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from bridgeway.config.models import Config, QueueConfig
from bridgeway.config.units import parse_duration
from bridgeway.errors import GatewayError
from bridgeway.jobs.queues import metrics as queue_metrics
from bridgeway.jobs.queues.backend import Job, NewJob, Outcome, QueueBackend, QueueStats
from bridgeway.jobs.queues.policy import Bury, RetryPolicy
from bridgeway.observability import logs
from bridgeway.security import outbound

CALLBACKS = "_callbacks"  # internal queue: its name cannot be a configured one
CALLBACK_POLICY = RetryPolicy(max_attempts=10, base=1.0, max_delay=600.0)
MAX_BATCH = 1000  # jobs per enqueue call, outcomes per settle call
MAX_CLAIM = 1000
MAX_WAIT = 30.0  # seconds a claim may long-poll
MAX_HEADERS = 32
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
# Framing and hop-by-hop headers are the gateway's to set; a job may not carry them.
_RESERVED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)
_JOB_FIELDS = frozenset({"payload", "headers", "delay", "priority", "idempotency_key", "callback_url"})
STATS_EVERY = 2.0  # seconds between refreshes of the gauges /metrics shows
MAX_HELD = 100_000  # leases remembered from this process's claims (see Queues.held)


class JobIds:
    """Time-ordered ids: 12 hex digits of milliseconds, a 6-digit counter (the order within one
    millisecond of this process) and 10 random digits drawn once per process (no clash between
    processes; one draw, not one per job, as enqueues come by the thousand)."""

    def __init__(self) -> None:
        self._ms = 0
        self._seq = 0
        self._node = os.urandom(5).hex()

    def next(self, now: float) -> str:
        ms = int(now * 1000)
        if ms > self._ms:
            self._ms, self._seq = ms, 0
        else:  # the same millisecond, or the clock stepped back: keep the order
            self._seq += 1
            if self._seq > 0xFFFFFF:
                self._ms, self._seq = self._ms + 1, 0
        return f"{self._ms:012x}{self._seq:06x}{self._node}"


@dataclass(slots=True, frozen=True)
class Lease:
    """What a settle needs to know of a leased job, fixed for the life of its lease token: a new
    claim issues a new token, and the queue, max_attempts and callback_url never change."""

    job_id: str
    token: str
    queue: str
    attempts: int
    max_attempts: int
    callback_url: str | None


@dataclass(slots=True)
class CompiledQueue:
    name: str
    config: QueueConfig
    policy: RetryPolicy
    callback_secret: bytes | None


def compile_queues(config: Config) -> dict[str, CompiledQueue]:
    default_secret = config.jobs.callback_secret
    out = {}
    for name, cfg in config.queues.items():
        secret = cfg.callback_secret or default_secret
        out[name] = CompiledQueue(
            name,
            cfg,
            RetryPolicy(cfg.max_attempts, cfg.backoff.base, max(cfg.backoff.max, cfg.backoff.base)),
            secret.get_secret_value().encode() if secret else None,
        )
    return out


def _invalid(where: str, why: str) -> GatewayError:
    return GatewayError("VALIDATION_ERROR", f"{where}: {why}")


def parse_seconds(value: Any, where: str) -> float:
    """Seconds, as a number or a duration string ("250ms", "1m")."""
    if isinstance(value, bool):
        raise _invalid(where, 'expected seconds or a duration like "10s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _invalid(where, str(exc)) from None
    else:
        raise _invalid(where, 'expected seconds or a duration like "10s"')
    if not 0 <= seconds <= 365 * 86400:
        raise _invalid(where, "must be between 0 and one year")
    return seconds


def _headers(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _invalid(where, "expected an object of header names to string values")
    if len(value) > MAX_HEADERS:
        raise _invalid(where, f"at most {MAX_HEADERS} headers")
    out = {}
    for name, text in value.items():
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED:
            raise _invalid(f"{where}.{name[:40]}", "not a header a job may carry")
        if not isinstance(text, str) or len(text) > 8192 or any(c in text for c in "\r\n\0"):
            raise _invalid(f"{where}.{name}", "expected a single-line string of at most 8192 characters")
        out[name.lower()] = text
    return out


def _callback_url(value: Any, where: str, policy: outbound.OutboundPolicy) -> str:
    if not isinstance(value, str) or len(value) > 2048:
        raise _invalid(where, "expected an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(where, "expected an http(s) URL")
    # the gateway posts there for the caller: the outbound policy decides where it may (SSRF)
    if not (verdict := outbound.check_url(value, policy)).allowed:
        raise GatewayError("URL_NOT_ALLOWED", f"{where}: refused by the outbound policy: {verdict.reason}")
    return value


class Queues:
    """Every configured queue of one gateway worker, over one backend."""

    def __init__(
        self,
        config: Config,
        backend: QueueBackend,
        *,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
    ):
        self.backend = backend
        self.clock = clock
        self.draw = draw
        self.ids = JobIds()
        self.log = logs.get_logger()
        self.queues = compile_queues(config)
        self.outbound = config.outbound.policy
        self.stats: dict[str, QueueStats] = {}  # last refresh, for /metrics
        self._stats_task: asyncio.Task | None = None
        # Job id -> the lease this process's claims handed out: a settle that comes back here
        # (the common case) needs no read of its jobs before it writes. Not the truth: the
        # backend's settle still matches every token; see `held`.
        self._held: dict[str, Lease] = {}

    def configure(self, config: Config) -> None:
        self.queues = compile_queues(config)
        self.outbound = config.outbound.policy

    def get_queue(self, name: str) -> CompiledQueue:
        queue = self.queues.get(name)
        if queue is None:
            raise GatewayError("NOT_FOUND", f"no queue named {name[:128]!r}")
        return queue

    # -- producing -------------------------------------------------------------------------

    def new_job(self, queue: CompiledQueue, item: Any, where: str, now: float) -> NewJob:
        """One producer's job, checked; raises VALIDATION_ERROR naming the field."""
        if not isinstance(item, dict):
            raise _invalid(where, "expected an object with a payload")
        if "payload" not in item:
            raise _invalid(f"{where}.payload", "field required (any JSON value)")
        payload = orjson.dumps(item["payload"])
        job = NewJob(self.ids.next(now), queue.name, payload, max_attempts=queue.config.max_attempts)
        if len(item) == 1 and len(payload) <= queue.config.max_payload:
            return job  # the common case: a payload and nothing else
        unknown = item.keys() - _JOB_FIELDS
        if unknown:
            raise _invalid(f"{where}.{sorted(unknown)[0][:40]}", "unknown field")
        if len(payload) > queue.config.max_payload:
            raise GatewayError(
                "BODY_TOO_LARGE",
                f"{where}.payload: {len(payload)} bytes exceeds the queue's {queue.config.max_payload}",
            )
        if (headers := item.get("headers")) is not None:
            job.headers = _headers(headers, f"{where}.headers")
        if (delay := item.get("delay")) is not None:
            job.run_at = now + parse_seconds(delay, f"{where}.delay")
        if (priority := item.get("priority")) is not None:
            if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
                raise _invalid(f"{where}.priority", "expected an integer from -1000 to 1000")
            job.priority = priority
        if (key := item.get("idempotency_key")) is not None:
            if not isinstance(key, str) or not 1 <= len(key) <= 256:
                raise _invalid(f"{where}.idempotency_key", "expected a string of 1 to 256 characters")
            job.idempotency_key = key
        if (url := item.get("callback_url")) is not None:
            job.callback_url = _callback_url(url, f"{where}.callback_url", self.outbound)
            if queue.callback_secret is None:
                raise _invalid(
                    f"{where}.callback_url",
                    f"queue {queue.name!r} has no callback_secret to sign callbacks with",
                )
        return job

    async def enqueue(self, name: str, items: list[Any], where: str = "jobs") -> list[tuple[Job, bool]]:
        """All or nothing: every item is checked before any is stored."""
        queue = self.get_queue(name)
        if len(items) > MAX_BATCH:
            raise _invalid(where, f"at most {MAX_BATCH} jobs per call")
        now = self.clock()
        jobs = [self.new_job(queue, item, f"{where}[{i}]", now) for i, item in enumerate(items)]
        if queue.config.max_depth is not None:
            stats = await self.backend.stats(name, now)
            if stats.queued + len(jobs) > queue.config.max_depth:
                raise GatewayError(
                    "QUEUE_FULL",
                    f"queue {name!r} holds {stats.queued} jobs; its max_depth is {queue.config.max_depth}",
                    headers=[(b"retry-after", b"1")],
                )
        stored = await self.backend.enqueue(jobs, now)
        queue_metrics.for_queue(name).enqueued += sum(1 for _, created in stored if created)
        return stored

    # -- consuming -------------------------------------------------------------------------

    async def claim(self, name: str, limit: int, wait: float, lease: float | None = None) -> list[Job]:
        """Up to `limit` jobs, waiting up to `wait` seconds for the first."""
        queue = self.get_queue(name)
        lease = lease or queue.config.lease
        deadline = time.monotonic() + wait
        while True:
            jobs = await self.backend.claim(name, limit, lease, self.clock())
            left = deadline - time.monotonic()
            if jobs or left <= 0:
                self._remember(jobs)
                return jobs
            await self.backend.wait(name, left)

    def _remember(self, jobs: list[Job]) -> None:
        held = self._held
        if len(held) + len(jobs) > MAX_HELD:
            held.clear()  # leases that expired unsettled pile up otherwise; a miss reads the backend
        for job in jobs:
            held[job.id] = Lease(
                job.id, job.lease or "", job.queue, job.attempts, job.max_attempts, job.callback_url
            )

    async def held(self, name: str, items: list[tuple[str, str]]) -> list[Lease | None]:
        """Per (job id, lease token): the lease, or None where `name` has no such leased job.
        Leases this process handed out are known without a read; the others are read from the
        backend in one round trip (a claim answered by another worker or replica). A lease
        known here may have expired since: the backend's settle matches the token and says so."""
        held = self._held
        out: list[Lease | None] = []
        missing: list[int] = []
        for i, (job_id, token) in enumerate(items):
            lease = held.get(job_id)
            if lease is not None and lease.token == token:
                out.append(lease if lease.queue == name else None)
            else:
                out.append(None)
                missing.append(i)
        if missing:
            jobs = await self.backend.get_many([items[i][0] for i in missing])
            for i, job in zip(missing, jobs, strict=True):
                token = items[i][1]
                if job is not None and job.queue == name and job.state == "leased" and job.lease == token:
                    out[i] = Lease(job.id, token, name, job.attempts, job.max_attempts, job.callback_url)
        return out

    def outcome(
        self,
        queue: CompiledQueue,
        job: Job | Lease,
        ok: bool,
        error: str | None,
        delay: float | None,
        now: float,
    ) -> Outcome:
        """A finished attempt as the backend action the policy makes of it."""
        job_id, token = (job.id, job.lease or "") if isinstance(job, Job) else (job.job_id, job.token)
        if ok:
            return Outcome(job_id, token, "ack")
        decision = queue.policy.after_failure(job.attempts, job.max_attempts, now, self.draw(), delay)
        if isinstance(decision, Bury):
            reason = f"{decision.reason}; last: {error}" if error else decision.reason
            return Outcome(job_id, token, "bury", error=reason[:1000])
        return Outcome(job_id, token, "retry", at=decision.at, error=(error or "failed")[:1000])

    async def settle(
        self, name: str, outcomes: list[Outcome], callbacks: dict[str, tuple[str, Any]] | None = None
    ) -> list[Job | None]:
        """Apply outcomes of `name`'s jobs. `callbacks`: job id -> (callback_url, result) for the
        jobs that have one: their callbacks are stored first (see the module docstring)."""
        queue = self.get_queue(name) if name != CALLBACKS else None
        now = self.clock()
        if callbacks and queue is not None:
            notes = []
            for o in outcomes:
                if o.job_id in callbacks and o.action in ("ack", "bury"):
                    url, result = callbacks[o.job_id]
                    notes.append(self._callback_job(queue, o, url, result, now))
            if notes:
                await self.backend.enqueue(notes, now)
        settled = await self.backend.settle(outcomes, now)
        counters = queue_metrics.for_queue(name)
        held = self._held
        for o, job in zip(outcomes, settled, strict=True):
            if o.action != "extend" or job is None:
                held.pop(o.job_id, None)  # the lease is over (or was lost)
            if job is None:
                counters.lost_leases += 1
            elif o.action == "ack":
                counters.delivered += 1
            elif o.action == "retry":
                counters.retried += 1
            elif o.action == "bury":
                counters.buried += 1
        return settled

    def _callback_job(self, queue: CompiledQueue, o: Outcome, url: str, result: Any, now: float) -> NewJob:
        state = "done" if o.action == "ack" else "dead"
        body = {"job_id": o.job_id, "queue": queue.name, "state": state, "at": now}
        if state == "done" and result is not None:
            body["result"] = result
        if state == "dead":
            body["error"] = o.error
        return NewJob(
            self.ids.next(now),
            CALLBACKS,
            orjson.dumps(body),
            headers={"url": url, "queue": queue.name},
            max_attempts=CALLBACK_POLICY.max_attempts,
            idempotency_key=f"{o.job_id}:{state}",
        )

    # -- the gauges ------------------------------------------------------------------------

    async def refresh_stats(self) -> None:
        now = self.clock()
        for name in [*self.queues, CALLBACKS]:
            self.stats[name] = await self.backend.stats(name, now)
        queue_metrics.set_stats(self.stats)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except Exception:  # noqa: BLE001 - a failed refresh leaves the last figures
                self.log.warning("queue_stats_failed", exc_info=True)
            await asyncio.sleep(STATS_EVERY)

    def start(self) -> None:
        self._stats_task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await self.backend.close()
