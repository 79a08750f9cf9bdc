import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.dataplane.instance import DECAY_SECONDS, ActiveHealth, Instance, OutlierDetector

# -- URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "base_path"),
    [
        ("http://127.0.0.1:9101", "127.0.0.1", 9101, ""),
        ("http://localhost", "localhost", 80, ""),
        ("http://svc.internal:8000/", "svc.internal", 8000, ""),
        ("http://10.0.0.7:8000/api/v1/", "10.0.0.7", 8000, "/api/v1"),
        ("http://[::1]:9000", "::1", 9000, ""),
    ],
)
def test_url_parts(url, host, port, base_path):
    inst = Instance(url)
    assert (inst.url, inst.host, inst.port, inst.base_path) == (url, host, port, base_path)
    assert inst.source == "config"
    assert inst.expires_at is None
    assert inst.inflight == 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://a:1", "only http"),
        ("ftp://a:1", "only http"),
        ("127.0.0.1:9101", "only http"),
        ("http://", "expected http://host:port"),
        ("http://a:99999", "port is invalid"),
        ("http://a:x", "port is invalid"),
        ("http://u:p@a:1", "expected http://host:port"),
        ("http://a:1/?q=1", "expected http://host:port"),
        ("http://a:1/#f", "expected http://host:port"),
    ],
)
def test_bad_urls(url, why):
    with pytest.raises(ValueError, match=why) as err:
        Instance(url)
    assert f'"{url}" is not an instance URL' in str(err.value)


def test_from_url_and_fields():
    health, outlier = ActiveHealth(1, 1), OutlierDetector(1)
    inst = Instance.from_url(
        "http://a:1", health=health, outlier=outlier, source="registered", expires_at=5.0
    )
    assert inst.health is health and inst.outlier is outlier
    assert (inst.source, inst.expires_at) == ("registered", 5.0)


def test_identity_equality():
    a, b = Instance("http://a:1"), Instance("http://a:1")
    assert a != b
    assert a == a
    assert len({a, b, a}) == 2


def test_slots():
    with pytest.raises(AttributeError):
        Instance("http://a:1").nope = 1  # type: ignore[attr-defined]


# -- availability -------------------------------------------------------------------------


def test_available_needs_healthy_not_ejected_not_expired():
    inst = Instance("http://a:1", health=ActiveHealth(1, 1), outlier=OutlierDetector(1, 10, 100))
    assert inst.available(0)
    inst.health.record(False)
    assert not inst.available(0)
    inst.health.record(True)
    assert inst.available(0)
    inst.outlier.record(False, 0)
    assert not inst.available(5)
    assert inst.available(10)
    inst.expires_at = 20.0
    assert inst.available(19.9) and not inst.expired(19.9)
    assert not inst.available(20.0) and inst.expired(20.0)


# -- ActiveHealth -------------------------------------------------------------------------


def test_health_hysteresis():
    h = ActiveHealth(healthy_threshold=2, unhealthy_threshold=3)
    assert h.healthy
    assert [h.record(False), h.record(False), h.record(True)] == [False, False, False]
    assert h.healthy  # a pass in between resets the failure count
    assert [h.record(False), h.record(False), h.record(False)] == [False, False, True]
    assert not h.healthy
    assert [h.record(True), h.record(False), h.record(True)] == [False, False, False]
    assert not h.healthy
    assert h.record(True) is True
    assert h.healthy


def test_health_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        ActiveHealth(0, 1)


@given(st.integers(1, 4), st.integers(1, 4), st.lists(st.booleans(), max_size=60))
def test_health_flips_only_after_a_run(up, down, results):
    h = ActiveHealth(up, down)
    history: list[bool] = []
    for ok in results:
        was = h.healthy
        changed = h.record(ok)
        history.append(ok)
        assert changed == (h.healthy != was)
        if changed:
            need = up if h.healthy else down
            assert history[-need:] == [h.healthy] * need
            history.clear()  # the next flip needs a fresh run


# -- OutlierDetector ----------------------------------------------------------------------


def test_ejects_after_consecutive_failures_only():
    o = OutlierDetector(consecutive_failures=3, base_ejection=10, max_ejection=100)
    assert not o.record(False, 0)
    assert not o.record(False, 0)
    assert not o.record(True, 0)  # resets
    assert not o.record(False, 0)
    assert not o.record(False, 0)
    assert o.record(False, 1)
    assert o.ejected(1) and o.ejected(10.999) and not o.ejected(11)


def test_results_while_ejected_are_ignored_and_count_restarts():
    o = OutlierDetector(consecutive_failures=2, base_ejection=10, max_ejection=100)
    o.record(False, 0)
    o.record(False, 0)
    for _ in range(5):
        assert not o.record(False, 5)  # late answers from requests sent before
    assert o.ejected_until == 10
    assert not o.record(False, 10)  # back, with a clean count: one failure is not enough
    assert o.record(False, 10)
    assert o.ejected_until == 10 + 20  # second ejection: twice as long


