"""Rate limits through a real gateway: GCRA budgets per service, per client address and per
path, the 429 answer with its headers, limits shared by two gateways on Redis, and what happens
when Redis cannot be reached (fail open or closed, counted)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import Proc
from tests.support.services import require_redis


def _statuses(gw: GatewayProc, path: str, n: int) -> list[int]:
    return [gw.request("GET", path).status for _ in range(n)]


def test_service_limit_answers_429_with_headers(echo: Proc):
    gw = start_gateway({"services": {"echo": {"instances": [echo.url], "limits": [{"rate": "5/min"}]}}})
    try:
        ok = gw.request("GET", "/bridge/echo/a")
        assert ok.status == 200
        assert ok.headers["ratelimit-policy"] == "5;w=60"
        assert ok.headers["ratelimit"].startswith("limit=5, remaining=4")
        assert _statuses(gw, "/bridge/echo/a", 4) == [200] * 4
        r = gw.request("GET", "/bridge/echo/a")
        assert r.status == 429 and r.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(r.headers["retry-after"]) <= 12  # one request per 12 s refills
        assert "remaining=0" in r.headers["ratelimit"]
    finally:
        gw.stop()


def test_path_limits_apply_only_to_matching_paths(echo: Proc):
    limits = [{"rate": "2/min", "path": "/expensive*", "per": "ip"}]
    gw = start_gateway({"services": {"echo": {"instances": [echo.url], "limits": limits}}})
    try:
        assert _statuses(gw, "/bridge/echo/expensive/run", 3) == [200, 200, 429]
        assert _statuses(gw, "/bridge/echo/cheap", 5) == [200] * 5
        assert "ratelimit" not in gw.request("GET", "/bridge/echo/cheap").headers
    finally:
        gw.stop()


def test_a_limit_of_n_holds_across_two_gateways_on_redis(echo: Proc):
    require_redis()
    name = f"lim{uuid.uuid4().hex[:8]}"  # a fresh budget key in the shared Redis
    config = {
        "state": "redis://127.0.0.1:6379/0",
        "services": {name: {"instances": [echo.url], "limits": [{"rate": "10/min"}]}},
    }
    a, b = start_gateway(config), start_gateway(config)
    try:
        statuses = []
        for _ in range(10):
            statuses += _statuses(a, f"/bridge/{name}/x", 1) + _statuses(b, f"/bridge/{name}/x", 1)
        assert statuses.count(200) == 10 and statuses.count(429) == 10
    finally:
        a.stop()
        b.stop()


def test_unreachable_redis_fails_open_or_closed_as_configured(echo: Proc):
    services = {
        "lenient": {"instances": [echo.url], "limits": [{"rate": "1/min", "on_unavailable": "open"}]},
        "strict": {"instances": [echo.url], "limits": [{"rate": "1/min", "on_unavailable": "closed"}]},
    }
    gw = start_gateway({"state": "redis://127.0.0.1:1/0", "services": services})  # nothing listens on port 1
    try:
        assert _statuses(gw, "/bridge/lenient/x", 3) == [200, 200, 200]
        r = gw.request("GET", "/bridge/strict/x")
        assert r.status == 429 and "unavailable" in r.json()["error"]["message"]
        metrics = gw.request("GET", "/metrics").body.decode()
        assert 'bridgeway_ratelimit_unavailable_total{service="lenient"} 3.0' in metrics
        assert 'bridgeway_ratelimit_unavailable_total{service="strict"} 1.0' in metrics
        assert any(line.get("event") == "rate_limiter_unavailable" for line in gw.log_lines())
    finally:
        gw.stop()


def _concurrent(gw: GatewayProc, path: str, n: int, headers: dict | None = None) -> list[int]:
    with ThreadPoolExecutor(n) as pool:
        return sorted(pool.map(lambda _: gw.request("GET", path, headers=headers).status, range(n)))


@pytest.mark.parametrize("state", ["memory://", "redis://127.0.0.1:6379/0"])
def test_concurrency_limit_admits_n_in_flight_and_frees_slots_when_they_end(echo: Proc, state: str):
    if state.startswith("redis"):
        require_redis()
    name = f"conc{uuid.uuid4().hex[:8]}"
    config = {"state": state, "services": {name: {"instances": [echo.url], "limits": [{"concurrency": 2}]}}}
    gw = start_gateway(config)
    try:
        # Five requests that each hold their slot for 400 ms: two pass, three are refused at once.
        assert _concurrent(gw, f"/bridge/{name}/delay/400", 5) == [200, 200, 429, 429, 429]
        r = gw.request("GET", f"/bridge/{name}/x")  # the slots came back when the responses ended
        assert r.status == 200 and "ratelimit" not in r.headers
        busy = _concurrent(gw, f"/bridge/{name}/delay/400", 3)[-1]
        assert busy == 429
    finally:
        gw.stop()


def test_a_refused_request_gives_back_the_slot_it_took(echo: Proc):
    # A concurrency slot is taken first, then the rate budget refuses: the slot must not leak.
    limits = [{"concurrency": 1}, {"rate": "1/min"}]
    gw = start_gateway({"services": {"echo": {"instances": [echo.url], "limits": limits}}})
    try:
        assert _statuses(gw, "/bridge/echo/x", 3) == [200, 429, 429]
        r = gw.request("GET", "/bridge/echo/x")
        assert "rate limit" in r.json()["error"]["message"]  # refused by the rate, not a leaked slot
    finally:
        gw.stop()
