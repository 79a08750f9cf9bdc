"""/api/v1/services: what the gateway routes to, run-time self-registration of instances, and
config reloads. New registrations, deregistrations and reloads are audited; lease renewals are
not (they come every few seconds)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, field_validator

from bridgeway.api.context import audit, request_fields
from bridgeway.config.models import instance_url
from bridgeway.config.units import parse_duration
from bridgeway.errors import GatewayError

router = APIRouter(tags=["services"])


class Registration(BaseModel):
    url: str = Field(description="the instance, http://host:port[/base]")
    ttl: str | float | None = Field(None, description="lease, e.g. 30s; renew by registering again")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return instance_url(value)

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value):
        return None if value is None else parse_duration(value)


def _service(request: Request, name: str):
    service = request.app.state.gateway.registry.services.get(name)
    if service is None:
        raise GatewayError("UNKNOWN_SERVICE", f"no service named {name!r}")
    return service


@router.get("/services", summary="Every service with its instances, health, breaker and latency")
async def list_services(request: Request) -> dict:
    return {"services": request.app.state.gateway.registry.snapshot(time.monotonic())}


@router.get("/services/{name}", summary="One service")
async def get_service(request: Request, name: str) -> dict:
    return _service(request, name).snapshot(time.monotonic())


@router.post(
    "/services/{name}/instances",
    status_code=201,
    summary="Register an instance, or renew its lease (heartbeat)",
)
async def register(request: Request, response: Response, name: str, body: Registration) -> dict:
    service = _service(request, name)
    ttl = body.ttl or service.config.registration_ttl
    inst, created = await request.app.state.gateway.registry.register(service, body.url, ttl)
    if created:
        audit(request, "service.instance_registered", service=name, url=body.url, ttl=ttl)
    else:
        response.status_code = 200
    return inst.snapshot(time.monotonic())


@router.delete("/services/{name}/instances", status_code=204, summary="Deregister an instance")
async def deregister(request: Request, name: str, url: str) -> Response:
    registry = request.app.state.gateway.registry
    if not await registry.deregister(_service(request, name), url.rstrip("/")):
        raise GatewayError("NOT_FOUND", "no registered instance with that url (config instances stay)")
    audit(request, "service.instance_deregistered", service=name, url=url.rstrip("/"))
    return Response(status_code=204)


@router.post(
    "/admin/reload", summary="Reload the config file; an invalid one is rejected and the old one serves"
)
async def reload(request: Request) -> dict:
    gateway = request.app.state.gateway
    problems = gateway.reload_everywhere(request.state.actor, **request_fields(request))
    if problems:
        raise GatewayError(
            "INVALID_CONFIG", "config rejected, the previous one keeps serving: " + "; ".join(problems)
        )
    return {"status": "reloaded", "services": sorted(gateway.registry.services)}
