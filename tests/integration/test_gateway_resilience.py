"""The gateway when upstreams misbehave: timeouts, garbage, crashes mid-response, failing health
checks, the circuit breaker, retries (and what must never be retried), outlier ejection.

One gateway serves the module; each test has its own service (own breaker, instances, budget),
so tests do not share state except the module's echo, whose counters they read as deltas.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import free_port, start_services
from tests.support.gateway import GatewayProc, RawServer, raw_request, start_gateway, wait_until
from tests.support.procs import Proc


def dead_url() -> str:
    """An address where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


NO_EJECT = {"failures": 1000, "base_ejection": "1s", "max_ejection": "1s"}
NO_BREAK = {"failures": 1000, "open_for": "1s"}


@pytest.fixture(scope="module")
def health_pair() -> Iterator[list[Proc]]:
    procs = start_services("echo", 2, prefix="hc")
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def kill_pair() -> Iterator[list[Proc]]:
    procs = start_services("echo", 2, prefix="kill")
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def garbage() -> Iterator[RawServer]:
    server = RawServer(b"NOT HTTP\r\n\r\n")
    yield server
    server.close()


@pytest.fixture(scope="module")
def closer() -> Iterator[RawServer]:
    server = RawServer(None)
    yield server
    server.close()


@pytest.fixture(scope="module")
def hang() -> Iterator[RawServer]:
    server = RawServer(hang=True)
    yield server
    server.close()


HOP_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
    b"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-End: kept\r\n\r\nok"
)
EOF_BODY = b"a body delimited by the connection closing\n" * 1000


@pytest.fixture(scope="module")
def raw_upstreams() -> Iterator[dict[str, RawServer]]:
    servers = {
        "hop": RawServer(HOP_REPLY),
        "eof": RawServer(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n" + EOF_BODY
        ),
        "stale": RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh", answers=1),
    }
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture(scope="module")
def gw(
    echo: Proc,
    health_pair: list[Proc],
    kill_pair: list[Proc],
    garbage: RawServer,
    closer: RawServer,
    hang: RawServer,
    raw_upstreams: dict[str, RawServer],
):
    base = {"breaker": NO_BREAK, "outlier": NO_EJECT, "timeout": "5s"}
    services = {
        "slow": base | {"instances": [echo.url], "timeout": "1s"},
        "garbage": base | {"instances": [garbage.url]},
        "closer": base | {"instances": [closer.url]},
        "empty": base | {"instances": []},
        "down": base
        | {
            "instances": [dead_url(), dead_url()],
            "balancer": "round_robin",
            "retries": {"attempts": 2},
            "outlier": {"failures": 4, "base_ejection": "30s"},
        },
        "half": base
        | {
            "instances": [dead_url(), echo.url],
            "balancer": "round_robin",
            "retries": {"attempts": 2},
            "outlier": {"failures": 3, "base_ejection": "30s"},
        },
        "once": base | {"instances": [echo.url], "retries": {"attempts": 3, "backoff": "1ms"}},
        "replay": base
        | {"instances": [echo.url], "retries": {"attempts": 3, "backoff": "1ms", "non_idempotent": True}},
        "flaky": {
            "instances": [echo.url],
            "retries": {"attempts": 1},
            "breaker": {"failures": 3, "open_for": "1s"},
            "outlier": NO_EJECT,
        },
        "hc": base
        | {
            "instances": [p.url for p in health_pair],
            "balancer": "round_robin",
            "health": {
                "path": "/health",
                "interval": "200ms",
                "timeout": "500ms",
                "unhealthy": 2,
                "healthy": 2,
            },
        },
        "kill": base
        | {"instances": [p.url for p in kill_pair], "balancer": "round_robin", "retries": {"attempts": 2}},
        "idle": base | {"instances": [echo.url], "timeout": "5s", "read_timeout": "300ms"},
        "pertry": base
        | {
            "instances": [hang.url, echo.url],
            "balancer": "round_robin",
            "timeout": "3s",
            "retries": {"attempts": 2, "per_try_timeout": "300ms"},
        },
        "budget": base
        | {
            "instances": [echo.url],
            "retries": {"attempts": 3, "budget": "10%", "min_per_second": 0, "backoff": "1ms"},
        },
        "hop": base | {"instances": [raw_upstreams["hop"].url]},
        "eof": base | {"instances": [raw_upstreams["eof"].url]},
        "stale": base | {"instances": [raw_upstreams["stale"].url], "retries": {"attempts": 1}},
        "patient": base | {"instances": [echo.url], "timeout": "500ms", "read_timeout": "3s"},
    }
    proc = start_gateway({"services": services})
    yield proc
    proc.stop()


