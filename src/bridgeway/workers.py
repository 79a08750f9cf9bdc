"""What the worker processes of one `bridgeway serve` share: a directory the supervisor makes
when there are several workers (per-worker metrics), and the reload signal."""

from __future__ import annotations

import os
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
