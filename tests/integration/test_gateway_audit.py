"""The audit log through real gateways: key changes made with the API and the CLI, 401s and 403s
on /bridge and on the management API, reloads, registrations and KV writes all become records
queryable at GET /api/v1/audit (and with `bridgeway audit`); two workers write to one log; and
no secret appears in the records or the logs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.procs import Proc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _config(echo: Proc, state: str) -> dict:
    return {
        "state": state,
        "auth": {"required": True},
        "roles": {
            "analyst": {"allow": [{"service": "sim", "methods": ["GET", "POST"], "paths": ["/simulate*"]}]}
        },
        "services": {"sim": {"instances": [echo.url]}},
    }


@pytest.fixture(scope="module")
def config(echo: Proc, tmp_path_factory) -> dict:
    return _config(echo, f"sqlite:///{tmp_path_factory.mktemp('audit') / 'state.db'}")


@pytest.fixture(scope="module")
def gw(config: dict) -> Iterator[GatewayProc]:
    proc = start_gateway(config)
    yield proc
    proc.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def query(gw: GatewayProc, **params) -> dict:
    r = gw.api("GET", "/audit?" + urlencode({k: v for k, v in params.items() if v is not None}))
    assert r.status == 200, r
    return r.json()


def everything(gw: GatewayProc, **params) -> list[dict]:
    out, cursor = [], None
    while True:
        page = query(gw, cursor=cursor, **params)
        out += page["records"]
        cursor = page["next"]
        if cursor is None:
            return out


def find(gw: GatewayProc, event: str, **match) -> dict:
    """The newest `event` record whose fields (or details) match, once the writer has stored it."""

    def look():
        for record in query(gw, event=event, limit=1000)["records"]:
            if all(record.get(k, record["details"].get(k)) == v for k, v in match.items()):
                return record
        return None

    return wait_until(look, timeout=5, what=f"{event} record with {match}")


def new_key(gw: GatewayProc, role: str) -> dict:
    r = gw.api("POST", "/keys", {"name": f"{role}-key", "role": role})
    assert r.status == 201, r
    return r.json()


def cli(gw: GatewayProc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridgeway", *args, "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- key changes ----------------------------------------------------------------------------------


def test_key_changes_through_the_api_are_recorded(gw: GatewayProc):
    headers = {**gw.admin_headers, "Content-Type": "application/json", "traceparent": TRACEPARENT}
    r = gw.request("POST", "/api/v1/keys", json.dumps({"name": "ci", "role": "analyst"}).encode(), headers)
    made = r.json()
    created = find(gw, "key.created", key_id=made["id"])
    assert created["actor"] == "admin:token" and created["outcome"] == "success"
    assert created["trace_id"] == TRACE_ID and created["address"] == "127.0.0.1"
    assert (created["method"], created["path"], created["route"]) == ("POST", "/api/v1/keys", "/api/v1/keys")
    assert created["details"]["name"] == "ci" and created["details"]["role"] == "analyst"

    assert gw.api("POST", f"/keys/{made['id']}/rotate", {"grace": "5m"}).status == 200
    rotated = find(gw, "key.rotated", key_id=made["id"])
    assert rotated["details"]["grace"] == 300 and rotated["route"] == "/api/v1/keys/{key_id}/rotate"

    assert gw.api("POST", f"/keys/{made['id']}/revoke").status == 200
    assert find(gw, "key.revoked", key_id=made["id"])["outcome"] == "success"
    assert gw.api("POST", "/keys/0000000000/revoke").status == 404
    assert find(gw, "key.revoked", key_id="0000000000")["outcome"] == "failure"


def test_a_key_made_with_the_cli_is_recorded(gw: GatewayProc):
    made = cli(gw, "keys", "create", "--name", "from-cli", "--role", "admin")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()  # stdout holds the key and nothing else
    key_id = token.split("_")[1]
    record = find(gw, "key.created", key_id=key_id)
    assert record["actor"].startswith("cli:") and record["details"]["name"] == "from-cli"
    assert record["address"] is None and record["trace_id"] is None

    listed = cli(gw, "audit", "--event", "key.created", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout and "from-cli" in listed.stdout and token not in listed.stdout


# --- refusals -------------------------------------------------------------------------------------


def test_401s_on_bridge_are_recorded_with_the_credential_kind_only(gw: GatewayProc):
    headers = {"traceparent": TRACEPARENT}
    assert gw.request("GET", "/bridge/sim/simulate?laps=1", headers=headers).status == 401
    record = find(gw, "auth.failed", path="/bridge/sim/simulate", credential="none")
    assert record["actor"] is None and record["outcome"] == "failure"
    assert (record["service"], record["route"], record["method"]) == ("sim", "/bridge/sim", "GET")
    assert record["trace_id"] == TRACE_ID and record["address"] == "127.0.0.1"

    assert gw.request("POST", "/bridge/sim/run", headers=bearer("bw_0123456789_not-the-secret")).status == 401
    record = find(gw, "auth.failed", path="/bridge/sim/run")
    assert record["details"]["credential"] == "api_key" and record["details"]["key_id"] == "0123456789"
    assert "not-the-secret" not in json.dumps(record)


def test_403s_on_bridge_name_the_key_service_method_and_path(gw: GatewayProc):
    made = new_key(gw, "analyst")
    r = gw.request("DELETE", "/bridge/sim/simulate", headers=bearer(made["key"]))
    assert r.status == 403
    record = find(gw, "access.forbidden", actor=f"key:{made['id']}")
    assert (record["service"], record["method"], record["path"]) == ("sim", "DELETE", "/bridge/sim/simulate")
    assert "may not DELETE" in record["details"]["reason"]
    # An admitted request leaves no record.
    assert gw.request("GET", "/bridge/sim/simulate", headers=bearer(made["key"])).status == 200
    assert all(r["method"] != "GET" for r in everything(gw, actor=f"key:{made['id']}"))


def test_refusals_on_the_management_api_are_recorded(gw: GatewayProc):
    assert gw.request("GET", "/api/v1/services", headers=bearer("wrong-admin-token")).status == 401
    record = find(gw, "auth.failed", route="/api/v1/services", credential="bearer")
    assert record["actor"] is None and record["details"]["key_id"] is None
    assert gw.request("GET", "/api/v1/kv/app", headers={}).status == 401
    assert find(gw, "auth.failed", route="/api/v1/kv/{namespace}", credential="none")

    analyst = new_key(gw, "analyst")
    assert gw.request("GET", "/api/v1/audit", headers=bearer(analyst["key"])).status == 403
    record = find(gw, "access.forbidden", actor=f"key:{analyst['id']}", route="/api/v1/audit")
    assert record["details"]["role"] == "analyst" and record["service"] is None


# --- admin changes --------------------------------------------------------------------------------


def test_reloads_good_and_bad_are_recorded(gw: GatewayProc, config: dict):
    gw.rewrite(config)
    assert gw.api("POST", "/admin/reload").status == 200
    record = find(gw, "config.reloaded", actor="admin:token")
    assert record["details"]["services"] == ["sim"] and record["route"] == "/api/v1/admin/reload"

    gw.rewrite("services: {sim: {timeout: soon}}\n")
    assert gw.api("POST", "/admin/reload").status == 422
    record = find(gw, "config.rejected")
    assert record["outcome"] == "failure" and record["actor"] == "admin:token"
    assert any("timeout" in p for p in record["details"]["problems"])

    gw.rewrite(config)
    gw.sighup()
    find(gw, "config.reloaded", actor="signal:SIGHUP")


def test_registrations_and_kv_writes_are_recorded(gw: GatewayProc, echo: Proc):
    url = echo.url + "/second"
    assert gw.api("POST", "/services/sim/instances", {"url": url, "ttl": "60s"}).status == 201
    assert gw.api("POST", "/services/sim/instances", {"url": url, "ttl": "60s"}).status == 200  # renewal
    assert (
        gw.request("DELETE", f"/api/v1/services/sim/instances?url={url}", headers=gw.admin_headers).status
        == 204
    )
    assert find(gw, "service.instance_registered", url=url)["service"] == "sim"
    assert find(gw, "service.instance_deregistered", url=url)["actor"] == "admin:token"
    assert len(everything(gw, event="service.instance_registered")) == 1  # not one per renewal

    assert gw.request("PUT", "/api/v1/kv/app/model", b"value-not-kept", gw.admin_headers).status == 201
    assert gw.request("DELETE", "/api/v1/kv/app/model", headers=gw.admin_headers).status == 204
    put = find(gw, "kv.put", namespace="app", key="model")
    assert put["details"]["version"] == 1 and "value-not-kept" not in json.dumps(put)
    assert find(gw, "kv.deleted", namespace="app", key="model")


# --- the API --------------------------------------------------------------------------------------


def test_the_audit_api_pages_newest_first_and_checks_its_input(gw: GatewayProc):
    for i in range(7):
        gw.request("PUT", f"/api/v1/kv/paging/k{i}", b"x", gw.admin_headers)
    wait_until(lambda: len(everything(gw, event="kv.put")) >= 7, timeout=5)
    records = everything(gw, limit=3)
    assert len({r["id"] for r in records}) == len(records)
    assert [r["epoch"] for r in records] == sorted((r["epoch"] for r in records), reverse=True)
    newest = records[0]
    assert [r["id"] for r in everything(gw, since=newest["time"])][-1] == newest["id"]
    assert query(gw, until=str(records[-1]["epoch"] - 1))["records"] == []
    for params in ("since=someday", "cursor=nope", "event=Not%20An%20Event", "limit=0"):
        r = gw.api("GET", "/audit?" + params)
        assert r.status in (400, 422) and r.json()["error"]["code"] in ("BAD_REQUEST", "VALIDATION_ERROR")
    assert gw.request("GET", "/api/v1/audit").status == 401


def test_each_record_is_also_a_log_line(gw: GatewayProc):
    made = new_key(gw, "analyst")
    record = find(gw, "key.created", key_id=made["id"])
    lines = [e for e in gw.log_lines() if e.get("event") == "audit" and e.get("audit_id") == record["id"]]
    assert len(lines) == 1
    assert lines[0]["audit_event"] == "key.created" and lines[0]["actor"] == "admin:token"


def test_metrics_count_dropped_records(gw: GatewayProc):
    assert "bridgeway_audit_dropped_total 0.0" in gw.request("GET", "/metrics").body.decode()


# --- workers and secrets --------------------------------------------------------------------------


def test_two_workers_write_to_one_log(echo: Proc, tmp_path):
    gw = start_gateway(_config(echo, f"sqlite:///{tmp_path / 'state.db'}"), workers=2)
    try:
        workers = set(gw.worker_pids())
        assert len(workers) == 2
        gw.sighup()  # each worker reloads and records it
        wait_until(
            lambda: {r["details"]["pid"] for r in everything(gw, event="config.reloaded")} == workers,
            timeout=8,
            what="a config.reloaded record from each worker",
        )
        # Whichever worker answers, it reads the one log: refusals spread over both are all there.
        for i in range(30):
            gw.request("GET", f"/bridge/sim/n{i}", headers={"Connection": "close"})
        wait_until(lambda: len(everything(gw, event="auth.failed", limit=7)) == 30, timeout=8)
        writers = {r["id"].rpartition("-")[2] for r in everything(gw)}
        assert len(writers) == 2
    finally:
        gw.stop()


def test_no_secret_appears_in_the_audit_log_or_the_logs(gw: GatewayProc):
    admin = new_key(gw, "admin")
    analyst = new_key(gw, "analyst")
    rotated = gw.api("POST", f"/keys/{admin['id']}/rotate", {"grace": "1h"}).json()
    made = cli(gw, "keys", "create", "--name", "scan", "--role", "analyst").stdout.strip()
    tokens = [
        admin["key"],
        analyst["key"],
        rotated["key"],
        made,
        gw.token,
        f"bw_{analyst['id']}_forged-secret",
    ]
    for token in tokens:  # every kind of refusal, with every token
        gw.request("GET", "/bridge/sim/simulate", headers=bearer(token))
        gw.request("DELETE", "/bridge/sim/simulate", headers={"X-API-Key": token})
        gw.request("GET", "/api/v1/services", headers=bearer(token + "x"))
        gw.request("GET", "/api/v1/services", headers=bearer(token))
    gw.api("POST", f"/keys/{analyst['id']}/revoke")
    find(gw, "key.revoked", key_id=analyst["id"])
    wait_until(lambda: len(everything(gw, event="auth.failed", since="1m")) >= len(tokens) * 2, timeout=5)

    secrets = []
    for token in tokens:
        secret = token.split("_", 2)[2] if token.startswith("bw_") else token
        secrets += [token, secret, hashlib.sha256(secret.encode()).hexdigest()]
    audit = json.dumps(everything(gw, limit=1000))
    logs = gw.logs()
    assert '"event":"audit"' in logs
    for secret in secrets:
        assert secret not in audit, secret
        assert secret not in logs, secret
