"""Micro-benchmark of the hot-path Redis client: RespClient vs redis-py's asyncio client.

C coroutines each run the rate limiter's GCRA script (EVALSHA, one key per coroutine) in a loop
for D seconds, on uvloop, against the Redis on 127.0.0.1:6379. Per client: calls/s, p50 and p99
of one call, and calls per CPU-second of this process (the steadier figure when the machine is
shared: a client that is starved of CPU does fewer calls/s but about as many per CPU-second), and
Redis's own CPU per call (INFO cpu). Rounds interleave the clients; the table shows medians.

    python bench/redis_client.py [--concurrency 64] [--duration 5] [--rounds 3] [--markdown]

Rows:
  redis-py Script    `register_script(...)(keys=, args=)`, what RedisLimiter used before
  redis-py evalsha   `client.evalsha(sha, n, *keys_args)`: the same without the Script wrapper
  RespClient         bridgeway.state.resp: one pipelined connection
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from common import CPU_PROXY, log, print_table  # noqa: E402

from bridgeway.security.limits import _GCRA_LUA  # noqa: E402
from bridgeway.state.resp import RespClient  # noqa: E402

ROWS = ("redis-py Script", "redis-py evalsha", "RespClient")
ARGS = (1000.0, 1_000_000, 1)  # period_ms, limit, cost: nearly every call is admitted and SETs the key


async def _redis_cpu(url: str) -> float:
    """Redis's user+system CPU seconds so far."""
    client = RespClient(url, timeout=5.0)
    info = (await client.execute("INFO", "cpu")).decode()
    await client.close()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


async def _client(
    row: str, url: str
) -> tuple[Callable[[str], Awaitable[object]], Callable[[], Awaitable[None]]]:
    """(one GCRA call on a key, close) for the client of `row`."""
    if row == "RespClient":
        resp = RespClient(url, timeout=5.0)
        sha = resp.register_script(_GCRA_LUA)
        return (lambda key: resp.evalsha(sha, (key,), ARGS)), resp.close
    from redis import asyncio as aioredis

    client = aioredis.from_url(url)
    script = client.register_script(_GCRA_LUA)
    if row == "redis-py Script":
        return (lambda key: script(keys=[key], args=ARGS)), client.aclose
    await script(keys=["bwbench:warm"], args=ARGS)  # make sure the server has it
    return (lambda key: client.evalsha(script.sha, 1, key, *ARGS)), client.aclose


async def measure(row: str, url: str, concurrency: int, duration: float) -> dict[str, float]:
    call, close = await _client(row, url)
    keys = [f"bwbench:rl:{i}" for i in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    running = True

    async def worker(i: int) -> None:
        key, lat = keys[i], latencies[i]
        clock = time.perf_counter
        while running:
            t0 = clock()
            await call(key)
            lat.append(clock() - t0)

    try:
        # warm-up: connections open, script loaded, allocator and caches hot
        warm_until = time.perf_counter() + min(1.0, duration / 2)
        while time.perf_counter() < warm_until:
            await asyncio.gather(*(call(k) for k in keys))
        redis_cpu0, cpu0, t0 = await _redis_cpu(url), time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(duration)
        running = False
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        redis_cpu = await _redis_cpu(url) - redis_cpu0
    finally:
        await close()
    lat = sorted(x for per in latencies for x in per)
    n = len(lat)
    return {
        "ops": n / elapsed,
        "p50": lat[n // 2] * 1e3,
        "p99": lat[min(n - 1, int(n * 0.99))] * 1e3,
        "ops_cpu": n / cpu,
        "redis_us": redis_cpu / n * 1e6,
    }


async def _cleanup(url: str, concurrency: int) -> None:
    client = RespClient(url, timeout=5.0)
    await client.execute("DEL", "bwbench:warm", *(f"bwbench:rl:{i}" for i in range(concurrency)))
    await client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per client per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--cpu", type=int, default=CPU_PROXY, help="pin this process to a core (-1: don't)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    import uvloop

    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    results: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
    for rnd in range(args.rounds):
        for row in ROWS:
            r = uvloop.run(measure(row, args.url, args.concurrency, args.duration))
            results[row].append(r)
            log(
                f"round {rnd + 1}/{args.rounds} {row}: {r['ops']:,.0f}/s p50 {r['p50']:.3f} ms "
                f"p99 {r['p99']:.3f} ms, {r['ops_cpu']:,.0f}/CPU-s"
            )
    uvloop.run(_cleanup(args.url, args.concurrency))

    med = {row: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for row, rs in results.items()}
    base = med[ROWS[0]]
    table = [
        [
            row,
            f"{m['ops']:,.0f}",
            f"{m['ops'] / base['ops']:.2f}x",
            f"{m['p50']:.3f} ms",
            f"{m['p99']:.3f} ms",
            f"{m['ops_cpu']:,.0f}",
            f"{m['ops_cpu'] / base['ops_cpu']:.2f}x",
            f"{m['redis_us']:.1f} µs",
        ]
        for row, m in med.items()
    ]
    title = (
        f"EVALSHA of the GCRA script, {args.concurrency} coroutines, {args.duration:g}s x {args.rounds} "
        f"round(s), medians; uvloop, Python {sys.version.split()[0]}, "
        + (f"client on core {args.cpu}" if args.cpu >= 0 else "client not pinned")
    )
    headers = [
        "client",
        "calls/s",
        "vs Script",
        "p50",
        "p99",
        "calls/CPU-s",
        "vs Script",
        "Redis CPU/call (whole server)",
    ]
    print_table(title, headers, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
