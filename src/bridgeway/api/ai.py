"""POST /api/v1/ai/route: which model group a chat request would go to, and why, without calling it.

The body is the chat request itself (OpenAI's shape: `model`, `messages`, `tools`, `metadata`,
`max_tokens`; other fields are accepted and ignored), and the `X-Bridgeway-*` routing headers
count as on /v1. Any authenticated caller may ask about a model its role's `models` grants name
(a router name, or a group directly); the answer only names groups the caller may use, as the
real call would. The estimated cost is the price table's, for the deployment the group would try
first now, on an estimate of the tokens (prompt characters / 4, and max_tokens or 256 out).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from bridgeway.api.auth import caller_of, refuse
from bridgeway.errors import GatewayError
from bridgeway.llm.prices import price_of
from bridgeway.llm.rules import BadSignal, read_signals

router = APIRouter(tags=["ai"])


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest of a chat request is welcome, and ignored

    model: str = Field(
        min_length=1, max_length=200, description='a router name (e.g. "auto") or a model group'
    )
    messages: list[dict[str, Any]] = Field(description="OpenAI chat messages")
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] | None = Field(None, description="task, complexity, tags, prefer")
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)


class RouteAnswer(BaseModel):
    selected_model: str
    confidence: float = Field(
        description="1: named or preferred; ~0.95: rules on given metadata; lower on estimates"
    )
    routing_reason: str
    estimated_cost: float = Field(description="USD, by the price table")
    deployment: str = Field(description="provider/model the group would try first")
    estimated_tokens: dict[str, int]
    signals: dict[str, Any] = Field(description="what the request said about itself, or was estimated to")


@router.post("/ai/route", summary="The model group a chat request would be routed to, without calling it")
async def route(request: Request, body: RouteRequest) -> RouteAnswer:
    caller = await caller_of(request)
    gateway = request.app.state.gateway
    llm, access = gateway.llm, gateway.access
    chat = body.model_dump(exclude_none=True)
    headers = request.scope["headers"]
    try:
        signals = read_signals(chat, headers)
    except BadSignal as exc:
        raise GatewayError("BAD_REQUEST", str(exc)) from None
    if body.model in llm.routing.routers:
        try:
            decision = llm.decide(body.model, chat, headers, caller, access)
        except GatewayError as exc:
            if exc.status == 403:
                raise refuse(request, caller, exc.message) from None
            raise
        selected, confidence, reason = decision.model, decision.confidence, decision.reason
    elif body.model in llm.router.groups:
        if not access.may_use_model(caller, body.model):
            raise refuse(request, caller, f"this caller may not use model {body.model!r}")
        selected, confidence, reason = body.model, 1.0, f"{body.model}: named directly"
    else:
        raise GatewayError("UNKNOWN_MODEL", f"no model or router named {body.model[:100]!r}")
    group = llm.router.groups[selected]
    now = time.monotonic()
    ordered = group.ordered(llm.router.rng)
    first = next((d for d in ordered if d.breaker.state(now).value != "open"), ordered[0]).deployment
    price_in, price_out = price_of(first.model)
    cost = (signals.prompt_tokens * price_in + signals.output_tokens * price_out) / 1e6
    return RouteAnswer(
        selected_model=selected,
        confidence=confidence,
        routing_reason=reason,
        estimated_cost=round(cost, 8),
        deployment=f"{first.provider}/{first.model}",
        estimated_tokens={"input": signals.prompt_tokens, "output": signals.output_tokens},
        signals={
            "task": signals.task,
            "task_estimated": not signals.task_given,
            "complexity": signals.complexity,
            "complexity_estimated": not signals.complexity_given,
            "complexity_score": round(signals.score, 3),
            "tags": sorted(signals.tags),
        },
    )
