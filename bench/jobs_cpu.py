"""CPU per job of each process while the SDK worker drains a full queue and then keeps up with
producers: bench/jobs.py's own config, producers, worker and drain check, with the CPU time of
the gateway (all its processes), the worker and, on Redis, redis-server read from /proc before
and after each phase. CPU per job moves less than jobs/s when other work shares the cores.

    python bench/jobs_cpu.py [--backend sqlite|redis] [--jobs 50000]

To compare with another commit, copy this file into that checkout's bench/ and run it there with
PYTHONPATH=<that checkout>/src (it uses only bench/jobs.py's pieces).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jobs  # noqa: E402
from common import CPU_LOAD, ROOT, Procs, free_port, start_bridgeway  # noqa: E402


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def process_tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *(p for child in children for p in process_tree(int(child)))]


async def run(backend: str, n: int, workdir: Path, procs: Procs) -> None:
    idle = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)  # the push target
    port = free_port()
    gateway = start_bridgeway(
        procs,
        workdir,
        port,
        0,
        f"{sys.executable} -m bridgeway serve",
        jobs.config(port, idle.sockets[0].getsockname()[1], backend, workdir),
    )
    url = f"http://127.0.0.1:{port}"
    base = url + "/api/v1"
    redis = (
        int(subprocess.check_output(["pgrep", "-x", "redis-server"]).split()[0])
        if backend.startswith("redis")
        else None
    )
    headers = {"Authorization": f"Bearer {jobs.TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        await jobs.enqueue_rate(session, base, n, 500, 4)
        script = workdir / "worker.py"
        script.write_text(jobs.WORKER)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        argv = [sys.executable, str(script), url, jobs.TOKEN, "1500", "500"]
        worker = procs.spawn(argv, cpu=CPU_LOAD, log_path=workdir / "worker.log", env=env)
        gateway_pids = process_tree(gateway.pid)

        def snapshot() -> tuple[float, ...]:
            return (
                sum(cpu_ticks(p) for p in gateway_pids),
                cpu_ticks(worker.pid),
                cpu_ticks(redis) if redis else 0,
                time.perf_counter(),
            )

        start = snapshot()
        await jobs.drained(session, base, "bench", 600)
        drained = snapshot()
        await jobs.enqueue_rate(session, base, n, 500, 4)
        await jobs.drained(session, base, "bench", 600)
        end = snapshot()
    idle.close()
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    for phase, before, after in (("drain", start, drained), ("end to end", drained, end)):
        us = [(after[i] - before[i]) * tick_us / n for i in range(3)]
        line = f"{phase:10} {n / (after[3] - before[3]):8,.0f} jobs/s   CPU per job: gateway {us[0]:5.1f} us"
        line += f", worker {us[1]:5.1f} us" + (f", redis-server {us[2]:5.1f} us" if redis else "")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "redis"])
    parser.add_argument("--jobs", type=int, default=50_000)
    args = parser.parse_args()
    prefix = f"bwcpu-{os.urandom(4).hex()}"
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-cpu-") as tmp:
        try:
            asyncio.run(run(jobs.backend_url(args.backend, prefix), args.jobs, Path(tmp), procs))
        finally:
            procs.stop_all()
            if args.backend in jobs.BROKERS:
                asyncio.run(jobs.drop_prefix(args.backend, prefix))


if __name__ == "__main__":
    main()
