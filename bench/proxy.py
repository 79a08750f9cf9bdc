"""Data-plane throughput and latency: Bridgeway vs an nginx reverse proxy, same upstream, same run.

    python bench/proxy.py [--duration 10] [--connections 64] [--rounds 1] [--only direct,nginx]
                          [--bridgeway-cmd "python -m bridgeway serve"] [--compare-cmd CMD] [--markdown]

Rows: `direct` (wrk -> upstream nginx), `nginx` (wrk -> nginx proxy -> upstream),
`bridgeway` (wrk -> gateway /bridge/bench/ -> upstream), and with `--compare-cmd` a second gateway
started by CMD the same way (e.g. another server or build) in the same run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CPU_LOAD,
    CPU_PROXY,
    DEFAULT_BRIDGEWAY_CMD,
    Procs,
    WrkResult,
    core_jiffies,
    free_port,
    log,
    nginx_proxy_server,
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

TARGETS = ("direct", "nginx", "bridgeway", "compare")
LABELS = {
    "direct": "direct (no proxy)",
    "nginx": "nginx proxy",
    "bridgeway": "bridgeway",
    "compare": "bridgeway (--compare-cmd)",
}
MIN_THROUGHPUT_RATIO = 0.45  # bridgeway req/s >= 0.45 x nginx proxy
MAX_P99_RATIO = 3.0  # bridgeway p99 <= 3 x nginx proxy
WARMUP_S = 2.0
SATURATED_CPU = 0.85  # a proxy below this share of its core was not the bottleneck
MAX_OTHER_WORK = 0.15  # a round where other tenants took more of the proxy's core is set aside


@dataclass(frozen=True)
class Measurement:
    wrk: WrkResult
    cpu: float  # cores used by the server wrk talks to (its whole process tree) while measured
    core_idle: float  # share of the proxy's core left idle: > 0 means the proxy was not the bottleneck

    @property
    def per_cpu_s(self) -> float:
        """Requests per CPU-second of the server: efficiency, even when the load side is the cap."""
        return self.wrk.rps / self.cpu if self.cpu else 0.0

    @property
    def core_other(self) -> float:
        """Share of the proxy's core taken by anything else: other processes, steal, softirq."""
        return max(0.0, 1.0 - self.core_idle - self.cpu)


def measure(url: str, pid: int, connections: int, duration: float) -> Measurement:
    run_wrk(url, connections=connections, duration=WARMUP_S)
    cpu0, (idle0, total0) = tree_cpu_seconds(pid), core_jiffies(CPU_PROXY)
    r = run_wrk(url, connections=connections, duration=duration)
    idle1, total1 = core_jiffies(CPU_PROXY)
    return Measurement(
        r, (tree_cpu_seconds(pid) - cpu0) / duration, (idle1 - idle0) / max(total1 - total0, 1)
    )


def summarize(ms: list[Measurement], on_proxy_core: bool) -> tuple[Measurement, int]:
    """Median of each figure over the clean rounds (all rounds if none is clean), and how many
    rounds that was. Errors are summed over every round: any error matters."""
    clean = [m for m in ms if m.core_other < MAX_OTHER_WORK] if on_proxy_core else []
    used = clean or ms
    med = statistics.median
    summary = Measurement(
        WrkResult(
            rps=med([m.wrk.rps for m in used]),
            p50_ms=med([m.wrk.p50_ms for m in used]),
            p99_ms=med([m.wrk.p99_ms for m in used]),
            requests=sum(m.wrk.requests for m in ms),
            non_2xx=sum(m.wrk.non_2xx for m in ms),
            socket_errors=sum(m.wrk.socket_errors for m in ms),
        ),
        cpu=med([m.cpu for m in used]),
        core_idle=med([m.core_idle for m in used]),
    )
    return summary, len(used)


def table_rows(results: dict[str, Measurement], used: dict[str, int], rounds: int) -> list[list[str]]:
    ref = results.get("nginx")
    rows = []
    for name, m in results.items():
        r = m.wrk
        thr = p99 = eff = "-"
        if ref:
            t, q = r.rps / ref.wrk.rps, r.p99_ms / ref.wrk.p99_ms
            thr, p99 = f"{t:.2f}x", f"{q:.2f}x"
            eff = f"{m.per_cpu_s / ref.per_cpu_s:.2f}x" if ref.per_cpu_s else "-"
            if name == "bridgeway":  # show the targets next to the figures
                thr += f" (target >= {MIN_THROUGHPUT_RATIO}: {'ok' if t >= MIN_THROUGHPUT_RATIO else 'MISS'})"
                p99 += f" (target <= {MAX_P99_RATIO:g}: {'ok' if q <= MAX_P99_RATIO else 'MISS'})"
        rows.append(
            [
                LABELS[name],
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f} ms",
                f"{r.p99_ms:.2f} ms",
                str(r.errors),
                f"{m.cpu * 100:.0f}%",
                f"{m.per_cpu_s:,.0f}",
                thr,
                p99,
                eff,
                f"{used[name]}/{rounds}",
            ]
        )
    return rows


