"""Operating a real `bridgeway serve`: health endpoints, metrics, access logs, OpenAPI, the
management API (auth, run-time registration), config reloads (also under load and with several
workers) and `bridgeway check`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import start_services
from tests.support.gateway import GatewayProc, raw_request, start_gateway, wait_until
from tests.support.procs import ROOT, Proc

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def echoes() -> Iterator[list[Proc]]:
    procs = start_services("echo", 3, prefix="ops")
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def gw(echoes: list[Proc]) -> Iterator[GatewayProc]:
    config = {
        "services": {
            "echo": {"instances": [echoes[0].url], "timeout": "5s"},
            "reg": {"instances": [echoes[0].url], "balancer": "round_robin", "registration_ttl": "30s"},
        },
    }
    proc = start_gateway(config)
    yield proc
    proc.stop()


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m is not None, f"not a Prometheus sample: {line!r}"
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric(gw: GatewayProc, name: str, **labels: str) -> float | None:
    """The value of one sample (labels must match exactly the ones given, any order)."""
    r = gw.request("GET", "/metrics")
    assert r.status == 200, r
    for sample, sample_labels, value in metric_samples(r.body.decode()):
        if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


def assert_error(r, status: int, code: str) -> dict:
    assert r.status == status, r
    err = r.json()["error"]
    assert set(err) == {"code", "message", "trace_id", "timestamp"}
    assert err["code"] == code and err["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", err["trace_id"])
    return err


# -- health endpoints ---------------------------------------------------------------------------


def test_liveness_and_readiness(gw: GatewayProc):
    r = gw.request("GET", "/health/live")
    assert (r.status, r.json()) == (200, {"status": "alive"})
    r = gw.request("GET", "/health/ready")
    assert (r.status, r.json()) == (200, {"status": "ready"})


def test_health_reports_services(gw: GatewayProc):
    r = gw.request("GET", "/health")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    h = r.json()
    assert h["status"] == "ok"
    assert isinstance(h["version"], str) and h["version"]
    assert h["uptime_s"] >= 0
    assert h["checks"]["services"]["echo"] == {"instances": 1, "available": 1, "breaker": "closed"}
    assert set(h["checks"]["services"]) == {"echo", "reg"}


# -- metrics and logs ---------------------------------------------------------------------------


def test_metrics_count_requests_and_expose_every_family(gw: GatewayProc):
    before = metric(gw, "bridgeway_requests_total", service="echo", status="200") or 0
    for _ in range(3):
        assert gw.request("GET", "/bridge/echo/m").status == 200
    assert gw.request("GET", "/bridge/echo/status/404").status == 404
    assert gw.request("GET", "/bridge/nope/x").status == 404

    r = gw.request("GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.body.decode())
    names = {name for name, _, _ in samples}

    def value(name: str, **labels: str) -> float | None:
        for sample, sample_labels, v in samples:
            if sample == name and sample_labels == labels:
                return v
        return None

    assert value("bridgeway_requests_total", service="echo", status="200") == before + 3
    assert value("bridgeway_requests_total", service="echo", status="404") >= 1
    assert value("bridgeway_requests_total", service="-", status="404") >= 1  # no path in labels
    assert all("nope" not in labels.values() for _, labels, _ in samples)
    for family in (
        "bridgeway_request_duration_seconds_bucket",
        "bridgeway_request_duration_seconds_count",
        "bridgeway_upstream_duration_seconds_bucket",
        "bridgeway_upstream_duration_seconds_sum",
        "bridgeway_requests_in_flight",
        "bridgeway_retries_total",
        "bridgeway_breaker_state",
        "bridgeway_instance_healthy",
    ):
        assert family in names, family
    assert value("bridgeway_request_duration_seconds_bucket", service="echo", le="+Inf") >= before + 4
    assert value("bridgeway_requests_in_flight", service="echo") == 0
    assert value("bridgeway_breaker_state", service="echo") == 0
    assert (
        value(
            "bridgeway_instance_healthy", service="echo", instance=gw.service("echo")["instances"][0]["url"]
        )
        == 1
    )


def test_access_log_lines_are_json_with_the_trace_id(gw: GatewayProc):
    r = gw.request("POST", "/bridge/echo/logged", b"{}", {"X-Request-Id": "log-1"})
    assert r.status == 200
    trace_id = TRACEPARENT.match(r.headers["traceparent"]).group(1)

    def line():
        return next((e for e in gw.log_lines() if e.get("trace_id") == trace_id), None)

    entry = wait_until(line, timeout=5, what="the access log line")
    assert entry["event"] == "request"
    assert entry["service"] == "echo" and entry["method"] == "POST" and entry["status"] == 200
    assert entry["route"] == "/bridge/echo"
    assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] >= 0
    assert entry["level"] == "info" and "timestamp" in entry
    # Every stdout line the gateway writes is JSON.
    for text in gw.logs().splitlines():
        if text.strip():
            assert text.lstrip().startswith("{"), text
            json.loads(text)


def test_docs_and_openapi(gw: GatewayProc):
    r = gw.request("GET", "/docs")
    assert r.status == 200 and b"<html" in r.body.lower()
    r = gw.request("GET", "/openapi.json")
    assert r.status == 200
    paths = r.json()["paths"]
    assert "/api/v1/services" in paths
    assert "/api/v1/services/{name}/instances" in paths
    assert "/api/v1/admin/reload" in paths


# -- management API: auth and errors ------------------------------------------------------------


def test_management_api_requires_the_token(gw: GatewayProc):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {gw.token}"}):
        r = gw.request("GET", "/api/v1/services", headers=headers)
        assert_error(r, 401, "UNAUTHENTICATED")
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = gw.request("POST", "/api/v1/admin/reload")
    assert_error(r, 401, "UNAUTHENTICATED")
    r = gw.api("GET", "/services")
    assert r.status == 200
    assert {s["name"] for s in r.json()["services"]} == {"echo", "reg"}
    # The token never shows up in logs.
    assert gw.token not in gw.logs()


def test_management_api_errors_in_the_standard_shape(gw: GatewayProc):
    err = assert_error(gw.api("GET", "/services/nope"), 404, "UNKNOWN_SERVICE")
    assert "nope" in err["message"]
    assert_error(
        gw.api("POST", "/services/nope/instances", {"url": "http://127.0.0.1:1"}), 404, "UNKNOWN_SERVICE"
    )
    assert_error(gw.api("GET", "/no/such/route"), 404, "NOT_FOUND")
    assert_error(gw.api("PUT", "/services"), 405, "METHOD_NOT_ALLOWED")
    err = assert_error(gw.api("POST", "/services/reg/instances", {"url": "ftp://x"}), 422, "VALIDATION_ERROR")
    assert "url" in err["message"]
    err = assert_error(
        gw.api("POST", "/services/reg/instances", {"url": "http://127.0.0.1:1", "ttl": "soon"}),
        422,
        "VALIDATION_ERROR",
    )
    assert "ttl" in err["message"]
    assert_error(gw.api("DELETE", "/services/reg/instances?url=http://127.0.0.1:1"), 404, "NOT_FOUND")


def test_management_api_errors_carry_the_trace(gw: GatewayProc):
    # docs/errors.md: trace_id is the request's W3C trace id, also in the traceparent response header.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    for r in (
        gw.request("GET", "/api/v1/services/nope", headers={**gw.admin_headers, **incoming}),
        gw.request("GET", "/api/v1/services", headers=incoming),
    ):
        assert r.json()["error"]["trace_id"] == trace_id
        m = TRACEPARENT.match(r.headers.get("traceparent", ""))
        assert m is not None and m.group(1) == trace_id, r.headers


def test_validation_error_names_what_is_missing(gw: GatewayProc):
    r = gw.request("POST", "/api/v1/services/reg/instances", headers=gw.admin_headers)
    err = assert_error(r, 422, "VALIDATION_ERROR")
    assert not err["message"].startswith(":"), err["message"]
    assert "body" in err["message"].lower(), err["message"]
    err = assert_error(gw.api("POST", "/services/reg/instances", {"ttl": "5s"}), 422, "VALIDATION_ERROR")
    assert "url" in err["message"]


def test_malformed_json_and_huge_bodies_get_clear_errors(gw: GatewayProc):
    headers = {**gw.admin_headers, "content-type": "application/json"}
    r = gw.request("POST", "/api/v1/services/reg/instances", body=b'{"url": ', headers=headers)
    assert "body: not valid JSON" in assert_error(r, 422, "VALIDATION_ERROR")["message"]
    # A 1 GB body is refused from its Content-Length, before any of it is read.
    head = (
        b"POST /api/v1/services/reg/instances HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    raw = raw_request(gw.port, head + b"x" * 65536, timeout=3)
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
    assert b'"BODY_TOO_LARGE"' in raw
    assert gw.api("GET", "/services").status == 200


# -- run-time registration ----------------------------------------------------------------------


def _instances(gw: GatewayProc, service: str) -> dict[str, dict]:
    return {i["url"]: i for i in gw.service(service)["instances"]}


def _spread(gw: GatewayProc, service: str, n: int) -> collections.Counter:
    seen = collections.Counter()
    for _ in range(n):
        r = gw.request("GET", f"/bridge/{service}/x")
        assert r.status == 200, r
        seen[r.headers["x-instance"]] += 1
    return seen


def test_register_heartbeat_deregister(gw: GatewayProc, echoes: list[Proc]):
    first, second = echoes[0], echoes[1]
    r = gw.api("POST", "/services/reg/instances", {"url": second.url, "ttl": "30s"})
    assert r.status == 201, r
    body = r.json()
    assert body["url"] == second.url and body["source"] == "registered"
    assert 25 < body["expires_in"] <= 30
    assert set(_spread(gw, "reg", 10)) == {first.name, second.name}

    # A heartbeat renews the lease (and does not add a second instance).
    r = gw.api("POST", "/services/reg/instances", {"url": second.url + "/", "ttl": "60s"})
    assert r.status == 200, r
    insts = _instances(gw, "reg")
    assert len(insts) == 2 and 55 < insts[second.url]["expires_in"] <= 60
    assert insts[first.url]["source"] == "config" and insts[first.url]["expires_in"] is None

    r = gw.api("DELETE", f"/services/reg/instances?url={second.url}")
    assert r.status == 204
    assert set(_instances(gw, "reg")) == {first.url}
    assert _spread(gw, "reg", 6) == {first.name: 6}
    # Config instances cannot be deregistered.
    assert_error(gw.api("DELETE", f"/services/reg/instances?url={first.url}"), 404, "NOT_FOUND")


def test_registration_expires_after_its_ttl(gw: GatewayProc, echoes: list[Proc]):
    third = echoes[2]
    t0 = time.monotonic()
    r = gw.api("POST", "/services/reg/instances", {"url": third.url, "ttl": "1s"})
    assert r.status == 201
    assert third.url in _instances(gw, "reg")
    wait_until(lambda: third.url not in _instances(gw, "reg"), timeout=3, what="lease expiry")
    assert time.monotonic() - t0 <= 2.0 + 0.3  # ttl + 1 s, and a little for the poll
    assert time.monotonic() - t0 >= 0.9
    wait_until(
        lambda: any(
            e.get("event") == "instance_expired" and e.get("instance") == third.url for e in gw.log_lines()
        ),
        timeout=3,
        what="instance_expired log line",
    )
    assert all(r != third.name for r in _spread(gw, "reg", 6))


# -- reload -------------------------------------------------------------------------------------


def _config(echo: Proc, **extra_services: dict) -> dict:
    return {"services": {"echo": {"instances": [echo.url], "timeout": "5s"}, **extra_services}}


def test_sighup_reload_adds_a_service_and_keeps_registrations(gateway_factory, echoes: list[Proc]):
    echo = echoes[0]
    gw = gateway_factory(_config(echo))
    assert gw.request("GET", "/bridge/added/x").status == 404
    assert gw.api("POST", "/services/echo/instances", {"url": echoes[1].url, "ttl": "60s"}).status == 201

    gw.rewrite(_config(echo, added={"instances": [echoes[2].url]}))
    gw.sighup()
    wait_until(lambda: gw.request("GET", "/bridge/added/x").status == 200, timeout=5, what="the new service")
    assert gw.request("GET", "/bridge/added/x").headers["x-instance"] == echoes[2].name
    assert echoes[1].url in _instances(gw, "echo")  # a self-registered instance survives a reload
    wait_until(lambda: metric(gw, "bridgeway_config_reloads_total", result="ok") == 1, timeout=3)
    assert any(e.get("event") == "config_reloaded" for e in gw.log_lines())

    # Through the API too; a removed service is gone.
    gw.rewrite(_config(echo))
    r = gw.api("POST", "/admin/reload")
    assert r.status == 200 and r.json()["services"] == ["echo"]
    assert gw.request("GET", "/bridge/added/x").status == 404


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"timeout": "2 secs"}, "services.echo.timeout"),
        ({"bogus": 1}, "services.echo.bogus"),
    ],
)
def test_invalid_config_is_rejected_and_the_old_one_serves(gateway_factory, echoes: list[Proc], bad, field):
    echo = echoes[0]
    gw = gateway_factory(_config(echo))
    config = _config(echo)
    config["services"]["echo"] |= bad
    config["services"]["other"] = {"instances": [echo.url]}
    gw.rewrite(config)

    r = gw.api("POST", "/admin/reload")
    err = assert_error(r, 422, "INVALID_CONFIG")
    assert field in err["message"]
    assert gw.request("GET", "/bridge/echo/still").status == 200
    assert gw.request("GET", "/bridge/other/x").status == 404

    gw.sighup()
    wait_until(
        lambda: sum(e.get("event") == "config_rejected" for e in gw.log_lines()) >= 2,
        timeout=5,
        what="config_rejected",
    )
    assert gw.alive
    assert gw.request("GET", "/bridge/echo/still").status == 200
    assert metric(gw, "bridgeway_config_reloads_total", result="rejected") == 2


def test_unparseable_yaml_is_rejected(gateway_factory, echoes: list[Proc]):
    gw = gateway_factory(_config(echoes[0]))
    gw.rewrite("services: [unclosed\n")
    assert_error(gw.api("POST", "/admin/reload"), 422, "INVALID_CONFIG")
    assert gw.request("GET", "/bridge/echo/x").status == 200


async def test_reload_under_load_drops_nothing(gateway_factory, echoes: list[Proc]):
    a, b = echoes[0], echoes[1]
    config_a = {"services": {"echo": {"instances": [a.url, b.url], "timeout": "5s"}}}
    config_b = {
        "services": {
            "echo": {
                "instances": [b.url, a.url],
                "timeout": "4s",
                "balancer": "round_robin",
                "pool": {"max_idle": 16},  # new pools on every swap
                "retries": {"attempts": 3},
            },
            "other": {"instances": [a.url]},
        }
    }
    gw = gateway_factory(config_a)
    results: collections.Counter = collections.Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with aiohttp.ClientSession() as http:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    async with http.get(
                        f"{gw.url}/bridge/echo/load/{i}/{n}", timeout=aiohttp.ClientTimeout(total=10)
                    ) as r:
                        await r.read()
                        results[r.status] += 1
                        if r.status != 200:
                            failures.append(f"{r.status} {await r.text()}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(repr(exc))

    clients = [asyncio.create_task(client(i)) for i in range(20)]
    try:
        for k in range(5):
            await asyncio.sleep(0.9)
            await asyncio.to_thread(gw.rewrite, config_b if k % 2 == 0 else config_a)
            if k % 2:
                r = await asyncio.to_thread(gw.api, "POST", "/admin/reload")
                assert r.status == 200, r
            else:
                gw.sighup()
        await asyncio.sleep(0.9)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 15)
    assert not failures, failures[:5]
    assert results[200] > 200
    assert metric(gw, "bridgeway_config_reloads_total", result="ok") == 5
    assert metric(gw, "bridgeway_config_reloads_total", result="rejected") in (None, 0)


async def test_streams_in_flight_survive_reloads(gateway_factory, echoes: list[Proc]):
    echo = echoes[0]
    gw = gateway_factory(_config(echo))
    lines: list[bytes] = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/bridge/echo/stream/10?interval_ms=150") as r,
    ):
        assert r.status == 200
        lines.append(await r.content.readline())
        # New pools for the service, then the service removed altogether.
        changed = _config(echo)
        changed["services"]["echo"]["pool"] = {"max_idle": 4}
        await asyncio.to_thread(gw.rewrite, changed)
        gw.sighup()
        await asyncio.to_thread(gw.rewrite, {"services": {"other": {"instances": [echo.url]}}})
        reloaded = await asyncio.to_thread(gw.api, "POST", "/admin/reload")
        assert reloaded.status == 200
        async with asyncio.timeout(10):
            while line := await r.content.readline():
                lines.append(line)
    assert lines == [b"chunk %d\n" % i for i in range(10)]
    assert gw.request("GET", "/bridge/echo/x").status == 404


def _fresh_get(gw: GatewayProc, path: str) -> int:
    # A new connection each time, so the kernel spreads them over the workers.
    return gw.request("GET", path, headers={"Connection": "close"}).status


def test_reload_reaches_every_worker(gateway_factory, echoes: list[Proc]):
    echo = echoes[0]
    gw = gateway_factory(_config(echo), workers=2)
    assert len(gw.worker_pids()) == 2
    gw.rewrite(_config(echo, added={"instances": [echo.url]}))
    gw.sighup()

    def all_workers_reloaded() -> bool:
        return all(_fresh_get(gw, "/bridge/added/x") == 200 for _ in range(40))

    wait_until(all_workers_reloaded, timeout=8, interval=0.2, what="every worker serving the new service")

    # The API reload (answered by one worker) reaches the other one too.
    gw.rewrite(_config(echo, second={"instances": [echo.url]}))
    r = gw.api("POST", "/admin/reload")
    assert r.status == 200
    wait_until(
        lambda: all(
            _fresh_get(gw, "/bridge/second/x") == 200 and _fresh_get(gw, "/bridge/added/x") == 404
            for _ in range(20)
        ),
        timeout=8,
        interval=0.2,
        what="every worker on the API-reloaded config",
    )
    assert gw.alive and len(gw.worker_pids()) == 2


def test_registration_reaches_every_worker(gateway_factory, echoes: list[Proc]):
    gw = gateway_factory(_config(echoes[0]), workers=2)
    r = gw.api("POST", "/services/echo/instances", {"url": echoes[1].url, "ttl": "60s"})
    assert r.status == 201

    def everywhere() -> bool:
        for _ in range(20):
            r = gw.request(
                "GET", "/api/v1/services/echo", headers={**gw.admin_headers, "Connection": "close"}
            )
            if echoes[1].url not in {i["url"] for i in r.json()["instances"]}:
                return False
        return True

    wait_until(everywhere, timeout=5, interval=0.2, what="the registration on every worker")
    assert gw.api("DELETE", f"/services/echo/instances?url={echoes[1].url}").status == 204

    def gone_everywhere() -> bool:
        for _ in range(20):
            r = gw.request(
                "GET", "/api/v1/services/echo", headers={**gw.admin_headers, "Connection": "close"}
            )
            if echoes[1].url in {i["url"] for i in r.json()["instances"]}:
                return False
        return True

    wait_until(gone_everywhere, timeout=5, interval=0.2, what="the deregistration on every worker")


# -- CLI ----------------------------------------------------------------------------------------


def _bridgeway(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables at 80 columns without a terminal
    return subprocess.run(
        [sys.executable, "-m", "bridgeway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def test_check_rejects_a_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "services:\n  sim:\n    instances: [http://127.0.0.1:9101]\n    timeout: 2 secs\n    bogus: 1\n"
    )
    result = _bridgeway("check", "--config", str(path))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert 'services.sim.timeout: "2 secs" is not a duration' in out
    assert "services.sim.bogus: unknown field" in out
    assert "Traceback" not in out


def test_check_accepts_a_good_config(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("services:\n  sim:\n    instances: [http://127.0.0.1:9101]\n    timeout: 2s\n")
    result = _bridgeway("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "/bridge/sim/*" in result.stdout
    assert "valid" in result.stdout


def test_check_accepts_the_example_config():
    result = _bridgeway("check", "--config", str(ROOT / "examples" / "bridgeway.yaml"))
    assert result.returncode == 0, result.stderr


def test_serve_refuses_a_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen: 127.0.0.1:1\nservices:\n  sim:\n    timeout: 2 secs\n")
    result = _bridgeway("serve", "--config", str(path), timeout=20)
    assert result.returncode == 1
    assert 'services.sim.timeout: "2 secs" is not a duration' in result.stdout + result.stderr
