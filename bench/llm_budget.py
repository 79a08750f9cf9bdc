"""Micro-benchmark of the LLM budget path alone: what a budget adds to one request's CPU.

C coroutines each loop over what the endpoint does for a caller with a budget (llm/spend.py):
`Spending.reserve` (a hold against a budget never reached) then `Spending.settle` (queued,
written by the writer task), for D seconds, on uvloop, in this process. Per store: requests/s
and CPU microseconds per request of this process (user+system, including the SQLite thread),
plus Redis's own CPU per request for the Redis row. No gateway, no HTTP: the difference between
rows is the store's cost. Rounds interleave the stores; the table shows medians.

    python bench/llm_budget.py [--concurrency 64] [--duration 3] [--rounds 3] [--markdown]
    python bench/llm_budget.py --only sqlite --profile   # cProfile of one sqlite round

Rows: memory (`memory://`), sqlite (a file in a temp dir, WAL), redis (127.0.0.1:6379/15,
keys under a random prefix, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from common import log, print_table  # noqa: E402

from bridgeway.llm.budgets import Limit  # noqa: E402
from bridgeway.llm.ledger import MemoryLedgerStore, RedisLedgerStore, Settlement, SqliteLedgerStore  # noqa: E402
from bridgeway.llm.spend import Spending  # noqa: E402
from bridgeway.state.resp import RespClient  # noqa: E402

ROWS = ("memory", "sqlite", "redis")
REDIS_URL = "redis://127.0.0.1:6379/15"


def _store(row: str, workdir: str, prefix: str):
    if row == "memory":
        return MemoryLedgerStore()
    if row == "sqlite":
        return SqliteLedgerStore(os.path.join(workdir, "bench.db"))
    return RedisLedgerStore(REDIS_URL, prefix=prefix)


async def measure(row: str, workdir: str, prefix: str, concurrency: int, duration: float) -> dict:
    spending = Spending(_store(row, workdir, prefix))
    spending.start()
    limits = [Limit("key:bench", "1d", 10**15, None)]  # never reached: every request holds and settles
    done = 0
    running = True

    async def worker() -> None:
        nonlocal done
        while running:
            hold = await spending.reserve(limits, 2_000, 60, 600.0)
            spending.settle(
                Settlement(hold, True, ("key:bench",), "key:bench", "-", "m", "openai/m", 40, 20, 1_500)
            )
            done += 1
            await asyncio.sleep(0)  # the call to the provider, in a real request (memory never yields)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)  # warm-up
    redis_cpu0 = await _redis_cpu() if row == "redis" else 0.0
    n0, cpu0, t0 = done, time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    n1, cpu1, t1 = done, time.process_time(), time.perf_counter()
    redis_cpu1 = await _redis_cpu() if row == "redis" else 0.0
    running = False
    await asyncio.gather(*tasks)
    await spending.flush()
    await spending.close()
    n = n1 - n0
    return {
        "rps": n / (t1 - t0),
        "cpu_us": (cpu1 - cpu0) / n * 1e6,
        "redis_us": (redis_cpu1 - redis_cpu0) / n * 1e6 if row == "redis" else float("nan"),
    }


async def _redis_cpu() -> float:
    client = RespClient(REDIS_URL, timeout=5.0)
    info = (await client.execute("INFO", "cpu")).decode()
    await client.close()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


async def _drop(prefix: str) -> None:
    client = RespClient(REDIS_URL, timeout=5.0)
    try:
        keys = await client.execute("KEYS", prefix + "*")
        if keys:
            await client.execute("DEL", *keys)
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(ROWS))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the rounds, print the top functions")
    args = ap.parse_args()
    rows = [r for r in args.only.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    import uvloop

    prefix = f"bwbench-{uuid.uuid4().hex[:8]}:"
    results: dict[str, list[dict]] = {r: [] for r in rows}
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="bw-budget-") as workdir:
        try:
            for rnd in range(args.rounds):
                for row in rows:
                    log(f"round {rnd + 1}/{args.rounds}: {row}")
                    if profiler:
                        profiler.enable()
                    m = uvloop.run(measure(row, workdir, prefix, args.concurrency, args.duration))
                    if profiler:
                        profiler.disable()
                    results[row].append(m)
                    log(f"  {m['rps']:,.0f} req/s, {m['cpu_us']:.1f} µs CPU/request")
        finally:
            if "redis" in rows:
                uvloop.run(_drop(prefix))
    if profiler:
        import pstats

        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    header = ["store", "requests/s", "CPU/request", "Redis CPU/request", "rounds"]
    table = []
    for row in rows:
        ms = results[row]
        redis_us = statistics.median(m["redis_us"] for m in ms)
        table.append([
            row,
            f"{statistics.median(m['rps'] for m in ms):,.0f}",
            f"{statistics.median(m['cpu_us'] for m in ms):.1f} µs",
            "-" if row != "redis" else f"{redis_us:.1f} µs",
            str(len(ms)),
        ])  # fmt: skip
    title = f"LLM budget path in-process: c={args.concurrency}, {args.duration:g} s x {args.rounds} rounds (medians)"
    print_table(title, header, table, args.markdown)


if __name__ == "__main__":
    main()
