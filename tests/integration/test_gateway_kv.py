"""The KV store through a real gateway: versions, compare-and-set, TTL, listing, durability,
workers sharing the embedded SQLite state, and the Redis backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.services import require_redis


def _error_code(r) -> str:
    return r.json()["error"]["code"]


def kv(gw: GatewayProc, method: str, path: str, body: bytes | None = None, **headers: str):
    return gw.request(method, "/api/v1/kv/" + path, body, {**gw.admin_headers, **headers})


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProc]:
    roles = {
        "agent": {
            "kv": [{"namespace": "agent-*", "access": "write"}, {"namespace": "shared", "access": "read"}]
        },
        "nobody": {},
    }
    proc = start_gateway({"services": {}, "roles": roles})
    yield proc
    proc.stop()


def test_put_get_versions_and_etag(gw: GatewayProc):
    r = kv(gw, "PUT", "app/config/model", b"gpt-4o-mini")
    assert (r.status, r.headers["etag"]) == (201, '"1"')
    r = kv(gw, "PUT", "app/config/model", b"claude-haiku")
    assert (r.status, r.headers["etag"]) == (200, '"2"')
    r = kv(gw, "GET", "app/config/model")
    assert (r.status, r.body, r.headers["etag"]) == (200, b"claude-haiku", '"2"')
    r = kv(gw, "GET", "app/config/missing")
    assert (r.status, _error_code(r)) == (404, "NOT_FOUND")


def test_compare_and_set(gw: GatewayProc):
    assert kv(gw, "PUT", "cas/counter", b"0", **{"If-None-Match": "*"}).status == 201
    r = kv(gw, "PUT", "cas/counter", b"0", **{"If-None-Match": "*"})
    assert (r.status, _error_code(r)) == (412, "PRECONDITION_FAILED")  # create-only: it exists
    assert kv(gw, "PUT", "cas/counter", b"1", **{"If-Match": '"1"'}).status == 200
    r = kv(gw, "PUT", "cas/counter", b"2", **{"If-Match": '"1"'})  # a stale version loses
    assert (r.status, _error_code(r)) == (412, "PRECONDITION_FAILED")
    assert "version 2" in r.json()["error"]["message"]
    assert kv(gw, "GET", "cas/counter").body == b"1"
    r = kv(gw, "DELETE", "cas/counter", **{"If-Match": '"1"'})
    assert r.status == 412
    assert kv(gw, "DELETE", "cas/counter", **{"If-Match": '"2"'}).status == 204
    assert kv(gw, "DELETE", "cas/counter").status == 404
    r = kv(gw, "PUT", "cas/x", b"v", **{"If-Match": "latest"})
    assert (r.status, _error_code(r)) == (400, "BAD_REQUEST")


def test_ttl_expires_a_key(gw: GatewayProc):
    r = kv(gw, "PUT", "ttl/session?ttl=400ms", b"token-ish")
    assert r.status == 201 and 0 < float(r.headers["x-expires-in"]) <= 0.4
    assert kv(gw, "GET", "ttl/session").status == 200
    wait_until(lambda: kv(gw, "GET", "ttl/session").status == 404, timeout=3, what="expiry")
    for bad in ("2%20secs", "0s"):
        r = kv(gw, "PUT", f"ttl/bad?ttl={bad}", b"x")
        assert (r.status, _error_code(r)) == (400, "BAD_REQUEST")


def test_list_by_prefix_with_paging_and_namespaces_isolated(gw: GatewayProc):
    for i in range(5):
        kv(gw, "PUT", f"jobs/run:{i}", b"x" * i)
    kv(gw, "PUT", "jobs/other", b"y")
    kv(gw, "PUT", "jobs2/run:9", b"z")  # another namespace that shares a prefix
    page = kv(gw, "GET", "jobs?prefix=run:&limit=3").json()
    assert [k["key"] for k in page["keys"]] == ["run:0", "run:1", "run:2"] and page["next"] == "run:2"
    rest = kv(gw, "GET", f"jobs?prefix=run:&limit=3&after={page['next']}").json()
    assert [k["key"] for k in rest["keys"]] == ["run:3", "run:4"] and rest["next"] is None
    assert [k["size"] for k in rest["keys"]] == [3, 4]


def test_kv_requires_the_admin_token_and_valid_names(gw: GatewayProc):
    r = gw.request("GET", "/api/v1/kv/app/config/model")
    assert (r.status, _error_code(r)) == (401, "UNAUTHENTICATED")
    r = kv(gw, "PUT", "bad%20ns/key", b"x")
    assert (r.status, _error_code(r)) == (422, "VALIDATION_ERROR")


def test_values_survive_a_restart(tmp_path):
    config = {"services": {}, "state": f"sqlite:///{tmp_path / 'state.db'}"}
    first = start_gateway(config)
    try:
        assert kv(first, "PUT", "durable/k", b"kept").status == 201
    finally:
        first.kill()  # no clean shutdown: the write was committed when it was answered
    second = start_gateway(config)
    try:
        r = kv(second, "GET", "durable/k")
        assert (r.status, r.body, r.headers["etag"]) == (200, b"kept", '"1"')
    finally:
        second.stop()


def test_two_workers_share_the_embedded_state():
    gw = start_gateway({"services": {}}, workers=2)
    try:
        # Each call is a new connection, landing on either worker; every compare-and-set must
        # see the version the previous call wrote, whichever worker wrote it.
        assert kv(gw, "PUT", "shared/counter", b"0", **{"If-None-Match": "*"}).status == 201
        for i in range(1, 20):
            assert kv(gw, "PUT", "shared/counter", str(i).encode(), **{"If-Match": f'"{i}"'}).status == 200
        for _ in range(10):
            r = kv(gw, "GET", "shared/counter")
            assert (r.body, r.headers["etag"]) == (b"19", '"20"')
    finally:
        gw.stop()


def test_redis_backend_shared_by_two_gateways():
    require_redis()
    config = {"services": {}, "state": "redis://127.0.0.1:6379/0"}
    ns = f"test-{uuid.uuid4().hex[:8]}"
    a, b = start_gateway(config), start_gateway(config)
    try:
        assert kv(a, "PUT", f"{ns}/model", b"fast", **{"If-None-Match": "*"}).status == 201
        r = kv(b, "GET", f"{ns}/model")
        assert (r.status, r.body, r.headers["etag"]) == (200, b"fast", '"1"')
        assert kv(b, "PUT", f"{ns}/model", b"cheap", **{"If-Match": '"1"'}).status == 200
        assert kv(a, "PUT", f"{ns}/model", b"stale", **{"If-Match": '"1"'}).status == 412
        assert kv(a, "DELETE", f"{ns}/model").status == 204
    finally:
        a.stop()
        b.stop()


def test_roles_are_granted_namespaces(gw: GatewayProc):
    def as_key(role: str):
        made = gw.api("POST", "/keys", {"name": role, "role": role})
        assert made.status == 201
        return {"Authorization": f"Bearer {made.json()['key']}"}

    agent, nobody = as_key("agent"), as_key("nobody")
    assert kv(gw, "PUT", "shared/motd", b"hello").status == 201  # written by the admin
    call = lambda method, path, who, body=None: gw.request(method, "/api/v1/kv/" + path, body, who)  # noqa: E731
    assert call("PUT", "agent-7/memory", agent, b"state").status == 201
    assert call("GET", "agent-7/memory", agent).body == b"state"
    assert call("GET", "agent-7", agent).json()["keys"][0]["key"] == "memory"
    assert call("DELETE", "agent-7/memory", agent).status == 204
    assert call("GET", "shared/motd", agent).body == b"hello"
    for method, path, who in (
        ("PUT", "shared/motd", agent),  # read-only grant
        ("GET", "other/x", agent),  # no grant
        ("GET", "shared/motd", nobody),
        ("PUT", "agent-7/memory", nobody),
    ):
        r = call(method, path, who, b"x" if method == "PUT" else None)
        assert (r.status, _error_code(r)) == (403, "FORBIDDEN"), (method, path)
    assert gw.request("GET", "/api/v1/services", None, agent).status == 403  # not an admin
    r = gw.request("GET", "/api/v1/kv/shared/motd", None, {"Authorization": "Bearer bw_0000000000_x"})
    assert r.status == 401
