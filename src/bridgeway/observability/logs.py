"""JSON-lines logs through structlog, rendered with orjson straight to stdout's buffer."""

from __future__ import annotations

import logging
import sys
from typing import BinaryIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream: BinaryIO | None = None) -> None:
    """JSON lines at `level` and above, to stdout unless told (the CLI keeps stdout for its output)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(stream or sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "bridgeway") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
