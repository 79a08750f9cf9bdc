"""API keys and roles on /bridge routes through a real gateway: 401 and 403 in the standard
shape, grants by service, method and path, a key narrowed to some services, keys consumed (never
forwarded), revocation within a second, and limits per key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import websockets

from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.procs import Proc
from tests.support.services import require_redis


@pytest.fixture(scope="module")
def gw(echo: Proc, tmp_path_factory) -> Iterator[GatewayProc]:
    config = {
        "state": f"sqlite:///{tmp_path_factory.mktemp('access') / 'state.db'}",
        "auth": {"required": True},
        "roles": {
            "analyst": {"allow": [{"service": "sim", "methods": ["GET", "POST"], "paths": ["/simulate*"]}]},
            "reader": {"allow": [{"service": "*", "methods": ["GET"]}]},
        },
        "clients": {"agi": {"role": "reader", "services": ["other", "sim"], "limits": [{"rate": "4/min"}]}},
        "services": {
            "sim": {"instances": [echo.url]},  # the echo stands in for the simulator
            "other": {"instances": [echo.url], "limits": [{"rate": "3/min", "per": "key"}]},
        },
    }
    proc = start_gateway(config)
    yield proc
    proc.stop()


def new_key(gw: GatewayProc, role: str, services: list[str] | None = None) -> dict:
    r = gw.api("POST", "/keys", {"name": f"{role}-key", "role": role, "services": services})
    assert r.status == 201, r
    return r.json()


def call(gw: GatewayProc, method: str, path: str, key: str | None = None, header: str = "Authorization"):
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    return gw.request(method, path, b"{}" if method == "POST" else None, headers)


def code(r) -> str:
    return r.json()["error"]["code"]


def test_no_key_or_a_bad_key_is_401_with_a_challenge(gw: GatewayProc):
    for key in (None, "bw_0000000000_nope", "not-a-bridgeway-key"):
        r = call(gw, "GET", "/bridge/sim/simulate", key)
        assert (r.status, code(r)) == (401, "UNAUTHENTICATED"), key
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_role_grants_service_method_and_path(gw: GatewayProc):
    key = new_key(gw, "analyst")["key"]
    ok = call(gw, "POST", "/bridge/sim/simulate?laps=50", key)
    assert ok.status == 200
    forwarded = dict(ok.json()["headers"])
    assert "authorization" not in forwarded  # the gateway consumed the key
    assert call(gw, "GET", "/bridge/sim/simulate", key, header="X-API-Key").status == 200
    for method, path in (
        ("DELETE", "/bridge/sim/simulate"),
        ("GET", "/bridge/sim/admin"),
        ("GET", "/bridge/other/x"),
    ):
        r = call(gw, method, path, key)
        assert (r.status, code(r)) == (403, "FORBIDDEN"), (method, path)


def test_a_key_narrowed_to_some_services(gw: GatewayProc):
    key = new_key(gw, "reader", services=["other"])["key"]
    assert call(gw, "GET", "/bridge/other/x", key).status == 200
    assert call(gw, "GET", "/bridge/sim/simulate", key).status == 403  # the role allows it, the key does not


def test_revocation_takes_effect_within_a_second(gw: GatewayProc):
    made = new_key(gw, "reader")
    assert call(gw, "GET", "/bridge/other/y", made["key"]).status == 200
    assert gw.api("POST", f"/keys/{made['id']}/revoke").status == 200
    t0 = time.monotonic()
    wait_until(
        lambda: call(gw, "GET", "/bridge/other/y", made["key"]).status == 401, timeout=3, what="refusal"
    )
    assert time.monotonic() - t0 < 1.5


def test_keys_issued_to_a_client_act_as_it_and_share_its_budget(gw: GatewayProc):
    made = gw.api("POST", "/keys", {"name": "agi-1", "client": "agi"})
    assert made.status == 201 and made.json()["role"] == "reader" and made.json()["client"] == "agi"
    first = made.json()["key"]
    second = gw.api("POST", "/keys", {"name": "agi-2", "client": "agi", "services": ["sim"]}).json()["key"]
    # The client's role: reading is allowed, writing is not.
    assert call(gw, "POST", "/bridge/sim/simulate", first).status == 403
    assert call(gw, "GET", "/bridge/sim/simulate", second).status == 200
    assert call(gw, "GET", "/bridge/other/z", second).status == 403  # the key narrows the client further
    # Both keys draw from the one client budget of 4 per minute (one spent above, 403s spend none).
    statuses = [call(gw, "GET", "/bridge/sim/a", k).status for k in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]
    r = call(gw, "GET", "/bridge/sim/a", first)
    assert "client 'agi'" in r.json()["error"]["message"] and "retry-after" in r.headers


def test_a_key_for_an_unknown_client_is_refused(gw: GatewayProc):
    r = gw.api("POST", "/keys", {"name": "x", "client": "nobody"})
    assert r.status == 404 and "nobody" in r.json()["error"]["message"]
    r = gw.api("POST", "/keys", {"name": "x"})
    assert r.status == 422 and "role" in r.json()["error"]["message"]


def test_limits_per_key(gw: GatewayProc):
    first, second = new_key(gw, "reader")["key"], new_key(gw, "reader")["key"]
    assert [call(gw, "GET", "/bridge/other/z", first).status for _ in range(4)] == [200, 200, 200, 429]
    assert call(gw, "GET", "/bridge/other/z", second).status == 200  # its own budget


def test_a_key_revoked_through_one_gateway_is_refused_by_another(echo: Proc):
    require_redis()
    config = {
        "state": "redis://127.0.0.1:6379/0",
        "auth": {"required": True},
        "services": {"echo": {"instances": [echo.url]}},
    }
    a, b = start_gateway(config), start_gateway(config)
    try:
        made = new_key(a, "admin")
        assert call(b, "GET", "/bridge/echo/x", made["key"]).status == 200  # created on a, accepted by b
        assert a.api("POST", f"/keys/{made['id']}/revoke").status == 200
        t0 = time.monotonic()
        wait_until(
            lambda: call(b, "GET", "/bridge/echo/x", made["key"]).status == 401, timeout=3, what="refusal"
        )
        assert time.monotonic() - t0 < 1.5
    finally:
        a.stop()
        b.stop()


async def test_websocket_upgrades_need_a_key_too(gw: GatewayProc):
    url = "ws" + gw.url[4:] + "/bridge/other/ws"
    for headers in ({}, {"Authorization": "Bearer bw_0000000000_nope"}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers=headers, open_timeout=5):
                pass
        assert refused.value.response.status_code == 403  # the server refuses a closed handshake so
    analyst = new_key(gw, "analyst")["key"]  # may call sim only
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {analyst}"}, open_timeout=5
        ):
            pass
    reader = new_key(gw, "reader")["key"]
    async with websockets.connect(url, additional_headers={"X-API-Key": reader}, open_timeout=5) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
