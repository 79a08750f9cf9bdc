import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bridgeway.dataplane.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def trip(b: CircuitBreaker, now: float) -> None:
    for _ in range(b.failures):
        b.record(b.admit(now), False, now)
    assert b.state(now) is OPEN


def test_state_values():
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


def test_closed_admits_and_tickets_are_truthy():
    b = CircuitBreaker()
    tickets = [b.admit(0.0) for _ in range(100)]
    assert all(tickets)
    assert b.state(0.0) is CLOSED


def test_consecutive_failures_open_and_success_resets():
    b = CircuitBreaker(failures=3, open_for=10)
    for _ in range(2):
        b.record(b.admit(0), False, 0)
    b.record(b.admit(0), True, 0)
    for _ in range(2):
        b.record(b.admit(0), False, 0)
    assert b.state(0) is CLOSED
    b.record(b.admit(1), False, 1)
    assert b.state(1) is OPEN


def test_open_rejects_until_open_for_then_half_open():
    b = CircuitBreaker(failures=1, open_for=30)
    trip(b, 100.0)
    assert b.admit(100.0) is None
    assert b.admit(129.999) is None
    assert b.retry_after(110.0) == pytest.approx(20.0)
    assert b.state(130.0) is HALF_OPEN  # reported without an admit
    assert b.admit(130.0) is not None
    assert b.state(130.0) is HALF_OPEN
    assert b.retry_after(130.0) == 0.0


def test_half_open_limits_probes_and_closes_on_success():
    b = CircuitBreaker(failures=1, open_for=5, half_open_probes=2)
    trip(b, 0)
    p1, p2 = b.admit(5), b.admit(5)
    assert p1 and p2
    assert b.admit(5) is None
    b.record(p1, True, 6)
    assert b.state(6) is HALF_OPEN  # successes_to_close defaults to half_open_probes = 2
    p3 = b.admit(6)
    assert p3
    b.record(p2, True, 6)
    assert b.state(6) is CLOSED
    b.record(p3, False, 6)  # a probe of the old half-open period: stale, ignored
    assert b.state(6) is CLOSED
    assert b.snapshot(6)["consecutive_failures"] == 0


def test_half_open_failure_reopens_for_open_for():
    b = CircuitBreaker(failures=1, open_for=5)
    trip(b, 0)
    probe = b.admit(5)
    b.record(probe, False, 7)
    assert b.state(7) is OPEN
    assert b.admit(11.9) is None
    assert b.admit(12) is not None


def test_successes_to_close_larger_than_probes():
    b = CircuitBreaker(failures=1, open_for=1, half_open_probes=1, successes_to_close=3)
    trip(b, 0)
    for i in range(3):
        assert b.state(1) is HALF_OPEN
        ticket = b.admit(1)
        assert ticket
        assert b.admit(1) is None
        b.record(ticket, True, 1)
        assert b.state(1) is (CLOSED if i == 2 else HALF_OPEN)


def test_release_frees_probe_without_counting():
    b = CircuitBreaker(failures=1, open_for=1)
    trip(b, 0)
    probe = b.admit(1)
    assert b.admit(1) is None
    b.release(probe)
    assert b.state(1) is HALF_OPEN
    probe = b.admit(1)
    assert probe
    b.record(probe, True, 1)
    assert b.state(1) is CLOSED


def test_release_in_closed_is_harmless():
    b = CircuitBreaker(failures=2)
    t = b.admit(0)
    b.release(t)
    b.record(b.admit(0), False, 0)
    assert b.state(0) is CLOSED


def test_late_result_from_closed_period_is_ignored():
    b = CircuitBreaker(failures=2, open_for=10)
    slow = b.admit(0)  # admitted while CLOSED, answers much later
    trip(b, 1)
    assert b.admit(11)  # the probe
    b.record(slow, True, 12)  # must not count as a probe success, nor free the probe's slot
    assert b.state(12) is HALF_OPEN
    assert b.admit(12) is None
    b.record(slow, False, 12)  # nor re-open it
    assert b.state(12) is HALF_OPEN


