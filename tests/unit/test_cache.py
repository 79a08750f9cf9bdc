"""The response cache's pure parts (directives, lifetimes, keys, the LRU on an injected clock,
single flight) and its two tiers over an in-memory KV."""

from __future__ import annotations

import asyncio

import pytest

from bridgeway.config.models import CacheConfig, CacheMemoryConfig
from bridgeway.dataplane.cache import (
    LRU,
    NAMESPACE,
    NO_FLIGHT,
    Flights,
    ResponseCache,
    RouteCache,
    Stored,
    lifetime,
    parse_cache_control,
)
from bridgeway.observability.metrics import ServiceMetrics
from bridgeway.security.access import Principal
from bridgeway.state.memory import MemoryKV


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def stored(body: bytes = b"x", expires_at: float = float("inf"), stored_at: float = 0.0) -> Stored:
    return Stored(200, [(b"content-type", b"text/plain")], body, stored_at, expires_at)


# -- LRU ---------------------------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_beyond_max_entries():
    lru = LRU(max_entries=2, max_bytes=1 << 20)
    lru.put("g/a", stored())
    lru.put("g/b", stored())
    assert lru.get("g/a") is not None  # a is now the most recently used
    lru.put("g/c", stored())
    assert ("g/a" in lru, "g/b" in lru, "g/c" in lru) == (True, False, True)
    assert len(lru) == 2


def test_lru_holds_its_byte_bound_and_refuses_what_can_never_fit():
    one = stored(b"x" * 1000).size
    lru = LRU(max_entries=100, max_bytes=2 * one + 10)
    for key in ("g/a", "g/b", "g/c"):
        assert lru.put(key, stored(b"x" * 1000))
    assert len(lru) == 2 and "g/a" not in lru and lru.bytes == 2 * one
    assert not lru.put("g/huge", stored(b"x" * 10_000))
    assert len(lru) == 2 and lru.bytes == 2 * one
    lru.put("g/b", stored(b"y"))  # replacing an entry gives its bytes back
    assert lru.bytes == one + stored(b"y").size


def test_lru_never_returns_an_expired_entry():
    clock = Clock()
    lru = LRU(10, 1 << 20, clock)
    lru.put("g/a", stored(expires_at=clock.now + 5))
    clock.now += 4.9
    assert lru.get("g/a") is not None
    clock.now += 0.1
    assert lru.get("g/a") is None and len(lru) == 0 and lru.bytes == 0


def test_lru_drops_a_whole_group():
    lru = LRU(10, 1 << 20)
    for key in ("svc/p1/a", "svc/p1/b", "svc/p2/a"):
        lru.put(key, stored())
    assert lru.drop_group("svc/p1") == 2
    assert len(lru) == 1 and "svc/p2/a" in lru
    assert lru.drop_group("svc/p1") == 0


def test_entries_survive_encoding():
    entry = Stored(301, [(b"location", b"/b\xe9")], b"\x00body", 10.5, 70.5, ((b"accept", b"text/html"),))
    back = Stored.decode(entry.encode())
    assert (back.status, back.headers, back.body, back.stored_at, back.expires_at, back.vary) == (
        301,
        [(b"location", b"/b\xe9")],
        b"\x00body",
        10.5,
        70.5,
        ((b"accept", b"text/html"),),
    )
    with pytest.raises(ValueError):
        Stored.decode(b"something else")


# -- Cache-Control -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "directives"),
    [
        (b"", {}),
        (b"no-store", {"no-store": None}),
        (b"Max-Age=60, PRIVATE", {"max-age": "60", "private": None}),
        (b"max-age = 5 ,s-maxage=10", {"max-age": "5", "s-maxage": "10"}),
        (b'no-cache="set-cookie, x-a", public', {"no-cache": "set-cookie, x-a", "public": None}),
        (b"max-age=1, max-age=100", {"max-age": "1"}),  # the first wins
    ],
)
def test_cache_control_parsing(value, directives):
    assert parse_cache_control(value) == directives


NOW = 1_700_000_000.0


def fresh(status=200, *headers, ttl=60.0, private_ok=False):
    result = lifetime(status, list(headers), ttl=ttl, private_ok=private_ok, now=NOW)
    return None if result is None else (result.ttl, result.age)


