"""Memory held by idle keep-alive client connections: Bridgeway vs nginx, same run.

    python bench/idle_connections.py [--connections 10000] [--batch 500] [--hold 5] [--only nginx,bridgeway]

Each client connection sends one `GET /health/live` (keep-alive), reads the answer and then
stays open and silent. The RSS of the server's whole process tree is read before and while the
connections are held. Needs ~connections + 100 file descriptors (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CPU_LOAD,
    CPU_PROXY,
    DEFAULT_BRIDGEWAY_CMD,
    Procs,
    free_port,
    log,
    nginx_proxy_server,
    print_table,
    sigterm_as_interrupt,
    start_bridgeway,
    start_nginx,
    tail,
    tree_pss,
    tree_rss,
    upstream_server,
    wait_http,
)

TARGETS = ("nginx", "bridgeway")
LABELS = {"nginx": "nginx proxy", "bridgeway": "bridgeway"}
MAX_BRIDGEWAY_RSS = 300 * 1024 * 1024  # 10,000 idle connections under 300 MB
REQUEST = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
MB = 1024 * 1024
HEADERS = [
    "target",
    "open connections",
    "RSS before",
    "RSS with idle conns",
    "PSS with idle conns",
    "per connection",
    "RSS vs nginx",
]


class IdleClient(asyncio.Protocol):
    """Sends one request, waits for the response head, then holds the socket open."""

    def __init__(self) -> None:
        self.answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.open = cast(asyncio.Transport, transport), True  # uvloop's is not a subclass
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        if not self.answered.done():
            self.buf += data
            if b"\r\n\r\n" in self.buf:  # the small body does not matter; the status line does
                self.answered.set_result(self.buf.split(b"\r\n", 1)[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.answered.done():
            self.answered.set_exception(exc or ConnectionError("closed before answering"))


async def open_idle(port: int, n: int, batch: int) -> tuple[list[IdleClient], int]:
    """Open n connections, `batch` at a time (stays under the listen backlog); returns (clients, failures)."""
    loop = asyncio.get_running_loop()
    clients: list[IdleClient] = []
    failures = 0

    async def one() -> IdleClient:
        transport, proto = await loop.create_connection(IdleClient, "127.0.0.1", port)
        try:
            status = await asyncio.wait_for(proto.answered, 10)
            if not status.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(status.decode(errors="replace"))
        except BaseException:
            transport.close()  # a failed connection must not linger and be counted as held
            raise
        return proto

    for start in range(0, n, batch):
        for res in await asyncio.gather(
            *(one() for _ in range(min(batch, n - start))), return_exceptions=True
        ):
            if isinstance(res, IdleClient):
                clients.append(res)
            else:
                failures += 1
                if failures <= 3:
                    log(f"  connection failed: {res!r}")
    return clients, failures


@dataclass(frozen=True)
class Result:
    baseline: int  # bytes RSS before any client connection
    held: int  # bytes RSS while the connections are held
    held_pss: int  # bytes PSS while held (shared pages counted once over the process tree)
    open_at_measure: int
    failures: int

    @property
    def per_conn_kb(self) -> float | None:
        return (self.held - self.baseline) / 1024 / self.open_at_measure if self.open_at_measure else None


async def measure(port: int, pid: int, n: int, batch: int, hold: float) -> Result:
    await asyncio.sleep(1)  # let start-up allocations settle before the baseline
    baseline = tree_rss(pid)
    clients, failures = await open_idle(port, n, batch)
    log(f"  {len(clients)} connections answered, {failures} failed; holding {hold:g}s")
    try:
        await asyncio.sleep(hold)
        alive = sum(c.open for c in clients)
        return Result(baseline, tree_rss(pid), tree_pss(pid), alive, failures)
    finally:
        for c in clients:
            if c.transport:
                c.transport.close()
        await asyncio.sleep(0.5)


def raise_fd_limit(needed: int) -> None:
    """Soft limit up to the hard one; children (nginx, the gateway) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        sys.exit(
            f"need {needed} file descriptors, hard limit is {hard}: run `ulimit -Hn {needed}` as root first"
        )


def rows(results: dict[str, Result], wanted: int) -> list[list[str]]:
    ref = results.get("nginx")
    out = []
    for name, r in results.items():
        vs = f"{r.held / ref.held:.1f}x" if ref else "-"
        if name == "bridgeway":
            # the target is holding all of them: fewer open is a miss whatever the RSS
            met = r.held < MAX_BRIDGEWAY_RSS and r.open_at_measure >= wanted
            vs += f" (target {wanted:,} open in < {MAX_BRIDGEWAY_RSS // MB} MB: {'ok' if met else 'MISS'})"
        out.append(
            [
                LABELS[name],
                f"{r.open_at_measure:,}" + (f" ({r.failures} failed)" if r.failures else ""),
                f"{r.baseline / MB:.1f} MB",
                f"{r.held / MB:.1f} MB",
                f"{r.held_pss / MB:.1f} MB",
                f"{r.per_conn_kb:.1f} KB" if r.per_conn_kb is not None else "-",
                vs,
            ]
        )
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500, help="connections opened concurrently")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold them idle before reading RSS")
    p.add_argument("--only", default=",".join(TARGETS), help=f"comma list of {','.join(TARGETS)}")
    p.add_argument(
        "--bridgeway-cmd", default=DEFAULT_BRIDGEWAY_CMD, help="'--config <file> --workers 1' is appended"
    )
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    if bad := set(args.only) - set(TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(bad))}")
    return args


def main() -> int:
    args = parse_args()
    raise_fd_limit(args.connections + 100)
    os.sched_setaffinity(0, {CPU_LOAD})  # the client is load side; servers are pinned by taskset
    results: dict[str, Result] = {}
    with (
        sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="bridgeway-idle-") as tmp,
        Procs() as procs,
    ):
        work = Path(tmp)
        up_port = free_port()  # same upstream as bench/proxy.py, so both servers get the same config
        wait_http(up_port, "/", start_nginx(procs, work, "upstream", upstream_server(up_port), cpu=CPU_LOAD))
        for name in (t for t in TARGETS if t in args.only):
            port = free_port()
            if name == "nginx":
                server = nginx_proxy_server(port, up_port)
                proc = start_nginx(
                    procs, work, "proxy", server, cpu=CPU_PROXY, worker_connections=args.connections * 2
                )
                wait_http(port, "/health/live", proc)
            else:
                try:
                    proc = start_bridgeway(procs, work, port, up_port, args.bridgeway_cmd)
                except (RuntimeError, TimeoutError) as e:
                    log(f"bridgeway did not start: {e}\n{tail(work / 'bridgeway.log')}")
                    continue
            log(f"{name}: opening {args.connections:,} idle connections in batches of {args.batch}")
            results[name] = uvloop.run(measure(port, proc.pid, args.connections, args.batch, args.hold))
            r = results[name]
            log(f"  RSS {r.baseline / MB:.1f} MB -> {r.held / MB:.1f} MB with {r.open_at_measure:,} open")
            if name == "bridgeway" and (r.failures or r.open_at_measure < args.connections):
                log(f"bridgeway log tail:\n{tail(work / 'bridgeway.log')}")
    title = (
        f"{args.connections:,} idle keep-alive connections (GET /health/live once, then silent for {args.hold:g}s); "
        "RSS = sum of VmRSS over the server's process tree, 1 worker"
    )
    print_table(title, HEADERS, rows(results, args.connections), args.markdown)
    return 0 if "bridgeway" in results or "bridgeway" not in args.only else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; all started processes were stopped")
        sys.exit(130)