def test_late_failure_while_open_does_not_extend():
    b = CircuitBreaker(failures=1, open_for=10)
    slow = b.admit(0)
    trip(b, 1)
    b.record(slow, False, 5)
    assert b.admit(11) is not None


def test_snapshot():
    b = CircuitBreaker(failures=2, open_for=30)
    b.record(b.admit(0), False, 0)
    assert b.snapshot(0) == {
        "state": "closed",
        "consecutive_failures": 1,
        "opened_at": None,
        "retry_in": None,
        "probes_in_flight": 0,
    }
    b.record(b.admit(1), False, 1)
    snap = b.snapshot(11)
    assert snap["state"] == "open"
    assert snap["opened_at"] == 1
    assert snap["retry_in"] == pytest.approx(20)
    assert b.snapshot(31)["state"] == "half_open"


@pytest.mark.parametrize(
    "kwargs",
    [{"failures": 0}, {"half_open_probes": 0}, {"successes_to_close": 0}, {"open_for": -1}],
)
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)


@given(
    failures=st.integers(1, 5),
    open_for=st.floats(0.01, 100),
    before=st.lists(st.floats(0, 1), max_size=20),
)
def test_open_admits_nothing_before_open_for(failures, open_for, before):
    b = CircuitBreaker(failures=failures, open_for=open_for)
    trip(b, 1000.0)
    for frac in before:
        assert b.admit(1000.0 + frac * open_for * 0.999) is None
    assert b.admit(1000.0 + open_for) is not None


class BreakerMachine(RuleBasedStateMachine):
    """Any interleaving of admit / record / release / time: probe accounting stays exact."""

    @initialize(
        failures=st.integers(1, 4),
        open_for=st.sampled_from([0.0, 1.0, 5.0]),
        probes=st.integers(1, 3),
        to_close=st.integers(1, 4),
    )
    def setup(self, failures, open_for, probes, to_close):
        self.b = CircuitBreaker(failures, open_for, probes, to_close)
        self.now = 0.0
        self.outstanding: list[int] = []
        self.opened_at: float | None = None

    def _observe(self) -> None:
        state = self.b.state(self.now)
        if state is OPEN and self.opened_at is None:
            self.opened_at = self.now
        elif state is not OPEN:
            self.opened_at = None

    @rule()
    def admit(self):
        was = self.b.state(self.now)
        ticket = self.b.admit(self.now)
        if self.opened_at is not None and self.now - self.opened_at < self.b.open_for:
            assert ticket is None, "OPEN admitted before open_for"
        if was is CLOSED:
            assert ticket
        if ticket is not None:
            assert ticket
            self.outstanding.append(ticket)
            if self.b.state(self.now) is HALF_OPEN:
                same_period = sum(1 for t in self.outstanding if t == ticket)
                assert same_period <= self.b.half_open_probes
        self._observe()

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), ok=st.booleans())
    def record(self, data, ok):
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        self.b.record(self.outstanding.pop(i), ok, self.now)
        self._observe()

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        self.b.release(self.outstanding.pop(i))
        self._observe()

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 5.0, 10.0]))
    def advance(self, dt):
        self.now += dt
        self._observe()

    @rule()
    def drain_then_recovers(self):
        """No leaked probe slot: with nothing in flight and open_for waited out, a probe goes."""
        for t in self.outstanding:
            self.b.release(t)
        self.outstanding.clear()
        self.now += self.b.open_for
        ticket = self.b.admit(self.now)
        assert ticket is not None
        self.outstanding.append(ticket)
        self._observe()

    @invariant()
    def probes_bounded(self):
        if hasattr(self, "b"):
            probes = self.b.snapshot(self.now)["probes_in_flight"]
            assert 0 <= probes <= self.b.half_open_probes


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
