"""Crash tests: 10,000 jobs, the gateway (or a pull worker) killed with SIGKILL while delivering,
started again. Every job is processed at least once, none is lost, and jobs with an idempotency
key are not enqueued twice. The pull worker's crash runs on every backend; the gateway's on SQLite,
whose file it reads afterwards."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bridgeway.jobs.queues.sqlite import STATE_NAMES as STATES
from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.procs import ROOT, Proc
from tests.support.queues import QUEUE_BACKENDS, queue_backend

N = 10_000
KEYED = 1_000  # the first jobs carry idempotency keys


def enqueue_all(gw: GatewayProc, queue: str) -> list[str]:
    ids: list[str] = []
    for start in range(0, N, 500):
        jobs = [
            {"payload": {"n": i}} | ({"idempotency_key": f"k{i}"} if i < KEYED else {})
            for i in range(start, start + 500)
        ]
        r = gw.api("POST", f"/queues/{queue}/jobs", {"jobs": jobs})
        assert r.status == 201, r
        ids += [j["id"] for j in r.json()["jobs"]]
    return ids


def enqueue_keyed_again(gw: GatewayProc, queue: str, ids: list[str]) -> None:
    """After the restart: the keyed jobs again, answered with the jobs stored before the crash."""
    jobs = [{"payload": {"n": i}, "idempotency_key": f"k{i}"} for i in range(KEYED)]
    r = gw.api("POST", f"/queues/{queue}/jobs", {"jobs": jobs})
    assert [(j["id"], j["created"]) for j in r.json()["jobs"]] == [(i, False) for i in ids[:KEYED]]


def queue_stats(gw: GatewayProc, queue: str) -> dict:
    return next(q for q in gw.api("GET", "/queues").json()["queues"] if q["name"] == queue)


def all_done(gw: GatewayProc, queue: str) -> bool:
    stats = queue_stats(gw, queue)
    return (stats["queued"], stats["leased"], stats["dead"]) == (0, 0, 0)


def jobs_in(db: Path) -> dict[str, tuple[str, int]]:
    """Every job in the gateway's file: id -> (state, attempts), read after the gateway stopped."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {i: (STATES[s], a) for i, s, a in conn.execute("SELECT id, state, attempts FROM jobs")}


