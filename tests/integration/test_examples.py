"""The sample services (examples/services) as real processes on loopback (bridgeway.serving)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import pytest
import websockets
from yarl import URL

from tests.support import start_service
from tests.support.procs import Proc

MB = 1024 * 1024
PATTERN = b"0123456789abcdef"


def pattern(n: int) -> bytes:
    return (PATTERN * (n // 16 + 1))[:n]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# -- echo ---------------------------------------------------------------------------------------


async def test_echo_reflects_method_path_query_headers_and_body(echo_service: Proc, http):
    body = os.urandom(5 * MB)
    url = URL(echo_service.url + "/some/a%2Fb/path?x=1&y=two%20words", encoded=True)
    async with http.post(
        url, data=body, headers={"X-Custom": "abc", "Content-Type": "application/x-test"}
    ) as r:
        assert r.status == 200
        assert r.headers["X-Instance"] == "echo"
        echo = await r.json()
    assert echo["instance"] == "echo"
    assert echo["method"] == "POST"
    assert echo["raw_path"] == "/some/a%2Fb/path"
    assert echo["path"] == "/some/a/b/path"
    assert echo["query"] == "x=1&y=two%20words"
    assert ["x-custom", "abc"] in echo["headers"]
    assert ["content-type", "application/x-test"] in echo["headers"]
    assert echo["body_bytes"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_echo_hashes_a_chunked_upload(echo_service: Proc, http):
    parts = [os.urandom(100_000) for _ in range(20)]

    async def gen():
        for part in parts:
            yield part

    async with http.put(echo_service.url + "/up", data=gen()) as r:
        echo = await r.json()
    assert ["transfer-encoding", "chunked"] in echo["headers"]
    assert echo["body_bytes"] == 2_000_000
    assert echo["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_status_codes(echo_service: Proc, http):
    async with http.get(echo_service.url + "/status/418") as r:
        assert r.status == 418
        assert (await r.json())["path"] == "/status/418"
    async with http.delete(echo_service.url + "/status/503") as r:
        assert r.status == 503
    async with http.get(echo_service.url + "/status/204") as r:
        assert r.status == 204 and await r.read() == b""
    async with http.get(echo_service.url + "/status/99") as r:
        assert r.status == 400


@pytest.mark.parametrize("chunked", [False, True])
async def test_bytes_streams_the_pattern(echo_service: Proc, http, chunked):
    n = 5 * MB + 7
    url = echo_service.url + f"/bytes/{n}" + ("?chunked=1" if chunked else "")
    async with http.get(url) as r:
        assert r.status == 200
        if chunked:
            assert "Content-Length" not in r.headers
            assert r.headers["Transfer-Encoding"] == "chunked"
        else:
            assert r.headers["Content-Length"] == str(n)
        data = await r.read()
    assert data == pattern(n)


async def test_stream_arrives_incrementally(echo_service: Proc, http):
    started = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    async with http.get(echo_service.url + "/stream/5?interval_ms=200") as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        while line := await r.content.readline():
            arrivals.append((time.monotonic() - started, line))
    assert [line for _, line in arrivals] == [b"chunk %d\n" % i for i in range(5)]
    # Buffered, all lines would land together; streamed, they are 4 x 200 ms apart.
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first >= 0.6


async def test_sse_events(echo_service: Proc, http):
    async with http.get(echo_service.url + "/sse/3?interval_ms=20") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = (await r.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert len(events) == 3
    for i, event in enumerate(events):
        id_line, data_line = event.split("\n")
        assert id_line == f"id: {i}"
        assert data_line.startswith("data: {") and f'"i":{i}' in data_line


async def test_delay_holds_the_response(echo_service: Proc, http):
    t0 = time.monotonic()
    async with http.get(echo_service.url + "/delay/300") as r:
        assert r.status == 200
    assert time.monotonic() - t0 >= 0.29
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(echo_service.url + "/delay/5000", timeout=aiohttp.ClientTimeout(total=0.2)):
            pass


async def test_count_proves_each_request_was_sent_once(echo_service: Proc, http):
    for _ in range(2):
        async with http.post(echo_service.url + "/x", data=b"1"):
            pass
    async with http.get(echo_service.url + "/y"):
        pass
    async with http.get(echo_service.url + "/count") as r:
        counts = await r.json()
    # the fixture's readiness probe is one GET /health
    assert counts["counts"]["POST /x"] == 2
    assert counts["counts"]["GET /y"] == 1
    assert counts["total"] == sum(counts["counts"].values())
    async with http.post(echo_service.url + "/count/reset") as r:
        assert r.status == 200
    async with http.get(echo_service.url + "/count") as r:
        assert await r.json() == {"counts": {}, "total": 0}


async def test_health_can_be_failed_and_restored(echo_service: Proc, http):
    async with http.get(echo_service.url + "/health") as r:
        assert r.status == 200 and await r.json() == {"status": "ok"}
    async with http.post(echo_service.url + "/health/fail"):
        pass
    async with http.get(echo_service.url + "/health") as r:
        assert r.status == 503
    async with http.post(echo_service.url + "/health/ok"):
        pass
    async with http.get(echo_service.url + "/health") as r:
        assert r.status == 200


async def test_websocket_echo(echo_service: Proc):
    async with websockets.connect(echo_service.ws_url + "/ws/anything") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"


def test_echo_name_and_clean_shutdown():
    with start_service("echo", env={"ECHO_NAME": "blue"}) as proc:
        import urllib.request

        with urllib.request.urlopen(proc.url + "/hi") as r:
            assert r.headers["X-Instance"] == "blue"
    assert proc.returncode == 0
    assert "Traceback" not in proc.logs()


async def test_service_factory_starts_distinct_instances(service_factory, http):
    procs = service_factory(2, prefix="up")
    names = []
    for proc in procs:
        async with http.get(proc.url + "/") as r:
            names.append((await r.json())["instance"])
    assert names == ["up-0", "up-1"]
    procs[0].kill()
    assert not procs[0].alive and procs[1].alive


# -- sim ----------------------------------------------------------------------------------------


async def test_sim_post_then_cached(sim_service: Proc, http):
    params = {"laps": 20, "iterations": 2000, "seed": 101}
    async with http.post(sim_service.url + "/simulate", json=params) as r:
        assert r.status == 200
        assert r.headers["X-Cache"] == "MISS"
        assert r.headers["X-Instance"] == "sim"
        first = await r.json()
    assert first["cached"] is False
    assert 1 <= first["best_pit_lap"] <= 19
    assert first["iterations"] == 2000
    p = first["percentiles"]
    assert p["p5"] <= p["p50"] <= p["p95"]

    async with http.post(sim_service.url + "/simulate", json=params) as r:
        assert r.headers["X-Cache"] == "HIT"
        second = await r.json()
    assert second["cached"] is True
    assert {k: v for k, v in second.items() if k not in ("cached", "elapsed_ms")} == {
        k: v for k, v in first.items() if k not in ("cached", "elapsed_ms")
    }


async def test_sim_get_matches_post(sim_service: Proc, http):
    params = {"laps": 15, "iterations": 500, "seed": 202, "pit_loss": 18.5}
    async with http.get(sim_service.url + "/simulate", params={k: str(v) for k, v in params.items()}) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "MISS"
        got = await r.json()
    async with http.post(sim_service.url + "/simulate", json=params) as r:
        assert r.headers["X-Cache"] == "HIT"  # same canonical params, whichever way they came
        posted = await r.json()
    assert got["best_pit_lap"] == posted["best_pit_lap"]
    assert got["expected_time"] == posted["expected_time"]


@pytest.mark.parametrize(
    "bad", [{"laps": 1}, {"iterations": 200_001}, {"safety_car_prob": 2}, {"nonsense": True}, {"laps": "x"}]
)
async def test_sim_rejects_bad_input(sim_service: Proc, http, bad):
    async with http.post(sim_service.url + "/simulate", json=bad) as r:
        assert r.status == 422
    async with http.get(sim_service.url + "/simulate", params={k: str(v) for k, v in bad.items()}) as r:
        assert r.status == 422


async def test_sim_health_and_heartbeat(sim_service: Proc, http):
    async with http.get(sim_service.url + "/health") as r:
        assert r.status == 200 and await r.json() == {"status": "ok"}
    async with http.post(sim_service.url + "/heartbeat", json={"job": 1, "payload": [1, 2, 3]}) as r:
        assert r.status == 200
        beat = await r.json()
    assert beat["received"] is True and "T" in beat["at"]
    async with http.get(sim_service.url + "/heartbeat") as r:
        stats = await r.json()
    assert stats["count"] >= 1 and stats["last"] == {"job": 1, "payload": [1, 2, 3]}
