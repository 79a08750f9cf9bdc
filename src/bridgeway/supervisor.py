"""Run granian workers for the gateway and relay config reloads to all of them.

Each worker reloads in place (no connection is dropped), so on SIGHUP the supervisor does not
respawn workers the way granian would: it forwards the signal to every worker instead.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile

from granian.constants import Interfaces, Loops
from granian.http import HTTP1Settings
from granian.server import MPServer

from bridgeway.config import Config
from bridgeway.observability.metrics import METRICS_DIR


class _Supervisor(MPServer):
    def signal_handler_reload(self, *args, **kwargs) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGHUP)


def serve_forever(cfg: Config, config_path: str, workers: int) -> None:
    os.environ["BRIDGEWAY_CONFIG"] = config_path
    os.environ["BRIDGEWAY_SUPERVISED"] = "1" if workers > 1 else "0"
    if workers > 1:
        # Each worker publishes its counters here once a second; a scrape sums them all.
        os.environ[METRICS_DIR] = tempfile.mkdtemp(prefix="bridgeway-metrics-")
    server = _Supervisor(
        "bridgeway.server:create_app",
        address=cfg.host,
        port=cfg.port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.uvloop,
        factory=True,
        websockets=True,
        backlog=2048,
        http1_settings=HTTP1Settings(max_buffer_size=max(cfg.max_header_size, 8192)),
        log_level="warning",
        log_access=False,
    )
    server.serve()