HEADERS = [
    "target",
    "requests/s",
    "p50",
    "p99",
    "errors",
    "server CPU",
    "req/CPU-s",
    "req/s vs nginx",
    "p99 vs nginx",
    "req/CPU-s vs nginx",
    "rounds used",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per target per round")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the table shows medians")
    p.add_argument("--only", default=",".join(TARGETS), help=f"comma list of {','.join(TARGETS)}")
    p.add_argument(
        "--bridgeway-cmd",
        default=DEFAULT_BRIDGEWAY_CMD,
        help="command to start the gateway; '--config <file> --workers 1' is appended",
    )
    p.add_argument(
        "--compare-cmd",
        help="a second gateway command, measured the same way in the same run (the `compare` row)",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args()
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    if not args.compare_cmd and "compare" in args.only:
        args.only.remove("compare")
    if bad := set(args.only) - set(TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(bad))}")
    return args


def main() -> int:
    args = parse_args()
    with (
        sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="bridgeway-bench-") as tmp,
        Procs() as procs,
    ):
        work = Path(tmp)
        up_port = free_port()
        upstream = start_nginx(procs, work, "upstream", upstream_server(up_port), cpu=CPU_LOAD)
        wait_http(up_port, "/", upstream)
        targets: dict[str, tuple[str, int]] = {}  # name -> (url, pid of the server wrk talks to)
        for name in (t for t in TARGETS if t in args.only):  # fixed order: direct, nginx, bridgeway, compare
            port = free_port()
            if name == "direct":
                targets[name] = (f"http://127.0.0.1:{up_port}/", upstream.pid)
            elif name == "nginx":
                proc = start_nginx(procs, work, "proxy", nginx_proxy_server(port, up_port), cpu=CPU_PROXY)
                wait_http(port, "/", proc)
                targets[name] = (f"http://127.0.0.1:{port}/", proc.pid)
            else:
                cmd = args.bridgeway_cmd if name == "bridgeway" else args.compare_cmd
                try:
                    proc = start_bridgeway(procs, work, port, up_port, cmd, name=name)
                except (RuntimeError, TimeoutError) as e:
                    log(f"{name} did not start: {e}\n{tail(work / f'{name}.log')}")
                    continue
                targets[name] = (f"http://127.0.0.1:{port}/bridge/bench/", proc.pid)

        runs: dict[str, list[Measurement]] = {name: [] for name in targets}
        for rnd in range(args.rounds):  # interleave targets so drift on a noisy host hits all alike
            for name, (url, pid) in targets.items():
                log(
                    f"round {rnd + 1}/{args.rounds}: {name} {url} (warm-up {WARMUP_S:g}s, measure {args.duration:g}s)"
                )
                m = measure(url, pid, args.connections, args.duration)
                log(
                    f"  {m.wrk.rps:,.0f} req/s, p50 {m.wrk.p50_ms:.2f} ms, p99 {m.wrk.p99_ms:.2f} ms, "
                    f"errors {m.wrk.errors}, server CPU {m.cpu:.0%}, core {CPU_PROXY}: "
                    f"idle {m.core_idle:.0%}, other work {m.core_other:.0%}"
                )
                runs[name].append(m)

        summaries = {name: summarize(ms, on_proxy_core=name != "direct") for name, ms in runs.items()}
        results = {name: s for name, (s, _) in summaries.items()}
        used = {name: n for name, (_, n) in summaries.items()}
        if "bridgeway" in results and results["bridgeway"].wrk.errors:
            log(f"bridgeway had errors; last log lines:\n{tail(work / 'bridgeway.log')}")
    title = (
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s --latency, {args.rounds} round(s) "
        f"(median of rounds where other work took < {MAX_OTHER_WORK:.0%} of core {CPU_PROXY}); "
        f"proxy on core {CPU_PROXY}, wrk + upstream nginx on core {CPU_LOAD}"
    )
    print_table(title, HEADERS, table_rows(results, used, args.rounds), args.markdown)
    for name, m in results.items():
        if name != "direct" and m.cpu < SATURATED_CPU:
            print(
                f"\nnote: {LABELS[name]} used {m.cpu:.0%} of core {CPU_PROXY} (idle {m.core_idle:.0%}, "
                f"other work {m.core_other:.0%}): "
                + ("the load side capped it" if m.core_idle > m.core_other else "the host took the core")
                + "; compare req/CPU-s rather than req/s."
            )
    return 0 if "bridgeway" in results or "bridgeway" not in args.only else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; all started processes were stopped")
        sys.exit(130)
