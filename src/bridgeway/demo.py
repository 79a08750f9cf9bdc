"""`bridgeway demo`: the sample services, the gateway in front of them, and a short tour."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from bridgeway.config import ConfigError, load_config

console = Console()

# name, module:app, port, environment: what examples/bridgeway.yaml points at.
SAMPLES = [
    ("sim-1", "sim:app", 9101, {"SIM_NAME": "sim-1"}),
    ("sim-2", "sim:app", 9102, {"SIM_NAME": "sim-2"}),
    ("echo", "echo:app", 9201, {"ECHO_NAME": "echo"}),
]


def examples_dir() -> Path:
    """The examples shipped in the wheel, or the repository's when running from a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples", here.parents[1] / "examples"):
        if (candidate / "bridgeway.yaml").exists():
            return candidate
    raise FileNotFoundError("examples/bridgeway.yaml not found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait(url: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _start_sample(services: Path, module: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "bridgeway.serving",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--app-dir",
        str(services),
        module,
    ]
    return subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True)


def _tour(base: str, token: str) -> None:
    console.print(f"\n[bold green]Bridgeway demo is up[/] at {base}\n")
    console.print("Try:", style="bold")
    lines = [
        f"curl -s '{base}/bridge/echo/hello?x=1' -H 'X-Request-Id: demo-1'",  # quoted: zsh globs `?`
        f"curl -s '{base}/bridge/sim/simulate?laps=50&iterations=20000&tyre_wear=0.08&pit_loss=21'",
        f"curl -s -X POST {base}/bridge/sim/simulate -H 'content-type: application/json' "
        '-d \'{"laps": 57, "iterations": 50000, "pit_loss": 22.5}\'',
        f"curl -s {base}/bridge/nope/   # 404 UNKNOWN_SERVICE in the standard error shape",
        f"curl -s {base}/health",
        f"curl -s {base}/metrics | grep bridgeway_requests",
        f"curl -s {base}/api/v1/services -H 'Authorization: Bearer {token}'",
        f"open {base}/docs   # the management API",
    ]
    for line in lines:
        # never wrapped by rich: a command broken over two lines does not paste
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    console.print("\nCtrl-C stops everything.\n")


def run_demo(port: int) -> None:
    examples = examples_dir()
    config_path = examples / "bridgeway.yaml"
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise SystemExit(1) from None
    cfg = cfg.model_copy(update={"listen": f"127.0.0.1:{port}"})
    busy = [p for p in [port] + [s[2] for s in SAMPLES] if not _port_free(p)]
    if busy:
        console.print(f"[red]ports already in use: {busy}[/] (is another demo running?)")
        raise SystemExit(1)
    procs = []
    try:
        for _name, module, sport, env in SAMPLES:
            procs.append(_start_sample(examples / "services", module, sport, env))
        for name, _, sport, _ in SAMPLES:
            if not _wait(f"http://127.0.0.1:{sport}/health"):
                console.print(f"[red]sample service {name} did not start on port {sport}[/]")
                raise SystemExit(1)
        base = f"http://127.0.0.1:{port}"
        token = cfg.admin.token.get_secret_value() if cfg.admin.token else ""
        threading.Thread(
            target=lambda: _wait(f"{base}/health/ready") and _tour(base, token), daemon=True
        ).start()
        from bridgeway.workers import serve_gateway

        serve_gateway(cfg, str(config_path), workers=1)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        console.print("demo stopped")
