"""/api/v1/spend: what LLM calls cost, per caller, team, model and UTC day (admin only).

    GET /api/v1/spend?key=<id>&team=<client>&model=<name>&from=2026-01-01&to=2026-01-31
                     &group_by=day,model

Filters are exact; `key` takes a key id or any caller id (`jwt:<issuer>#<subject>`,
`client:<name>`). The window defaults to the last 30 UTC days, today included. The answer has
the totals (requests, tokens in and out, USD) and one row per distinct value of the `group_by`
columns (default: day, key, team, model, deployment).
"""

from __future__ import annotations

from datetime import date, timedelta

from fastapi import APIRouter, Query, Request

from bridgeway.errors import GatewayError
from bridgeway.llm.ledger import LedgerUnavailable
from bridgeway.llm.spend import summarise, today

router = APIRouter(tags=["spend"])
MAX_DAYS = 400
COLUMNS = {"day": "day", "key": "caller", "team": "team", "model": "model", "deployment": "deployment"}
EPOCH = date(1970, 1, 1)


def parse_day(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        return (date.fromisoformat(value) - EPOCH).days
    except ValueError:
        raise GatewayError("VALIDATION_ERROR", f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD)") from None


def iso_day(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()


def caller_id(key: str) -> str:
    return key if ":" in key else f"key:{key}"


async def spend_report(
    spending, key: str | None, team: str | None, model: str | None, first: int, last: int, group_by: str
) -> dict:
    """The report the API and the CLI give."""
    if last < first:
        raise GatewayError("VALIDATION_ERROR", "from: after to")
    if last - first >= MAX_DAYS:
        raise GatewayError("VALIDATION_ERROR", f"from, to: at most {MAX_DAYS} days at once")
    columns = tuple(c.strip() for c in group_by.split(",") if c.strip())
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise GatewayError(
            "VALIDATION_ERROR", f"group_by: unknown column {unknown[0]!r}; one of {sorted(COLUMNS)}"
        )
    await spending.flush()  # what this worker answered is in the report
    try:
        rows = await spending.report(first, last)
    except LedgerUnavailable as exc:
        raise GatewayError("BUDGET_UNAVAILABLE", f"the spend store cannot be read: {exc}") from None
    wanted = caller_id(key) if key else None
    rows = [
        r
        for r in rows
        if (wanted is None or r.caller == wanted)
        and (team is None or r.team == team)
        and (model is None or r.model == model)
    ]
    totals, groups = summarise(rows, tuple(COLUMNS[c] for c in columns))
    for g in groups:
        if "day" in g:
            g["day"] = iso_day(g["day"])
        if "caller" in g:
            g["key"] = g.pop("caller")
    return {"from": iso_day(first), "to": iso_day(last), "totals": totals, "rows": groups}


@router.get("/spend", summary="LLM spend: totals and rows per day, key, team and model")
async def get_spend(
    request: Request,
    key: str | None = Query(None, max_length=300, description="a key id, or a caller id"),
    team: str | None = Query(None, max_length=100, description="a client of the clients table"),
    model: str | None = Query(None, max_length=300, description="a public model name"),
    from_: str | None = Query(
        None, alias="from", description="first UTC day, YYYY-MM-DD; default: 29 days ago"
    ),
    to: str | None = Query(None, description="last UTC day, YYYY-MM-DD; default: today"),
    group_by: str = Query("day,key,team,model,deployment", description="columns the rows are summed by"),
) -> dict:
    spending = request.app.state.gateway.llm.spending
    now = today()
    last = parse_day(to, now, "to")
    first = parse_day(from_, last - 29, "from")
    return await spend_report(spending, key, team, model, first, last, group_by)


__all__ = ["router", "spend_report"]
