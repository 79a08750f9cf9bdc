"""Queues through a real gateway's API: enqueue (single, batch, idempotent, delayed), pull with
claim and settle, retries to the dead-letter set and replay, errors, roles, metrics; and the
SDK's pull worker: batches, retries with back-off, a poison job, lease extension, graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from bridgeway.sdk import Bury, Client, Job, RetryLater, Worker
from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.queues import QUEUE_BACKENDS, queue_backend
from tests.support.services import REDIS_URL, drop_redis_keys, require_service

QUEUES = {
    "work": {"max_attempts": 2, "backoff": {"base": "0s", "max": "0s"}, "lease": "30s"},
    "small": {"max_depth": 3, "max_payload": "64B"},
    "reports-daily": {},
    "metered": {},
    "pulled": {"max_attempts": 3, "backoff": {"base": "10ms", "max": "20ms"}},
    "long": {"lease": "1s"},
    "stopping": {},
}
ROLES = {
    "producer": {"queues": [{"queue": "reports-*", "access": "produce"}]},
    "consumer": {"queues": [{"queue": "reports-*", "access": "consume"}]},
    "worker": {"queues": [{"queue": "pulled", "access": "consume"}]},
}


@pytest.fixture(scope="module", params=QUEUE_BACKENDS)
def gw(request) -> Iterator[GatewayProc]:
    with queue_backend(request.param) as extra:
        proc = start_gateway({"services": {}, "roles": ROLES, "queues": QUEUES, **extra})
        proc.queue_backend = request.param
        yield proc
        proc.stop()


def once(gw: GatewayProc, why: str) -> None:
    """Skip on the brokers what no backend decides (validation, roles, the SDK's own limits)."""
    if gw.queue_backend != "sqlite":
        pytest.skip(f"{why}, the same on every backend: once is enough")


def post(gw: GatewayProc, path: str, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return gw.request(
        "POST",
        "/api/v1" + path,
        data,
        {"Content-Type": "application/json", **(gw.admin_headers if headers is None else headers)},
    )


def code(r) -> str:
    return r.json()["error"]["code"]


def drain(gw: GatewayProc, queue: str) -> None:
    while jobs := post(gw, f"/queues/{queue}/claim", {"max": 1000}).json()["jobs"]:
        post(
            gw,
            f"/queues/{queue}/settle",
            {"jobs": [{"id": j["id"], "lease": j["lease"], "action": "ack"} for j in jobs]},
        )


def test_enqueue_claim_ack(gw: GatewayProc):
    r = post(
        gw, "/queues/work/jobs", {"payload": {"report": 7}, "headers": {"X-Tenant": "acme"}, "priority": 5}
    )
    assert r.status == 201, r
    job_id = r.json()["id"]
    assert gw.api("GET", f"/jobs/{job_id}").json()["state"] == "queued"
    (job,) = post(gw, "/queues/work/claim", {"max": 10}).json()["jobs"]
    assert (job["id"], job["payload"], job["headers"], job["attempts"]) == (
        job_id,
        {"report": 7},
        {"x-tenant": "acme"},
        1,
    )
    r = post(gw, "/queues/work/settle", {"jobs": [{"id": job_id, "lease": job["lease"], "action": "ack"}]})
    assert r.json()["results"] == [{"id": job_id, "status": 200, "state": "done", "attempts": 1}]
    again = post(
        gw, "/queues/work/settle", {"jobs": [{"id": job_id, "lease": job["lease"], "action": "ack"}]}
    )
    assert again.json()["results"][0]["status"] == 409  # settled already: the lease is gone
    assert again.json()["results"][0]["error"]["code"] == "CONFLICT"
    assert gw.api("GET", f"/jobs/{job_id}").json()["state"] == "done"


def test_batches_are_all_or_nothing_and_ordered(gw: GatewayProc):
    drain(gw, "work")
    r = post(gw, "/queues/work/jobs", {"jobs": [{"payload": i} for i in range(300)]})
    assert r.status == 201
    ids = [j["id"] for j in r.json()["jobs"]]
    assert ids == sorted(ids) and len(set(ids)) == 300  # time-ordered
    bad = post(gw, "/queues/work/jobs", {"jobs": [{"payload": 1}, {"payload": 2, "delay": "soon"}]})
    assert (bad.status, code(bad)) == (422, "VALIDATION_ERROR")
    assert "jobs[1].delay" in bad.json()["error"]["message"]
    claimed = post(gw, "/queues/work/claim", {"max": 1000}).json()["jobs"]
    assert [j["payload"] for j in claimed] == list(range(300))  # none of the refused batch
    post(
        gw,
        "/queues/work/settle",
        {"jobs": [{"id": j["id"], "lease": j["lease"], "action": "ack"} for j in claimed]},
    )


def test_idempotency_keys(gw: GatewayProc):
    first = post(gw, "/queues/work/jobs", {"payload": 1, "idempotency_key": "order-42"})
    second = post(gw, "/queues/work/jobs", {"payload": 2, "idempotency_key": "order-42"})
    assert (first.status, second.status) == (201, 200)
    assert first.json()["id"] == second.json()["id"] and second.json()["created"] is False
    drain(gw, "work")


def test_delay_and_long_poll(gw: GatewayProc):
    drain(gw, "work")
    post(gw, "/queues/work/jobs", {"payload": "later", "delay": "600ms"})
    assert post(gw, "/queues/work/claim", {"max": 1}).json()["jobs"] == []
    started = time.monotonic()
    (job,) = post(gw, "/queues/work/claim", {"max": 1, "wait": 5}).json()["jobs"]
    assert job["payload"] == "later" and 0.3 < time.monotonic() - started < 3
    # A long poll wakes as soon as a job is enqueued.
    out = {}
    waiter = threading.Thread(
        target=lambda: out.update(r=post(gw, "/queues/work/claim", {"max": 1, "wait": 10}))
    )
    waiter.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    post(gw, "/queues/work/jobs", {"payload": "now"})
    waiter.join(5)
    assert out["r"].json()["jobs"][0]["payload"] == "now" and time.monotonic() - t0 < 1
    drain(gw, "work")


def test_poison_job_reaches_the_dead_letters_and_is_replayed(gw: GatewayProc):
    drain(gw, "work")
    job_id = post(gw, "/queues/work/jobs", {"payload": "poison"}).json()["id"]
    for attempt in (1, 2):
        (job,) = post(gw, "/queues/work/claim", {"max": 1, "wait": 2}).json()["jobs"]
        assert job["attempts"] == attempt
        r = post(
            gw,
            "/queues/work/settle",
            {"jobs": [{"id": job_id, "lease": job["lease"], "action": "nack", "error": "boom"}]},
        )
        assert r.json()["results"][0]["state"] == ("queued" if attempt == 1 else "dead")
    dead = gw.api("GET", "/queues/work/dead").json()["jobs"]
    assert [(d["id"], d["state"]) for d in dead] == [(job_id, "dead")]
    assert "boom" in dead[0]["last_error"]
    assert post(gw, "/queues/work/dead/replay", {"ids": [job_id]}).json() == {"replayed": 1}
    (job,) = post(gw, "/queues/work/claim", {"max": 1}).json()["jobs"]
    assert (job["id"], job["attempts"]) == (job_id, 1)
    post(gw, "/queues/work/settle", {"jobs": [{"id": job_id, "lease": job["lease"], "action": "bury"}]})
    assert post(gw, "/queues/work/dead/purge", None).json() == {"purged": 1}
    assert gw.api("GET", "/queues/work/dead").json()["jobs"] == []


def test_extend_and_nack_with_delay(gw: GatewayProc):
    drain(gw, "work")
    job_id = post(gw, "/queues/work/jobs", {"payload": 1}).json()["id"]
    (job,) = post(gw, "/queues/work/claim", {"max": 1, "lease": "1s"}).json()["jobs"]
    r = post(
        gw,
        "/queues/work/settle",
        {"jobs": [{"id": job_id, "lease": job["lease"], "action": "extend", "lease_for": 60}]},
    )
    until = r.json()["results"][0]["lease_until"]
    if gw.queue_backend == "nats":  # extend restarts a full ack wait, the claim's 1 s (docs/queues.md)
        assert until > time.time() + 0.5
    else:
        assert until > time.time() + 50
    r = post(
        gw,
        "/queues/work/settle",
        {"jobs": [{"id": job_id, "lease": job["lease"], "action": "nack", "delay": "30s"}]},
    )
    assert r.json()["results"][0]["run_at"] > time.time() + 25
    assert post(gw, "/queues/work/claim", {"max": 1}).json()["jobs"] == []


def test_settle_then_claim_in_one_call(gw: GatewayProc):
    ids = [
        j["id"]
        for j in post(gw, "/queues/work/jobs", {"jobs": [{"payload": i} for i in range(5)]}).json()["jobs"]
    ]
    (first,) = post(gw, "/queues/work/claim", {"max": 1}).json()["jobs"]
    ack = {"id": first["id"], "lease": first["lease"], "action": "ack"}
    r = post(gw, "/queues/work/settle", {"jobs": [ack], "claim": {"max": 3, "lease": "20s"}})
    assert r.status == 200, r
    assert r.json()["results"] == [{"id": first["id"], "status": 200, "state": "done", "attempts": 1}]
    claimed = r.json()["jobs"]
    assert [j["id"] for j in claimed] == ids[1:4] and {j["attempts"] for j in claimed} == {1}
    assert all(j["lease_until"] - time.time() > 15 for j in claimed)  # the claim's own lease
    assert gw.api("GET", f"/jobs/{ids[1]}").json()["state"] == "leased"
    # Settling the last one claims what is left, and an empty queue answers no jobs, at once.
    r = post(
        gw,
        "/queues/work/settle",
        {
            "jobs": [{"id": j["id"], "lease": j["lease"], "action": "ack"} for j in claimed],
            "claim": {"max": 10},
        },
    )
    assert [x["state"] for x in r.json()["results"]] == ["done"] * 3
    (last,) = r.json()["jobs"]
    started = time.monotonic()
    r = post(
        gw,
        "/queues/work/settle",
        {"jobs": [{"id": last["id"], "lease": last["lease"], "action": "ack"}], "claim": {"max": 10}},
    )
    assert r.json()["jobs"] == [] and time.monotonic() - started < 2
    assert {gw.api("GET", f"/jobs/{i}").json()["state"] for i in ids} == {"done"}


def test_a_lease_settles_only_on_its_own_queue(gw: GatewayProc):
    """The gateway remembers the leases its claims handed out; one of another queue is refused
    as the backend's copy would refuse it."""
    job_id = post(gw, "/queues/metered/jobs", {"payload": 1}).json()["id"]
    (job,) = post(gw, "/queues/metered/claim", {"max": 1}).json()["jobs"]
    item = {"id": job_id, "lease": job["lease"], "action": "ack"}
    r = post(gw, "/queues/work/settle", {"jobs": [item]})
    assert r.json()["results"][0]["status"] == 409
    assert gw.api("GET", f"/jobs/{job_id}").json()["state"] == "leased"
    assert post(gw, "/queues/metered/settle", {"jobs": [item]}).json()["results"][0]["state"] == "done"


def test_a_bad_claim_refuses_the_whole_settle(gw: GatewayProc):
    once(gw, "input is checked before the backend sees it")
    job_id = post(gw, "/queues/work/jobs", {"payload": 1}).json()["id"]
    (job,) = post(gw, "/queues/work/claim", {"max": 1}).json()["jobs"]
    ack = {"id": job_id, "lease": job["lease"], "action": "ack"}
    for claim, field in (({"max": 0}, "claim.max"), ({"wait": 31}, "claim.wait"), ([], "claim")):
        r = post(gw, "/queues/work/settle", {"jobs": [ack], "claim": claim})
        assert (r.status, code(r)) == (422, "VALIDATION_ERROR") and field in r.json()["error"]["message"], r
    r = post(gw, "/queues/work/settle", {"jobs": [ack], "colour": "red"})
    assert r.status == 422 and "colour" in r.json()["error"]["message"]
    assert gw.api("GET", f"/jobs/{job_id}").json()["state"] == "leased"  # nothing was settled
    assert post(gw, "/queues/work/settle", {"jobs": [ack]}).json()["results"][0]["state"] == "done"


def test_errors_name_the_problem(gw: GatewayProc):
    once(gw, "input is checked before the backend sees it")
    r = post(gw, "/queues/nope/jobs", {"payload": 1})
    assert (r.status, code(r)) == (404, "NOT_FOUND")
    r = post(gw, "/queues/work/jobs", b"{not json")
    assert (r.status, code(r)) == (400, "BAD_REQUEST")
    r = post(gw, "/queues/work/jobs", {"payload": 1, "colour": "red"})
    assert (r.status, code(r)) == (422, "VALIDATION_ERROR") and "colour" in r.json()["error"]["message"]
    r = post(gw, "/queues/work/jobs", {"priority": 1})
    assert "payload" in r.json()["error"]["message"]
    r = post(gw, "/queues/work/jobs", {"payload": 1, "headers": {"Content-Length": "5"}})
    assert r.status == 422 and "headers" in r.json()["error"]["message"]
    r = post(gw, "/queues/work/jobs", {"payload": 1, "callback_url": "http://127.0.0.1:9/cb"})
    assert r.status == 422 and "callback_secret" in r.json()["error"]["message"]
    r = post(gw, "/queues/small/jobs", {"payload": "x" * 100})
    assert (r.status, code(r)) == (413, "BODY_TOO_LARGE")
    r = post(gw, "/queues/work/claim", {"max": 0})
    assert r.status == 422 and "max" in r.json()["error"]["message"]
    r = post(gw, "/queues/work/settle", {"jobs": [{"id": "x", "action": "ack"}]})
    assert r.status == 422 and "jobs[0].lease" in r.json()["error"]["message"]
    r = post(gw, "/queues/work/settle", {"jobs": [{"id": "x", "lease": "y", "action": "ack"}]})
    assert r.json()["results"][0]["status"] == 409
    r = post(gw, "/queues/work/jobs", {"jobs": [{"payload": 1}] * 1001})
    assert r.status == 422 and "at most 1000" in r.json()["error"]["message"]
    assert gw.api("GET", "/jobs/000000000000").status == 404


def test_max_depth_refuses_with_429(gw: GatewayProc):
    assert post(gw, "/queues/small/jobs", {"jobs": [{"payload": i} for i in range(3)]}).status == 201
    r = post(gw, "/queues/small/jobs", {"payload": 4})
    assert (r.status, code(r), r.headers["retry-after"]) == (429, "QUEUE_FULL", "1")
    drain(gw, "small")
    assert post(gw, "/queues/small/jobs", {"payload": 4}).status == 201
    drain(gw, "small")


def test_roles_granted_queues(gw: GatewayProc):
    once(gw, "roles are checked before the backend sees the call")

    def as_key(role: str):
        made = gw.api("POST", "/keys", {"name": role, "role": role})
        return {"Authorization": f"Bearer {made.json()['key']}", "Content-Type": "application/json"}

    producer, consumer = as_key("producer"), as_key("consumer")
    r = post(gw, "/queues/reports-daily/jobs", {"payload": 1}, producer)
    assert r.status == 201
    job_id = r.json()["id"]
    assert gw.request("GET", f"/api/v1/jobs/{job_id}", None, producer).status == 200
    assert code(post(gw, "/queues/reports-daily/claim", {}, producer)) == "FORBIDDEN"
    assert code(post(gw, "/queues/work/jobs", {"payload": 1}, producer)) == "FORBIDDEN"
    (job,) = post(gw, "/queues/reports-daily/claim", {"max": 5}, consumer).json()["jobs"]
    assert job["id"] == job_id
    r = post(
        gw,
        "/queues/reports-daily/settle",
        {"jobs": [{"id": job_id, "lease": job["lease"], "action": "ack"}]},
        consumer,
    )
    assert r.json()["results"][0]["state"] == "done"
    assert code(post(gw, "/queues/reports-daily/dead/purge", None, consumer)) == "FORBIDDEN"
    listed = gw.request("GET", "/api/v1/queues", None, consumer).json()["queues"]
    assert [q["name"] for q in listed] == ["reports-daily"]
    assert post(gw, "/queues/work/jobs", {"payload": 1}, {}).status == 401


def test_queue_list_and_metrics(gw: GatewayProc):
    drain(gw, "metered")
    post(gw, "/queues/metered/jobs", {"jobs": [{"payload": i} for i in range(4)]})
    listed = {q["name"]: q for q in gw.api("GET", "/queues").json()["queues"]}
    assert listed["metered"]["queued"] == 4 and listed["metered"]["delivery"] == "pull"

    def scraped():
        text = gw.request("GET", "/metrics").body.decode()
        return 'bridgeway_queue_depth{queue="metered"} 4.0' in text and text

    text = wait_until(scraped, timeout=5, what="queue depth in /metrics")
    assert 'bridgeway_queue_enqueued_total{queue="metered"}' in text
    assert 'bridgeway_queue_buried_total{queue="metered"}' in text
    assert "bridgeway_queue_oldest_age_seconds" in text
    drain(gw, "metered")


# -- the SDK worker ------------------------------------------------------------------------


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
        worker = Worker(bw, lease=2.0, poll=0.2)

        @worker.job("long")
        async def handle(job: Job):
            runs.append(job.attempts)
            await asyncio.sleep(3.0)  # longer than the lease: extended while it runs

        async def done() -> bool:
            return (await bw.queues.get(job_id))["state"] == "done"

        await run_until(worker, done)
        assert runs == [1]


async def test_stop_lets_running_jobs_finish(gw: GatewayProc):
    once(gw, "stopping is the SDK worker's")
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


# -- the CLI -------------------------------------------------------------------------------


def cli(gw: GatewayProc, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridgeway", "jobs", *args, "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_cli_enqueue_status_dead_replay_purge(gw: GatewayProc):
    once(gw, "the CLI speaks the HTTP API")
    made = cli(gw, "enqueue", "stopping", '{"cli": true}', "--key", "cli-1")
    assert made.returncode == 0, made.stderr
    job_id = made.stdout.strip()
    status = cli(gw, "status", job_id)
    assert json.loads(status.stdout)["payload"] == {"cli": True}
    listed = cli(gw, "queues")
    assert "stopping" in listed.stdout and "pull" in listed.stdout
    (job,) = post(gw, "/queues/stopping/claim", {"max": 1}).json()["jobs"]
    post(gw, "/queues/stopping/settle", {"jobs": [{"id": job_id, "lease": job["lease"], "action": "bury"}]})
    assert job_id in cli(gw, "dead", "stopping").stdout
    assert "replayed 1 job(s)" in cli(gw, "replay", "stopping", job_id).stdout
    (job,) = post(gw, "/queues/stopping/claim", {"max": 1}).json()["jobs"]
    post(gw, "/queues/stopping/settle", {"jobs": [{"id": job_id, "lease": job["lease"], "action": "bury"}]})
    assert "purged 1 job(s)" in cli(gw, "purge", "stopping", "--yes").stdout
    bad = cli(gw, "enqueue", "nope", "1")
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    refused = cli(gw, "queues", env={"BRIDGEWAY_TOKEN": "wrong"})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


async def test_a_slow_worker_holds_no_more_than_its_concurrency(gw: GatewayProc):
    once(gw, "the SDK worker keeps its own limit")
    async with client(gw) as bw:
        ids = await bw.queues.enqueue_many("stopping", [{"payload": i} for i in range(40)])
        running, most = 0, 0
        worker = Worker(bw, concurrency=4, batch=100, poll=0.2)

        @worker.job("stopping")
        async def handle(job: Job):
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1

        leased = []

        async def done() -> bool:
            stats = next(q for q in gw.api("GET", "/queues").json()["queues"] if q["name"] == "stopping")
            leased.append(stats["leased"])
            return stats["queued"] == stats["leased"] == 0

        await run_until(worker, done)
        assert most == 4 and max(leased) <= 4  # the rest stayed in the queue, not in the worker
        assert {(await bw.queues.get(i))["state"] for i in ids} == {"done"}


def test_queues_live_in_the_redis_state_by_default():
    """`state: redis://` and no jobs.backend: the queues go to the same Redis (main's first
    version refused to start)."""
    require_service("redis")
    queue = f"q{uuid.uuid4().hex[:12]}"
    proc = start_gateway({"services": {}, "state": REDIS_URL, "queues": {queue: {}}})
    ids: list[str] = []
    try:
        r = post(proc, f"/queues/{queue}/jobs", {"jobs": [{"payload": i} for i in range(3)]})
        ids = [j["id"] for j in r.json()["jobs"]]
        jobs = post(proc, f"/queues/{queue}/claim", {"max": 10}).json()["jobs"]
        assert [j["payload"] for j in jobs] == [0, 1, 2]
        settle = [{"id": j["id"], "lease": j["lease"], "action": "ack"} for j in jobs]
        assert [
            x["state"] for x in post(proc, f"/queues/{queue}/settle", {"jobs": settle}).json()["results"]
        ] == ["done"] * 3
        assert proc.api("GET", f"/jobs/{ids[0]}").json()["state"] == "done"
    finally:
        proc.stop()
        asyncio.run(drop_redis_keys([f"bw:job:{i}" for i in ids], f"bw:q:{queue}"))
