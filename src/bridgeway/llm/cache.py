"""The LLM answer cache: a repeated request gets the stored answer instead of a new model call.

Opt-in per model group (`models.X.cache: {ttl: 10m}`). It lives in the data plane's
`ResponseCache` (dataplane/cache.py): the same per-worker LRU, bounded by the top-level `cache`
section, in front of the same state backend (namespace `_cache`, keys `llm/<group>/...`, so with
Redis the replicas share answers), the same single flight (identical requests in flight at once
make one model call; the others wait for its answer), the same back-off when the backend fails,
the same `Stored` entry format and the same scopes. What it does not take from there is
`RouteCache`: that one keys GET requests by target and Vary and follows RFC 9111 response
headers, none of which an LLM call has; here the key is the request body.

The key: the scope (caller, role or public, as for routes), the endpoint, the model group that
serves, whether the answer is a stream (and whether it carries usage), and every other field of
the body, canonicalised (keys sorted at every depth, sampling numbers as floats), minus those that
do not change the answer: `model` (the group is already there), `stream`, `stream_options`,
`user`, `metadata`, `store`, `service_tier`. A field the gateway does not know is kept in the
key: a miss costs a call, a wrong hit would cost an answer.

A stream's answer is stored as the SSE events the client received, ending in `[DONE]`, and
replayed as such; a stream that broke, or that the client left, is not stored, and neither is
any error. A request opts out with `Cache-Control: no-store` (nothing read or written) or
`no-cache` (a fresh answer, which is stored), or the same words in `metadata.cache`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson

from bridgeway.config.models import LLMCacheConfig
from bridgeway.dataplane.cache import (
    HIT,
    KV_TIMEOUT,
    MISS,
    NAMESPACE,
    NO_FLIGHT,
    Flight,
    ResponseCache,
    Stored,
    digest,
    parse_cache_control,
    scope_key,
)
from bridgeway.llm.metrics import ModelMetrics
from bridgeway.security.access import Principal

__all__ = ["HIT", "MISS", "LLMCache", "Lookup", "directive"]

IGNORED = frozenset({"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"})
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON = [(b"content-type", b"application/json")]
_DONE = b"data: [DONE]\n\n"


class BadDirective(ValueError):
    pass


def directive(body: dict, headers: list[tuple[bytes, bytes]]) -> str | None:
    """What the request asks of the cache: no-store, no-cache or None. Raises BadDirective."""
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and "cache" in metadata:
        value = metadata["cache"]
        if value not in ("no-store", "no-cache"):
            raise BadDirective("metadata.cache must be no-store or no-cache")
        return value
    for name, value in headers:
        if name == b"cache-control":
            cc = parse_cache_control(value)
            if "no-store" in cc:
                return "no-store"
            if "no-cache" in cc or cc.get("max-age") == "0":
                return "no-cache"
        elif name == b"pragma" and b"no-cache" in value.lower():
            return "no-cache"
    return None


def canonical(body: dict) -> bytes:
    """The body's fields that decide the answer, in one spelling."""
    rest = {k: v for k, v in body.items() if k not in IGNORED}
    for name in _FLOATS:
        value = rest.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            rest[name] = float(value)
    return orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)


class Lookup:
    __slots__ = ("key", "refresh", "stream", "config", "metrics")

    def __init__(self, key: str, refresh: bool, stream: bool, config: LLMCacheConfig, metrics: ModelMetrics):
        self.key = key
        self.refresh = refresh  # no-cache: skip the read, store the fresh answer
        self.stream = stream
        self.config = config
        self.metrics = metrics


