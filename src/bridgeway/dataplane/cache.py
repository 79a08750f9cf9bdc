"""The response cache of a route: answers to GET kept for a while, so repeated reads skip the upstream.

Opt-in per service (`services.X.cache`). Two tiers: an LRU in the worker's memory, bounded in
entries and bytes and shared by every cached route, in front of the gateway's state backend
(namespace `_cache`), so with Redis state the replicas share one cache and with SQLite the
workers of one machine do. Reads go memory, then the shared tier (filling memory), then upstream;
an answer that may be stored goes into both.

Who shares an entry is part of its key (`scope`): one caller (the default), the callers of one
role, or everyone; the upstream credentials a request carries (Authorization, Cookie, X-API-Key)
are always part of it too, so one caller never receives an answer made for another. The proxy
consults the cache after authentication, authorisation and limits, so a cached answer needs the
same permission and draws from the same budgets as a fresh one.

The HTTP rules (RFC 9111), stricter where a shared cache should be:
- request `no-store`: the cache is not used; `no-cache`, `max-age=0` or `Pragma: no-cache`: go
  upstream and refresh the entry; `max-age=N`: only an entry at most N seconds old is served.
  Requests with a body or a Range pass by.
- stored: statuses 200, 203, 204, 301, 404, 410 without `no-store`, `no-cache`, `Set-Cookie` or
  `Vary: *`; `private` only under scope caller and for an authenticated caller. Lifetime:
  s-maxage, else max-age, else Expires (minus the upstream's Age), never more than `ttl`; `ttl`
  when the upstream says nothing.
- the response's `Vary` is honoured: the entry remembers the request's values of the headers it
  names and serves only requests with the same values.

Single flight: concurrent misses for one key in a worker wait for the first (the leader). When
its answer cannot be stored, or it fails, the others go upstream themselves: an error is never
handed to requests that did not make it. Only length-framed answers up to `max_entry` (or whole
ones already received with their head) are stored; streams pass through untouched.

The pure pieces (directives, lifetimes, the LRU with its clock passed in, the flights) are
tested without a network; the proxy calls `RouteCache` from one place.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime

import orjson

from bridgeway.config.models import CacheConfig, CacheMemoryConfig
from bridgeway.observability.logs import get_logger
from bridgeway.observability.metrics import ServiceMetrics
from bridgeway.security.access import Principal
from bridgeway.state import KV

NAMESPACE = "_cache"
STORABLE = frozenset({200, 203, 204, 301, 404, 410})
# The upstream's own credentials: always part of the key, whatever the scope.
CREDENTIALS = (b"authorization", b"cookie", b"x-api-key")
# Headers that belong to one request (set by the gateway or echoed by the upstream) or are
# recomputed on the way out: never stored.
PER_REQUEST = frozenset(
    {b"age", b"traceparent", b"tracestate", b"x-request-id", b"ratelimit", b"ratelimit-policy", b"x-cache"}
)
HIT = (b"x-cache", b"HIT")
MISS = (b"x-cache", b"MISS")
KV_TIMEOUT = 0.5  # seconds: a slow shared tier costs a miss, never a stuck request
KV_BACKOFF = 5.0  # seconds the shared tier is left alone after it failed: memory only meanwhile
_LOG_EVERY = 10.0
_FORMAT = b"\x01"  # first byte of a stored entry: the encoding's version
_ENTRY_OVERHEAD = 256  # bytes an entry costs in memory beyond its body and headers (objects, key)
_HEADER_OVERHEAD = 128

_DIRECTIVE = re.compile(r'([^\s=,]+)\s*(?:=\s*("[^"]*"|[^\s,]*))?')
log = get_logger("bridgeway.cache")


# -- HTTP rules ----------------------------------------------------------------------------------


def parse_cache_control(value: bytes | str | None) -> dict[str, str | None]:
    """The directives of a Cache-Control value: names lowercased, quotes removed, the first of a
    repeated directive kept."""
    out: dict[str, str | None] = {}
    if value:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for m in _DIRECTIVE.finditer(text):
            arg = m.group(2)
            if arg is not None and arg[:1] == '"':
                arg = arg[1:-1]
            out.setdefault(m.group(1).lower(), arg)
    return out


def delta_seconds(arg: str | None) -> int:
    """A max-age style argument; a missing or malformed one counts as 0 (stale), as RFC 9111 asks."""
    if arg is None or not (arg.isascii() and arg.isdigit()):
        return 0
    return min(int(arg), 2**31)


class Fresh:
    """Why and for how long an answer may be stored."""

    __slots__ = ("ttl", "age", "vary")

    def __init__(self, ttl: float, age: float, vary: tuple[bytes, ...]):
        self.ttl = ttl  # seconds it stays fresh from now
        self.age = age  # seconds old it already is (the upstream's Age)
        self.vary = vary  # request headers the upstream said its answer depends on


def lifetime(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    ttl: float,
    private_ok: bool,
    now: float,
) -> Fresh | None:
    """Whether an answer (lowercased header names) may be stored, and for how long; None if not."""
    if status not in STORABLE:
        return None
    cc: list[bytes] = []
    vary: list[bytes] = []
    expires = date = None
    age = 0
    for name, value in headers:
        if name == b"cache-control":
            cc.append(value)
        elif name == b"set-cookie":
            return None
        elif name == b"vary":
            vary += [v.strip().lower() for v in value.split(b",") if v.strip()]
        elif name == b"expires":
            expires = value
        elif name == b"date":
            date = value
        elif name == b"age":
            age = delta_seconds(value.decode("latin-1").strip())
    d = parse_cache_control(b", ".join(cc))
    if "no-store" in d or "no-cache" in d or ("private" in d and not private_ok) or b"*" in vary:
        return None
    if "s-maxage" in d:
        fresh: float | None = delta_seconds(d["s-maxage"])
    elif "max-age" in d:
        fresh = delta_seconds(d["max-age"])
    elif expires is not None:
        origin_now = _http_date(date) if date is not None else now
        fresh = _http_date(expires) - (origin_now if math.isfinite(origin_now) else now)
    else:
        fresh = None
    keep = ttl if fresh is None else min(fresh - age, ttl)
    if not keep > 0:
        return None
    return Fresh(keep, age, tuple(sorted(set(vary))))


def _http_date(value: bytes) -> float:
    """Seconds since the epoch; a malformed date (`Expires: 0`) is in the past, per RFC 9111."""
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return -math.inf


# -- entries ---------------------------------------------------------------------------------------


class Stored:
    """One stored answer. Times are wall-clock seconds, so replicas agree on its age."""

    __slots__ = ("status", "headers", "body", "stored_at", "expires_at", "vary", "size")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stored_at: float,
        expires_at: float,
        vary: tuple[tuple[bytes, bytes], ...] = (),
    ):
        self.status = status
        self.headers = headers
        self.body = body
        self.stored_at = stored_at  # when the upstream made it (its Age taken off)
        self.expires_at = expires_at
        self.vary = vary  # (header, request value) pairs it may be served for
        self.size = _ENTRY_OVERHEAD + len(body) + sum(_HEADER_OVERHEAD + len(n) + len(v) for n, v in headers)

    def serves(self, request: dict[bytes, bytes], max_age: int | None, now: float) -> bool:
        if max_age is not None and now - self.stored_at > max_age:
            return False
        return all(request.get(name, b"") == value for name, value in self.vary)

    def encode(self) -> bytes:
        meta = orjson.dumps(
            [
                self.status,
                self.stored_at,
                self.expires_at,
                [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.vary],
            ]
        )
        return b"".join((_FORMAT, len(meta).to_bytes(4, "big"), meta, self.body))

    @classmethod
    def decode(cls, data: bytes) -> Stored:
        """ValueError when `data` is not an entry this version wrote."""
        if data[:1] != _FORMAT or len(data) < 5:
            raise ValueError("not a cache entry of this format")
        end = 5 + int.from_bytes(data[1:5], "big")
        status, stored_at, expires_at, headers, vary = orjson.loads(data[5:end])
        return cls(
            status,
            [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
            data[end:],
            stored_at,
            expires_at,
            tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in vary),
        )


class LRU:
    """Entries by key, least recently used out first, bounded in count and in bytes; an entry past
    its expiry is never returned. Keys read `group/variant`: a whole group can be dropped at once."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.time):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._data: OrderedDict[str, Stored] = OrderedDict()
        self._groups: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> Stored | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self.clock():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: str, entry: Stored) -> bool:
        """Keep `entry`, evicting the least recently used as needed; False if it can never fit."""
        if key in self._data:
            self._remove(key)
        if entry.size > self.max_bytes:
            return False
        self._data[key] = entry
        self.bytes += entry.size
        self._groups.setdefault(key.rpartition("/")[0], set()).add(key)
        self.shrink()
        return True

    def shrink(self) -> None:
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            self._remove(next(iter(self._data)))

    def drop_group(self, group: str) -> int:
        keys = list(self._groups.get(group, ()))
        for key in keys:
            self._remove(key)
        return len(keys)

    def _remove(self, key: str) -> None:
        entry = self._data.pop(key)
        self.bytes -= entry.size
        group = key.rpartition("/")[0]
        keys = self._groups[group]
        keys.discard(key)
        if not keys:
            del self._groups[group]


