"""Running the gateway's worker processes (`bridgeway serve`, `bridgeway demo`) and what they
share: a directory the supervisor makes when there are several workers (per-worker metrics).

Kept apart from `bridgeway.server` so the supervisor process does not import the gateway: each
worker imports and builds it after the fork."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SHARED_DIR_ENV = "BRIDGEWAY_SHARED_DIR"


def shared_dir(*parts: str) -> Path | None:
    """The shared directory (or a folder in it, created), or None with a single worker."""
    root = os.environ.get(SHARED_DIR_ENV)
    if not root:
        return None
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_gateway():
    from bridgeway.server import create_app

    return create_app()


def serve_gateway(cfg, config_path: str, workers: int) -> int:
    """Run the gateway on `workers` processes (bridgeway.serving); returns the exit status."""
    from bridgeway.serving import Settings, serve

    os.environ["BRIDGEWAY_CONFIG"] = config_path
    if workers > 1:
        # Workers publish their counters here for whichever of them answers a scrape.
        os.environ[SHARED_DIR_ENV] = tempfile.mkdtemp(prefix="bridgeway-")
    # The head read timeout and the idle keep-alive limit stay 60 s each (Settings' defaults).
    settings = Settings(host=cfg.host, port=cfg.port, max_header_size=cfg.max_header_size)
    try:
        return serve(_build_gateway, settings, workers)
    finally:
        if workers > 1:
            shutil.rmtree(os.environ[SHARED_DIR_ENV], ignore_errors=True)
