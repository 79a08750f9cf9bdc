"""Run granian workers for the gateway and relay config reloads to all of them.

Each worker reloads in place (no connection is dropped), so on SIGHUP the supervisor does not
respawn workers the way granian would: it forwards the signal to every worker instead.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
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


def _fd_limit() -> int:
    """Raise the soft open-files limit to the hard one and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1_048_576:
        hard = 1_048_576
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def serve_forever(cfg: Config, config_path: str, workers: int) -> None:
    os.environ["BRIDGEWAY_CONFIG"] = config_path
    if workers > 1:
        # Workers publish their counters here for whichever of them answers a scrape.
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
        # granian caps connections per worker at backlog/workers unless told; a gateway holds
        # many idle keep-alive clients, so the cap is the file descriptor limit instead.
        backpressure=_fd_limit(),
        # The head read timeout is also the idle keep-alive limit: 60 s (granian's maximum).
        http1_settings=HTTP1Settings(
            max_buffer_size=max(cfg.max_header_size, 8192), header_read_timeout=60_000
        ),
        log_level="warning",
        log_access=False,
    )
    try:
        server.serve()
    finally:
        if workers > 1:
            shutil.rmtree(os.environ[SHARED_DIR_ENV], ignore_errors=True)