@pytest.mark.parametrize(
    ("status", "headers", "private_ok", "expected"),
    [
        (200, [], False, (60.0, 0)),  # the upstream says nothing: ttl
        (404, [], False, (60.0, 0)),
        (500, [], False, None),
        (206, [], False, None),
        (302, [], False, None),
        (200, [(b"cache-control", b"max-age=10")], False, (10, 0)),
        (200, [(b"cache-control", b"max-age=3600")], False, (60.0, 0)),  # never longer than ttl
        (200, [(b"cache-control", b"max-age=10, s-maxage=20")], False, (20, 0)),  # a shared cache
        (200, [(b"cache-control", b"max-age=10"), (b"age", b"4")], False, (6, 4)),
        (200, [(b"cache-control", b"max-age=10"), (b"age", b"10")], False, None),
        (200, [(b"cache-control", b"max-age=0")], False, None),
        (200, [(b"cache-control", b"max-age=soon")], False, None),  # malformed: stale
        (200, [(b"cache-control", b"no-store")], False, None),
        (200, [(b"cache-control", b"no-cache")], False, None),
        (200, [(b"cache-control", b"private, max-age=30")], False, None),
        (200, [(b"cache-control", b"private, max-age=30")], True, (30, 0)),
        (200, [(b"set-cookie", b"session=1")], False, None),
        (200, [(b"vary", b"Accept, *")], False, None),
        (200, [(b"expires", b"0")], False, None),  # a malformed date is in the past
        (200, [(b"date", b"yesterday"), (b"expires", b"Tue, 14 Nov 2023 22:13:50 GMT")], False, (30, 0)),
        (
            200,
            [(b"date", b"Tue, 14 Nov 2023 22:13:20 GMT"), (b"expires", b"Tue, 14 Nov 2023 22:13:50 GMT")],
            False,
            (30, 0),
        ),
    ],
)
def test_what_is_stored_and_for_how_long(status, headers, private_ok, expected):
    assert fresh(status, *headers, private_ok=private_ok) == expected


def test_the_response_vary_names_are_kept():
    result = lifetime(200, [(b"vary", b"Accept-Encoding, accept")], ttl=60, private_ok=False, now=NOW)
    assert result.vary == (b"accept", b"accept-encoding")


# -- keys and request directives -----------------------------------------------------------------------


def route(**config) -> RouteCache:
    return RouteCache("svc", CacheConfig(**config), ResponseCache(), ServiceMetrics("svc-test"))


ALICE = Principal("key:alice", "reader", None)
BOB = Principal("key:bob", "reader", None)
NARROW = Principal("key:carol", "reader", frozenset({"svc"}))


def look(cache: RouteCache, headers=(), caller=None, method="GET", target=b"/a?x=1", has_body=False):
    return cache.lookup(method, target, list(headers), has_body, caller)


def group(lk) -> str:
    return lk.key.rpartition("/")[0]


def test_the_key_holds_target_vary_values_scope_and_upstream_credentials():
    cache = route(vary=["accept"])
    base = look(cache)
    assert look(cache).key == base.key
    assert look(cache, target=b"/a?x=2").key != base.key
    assert group(look(cache, target=b"/a?x=2")) != group(base)
    assert look(cache, [(b"accept", b"text/html")]).key != base.key
    assert group(look(cache, [(b"accept", b"text/html")])) == group(base)  # one target, one group
    assert look(cache, [(b"accept-language", b"fr")]).key == base.key  # not a vary header
    assert look(cache, [(b"authorization", b"Basic YTpi")]).key != base.key
    assert look(cache, [(b"cookie", b"s=1")]).key != base.key
    assert look(cache, method="HEAD").key == base.key  # HEAD reads GET entries


def test_scope_decides_who_shares_an_entry():
    caller = route(scope="caller")
    assert look(caller, caller=ALICE).key != look(caller, caller=BOB).key
    assert look(caller, caller=ALICE).key != look(caller).key  # anonymous callers share theirs
    assert look(caller).key == look(caller).key
    role = route(scope="role")
    assert look(role, caller=ALICE).key == look(role, caller=BOB).key
    assert look(role, caller=ALICE).key != look(role, caller=NARROW).key  # narrowed to other services
    assert look(role, caller=ALICE).key != look(role).key
    public = route(scope="public")
    assert look(public, caller=ALICE).key == look(public, caller=BOB).key == look(public).key
    # Only the caller's own entries may hold private answers, and only for a known caller.
    assert look(caller, caller=ALICE).private_ok and not look(caller).private_ok
    assert not look(role, caller=ALICE).private_ok and not look(public, caller=ALICE).private_ok


