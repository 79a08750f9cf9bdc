"""CPU per request of the gateway's own Python on /bridge, without a server: the ASGI app is
driven directly (a scope, a receive that returns the empty body, a send that drops the answer)
against a real nginx upstream, with C requests in flight on uvloop.

    PYTHONPATH=src python bench/hotpath.py [--requests 20000] [--concurrency 8] [--rounds 5]
    PYTHONPATH=src python bench/hotpath.py --only key+limit --profile   # one row, long, for py-spy
    PYTHONPATH=src python bench/hotpath.py --instructions --requests 2000  # callgrind: instructions

What it measures is what the gateway's code costs per request (dispatch, head pass, auth, limits,
balancer, breaker, the pooled upstream call and its two syscalls, metrics), not the HTTP server's share,
so it moves little when other tenants load the machine: process CPU time, not wall time, over a
fixed number of requests. Rows as in `security.py`: plain, an API key + per-key limit, an RS256
JWT + per-key limit (in-process limiter); and `llm`, a POST /v1/chat/completions with an API key
passed through to a fake OpenAI provider (nginx with `llm.py`'s fixed answer), the LLM router's
own cost (issue 4's latency target is about 8 x this plus the server's share). Rows interleave; the table shows each row's minimum and
median over the rounds (the minimum is the least disturbed round).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from common import CPU_LOAD, Procs, free_port, log, print_table, start_nginx, upstream_server, wait_http  # noqa: E402
from llm import REQUEST, fake_provider_server  # noqa: E402
from llm import bridgeway_config as llm_config  # noqa: E402
from security import _config, _jwt  # noqa: E402

ROWS = ("plain", "key+limit", "jwt+limit", "llm")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000, help="requests per row per round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--profile", action="store_true", help="one round of 10x the requests, for py-spy")
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request under callgrind instead (one process per row, ~1 min each)",
    )
    p.add_argument("--markdown", action="store_true")
    return p.parse_args()


async def _gateway(work: Path, row: str, up_port: int, public_pem: str):
    from bridgeway.config import load_config
    from bridgeway.server import Gateway

    path = work / f"{row.replace('+', '-')}.yaml"
    if row == "llm":  # up_port is the fake provider's
        path.write_text(llm_config(free_port(), up_port))
    else:
        path.write_text(
            _config(free_port(), up_port, row, public_pem).replace("redis://127.0.0.1:6379/0", "memory://")
        )
    gw = Gateway(load_config(str(path)), str(path))
    await gw.startup()
    return gw


async def _key(gw) -> str:
    token, _ = await gw.keys.create(name="bench", role="caller")
    return token


def _driver(gw, credential: str | None, row: str):
    """One request's scope, and a coroutine function that sends `n` of them."""
    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
    if credential:
        headers.append((b"authorization", b"Bearer " + credential.encode()))
    method, path, body = "GET", "/bridge/bench/", b""
    if row == "llm":
        method, path = "POST", "/v1/chat/completions"
        body = orjson.dumps({**REQUEST, "model": "bench-openai"})
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    request = {"type": "http.request", "body": body, "more_body": False}
    statuses: dict[int, int] = {}

    async def receive():
        return request

    async def send(message):
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    async def worker(n: int) -> None:
        for _ in range(n):
            await gw(scope, receive, send)

    return worker, statuses


async def _measure(gw, credential, row: str, requests: int, concurrency: int) -> tuple[float, dict]:
    worker, statuses = _driver(gw, credential, row)
    per = requests // concurrency
    await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm the pool and caches
    statuses.clear()
    _callgrind("on")
    cpu = time.process_time()
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    _callgrind("off")
    return cpu / (per * concurrency) * 1e6, dict(statuses)


def _callgrind(state: str) -> None:
    """Under `valgrind --tool=callgrind --instr-atstart=no`, count only the measured requests."""
    if os.environ.get("HOTPATH_CALLGRIND"):
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True)


async def _run(args, work: Path, up_port: int, provider_port: int) -> dict[str, list[float]]:
    token, public_pem = _jwt()
    rows = [r for r in args.only.split(",") if r]
    gateways = {
        row: await _gateway(work, row, provider_port if row == "llm" else up_port, public_pem) for row in rows
    }
    credentials = {}
    for row, gw in gateways.items():
        credentials[row] = None if row == "plain" else token if row == "jwt+limit" else await _key(gw)
    results: dict[str, list[float]] = {row: [] for row in rows}
    rounds, requests = (1, args.requests * 10) if args.profile else (args.rounds, args.requests)
    if args.profile:
        log(f"profiling: pid {os.getpid()}")
    for rnd in range(rounds):
        for row in rows:
            us, statuses = await _measure(gateways[row], credentials[row], row, requests, args.concurrency)
            if set(statuses) != {200}:
                raise SystemExit(f"{row}: unexpected statuses {statuses}")
            results[row].append(us)
            log(f"round {rnd + 1}/{rounds} {row}: {us:.1f} µs CPU/request")
    for gw in gateways.values():
        await gw.shutdown()
    return results


def _instructions(args) -> int:
    """Each row in its own `valgrind --tool=callgrind` run, counting only the measured requests:
    instructions do not drift with the machine's load the way CPU time does."""
    table = []
    plain = None
    for row in [r for r in args.only.split(",") if r]:
        with tempfile.TemporaryDirectory(prefix="bridgeway-callgrind-") as tmp:
            out = Path(tmp) / "callgrind.out"
            log(f"{row}: {args.requests} requests under callgrind")
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
            cmd += [
                sys.executable,
                __file__,
                "--only",
                row,
                "--rounds",
                "1",
                "--requests",
                str(args.requests),
            ]
            cmd += ["--concurrency", str(args.concurrency)]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HOTPATH_CALLGRIND": "1"})
            totals = next(
                int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("totals:")
            )
        per = totals / (args.requests // args.concurrency * args.concurrency)
        plain = per if row == "plain" else plain
        table.append([row, f"{per / 1000:,.1f} k", f"{per / plain:.2f}x" if plain else "-"])
    title = f"instructions per request, in-process, callgrind, {args.requests} requests"
    print_table(title, ["row", "instructions/request", "vs plain"], table, args.markdown)
    return 0


def main() -> int:
    args = parse_args()
    if args.instructions:
        return _instructions(args)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="bridgeway-hotpath-") as tmp, Procs() as procs:
        work = Path(tmp)
        up_port = free_port()
        upstream = start_nginx(procs, work, "upstream", upstream_server(up_port), cpu=CPU_LOAD)
        wait_http(up_port, "/", upstream)
        provider_port = free_port()
        provider = start_nginx(procs, work, "provider", fake_provider_server(provider_port), cpu=CPU_LOAD)
        wait_http(provider_port, "/v1/chat/completions", provider)
        os.sched_setaffinity(0, {1})  # the gateway's core, as in proxy.py
        results = uvloop.run(_run(args, work, up_port, provider_port))
    plain = min(results["plain"]) if "plain" in results else None
    table = []
    for row, values in results.items():
        best = min(values)
        table.append(
            [
                row,
                f"{best:.1f} µs",
                f"{statistics.median(values):.1f} µs",
                f"{best - plain:+.1f} µs" if plain is not None else "-",
                f"{plain / best:.2f}x" if plain is not None else "-",
            ]
        )
    title = (
        f"gateway CPU per request, in-process (no server), {args.requests} requests x "
        f"{len(next(iter(results.values())))} round(s), {args.concurrency} in flight"
    )
    print_table(title, ["row", "min", "median", "vs plain", "plain/row"], table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