# -- single flight -----------------------------------------------------------------------------------


class Flight:
    """A request's part in one key's flight: the leader fetches and settles it, followers wait."""

    __slots__ = ("leader", "_future", "_flights", "_key")

    def __init__(self, leader: bool, future: asyncio.Future | None, flights: dict | None, key: str):
        self.leader = leader
        self._future = future
        self._flights = flights
        self._key = key

    async def wait(self):
        """The leader's result (None: it had nothing to share). Shielded: a follower that gives up
        does not cancel the others' wait."""
        return await asyncio.shield(self._future)

    def settle(self, result) -> None:
        """Leader only, idempotent: wake the followers; later requests start a new flight."""
        if not self.leader:
            return
        if self._flights.get(self._key) is self._future:
            del self._flights[self._key]
        if not self._future.done():
            self._future.set_result(result)


NO_FLIGHT = Flight(False, None, None, "")


class Flights:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def join(self, key: str) -> Flight:
        """Follow the flight in progress for `key`, or lead a new one."""
        future = self._futures.get(key)
        if future is not None:
            return Flight(False, future, None, key)
        future = self._futures[key] = asyncio.get_running_loop().create_future()
        return Flight(True, future, self._futures, key)


# -- the worker's cache and each route's view of it ------------------------------------------------