def test_ejection_forgiven_after_quiet_periods():
    o = OutlierDetector(consecutive_failures=1, base_ejection=10, max_ejection=1000)
    for t in (0, 10, 30):  # each ejection starts as the previous one ends
        o.record(False, t)
    assert o.times_ejected == 3 and o.ejected_until == 60
    o.record(False, 60 + 25)  # two full quiet periods forgive two ejections: 3 - 2 + 1
    assert o.times_ejected == 2
    assert o.ejected_until == 85 + 20
    o.record(False, 105 + 1000)
    assert o.times_ejected == 1


def test_outlier_rejects_bad_settings():
    with pytest.raises(ValueError):
        OutlierDetector(0)
    with pytest.raises(ValueError):
        OutlierDetector(1, base_ejection=0)
    with pytest.raises(ValueError):
        OutlierDetector(1, base_ejection=10, max_ejection=5)


@given(
    failures=st.integers(1, 5),
    base=st.floats(0.1, 60),
    cap_factor=st.floats(1, 20),
    gaps=st.lists(st.floats(0, 1000), min_size=1, max_size=30),
)
def test_ejection_periods_grow_and_are_capped(failures, base, cap_factor, gaps):
    cap = base * cap_factor
    o = OutlierDetector(failures, base, cap)
    now, previous = 0.0, 0.0
    for gap in gaps:
        now = max(now, o.ejected_until) + gap
        for _ in range(failures - 1):
            assert not o.record(False, now)
        assert o.record(False, now)
        period = o.ejected_until - now  # (now + d) - now: off by float rounding of `now`
        assert 0 < period <= cap + 1e-9
        assert math.isclose(period, min(base * o.times_ejected, cap), abs_tol=1e-9)
        if gap == 0:  # straight back into trouble: never shorter than last time
            assert period >= previous - 1e-9
        previous = period


# -- latency ------------------------------------------------------------------------------


def test_no_sample_means_zero():
    inst = Instance("http://a:1")
    assert inst.latency_ewma == 0.0
    assert inst.load(0.0) == 0.0


def test_unmeasured_busy_instance_is_worse_than_any_measured():
    fresh, known = Instance("http://a:1"), Instance("http://b:1")
    known.observe_latency(5.0, 0.0)
    known.inflight = 100
    fresh.inflight = 1
    assert fresh.load(0.0) > known.load(0.0)
    fresh.inflight = 2
    assert fresh.load(0.0) > Instance("http://c:1", inflight=1).load(0.0)


def test_peak_replaces_immediately_and_lower_decays_in():
    inst = Instance("http://a:1")
    inst.observe_latency(0.1, 0.0)
    assert inst.latency_ewma == 0.1
    inst.observe_latency(0.5, 0.0)
    assert inst.latency_ewma == 0.5  # peak
    inst.observe_latency(0.1, 0.0)
    assert inst.latency_ewma == 0.5  # no time passed: no weight
    inst.observe_latency(0.1, DECAY_SECONDS)
    w = math.exp(-1)
    assert inst.latency_ewma == pytest.approx(0.5 * w + 0.1 * (1 - w))


def test_load_counts_inflight_and_fades_when_idle():
    inst = Instance("http://a:1")
    inst.observe_latency(0.2, 0.0)
    assert inst.load(0.0) == pytest.approx(0.2)
    inst.inflight = 3
    assert inst.load(0.0) == pytest.approx(0.8)
    assert inst.load(DECAY_SECONDS) == pytest.approx(0.8 * math.exp(-1))
    assert inst.latency_ewma == 0.2  # reading does not mutate


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 30)), min_size=1, max_size=50))
def test_ewma_stays_between_min_and_max_sample(samples):
    inst = Instance("http://a:1")
    now = 0.0
    for seconds, dt in samples:
        now += dt
        inst.observe_latency(seconds, now)
        assert inst.latency_ewma >= seconds  # a peak replaces, a lower sample only pulls down
    lows = [s for s, _ in samples]
    assert min(lows) <= inst.latency_ewma <= max(lows) * (1 + 1e-12)


# -- snapshot -----------------------------------------------------------------------------


def test_snapshot():
    inst = Instance("http://a:1", outlier=OutlierDetector(1, 30, 300), source="registered", expires_at=40.0)
    inst.observe_latency(0.25, 0.0)
    inst.inflight = 2
    inst.outlier.record(False, 0.0)
    assert inst.snapshot(10.0) == {
        "url": "http://a:1",
        "source": "registered",
        "available": False,
        "healthy": True,
        "ejected": True,
        "ejected_for": 20.0,
        "inflight": 2,
        "latency_ms": 250.0,
        "expires_in": 30.0,
    }
    later = inst.snapshot(50.0)
    assert (later["ejected"], later["ejected_for"], later["expires_in"]) == (False, 0.0, 0.0)
    assert later["available"] is False  # the lease ran out
    assert inst.snapshot(35.0)["available"] is True  # back from ejection, lease still valid
    assert Instance("http://a:1").snapshot(0)["expires_in"] is None
