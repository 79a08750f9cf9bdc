"""/api/v1/audit: the audit log, newest first, filtered by event, actor and time, paged by cursor."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from bridgeway.errors import GatewayError
from bridgeway.governance.audit import parse_window

router = APIRouter(tags=["audit"])
WHEN = "epoch seconds, ISO 8601 (UTC unless an offset is given), or a duration ago such as 1h"


@router.get("/audit", summary="Audit records, newest first; `next` is the cursor of the following page")
async def query_audit(
    request: Request,
    event: Annotated[str | None, Query(description="one event, e.g. key.revoked")] = None,
    actor: Annotated[
        str | None, Query(description='who acted, e.g. "key:0123456789" or "admin:token"')
    ] = None,
    since: Annotated[str | None, Query(description=f"oldest time included: {WHEN}")] = None,
    until: Annotated[str | None, Query(description=f"newest time included: {WHEN}")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
) -> dict:
    try:
        start, end = parse_window(since, until, time.time())
    except ValueError as exc:
        raise GatewayError("BAD_REQUEST", str(exc)) from None
    try:
        records, after = await request.app.state.gateway.audit.query(event, actor, start, end, limit, cursor)
    except ValueError as exc:
        raise GatewayError("BAD_REQUEST", str(exc)) from None
    return {"records": records, "next": after}
