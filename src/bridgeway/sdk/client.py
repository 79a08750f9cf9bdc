"""An asyncio client for the gateway's HTTP API, on aiohttp. Errors come back as the exceptions
of the gateway's one error shape, with its code, so callers branch on `code`, not on text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson


class BridgewayError(Exception):
    """An answer in the gateway's error shape (or a transport failure, code UNAVAILABLE)."""

    def __init__(self, status: int, code: str, message: str, trace_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.trace_id = trace_id


class VersionConflict(BridgewayError):
    """A compare-and-set lost: the key is not at the version given."""


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    version: int
    expires_in: float | None


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    body = await resp.read()
    try:
        error = orjson.loads(body)["error"]
        code, message, trace_id = error["code"], error["message"], error.get("trace_id")
    except (ValueError, KeyError, TypeError):
        code, message, trace_id = "HTTP_ERROR", body[:200].decode(errors="replace"), None
    kind = VersionConflict if resp.status == 412 else BridgewayError
    raise kind(resp.status, code, message, trace_id)


def _duration(ttl: float | str | None) -> str | None:
    if ttl is None:
        return None
    return ttl if isinstance(ttl, str) else f"{int(ttl * 1000)}ms"


class KV:
    """The versioned key-value store under /api/v1/kv, namespaces as the caller's role allows."""

    def __init__(self, client: Client):
        self._client = client

    def _path(self, namespace: str, key: str = "") -> str:
        return f"/api/v1/kv/{quote(namespace, safe='')}" + (f"/{quote(key, safe='/')}" if key else "")

    async def get(self, namespace: str, key: str) -> Entry | None:
        async with self._client._request("GET", self._path(namespace, key), ok=(404,)) as resp:
            if resp.status == 404:
                return None
            expires = resp.headers.get("X-Expires-In")
            return Entry(
                await resp.read(), int(resp.headers["ETag"].strip('"')), float(expires) if expires else None
            )

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes | str,
        *,
        ttl: float | str | None = None,
        if_version: int | None = None,
    ) -> int:
        """Write; returns the new version. `if_version=n` writes only over version n (0: only if
        absent) and raises VersionConflict otherwise."""
        headers = {}
        if if_version == 0:
            headers["If-None-Match"] = "*"
        elif if_version is not None:
            headers["If-Match"] = f'"{if_version}"'
        params = {"ttl": _duration(ttl)} if ttl is not None else None
        data = value.encode() if isinstance(value, str) else value
        async with self._client._request(
            "PUT", self._path(namespace, key), data=data, headers=headers, params=params
        ) as resp:
            return int(resp.headers["ETag"].strip('"'))

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        headers = {"If-Match": f'"{if_version}"'} if if_version is not None else {}
        async with self._client._request(
            "DELETE", self._path(namespace, key), headers=headers, ok=(404,)
        ) as resp:
            return resp.status == 204

    async def keys(self, namespace: str, prefix: str = "", *, page: int = 500) -> AsyncIterator[str]:
        """Every key under `prefix`, in order, fetched a page at a time."""
        after = None
        while True:
            params = {"prefix": prefix, "limit": str(page)} | ({"after": after} if after else {})
            async with self._client._request("GET", self._path(namespace), params=params) as resp:
                listing = orjson.loads(await resp.read())
            for item in listing["keys"]:
                yield item["key"]
            after = listing["next"]
            if after is None:
                return


@dataclass(slots=True)
class Job:
    """A claimed job, as a handler sees it."""

    id: str
    queue: str
    payload: Any
    headers: dict[str, str]
    attempts: int
    max_attempts: int
    lease: str
    lease_until: float


def _jobs(views: list[dict]) -> list[Job]:
    return [
        Job(
            j["id"],
            j["queue"],
            j["payload"],
            j["headers"],
            j["attempts"],
            j["max_attempts"],
            j["lease"],
            j["lease_until"],
        )
        for j in views
    ]


