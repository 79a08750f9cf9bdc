"""/api/v1/kv/{namespace}/{key}: a small versioned key-value store on the gateway's state backend.

Values are opaque bytes. Each write bumps the key's version, returned as the `ETag`; `If-Match`
makes a write or delete conditional on it (compare-and-set) and `If-None-Match: *` creates only.
Writes and deletes are audited by namespace and key, never with the value.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from bridgeway.api.auth import caller_of, refuse
from bridgeway.api.context import audit
from bridgeway.config.units import parse_duration
from bridgeway.errors import GatewayError
from bridgeway.state import Entry, VersionMismatch

router = APIRouter(tags=["kv"])
# Namespaces starting with "_" are the gateway's own (e.g. instance leases).
Namespace = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
Key = Annotated[str, Path(pattern=r"^[A-Za-z0-9._:/-]{1,512}$")]


async def require_kv_access(request: Request) -> None:
    """Admins use every namespace; other callers those their role's `kv` grants name."""
    caller = await caller_of(request)
    namespace = request.path_params.get("namespace", "")
    write = request.method not in ("GET", "HEAD")
    if not request.app.state.gateway.access.may_use_kv(caller, namespace, write):
        verb = "write" if write else "read"
        raise refuse(request, caller, f"role {caller.role!r} may not {verb} namespace {namespace!r}")


def _kv(request: Request):
    return request.app.state.gateway.state


def _expires_in(entry: Entry) -> float | None:
    return None if entry.expires_at is None else round(max(0.0, entry.expires_at - time.time()), 3)


def _headers(entry: Entry) -> dict[str, str]:
    headers = {"ETag": f'"{entry.version}"'}
    expires_in = _expires_in(entry)
    if expires_in is not None:
        headers["X-Expires-In"] = str(expires_in)
    return headers


def _condition(request: Request) -> int | None:
    """If-Match: "n" -> version n; If-None-Match: * -> 0 (create only); neither -> unconditional."""
    if request.headers.get("if-none-match", "").strip() == "*":
        return 0
    match = request.headers.get("if-match")
    if match is None:
        return None
    tag = match.strip().removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise GatewayError("BAD_REQUEST", 'If-Match takes a version as returned in ETag, e.g. "3"')
    return int(tag)


def _conflict(key: str, exc: VersionMismatch) -> GatewayError:
    now = "absent" if exc.current is None else f"at version {exc.current}"
    return GatewayError("PRECONDITION_FAILED", f"key {key!r} is {now}; the condition did not hold")


@router.get("/kv/{namespace}", summary="List keys by prefix, in order, with cursor paging")
async def list_keys(
    request: Request,
    namespace: Namespace,
    prefix: str = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: str | None = None,
) -> dict:
    items = await _kv(request).list(namespace, prefix, limit=limit, after=after)
    return {
        "keys": [
            {"key": k, "version": e.version, "size": len(e.value), "expires_in": _expires_in(e)}
            for k, e in items
        ],
        "next": items[-1][0] if len(items) == limit else None,
    }


@router.get("/kv/{namespace}/{key:path}", summary="Read a value; its ETag is its version")
async def get_value(request: Request, namespace: Namespace, key: Key) -> Response:
    entry = await _kv(request).get(namespace, key)
    if entry is None:
        raise GatewayError("NOT_FOUND", f"no key {key!r} in namespace {namespace!r}")
    return Response(entry.value, media_type="application/octet-stream", headers=_headers(entry))


@router.put(
    "/kv/{namespace}/{key:path}", summary="Write a value: If-Match for compare-and-set, ?ttl=30s to expire"
)
async def put_value(request: Request, namespace: Namespace, key: Key, ttl: str | None = None) -> Response:
    try:
        seconds = parse_duration(ttl) if ttl is not None else None
    except ValueError as exc:
        raise GatewayError("BAD_REQUEST", f"ttl: {exc}") from None
    if seconds is not None and seconds <= 0:
        raise GatewayError("BAD_REQUEST", "ttl: must be above zero")
    condition = _condition(request)
    try:
        entry = await _kv(request).put(
            namespace, key, await request.body(), ttl=seconds, if_version=condition
        )
    except VersionMismatch as exc:
        raise _conflict(key, exc) from None
    audit(request, "kv.put", namespace=namespace, key=key, version=entry.version, ttl=seconds)
    return Response(status_code=201 if entry.version == 1 else 200, headers=_headers(entry))


@router.delete(
    "/kv/{namespace}/{key:path}", status_code=204, summary="Delete a key; If-Match makes it conditional"
)
async def delete_value(request: Request, namespace: Namespace, key: Key) -> Response:
    try:
        deleted = await _kv(request).delete(namespace, key, if_version=_condition(request))
    except VersionMismatch as exc:
        raise _conflict(key, exc) from None
    if not deleted:
        raise GatewayError("NOT_FOUND", f"no key {key!r} in namespace {namespace!r}")
    audit(request, "kv.deleted", namespace=namespace, key=key)
    return Response(status_code=204)
