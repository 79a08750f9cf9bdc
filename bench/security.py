"""The cost of security on the hot path: Bridgeway with JWT verification, a per-key rate limit and
metrics, against Bridgeway's own plain proxy, same upstream, same run.

    python bench/security.py [--duration 10] [--connections 64] [--rounds 1] [--markdown]

Rows (each a `bridgeway serve` with one worker on the proxy core; the upstream is nginx):
  plain         /bridge with no authentication and no limits (metrics are always on)
  key+limit     an API key and a per-key GCRA limit, in-process
  jwt+limit     an RS256 JWT (static issuer key) and a per-key GCRA limit, in-process
  jwt+limit+redis   the same, with the limit kept in Redis on 127.0.0.1:6379 (state: redis)

Throughput is measured at --connections; latency closed-loop with one connection, so p50 is one
request's own cost and the Redis row's extra p50 is the Redis round trip. CPU/request is the
gateway's CPU time over the throughput run divided by its requests; other tenants' load moves it
much less than requests/s, so "req/CPU-s vs plain" (plain's CPU/request over the row's) is the
steadier form of "vs plain". Targets (issue 3):
in-process >= 0.8 x plain throughput; Redis >= 0.6 x, and <= 0.3 ms more than in-process at p50.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CPU_LOAD,
    DEFAULT_BRIDGEWAY_CMD,
    Procs,
    WrkResult,
    free_port,
    log,
    print_table,
    run_wrk,
    sigterm_as_interrupt,
    start_bridgeway,
    start_nginx,
    tail,
    tree_cpu_seconds,
    upstream_server,
    wait_http,
)

WARMUP_S = 2.0
MIN_INPROC = 0.8
MIN_REDIS = 0.6
MAX_REDIS_P50_MS = 0.3
ROWS = ("plain", "key+limit", "jwt+limit", "jwt+limit+redis")


def _config(port: int, upstream_port: int, row: str, public_pem: str) -> str:
    config = f"""\
listen: 127.0.0.1:{port}
logging: {{access: false}}
admin: {{token: bench-admin-token-0123456789}}
"""
    if row == "plain":
        return (
            config
            + f"services: {{bench: {{instances: ['http://127.0.0.1:{upstream_port}'], timeout: 10s}}}}\n"
        )
    pem = "\n".join("          " + line for line in public_pem.strip().splitlines())
    config += f"""\
state: {"redis://127.0.0.1:6379/0" if row.endswith("redis") else "memory://"}
auth:
  required: true
  jwt:
    issuers:
      - issuer: https://idp.bench.local
        audience: bridgeway
        public_key: |
{pem}
        roles: {{caller: caller}}
roles:
  caller: {{allow: [{{service: bench}}]}}
services:
  bench:
    instances: ['http://127.0.0.1:{upstream_port}']
    timeout: 10s
    limits: [{{rate: 10000000/s, per: key}}]
"""
    return config


def _new_key(port: int) -> str:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/keys",
        data=json.dumps({"name": "bench", "role": "caller"}).encode(),
        headers={"Authorization": "Bearer bench-admin-token-0123456789", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())["key"]


def _jwt() -> tuple[str, str]:
    """An RS256 token valid for an hour, and the issuer's public key (PEM)."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    now = int(time.time())
    claims = {"iss": "https://idp.bench.local", "aud": "bridgeway", "sub": "agent-1", "role": "caller"}
    token = jwt.encode({**claims, "iat": now, "exp": now + 3600}, private, algorithm="RS256")
    return token, public_pem


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per row per round")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the table shows medians")
    p.add_argument("--bridgeway-cmd", default=DEFAULT_BRIDGEWAY_CMD)
    p.add_argument("--markdown", action="store_true")
    return p.parse_args()


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