def error_code(r) -> str:
    return r.json()["error"]["code"]


def echo_count(echo: Proc, key: str) -> int:
    """How many `key` ("METHOD /path") requests reached the echo process."""
    with urllib.request.urlopen(echo.url + "/count", timeout=5) as r:
        return json.load(r)["counts"].get(key, 0)


def instance(gw: GatewayProc, service: str, url: str) -> dict:
    for inst in gw.service(service)["instances"]:
        if inst["url"] == url:
            return inst
    raise AssertionError(f"{url} not in {service}")


# -- timeouts and broken upstreams ------------------------------------------------------------


def test_hanging_upstream_gives_504_at_the_timeout(gw: GatewayProc):
    t0 = time.monotonic()
    r = gw.request("GET", "/bridge/slow/delay/5000")
    elapsed = time.monotonic() - t0
    assert r.status == 504 and error_code(r) == "UPSTREAM_TIMEOUT"
    assert 0.9 <= elapsed <= 3.0, elapsed
    assert "slow" in r.json()["error"]["message"]


def test_upstream_answering_garbage_is_502_protocol(gw: GatewayProc, garbage: RawServer):
    r = gw.request("GET", "/bridge/garbage/x")
    assert r.status == 502 and error_code(r) == "UPSTREAM_PROTOCOL"
    assert garbage.connections >= 1
    errors = [
        line
        for line in gw.request("GET", "/metrics").body.decode().splitlines()
        if line.startswith("bridgeway_upstream_errors_total") and 'service="garbage"' in line
    ]
    assert len(errors) == 1 and 'code="UPSTREAM_PROTOCOL"' in errors[0] and float(errors[0].split()[-1]) >= 1


def test_hop_by_hop_response_headers_are_removed(gw: GatewayProc):
    r = gw.request("GET", "/bridge/hop/x")
    assert r.status == 200 and r.body == b"ok"
    for hop in ("x-hop", "keep-alive", "proxy-authenticate", "upgrade"):
        assert hop not in r.headers, hop
    assert r.headers["x-end"] == "kept"


def test_body_delimited_by_connection_close_arrives_whole(gw: GatewayProc):
    for _ in range(2):
        r = gw.request("GET", "/bridge/eof/x")
        assert r.status == 200 and r.body == EOF_BODY


def test_a_keep_alive_connection_gone_stale_is_sent_again_not_failed(gw: GatewayProc, raw_upstreams):
    """The upstream closes a pooled connection as the next request reaches it, with nothing
    answered: that request goes again on a new connection, even with no retries configured."""
    stale = raw_upstreams["stale"]
    for _ in range(3):
        r = gw.request("GET", "/bridge/stale/x")
        assert r.status == 200 and r.body == b"fresh"
    assert stale.connections >= 2  # each pooled connection died unanswered when it was reused


def test_upstream_closing_without_answer_is_502_closed(gw: GatewayProc, closer: RawServer):
    r = gw.request("GET", "/bridge/closer/x")
    assert r.status == 502 and error_code(r) == "UPSTREAM_CLOSED"


def test_no_instances_is_503(gw: GatewayProc):
    r = gw.request("GET", "/bridge/empty/x")
    assert r.status == 503 and error_code(r) == "NO_HEALTHY_INSTANCE"


def test_all_instances_refusing_gives_502_then_ejection_gives_503(gw: GatewayProc):
    # Connect refused on every instance (after the retry): 502 UPSTREAM_CONNECT.
    r = gw.request("GET", "/bridge/down/x")
    assert r.status == 502 and error_code(r) == "UPSTREAM_CONNECT"
    # Each request fails once on each instance; 4 consecutive failures eject one (outlier).
    codes = []
    for _ in range(6):
        r = gw.request("GET", "/bridge/down/x")
        codes.append((r.status, error_code(r)))
        if r.status == 503:
            break
    assert codes[-1] == (503, "NO_HEALTHY_INSTANCE"), codes
    assert all(c in ((502, "UPSTREAM_CONNECT"), (503, "NO_HEALTHY_INSTANCE")) for c in codes), codes
    # Ejected: answered at once, and the admin API says so.
    t0 = time.monotonic()
    r = gw.request("GET", "/bridge/down/x")
    assert (r.status, error_code(r)) == (503, "NO_HEALTHY_INSTANCE")
    assert time.monotonic() - t0 < 0.5
    insts = gw.service("down")["instances"]
    assert all(i["ejected"] and i["ejected_for"] > 20 for i in insts), insts