def test_gateway_killed_while_pushing(tmp_path: Path, echo: Proc):
    db = tmp_path / "crash.db"
    config = {
        "state": f"sqlite:///{db}",
        "services": {"echo": {"instances": [echo.url], "retries": {"attempts": 1}}},
        "queues": {
            "crash": {"deliver": {"service": "echo", "path": "/job"}, "concurrency": 64, "lease": "2s"}
        },
    }
    gw = start_gateway(config)
    try:
        ids = enqueue_all(gw, "crash")
        wait_until(lambda: queue_stats(gw, "crash")["queued"] <= N * 4 // 5, timeout=60, what="deliveries")
        gw.kill()
        assert sum(1 for state, _ in jobs_in(db).values() if state == "done") < N, "the crash came too late"
        gw = start_gateway(config)
        enqueue_keyed_again(gw, "crash", ids)
        wait_until(
            lambda: all_done(gw, "crash"), timeout=90, interval=0.2, what="nothing left queued or leased"
        )
    finally:
        gw.stop()
    jobs = jobs_in(db)
    # Acked only after the service answered 2xx: done means delivered, at least once.
    assert set(jobs) == set(ids) and {state for state, _ in jobs.values()} == {"done"}
    retried = sum(1 for _, attempts in jobs.values() if attempts > 1)
    assert retried <= 64 + 256  # only the jobs in flight at the crash went out twice


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from bridgeway.sdk import Client, Worker

    async def main(url, token, out_path, stall_after):
        out = open(out_path, "a", buffering=1)
        done = 0
        async with Client(url, api_key=token) as bw:
            worker = Worker(bw, concurrency=100, batch=100, lease=6.0, poll=1.0)

            @worker.job("pulled")
            async def handle(job):
                nonlocal done
                if done >= int(stall_after):  # the worker to be killed stalls holding its leases
                    await asyncio.sleep(3600)
                await asyncio.sleep(0.002)
                done += 1
                out.write(job.id + "\\n")

            await worker.run()

    asyncio.run(main(*sys.argv[1:]))
    """
)


def processed(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def stalled(gw: GatewayProc, out: Path) -> bool:
    """The pull worker holds leases and finished no job for a second, twice in a row."""
    for _ in range(2):
        before = len(processed(out))
        time.sleep(1.0)
        if len(processed(out)) != before or queue_stats(gw, "pulled")["leased"] == 0:
            return False
    return True


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
def test_pull_worker_killed_holding_leases(tmp_path: Path, backend: str):
    with queue_backend(backend) as extra:
        _pull_worker_killed(tmp_path, extra)


def _pull_worker_killed(tmp_path: Path, extra: dict) -> None:
    config = {"state": f"sqlite:///{tmp_path / 'pull.db'}", "queues": {"pulled": {"lease": "6s"}}, **extra}
    gw = start_gateway(config)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "processed.txt"
    args = [sys.executable, str(script), f"http://127.0.0.1:{gw.port}", gw.token, str(out)]
    doomed, healthy = [*args, str(N // 5)], [*args, str(N * 2)]
    workers = []
    try:
        ids = enqueue_all(gw, "pulled")
        workers.append(Proc(doomed, cwd=ROOT, name="pull-worker"))
        wait_until(lambda: len(processed(out)) >= N // 5, timeout=60, what="jobs under way")
        # The doomed worker's handlers stall after N // 5 jobs: once it has claimed again it holds
        # those leases until it dies. (Killed at a random moment with instant handlers, it held
        # none whenever its only batch was being settled: on a fast backend, a fair share of runs.)
        # Leases seen once are not enough: they may be the last instant batch's, settled a moment
        # later, with the claim of the stalling ones not yet made (the kill then leaves none, on
        # any backend). Stalled means no job finished for a second while leases are held.
        wait_until(lambda: stalled(gw, out), timeout=30, what="the stalled leases")
        workers[0].kill()  # the gateway holds the leases: the worker's death cannot release them
        # An expired lease still counts until a claim takes the job again (none runs here), so
        # this holds however long a loaded machine pauses between the kill and this look.
        assert queue_stats(gw, "pulled")["leased"] > 0, "the worker died holding leases"
        enqueue_keyed_again(gw, "pulled", ids)
        workers.append(Proc(healthy, cwd=ROOT, name="pull-worker"))
        wait_until(lambda: all_done(gw, "pulled"), timeout=90, interval=0.2, what="every job settled")
        seen = processed(out)
        assert set(seen) == set(ids)
        assert len(seen) - N <= 200  # those leased by the dead worker and not settled
        done = json.loads(gw.request("GET", f"/api/v1/jobs/{ids[0]}", None, gw.admin_headers).body)
        assert done["state"] == "done"
    finally:
        for proc in workers:
            proc.stop()
        gw.stop()


def test_gateway_killed_while_settles_claim(tmp_path: Path):
    """Settles that claim the next jobs in the same call, the gateway killed while it serves
    them: every outcome it answered is in the file, no job is lost, and after a restart the
    leases it held expire and every job is settled."""
    db = tmp_path / "calls.db"
    config = {"state": f"sqlite:///{db}", "queues": {"calls": {"lease": "1s"}}}
    gw = start_gateway(config)
    answered: set[str] = set()  # outcomes the gateway answered as applied

    def consume(gw: GatewayProc, stop: threading.Event) -> None:
        def call(path: str, body: dict) -> dict:
            r = gw.api("POST", f"/queues/calls/{path}", body)
            assert r.status == 200, r
            return r.json()

        jobs = call("claim", {"max": 100, "wait": 2})["jobs"]
        while jobs and not stop.is_set():
            outcomes = [{"id": j["id"], "lease": j["lease"], "action": "ack"} for j in jobs]
            answer = call("settle", {"jobs": outcomes, "claim": {"max": 100, "wait": 2}})
            answered.update(r["id"] for r in answer["results"] if r["status"] == 200)
            jobs = answer["jobs"]

    stop = threading.Event()
    try:
        ids = enqueue_all(gw, "calls")

        def until_killed() -> None:
            with contextlib.suppress(OSError):  # the kill cuts a call short
                consume(gw, stop)

        consumer = threading.Thread(target=until_killed)
        consumer.start()
        wait_until(lambda: len(answered) >= N // 5, timeout=60, what="settles under way")
        gw.kill()
        stop.set()
        consumer.join(10)
        jobs = jobs_in(db)
        assert set(jobs) == set(ids)  # nothing lost
        assert {i for i in answered if jobs[i][0] != "done"} == set()  # nothing answered undone
        assert any(state != "done" for state, _ in jobs.values()), "the crash came too late"
        gw = start_gateway(config)
        consume(gw, threading.Event())
        assert all_done(gw, "calls")
    finally:
        gw.stop()
    assert {state for state, _ in jobs_in(db).values()} == {"done"}