class ResponseCache:
    """One worker's cache, shared by every cached route: the memory tier, the shared tier (the
    state backend) and the flights in progress."""

    def __init__(self, config: CacheMemoryConfig | None = None, clock: Callable[[], float] = time.time):
        config = config or CacheMemoryConfig()
        self.memory = LRU(config.max_entries, config.max_bytes, clock)
        self.kv: KV | None = None
        self.flights = Flights()
        self.clock = clock
        self._logged_at = -math.inf
        self._resume_at = -math.inf

    def configure(self, config: CacheMemoryConfig, kv: KV | None) -> None:
        """A (re)loaded config: new bounds apply at once, the entries that still fit stay."""
        self.memory.max_entries, self.memory.max_bytes = config.max_entries, config.max_bytes
        self.memory.shrink()
        self.kv = kv

    def shared_tier(self) -> KV | None:
        """The state backend, unless it failed moments ago: a dead Redis must not add its
        timeout to every miss."""
        return self.kv if time.monotonic() >= self._resume_at else None

    def unavailable(self, metrics: ServiceMetrics, exc: BaseException) -> None:
        metrics.cache_errors += 1
        now = time.monotonic()
        self._resume_at = now + KV_BACKOFF
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.error("cache_unavailable", service=metrics.name, error=type(exc).__name__)


