import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.dataplane.retry import IDEMPOTENT_METHODS, RetryBudget, backoff, is_retryable

# -- is_retryable -------------------------------------------------------------------------


def test_idempotent_methods():
    assert frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}) == IDEMPOTENT_METHODS


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "PUT", "CONNECT"])
def test_nothing_sent_is_always_retryable(method):
    assert is_retryable(method, request_sent=False, retry_non_idempotent=False)


@pytest.mark.parametrize(
    ("method", "expected"),
    [("GET", True), ("HEAD", True), ("PUT", True), ("DELETE", True), ("OPTIONS", True), ("TRACE", True),
     ("POST", False), ("PATCH", False), ("CONNECT", False)],
)  # fmt: skip
def test_after_send_only_idempotent(method, expected):
    assert is_retryable(method, request_sent=True, retry_non_idempotent=False) is expected


def test_after_send_non_idempotent_when_configured():
    assert is_retryable("POST", request_sent=True, retry_non_idempotent=True)


# -- backoff ------------------------------------------------------------------------------


def test_backoff_full_jitter_examples():
    assert backoff(0, 0.025, 0.25, 0.0) == 0.0
    assert backoff(0, 0.025, 0.25, 0.5) == pytest.approx(0.0125)
    assert backoff(2, 0.025, 0.25, 0.5) == pytest.approx(0.05)
    assert backoff(10, 0.025, 0.25, 0.5) == pytest.approx(0.125)  # capped at 0.25 before jitter
    assert backoff(10_000, 0.025, 0.25, 0.5) == pytest.approx(0.125)  # no overflow


@pytest.mark.parametrize(("attempt", "rand"), [(-1, 0.5), (0, 1.0), (0, -0.1)])
def test_backoff_rejects(attempt, rand):
    with pytest.raises(ValueError):
        backoff(attempt, 0.1, 1.0, rand)


@given(
    attempt=st.integers(0, 200),
    base=st.floats(0, 10),
    cap=st.floats(0, 100),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_backoff_bounded_and_monotone(attempt, base, cap, rand):
    pause = backoff(attempt, base, cap, rand)
    assert 0 <= pause <= min(cap, base * 2.0 ** min(attempt, 62))
    assert backoff(attempt + 1, base, cap, rand) >= pause


# -- RetryBudget --------------------------------------------------------------------------


def test_reserve_alone_allows_min_per_second_times_window():
    budget = RetryBudget(ratio=0.2, min_per_second=3.0, window=10.0)
    assert sum(budget.try_spend(0.0) for _ in range(100)) == 30
    assert not budget.try_spend(9.9)
    assert budget.try_spend(10.0)  # the first second left the window


def test_requests_earn_retries():
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    assert not budget.try_spend(0.0)
    for _ in range(10):
        budget.record_request(0.0)
    assert sum(budget.try_spend(1.0) for _ in range(100)) == 5
    assert budget.snapshot(1.0) == {"requests": 10, "retries": 5, "available": 0}


def test_requests_expire_with_the_window():
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=3.0)
    budget.record_request(0.5)
    budget.record_request(2.5)
    assert budget.snapshot(2.9)["requests"] == 2
    assert budget.snapshot(3.0)["requests"] == 1
    assert budget.snapshot(5.99)["requests"] == 0
    assert budget.snapshot(1000.0)["requests"] == 0


def test_clock_stepping_back_does_not_corrupt():
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=2.0)
    budget.record_request(5.0)
    budget.record_request(4.0)  # counted in the newest bucket
    assert budget.snapshot(5.0)["requests"] == 2


def test_sub_second_window_is_one_bucket():
    budget = RetryBudget(ratio=0.0, min_per_second=10.0, window=0.5)
    assert sum(budget.try_spend(0.0) for _ in range(10)) == 5


@pytest.mark.parametrize(
    "kwargs", [{"ratio": -0.1}, {"min_per_second": -1}, {"window": 0}, {"window": math.inf}]
)
def test_budget_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)


events = st.lists(
    st.tuples(st.sampled_from(["request", "retry"]), st.floats(0, 3, allow_nan=False)),
    max_size=300,
)


@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    window=st.sampled_from([1.0, 2.0, 5.0, 10.0]),
    steps=events,
)
def test_budget_matches_model_and_never_overspends(ratio, min_per_second, window, steps):
    """Against a log of every event: try_spend says yes exactly when one more retry keeps the
    retries in the window (the last ceil(window) whole seconds) within ratio * requests + reserve."""
    budget = RetryBudget(ratio, min_per_second, window)
    n = math.ceil(window)
    reserve = min_per_second * window
    now = 1000.0
    log: list[tuple[str, int]] = []
    for kind, dt in steps:
        now += dt
        second = math.floor(now)
        if kind == "request":
            budget.record_request(now)
            log.append(("request", second))
            continue
        in_window = [k for k, s in log if second - n < s <= second]
        requests, retries = in_window.count("request"), in_window.count("retry")
        allowed = retries + 1 <= ratio * requests + reserve
        assert budget.try_spend(now) is allowed
        if allowed:
            log.append(("retry", second))
            assert retries + 1 <= ratio * requests + min_per_second * window


@given(st.lists(st.floats(0, 0.5, allow_nan=False), min_size=1, max_size=500))
def test_budget_spends_at_most_ratio_of_a_burst(gaps):
    """A retry storm after N requests gets at most ratio * N + reserve retries per window."""
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)
    now = 0.0
    for _ in range(50):
        budget.record_request(now)
    spent = 0
    for gap in gaps:
        now += gap
        if now >= 10.0:
            break
        spent += budget.try_spend(now)
    assert spent <= 0.2 * 50 + 1.0 * 10.0
