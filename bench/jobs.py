"""Job queues through Bridgeway's own HTTP API: enqueue rate in batches, end-to-end rate with a
batching pull worker (the SDK's Worker, no-op handler, in its own process), and the latency of
a single job on an idle queue, pulled and pushed; beside them, in the same run, Celery 5 on the
same Redis with the same no-op task (bench/celery_peer.py, from its own venv: `--celery-python`).

    python bench/jobs.py                      # SQLite (the embedded default)
    python bench/jobs.py --backend redis --markdown
    python bench/jobs.py --backend sqlite,redis,nats --markdown   # one table, a column each

Celery's venv: python3 -m venv /tmp/venv-celery && /tmp/venv-celery/bin/pip install 'celery[redis]'
(without it the Celery row is left out, and the run says so).

`--backend` names `sqlite` (the gateway's file), `redis` or `nats` (the loopback brokers, under
a fresh `?prefix=` dropped afterwards), or is any `jobs.backend` URL; several, comma-separated,
run one after the other into one table.
The gateway runs with one worker pinned to core 1; the producers, the worker and the push
target share core 0 (see bench/README.md). Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from celery_peer import celery_rate  # noqa: E402
from common import CPU_LOAD, ROOT, Procs, free_port, log, print_table, start_bridgeway  # noqa: E402

TOKEN = "bench-admin-token-0123456789"

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from bridgeway.sdk import Client, Worker

    async def main(url, token, concurrency, batch):
        async with Client(url, api_key=token) as bw:
            worker = Worker(bw, concurrency=int(concurrency), batch=int(batch), poll=1.0)

            @worker.job("bench")
            async def noop(job):
                return None

            await worker.run()

    asyncio.run(main(*sys.argv[1:]))
    """
)


BROKERS = {"redis": "redis://127.0.0.1:6379/0", "nats": "nats://127.0.0.1:4222"}


def backend_url(name: str, prefix: str) -> str:
    return f"{BROKERS[name]}?prefix={prefix}" if name in BROKERS else name


