"""Shared plumbing for the benchmarks: ports, processes, nginx, wrk, RSS.

One way to do each thing, so every benchmark measures its peers the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_BODY = '{"ok":true,"service":"bench"}'

# Pinning on a 2-core machine (see bench/README.md): the process under test owns core 1,
# the load side (wrk / idle client + upstream nginx) shares core 0.
CPU_PROXY = 1
CPU_LOAD = 0


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean table."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes -----------------------------------------------------------------------------


class Procs:
    """Owns every process a benchmark starts; `stop_all` kills whole process groups.

    Each child gets its own session (process group), so workers forked by nginx or the gateway
    die with it, and Ctrl-C on the terminal reaches only us; we then clean up in `finally`.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, cmd: Sequence[str], *, cpu: int | None, log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        argv = [*(["taskset", "-c", str(cpu)] if cpu is not None else []), *cmd]
        out = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()  # the child holds its own copy
        self.procs.append(proc)
        return proc

    def stop_all(self, grace: float = 5.0) -> None:
        for proc in reversed(self.procs):
            stop_group(proc, grace)
        self.procs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            # the leader may exit before its workers: make sure the group is empty too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so `finally` blocks stop our children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll until GET path answers 200; fail fast if the server process died."""
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {path} was ready")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0) as s:
            s.sendall(request)
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise TimeoutError(f"127.0.0.1:{port}{path} not ready after {timeout:.0f}s")


# --- RSS ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    # /proc/PID/task/*/children needs CONFIG_PROC_CHILDREN; scanning ppid works everywhere
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of pid and all its descendants (sum of VmRSS)."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def tree_pss(pid: int) -> int:
    """Proportional memory in bytes of pid and its descendants: pages shared between forked
    workers and their parent count once in all, where summed RSS counts them in each process."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by pid and its live descendants."""
    ticks = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def core_jiffies(core: int) -> tuple[int, int]:
    """(idle, total) jiffies of one core from /proc/stat; steal counts as busy (the hypervisor took it)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            v = [int(x) for x in line.split()[1:9]]  # user..steal; guest time is already in user
            return v[3] + v[4], sum(v)
    raise ValueError(f"no cpu{core} in /proc/stat")


# --- output ------------------------------------------------------------------------------


def print_table(title: str, headers: list[str], rows: list[list[str]], markdown: bool) -> None:
    """rich when importable, else plain text; markdown on request (for bench/README.md)."""
    if markdown:
        print(f"{title}\n")
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=False)]
        print(title)
        for row in [headers, *rows]:
            print(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)  # wide enough to keep rows on one line when piped


# --- nginx -------------------------------------------------------------------------------


def _nginx_conf(workdir: Path, server: str, worker_connections: int) -> str:
    temp = "\n".join(
        f"    {name}_temp_path {workdir / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {worker_connections + 1024};
pid {workdir / "nginx.pid"};
error_log stderr warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections {worker_connections}; multi_accept on; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
{temp}
{server}
}}
"""


def start_nginx(
    procs: Procs, workdir: Path, name: str, server: str, *, cpu: int | None, worker_connections: int = 4096
) -> subprocess.Popen[bytes]:
    """Write `<workdir>/<name>/nginx.conf` around a server block and start nginx in the foreground."""
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(_nginx_conf(d, server, worker_connections))
    # -e: keep nginx away from /var/log even before it reads the config
    return procs.spawn(
        ["nginx", "-p", str(d), "-e", "stderr", "-c", str(conf)], cpu=cpu, log_path=d / "nginx.log"
    )


def upstream_server(port: int) -> str:
    """The backend: a tiny fixed JSON answer for any path."""
    return f"""\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        default_type application/json;
        location / {{ return 200 '{UPSTREAM_BODY}'; }}
    }}"""


def nginx_proxy_server(port: int, upstream_port: int) -> str:
    """The peer: nginx as a keep-alive reverse proxy; /health/live answered locally like the gateway."""
    return f"""\
    upstream bench {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /health/live {{ default_type application/json; return 200 '{{"status":"live"}}'; }}
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


# --- wrk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError(f"unrecognised wrk duration {value!r}")
    return float(m[1]) * _UNITS_MS[m[2]]


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output."""

    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, text, re.MULTILINE)

    rps, reqs, p50, p99 = (
        find(r"^Requests/sec:\s+([\d.]+)"),
        find(r"^\s*(\d+) requests in"),
        find(r"^\s+50%\s+(\S+)"),
        find(r"^\s+99%\s+(\S+)"),
    )
    if not (rps and reqs and p50 and p99):
        raise ValueError(f"could not parse wrk output:\n{text}")
    non_2xx = find(r"Non-2xx or 3xx responses:\s+(\d+)")
    sock = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    return WrkResult(
        rps=float(rps[1]),
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        requests=int(reqs[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    cpu: int | None = CPU_LOAD,
    headers: Sequence[str] = (),
    script: Path | None = None,
) -> WrkResult:
    """One wrk thread (it shares core 0 with the upstream); bounded by a hard timeout.
    `script` is a wrk Lua script (e.g. one setting wrk.method/body for POSTs)."""
    argv = [*(["taskset", "-c", str(cpu)] if cpu is not None else [])]
    argv += ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "--latency"]
    argv += ["-s", str(script)] if script is not None else []
    argv += [arg for header in headers for arg in ("-H", header)] + [url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=True)
    return parse_wrk(done.stdout)


# --- bridgeway ---------------------------------------------------------------------------


# appended: --config <file> --workers 1
DEFAULT_BRIDGEWAY_CMD = f"{shlex.quote(sys.executable)} -m bridgeway serve"


def bridgeway_config(port: int, upstream_port: int) -> str:
    return f"""\
listen: 127.0.0.1:{port}
services:
  bench:
    instances: [http://127.0.0.1:{upstream_port}]
    timeout: 10s
logging: {{access: false}}  # nginx runs with access_log off too
"""


def start_bridgeway(
    procs: Procs,
    workdir: Path,
    port: int,
    upstream_port: int,
    cmd: str,
    config: str | None = None,
    name: str = "bridgeway",
) -> subprocess.Popen[bytes]:
    """`config` replaces the plain one (it must listen on `port`); `name` names its files."""
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(config or bridgeway_config(port, upstream_port))
    # run from the checkout whether or not the package is installed
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    )
    argv = [*shlex.split(cmd), "--config", str(cfg), "--workers", "1"]
    log(f"starting {name}: {shlex.join(argv)} (log: {workdir / f'{name}.log'})")
    proc = procs.spawn(argv, cpu=CPU_PROXY, log_path=workdir / f"{name}.log", env=env)
    wait_http(port, "/health/ready", proc, timeout=60)
    return proc


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
