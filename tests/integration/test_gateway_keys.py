"""API keys end to end: created with the CLI against a gateway's state, used on the management
API, revoked and rotated through the API, and never written to the logs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayProc, start_gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[GatewayProc]:
    state = tmp_path_factory.mktemp("keys") / "state.db"
    proc = start_gateway({"services": {}, "state": f"sqlite:///{state}"})
    yield proc
    proc.stop()


def cli(gw: GatewayProc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridgeway", "keys", *args, "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_cli_key_with_admin_role_opens_the_management_api(gw: GatewayProc):
    made = cli(gw, "create", "--name", "ops", "--role", "admin", "--expires", "90d")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("bw_") and "shown only once" in made.stderr
    assert gw.request("GET", "/api/v1/services", headers=bearer(token)).status == 200
    listed = cli(gw, "list")
    assert "ops" in listed.stdout and token.split("_", 2)[2] not in listed.stdout


def test_a_key_without_the_admin_role_is_forbidden(gw: GatewayProc):
    r = gw.api("POST", "/keys", {"name": "reader", "role": "analyst", "services": ["sim"]})
    assert r.status == 201 and r.json()["key"].startswith("bw_")
    r = gw.request("GET", "/api/v1/services", headers=bearer(r.json()["key"]))
    assert r.status == 403 and r.json()["error"]["code"] == "FORBIDDEN"


def test_revoked_and_wrong_keys_are_refused(gw: GatewayProc):
    made = gw.api("POST", "/keys", {"name": "temp", "role": "admin"}).json()
    token = made["key"]
    assert gw.request("GET", "/api/v1/keys", headers=bearer(token)).status == 200
    assert gw.api("POST", f"/keys/{made['id']}/revoke").json()["revoked_at"] is not None
    r = gw.request("GET", "/api/v1/keys", headers=bearer(token))
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert gw.request("GET", "/api/v1/keys", headers=bearer(token[:-2] + "xx")).status == 401
    assert gw.api("POST", "/keys/0000000000/revoke").status == 404


def test_rotation_keeps_the_old_secret_for_the_grace_period(gw: GatewayProc):
    made = gw.api("POST", "/keys", {"name": "svc", "role": "admin"}).json()
    rotated = gw.api("POST", f"/keys/{made['id']}/rotate", {"grace": "1h"}).json()
    assert rotated["key"] != made["key"] and rotated["id"] == made["id"]
    for token in (made["key"], rotated["key"]):
        assert gw.request("GET", "/api/v1/services", headers=bearer(token)).status == 200
    gone = gw.api("POST", f"/keys/{made['id']}/rotate", {"grace": "0s"}).json()  # drop the old one at once
    assert gw.request("GET", "/api/v1/services", headers=bearer(rotated["key"])).status == 401
    assert gw.request("GET", "/api/v1/services", headers=bearer(gone["key"])).status == 200


def test_no_key_or_hash_reaches_the_logs(gw: GatewayProc):
    made = gw.api("POST", "/keys", {"name": "audit", "role": "admin"}).json()
    gw.request("GET", "/api/v1/services", headers=bearer(made["key"]))
    listing = gw.api("GET", "/keys").json()["keys"]
    assert all("secret_sha256" not in k and "key" not in k for k in listing)
    logs = gw.logs()
    secret = made["key"].split("_", 2)[2]  # bw_<id>_<secret>; the secret itself may hold "_"
    assert made["key"] not in logs and secret not in logs