@pytest.mark.parametrize(
    ("headers", "kwargs", "expected"),
    [
        ([], {}, ("look", False, None)),
        ([(b"cache-control", b"no-store")], {}, None),
        ([(b"cache-control", b"no-cache")], {}, ("look", True, None)),
        ([(b"cache-control", b"max-age=0")], {}, ("look", True, 0)),
        ([(b"cache-control", b"max-age=30")], {}, ("look", False, 30)),
        ([(b"pragma", b"no-cache")], {}, ("look", True, None)),
        ([(b"pragma", b"no-cache"), (b"cache-control", b"max-age=5")], {}, ("look", False, 5)),
        ([(b"range", b"bytes=0-10")], {}, None),
        ([], {"has_body": True}, None),
        ([], {"method": "POST"}, None),
        ([], {"target": b"/other"}, None),
    ],
)
def test_request_directives(headers, kwargs, expected):
    result = look(route(path="/a*"), headers, **kwargs)
    assert (None if result is None else ("look", result.refresh, result.max_age)) == expected


def test_head_is_served_only_when_listed():
    assert look(route(methods=["GET"]), method="HEAD") is None
    assert look(route(), method="HEAD").head


def test_get_is_required():
    with pytest.raises(ValueError, match="must include GET"):
        CacheConfig(methods=["HEAD"])


# -- single flight -------------------------------------------------------------------------------------


async def test_concurrent_misses_make_one_load():
    flights = Flights()
    loads = 0

    async def load():
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        return f"answer {loads}"

    async def request():
        flight = flights.join("k")
        if not flight.leader:
            return await flight.wait() or await load()
        try:
            result = await load()
            flight.settle(result)
            return result
        finally:
            flight.settle(None)

    results = await asyncio.gather(*(request() for _ in range(20)))
    assert loads == 1 and set(results) == {"answer 1"} and len(flights) == 0


async def test_when_the_leader_fails_the_followers_load_themselves():
    flights = Flights()
    loads = 0

    async def load(fail: bool):
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        if fail:
            raise ConnectionError("upstream down")
        return "ok"

    async def request():
        flight = flights.join("k")
        if not flight.leader:
            return await flight.wait() or await load(False)
        try:
            return await load(True)
        finally:
            flight.settle(None)

    results = await asyncio.gather(*(request() for _ in range(5)), return_exceptions=True)
    assert loads == 5
    assert isinstance(results[0], ConnectionError) and results[1:] == ["ok"] * 4  # the error is not shared


async def test_a_follower_that_gives_up_does_not_cancel_the_others():
    flights = Flights()
    leader = flights.join("k")
    first, second = flights.join("k"), flights.join("k")
    t1 = asyncio.ensure_future(first.wait())
    t2 = asyncio.ensure_future(second.wait())
    await asyncio.sleep(0)
    t1.cancel()
    leader.settle("done")
    assert await t2 == "done"
    NO_FLIGHT.settle("ignored")  # settling a non-leader's flight does nothing


# -- the two tiers -------------------------------------------------------------------------------------


def worker(kv, clock) -> ResponseCache:
    shared = ResponseCache(CacheMemoryConfig(), clock)
    shared.configure(CacheMemoryConfig(), kv)
    return shared


async def fill(cache: RouteCache, lk, body=b"answer", headers=()):
    entry, flight = await cache.find(lk)
    assert entry is None
    headers = [(b"content-length", str(len(body)).encode()), *headers]
    fresh = cache.storable(200, headers, False, lk)
    entry = cache.keep(lk, 200, headers, body, fresh, flight)
    await cache.share(lk, entry)
    return entry


async def test_an_entry_filled_by_one_worker_serves_another_through_the_shared_tier():
    clock = Clock()
    kv = MemoryKV(clock)
    metrics = ServiceMetrics("svc-tiers")
    a = RouteCache("svc", CacheConfig(ttl=30), worker(kv, clock), metrics)
    b = RouteCache("svc", CacheConfig(ttl=30), worker(kv, clock), metrics)
    await fill(a, look(a))
    assert (await kv.get(NAMESPACE, look(a).key)).expires_at == clock.now + 30
    clock.now += 10
    entry, _ = await b.find(look(b))
    assert entry.body == b"answer" and b.reply_headers(entry, [])[-2:] == [
        (b"age", b"10"),
        (b"x-cache", b"HIT"),
    ]
    assert look(b).key in b.shared.memory  # now in b's memory too
    assert (metrics.cache_hits, metrics.cache_misses, metrics.cache_stores) == (1, 1, 1)
    clock.now += 20
    assert (await b.find(look(b)))[0] is None  # expired in both tiers


