"""The queue backend contract: durable storage of jobs, shared by every delivery mode.

A backend stores jobs and hands them out under leases; it makes no decisions about retries.
The queue core (delivery loops, the HTTP API, the SDK worker) decides, with the pure policy,
whether a failed attempt is retried later or buried in the dead-letter set, and tells the
backend. Three backends implement this: SQLite (embedded default), Redis Streams with consumer
groups, NATS JetStream. One conformance suite runs against all three.

Lifecycle of a job:

    queued ──claim──► leased ──ack──► done
      ▲                 │  ├──retry(run_at)──► queued (due again at run_at)
      │                 │  └──bury(error)────► dead ──replay──► queued
      └─ lease expired ─┘  (reclaimed by a later claim; counts as an attempt)

Rules every backend keeps:
- `enqueue` is all-or-nothing for a batch; a job with an idempotency key that the queue has
  seen before is not stored again: the existing job is returned with `created=False`.
- `claim` hands out due jobs (run_at <= now), highest priority first, then oldest; each claim
  increments `attempts` and issues a fresh lease token. A job whose lease expired is claimable
  again; if it had already used `max_attempts` it goes to `dead` instead ("lease expired").
- `settle` applies a batch of outcomes (ack, retry, bury, extend), each with the lease token
  its claim issued; an outcome whose token is stale (the lease expired and the job was claimed
  again, or it was already settled) changes nothing and answers None. A lease token is an
  opaque string any replica can settle with, not a handle into one process's memory.
  Batches exist because a pull worker takes and settles jobs by the hundred.
- Terminal jobs (done, dead) stay readable through `get` for `retention` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

JobState = Literal["queued", "leased", "done", "dead"]


@dataclass(slots=True)
class NewJob:
    """What a producer asks for; the core fills id, queue and max_attempts before enqueue."""

    id: str
    queue: str
    payload: bytes  # JSON, as the producer sent it
    headers: dict[str, str] = field(default_factory=dict)
    run_at: float = 0.0  # wall clock; now + delay
    priority: int = 0  # higher first
    max_attempts: int = 5
    idempotency_key: str | None = None
    callback_url: str | None = None


@dataclass(slots=True)
class Job:
    id: str
    queue: str
    payload: bytes
    headers: dict[str, str]
    priority: int
    state: JobState
    attempts: int  # claims so far, the current one included
    max_attempts: int
    created_at: float
    run_at: float
    lease: str | None = None  # token of the current lease while state == "leased"
    lease_until: float | None = None
    last_error: str | None = None
    finished_at: float | None = None
    idempotency_key: str | None = None
    callback_url: str | None = None


@dataclass(slots=True, frozen=True)
class Outcome:
    """What became of one leased job."""

    job_id: str
    lease: str
    action: Literal["ack", "retry", "bury", "extend"]
    at: float | None = None  # retry: when due again; extend: new lease_until
    error: str | None = None  # retry, bury: why


@dataclass(slots=True, frozen=True)
class QueueStats:
    queued: int  # waiting, due or delayed
    leased: int
    dead: int
    oldest_age: float  # seconds since the oldest due job was queued; 0 when none


class QueueBackend(Protocol):
    async def open(self) -> None:
        """Connect and check (idempotent): the gateway awaits it at start-up so a broker that is
        down fails the start; every other call also opens the backend on first use."""
        ...

    async def enqueue(self, jobs: list[NewJob], now: float) -> list[tuple[Job, bool]]:
        """Store a batch atomically; (job, created) per input, in order."""
        ...

    async def claim(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        """Up to `limit` due jobs, each leased until now + lease."""
        ...

    async def settle(self, outcomes: list[Outcome], now: float) -> list[Job | None]:
        """Apply each outcome; the job as it now is, or None where the lease was lost."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """`get` for a batch, in order, in one round trip: a settle reads the jobs it settles
        (their attempts for the policy, their callback URLs) before it writes, when another
        process's claim leased them (`Queues.held`)."""
        ...

    async def dead(self, queue: str, limit: int = 100, after: str | None = None) -> list[Job]:
        """Dead jobs of `queue` in id order, strictly after `after`."""
        ...

    async def replay(self, queue: str, ids: list[str] | None, now: float) -> int:
        """Dead jobs (all, or these) back to queued with attempts reset; returns how many."""
        ...

    async def purge(self, queue: str) -> int:
        """Delete the dead jobs of `queue`; returns how many."""
        ...

    async def stats(self, queue: str, now: float) -> QueueStats: ...

    async def wait(self, queue: str, timeout: float) -> None:
        """Return when a job of `queue` may have become claimable, or after `timeout`: lets an
        idle delivery loop or long-poll sleep without spinning (a notification where the
        backend has one, a short poll where it has not)."""
        ...

    async def close(self) -> None: ...