async def drop_prefix(name: str, prefix: str) -> None:
    """What a run wrote on a loopback broker under its prefix."""
    if name == "redis":
        from bridgeway.state.resp import RespClient

        client = RespClient(BROKERS["redis"], timeout=10.0)
        cursor = b"0"
        while True:
            cursor, keys = await client.execute("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 5000)
            if keys:
                await client.execute("UNLINK", *keys)
            if cursor == b"0":
                break
        await client.close()
    elif name == "nats":
        import nats

        nc = await nats.connect(BROKERS["nats"])
        js = nc.jetstream()
        for info in await js.streams_info():
            if (info.config.name or "").startswith((prefix, f"KV_{prefix}")):
                await js.delete_stream(info.config.name)
        await nc.close()


def config(port: int, push_port: int, backend: str, workdir: Path) -> str:
    jobs = f"jobs: {{backend: {backend!r}}}" if backend != "sqlite" else ""
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:{port}
        state: sqlite:///{workdir / "bench.db"}
        admin: {{token: {TOKEN}}}
        logging: {{access: false, level: warning}}
        {jobs}
        services:
          target: {{instances: ["http://127.0.0.1:{push_port}"], retries: {{attempts: 1}}}}
        queues:
          bench: {{lease: 60s}}
          latency: {{}}
          pushed: {{deliver: {{service: target, path: /job}}}}
        """
    )


class PushTarget:
    """The push queue's service: records when each job arrived (payload {"t": sent})."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.arrived = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.delays.append(time.time() - orjson.loads(body)["t"])
                self.arrived.set()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


async def enqueue_rate(session, base: str, jobs: int, batch: int, producers: int) -> float:
    """Jobs/s stored, `producers` clients each posting batches until `jobs` are in."""
    per_call = [{"jobs": [{"payload": {"n": i}} for i in range(batch)]}]
    body = orjson.dumps(per_call[0])
    calls = jobs // batch

    async def producer(share: int) -> None:
        for _ in range(share):
            async with session.post(f"{base}/queues/bench/jobs", data=body) as r:
                assert r.status == 201, await r.text()
                await r.read()

    shares = [calls // producers + (1 if i < calls % producers else 0) for i in range(producers)]
    started = time.perf_counter()
    await asyncio.gather(*(producer(s) for s in shares))
    return calls * batch / (time.perf_counter() - started)


async def depth(session, base: str, queue: str) -> tuple[int, int]:
    async with session.get(f"{base}/queues") as r:
        stats = next(q for q in (await r.json())["queues"] if q["name"] == queue)
    return stats["queued"], stats["leased"]


async def drained(session, base: str, queue: str, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if await depth(session, base, queue) == (0, 0):
            return time.perf_counter()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{queue} not drained in {timeout}s: {await depth(session, base, queue)}")


async def pull_latency(url: str, samples: int) -> list[float]:
    """Enqueue one job on an idle queue; the time until a long-polling worker's handler runs."""
    from bridgeway.sdk import Client, Worker

    delays: list[float] = []
    got = asyncio.Event()
    async with Client(url, api_key=TOKEN) as bw:
        worker = Worker(bw, poll=5.0)

        @worker.job("latency")
        async def handle(job):
            delays.append(time.time() - job.payload["t"])
            got.set()

        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)
        for _ in range(samples):
            got.clear()
            await bw.queues.enqueue("latency", {"t": time.time()})
            await asyncio.wait_for(got.wait(), 5)
            await asyncio.sleep(0.05)
        worker.stop()
        await task
    return delays


async def push_latency(session, base: str, target: PushTarget, samples: int) -> list[float]:
    for _ in range(samples):
        target.arrived.clear()
        async with session.post(
            f"{base}/queues/pushed/jobs", data=orjson.dumps({"payload": {"t": time.time()}})
        ) as r:
            await r.read()
        await asyncio.wait_for(target.arrived.wait(), 5)
        await asyncio.sleep(0.05)
    return target.delays[-samples:]


def ms(values: list[float], q: float) -> str:
    return f"{statistics.quantiles(values, n=100)[int(q) - 1] * 1000:.1f}" if len(values) > 2 else "-"


async def run(args, backend: str, workdir: Path, procs: Procs) -> tuple[list[list[str]], float]:
    """The table's rows for one backend, and its end to end rate."""
    target = PushTarget()
    push_server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    push_port = push_server.sockets[0].getsockname()[1]
    port = free_port()
    start_bridgeway(
        procs,
        workdir,
        port,
        0,
        f"{sys.executable} -m bridgeway serve",
        config(port, push_port, backend, workdir),
    )
    url = f"http://127.0.0.1:{port}"
    base = url + "/api/v1"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    rows = []
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        log(f"enqueue: {args.jobs} jobs in batches of {args.batch} from {args.producers} producers")
        rate = await enqueue_rate(session, base, args.jobs, args.batch, args.producers)
        rows.append([f"enqueue (batches of {args.batch})", f"{rate:,.0f} jobs/s", ""])

        log("end to end: the queue above drained by the pull worker, then enqueue and drain together")
        script = workdir / "worker.py"
        script.write_text(WORKER)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        argv = [sys.executable, str(script), url, TOKEN, str(args.concurrency), str(args.batch)]
        procs.spawn(argv, cpu=CPU_LOAD if args.pin else None, log_path=workdir / "worker.log", env=env)
        started = time.perf_counter()
        done = await drained(session, base, "bench", 300)
        drain = args.jobs / (done - started)
        started = time.perf_counter()
        await enqueue_rate(session, base, args.jobs, args.batch, args.producers)
        done = await drained(session, base, "bench", 300)
        both = args.jobs / (done - started)
        rows.append(["pull worker draining a full queue", f"{drain:,.0f} jobs/s", ""])
        rows.append(["end to end (enqueue + pull worker at once)", f"{both:,.0f} jobs/s", ""])

        log(f"idle latency: {args.samples} single jobs, pull then push")
        pulled = await pull_latency(url, args.samples)
        rows.append(
            [
                "idle single job, pull (enqueue -> handler)",
                f"p50 {ms(pulled, 50)} ms",
                f"p99 {ms(pulled, 99)} ms",
            ]
        )
        pushed = await push_latency(session, base, target, args.samples)
        rows.append(
            [
                "idle single job, push (enqueue -> service)",
                f"p50 {ms(pushed, 50)} ms",
                f"p99 {ms(pushed, 99)} ms",
            ]
        )
    push_server.close()
    return rows, both


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend",
        default="sqlite",
        help="sqlite, redis, nats or a jobs.backend URL; several comma-separated",
    )
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1500,
        help="the pull worker's jobs in flight: three batches, so a claim overlaps the settles",
    )
    parser.add_argument("--samples", type=int, default=100, help="single jobs for each latency figure")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the worker to core 0")
    parser.add_argument("--celery-python", default="/tmp/venv-celery/bin/python")
    parser.add_argument("--celery-jobs", type=int, default=5_000)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    names = args.backend.split(",")
    columns: list[list[list[str]]] = []
    end_to_end: list[float] = []
    for name in names:
        prefix = f"bwbench-{os.urandom(4).hex()}"
        procs = Procs()
        with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
            try:
                rows, both = asyncio.run(run(args, backend_url(name, prefix), Path(tmp), procs))
                columns.append(rows)
                end_to_end.append(both)
            finally:
                procs.stop_all()
                if name in BROKERS:
                    asyncio.run(drop_prefix(name, prefix))
    if Path(args.celery_python).exists():
        log(f"celery: {args.celery_jobs} no-op jobs on the same Redis, one worker of 2 processes")
        celery = celery_rate(args.celery_python, args.celery_jobs, "prefork", 2)["e2e"]
        for rows, both in zip(columns, end_to_end, strict=True):
            rows.append(
                [f"end to end vs Celery 5 on Redis ({celery:,.0f} jobs/s)", f"{both / celery:.1f}x", ""]
            )
    else:
        log(f"celery left out: no interpreter at {args.celery_python}")
    if len(columns) == 1:
        header, rows = ["measure", "result", ""], columns[0]
    else:  # one column per backend: the result, and the p99 beside a latency's p50
        header = ["measure", *names]
        rows = [
            [row[0], *(" / ".join(x for x in col[i][1:] if x) for col in columns)]
            for i, row in enumerate(columns[0])
        ]
    print_table(
        f"Bridgeway job queues, backend {args.backend}, {args.jobs:,} no-op jobs, 1 gateway worker",
        header,
        rows,
        args.markdown,
    )


if __name__ == "__main__":
    main()