class LLMCache:
    """The worker's LLM view of the shared `ResponseCache`."""

    def __init__(self, shared: ResponseCache):
        self.shared = shared

    def lookup(
        self,
        path: str,
        group: str,
        config: LLMCacheConfig,
        body: dict,
        wish: str | None,
        caller: Principal | None,
        metrics: ModelMetrics,
    ) -> Lookup | None:
        """The request's key; None when the cache is not to be used."""
        if wish == "no-store":
            return None
        stream = body.get("stream") is True
        options = body.get("stream_options")
        usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        shape = b"stream+usage" if usage else b"stream" if stream else b"json"
        key = digest(scope_key(config.scope, caller).encode(), path.encode(), shape, canonical(body))
        return Lookup(f"llm/{group}/{key}", wish == "no-cache", stream, config, metrics)

    # -- reads ----------------------------------------------------------------------------------

    async def find(self, look: Lookup) -> tuple[Stored | None, Flight]:
        """The stored answer, or None and this request's flight (settle it when done)."""
        entry = None
        flight = NO_FLIGHT
        if not look.refresh:
            entry = self.shared.memory.get(look.key)
            if entry is None:
                flight = self.shared.flights.join(look.key)
                if flight.leader:
                    try:
                        entry = await self._fetch(look)
                    except BaseException:  # cancelled: the followers must not wait forever
                        flight.settle(None)
                        raise
                    if entry is not None:
                        flight.settle(entry)
                        flight = NO_FLIGHT
                else:
                    entry = await flight.wait()
                    flight = NO_FLIGHT  # a follower without an answer calls the model itself
        if entry is not None:
            look.metrics.cache_hits += 1
        else:
            look.metrics.cache_misses += 1
        return entry, flight

    async def _fetch(self, look: Lookup) -> Stored | None:
        kv = self.shared.shared_tier()
        if kv is None:
            return None
        try:
            async with asyncio.timeout(KV_TIMEOUT):
                found = await kv.get(NAMESPACE, look.key)
            if found is None:
                return None
            entry = Stored.decode(found.value)
        except Exception as exc:  # noqa: BLE001 - any failure of the shared tier is a miss
            self.shared.unavailable(look.metrics, exc)
            return None
        if entry.expires_at <= self.shared.clock():
            return None
        self.shared.memory.put(look.key, entry)
        return entry

    # -- writes -----------------------------------------------------------------------------------

    async def keep(
        self, look: Lookup, body: bytes, headers: list[tuple[bytes, bytes]], flight: Flight
    ) -> None:
        """Store a complete answer (JSON, or a stream's SSE events) here and in the shared tier,
        and hand it to the flight's followers."""
        entry = None
        if len(body) <= look.config.max_entry:
            now = self.shared.clock()
            entry = Stored(200, headers, body, now, now + look.config.ttl)
            self.shared.memory.put(look.key, entry)
            look.metrics.cache_stores += 1
        flight.settle(entry)
        kv = self.shared.shared_tier()
        if entry is None or kv is None:
            return
        try:
            async with asyncio.timeout(KV_TIMEOUT):
                await kv.put(NAMESPACE, look.key, entry.encode(), ttl=look.config.ttl)
        except Exception as exc:  # noqa: BLE001 - the answer is still served, only not shared
            self.shared.unavailable(look.metrics, exc)

    async def capture(
        self, events: AsyncIterator[bytes], look: Lookup, headers: list[tuple[bytes, bytes]], flight: Flight
    ) -> AsyncIterator[bytes]:
        """Pass a stream's SSE events through; store them once the stream ended with [DONE]."""
        kept: list[bytes] = []
        size = 0
        async for event in events:
            if size <= look.config.max_entry:
                kept.append(event)
                size += len(event)
            yield event
        if kept and kept[-1] == _DONE and size <= look.config.max_entry:
            await self.keep(look, b"".join(kept), headers, flight)

    # -- answers ----------------------------------------------------------------------------------

    async def replay(self, entry: Stored, look: Lookup, send, headers: list[tuple[bytes, bytes]]) -> None:
        """A stored answer, as JSON or as the SSE events it was stored as."""
        age = max(0, int(self.shared.clock() - entry.stored_at))
        reply = [*(_SSE if look.stream else _JSON), *entry.headers, *headers, (b"age", b"%d" % age), HIT]
        await send({"type": "http.response.start", "status": 200, "headers": reply})
        if not look.stream:
            await send({"type": "http.response.body", "body": entry.body})
            return
        events = entry.body.split(b"\n\n")
        for event in events[:-1]:  # the last piece is the empty one after the final separator
            await send({"type": "http.response.body", "body": event + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
