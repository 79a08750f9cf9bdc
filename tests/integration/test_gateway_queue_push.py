"""Push delivery through a real gateway to real HTTP servers on loopback: headers, retries per
policy, the service's breaker, dead letters and replay, signed callbacks, back-pressure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from bridgeway.jobs import signing
from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.queues import QUEUE_BACKENDS, queue_backend
from tests.support.sink import Received, Sink

SECRET = "callback-secret-for-tests-0123456789"


class Upstream:
    """Answers per job: payload {"fail": n} fails the first n attempts, {"fail": -1} always
    (until `healed`), {"sleep": s} is slow; counts how many are in flight at once."""

    def __init__(self) -> None:
        self.healed = False
        self.inflight = 0
        self.most = 0
        self.lock = threading.Lock()
        self.sink = Sink(self.answer)

    def answer(self, req: Received) -> int:
        payload = json.loads(req.body or b"null")
        if not isinstance(payload, dict):
            return 200
        with self.lock:
            self.inflight += 1
            self.most = max(self.most, self.inflight)
        try:
            time.sleep(payload.get("sleep", 0))
        finally:
            with self.lock:
                self.inflight -= 1
        fail = payload.get("fail", 0)
        attempt = int(req.headers["x-bridgeway-attempt"])
        if (fail == -1 and not self.healed) or attempt <= fail:
            return 500
        return 200


@pytest.fixture(scope="module", params=QUEUE_BACKENDS)
def backend(request) -> str:
    """The backend of this round of the module: the upstream and callback sinks are made anew for
    each, so what one gateway's deliveries did is not counted against the next."""
    return request.param


@pytest.fixture(scope="module")
def upstream(backend: str) -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.sink.close()


def _callback_answer(req: Received) -> int:
    """/flaky refuses a callback's first attempt."""
    return 503 if req.path == "/flaky" and req.headers["x-bridgeway-callback-attempt"] == "1" else 200


@pytest.fixture(scope="module")
def callbacks(backend: str) -> Iterator[Sink]:
    sink = Sink(_callback_answer)
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def gw(backend: str, upstream: Upstream) -> Iterator[GatewayProc]:
    quick = {"base": "10ms", "max": "50ms"}
    config = {
        "services": {
            # Failing on purpose must not get the instance ejected (that is the next test's topic).
            "worker": {
                "instances": [upstream.sink.url],
                "retries": {"attempts": 1},
                "outlier": {"failures": 100},
                "breaker": {"failures": 100},
            },
            "fragile": {
                "instances": [upstream.sink.url],
                "retries": {"attempts": 1},
                "breaker": {"failures": 2, "open_for": "30s"},
                "outlier": {"failures": 100},
            },
        },
        "queues": {
            "tasks": {"deliver": {"service": "worker", "path": "/run"}, "max_attempts": 3, "backoff": quick},
            "slow": {"deliver": {"service": "worker", "path": "/slow"}, "concurrency": 3},
            "breaking": {
                "deliver": {"service": "fragile", "path": "/x"},
                "max_attempts": 2,
                "backoff": quick,
            },
            "noted": {
                "deliver": {"service": "worker", "path": "/noted"},
                "max_attempts": 2,
                "backoff": quick,
                "callback_secret": SECRET,
            },
        },
    }
    with queue_backend(backend) as extra:
        proc = start_gateway({**config, **extra})
        proc.secrets.append(SECRET)
        yield proc
        proc.stop()


def enqueue(gw: GatewayProc, queue: str, body) -> dict:
    r = gw.api("POST", f"/queues/{queue}/jobs", body)
    assert r.status in (200, 201), r
    return r.json()


def state_of(gw: GatewayProc, job_id: str) -> dict:
    return gw.api("GET", f"/jobs/{job_id}").json()


def finished(gw: GatewayProc, job_id: str, state: str = "done") -> dict:
    try:
        return wait_until(lambda: (j := state_of(gw, job_id))["state"] == state and j, timeout=10, what=state)
    except AssertionError:
        raise AssertionError(f"{state_of(gw, job_id)}\n{gw.logs_tail(15)}") from None


def test_jobs_are_posted_with_their_headers(gw: GatewayProc, upstream: Upstream):
    ids = [
        j["id"]
        for j in enqueue(
            gw, "tasks", {"jobs": [{"payload": [i], "headers": {"X-Tenant": "t1"}} for i in range(20)]}
        )["jobs"]
    ]
    for job_id in ids:
        finished(gw, job_id)
    received = {r.headers["x-bridgeway-job-id"]: r for r in upstream.sink.requests if r.path == "/run"}
    assert set(ids) <= received.keys()
    first = received[ids[0]]
    assert (first.body, first.headers["x-bridgeway-attempt"], first.headers["x-tenant"]) == (
        b"[0]",
        "1",
        "t1",
    )
    assert first.headers["content-type"] == "application/json"
    assert first.headers["traceparent"].startswith("00-")