def main() -> int:
    args = parse_args()
    token, public_pem = _jwt()
    rows = [r for r in ROWS if r != "jwt+limit+redis" or _redis_up()]
    if "jwt+limit+redis" not in rows:
        log("Redis is not reachable on 127.0.0.1:6379: the Redis row is left out")
    with (
        sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="bridgeway-bench-") as tmp,
        Procs() as procs,
    ):
        work = Path(tmp)
        up_port = free_port()
        upstream = start_nginx(procs, work, "upstream", upstream_server(up_port), cpu=CPU_LOAD)
        wait_http(up_port, "/", upstream)
        targets: dict[str, tuple[str, list[str]]] = {}
        pids: dict[str, int] = {}
        for row in rows:
            port = free_port()
            name = "bw-" + row.replace("+", "-")
            pids[row] = start_bridgeway(
                procs, work, port, up_port, args.bridgeway_cmd, _config(port, up_port, row, public_pem), name
            ).pid
            credential = {"plain": None, "key+limit": _new_key(port)}.get(row, token)
            headers = [f"Authorization: Bearer {credential}"] if credential else []
            targets[row] = (f"http://127.0.0.1:{port}/bridge/bench/", headers)

        thr: dict[str, list[WrkResult]] = {r: [] for r in targets}
        lat: dict[str, list[WrkResult]] = {r: [] for r in targets}
        cpu: dict[str, list[float]] = {r: [] for r in targets}  # the server's CPU µs per request
        for rnd in range(args.rounds):
            for row, (url, headers) in targets.items():
                log(f"round {rnd + 1}/{args.rounds}: {row}")
                run_wrk(url, connections=args.connections, duration=WARMUP_S, headers=headers)
                cpu0 = tree_cpu_seconds(pids[row])
                thr[row].append(
                    run_wrk(url, connections=args.connections, duration=args.duration, headers=headers)
                )
                served = thr[row][-1].rps * args.duration
                cpu[row].append((tree_cpu_seconds(pids[row]) - cpu0) / max(served, 1) * 1e6)
                lat[row].append(run_wrk(url, connections=1, duration=args.duration / 2, headers=headers))
                t, q = thr[row][-1], lat[row][-1]
                log(
                    f"  {t.rps:,.0f} req/s, {cpu[row][-1]:.0f} µs CPU/request (errors {t.errors}); c=1 p50 {q.p50_ms:.3f} ms p99 {q.p99_ms:.3f} ms"
                )
                if t.errors:
                    log(tail(work / f"bw-{row.replace('+', '-')}.log"))

    med = statistics.median
    rps = {r: med(x.rps for x in v) for r, v in thr.items()}
    p50 = {r: med(x.p50_ms for x in v) for r, v in lat.items()}
    p99 = {r: med(x.p99_ms for x in v) for r, v in lat.items()}
    us = {r: med(v) for r, v in cpu.items()}
    table = []
    for row in targets:
        ratio = rps[row] / rps["plain"]
        target = "-"
        if row in ("key+limit", "jwt+limit"):
            target = f">= {MIN_INPROC}: {'ok' if ratio >= MIN_INPROC else 'MISS'}"
        elif row == "jwt+limit+redis":
            extra = p50[row] - p50["jwt+limit"]
            target = (
                f">= {MIN_REDIS}: {'ok' if ratio >= MIN_REDIS else 'MISS'}; +{extra:.3f} ms p50 "
                f"(<= {MAX_REDIS_P50_MS}: {'ok' if extra <= MAX_REDIS_P50_MS else 'MISS'})"
            )
        errors = sum(x.errors for x in thr[row] + lat[row])
        table.append(
            [
                row,
                f"{rps[row]:,.0f}",
                f"{ratio:.2f}x",
                f"{us[row]:.0f} µs",
                f"{us['plain'] / us[row]:.2f}x",
                f"{p50[row]:.3f} ms",
                f"{p99[row]:.3f} ms",
                str(errors),
                target,
            ]
        )
    title = (
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s (throughput) and -c1 (latency), "
        f"{args.rounds} round(s), medians; one gateway worker on core 1"
    )
    headers = [
        "row",
        "requests/s",
        "vs plain",
        "CPU/request",
        "req/CPU-s vs plain",
        "p50 (c=1)",
        "p99 (c=1)",
        "errors",
        "target",
    ]
    print_table(title, headers, table, args.markdown)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; all started processes were stopped")
        sys.exit(130)
