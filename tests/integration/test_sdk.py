"""The Python SDK against a real gateway: the KV store as a service with a granted namespace uses
it, compare-and-set conflicts as exceptions, paging, and calls through /bridge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridgeway.sdk import BridgewayError, Client, VersionConflict
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.procs import Proc


@pytest.fixture(scope="module")
def gw(echo: Proc) -> Iterator[GatewayProc]:
    config = {
        "auth": {"required": True},
        "roles": {
            "agent": {"allow": [{"service": "echo"}], "kv": [{"namespace": "agent-*", "access": "write"}]}
        },
        "services": {"echo": {"instances": [echo.url]}},
    }
    proc = start_gateway(config)
    yield proc
    proc.stop()


@pytest.fixture
def agent_key(gw: GatewayProc) -> str:
    return gw.api("POST", "/keys", {"name": "sdk", "role": "agent"}).json()["key"]


async def test_kv_through_the_sdk(gw: GatewayProc, agent_key: str):
    async with Client(gw.url, agent_key) as bw:
        assert await bw.kv.get("agent-1", "memory") is None
        v1 = await bw.kv.put("agent-1", "memory", "first", if_version=0)
        with pytest.raises(VersionConflict) as lost:
            await bw.kv.put("agent-1", "memory", "again", if_version=0)
        assert lost.value.code == "PRECONDITION_FAILED"
        v2 = await bw.kv.put("agent-1", "memory", b"second", if_version=v1, ttl="1h")
        entry = await bw.kv.get("agent-1", "memory")
        assert (entry.value, entry.version, v2) == (b"second", 2, 2) and 3590 < entry.expires_in <= 3600
        for i in range(7):
            await bw.kv.put("agent-1", f"notes/{i}", str(i))
        assert [k async for k in bw.kv.keys("agent-1", "notes/", page=3)] == [f"notes/{i}" for i in range(7)]
        assert await bw.kv.delete("agent-1", "memory") and not await bw.kv.delete("agent-1", "memory")
        with pytest.raises(BridgewayError) as denied:
            await bw.kv.get("secrets", "x")
        assert (denied.value.status, denied.value.code) == (403, "FORBIDDEN")


async def test_calls_through_bridge(gw: GatewayProc, agent_key: str):
    async with Client(gw.url, agent_key) as bw:
        resp = await bw.call("echo", "POST", "/hello", json={"a": 1})
        assert resp.status == 200
    async with Client(gw.url, "bw_0000000000_wrong") as bw:
        with pytest.raises(BridgewayError) as refused:
            await bw.call("echo", "GET", "/hello")
        assert refused.value.code == "UNAUTHENTICATED" and refused.value.trace_id
    async with Client("http://127.0.0.1:1", agent_key) as bw:
        with pytest.raises(BridgewayError) as down:
            await bw.kv.get("agent-1", "x")
        assert down.value.code == "UNAVAILABLE"
