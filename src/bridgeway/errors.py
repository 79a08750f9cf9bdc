"""The one error shape every response from the gateway uses.

`{"error": {"code", "message", "trace_id", "timestamp"}}` with a status that matches the code.
Codes are documented in docs/errors.md; messages never carry secrets or request headers.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

# code -> HTTP status; the single table docs/errors.md mirrors.
STATUS: dict[str, int] = {
    "BAD_REQUEST": 400,
    "BAD_PATH": 400,
    "URL_NOT_ALLOWED": 400,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "UNKNOWN_SERVICE": 404,
    "UNKNOWN_MODEL": 404,
    "CONTEXT_WINDOW": 400,
    "UNSUPPORTED": 400,
    "METHOD_NOT_ALLOWED": 405,
    "CONFLICT": 409,
    "PRECONDITION_FAILED": 412,
    "BODY_TOO_LARGE": 413,
    "INVALID_CONFIG": 422,
    "VALIDATION_ERROR": 422,
    "RATE_LIMITED": 429,
    "BUDGET_EXCEEDED": 429,
    "QUEUE_FULL": 429,
    "TOO_MANY_STREAMS": 429,
    "INTERNAL": 500,
    "UPSTREAM_CONNECT": 502,
    "UPSTREAM_PROTOCOL": 502,
    "UPSTREAM_CLOSED": 502,
    "UPSTREAM_AUTH": 502,
    "UPSTREAM_ERROR": 502,
    "BAD_RESPONSE": 502,
    "STREAM_BROKEN": 502,
    "NO_DEPLOYMENT": 503,
    "NO_HEALTHY_INSTANCE": 503,
    "CIRCUIT_OPEN": 503,
    "UPSTREAM_BUSY": 503,
    "BUDGET_UNAVAILABLE": 503,
    "STREAMS_AT_CAPACITY": 503,
    "UPSTREAM_TIMEOUT": 504,
}


class GatewayError(Exception):
    """An error that becomes the standard JSON body; raise it anywhere on a request path."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS[code]  # a provider's own status (e.g. its 429) may stand
        self.headers = headers or []


def error_body(code: str, message: str, trace_id: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "trace_id": trace_id,
                "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }
        }
    )