class Queues:
    """Producing and consuming jobs under /api/v1/queues; the Worker (sdk/worker.py) is the
    easy way to consume."""

    def __init__(self, client: Client):
        self._client = client

    async def enqueue(
        self,
        queue: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        delay: float | str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> str:
        """Enqueue one job; returns its id (the existing job's, for a known idempotency key)."""
        job = {"payload": payload}
        for name, value in (
            ("headers", headers),
            ("delay", delay),
            ("priority", priority),
            ("idempotency_key", idempotency_key),
            ("callback_url", callback_url),
        ):
            if value is not None:
                job[name] = value
        return (await self._post(f"/api/v1/queues/{quote(queue, safe='')}/jobs", job))["id"]

    async def enqueue_many(self, queue: str, jobs: list[dict]) -> list[str]:
        """A batch, all or nothing: each item as `enqueue`'s keywords, with `payload`."""
        answer = await self._post(f"/api/v1/queues/{quote(queue, safe='')}/jobs", {"jobs": jobs})
        return [j["id"] for j in answer["jobs"]]

    async def get(self, job_id: str) -> dict | None:
        async with self._client._request("GET", f"/api/v1/jobs/{quote(job_id, safe='')}", ok=(404,)) as resp:
            return None if resp.status == 404 else orjson.loads(await resp.read())

    async def claim(
        self, queue: str, max: int = 1, *, wait: float = 0.0, lease: float | None = None
    ) -> list[Job]:
        body: dict[str, Any] = {"max": max, "wait": wait}
        if lease is not None:
            body["lease"] = lease
        # A long poll may outlast the client's default timeout: this call gets its own.
        answer = await self._post(
            f"/api/v1/queues/{quote(queue, safe='')}/claim",
            body,
            timeout=aiohttp.ClientTimeout(total=wait + 30),
        )
        return _jobs(answer["jobs"])

    async def settle(self, queue: str, outcomes: list[dict]) -> list[dict]:
        """Outcomes as {"id", "lease", "action": ack|nack|bury|extend, ...}; a result per item
        (status 409 where the lease was lost)."""
        return (await self._post(f"/api/v1/queues/{quote(queue, safe='')}/settle", {"jobs": outcomes}))[
            "results"
        ]

    async def settle_and_claim(
        self, queue: str, outcomes: list[dict], max: int, *, lease: float | None = None
    ) -> tuple[list[dict], list[Job]]:
        """`settle`, then claim up to `max` jobs without waiting, in one call: (results, jobs).
        The outcomes are applied before the claim, so a failure between loses nothing."""
        claim: dict[str, Any] = {"max": max}
        if lease is not None:
            claim["lease"] = lease
        answer = await self._post(
            f"/api/v1/queues/{quote(queue, safe='')}/settle", {"jobs": outcomes, "claim": claim}
        )
        return answer["results"], _jobs(answer["jobs"])

    async def _post(self, path: str, body: Any, **kwargs: Any) -> Any:
        async with self._client._request(
            "POST", path, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, **kwargs
        ) as resp:
            return orjson.loads(await resp.read())


class Client:
    def __init__(
        self, url: str = "http://127.0.0.1:8080", api_key: str | None = None, *, timeout: float = 30.0
    ):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Long-polled claims hold a connection each: no small per-host cap.
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self.kv = KV(self)
        self.queues = Queues(self)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def call(
        self, service: str, method: str, path: str = "/", *, json: Any = None, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        """A request to a service through /bridge; the response is read, errors raise."""
        data = orjson.dumps(json) if json is not None else kwargs.pop("data", None)
        headers = kwargs.pop("headers", {}) | (
            {"Content-Type": "application/json"} if json is not None else {}
        )
        async with self._request(
            method, f"/bridge/{service}/{path.lstrip('/')}", data=data, headers=headers, **kwargs
        ) as resp:
            await resp.read()
            return resp

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any):
        return _Checked(self._session.request(method, self.url + path, **kwargs), ok)


class _Checked:
    """`async with` a request whose error answers (other than those in `ok`) raise."""

    def __init__(self, pending, ok: tuple[int, ...]):
        self._pending = pending
        self._ok = ok
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self._resp = resp = await self._pending
        except aiohttp.ClientError as exc:
            raise BridgewayError(0, "UNAVAILABLE", f"gateway unreachable: {exc.__class__.__name__}") from exc
        if resp.status not in self._ok:
            try:
                await _raise_for(resp)
            except BaseException:
                resp.release()
                raise
        return resp

    async def __aexit__(self, *exc: object) -> None:
        if self._resp is not None:
            self._resp.release()
