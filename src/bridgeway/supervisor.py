"""Run granian workers for the gateway and relay config reloads to all of them.

Each worker reloads in place (no connection is dropped), so on SIGHUP the supervisor does not
respawn workers the way granian would: it forwards the signal to every worker instead.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile

from granian.constants import Interfaces, Loops
from granian.http import HTTP1Settings
from granian.server import MPServer

from bridgeway.config import Config
from bridgeway.workers import SHARED_DIR_ENV


class _Supervisor(MPServer):
    def signal_handler_reload(self, *args, **kwargs) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGHUP)


def serve_forever(cfg: Config, config_path: str, workers: int) -> None:
    os.environ["BRIDGEWAY_CONFIG"] = config_path
    if workers > 1:
        # Workers share instance leases and publish their counters here.
        os.environ[SHARED_DIR_ENV] = tempfile.mkdtemp(prefix="bridgeway-")
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
    try:
        server.serve()
    finally:
        if workers > 1:
            shutil.rmtree(os.environ[SHARED_DIR_ENV], ignore_errors=True)
