"""The NATS JetStream queue backend: a work-queue stream, pull consumers, and a KV bucket.

Layout, with P the prefix and Q the queue (encoded to the characters subjects and keys allow):

    stream P_jobs     work-queue retention, subjects P.jobs.Q.{priority}: one message per time a
                      job is (re)queued, carrying the job record
    consumer Q_{prio} a durable pull consumer per queue and priority level: explicit ack,
                      ack_wait = the lease, unlimited deliveries (attempts are counted here)
    KV P_jobs         j.{id}: the job record (`get` reads it); i.Q.{key}: idempotency key -> id
                      (created atomically); d.Q.{id}: the dead-letter index

Every job record in the KV has a revision; every message carries the revision it expects. A
claim's first delivery of a message moves the record to `leased` with a compare-and-set on that
revision, so the fast path needs no read. The lease token is `{revision}|{reply subject}`: any
replica settles by a compare-and-set on the revision (a later claim or settle changed it, so a
stale token fails and changes nothing), then publishes +ACK / +TERM to the reply subject.
Redeliveries (an expired lease, a delayed job coming due) read the record and decide.

Speed comes from round trips, as nats-py pays ~50-100 us of Python for every message it
receives: a batch's requests (records, messages, compare-and-sets, direct gets) are all written
before any answer is awaited, under one timeout; a settle of a job this process leased uses the
record its claim wrote (immutable at that revision) instead of reading it. Still, a job costs
about seven received messages end to end (bench/README.md has the figures and what would cut
them: state in the stream message, KV written only at terminal states).

What JetStream does not have, and what is done instead (the limits to know):
- Priority: a subject and consumer per level; a claim asks for the levels that hold messages
  (one stream-info request) and takes from the highest first.
- Delay: a message claimed before its run_at is nak'd with the remaining delay (one extra
  delivery per delayed job); `stats` counts such a job as leased until it comes due.
- Leases are judged by the broker's clock, and per consumer: ack_wait is the lease of the latest
  claim (a claim asking for another lease updates the consumer). `extend` resets the timer to
  a full ack_wait (+WPI) whatever `at` asks, and the stored lease_until is not rewritten (that
  would change the revision, i.e. the token).
- Retention is the KV bucket's max age, counted from a record's last write: terminal jobs and
  dead letters go after `retention`, idempotency keys `retention` after their job was created,
  and a job waiting longer than that has no record until it is claimed (its message holds it).
- A batch is not atomic across a crash: records, then messages, are written; a failure undoes
  what it can and raises.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from bridgeway.jobs.queues.backend import Job, NewJob, Outcome, QueueStats

# Records of jobs this process leased, kept for their settle: at most this many, of payloads up
# to LEASED_PAYLOAD bytes (80 MB at worst; a larger job's settle reads its record).
LEASED_KEPT = 10_000
LEASED_PAYLOAD = 8192
_PLAIN = re.compile(r"[A-Za-z0-9-]+")
_STATUS = "Status"


def _token(name: str) -> str:
    """A queue name as one subject token / consumer name / key part: itself when plain, else
    `_` + hex (plain names never start with `_`, so two names never share a token)."""
    return name if _PLAIN.fullmatch(name) else "_" + name.encode().hex()


def _key_part(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()  # KV keys allow A-Z a-z 0-9 - _ =


def _record(meta: dict[str, Any], payload: bytes) -> bytes:
    # JSON never holds a raw newline, so the payload (any bytes) follows the first one as is.
    return orjson.dumps(meta) + b"\n" + payload


def _parse(data: bytes) -> tuple[dict[str, Any], bytes]:
    meta, _, payload = data.partition(b"\n")
    return orjson.loads(meta), payload


def _job(meta: dict[str, Any], payload: bytes, lease: str | None = None) -> Job:
    return Job(
        id=meta["id"],
        queue=meta["queue"],
        payload=payload,
        headers=meta["headers"],
        priority=meta["priority"],
        state=meta["state"],
        attempts=meta["attempts"],
        max_attempts=meta["max_attempts"],
        created_at=meta["created_at"],
        run_at=meta["run_at"],
        lease=lease if meta["state"] == "leased" else None,
        lease_until=meta.get("lease_until"),
        last_error=meta.get("last_error"),
        finished_at=meta.get("finished_at"),
        idempotency_key=meta.get("idem"),
        callback_url=meta.get("callback"),
    )


class NatsQueueBackend:
    """Queues in JetStream; see the module docstring for the layout and the limits."""

    def __init__(self, url: str, *, prefix: str, retention: float) -> None:
        self.url = url
        self.prefix = prefix
        self.retention = retention
        self.stream = f"{prefix}_jobs"
        self.bucket = f"{prefix}_jobs"
        self._nc: Client = None  # type: ignore[assignment]  # connected by open()
        self._js: Any = None
        self._kv: Any = None
        self._opening: asyncio.Lock | None = None
        self._ack_wait: dict[str, float] = {}  # consumer -> the ack_wait it was created with
        # Publish acks of the hot paths come back on one wildcard inbox, matched by the last token:
        # nats-py's js.publish costs a request object, a JSON parse and a task switch per call.
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_inbox = ""
        self._ack_seq = 0
        # Records this process wrote when it leased a job, by id: (meta, payload, revision). A
        # record is immutable at a revision, so a settle whose token names that revision needs
        # no read (its compare-and-set still checks the revision is current).
        self._leased: dict[str, tuple[dict[str, Any], bytes, int]] = {}

    async def open(self) -> None:
        """Connect, and create the stream and the KV bucket if they are missing (once)."""
        if self._kv is not None:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._kv is not None:
                return
            nc = await nats.connect(
                self.url, connect_timeout=5, max_reconnect_attempts=3, allow_reconnect=True
            )
            try:
                self._nc, self._js = nc, nc.jetstream(timeout=10.0)
                await self._setup()
            except BaseException:
                self._kv = None
                await nc.close()
                raise

    async def _setup(self) -> None:
        js = self._js
        jobs = api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.jobs.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )
        kv = api.StreamConfig(
            name=f"KV_{self.bucket}",
            subjects=[f"$KV.{self.bucket}.>"],
            max_msgs_per_subject=1,
            max_age=self.retention,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            discard=api.DiscardPolicy.NEW,
            storage=api.StorageType.FILE,
            duplicate_window=min(120.0, self.retention),
        )
        for config in (jobs, kv):
            try:
                info = await js.stream_info(config.name)  # type: ignore[arg-type]
            except NotFoundError:
                await js.add_stream(config)
            else:
                if config is kv and info.config.max_age != self.retention:
                    # the last replica to open decides the retention: one bucket, one max age
                    await js.update_stream(
                        info.config.evolve(max_age=self.retention, duplicate_window=kv.duplicate_window)
                    )
        kv_handle = await js.key_value(self.bucket)
        self._ack_inbox = self._nc.new_inbox()
        await self._nc.subscribe(self._ack_inbox + ".*", cb=self._on_ack)
        self._kv = kv_handle  # last: a set _kv means open

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._acks.pop(msg.subject.rpartition(".")[2], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _request(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> Msg:
        self._ack_seq += 1
        token = str(self._ack_seq)
        fut = asyncio.get_running_loop().create_future()
        self._acks[token] = fut
        try:
            await self._nc.publish(subject, body, reply=f"{self._ack_inbox}.{token}", headers=headers)
            return await asyncio.wait_for(fut, 10.0)
        finally:
            self._acks.pop(token, None)

    async def _request_many(self, requests: list[tuple[str, bytes, dict[str, str] | None]]) -> list[Msg]:
        """`_request` for a batch: every request written before any answer is awaited, and one
        timeout for them all (a task or timer per job was most of a batch's cost)."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        tokens, futures = [], []
        publish, inbox = self._nc.publish, self._ack_inbox
        try:
            for subject, body, headers in requests:
                self._ack_seq += 1
                token = str(self._ack_seq)
                fut = loop.create_future()
                self._acks[token] = fut
                tokens.append(token)
                futures.append(fut)
                await publish(subject, body, reply=f"{inbox}.{token}", headers=headers)
            return await asyncio.wait_for(asyncio.gather(*futures), 10.0)
        finally:
            for token in tokens:
                self._acks.pop(token, None)

    @staticmethod
    def _seq(subject: str, reply: Msg) -> int | None:
        """A publish ack's stream sequence; None when an expected-last-sequence header did not
        hold (a lost compare-and-set); raises on any other refusal."""
        ack = orjson.loads(reply.data) if reply.data else {"error": {"description": "no responders"}}
        error = ack.get("error")
        if error:
            if error.get("err_code") == 10071:
                return None
            raise RuntimeError(f"JetStream refused a publish to {subject}: {error.get('description', error)}")
        return int(ack["seq"])

    async def _js_publish_many(
        self, requests: list[tuple[str, bytes, dict[str, str] | None]]
    ) -> list[int | None]:
        """Publish a batch to streams: per message its sequence, or None where a compare-and-set
        (expected last subject sequence) did not hold."""
        replies = await self._request_many(requests)
        return [self._seq(r[0], reply) for r, reply in zip(requests, replies, strict=True)]

    async def _js_publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish to a stream and await its ack: the sequence; KeyWrongLastSequenceError when an
        expected-last-sequence header did not hold."""
        seq = self._seq(subject, await self._request(subject, body, headers))
        if seq is None:
            raise KeyWrongLastSequenceError(description="wrong last sequence")
        return seq

    # -- helpers ---------------------------------------------------------------------------------

    def _subject(self, queue: str, priority: int) -> str:
        return f"{self.prefix}.jobs.{_token(queue)}.{priority}"

    def _message(
        self, meta: dict[str, Any], payload: bytes, expect: int
    ) -> tuple[str, bytes, dict[str, str]]:
        """The job's message: the record as it is at revision `expect`. The message id makes a
        republish of the same generation (a retried call) a duplicate JetStream drops."""
        return (
            self._subject(meta["queue"], meta["priority"]),
            _record({**meta, "expect": expect}, payload),
            {"Nats-Msg-Id": f"{meta['id']}.{meta['gen']}"},
        )

    async def _publish(self, meta: dict[str, Any], payload: bytes, expect: int) -> None:
        await self._js_publish(*self._message(meta, payload, expect))

    def _cas_request(
        self, meta: dict[str, Any], payload: bytes, last: int
    ) -> tuple[str, bytes, dict[str, str]]:
        return (
            f"$KV.{self.bucket}.j.{meta['id']}",
            _record(meta, payload),
            {"Nats-Expected-Last-Subject-Sequence": str(last)},
        )

    async def _read_many(self, job_ids: list[str]) -> list[tuple[dict[str, Any], bytes, int] | None | bool]:
        """`_read` for a batch, the direct gets written together."""
        base = f"$JS.API.DIRECT.GET.KV_{self.bucket}.$KV.{self.bucket}.j."
        msgs = await self._request_many([(base + i, b"", None) for i in job_ids])
        return [self._found(m) for m in msgs]

    @staticmethod
    def _found(msg: Msg) -> tuple[dict[str, Any], bytes, int] | None | bool:
        headers = msg.headers or {}
        if _STATUS in headers:  # 404: no such key
            return None
        if headers.get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            return False
        meta, payload = _parse(msg.data)
        return meta, payload, int(headers["Nats-Sequence"])

    async def _read(self, job_id: str) -> tuple[dict[str, Any], bytes, int] | None | bool:
        """(meta, payload, revision); None when absent, False when deleted (a tombstone). A
        direct get of the key's last message (the bucket allows direct gets)."""
        subject = f"$KV.{self.bucket}.j.{job_id}"
        return self._found(await self._request(f"$JS.API.DIRECT.GET.KV_{self.bucket}.{subject}", b""))

    async def _cas(self, meta: dict[str, Any], payload: bytes, last: int) -> int | None:
        """Write the record if its revision is still `last`; the new revision, or None."""
        try:
            return await self._js_publish(
                f"$KV.{self.bucket}.j.{meta['id']}",
                _record(meta, payload),
                {"Nats-Expected-Last-Subject-Sequence": str(last)},
            )
        except KeyWrongLastSequenceError:
            return None

    async def _consumer(self, queue: str, level: str, lease: float | None) -> str:
        name = f"{_token(queue)}_{level.replace('-', 'm')}"  # a level may be negative
        known = self._ack_wait.get(name)
        if known is not None and (lease is None or known == lease):
            return name
        if lease is None:  # only looking (stats, wait): do not create
            try:
                info = await self._js.consumer_info(self.stream, name)
            except NotFoundError:
                return ""
            self._ack_wait[name] = info.config.ack_wait or 0.0
            return name
        config = api.ConsumerConfig(
            durable_name=name,
            filter_subject=f"{self.prefix}.jobs.{_token(queue)}.{level}",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=lease,
            max_deliver=-1,
            max_ack_pending=-1,
        )
        await self._js.add_consumer(self.stream, config)  # creates, or updates the ack_wait
        self._ack_wait[name] = lease
        return name

    async def _levels(self, queue: str) -> dict[str, int]:
        """Priority level -> messages in the stream (queued, leased or nak'd for a delay)."""
        try:
            info = await self._js.stream_info(
                self.stream, subjects_filter=f"{self.prefix}.jobs.{_token(queue)}.*"
            )
        except NotFoundError:
            return {}
        subjects = info.state.subjects or {}
        return {s.rpartition(".")[2]: n for s, n in subjects.items() if n}

    async def _fetch(self, consumer: str, batch: int) -> list[Msg]:
        """Up to `batch` messages available now (no_wait: the server answers at once). Collected
        by a callback on the fetch's own inbox (a delivered message keeps its stream subject, so
        only the subscription tells whose it is), not awaited one by one with a timer each."""
        msgs: list[Msg] = []
        done: asyncio.Future[list[Msg]] = asyncio.get_running_loop().create_future()

        async def collect(msg: Msg) -> None:
            end = bool(msg.headers and _STATUS in msg.headers)  # 404 no messages / 408: all there is
            if not end:
                msgs.append(msg)
            if (end or len(msgs) >= batch) and not done.done():
                done.set_result(msgs)

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=collect)
        try:
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer}",
                orjson.dumps({"batch": batch, "no_wait": True}),
                reply=inbox,
            )
            return await asyncio.wait_for(done, 10.0)
        finally:
            await sub.unsubscribe()

    # -- the contract ----------------------------------------------------------------------------

    async def enqueue(self, jobs: list[NewJob], now: float) -> list[tuple[Job, bool]]:
        if self._kv is None:
            await self.open()
        if not jobs:
            return []
        for j in jobs:  # everything checked before anything is written
            if not isinstance(j.payload, bytes | bytearray):
                raise TypeError(f"job {j.id}: payload must be bytes")
        out: list[tuple[Job, bool] | None] = [None] * len(jobs)
        first_of_key: dict[tuple[str, str], int] = {}
        fresh: list[int] = []
        claims: list[tuple[int, str]] = []
        for i, j in enumerate(jobs):
            if j.idempotency_key is None:
                fresh.append(i)
                continue
            k = (j.queue, j.idempotency_key)
            if k in first_of_key:
                continue  # answered with the first job of the batch below
            first_of_key[k] = i
            claims.append((i, f"i.{_token(j.queue)}.{_key_part(j.idempotency_key)}"))

        async def claim_key(i: int, key: str) -> None:
            try:
                await self._kv.create(key, jobs[i].id.encode())
                fresh.append(i)
            except KeyWrongLastSequenceError:
                existing = (await self._kv.get(key)).value.decode()
                found = await self._read(existing)
                if found:
                    meta, payload, rev = found
                    out[i] = (_job(meta, payload, f"{rev}|{meta.get('reply')}"), False)
                else:  # the job it named is gone (purged, expired): the key is free again
                    await self._kv.put(key, jobs[i].id.encode())
                    fresh.append(i)

        await asyncio.gather(*(claim_key(i, key) for i, key in claims))
        metas: dict[int, dict[str, Any]] = {}
        for i in fresh:
            j = jobs[i]
            metas[i] = {
                "id": j.id,
                "queue": j.queue,
                "headers": j.headers,
                "priority": int(j.priority),
                "state": "queued",
                "attempts": 0,
                "max_attempts": int(j.max_attempts),
                "created_at": now,
                "run_at": float(j.run_at),
                "idem": j.idempotency_key,
                "callback": j.callback_url,
                "gen": 1,
            }
        written: list[int] = []
        payloads = {i: bytes(jobs[i].payload) for i in fresh}
        try:
            written = list(fresh)  # a failure part-way may have written any of them
            revs = await self._js_publish_many(
                [(f"$KV.{self.bucket}.j.{jobs[i].id}", _record(metas[i], payloads[i]), None) for i in fresh]
            )
            await self._js_publish_many(
                [self._message(metas[i], payloads[i], rev) for i, rev in zip(fresh, revs, strict=True)]
            )
        except BaseException:
            # undo what can be undone: a message already published finds its record deleted
            with contextlib.suppress(Exception):
                await asyncio.gather(*(self._kv.delete(f"j.{jobs[i].id}") for i in written))
                await asyncio.gather(*(self._kv.delete(key) for i, key in claims if i in fresh))
            raise
        for i in fresh:
            out[i] = (_job(metas[i], payloads[i]), True)
        for i, j in enumerate(jobs):
            if out[i] is None:  # a repeated key within the batch
                first = out[first_of_key[(j.queue, j.idempotency_key)]]  # type: ignore[index]
                out[i] = (first[0], False)  # type: ignore[index]
        return out  # type: ignore[return-value]

    async def claim(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        if self._kv is None:
            await self.open()
        if limit <= 0:
            return []
        out: list[Job] = []
        levels = await self._levels(queue)
        for level in sorted(levels, key=int, reverse=True):
            consumer = await self._consumer(queue, level, lease)
            while len(out) < limit:
                need = limit - len(out)
                msgs = await self._fetch(consumer, need)
                out += await self._take(msgs, lease, now)
                if len(msgs) < need:
                    break
            if len(out) >= limit:
                break
        return out

    async def _take(self, msgs: list[Msg], lease: float, now: float) -> list[Job]:
        """Lease the fetched messages' jobs; drop (term) messages that no longer stand for one."""
        fast: list[tuple[Msg, dict[str, Any], bytes]] = []
        slow: list[tuple[Msg, dict[str, Any], bytes]] = []
        for msg in msgs:
            meta, payload = _parse(msg.data)
            if meta["run_at"] > now:
                delay = max(1, int((meta["run_at"] - now) * 1e9))
                await self._nc.publish(msg.reply, b'-NAK {"delay":%d}' % delay)
                continue
            (fast if msg.metadata.num_delivered == 1 else slow).append((msg, meta, payload))

        def leased(msg: Msg, meta: dict[str, Any], attempts: int) -> dict[str, Any]:
            meta = {**meta, "state": "leased", "attempts": attempts, "lease_until": now + lease}
            meta["reply"] = msg.reply
            meta["seq"] = msg.metadata.sequence.stream
            meta.pop("expect", None)
            return meta

        async def redelivered(msg: Msg, meta: dict[str, Any], payload: bytes) -> Job | None:
            found = await self._read(meta["id"])
            if found is False:  # deleted: purged or an enqueue undone
                await self._nc.publish(msg.reply, b"+TERM")
                return None
            if found is None:  # the record outlived the bucket's max age: the message holds the job
                cur, rev = {k: v for k, v in meta.items() if k != "expect"}, 0
            else:
                cur, _, rev = found
            stale = (
                cur["state"] in ("done", "dead")
                or cur["gen"] != meta["gen"]
                or (cur["state"] == "leased" and cur.get("seq") != msg.metadata.sequence.stream)
            )
            if stale:
                await self._nc.publish(msg.reply, b"+TERM")
                return None
            if cur["state"] == "leased" and cur["attempts"] >= cur["max_attempts"]:
                dead = {**cur, "state": "dead", "last_error": "lease expired", "finished_at": now}
                for k in ("reply", "lease_until"):
                    dead.pop(k, None)
                await self._kv.put(f"d.{_token(cur['queue'])}.{cur['id']}", b"")
                if await self._cas(dead, payload, rev) is not None:
                    await self._nc.publish(msg.reply, b"+TERM")
                return None
            new = leased(msg, cur, cur["attempts"] + 1)
            new_rev = await (
                self._cas(new, payload, rev) if rev else self._kv.put(f"j.{cur['id']}", _record(new, payload))
            )
            if new_rev is None:
                return None  # someone else moved it: they decide
            self._remember(new, payload, new_rev)
            return _job(new, payload, f"{new_rev}|{msg.reply}")

        # First deliveries, the bulk: one compare-and-set each on the revision the message carries,
        # written as one batch. Where the record moved on since the message was queued, look.
        news = [leased(msg, meta, meta["attempts"] + 1) for msg, meta, _ in fast]
        revs = await self._js_publish_many(
            [
                self._cas_request(new, payload, meta["expect"])
                for new, (_, meta, payload) in zip(news, fast, strict=True)
            ]
        )
        jobs: list[Job | None] = []
        for new, rev, (msg, meta, payload) in zip(news, revs, fast, strict=True):
            if rev is None:
                slow.append((msg, meta, payload))
            else:
                jobs.append(_job(new, payload, f"{rev}|{msg.reply}"))
                self._remember(new, payload, rev)
        jobs += await asyncio.gather(*(redelivered(*t) for t in slow))
        return [j for j in jobs if j is not None]

    async def settle(self, outcomes: list[Outcome], now: float) -> list[Job | None]:
        if self._kv is None:
            await self.open()
        if not outcomes:
            return []
        out: list[Job | None] = [None] * len(outcomes)
        checked: list[tuple[int, int, str]] = []  # (index, revision, reply subject)
        for i, o in enumerate(outcomes):
            rev_s, _, reply = o.lease.partition("|")
            if rev_s.isdigit() and reply.startswith("$JS.ACK."):
                checked.append((i, int(rev_s), reply))
        known = self._leased
        hits = [known.pop(outcomes[i].job_id, None) for i, _, _ in checked]
        found: list[Any] = [
            hit if hit and hit[2] == rev else None for hit, (_, rev, _) in zip(hits, checked, strict=True)
        ]
        misses = [n for n, hit in enumerate(found) if hit is None]
        for n, record in zip(
            misses, await self._read_many([outcomes[checked[n][0]].job_id for n in misses]), strict=True
        ):
            found[n] = record
        # Each lease still held becomes a compare-and-set of its record, written as one batch.
        writes: list[tuple[int, str, dict[str, Any], bytes, int]] = []
        for (i, rev, reply), record in zip(checked, found, strict=True):
            if not record:
                continue
            meta, payload, current = record
            if current != rev or meta["state"] != "leased" or meta.get("reply") != reply:
                continue
            o = outcomes[i]
            if o.action == "extend":
                await self._nc.publish(reply, b"+WPI")
                ack_wait = self._ack_wait.get(reply.split(".")[3])  # $JS.ACK.<stream>.<consumer>...
                shown = {**meta, "lease_until": now + ack_wait if ack_wait else o.at}
                out[i] = _job(shown, payload, o.lease)
                continue
            new = {k: v for k, v in meta.items() if k not in ("reply", "lease_until", "seq")}
            if o.action == "ack":
                new.update(state="done", finished_at=now)
            elif o.action == "bury":
                new.update(state="dead", finished_at=now, last_error=o.error)
                await self._kv.put(f"d.{_token(meta['queue'])}.{meta['id']}", b"")
            else:  # retry: a new generation of the job, as a new message
                at = o.at if o.at is not None else now
                new.update(state="queued", run_at=at, gen=meta["gen"] + 1)
                if o.error is not None:
                    new["last_error"] = o.error
            writes.append((i, reply, new, payload, rev))
        revs = await self._js_publish_many(
            [self._cas_request(new, payload, rev) for _, _, new, payload, rev in writes]
        )
        requeue: list[tuple[str, tuple[str, bytes, dict[str, str]]]] = []
        for (i, reply, new, payload, _), new_rev in zip(writes, revs, strict=True):
            action = outcomes[i].action
            if new_rev is None:  # lost the race: someone else moved the job on
                if action == "bury":
                    with contextlib.suppress(Exception):
                        await self._undead(new["queue"], new["id"])
                continue
            if action == "retry":
                requeue.append((reply, self._message(new, payload, new_rev)))
            else:
                await self._nc.publish(reply, b"+ACK" if action == "ack" else b"+TERM")
            out[i] = _job(new, payload)
        if requeue:
            await self._js_publish_many([message for _, message in requeue])
            for reply, _ in requeue:
                await self._nc.publish(reply, b"+ACK")
        await self._nc.flush()  # the acks have reached the server when settle returns
        return out

    async def get(self, job_id: str) -> Job | None:
        if self._kv is None:
            await self.open()
        found = await self._read(job_id)
        if not found:
            return None
        meta, payload, rev = found
        return _job(meta, payload, f"{rev}|{meta.get('reply')}")

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Direct gets written together over the one connection: one round trip for the batch."""
        if self._kv is None:
            await self.open()
        out: list[Job | None] = []
        for found in await self._read_many(job_ids):
            if found:
                meta, payload, rev = found
                out.append(_job(meta, payload, f"{rev}|{meta.get('reply')}"))
            else:
                out.append(None)
        return out

    def _remember(self, meta: dict[str, Any], payload: bytes, rev: int) -> None:
        if len(payload) > LEASED_PAYLOAD:
            return
        if len(self._leased) >= LEASED_KEPT:  # leases never settled here: forget the oldest
            del self._leased[next(iter(self._leased))]
        self._leased[meta["id"]] = (meta, payload, rev)

    async def _dead_ids(self, queue: str) -> list[str]:
        # The index's subjects, asked of the KV stream (KV key listing needs a 2.10 server to
        # filter); index entries are removed by purging their subject, so no marker is left.
        head = f"$KV.{self.bucket}.d.{_token(queue)}."
        info = await self._js.stream_info(f"KV_{self.bucket}", subjects_filter=head + ">")
        return sorted(s[len(head) :] for s, n in (info.state.subjects or {}).items() if n)

    async def _undead(self, queue: str, job_id: str) -> None:
        await self._js.purge_stream(
            f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.d.{_token(queue)}.{job_id}"
        )

    async def dead(self, queue: str, limit: int = 100, after: str | None = None) -> list[Job]:
        if self._kv is None:
            await self.open()
        ids = [i for i in await self._dead_ids(queue) if after is None or i > after]
        out: list[Job] = []
        while ids and len(out) < limit:
            page, ids = ids[: limit - len(out)], ids[limit - len(out) :]
            for found in await asyncio.gather(*(self._read(i) for i in page)):
                if found and found[0]["state"] == "dead":
                    out.append(_job(found[0], found[1]))
        return out

    async def replay(self, queue: str, ids: list[str] | None, now: float) -> int:
        if self._kv is None:
            await self.open()
        dead = set(await self._dead_ids(queue))
        chosen = sorted(dead if ids is None else dead & set(ids))

        async def one(job_id: str) -> int:
            found = await self._read(job_id)
            await self._undead(queue, job_id)
            if not found or found[0]["state"] != "dead":
                return 0
            meta, payload, rev = found
            new = {**meta, "state": "queued", "attempts": 0, "run_at": now, "gen": meta["gen"] + 1}
            new.pop("finished_at", None)
            new_rev = await self._cas(new, payload, rev)
            if new_rev is None:
                return 0
            await self._publish(new, payload, new_rev)
            return 1

        return sum(await asyncio.gather(*(one(i) for i in chosen)))

    async def purge(self, queue: str) -> int:
        if self._kv is None:
            await self.open()
        ids = await self._dead_ids(queue)

        async def one(job_id: str) -> None:
            found = await self._read(job_id)
            if found and found[0].get("idem") is not None:
                await self._kv.delete(f"i.{_token(queue)}.{_key_part(found[0]['idem'])}")
            await self._kv.delete(f"j.{job_id}")
            await self._undead(queue, job_id)

        await asyncio.gather(*(one(i) for i in ids))
        return len(ids)

    async def stats(self, queue: str, now: float) -> QueueStats:
        if self._kv is None:
            await self.open()
        levels = await self._levels(queue)
        total = sum(levels.values())
        leased = 0
        oldest: float | None = None
        for level in levels:
            consumer = await self._consumer(queue, level, None)
            first_seq = 0
            if consumer:
                info = await self._js.consumer_info(self.stream, consumer)
                leased += info.num_ack_pending or 0
                if not info.num_pending:
                    continue
                first_seq = (info.delivered.stream_seq or 0) + 1 if info.delivered else 1
            with contextlib.suppress(NotFoundError):
                msg = await self._js.get_msg(
                    self.stream,
                    seq=max(first_seq, 1),
                    next=True,
                    subject=f"{self.prefix}.jobs.{_token(queue)}.{level}",
                )
                meta, _ = _parse(msg.data or b"")
                t = meta["run_at"] if meta["run_at"] > meta["created_at"] else meta["created_at"]
                oldest = t if oldest is None else min(oldest, t)
        dead = len(await self._dead_ids(queue))
        age = 0.0 if oldest is None else max(0.0, now - oldest)
        return QueueStats(queued=max(0, total - leased), leased=leased, dead=dead, oldest_age=age)

    async def wait(self, queue: str, timeout: float) -> None:
        if self._kv is None:
            await self.open()
        """Listen on the queue's subjects (a JetStream publish reaches core subscribers too), then
        look whether something is claimable already. Delayed and leased jobs send no word when
        they come due, so while there are any the wait is capped at half a second."""
        sub = await self._nc.subscribe(f"{self.prefix}.jobs.{_token(queue)}.*", max_msgs=1)
        try:
            waiting = timeout
            for level, count in (await self._levels(queue)).items():
                consumer = await self._consumer(queue, level, None)
                if not consumer:
                    return  # messages no claim has looked at yet
                info = await self._js.consumer_info(self.stream, consumer)
                if info.num_pending:
                    return
                if count:
                    waiting = min(waiting, 0.5)
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                await sub.next_msg(timeout=max(waiting, 0.001))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