def test_failures_are_retried_then_buried_and_replayed(gw: GatewayProc, upstream: Upstream):
    flaky = enqueue(gw, "tasks", {"payload": {"fail": 2}})["id"]
    poison = enqueue(gw, "tasks", {"payload": {"fail": -1}})["id"]
    assert finished(gw, flaky)["attempts"] == 3
    dead = finished(gw, poison, "dead")
    assert dead["attempts"] == 3 and "worker answered 500" in dead["last_error"]
    assert [j["id"] for j in gw.api("GET", "/queues/tasks/dead").json()["jobs"]] == [poison]
    upstream.healed = True
    try:
        assert gw.api("POST", "/queues/tasks/dead/replay", {}).json() == {"replayed": 1}
        assert finished(gw, poison)["attempts"] == 1
    finally:
        upstream.healed = False


def test_the_services_breaker_applies(gw: GatewayProc, upstream: Upstream, backend: str):
    if backend != "sqlite":
        pytest.skip("the breaker is the service's, the same on every backend: once is enough")
    ids = [j["id"] for j in enqueue(gw, "breaking", {"jobs": [{"payload": {"fail": -1}}] * 6})["jobs"]]
    errors = [finished(gw, job_id, "dead")["last_error"] for job_id in ids]
    assert any("CIRCUIT_OPEN" in e for e in errors), errors
    reached = sum(1 for r in upstream.sink.requests if r.path == "/x")
    assert 2 <= reached < 12  # 6 jobs x 2 attempts without the breaker


def test_callbacks_are_signed_on_completion_and_final_failure(gw: GatewayProc, callbacks: Sink):
    ok = enqueue(gw, "noted", {"payload": {}, "callback_url": callbacks.url + "/done"})["id"]
    bad = enqueue(gw, "noted", {"payload": {"fail": -1}, "callback_url": callbacks.url + "/failed"})["id"]
    finished(gw, ok)
    finished(gw, bad, "dead")
    wait_until(lambda: len(callbacks.requests) >= 2, timeout=10, what="two callbacks")
    time.sleep(0.3)
    by_path = {r.path: r for r in callbacks.requests}
    assert len(callbacks.requests) == 2  # one per outcome, not one per attempt
    for path, job_id, state in (("/done", ok, "done"), ("/failed", bad, "dead")):
        req = by_path[path]
        assert signing.verify(SECRET.encode(), req.body, req.headers["x-bridgeway-signature"], time.time())
        assert not signing.verify(
            b"another secret", req.body, req.headers["x-bridgeway-signature"], time.time()
        )
        note = json.loads(req.body)
        assert (note["job_id"], note["queue"], note["state"]) == (job_id, "noted", state)
    assert json.loads(by_path["/done"].body)["result"] == {"ok": True}
    assert "answered 500" in json.loads(by_path["/failed"].body)["error"]


def test_a_refused_callback_is_retried(gw: GatewayProc, callbacks: Sink):
    job_id = enqueue(gw, "noted", {"payload": {}, "callback_url": callbacks.url + "/flaky"})["id"]
    finished(gw, job_id)
    tries = wait_until(
        lambda: (
            (found := [r for r in callbacks.requests if r.path == "/flaky"]) and len(found) >= 2 and found
        ),
        timeout=10,
        what="the callback's second attempt",
    )
    assert [r.headers["x-bridgeway-callback-attempt"] for r in tries] == ["1", "2"]
    assert tries[0].body == tries[1].body and json.loads(tries[1].body)["job_id"] == job_id
    assert signing.verify(
        SECRET.encode(), tries[1].body, tries[1].headers["x-bridgeway-signature"], time.time()
    )


def test_a_slow_service_gets_no_more_than_the_concurrency(gw: GatewayProc, upstream: Upstream, backend: str):
    if backend != "sqlite":
        pytest.skip("the push loop keeps its own limit, the same on every backend: once is enough")
    upstream.most = 0
    ids = [j["id"] for j in enqueue(gw, "slow", {"jobs": [{"payload": {"sleep": 0.1}}] * 30})["jobs"]]
    leased = []
    for _ in range(10):
        queue = next(q for q in gw.api("GET", "/queues").json()["queues"] if q["name"] == "slow")
        leased.append(queue["leased"])
        time.sleep(0.05)
    for job_id in ids:
        finished(gw, job_id)
    assert max(leased) <= 3  # claimed only as room frees: the rest wait in the backend
    assert upstream.most <= 3
    assert upstream.most == 3
