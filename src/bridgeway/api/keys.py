"""/api/v1/keys: create, list, revoke and rotate API keys. A key's secret is shown once, at
creation or rotation; afterwards only its public record is. Every change is audited."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator

from bridgeway.api.context import audit
from bridgeway.config.models import BudgetConfig
from bridgeway.config.units import parse_duration
from bridgeway.errors import GatewayError
from bridgeway.governance.audit import key_fields

router = APIRouter(tags=["keys"])


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: str | None = Field(None, min_length=1, max_length=100, description="required unless client is set")
    client: str | None = Field(None, description="a client of the config's clients table: the key acts as it")
    services: list[str] | None = None
    expires: str | None = Field(None, description="lifetime, e.g. 90d; none by default")
    models: list[str] | None = Field(
        None,
        description="public LLM model names (globs) it may use, within its role's; all of them when absent",
    )
    budgets: list[BudgetConfig] | None = Field(
        None,
        description='its own LLM budgets, replacing its role\'s: [{"period": "1d", "usd": 5}] or ["5usd/1d"]',
    )

    @field_validator("expires")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


class Rotation(BaseModel):
    grace: str = Field("1h", description="how long the previous secret keeps working")

    @field_validator("grace")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


def _keys(request: Request):
    return request.app.state.gateway.keys


@router.post("/keys", status_code=201, summary="Create a key; the response holds its secret, once")
async def create_key(request: Request, body: NewKey) -> dict:
    expires_in = parse_duration(body.expires) if body.expires else None
    clients = request.app.state.gateway.config.clients
    if body.client is not None and body.client not in clients:
        raise GatewayError("NOT_FOUND", f"no client named {body.client!r} in the config")
    role = clients[body.client].role if body.client is not None else body.role
    if role is None:
        raise GatewayError("VALIDATION_ERROR", "role: required unless client is set")
    token, record = await _keys(request).create(
        body.name,
        role,
        services=body.services,
        expires_in=expires_in,
        client=body.client,
        models=body.models,
        budgets=[b.model_dump(exclude_none=True) for b in body.budgets or ()],
    )
    audit(request, "key.created", **key_fields(record))
    return {"key": token, **record.public()}


@router.get("/keys", summary="Every key, without secrets")
async def list_keys(request: Request) -> dict:
    return {"keys": [r.public() for r in await _keys(request).list()]}


@router.post("/keys/{key_id}/revoke", summary="Revoke a key: refused everywhere at once")
async def revoke_key(request: Request, key_id: str) -> dict:
    record = await _keys(request).revoke(key_id)
    if record is None:
        error = GatewayError("NOT_FOUND", f"no key with id {key_id!r}")
        audit(request, "key.revoked", outcome="failure", key_id=key_id, reason=error.message)
        raise error
    audit(request, "key.revoked", **key_fields(record))
    return record.public()


@router.post("/keys/{key_id}/rotate", summary="New secret; the old one works for the grace period")
async def rotate_key(request: Request, key_id: str, body: Rotation | None = None) -> dict:
    grace = parse_duration((body or Rotation()).grace)
    rotated = await _keys(request).rotate(key_id, grace)
    if rotated is None:
        error = GatewayError("NOT_FOUND", f"no active key with id {key_id!r}")
        audit(request, "key.rotated", outcome="failure", key_id=key_id, reason=error.message)
        raise error
    token, record = rotated
    audit(request, "key.rotated", grace=grace, **key_fields(record))
    return {"key": token, **record.public()}
