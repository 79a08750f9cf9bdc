"""The NATS JetStream queue backend: a job's state lives in its stream message while it waits or
is leased; a KV record is written when something other than a first delivery happens to it.

Layout, with P the prefix, Q the queue and L a priority level (Q encoded to the characters
subjects and keys allow):

    stream P_queue      work-queue retention; one message per time a job is (re)queued, on subject
                        P.queue.Q.L.{id}: the job's fields as a JSON line, then the payload
    consumer Q_L        a durable pull consumer per queue and level (filter P.queue.Q.L.*):
                        explicit ack, ack_wait = the lease, unlimited deliveries; the consumers are
                        also how any replica knows which levels a queue has
    KV P_queue_state    j.{id}: the job's record, written by compare-and-set only: at a retry, a
                        replay, a redelivery, a nak for a delay, and at done / dead; l.{id}: the
                        note a first delivery leaves (its token and attempt, for `get` elsewhere);
                        w.{id}: the subject of its message, for `get` of a waiting job (written
                        with the enqueue, only the batch's last answer awaited); i.Q.{key}:
                        idempotency key -> id (created atomically)
    stream P_queue_dead subject P.queue-dead.Q.{id} per dead letter (listing subjects costs the
                        server a scan of every subject in a stream: not of the KV's, one per job)

The hot path costs one JetStream round trip per job and step: enqueue publishes the message (its
ack awaited), a claim fetches it, a settle compare-and-sets the terminal record then acks the
message. A first delivery writes nothing it must wait for: the attempt is the message's `base`
(attempts before this message) plus one, and its lease token is `{revision}|{ack subject}`, where
`revision` is the job record's revision the message was queued at (0: none yet). Any replica
settles with the token: the record is written only if its revision is still that one, so a
token that a redelivery, a retry or an earlier settle made stale fails and changes nothing. A
redelivery (an expired lease, a delayed job coming due) reads the record and writes it: attempts
= base + deliveries - naks (the delays' naks are counted in the record).

A claim leaves a lease note l.{id} per job, sent together with only the batch's last answer
awaited, so `get` and `get_many` on another replica show the lease. This process settles its
own leases from memory (`_held`: no read of the message or record; if one moved on since, the
settle's compare-and-set refuses it). A batch's messages, notes,
compare-and-sets and acks are written as one buffer of protocol commands (`_send`).

What JetStream does not have, and what is done instead (the limits to know):
- Priority: a subject and consumer per level; a claim takes from the highest first, one fetch
  per level it looks at.
- Delay: a message claimed before its run_at is nak'd with the remaining delay (one extra
  delivery, and a record write, per delayed job); `stats` counts such a job as leased until due.
- Leases are judged by the broker's clock, and per consumer: ack_wait is the lease of the latest
  claim (a claim asking for another lease updates the consumer). `extend` resets the timer to a
  full ack_wait (+WPI) whatever `at` asks. An expired lease counts as leased until a claim takes
  the job again.
- Retention is the KV bucket's max age, counted from a record's last write: terminal jobs and
  dead letters go after `retention`, idempotency keys `retention` after their job was created. A
  job waiting longer than that is not found by `get` until a claim takes it, and one whose record
  aged out while it waited (longer than the retention after a retry) loses the lease of its next
  first delivery (its revision is gone); its redelivery after the lease carries on.
- A batch is not atomic across a crash: the messages are published together; a failure the
  gateway sees purges the ones it published and raises.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from bridgeway.jobs.queues.backend import Job, NewJob, Outcome, QueueStats

# A request to the broker: (subject, body, the subject's expected last sequence or None).
Request = tuple[str, bytes, int | None]

# Jobs this process leased, kept for their settle: at most this many, of payloads
# up to LEASED_PAYLOAD bytes (80 MB at worst; a larger job's settle reads its message).
LEASED_KEPT = 10_000
LEASED_PAYLOAD = 8192
DEFAULT_ACK_WAIT = 30.0  # a consumer made at enqueue, before any claim said its lease
_PLAIN = re.compile(r"[A-Za-z0-9-]+")
_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")  # a job id: one subject token, one key part
_ACK_SUBJECT = re.compile(r"\$JS\.ACK(?:\.[A-Za-z0-9_=-]+){7,10}")
_STATUS = "Status"
_TERMINAL = ("done", "dead")


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


def _ack_info(reply: str, stream: str) -> tuple[str, int, int] | None:
    """(consumer, deliveries, stream sequence) from an ack subject of `stream`, None if it is not
    one: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`, with a domain and
    an account hash after ACK on newer servers. A token comes from a client: what is published to
    its subject must be one of ours."""
    if not _ACK_SUBJECT.fullmatch(reply):
        return None
    parts = reply.split(".")
    at = 2 if len(parts) == 9 else 4
    if len(parts) - at < 7 or parts[at] != stream:
        return None
    try:
        return parts[at + 1], int(parts[at + 2]), int(parts[at + 3])
    except ValueError:
        return None


def _pub(subject: str, payload: bytes, reply: str = "") -> bytes:
    """A PUB command of the NATS protocol (subjects built here, or checked as ack subjects)."""
    if reply:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)


def _cas_pub(subject: str, payload: bytes, reply: str, last: int) -> bytes:
    """A publish to a stream that holds only if the subject's last message is still `last`."""
    hdr = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: %d\r\n\r\n" % last
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(hdr),
        len(hdr) + len(payload),
        hdr,
        payload,
    )


def _job(meta: dict[str, Any], payload: bytes, lease: str | None = None) -> Job:
    leased = meta["state"] == "leased"
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
        lease=lease if leased else None,
        lease_until=meta.get("lease_until") if leased else None,
        last_error=meta.get("last_error"),
        finished_at=meta.get("finished_at"),
        idempotency_key=meta.get("idem"),
        callback_url=meta.get("callback"),
    )


# A message's fields that are not the job's: where its record stood, attempts before it.
_MESSAGE_ONLY = ("rev", "base")
# A record's fields that only describe the delivery that wrote it.
_DELIVERY_ONLY = ("reply", "dc", "naks", "lease_until")


def _fields(meta: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    out = dict(meta)
    for key in drop:
        out.pop(key, None)
    return out


@dataclass(slots=True)
class _Held:
    """A job this process leased: what its settle writes from, without a read."""

    meta: dict[str, Any]  # the job as leased (state "leased")
    payload: bytes
    token: str  # the lease token the claim gave out: f"{rev}|{reply}"
    rev: int
    reply: str


class NatsQueueBackend:
    """Queues in JetStream; see the module docstring for the layout and the limits."""

    def __init__(self, url: str, *, prefix: str, retention: float) -> None:
        self.url = url
        self.prefix = prefix
        self.retention = retention
        self.stream = f"{prefix}_queue"
        self.bucket = f"{prefix}_queue_state"
        self.dead_stream = f"{prefix}_queue_dead"
        self._nc: Client = None  # type: ignore[assignment]  # connected by open()
        self._js: Any = None
        self._kv: Any = None
        self._opening: asyncio.Lock | None = None
        self._ack_wait: dict[str, float] = {}  # consumer -> its ack_wait, as last set or seen
        self._levels: dict[str, set[int]] = {}  # queue token -> levels that have a consumer
        # Answers of the hot paths come back on one wildcard inbox, matched by the last token:
        # nats-py's js.publish costs a request object, a JSON parse and a task switch per call.
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_inbox = ""
        self._ack_seq = 0
        self._held: dict[str, _Held] = {}  # job id -> its lease from this process

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
            subjects=[f"{self.prefix}.queue.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            allow_direct=True,
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
        dead = api.StreamConfig(
            name=self.dead_stream,
            subjects=[f"{self.prefix}.queue-dead.>"],
            max_msgs_per_subject=1,
            max_age=self.retention,
            storage=api.StorageType.FILE,
            duplicate_window=min(120.0, self.retention),
        )
        for config in (jobs, kv, dead):
            try:
                info = await js.stream_info(config.name)  # type: ignore[arg-type]
            except NotFoundError:
                await js.add_stream(config)
            else:
                if config is not jobs and info.config.max_age != self.retention:
                    # the last replica to open decides the retention: one bucket, one max age
                    await js.update_stream(
                        info.config.evolve(max_age=self.retention, duplicate_window=config.duplicate_window)
                    )
        kv_handle = await js.key_value(self.bucket)
        self._ack_inbox = self._nc.new_inbox()
        await self._nc.subscribe(self._ack_inbox + ".*", cb=self._on_ack)
        # A level another replica adds is announced here (the consumer list is read at open, by
        # `stats`, and by a claim on a queue this process has not seen).
        await self._nc.subscribe(f"{self.prefix}.queue-levels", cb=self._on_level)
        await self._refresh_levels()
        self._kv = kv_handle  # last: a set _kv means open

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._acks.pop(msg.subject.rpartition(".")[2], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _on_level(self, msg: Msg) -> None:
        queue_token, _, level = msg.data.decode().rpartition("_")
        with contextlib.suppress(ValueError):
            self._levels.setdefault(queue_token, set()).add(int(level.replace("m", "-")))

    async def _send(self, commands: list[bytes]) -> None:
        """Protocol commands written as one buffer. nats-py's `publish` costs microseconds and a
        buffer of its own per message (its checks, then its flusher's writelines), and a batch of
        jobs is hundreds of messages; the commands here are built from subjects this module made,
        or checked (`_ack_info`), and sizes checked at enqueue (`_check`)."""
        if self._nc.is_closed:
            raise nats.errors.ConnectionClosedError
        await self._nc._send_command(b"".join(commands))
        await self._nc._flush_pending()

    async def _request_many(self, requests: list[Request], before: list[bytes] | None = None) -> list[Msg]:
        """Requests written together (after the commands `before`, in the same buffer), every one
        before any answer is awaited, and one timeout for them all (a task or timer per job was
        most of a batch's cost). A request is (subject, body, expected last subject sequence or
        None): the answers come back on one wildcard inbox, matched by its last token."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        tokens, futures = [], []
        commands = list(before or ())
        inbox = self._ack_inbox
        try:
            for subject, body, last in requests:
                self._ack_seq += 1
                token = str(self._ack_seq)
                fut = loop.create_future()
                self._acks[token] = fut
                tokens.append(token)
                futures.append(fut)
                reply = f"{inbox}.{token}"
                commands.append(
                    _pub(subject, body, reply) if last is None else _cas_pub(subject, body, reply, last)
                )
            await self._send(commands)
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
        self, requests: list[Request], before: list[bytes] | None = None
    ) -> list[int | None]:
        """Publish a batch to streams: per message its sequence, or None where a compare-and-set
        (expected last subject sequence) did not hold. `before`: commands sent ahead of them."""
        replies = await self._request_many(requests, before)
        return [self._seq(r[0], reply) for r, reply in zip(requests, replies, strict=True)]

    # -- where things are ------------------------------------------------------------------------

    def _subject(self, queue: str, priority: int, job_id: str) -> str:
        return f"{self.prefix}.queue.{_token(queue)}.{priority}.{job_id}"

    def _message(self, meta: dict[str, Any], payload: bytes, rev: int, base: int) -> Request:
        """The job's message, queued at record revision `rev` after `base` attempts. No headers: a
        delivered message with none skips nats-py's header parsing."""
        fields = {**_fields(meta, _DELIVERY_ONLY), "state": "queued", "rev": rev, "base": base}
        return self._subject(meta["queue"], meta["priority"], meta["id"]), _record(fields, payload), None

    def _cas_request(self, meta: dict[str, Any], payload: bytes, last: int) -> Request:
        return f"$KV.{self.bucket}.j.{meta['id']}", _record(meta, payload), last

    async def _cas(self, meta: dict[str, Any], payload: bytes, last: int) -> int | None:
        """Write the record if its revision is still `last` (0: none); the new revision, or None."""
        [rev] = await self._js_publish_many([self._cas_request(meta, payload, last)])
        return rev

    @staticmethod
    def _found(msg: Msg) -> tuple[dict[str, Any], bytes, int] | None | bool:
        """A direct get's answer: (fields, payload, sequence); None when absent, False when the
        KV key was deleted (a tombstone)."""
        headers = msg.headers or {}
        if _STATUS in headers:  # 404: no such message
            return None
        if headers.get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            return False
        meta, payload = _parse(msg.data)
        return meta, payload, int(headers["Nats-Sequence"])

    async def _direct_many(self, requests: list[tuple[str, bytes]]) -> list[Any]:
        """Direct gets written together: per request, what `_found` makes of its answer."""
        return [self._found(m) for m in await self._request_many([(s, b, None) for s, b in requests])]

    def _kv_get(self, key: str) -> tuple[str, bytes]:
        return f"$JS.API.DIRECT.GET.KV_{self.bucket}.$KV.{self.bucket}.{key}", b""

    def _message_get(self, seq: int) -> tuple[str, bytes]:
        return f"$JS.API.DIRECT.GET.{self.stream}", b'{"seq":%d}' % seq

    async def _records(self, job_ids: list[str]) -> list[tuple[dict[str, Any], bytes, int] | None | bool]:
        return await self._direct_many([self._kv_get(f"j.{i}") for i in job_ids])

    async def _lookup(self, job_ids: list[str]) -> list[Job | None]:
        """Jobs as the broker knows them: the record, or the lease note of a first delivery
        (newer when its generation and delivery are), or else the waiting message itself, on the
        subject its enqueue wrote down (a lookup by a wildcard subject costs the server a scan of
        the stream). An id that cannot be a job's (it comes from a client) is not looked up."""
        valid = [i for i in job_ids if _ID.fullmatch(i)]
        if len(valid) < len(job_ids):
            found = dict(zip(valid, await self._lookup(valid), strict=True))
            return [found.get(i) for i in job_ids]
        if not job_ids:
            return []
        n = len(job_ids)
        found = await self._direct_many(
            [self._kv_get(f"{kind}.{i}") for kind in ("j", "l", "w") for i in job_ids]
        )
        records, notes, wheres = found[:n], found[n : 2 * n], found[2 * n :]
        out: list[Job | None] = [None] * n
        by_seq: list[tuple[int, dict[str, Any]]] = []  # (index, note): leased, read the message
        waiting: list[tuple[int, str]] = []  # neither record nor note: (index, its message's subject)
        for k, (record, note) in enumerate(zip(records, notes, strict=True)):
            if record is False:  # purged
                continue
            meta = record[0] if record else None
            lease = note[0] if note else None
            if meta and meta["state"] in _TERMINAL:
                out[k] = _job(meta, record[1])
            elif lease and (meta is None or (lease["gen"], 1) > (meta["gen"], meta.get("dc", 0))):
                by_seq.append((k, lease))
            elif meta:
                out[k] = _job(meta, record[1], f"{record[2]}|{meta.get('reply')}")
            elif wheres[k]:
                waiting.append((k, wheres[k][0]["subject"]))
        if by_seq or waiting:
            subject = f"$JS.API.DIRECT.GET.{self.stream}"
            msgs = await self._direct_many(
                [self._message_get(note["seq"]) for _, note in by_seq]
                + [(subject, orjson.dumps({"last_by_subj": where})) for _, where in waiting]
            )
            for (k, note), msg in zip(by_seq, msgs[: len(by_seq)], strict=True):
                if msg and msg[0]["id"] == job_ids[k]:
                    meta = {**_fields(msg[0], _MESSAGE_ONLY), "state": "leased"}
                    meta.update(attempts=note["attempts"], lease_until=note["lease_until"])
                    out[k] = _job(meta, msg[1], note["token"])
            for (k, _), msg in zip(waiting, msgs[len(by_seq) :], strict=True):
                if msg and msg[0]["id"] == job_ids[k]:
                    meta = {**_fields(msg[0], _MESSAGE_ONLY), "attempts": msg[0]["base"]}
                    out[k] = _job(meta, msg[1])
        return out

    # -- levels and consumers --------------------------------------------------------------------

    @staticmethod
    def _consumer_name(queue_token: str, level: int) -> str:
        return f"{queue_token}_{str(level).replace('-', 'm')}"  # a level may be negative

    async def _refresh_levels(self) -> None:
        """Every queue's levels, from the stream's consumers (their names say queue and level)."""
        levels: dict[str, set[int]] = {}
        offset = 0
        while True:
            [reply] = await self._request_many(
                [(f"$JS.API.CONSUMER.NAMES.{self.stream}", b'{"offset":%d}' % offset, None)]
            )
            answer = orjson.loads(reply.data)
            names = answer.get("consumers") or []
            for name in names:
                queue_token, _, level = name.rpartition("_")
                with contextlib.suppress(ValueError):
                    levels.setdefault(queue_token, set()).add(int(level.replace("m", "-")))
            offset += len(names)
            if not names or offset >= answer.get("total", 0):
                break
        for queue_token, known in levels.items():
            self._levels.setdefault(queue_token, set()).update(known)

    async def _ensure_levels(self, pairs: set[tuple[str, int]]) -> None:
        """Consumers for the (queue, level) pairs an enqueue uses, where this process has not seen
        them: made with a default ack_wait (a claim sets its lease) and announced to replicas."""
        for queue, level in pairs:
            queue_token = _token(queue)
            if level in self._levels.get(queue_token, ()):
                continue
            name = self._consumer_name(queue_token, level)
            try:
                info = await self._js.consumer_info(self.stream, name)
                self._ack_wait[name] = info.config.ack_wait or DEFAULT_ACK_WAIT
            except NotFoundError:
                await self._add_consumer(queue_token, level, DEFAULT_ACK_WAIT)
            self._levels.setdefault(queue_token, set()).add(level)
            await self._nc.publish(f"{self.prefix}.queue-levels", name.encode())

    async def _add_consumer(self, queue_token: str, level: int, ack_wait: float) -> str:
        name = self._consumer_name(queue_token, level)
        config = api.ConsumerConfig(
            durable_name=name,
            filter_subject=f"{self.prefix}.queue.{queue_token}.{level}.*",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=-1,
        )
        await self._js.add_consumer(self.stream, config)  # creates, or updates the ack_wait
        self._ack_wait[name] = ack_wait
        return name

    async def _consumer(self, queue_token: str, level: int, lease: float) -> str:
        """The level's consumer, its ack_wait set to `lease` (the latest claim's lease rules)."""
        name = self._consumer_name(queue_token, level)
        if self._ack_wait.get(name) == lease:
            return name
        return await self._add_consumer(queue_token, level, lease)

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
            self._check(j)
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
                [found] = await self._lookup([existing])
                if found:
                    out[i] = (found, False)
                else:  # the job it named is gone (purged, expired): the key is free again
                    await self._kv.put(key, jobs[i].id.encode())
                    fresh.append(i)

        await asyncio.gather(*(claim_key(i, key) for i, key in claims))
        fresh.sort()
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
        payloads = {i: bytes(jobs[i].payload) for i in fresh}
        try:
            await self._ensure_levels({(jobs[i].queue, int(jobs[i].priority)) for i in fresh})
            # With each message, where it is, for `get`: sent in the same buffer, the last one's
            # answer awaited (a connection's publishes to one stream are stored in order).
            messages = [self._message(metas[i], payloads[i], 0, 0) for i in fresh]
            wheres = [
                (f"$KV.{self.bucket}.w.{jobs[i].id}", _record({"subject": m[0]}, b""))
                for i, m in zip(fresh, messages, strict=True)
            ]
            if messages:
                before = [_pub(subject, body) for subject, body in wheres[:-1]]
                await self._js_publish_many([*messages, (*wheres[-1], None)], before=before)
        except BaseException:
            # undo what can be undone: the messages (one subject each) and the keys taken
            with contextlib.suppress(Exception):
                await asyncio.gather(
                    *(
                        self._js.purge_stream(self.stream, subject=self._subject(j.queue, j.priority, j.id))
                        for j in (jobs[i] for i in fresh)
                    )
                )
                await asyncio.gather(*(self._kv.delete(key) for i, key in claims if i in fresh))
            raise
        for i in fresh:
            out[i] = (_job(metas[i], payloads[i]), True)
        for i, j in enumerate(jobs):
            if out[i] is None:  # a repeated key within the batch
                first = out[first_of_key[(j.queue, j.idempotency_key)]]  # type: ignore[index]
                out[i] = (first[0], False)  # type: ignore[index]
        return out  # type: ignore[return-value]

    def _check(self, job: NewJob) -> None:
        """A job's id is one subject token, and its record fits in a NATS message with room for
        what a settle adds (an error of up to 1,000 characters, times)."""
        if not _ID.fullmatch(job.id):
            raise ValueError(f"job id {job.id[:40]!r}: expected 1 to 200 letters, digits, '-' or '_'")
        size = len(job.payload) + sum(len(k) + len(v) + 8 for k, v in job.headers.items())
        size += len(job.callback_url or "") + len(job.idempotency_key or "") + 4096
        if size > self._nc.max_payload:
            raise ValueError(
                f"job {job.id}: {size} bytes with its fields, more than the NATS server's "
                f"max_payload ({self._nc.max_payload})"
            )

    async def claim(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        if self._kv is None:
            await self.open()
        if limit <= 0:
            return []
        queue_token = _token(queue)
        if queue_token not in self._levels:
            await self._refresh_levels()
        out: list[Job] = []
        for level in sorted(self._levels.get(queue_token, ()), reverse=True):
            consumer = await self._consumer(queue_token, level, lease)
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
        """Lease the fetched messages' jobs. A first delivery of a due job is leased as it is;
        the rest (delays, redeliveries) go by the job's record."""
        jobs: list[Job] = []
        notes: list[Request] = []
        slow: list[tuple[Msg, dict[str, Any], bytes, int]] = []
        lease_until = now + lease
        for msg in msgs:
            meta, payload = _parse(msg.data)
            info = _ack_info(msg.reply, self.stream)
            if info is None:
                continue
            _, delivered, seq = info
            if delivered > 1 or meta["run_at"] > now:
                slow.append((msg, meta, payload, delivered))
                continue
            job_id, rev = meta["id"], meta.pop("rev")
            attempts = meta.pop("base") + 1
            token = f"{rev}|{msg.reply}"
            meta.update(state="leased", attempts=attempts, lease_until=lease_until)
            job = _job(meta, payload, token)
            jobs.append(job)
            self._hold(job, meta, payload, rev, msg.reply)
            note = {"gen": meta["gen"], "seq": seq, "token": token, "attempts": attempts}
            note["lease_until"] = lease_until
            notes.append((f"$KV.{self.bucket}.l.{job_id}", orjson.dumps(note), None))
        if notes:
            # The notes are advice for `get` elsewhere: sent together, the last one's answer
            # awaited (a connection's publishes to one stream are stored in order).
            await self._request_many(
                notes[-1:], before=[_pub(subject, body) for subject, body, _ in notes[:-1]]
            )
        if slow:
            jobs += await self._take_again(slow, lease_until, now)
        return jobs

    async def _take_again(
        self, slow: list[tuple[Msg, dict[str, Any], bytes, int]], lease_until: float, now: float
    ) -> list[Job]:
        """Redeliveries and delayed jobs: each decided by the job's record, then a compare-and-set
        of it; a message the record shows to be stale is dropped (+TERM)."""
        records = await self._records([meta["id"] for _, meta, _, _ in slow])
        writes: list[tuple[Msg, dict[str, Any], bytes, int, str]] = []  # (msg, new, payload, rev, what)
        acks: list[bytes] = []
        for (msg, meta, payload, delivered), record in zip(slow, records, strict=True):
            if record is False:  # purged
                acks.append(_pub(msg.reply, b"+TERM"))
                continue
            cur, rev = (record[0], record[2]) if record else (None, 0)
            if cur is not None and (
                cur["gen"] > meta["gen"] or (cur["gen"] == meta["gen"] and cur["state"] in _TERMINAL)
            ):
                acks.append(_pub(msg.reply, b"+TERM"))  # a message of an old generation
                continue
            naks = cur.get("naks", 0) if cur is not None and cur["gen"] == meta["gen"] else 0
            job = {**_fields(meta, _MESSAGE_ONLY), "dc": delivered, "naks": naks}
            if meta["run_at"] > now:
                job.update(state="queued", attempts=meta["base"], naks=naks + 1)
                writes.append((msg, job, payload, rev, "delay"))
                continue
            prior = meta["base"] + delivered - 1 - naks  # attempts before this delivery
            if prior >= meta["max_attempts"]:
                job.update(state="dead", attempts=prior, last_error="lease expired", finished_at=now)
                await self._mark_dead(meta["queue"], meta["id"])
                writes.append((msg, _fields(job, _DELIVERY_ONLY), payload, rev, "dead"))
                continue
            job.update(state="leased", attempts=prior + 1, lease_until=lease_until, reply=msg.reply)
            writes.append((msg, job, payload, rev, "lease"))
        revs = await self._js_publish_many([self._cas_request(j, p, rev) for _, j, p, rev, _ in writes])
        jobs: list[Job] = []
        for (msg, job, payload, _, what), new_rev in zip(writes, revs, strict=True):
            if new_rev is None:  # someone else moved it on: they decide
                if what == "dead":
                    with contextlib.suppress(Exception):
                        await self._undead(job["queue"], job["id"])
                continue
            if what == "delay":
                delay = max(1, int((job["run_at"] - now) * 1e9))
                acks.append(_pub(msg.reply, b'-NAK {"delay":%d}' % delay))
            elif what == "dead":
                acks.append(_pub(msg.reply, b"+TERM"))
            else:
                leased = _job(job, payload, f"{new_rev}|{msg.reply}")
                jobs.append(leased)
                self._hold(leased, job, payload, new_rev, msg.reply)
        if acks:
            await self._send(acks)
        return jobs

    def _hold(self, job: Job, meta: dict[str, Any], payload: bytes, rev: int, reply: str) -> None:
        if len(payload) > LEASED_PAYLOAD:
            self._held.pop(job.id, None)
            return
        if len(self._held) >= LEASED_KEPT:  # leases never settled here: forget the oldest
            del self._held[next(iter(self._held))]
        self._held[job.id] = _Held(meta, payload, job.lease or "", rev, reply)

    async def settle(self, outcomes: list[Outcome], now: float) -> list[Job | None]:
        if self._kv is None:
            await self.open()
        if not outcomes:
            return []
        out: list[Job | None] = [None] * len(outcomes)
        # Each outcome's job as leased: from memory when this process leased it with that token,
        # else from its message (the token names its stream sequence) and its record.
        leased: list[tuple[int, int, str, dict[str, Any], bytes]] = []  # (index, rev, reply, job, payload)
        unknown: list[tuple[int, int, str, int, int]] = []  # (index, rev, reply, deliveries, seq)
        for i, o in enumerate(outcomes):
            held = self._held.get(o.job_id)
            if held is not None and held.token == o.lease:
                leased.append((i, held.rev, held.reply, held.meta, held.payload))
                continue
            rev_s, _, reply = o.lease.partition("|")
            info = _ack_info(reply, self.stream)
            if rev_s.isdigit() and info is not None and _ID.fullmatch(o.job_id):
                unknown.append((i, int(rev_s), reply, info[1], info[2]))
        if unknown:
            n = len(unknown)
            found = await self._direct_many(
                [self._message_get(seq) for *_, seq in unknown]
                + [self._kv_get(f"j.{outcomes[i].job_id}") for i, *_ in unknown]
            )
            for (i, rev, reply, delivered, _), msg, record in zip(unknown, found[:n], found[n:], strict=True):
                if not msg or msg[0]["id"] != outcomes[i].job_id:
                    continue  # acknowledged: settled, or retried as a new message
                if record and record[2] == rev and record[0]["state"] == "leased":
                    leased.append((i, rev, reply, record[0], record[1]))  # a redelivery's lease
                elif msg[0]["rev"] == rev and delivered == 1:  # a first delivery's lease
                    job = {
                        **_fields(msg[0], _MESSAGE_ONLY),
                        "state": "leased",
                        "attempts": msg[0]["base"] + 1,
                    }
                    leased.append((i, rev, reply, job, msg[1]))
        extends = [t for t in leased if outcomes[t[0]].action == "extend"]
        if extends:
            await self._extend(outcomes, extends, out, now)
        # Each other outcome becomes a compare-and-set of the record at the token's revision.
        writes: list[tuple[int, str, dict[str, Any], bytes, int]] = []
        for i, rev, reply, job, payload in leased:
            o = outcomes[i]
            if o.action == "extend":
                continue
            new = _fields(job, _DELIVERY_ONLY)
            if o.action == "ack":
                new.update(state="done", finished_at=now)
            elif o.action == "bury":
                new.update(state="dead", finished_at=now, last_error=o.error)
                await self._mark_dead(job["queue"], job["id"])
            else:  # retry: a new generation of the job, as a new message
                new.update(state="queued", run_at=o.at if o.at is not None else now, gen=job["gen"] + 1)
                if o.error is not None:
                    new["last_error"] = o.error
            writes.append((i, reply, new, payload, rev))
        revs = await self._js_publish_many([self._cas_request(new, p, rev) for _, _, new, p, rev in writes])
        acks: list[bytes] = []
        requeue: list[tuple[str, Request]] = []
        for (i, reply, new, payload, _), new_rev in zip(writes, revs, strict=True):
            action = outcomes[i].action
            self._held.pop(new["id"], None)
            if new_rev is None:  # a stale token: someone else moved the job on
                if action == "bury":
                    with contextlib.suppress(Exception):
                        await self._undead(new["queue"], new["id"])
                continue
            if action == "retry":
                requeue.append((reply, self._message(new, payload, new_rev, new["attempts"])))
            else:
                acks.append(_pub(reply, b"+ACK" if action == "ack" else b"+TERM"))
            out[i] = _job(new, payload)
        if requeue:
            await self._js_publish_many([message for _, message in requeue])
            acks += [_pub(reply, b"+ACK") for reply, _ in requeue]
        if acks:
            # Not awaited: an ack lost with this process leaves a redelivery that finds the record
            # already written and drops the message.
            await self._send(acks)
        return out

    async def _extend(
        self,
        outcomes: list[Outcome],
        extends: list[tuple[int, int, str, dict[str, Any], bytes]],
        out: list[Job | None],
        now: float,
    ) -> None:
        """+WPI for each lease still held (its record still at the token's revision): the broker
        restarts a full ack_wait."""
        records = await self._records([job["id"] for _, _, _, job, _ in extends])
        acks: list[bytes] = []
        for (i, rev, reply, job, payload), record in zip(extends, records, strict=True):
            if record is False or (record[2] if record else 0) != rev:
                continue  # a redelivery, retry or settle has moved the record on
            acks.append(_pub(reply, b"+WPI"))
            info = _ack_info(reply, self.stream)
            ack_wait = self._ack_wait.get(info[0]) if info else None
            shown = {**job, "lease_until": now + ack_wait if ack_wait else outcomes[i].at}
            out[i] = _job(shown, payload, outcomes[i].lease)
        if acks:
            await self._send(acks)

    async def get(self, job_id: str) -> Job | None:
        if self._kv is None:
            await self.open()
        [job] = await self._lookup([job_id])
        return job

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        if self._kv is None:
            await self.open()
        return await self._lookup(job_ids)

    def _dead_subject(self, queue: str, job_id: str) -> str:
        return f"{self.prefix}.queue-dead.{_token(queue)}.{job_id}"

    async def _mark_dead(self, queue: str, job_id: str) -> None:
        await self._js_publish_many([(self._dead_subject(queue, job_id), b"", None)])

    async def _dead_ids(self, queue: str) -> list[str]:
        # The index's subjects, asked of its own stream: a subject listing costs the server a
        # scan of every subject in the stream, and the KV bucket holds one or two per job.
        # Entries are removed by purging their subject, so no marker is left.
        head = self._dead_subject(queue, "")
        info = await self._js.stream_info(self.dead_stream, subjects_filter=head + "*")
        return sorted(s[len(head) :] for s, n in (info.state.subjects or {}).items() if n)

    async def _undead(self, queue: str, job_id: str) -> None:
        await self._js.purge_stream(self.dead_stream, subject=self._dead_subject(queue, job_id))

    async def dead(self, queue: str, limit: int = 100, after: str | None = None) -> list[Job]:
        if self._kv is None:
            await self.open()
        ids = [i for i in await self._dead_ids(queue) if after is None or i > after]
        out: list[Job] = []
        while ids and len(out) < limit:
            page, ids = ids[: limit - len(out)], ids[limit - len(out) :]
            for found in await self._records(page):
                if found and found[0]["state"] == "dead":
                    out.append(_job(found[0], found[1]))
        return out

    async def replay(self, queue: str, ids: list[str] | None, now: float) -> int:
        if self._kv is None:
            await self.open()
        dead = set(await self._dead_ids(queue))
        chosen = sorted(dead if ids is None else dead & set(ids))

        async def one(job_id: str, found: Any) -> int:
            await self._undead(queue, job_id)
            if not found or found[0]["state"] != "dead":
                return 0
            meta, payload, rev = found
            new = {**meta, "state": "queued", "attempts": 0, "run_at": now, "gen": meta["gen"] + 1}
            new.pop("finished_at", None)
            new_rev = await self._cas(new, payload, rev)
            if new_rev is None:
                return 0
            await self._ensure_levels({(new["queue"], new["priority"])})
            await self._js_publish_many([self._message(new, payload, new_rev, 0)])
            return 1

        found = await self._records(chosen)
        return sum(await asyncio.gather(*(one(i, f) for i, f in zip(chosen, found, strict=True))))

    async def purge(self, queue: str) -> int:
        if self._kv is None:
            await self.open()
        ids = await self._dead_ids(queue)

        async def one(job_id: str, found: Any) -> None:
            if found and found[0].get("idem") is not None:
                await self._kv.delete(f"i.{_token(queue)}.{_key_part(found[0]['idem'])}")
            await self._kv.delete(f"j.{job_id}")
            for kind in ("l", "w"):  # its lease note, where its message was
                with contextlib.suppress(NotFoundError):
                    await self._js.purge_stream(
                        f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{kind}.{job_id}"
                    )
            await self._undead(queue, job_id)

        found = await self._records(ids)
        await asyncio.gather(*(one(i, f) for i, f in zip(ids, found, strict=True)))
        return len(ids)

    async def stats(self, queue: str, now: float) -> QueueStats:
        """Per level, the consumer's counts: waiting (not yet delivered) is queued; delivered and
        not acknowledged (leases, expired leases not yet taken again, delays nak'd) is leased."""
        if self._kv is None:
            await self.open()
        await self._refresh_levels()
        queue_token = _token(queue)
        queued = leased = 0
        oldest: float | None = None
        for level in self._levels.get(queue_token, ()):
            try:
                info = await self._js.consumer_info(self.stream, self._consumer_name(queue_token, level))
            except NotFoundError:
                continue
            queued += info.num_pending or 0
            leased += info.num_ack_pending or 0
            if not info.num_pending:
                continue
            first_seq = (info.delivered.stream_seq or 0) + 1 if info.delivered else 1
            with contextlib.suppress(NotFoundError):
                msg = await self._js.get_msg(
                    self.stream,
                    seq=max(first_seq, 1),
                    next=True,
                    subject=f"{self.prefix}.queue.{queue_token}.{level}.*",
                )
                meta, _ = _parse(msg.data or b"")
                t = meta["run_at"] if meta["run_at"] > meta["created_at"] else meta["created_at"]
                oldest = t if oldest is None else min(oldest, t)
        dead = len(await self._dead_ids(queue))
        age = 0.0 if oldest is None else max(0.0, now - oldest)
        return QueueStats(queued=queued, leased=leased, dead=dead, oldest_age=age)

    async def wait(self, queue: str, timeout: float) -> None:
        """Listen on the queue's subjects (a JetStream publish reaches core subscribers too), then
        look whether something is claimable already. Delayed and leased jobs send no word when
        they come due, so while there are any the wait is capped at half a second."""
        if self._kv is None:
            await self.open()
        queue_token = _token(queue)
        sub = await self._nc.subscribe(f"{self.prefix}.queue.{queue_token}.*.*", max_msgs=1)
        try:
            waiting = timeout
            for level in self._levels.get(queue_token, ()):
                try:
                    info = await self._js.consumer_info(self.stream, self._consumer_name(queue_token, level))
                except NotFoundError:
                    continue
                if info.num_pending:
                    return
                if info.num_ack_pending:
                    waiting = min(waiting, 0.5)
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                await sub.next_msg(timeout=max(waiting, 0.001))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
