"""Micro-benchmark of the hot-path upstream client: UpstreamPool vs aiohttp's ClientSession.

Both clients hit the same nginx upstream (one worker, returns a small JSON body) with C
concurrent tasks on uvloop; the table shows requests/s and the ratio. Run:

    PYTHONPATH=src python bench/upstream_client.py [--requests 20000] [--concurrency 64]
    PYTHONPATH=src python bench/upstream_client.py --profile   # only UpstreamPool, for py-spy

nginx must be on PATH or at /usr/sbin/nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator

NGINX_CONF = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx() -> Iterator[int]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(tmp=tmp, port=port))
        proc = subprocess.Popen([binary, "-c", conf, "-p", tmp], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()}") from None
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(5)


async def drive(one: Callable[[], Awaitable[None]], total: int, concurrency: int) -> float:
    """Run `total` calls of `one` over `concurrency` tasks; returns requests/s."""
    per_task = total // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await one()

    for _ in range(200):  # warm up connections
        await one()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per_task * concurrency / (time.perf_counter() - t0)


async def bench_bridgeway(port: int, total: int, concurrency: int) -> float:
    from bridgeway.dataplane.upstream import UpstreamPool

    pool = UpstreamPool("127.0.0.1", port, max_connections=concurrency)
    headers = [(b"user-agent", b"bench"), (b"accept", b"*/*")]

    async def one() -> None:
        resp = await pool.request(b"GET", b"/", headers)
        try:
            body = await resp.read()
        finally:
            resp.release()
        assert resp.status == 200 and body

    try:
        return await drive(one, total, concurrency)
    finally:
        await pool.close()


async def bench_aiohttp(port: int, total: int, concurrency: int) -> float:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.get(url, headers={"user-agent": "bench", "accept": "*/*"}) as resp:
                body = await resp.read()
            assert resp.status == 200 and body

        return await drive(one, total, concurrency)


def wrk_baseline(port: int, concurrency: int, seconds: int = 5) -> float | None:
    """nginx's own capacity here (wrk, 1 thread): the ceiling for any client."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds per client")
    ap.add_argument("--profile", action="store_true", help="run only UpstreamPool, longer, for py-spy")
    args = ap.parse_args()

    import uvloop

    with nginx() as port:
        if args.profile:
            rps = uvloop.run(bench_bridgeway(port, args.requests * 10, args.concurrency))
            print(f"bridgeway UpstreamPool: {rps:,.0f} req/s")
            return
        results: dict[str, float] = {}
        for name, fn in (
            ("bridgeway UpstreamPool", bench_bridgeway),
            ("aiohttp ClientSession", bench_aiohttp),
        ):
            results[name] = max(
                uvloop.run(fn(port, args.requests, args.concurrency)) for _ in range(args.rounds)
            )
        ceiling = wrk_baseline(port, args.concurrency)

    base = results["aiohttp ClientSession"]
    print(f"\n{args.requests} GET requests, {args.concurrency} concurrent tasks, uvloop, nginx upstream")
    print(f"Python {sys.version.split()[0]}, best of {args.rounds}\n")
    print(f"| {'client':<24} | {'req/s':>10} | {'vs aiohttp':>10} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 12}|")
    for name, rps in results.items():
        print(f"| {name:<24} | {rps:>10,.0f} | {rps / base:>9.2f}x |")
    if ceiling:
        print(f"| {'wrk (C, 1 thread)':<24} | {ceiling:>10,.0f} | {ceiling / base:>9.2f}x |")


if __name__ == "__main__":
    main()