class Lookup:
    """One request as the cache sees it."""

    __slots__ = ("key", "head", "refresh", "max_age", "headers", "private_ok")

    def __init__(
        self,
        key: str,
        head: bool,
        refresh: bool,
        max_age: int | None,
        headers: dict[bytes, bytes],
        private_ok: bool,
    ):
        self.key = key  # "{service}/{target digest}/{variant digest}"
        self.head = head  # answered from a GET entry; a miss goes upstream as HEAD and is not stored
        self.refresh = refresh  # the client asked for a fresh answer: skip reads, store the result
        self.max_age = max_age
        self.headers = headers  # the request's, for the response's Vary
        self.private_ok = private_ok


class RouteCache:
    """A service's cache config, compiled, over the worker's `ResponseCache`."""

    __slots__ = ("service", "config", "shared", "metrics", "methods", "path")

    def __init__(self, service: str, config: CacheConfig, shared: ResponseCache, metrics: ServiceMetrics):
        self.service = service
        self.config = config
        self.shared = shared
        self.metrics = metrics
        self.methods = frozenset(config.methods)
        self.path = re.compile(fnmatch.translate(config.path)).match if config.path else None

    # -- keys -----------------------------------------------------------------------------------

    def lookup(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
        caller: Principal | None,
    ) -> Lookup | None:
        """The request's key and wishes; None when the cache does not serve it."""
        if method not in self.methods or has_body:  # a body is not part of the key
            return None
        if self.path is not None and not self.path(target.partition(b"?")[0].decode("latin-1")):
            return None
        request: dict[bytes, bytes] = {}
        for name, value in headers:
            request[name] = request[name] + b", " + value if name in request else value
        if b"range" in request:
            return None
        cc = parse_cache_control(request.get(b"cache-control"))
        if "no-store" in cc:
            return None
        max_age = delta_seconds(cc["max-age"]) if "max-age" in cc else None
        refresh = "no-cache" in cc or max_age == 0
        if not cc and b"no-cache" in request.get(b"pragma", b"").lower():
            refresh = True
        parts: list[bytes | None] = [self._scope(caller).encode(), b"GET"]  # HEAD reads GET entries
        for name in self.config.vary:
            parts += (name.encode(), request.get(name.encode()))
        parts += [request.get(name) for name in CREDENTIALS]
        private_ok = self.config.scope == "caller" and caller is not None
        key = f"{self._group(target)}/{digest(*parts)}"
        return Lookup(key, method == "HEAD", refresh, max_age, request, private_ok)

    def _group(self, target: bytes) -> str:
        """Every entry of one target shares this key prefix, so a write can drop them all."""
        return f"{self.service}/{digest(target)}"

    def _scope(self, caller: Principal | None) -> str:
        return scope_key(self.config.scope, caller)

    # -- reads ------------------------------------------------------------------------------------

    async def find(self, look: Lookup) -> tuple[Stored | None, Flight]:
        """The entry to answer with; or None and this request's flight, to settle once the
        upstream's answer is known (a leader must; for the others it does nothing)."""
        entry = flight = None
        if not look.refresh:
            entry = self._recall(look)
            if entry is None and look.head:
                entry = await self._fetch(look)
            elif entry is None:
                flight = self.shared.flights.join(look.key)
                if flight.leader:
                    try:
                        entry = await self._fetch(look)
                    except BaseException:  # cancelled: the followers must not wait forever
                        flight.settle(None)
                        raise
                    if entry is not None:
                        flight.settle(entry)
                else:
                    entry = await flight.wait()
                    if entry is not None and not entry.serves(
                        look.headers, look.max_age, self.shared.clock()
                    ):
                        entry = None
                    flight = None  # a follower without an answer goes upstream on its own
        if entry is not None:
            self.metrics.cache_hits += 1
            return entry, NO_FLIGHT
        self.metrics.cache_misses += 1
        return None, flight or NO_FLIGHT

    def _recall(self, look: Lookup) -> Stored | None:
        entry = self.shared.memory.get(look.key)
        if entry is not None and entry.serves(look.headers, look.max_age, self.shared.clock()):
            return entry
        return None

    async def _fetch(self, look: Lookup) -> Stored | None:
        """The shared tier; what it has goes into memory too."""
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
            self.shared.unavailable(self.metrics, exc)
            return None
        now = self.shared.clock()
        if entry.expires_at <= now:
            return None
        self.shared.memory.put(look.key, entry)
        return entry if entry.serves(look.headers, look.max_age, now) else None

    # -- writes -----------------------------------------------------------------------------------

    def storable(
        self, status: int, headers: list[tuple[bytes, bytes]], complete: bool, look: Lookup
    ) -> Fresh | None:
        """Whether the upstream's answer (lowercased headers, hop-by-hop gone) is to be stored;
        an answer of unknown length is not, unless it arrived whole with its head."""
        if not complete:
            length = next((v for n, v in headers if n == b"content-length"), None)
            if length is None or not length.isdigit() or int(length) > self.config.max_entry:
                return None
        return lifetime(
            status, headers, ttl=self.config.ttl, private_ok=look.private_ok, now=self.shared.clock()
        )

    def keep(
        self,
        look: Lookup,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        fresh: Fresh,
        flight: Flight,
    ) -> Stored | None:
        """Store the answer in memory and hand it to the flight's followers (None: too large)."""
        entry = None
        if len(body) <= self.config.max_entry:
            now = self.shared.clock()
            entry = Stored(
                status,
                [item for item in headers if item[0] not in PER_REQUEST],
                body,
                now - fresh.age,
                now + fresh.ttl,
                tuple((name, look.headers.get(name, b"")) for name in fresh.vary),
            )
            self.shared.memory.put(look.key, entry)
            self.metrics.cache_stores += 1
        flight.settle(entry)
        return entry

    async def share(self, look: Lookup, entry: Stored) -> None:
        """Put a kept entry in the shared tier, so the other workers and replicas find it."""
        kv = self.shared.shared_tier()
        ttl = entry.expires_at - self.shared.clock()
        if kv is None or ttl <= 0:
            return
        try:
            async with asyncio.timeout(KV_TIMEOUT):
                await kv.put(NAMESPACE, look.key, entry.encode(), ttl=ttl)
        except Exception as exc:  # noqa: BLE001 - the answer is still served, only not shared
            self.shared.unavailable(self.metrics, exc)

    async def invalidate(self, target: bytes) -> None:
        """A write went through to `target` (RFC 9111 4.4): drop its entries, every scope and
        variant, here and in the shared tier. Other workers' memory keeps theirs until they expire."""
        group = self._group(target)
        self.shared.memory.drop_group(group)
        kv = self.shared.shared_tier()
        if kv is None:
            return
        try:
            async with asyncio.timeout(KV_TIMEOUT):
                while page := await kv.list(NAMESPACE, group + "/", limit=500):
                    for key, _ in page:
                        await kv.delete(NAMESPACE, key)
        except Exception as exc:  # noqa: BLE001 - entries left behind still expire with their ttl
            self.shared.unavailable(self.metrics, exc)

    # -- answers ----------------------------------------------------------------------------------

    def reply_headers(self, entry: Stored, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        age = max(0, int(self.shared.clock() - entry.stored_at))
        return [*entry.headers, *extra, (b"age", str(age).encode()), HIT]


def scope_key(scope: str, caller: Principal | None) -> str:
    """Who shares an entry made for `caller` under `scope` (caller, role or public)."""
    # Principal ids are "key:…", "client:…" or "jwt:…": none can be mistaken for these names.
    if scope == "public":
        return "public"
    if caller is None:
        return "anonymous"
    if scope == "caller":
        return caller.id
    services = ",".join(sorted(caller.services)) if caller.services is not None else "*"
    return f"role {caller.role} {services} {caller.client or ''}"


def digest(*parts: bytes | None) -> str:
    """A short hex digest of the parts, each length-prefixed (absent != empty)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update((0 if part is None else len(part) + 1).to_bytes(4, "big"))
        if part:
            h.update(part)
    return h.hexdigest()
