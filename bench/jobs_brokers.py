"""Raw queue backend rates on the brokers (Redis Streams, NATS JetStream) beside Celery 5 on Redis.

No gateway, no HTTP: the backends are driven from this process (uvloop), so these figures are
the ceiling the HTTP API (issue 5's targets: Redis >= 30,000/s enqueued and >= 10,000/s end to
end, NATS >= 10,000 / 5,000, Redis end to end >= 10x Celery) has to fit under.

Per backend, on a fresh prefix:
  enqueue     N jobs in batches of 500, `--inflight` batches at a time
  claim+ack   the N queued jobs drained by `--workers` loops of claim(500) then settle(ack x 500)
  end to end  N more jobs: producers and the same workers at once, first enqueue to last ack

Celery (its own venv, `--celery-python`): a no-op task on the same Redis (db 15, a queue of its
own): N apply_async calls timed in the producer, then one worker (`--celery-pool`, 2 processes
by default, as on this 2-core machine) started and timed until the queue and its unacked set are
empty. Its "end to end" is that drain; it includes the worker's start-up, which is why N is
large enough for the drain to dominate.

    python bench/jobs_brokers.py [--jobs 50000] [--celery-jobs 5000] \\
        [--celery-python /tmp/venv-celery/bin/python] [--markdown]

Celery's venv: python3 -m venv /tmp/venv-celery && /tmp/venv-celery/bin/pip install 'celery[redis]'
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from celery_peer import celery_rate  # noqa: E402
from common import log, print_table  # noqa: E402

from bridgeway.jobs.queues import open_queue_backend  # noqa: E402
from bridgeway.jobs.queues.backend import NewJob, Outcome, QueueBackend  # noqa: E402

BATCH = 500
URLS = {"redis": "redis://127.0.0.1:6379/0", "nats": "nats://127.0.0.1:4222"}
PAYLOAD = b'{"task":"noop","n":1}'


def _jobs(queue: str, n: int) -> list[NewJob]:
    return [NewJob(id=uuid.uuid4().hex, queue=queue, payload=PAYLOAD) for _ in range(n)]


async def _enqueue(backend: QueueBackend, queue: str, n: int, inflight: int) -> float:
    """Seconds to enqueue n jobs in batches, `inflight` batches at a time."""
    batches = [_jobs(queue, min(BATCH, n - i)) for i in range(0, n, BATCH)]
    sem = asyncio.Semaphore(inflight)

    async def one(batch: list[NewJob]) -> None:
        async with sem:
            await backend.enqueue(batch, time.time())

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in batches))
    return time.perf_counter() - started


async def _work(backend: QueueBackend, queue: str, target: int, done: list[int], lease: float) -> None:
    """Claim and ack in batches until `done[0]` reaches target (shared by the workers)."""
    while done[0] < target:
        jobs = await backend.claim(queue, BATCH, lease, time.time())
        if not jobs:
            await backend.wait(queue, 0.05)
            continue
        await backend.settle([Outcome(j.id, j.lease or "", "ack") for j in jobs], time.time())
        done[0] += len(jobs)


async def _bench_backend(name: str, n: int, workers: int, inflight: int) -> dict[str, float]:
    prefix = f"bwbench-{uuid.uuid4().hex[:8]}"
    backend = open_queue_backend(f"{URLS[name]}?prefix={prefix}")
    await backend.open()
    queue = "bench"
    lease = 60.0
    try:
        # warm up: consumer creation, script loading
        await backend.enqueue(_jobs(queue, 10), time.time())
        await _work(backend, queue, 10, [0], lease)

        enq = await _enqueue(backend, queue, n, inflight)
        log(f"{name}: enqueued {n} in {enq:.2f}s")
        done = [0]
        started = time.perf_counter()
        await asyncio.gather(*(_work(backend, queue, n, done, lease) for _ in range(workers)))
        drain = time.perf_counter() - started
        log(f"{name}: claimed+acked {done[0]} in {drain:.2f}s")

        done = [0]
        started = time.perf_counter()
        await asyncio.gather(
            _enqueue(backend, queue, n, inflight),
            *(_work(backend, queue, n, done, lease) for _ in range(workers)),
        )
        e2e = time.perf_counter() - started
        log(f"{name}: end to end {done[0]} in {e2e:.2f}s")
        return {"enqueue": n / enq, "drain": done[0] / drain if drain else 0, "e2e": n / e2e}
    finally:
        await backend.close()
        await _drop(name, prefix)


async def _drop(name: str, prefix: str) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.support.services import drop_nats_prefix, drop_redis_prefix

    await (drop_redis_prefix if name == "redis" else drop_nats_prefix)(prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=4, help="claim+ack loops per backend")
    ap.add_argument("--inflight", type=int, default=4, help="enqueue batches in flight")
    ap.add_argument("--backends", default="redis,nats")
    ap.add_argument("--celery-python", default="/tmp/venv-celery/bin/python")
    ap.add_argument("--celery-jobs", type=int, default=5_000)
    ap.add_argument("--celery-pool", default="prefork")
    ap.add_argument("--celery-concurrency", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    results: dict[str, dict[str, float]] = {}
    for name in [b for b in args.backends.split(",") if b]:
        results[name] = asyncio.run(_bench_backend(name, args.jobs, args.workers, args.inflight))
    if args.celery_python and Path(args.celery_python).exists():
        results["celery (redis)"] = celery_rate(
            args.celery_python, args.celery_jobs, args.celery_pool, args.celery_concurrency
        )
    else:
        log(f"celery skipped: no interpreter at {args.celery_python}")

    celery = results.get("celery (redis)")
    rows = []
    for name, r in results.items():
        ratio = f"{r['e2e'] / celery['e2e']:.1f}x" if celery else "-"
        rows.append([name, f"{r['enqueue']:,.0f}", f"{r['drain']:,.0f}", f"{r['e2e']:,.0f}", ratio])
    print_table(
        f"Queue backends, raw (no HTTP), batches of {BATCH}, jobs/s",
        ["backend", "enqueue", "claim+ack", "end to end", "e2e vs celery"],
        rows,
        args.markdown,
    )


if __name__ == "__main__":
    main()