def test_read_timeout_cuts_an_idle_stream(gw: GatewayProc):
    # read_timeout 300ms, chunks 1 s apart: cut after the first chunk, long before the 5 s timeout.
    t0 = time.monotonic()
    chunks, complete = _read_chunked(gw, "/bridge/idle/stream/3?interval_ms=1000")
    assert chunks == [b"chunk 0\n"] and not complete
    assert time.monotonic() - t0 < 0.95


def test_timeout_does_not_limit_a_streaming_body(gw: GatewayProc):
    # timeout (500ms) is until the response head; read_timeout 3s allows chunks 700 ms apart.
    chunks, complete = _read_chunked(gw, "/bridge/patient/stream/3?interval_ms=700")
    assert chunks == [b"chunk 0\n", b"chunk 1\n", b"chunk 2\n"] and complete


def _read_chunked(gw: GatewayProc, path: str, timeout: float = 10.0) -> tuple[list[bytes], bool]:
    """GET a chunked response over a raw socket: its chunks, and whether the final
    zero-length chunk arrived (a cut stream ends without it)."""
    data = raw_request(
        gw.port, f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode(), timeout
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            return chunks, True
        if len(rest) < size + 2:
            break
        chunks.append(rest[:size])
        body = rest[size + 2 :]
    return chunks, False


async def test_upstream_killed_mid_response(gw: GatewayProc, kill_pair: list[Proc]):
    procs = {p.name: p for p in kill_pair}
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(gw.url + "/bridge/kill/stream/100?interval_ms=50") as r:
                assert r.status == 200
                victim = procs[r.headers["X-Instance"]]
                for _ in range(3):
                    lines.append(await r.content.readline())
                victim.kill()
                async with asyncio.timeout(10):
                    while line := await r.content.readline():
                        lines.append(line)
    # Truncated, never silently complete.
    assert 3 <= len(lines) < 100
    survivor = next(p for p in kill_pair if p is not victim)
    # The gateway serves on, from the instance left (a connect failure is retried elsewhere).
    seen = collections.Counter()
    for _ in range(10):
        r = gw.request("GET", "/bridge/kill/after")
        assert r.status == 200, r
        seen[r.headers["x-instance"]] += 1
    assert seen == {survivor.name: 10}


# -- health checks ------------------------------------------------------------------------------


def test_failing_health_checks_take_an_instance_out_and_back(gw: GatewayProc, health_pair: list[Proc]):
    sick, well = health_pair

    def spread(n: int) -> collections.Counter:
        seen = collections.Counter()
        for _ in range(n):
            r = gw.request("GET", "/bridge/hc/x")
            assert r.status == 200, r
            seen[r.headers["x-instance"]] += 1
        return seen

    assert set(spread(10)) == {sick.name, well.name}
    urllib.request.urlopen(
        urllib.request.Request(sick.url + "/health/fail", method="POST"), timeout=5
    ).close()
    wait_until(
        lambda: not instance(gw, "hc", sick.url)["healthy"], timeout=5, what="instance marked unhealthy"
    )
    assert spread(20) == {well.name: 20}
    health = gw.request("GET", "/health").json()
    assert health["checks"]["services"]["hc"]["available"] == 1

    urllib.request.urlopen(urllib.request.Request(sick.url + "/health/ok", method="POST"), timeout=5).close()
    wait_until(lambda: instance(gw, "hc", sick.url)["healthy"], timeout=5, what="instance healthy again")
    assert set(spread(10)) == {sick.name, well.name}
    events = [e for e in gw.log_lines() if e.get("event") == "instance_health_changed"]
    assert [e["healthy"] for e in events if e.get("instance") == sick.url][-2:] == [False, True]


# -- circuit breaker ----------------------------------------------------------------------------


def test_breaker_opens_fails_fast_then_half_opens_and_closes(gw: GatewayProc, echo: Proc):
    def state() -> str:
        return gw.service("flaky")["breaker"]["state"]

    for _ in range(3):
        assert gw.request("GET", "/bridge/flaky/status/500").status == 500  # the upstream's own 500
    assert state() == "open"
    sent = echo_count(echo, "GET /breaker-ok")
    t0 = time.monotonic()
    r = gw.request("GET", "/bridge/flaky/breaker-ok")
    assert (r.status, error_code(r)) == (503, "CIRCUIT_OPEN")
    assert r.headers["retry-after"] == "1"  # open_for is 1s
    assert time.monotonic() - t0 < 0.5
    assert echo_count(echo, "GET /breaker-ok") == sent  # failed fast: nothing went upstream
    assert 'bridgeway_breaker_state{service="flaky"} 2' in gw.request("GET", "/metrics").body.decode()

    # After open_for a probe is let through; a failing probe opens it again.
    wait_until(lambda: state() == "half_open", timeout=3, what="half-open")
    assert gw.request("GET", "/bridge/flaky/status/500").status == 500
    assert state() == "open"
    assert error_code(gw.request("GET", "/bridge/flaky/breaker-ok")) == "CIRCUIT_OPEN"

    # A successful probe closes it.
    wait_until(lambda: state() == "half_open", timeout=3, what="half-open again")
    r = gw.request("GET", "/bridge/flaky/breaker-ok")
    assert r.status == 200
    assert state() == "closed"
    assert all(gw.request("GET", "/bridge/flaky/breaker-ok").status == 200 for _ in range(5))
    assert 'bridgeway_breaker_state{service="flaky"} 0' in gw.request("GET", "/metrics").body.decode()


# -- retries ------------------------------------------------------------------------------------


def test_post_is_never_sent_twice_but_get_is_retried(gw: GatewayProc, echo: Proc):
    posts, gets = echo_count(echo, "POST /status/503"), echo_count(echo, "GET /status/503")
    r = gw.request("POST", "/bridge/once/status/503", b"payload")
    assert r.status == 503
    assert echo_count(echo, "POST /status/503") == posts + 1
    r = gw.request("GET", "/bridge/once/status/503")
    assert r.status == 503  # the last try's answer passes through
    assert echo_count(echo, "GET /status/503") == gets + 3


def test_per_try_timeout_moves_on_to_another_instance(gw: GatewayProc, hang: RawServer):
    for _ in range(6):
        t0 = time.monotonic()
        r = gw.request("GET", "/bridge/pertry/x")
        assert r.status == 200, r
        assert time.monotonic() - t0 < 1.5
    assert hang.connections >= 1


def test_retry_budget_caps_retries(gw: GatewayProc, echo: Proc):
    before = echo_count(echo, "GET /status/503")
    for _ in range(50):
        assert gw.request("GET", "/bridge/budget/status/503").status == 503
    sent = echo_count(echo, "GET /status/503") - before
    # 10% of 50 requests may be retried (no per-second reserve): without a budget it would be 150.
    assert 50 <= sent <= 55, sent


def test_non_idempotent_retries_when_the_service_opts_in(gw: GatewayProc, echo: Proc):
    posts = echo_count(echo, "POST /status/502")
    assert gw.request("POST", "/bridge/replay/status/502", b"payload").status == 502
    assert echo_count(echo, "POST /status/502") == posts + 3


def test_retries_go_to_another_instance_and_the_dead_one_is_ejected(gw: GatewayProc, echo: Proc):
    dead = gw.service("half")["instances"][0]["url"]
    for i in range(20):
        r = gw.request("GET", f"/bridge/half/get-{i}")
        assert r.status == 200, r
    for _ in range(5):
        # A connect failure sent nothing, so even a POST is retried.
        r = gw.request("POST", "/bridge/half/post", b"x")
        assert r.status == 200, r
    assert echo_count(echo, "POST /post") >= 5
    dead_inst = instance(gw, "half", dead)
    assert dead_inst["ejected"] and dead_inst["ejected_for"] > 20
    assert not instance(gw, "half", echo.url)["ejected"]
    metrics = gw.request("GET", "/metrics").body.decode()
    retries = [
        line for line in metrics.splitlines() if line.startswith('bridgeway_retries_total{service="half"}')
    ]
    assert retries and float(retries[0].split()[-1]) >= 1
    assert f'bridgeway_instance_healthy{{instance="{dead}",service="half"}} 0' in metrics or (
        f'bridgeway_instance_healthy{{service="half",instance="{dead}"}} 0' in metrics
    )
