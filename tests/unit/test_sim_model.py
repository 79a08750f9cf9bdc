"""The race-strategy model of examples/services/sim.py, tested as a pure function."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

SIM_PATH = Path(__file__).resolve().parents[2] / "examples" / "services" / "sim.py"


def _load_sim():
    name = "bridgeway_example_sim"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SIM_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the model's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


sim = _load_sim()
P = sim.SimParams
CALM = {"lap_noise": 0.0, "safety_car_prob": 0.0}  # no randomness at all


def run(**kw):
    return sim.simulate(P(**kw))


def means(result) -> dict[int, float]:
    return {row["lap"]: row["mean"] for row in result["by_lap"]}


def strip_timing(result) -> dict:
    return {k: v for k, v in result.items() if k != "elapsed_ms"}


def test_same_seed_same_result_and_other_seed_differs():
    a, b = run(seed=7, iterations=5000), run(seed=7, iterations=5000)
    assert strip_timing(a) == strip_timing(b)
    c = run(seed=8, iterations=5000)
    assert c["percentiles"] != a["percentiles"]


def test_shape_of_result():
    r = run(laps=30, iterations=2000)
    assert set(r) >= {
        "best_pit_lap",
        "expected_time",
        "percentiles",
        "by_lap",
        "iterations",
        "elapsed_ms",
        "cached",
    }
    assert r["iterations"] == 2000 and r["cached"] is False and r["elapsed_ms"] >= 0
    assert [row["lap"] for row in r["by_lap"]] == list(range(1, 30))  # every candidate pit lap
    assert 1 <= r["best_pit_lap"] <= 29
    m = means(r)
    assert m[r["best_pit_lap"]] == min(m.values())
    assert math.isclose(r["expected_time"], m[r["best_pit_lap"]], abs_tol=1e-3)


@pytest.mark.parametrize("kw", [{}, {"laps": 2, "iterations": 1}, {"safety_car_prob": 0.3, "lap_noise": 2.0}])
def test_percentiles_ordered(kw):
    pct = run(**kw)["percentiles"]
    assert pct["p5"] <= pct["p50"] <= pct["p95"]


def test_no_wear_no_noise_no_safety_car_every_lap_costs_the_same():
    r = run(laps=40, base_lap=80.0, tyre_wear=0.0, tyre_wear2=0.0, pit_loss=20.0, **CALM)
    assert set(means(r).values()) == {40 * 80.0 + 20.0}
    assert r["percentiles"] == {"p5": 3220.0, "p50": 3220.0, "p95": 3220.0}
    assert r["std"] == 0.0


def test_deterministic_means_match_a_lap_by_lap_reference():
    laps, base, wear, wear2, pit = 12, 70.0, 0.3, 0.01, 18.0
    r = run(laps=laps, base_lap=base, tyre_wear=wear, tyre_wear2=wear2, pit_loss=pit, **CALM)
    for k, mean in means(r).items():  # pit at the end of lap k
        expected = pit
        for lap in range(1, laps + 1):
            age = lap - 1 if lap <= k else lap - k - 1
            expected += base + wear * age + wear2 * age * age
        assert math.isclose(mean, expected, abs_tol=1e-3), k


@pytest.mark.parametrize("laps", [20, 21, 50])
def test_symmetric_wear_puts_the_stop_in_the_middle(laps):
    # Without safety cars, noise is common to all pit laps, so equal stints are exactly optimal.
    r = run(laps=laps, tyre_wear=0.5, tyre_wear2=0.01, lap_noise=1.0, safety_car_prob=0.0, iterations=2000)
    assert r["best_pit_lap"] in {laps // 2, (laps + 1) // 2}


def test_large_wear_with_safety_cars_stays_near_the_middle():
    r = run(laps=50, tyre_wear=1.0, safety_car_prob=0.05, iterations=20_000)
    assert abs(r["best_pit_lap"] - 25) <= 2


def test_pit_loss_shifts_every_lap_equally_without_safety_car():
    base = run(laps=30, pit_loss=10.0, safety_car_prob=0.0, iterations=3000)
    dear = run(laps=30, pit_loss=35.0, safety_car_prob=0.0, iterations=3000)
    assert dear["best_pit_lap"] == base["best_pit_lap"]
    for k, m in means(dear).items():
        assert math.isclose(m - means(base)[k], 25.0, abs_tol=2e-3)


def test_noise_spread_matches_theory_across_blocks():
    # laps=200 and 30k iterations span several internal blocks; the sum of 200 N(0, 0.3^2)
    # lap noises has sd 0.3 * sqrt(200).
    r = run(laps=200, lap_noise=0.3, safety_car_prob=0.0, iterations=30_000)
    assert math.isclose(r["std"], 0.3 * math.sqrt(200), rel_tol=0.03)


def test_safety_car_everywhere_is_deterministic():
    laps, base, pit, factor = 20, 100.0, 20.0, 0.5
    r = run(
        laps=laps,
        base_lap=base,
        tyre_wear=0.0,
        tyre_wear2=0.0,
        pit_loss=pit,
        lap_noise=0.0,
        safety_car_prob=1.0,
        sc_pit_factor=factor,
        iterations=100,
    )
    expected = laps * base * sim.SC_SLOWDOWN + pit * factor
    assert all(math.isclose(m, expected, abs_tol=1e-3) for m in means(r).values())


def test_pitting_under_safety_car_is_cheaper_at_the_modelled_rate():
    # Same seed -> same safety cars; only the pit cost differs. For a mid-race lap the safety
    # car is out with probability 1 - (1 - q)^d, and then the stop costs pit_loss * factor.
    q, d, factor, loss = 0.1, 3, 0.5, 40.0
    kw = dict(laps=30, safety_car_prob=q, safety_car_laps=d, sc_pit_factor=factor, iterations=20_000, seed=3)
    free, paid = means(run(pit_loss=0.0, **kw)), means(run(pit_loss=loss, **kw))
    rate = 1 - (1 - q) ** d
    expected = loss * (1 - (1 - factor) * rate)
    assert math.isclose(paid[15] - free[15], expected, abs_tol=loss * 0.02)


@pytest.mark.parametrize(
    "bad",
    [
        {"laps": 1},
        {"laps": 201},
        {"iterations": 0},
        {"iterations": 200_001},
        {"base_lap": 0},
        {"pit_loss": -1},
        {"tyre_wear": -0.1},
        {"lap_noise": -1},
        {"safety_car_prob": 1.5},
        {"sc_pit_factor": 2},
        {"seed": -1},
        {"unknown": 1},
        {"laps": "many"},
    ],
)
def test_invalid_params_rejected(bad):
    with pytest.raises(ValidationError):
        P(**bad)


def test_params_are_hashable_cache_keys():
    assert P(laps=10) == P(laps=10) and hash(P(laps=10)) == hash(P(laps=10))
    assert P(laps=10) != P(laps=11)


def test_lru_cache_evicts_least_recently_used():
    cache = sim.LRUCache(2)
    a, b, c = P(laps=3), P(laps=4), P(laps=5)
    cache.put(a, {"x": 1})
    cache.put(b, {"x": 2})
    assert cache.get(a) == {"x": 1}  # a is now the most recent
    cache.put(c, {"x": 3})
    assert cache.get(b) is None and cache.get(a) == {"x": 1} and cache.get(c) == {"x": 3}
