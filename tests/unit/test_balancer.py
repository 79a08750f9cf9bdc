import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.dataplane.balancer import BALANCERS, LeastRequests, P2CEwma, RoundRobin, make_balancer
from bridgeway.dataplane.instance import ActiveHealth, Instance, OutlierDetector

NOW = 1000.0


def make(n: int) -> list[Instance]:
    return [
        Instance(f"http://10.0.0.{i}:80", health=ActiveHealth(1, 1), outlier=OutlierDetector(1, 30, 300))
        for i in range(n)
    ]


def disable(inst: Instance, how: str) -> None:
    if how == "unhealthy":
        inst.health.record(False)
    elif how == "ejected":
        inst.outlier.record(False, NOW)
    elif how == "expired":
        inst.expires_at = NOW


def balancers(seed: int = 0):
    return [make_balancer(name, random.Random(seed)) for name in BALANCERS]


def test_names():
    assert BALANCERS == ("round_robin", "least_requests", "p2c_ewma")
    assert [b.name for b in balancers()] == list(BALANCERS)
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer("least_requests"), LeastRequests)
    assert isinstance(make_balancer("p2c_ewma"), P2CEwma)
    with pytest.raises(ValueError, match='unknown balancer "random"'):
        make_balancer("random")


@pytest.mark.parametrize("name", BALANCERS)
def test_nothing_available(name):
    b = make_balancer(name, random.Random(1))
    assert b.pick([], NOW) is None
    insts = make(3)
    for inst, how in zip(insts, ["unhealthy", "ejected", "expired"], strict=True):
        disable(inst, how)
    assert b.pick(insts, NOW) is None
    assert b.pick(insts[:1], NOW) is None


@pytest.mark.parametrize("name", BALANCERS)
def test_single_instance(name):
    b = make_balancer(name, random.Random(1))
    (inst,) = make(1)
    assert b.pick([inst], NOW) is inst
    assert b.pick([inst], NOW, exclude=[inst]) is inst  # retrying the only one beats failing


@pytest.mark.parametrize("name", BALANCERS)
def test_falls_back_to_excluded_when_nothing_else(name):
    b = make_balancer(name, random.Random(1))
    a, c, d = make(3)
    disable(d, "unhealthy")
    for _ in range(20):
        assert b.pick([a, c, d], NOW, exclude={a, c}) in (a, c)
        assert b.pick([a, c, d], NOW, exclude=(a,)) is c


status = st.sampled_from(["ok", "ok", "unhealthy", "ejected", "expired"])


@given(
    name=st.sampled_from(BALANCERS),
    seed=st.integers(0, 2**32),
    setup=st.lists(st.tuples(status, st.booleans(), st.integers(0, 5)), max_size=12),
    picks=st.integers(1, 10),
)
def test_picks_only_usable(name, seed, setup, picks):
    """Never an unavailable instance; never an excluded one while another is available."""
    b = make_balancer(name, random.Random(seed))
    insts = make(len(setup))
    exclude = set()
    for inst, (how, excluded, inflight) in zip(insts, setup, strict=True):
        disable(inst, how)
        inst.inflight = inflight
        if excluded:
            exclude.add(inst)
        if inflight:
            inst.observe_latency(inflight / 10, NOW)
    available = [i for i in insts if i.available(NOW)]
    preferred = [i for i in available if i not in exclude] or available
    for _ in range(picks):
        picked = b.pick(insts, NOW, exclude)
        if not available:
            assert picked is None
        else:
            assert picked in preferred


@given(n=st.integers(1, 10), k=st.integers(1, 10), start=st.integers(0, 1000))
def test_round_robin_is_fair(n, k, start):
    insts = make(n)
    rr = RoundRobin(start)
    counts = Counter(rr.pick(insts, NOW) for _ in range(n * k))
    assert counts == {inst: k for inst in insts}


@given(
    down=st.lists(st.booleans(), min_size=1, max_size=10),
    k=st.integers(1, 6),
    start=st.integers(0, 100),
)
def test_round_robin_fair_among_available(down, k, start):
    insts = make(len(down))
    for inst, is_down in zip(insts, down, strict=True):
        if is_down:
            disable(inst, "unhealthy")
    up = [i for i in insts if i.available(NOW)]
    rr = RoundRobin(start)
    counts = Counter(rr.pick(insts, NOW) for _ in range(len(up) * k))
    assert counts == {inst: k for inst in up}


def test_round_robin_order_and_exclude():
    a, b, c = make(3)
    rr = RoundRobin()
    assert [rr.pick([a, b, c], NOW) for _ in range(4)] == [a, b, c, a]
    assert rr.pick([a, b, c], NOW, exclude=[b]) is c


@given(
    balancer=st.sampled_from(["least_requests", "p2c_ewma"]),
    seed=st.integers(0, 2**32),
    inflight=st.lists(st.integers(0, 20), min_size=2, max_size=10, unique=True),
)
def test_two_choices_never_picks_the_worst(balancer, seed, inflight):
    b = make_balancer(balancer, random.Random(seed))
    insts = make(len(inflight))
    for inst, count in zip(insts, inflight, strict=True):
        inst.inflight = count
        inst.observe_latency(0.01, NOW)
    worst = max(insts, key=lambda i: i.inflight)
    for _ in range(10):
        assert b.pick(insts, NOW) is not worst


@given(seed=st.integers(0, 2**32), inflight=st.tuples(st.integers(0, 9), st.integers(0, 9)))
def test_least_requests_exact_for_two(seed, inflight):
    b = LeastRequests(random.Random(seed))
    insts = make(2)
    for inst, count in zip(insts, inflight, strict=True):
        inst.inflight = count
    picked = b.pick(insts, NOW)
    assert picked.inflight == min(inflight)


@pytest.mark.parametrize("name", ["least_requests", "p2c_ewma"])
def test_ties_are_broken_at_random(name):
    b = make_balancer(name, random.Random(42))
    insts = make(5)
    counts = Counter(b.pick(insts, NOW) for _ in range(5000))
    assert set(counts) == set(insts)
    assert all(800 < c < 1200 for c in counts.values())


def test_p2c_ewma_prefers_lower_load():
    b = P2CEwma(random.Random(7))
    fast, slow = make(2)
    fast.observe_latency(0.010, NOW)
    slow.observe_latency(0.200, NOW)
    assert all(b.pick([fast, slow], NOW) is fast for _ in range(50))
    fast.inflight = 30  # 0.01 * 31 > 0.2 * 1
    assert b.pick([fast, slow], NOW) is slow


def test_p2c_ewma_tries_new_instances():
    b = P2CEwma(random.Random(7))
    known, new = make(2)
    known.observe_latency(0.010, NOW)
    assert b.pick([known, new], NOW) is new  # no sample yet: load 0
    new.inflight = 1
    assert b.pick([known, new], NOW) is known  # but only one request until it answers


def test_p2c_ewma_spreads_over_many():
    b = P2CEwma(random.Random(3))
    insts = make(10)
    for i, inst in enumerate(insts):
        inst.observe_latency(0.01 * (i + 1), NOW)
    counts = Counter(b.pick(insts, NOW) for _ in range(10_000))
    assert counts[insts[-1]] == 0  # the slowest never wins a pair
    assert counts[insts[0]] > counts[insts[5]] > counts[insts[8]] > 0
