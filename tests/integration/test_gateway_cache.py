"""The response cache through real gateways: hits after a miss with X-Cache and Age, no-store
both ways, max-age expiry, single flight, large answers and streams passed through, writes that
evict, one caller never served another's answer, and an entry filled by one gateway served by
another on Redis. Upstream calls are counted by the echo service's /count."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import Proc
from tests.support.services import require_redis


@pytest.fixture(scope="module")
def gw(echo: Proc) -> Iterator[GatewayProc]:
    services = {
        "echo": {"instances": [echo.url], "cache": {}},
        "small": {"instances": [echo.url], "cache": {"max_entry": "1KB"}},
        "plain": {"instances": [echo.url]},
    }
    proc = start_gateway({"services": services})
    yield proc
    proc.stop()


def upstream_calls(echo: Proc, what: str) -> int:
    """How often the echo answered `what` ("GET /path")."""
    with urllib.request.urlopen(echo.url + "/count") as r:
        return json.load(r)["counts"].get(what, 0)


def test_a_miss_then_hits_with_x_cache_and_age(gw: GatewayProc, echo: Proc):
    first = gw.request("GET", "/bridge/echo/basic?q=1", headers={"X-Request-Id": "one"})
    assert first.status == 200 and first.headers["x-cache"] == "MISS" and "age" not in first.headers
    time.sleep(1.1)
    hit = gw.request("GET", "/bridge/echo/basic?q=1", headers={"X-Request-Id": "two"})
    assert hit.status == 200 and hit.headers["x-cache"] == "HIT" and int(hit.headers["age"]) >= 1
    assert hit.body == first.body and hit.headers["content-type"] == "application/json"
    # The gateway's own headers belong to this request, not to the one that filled the entry.
    assert hit.headers["x-request-id"] == "two"
    assert hit.headers["traceparent"].split("-")[1] != first.headers["traceparent"].split("-")[1]
    assert upstream_calls(echo, "GET /basic") == 1
    assert gw.request("GET", "/bridge/echo/basic?q=2").headers["x-cache"] == "MISS"  # the query is in the key
    head = gw.request("HEAD", "/bridge/echo/basic?q=1")
    assert (head.status, head.headers["x-cache"], head.body) == (200, "HIT", b"")
    assert head.headers["content-length"] == str(len(first.body))
    assert upstream_calls(echo, "GET /basic") == 2 and upstream_calls(echo, "HEAD /basic") == 0
    assert "x-cache" not in gw.request("GET", "/bridge/plain/basic").headers  # a route without a cache


def test_the_gateways_x_cache_replaces_the_upstreams(gw: GatewayProc):
    # The sample simulator reports its own cache in X-Cache; on a cached route the gateway's wins.
    for expected in ("MISS", "HIT"):
        r = gw.request("GET", "/bridge/echo/headers/own-cache?x-cache=HIT")
        assert [v for k, v in r.all if k == "x-cache"] == [expected]
    head = gw.request("HEAD", "/bridge/echo/headers/head-miss?x-cache=HIT")
    assert [v for k, v in head.all if k == "x-cache"] == ["MISS"]


def test_no_store_from_the_upstream_or_the_client(gw: GatewayProc, echo: Proc):
    for _ in range(2):
        r = gw.request("GET", "/bridge/echo/headers/nostore?cache-control=no-store")
        assert r.headers["x-cache"] == "MISS" and r.headers["cache-control"] == "no-store"
    assert upstream_calls(echo, "GET /headers/nostore") == 2
    # A client's no-store bypasses the cache: not read, not written.
    no_store = {"Cache-Control": "no-store"}
    assert "x-cache" not in gw.request("GET", "/bridge/echo/client-no-store", headers=no_store).headers
    assert gw.request("GET", "/bridge/echo/client-no-store").headers["x-cache"] == "MISS"
    assert "x-cache" not in gw.request("GET", "/bridge/echo/client-no-store", headers=no_store).headers
    assert gw.request("GET", "/bridge/echo/client-no-store").headers["x-cache"] == "HIT"
    assert upstream_calls(echo, "GET /client-no-store") == 3


def test_answers_that_must_not_be_shared_are_not_stored(gw: GatewayProc, echo: Proc):
    for query in ("cache-control=private", "cache-control=no-cache", "set-cookie=s%3D1"):
        for _ in range(2):
            assert gw.request("GET", f"/bridge/echo/headers/private?{query}").headers["x-cache"] == "MISS"
    assert upstream_calls(echo, "GET /headers/private") == 6
    for _ in range(2):
        assert gw.request("GET", "/bridge/echo/status/500").headers["x-cache"] == "MISS"
    assert upstream_calls(echo, "GET /status/500") == 2
    assert [gw.request("GET", "/bridge/echo/status/404").headers["x-cache"] for _ in range(2)] == [
        "MISS",
        "HIT",
    ]


def test_a_client_no_cache_refreshes_the_entry(gw: GatewayProc, echo: Proc):
    assert gw.request("GET", "/bridge/echo/refresh").headers["x-cache"] == "MISS"
    fresh = gw.request("GET", "/bridge/echo/refresh", headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS"
    again = gw.request("GET", "/bridge/echo/refresh")
    assert again.headers["x-cache"] == "HIT" and again.body == fresh.body  # the refreshed answer
    assert upstream_calls(echo, "GET /refresh") == 2


def test_an_upstream_max_age_is_respected(gw: GatewayProc, echo: Proc):
    path = "/bridge/echo/headers/maxage?cache-control=max-age%3D1"
    assert [gw.request("GET", path).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    time.sleep(1.2)
    assert gw.request("GET", path).headers["x-cache"] == "MISS"
    assert upstream_calls(echo, "GET /headers/maxage") == 2


def test_twenty_identical_misses_make_one_upstream_call(gw: GatewayProc, echo: Proc):
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: gw.request("GET", "/bridge/echo/delay/500"), range(20)))
    assert [r.status for r in answers] == [200] * 20
    assert sorted(r.headers["x-cache"] for r in answers) == ["HIT"] * 19 + ["MISS"]
    assert len({r.body for r in answers}) == 1
    assert upstream_calls(echo, "GET /delay/500") == 1


def test_large_answers_and_streams_pass_through_unstored(gw: GatewayProc, echo: Proc):
    for _ in range(2):
        r = gw.request("GET", "/bridge/small/bytes/2048")
        assert r.headers["x-cache"] == "MISS" and len(r.body) == 2048
    assert upstream_calls(echo, "GET /bytes/2048") == 2
    assert [gw.request("GET", "/bridge/small/bytes/512").headers["x-cache"] for _ in range(2)] == [
        "MISS",
        "HIT",
    ]
    for _ in range(2):  # chunked, of unknown length: streamed, never stored
        r = gw.request("GET", "/bridge/small/stream/3?interval_ms=100")
        assert r.headers["x-cache"] == "MISS" and r.body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert upstream_calls(echo, "GET /stream/3") == 2


def test_a_write_evicts_the_entries_of_its_path(gw: GatewayProc, echo: Proc):
    assert [gw.request("GET", "/bridge/echo/doc").headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert gw.request("PUT", "/bridge/echo/doc", b"{}").status == 200
    assert gw.request("GET", "/bridge/echo/doc").headers["x-cache"] == "MISS"
    assert upstream_calls(echo, "GET /doc") == 2


def test_metrics_count_hits_misses_and_stores(gw: GatewayProc):
    for _ in range(3):
        gw.request("GET", "/bridge/echo/counted")
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in gw.request("GET", "/metrics").body.decode().splitlines()
        if line.startswith("bridgeway_cache_")
    }
    assert metrics['bridgeway_cache_hits_total{service="echo"}'] >= 2
    assert metrics['bridgeway_cache_misses_total{service="echo"}'] >= 1
    assert metrics['bridgeway_cache_stores_total{service="echo"}'] >= 1
    assert metrics['bridgeway_cache_errors_total{service="echo"}'] == 0


def test_anonymous_callers_with_other_upstream_credentials_get_their_own_entries(gw: GatewayProc):
    def x_cache(auth: str) -> str:
        return gw.request("GET", "/bridge/echo/creds", headers={"Authorization": auth}).headers["x-cache"]

    assert [x_cache("Basic YTph"), x_cache("Basic YjpiCg"), x_cache("Basic YTph")] == ["MISS", "MISS", "HIT"]


# -- callers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(echo: Proc) -> Iterator[GatewayProc]:
    config = {
        "auth": {"required": True},
        "roles": {
            "reader": {"allow": [{"service": "*", "methods": ["GET", "HEAD"]}]},
            "writer": {"allow": [{"service": "mine", "methods": ["POST"]}]},
        },
        "services": {
            "mine": {"instances": [echo.url], "cache": {}},  # scope: caller
            "shared": {
                "instances": [echo.url],
                "cache": {"scope": "public"},
                "limits": [{"rate": "3/min", "per": "key"}],
            },
        },
    }
    proc = start_gateway(config)
    yield proc
    proc.stop()


def new_key(gw: GatewayProc, role: str) -> dict[str, str]:
    r = gw.api("POST", "/keys", {"name": f"{role}-key", "role": role})
    assert r.status == 201, r
    return {"Authorization": f"Bearer {r.json()['key']}"}


def test_one_caller_never_sees_another_callers_entry(secured: GatewayProc, echo: Proc):
    alice, bob = new_key(secured, "reader"), new_key(secured, "reader")
    assert [
        secured.request("GET", "/bridge/mine/own", headers=h).headers["x-cache"] for h in (alice, alice)
    ] == [
        "MISS",
        "HIT",
    ]
    assert secured.request("GET", "/bridge/mine/own", headers=bob).headers["x-cache"] == "MISS"
    assert secured.request("GET", "/bridge/mine/own").status == 401  # no key: nothing from the cache
    assert upstream_calls(echo, "GET /own") == 2


def test_a_public_entry_still_needs_permission_and_counts_against_limits(secured: GatewayProc, echo: Proc):
    alice, bob, writer = new_key(secured, "reader"), new_key(secured, "reader"), new_key(secured, "writer")
    assert secured.request("GET", "/bridge/shared/common", headers=alice).headers["x-cache"] == "MISS"
    assert secured.request("GET", "/bridge/shared/common", headers=writer).status == 403
    statuses = [secured.request("GET", "/bridge/shared/common", headers=bob) for _ in range(4)]
    assert [(r.status, r.headers.get("x-cache")) for r in statuses] == [(200, "HIT")] * 3 + [(429, None)]
    assert upstream_calls(echo, "GET /common") == 1


# -- scale-out -----------------------------------------------------------------------------------------


def test_an_entry_filled_by_one_gateway_serves_the_other(echo: Proc):
    require_redis()
    name = f"cache{uuid.uuid4().hex[:8]}"  # fresh keys in the shared Redis
    config = {"state": "redis://127.0.0.1:6379/0", "services": {name: {"instances": [echo.url], "cache": {}}}}
    a, b = start_gateway(config), start_gateway(config)
    try:
        first = a.request("GET", f"/bridge/{name}/scaled")
        assert first.headers["x-cache"] == "MISS"
        second = b.request("GET", f"/bridge/{name}/scaled")
        assert second.headers["x-cache"] == "HIT" and second.body == first.body
        assert upstream_calls(echo, "GET /scaled") == 1
    finally:
        a.stop()
        b.stop()


def test_the_workers_of_one_gateway_share_entries_through_sqlite(echo: Proc):
    gw = start_gateway({"services": {"echo": {"instances": [echo.url], "cache": {}}}}, workers=2)
    try:
        answers = [gw.request("GET", "/bridge/echo/workers").headers["x-cache"] for _ in range(12)]
        assert answers == ["MISS"] + ["HIT"] * 11  # whichever worker answers
        assert upstream_calls(echo, "GET /workers") == 1
    finally:
        gw.stop()


def test_an_unreachable_shared_tier_leaves_the_memory_tier_working(echo: Proc):
    config = {"state": "redis://127.0.0.1:1/0", "services": {"echo": {"instances": [echo.url], "cache": {}}}}
    gw = start_gateway(config)  # nothing listens on port 1
    try:
        answers = [gw.request("GET", "/bridge/echo/no-redis") for _ in range(3)]
        assert [(r.status, r.headers["x-cache"]) for r in answers] == [
            (200, "MISS"),
            (200, "HIT"),
            (200, "HIT"),
        ]
        assert (
            'bridgeway_cache_errors_total{service="echo"} 1.0' in gw.request("GET", "/metrics").body.decode()
        )
        assert any(line.get("event") == "cache_unavailable" for line in gw.log_lines())
    finally:
        gw.stop()
