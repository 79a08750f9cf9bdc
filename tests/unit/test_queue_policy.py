"""The retry policy: full-jitter exponential back-off, bounded, and burial after max attempts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.jobs.queues.policy import Bury, Retry, RetryPolicy

draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    draw=draws,
    base=st.floats(min_value=0.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=3600.0),
)
def test_delay_stays_within_the_jittered_ceiling(attempts, draw, base, cap):
    policy = RetryPolicy(max_attempts=5, base=base, max_delay=cap)
    ceiling = min(cap, base * 2.0 ** min(attempts - 1, 62))
    assert 0.0 <= policy.delay(attempts, draw) <= ceiling + 1e-9


@given(draw=draws)
def test_the_ceiling_doubles_until_the_cap(draw):
    policy = RetryPolicy(base=1.0, max_delay=10.0)
    assert [policy.delay(n, 0.999999) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx(
        [0.999999, 1.999998, 3.999996, 7.999992, 9.99999, 9.99999]
    )
    assert policy.delay(3, draw) == pytest.approx(4.0 * draw)


@given(
    attempts=st.integers(min_value=1, max_value=50), limit=st.integers(min_value=1, max_value=50), draw=draws
)
def test_retried_before_the_limit_buried_at_it(attempts, limit, draw):
    policy = RetryPolicy(max_attempts=99, base=2.0, max_delay=60.0)
    decision = policy.after_failure(attempts, limit, 1000.0, draw)
    if attempts >= limit:
        assert isinstance(decision, Bury)
        assert str(attempts) in decision.reason
    else:
        assert isinstance(decision, Retry)
        assert 1000.0 <= decision.at <= 1000.0 + 60.0


def test_a_requested_delay_replaces_the_backoff_but_not_the_limit():
    policy = RetryPolicy(max_attempts=3, base=100.0)
    assert policy.after_failure(1, None, 50.0, 0.9, delay=2.5) == Retry(52.5)
    assert policy.after_failure(1, None, 50.0, 0.9, delay=-1) == Retry(50.0)
    assert isinstance(policy.after_failure(3, None, 50.0, 0.9, delay=2.5), Bury)


def test_jitter_spreads_a_burst():
    policy = RetryPolicy(base=8.0, max_delay=8.0)
    waits = {round(policy.delay(4, i / 100), 6) for i in range(100)}
    assert len(waits) == 100


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