async def test_the_gateways_per_request_headers_are_not_stored():
    cache = route()
    headers = [(b"traceparent", b"00-abc"), (b"x-request-id", b"r1"), (b"age", b"0"), (b"etag", b'"v1"')]
    entry = await fill(cache, look(cache), headers=headers)
    assert [n for n, _ in entry.headers] == [b"content-length", b"etag"]


async def test_a_response_vary_is_matched_against_the_request():
    cache = route()
    gzip = [(b"accept-encoding", b"gzip")]
    await fill(cache, look(cache, gzip), headers=[(b"vary", b"Accept-Encoding")])
    assert (await cache.find(look(cache, gzip)))[0] is not None
    assert (await cache.find(look(cache)))[0] is None  # same key, other value: a miss


async def test_a_request_max_age_refuses_older_entries():
    clock = Clock()
    cache = RouteCache("svc", CacheConfig(), worker(None, clock), ServiceMetrics("svc-maxage"))
    await fill(cache, look(cache))
    clock.now += 20
    assert (await cache.find(look(cache, [(b"cache-control", b"max-age=30")])))[0] is not None
    assert (await cache.find(look(cache, [(b"cache-control", b"max-age=10")])))[0] is None


async def test_unbounded_or_large_answers_are_not_stored():
    cache = route(max_entry=10)
    lk = look(cache)
    assert cache.storable(200, [], False, lk) is None  # length unknown, still streaming
    assert cache.storable(200, [(b"content-length", b"11")], False, lk) is None
    assert cache.storable(200, [], True, lk) is not None  # arrived whole with its head
    assert cache.keep(lk, 200, [], b"x" * 11, cache.storable(200, [], True, lk), NO_FLIGHT) is None
    assert len(cache.shared.memory) == 0


async def test_a_write_drops_every_variant_of_its_target_in_both_tiers():
    clock = Clock()
    kv = MemoryKV(clock)
    cache = RouteCache("svc", CacheConfig(scope="caller"), worker(kv, clock), ServiceMetrics("svc-inv"))
    await fill(cache, look(cache, caller=ALICE))
    await fill(cache, look(cache, caller=BOB))
    await fill(cache, look(cache, target=b"/other"))
    await cache.invalidate(b"/a?x=1")
    assert (await cache.find(look(cache, caller=ALICE)))[0] is None
    assert [key.startswith("svc/") for key, _ in await kv.list(NAMESPACE)] == [True]
    assert len(cache.shared.memory) == 1


async def test_the_shared_tier_is_the_state_backend_unless_that_is_this_process(tmp_path):
    from bridgeway.config.loader import parse_config
    from bridgeway.dataplane.service import Registry
    from bridgeway.state.sqlite import SqliteKV

    config = parse_config("cache: {max_entries: 7}\nservices:\n  a: {cache: {}}\n  b: {}\n")
    registry = Registry()
    registry.state = MemoryKV()
    registry.apply(config)
    assert registry.cache.kv is None and registry.cache.memory.max_entries == 7
    assert registry.services["a"].cache.shared is registry.cache and registry.services["b"].cache is None
    registry.state = SqliteKV(tmp_path / "state.db")
    try:
        registry.apply(config)
        assert registry.cache.kv is registry.state
    finally:
        await registry.state.close()


class BrokenKV(MemoryKV):
    def __init__(self, hang: bool = False):
        super().__init__()
        self.hang = hang
        self.calls = 0

    async def get(self, namespace, key):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(5)  # the cache gives up after KV_TIMEOUT
        raise ConnectionError("down")

    async def put(self, namespace, key, value, **kwargs):
        self.calls += 1
        raise ConnectionError("down")


@pytest.mark.parametrize("hang", [False, True])
async def test_a_failing_shared_tier_is_a_miss_then_left_alone_for_a_while(monkeypatch, hang):
    monkeypatch.setattr("bridgeway.dataplane.cache.KV_TIMEOUT", 0.05)
    metrics = ServiceMetrics("svc-broken")
    kv = BrokenKV(hang)
    cache = RouteCache("svc", CacheConfig(), worker(kv, Clock()), metrics)
    entry = await fill(cache, look(cache))  # the read failed: a miss, and the write is not tried
    assert entry is not None and (metrics.cache_errors, kv.calls) == (1, 1)
    assert (await cache.find(look(cache)))[0] is entry  # memory still serves
    assert (await cache.find(look(cache, target=b"/b")))[0] is None and kv.calls == 1
    cache.shared._resume_at = 0.0  # as if the back-off had passed
    assert (await cache.find(look(cache, target=b"/c")))[0] is None and kv.calls == 2
