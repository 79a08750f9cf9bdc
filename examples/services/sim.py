"""Monte Carlo race-strategy simulator: a small, real FastAPI service behind Bridgeway.

Question it answers: in a one-stop race, on which lap should the car pit?

Serve it with::

    python -m bridgeway.serving --app-dir examples/services sim:app

Endpoints
    POST /simulate     JSON body (see ``SimParams``) -> result
    GET  /simulate     the same parameters as a query string (handy for curl)
    GET  /health       {"status": "ok"}
    POST /heartbeat    any JSON -> {"received": true, "at": "<iso time>", "count": n}
    GET  /heartbeat    {"count": n, "last": <last JSON received or null>, "at": ...}

Every response carries ``X-Instance`` (env ``SIM_NAME``, default ``sim``); /simulate also
carries ``X-Cache: HIT|MISS``. Identical parameters with a fixed seed are served from an
in-process LRU cache of 256 results.

The model (``simulate``) is a pure function of ``SimParams`` and is independent of the web
layer below it, so tests can call it directly.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI, Query, Response
from pydantic import BaseModel, ConfigDict, Field

MAX_ITERATIONS = 200_000
DEFAULT_SEED = 42

# Laps run behind the safety car are this much slower than a racing lap.
SC_SLOWDOWN = 1.4
# The model is vectorised over (iterations x laps); iterations are processed in blocks of at
# most this many cells so that memory stays bounded (~tens of MB) even at 200k x 200.
_BLOCK_CELLS = 1 << 21


class SimParams(BaseModel):
    """Parameters of one simulation. Frozen, so a validated instance is a cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    laps: int = Field(50, ge=2, le=200, description="race distance in laps")
    base_lap: float = Field(90.0, gt=0, le=1000, description="lap time on new tyres, seconds")
    tyre_wear: float = Field(0.08, ge=0, le=10, description="seconds lost per lap of tyre age")
    tyre_wear2: float = Field(
        0.002, ge=0, le=1, description="quadratic wear term: seconds lost per (lap of age)^2"
    )
    pit_loss: float = Field(21.0, ge=0, le=300, description="time lost by a green-flag pit stop, s")
    lap_noise: float = Field(0.3, ge=0, le=30, description="standard deviation of a lap time, s")
    safety_car_prob: float = Field(
        0.02, ge=0, le=1, description="probability that a safety car is deployed on a given lap"
    )
    safety_car_laps: int = Field(3, ge=1, le=20, description="laps a safety car period lasts")
    sc_pit_factor: float = Field(
        0.5, ge=0, le=1, description="fraction of pit_loss paid when pitting under the safety car"
    )
    iterations: int = Field(10_000, ge=1, le=MAX_ITERATIONS, description="Monte Carlo samples")
    seed: int | None = Field(
        DEFAULT_SEED,
        ge=0,
        description="random seed; the default makes results reproducible, null draws a fresh one "
        "(and bypasses the cache)",
    )


def _tyre_age(laps: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pit laps and the tyre age on every lap for each candidate.

    Pitting "on lap k" means the car comes in at the end of lap k (k = 1 .. laps-1), so laps
    1..k run on the first set and laps k+1..laps on the second. Age is 0 on a stint's first lap.
    Returns ``pit_laps`` (P,) and ``age`` (P, laps).
    """
    pit_laps = np.arange(1, laps)  # (P,)
    lap = np.arange(laps)  # 0-based lap index (laps,)
    first_stint = lap[None, :] < pit_laps[:, None]  # (P, laps)
    age = np.where(first_stint, lap[None, :], lap[None, :] - pit_laps[:, None])
    return pit_laps, age


def _safety_car_block(rng: np.random.Generator, n: int, laps: int, prob: float, duration: int) -> np.ndarray:
    """(n, laps) booleans: is the safety car out on this lap, for n simulated races.

    A deployment on lap i keeps the car out for laps i .. i+duration-1. Computed with a
    running count of deployments over a sliding window, so no Python loop over laps.
    """
    deployed = rng.random((n, laps)) < prob
    count = np.cumsum(deployed, axis=1, dtype=np.int32)
    window = count.copy()
    window[:, duration:] -= count[:, :-duration]  # deployments in the last `duration` laps
    return window > 0


def simulate(params: SimParams) -> dict[str, Any]:
    """Run the Monte Carlo model; pure function of ``params`` (seeded) -> JSON-able dict.

    Total race time of one simulated race for pit lap k:

        laps * base_lap                      racing laps on new tyres
      + sum over laps of wear(age)           deterministic tyre degradation, depends on k
      + pit_loss * (sc_pit_factor if the safety car is out on lap k else 1)
      + (SC_SLOWDOWN - 1) * base_lap * (number of safety-car laps)
      + sum of per-lap noise                 N(0, lap_noise^2) per lap

    All candidates are evaluated on the *same* random races (common random numbers), so the
    comparison between pit laps is not blurred by sampling noise.
    """
    p = params
    started = time.perf_counter()
    rng = np.random.default_rng(p.seed)

    pit_laps, age = _tyre_age(p.laps)
    # Degradation is mildly nonlinear in tyre age: wear*age + wear2*age^2, summed over the race.
    degradation = (p.tyre_wear * age + p.tyre_wear2 * age.astype(np.float64) ** 2).sum(axis=1)  # (P,)
    fixed = p.laps * p.base_lap + degradation  # (P,) everything that is not random

    n_iter = p.iterations
    common = np.empty(n_iter)  # (I,) random time shared by every candidate in one race
    sc_at_pit = np.empty((n_iter, pit_laps.size), dtype=bool)  # (I, P) safety car out on lap k?

    block = max(1, _BLOCK_CELLS // p.laps)
    for start in range(0, n_iter, block):  # blocks of iterations, each fully vectorised
        n = min(block, n_iter - start)
        sc = _safety_car_block(rng, n, p.laps, p.safety_car_prob, p.safety_car_laps)
        # Sum of `laps` independent N(0, sd^2) lap noises is N(0, laps * sd^2).
        noise = rng.normal(0.0, p.lap_noise * math.sqrt(p.laps), size=n)
        sc_slow = sc.sum(axis=1) * (SC_SLOWDOWN - 1.0) * p.base_lap
        common[start : start + n] = noise + sc_slow
        sc_at_pit[start : start + n] = sc[:, pit_laps - 1]  # lap k is column k-1

    # Pit cost per race and candidate, (I, P): cheaper when the safety car is out.
    # Means are taken column-wise without materialising the (I, P) float matrix:
    #   mean(total[:, k]) = fixed[k] + mean(common) + pit_loss * (1 - (1 - f) * P(sc on lap k))
    discount = p.pit_loss * (1.0 - p.sc_pit_factor)
    sc_rate = sc_at_pit.mean(axis=0)  # (P,)
    means = fixed + common.mean() + p.pit_loss - discount * sc_rate  # (P,)

    best = int(np.argmin(means))
    best_totals = fixed[best] + common + p.pit_loss - discount * sc_at_pit[:, best]  # (I,)
    p5, p50, p95 = np.percentile(best_totals, [5, 50, 95])

    return {
        "best_pit_lap": int(pit_laps[best]),
        "expected_time": round(float(means[best]), 4),
        "std": round(float(best_totals.std()), 4),
        "percentiles": {"p5": round(float(p5), 4), "p50": round(float(p50), 4), "p95": round(float(p95), 4)},
        "by_lap": [{"lap": int(k), "mean": round(float(m), 3)} for k, m in zip(pit_laps, means, strict=True)],
        "iterations": n_iter,
        "seed": p.seed,
        "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "cached": False,
    }


# ----------------------------------------------------------------------------------------------
# Web layer
# ----------------------------------------------------------------------------------------------

INSTANCE = os.environ.get("SIM_NAME", "sim")
CACHE_SIZE = 256


class LRUCache:
    """A small thread-safe LRU (sync endpoints run in a thread pool)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[SimParams, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: SimParams) -> dict[str, Any] | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: SimParams, value: dict[str, Any]) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


cache = LRUCache(CACHE_SIZE)


class InstanceHeader:
    """Pure ASGI middleware: add ``X-Instance`` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.header = (b"x-instance", INSTANCE.encode("latin-1"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


app = FastAPI(
    title="Race strategy simulator",
    version="1.0.0",
    description="Monte Carlo one-stop race strategy: which lap to pit on. A sample upstream for Bridgeway.",
)
app.add_middleware(InstanceHeader)


def _run(params: SimParams, response: Response) -> dict[str, Any]:
    started = time.perf_counter()
    cacheable = params.seed is not None
    hit = cache.get(params) if cacheable else None
    if hit is not None:
        result = {**hit, "cached": True}
    else:
        result = simulate(params)
        if cacheable:
            cache.put(params, result)
    # elapsed_ms is the time this request spent: the full simulation on a MISS, a lookup on a HIT.
    result["elapsed_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
    response.headers["X-Cache"] = "HIT" if hit is not None else "MISS"
    return result


# Sync handlers: FastAPI runs them in its thread pool, so a long simulation does not stall the loop.
@app.post("/simulate")
def simulate_post(response: Response, params: Annotated[SimParams, Body()] = SimParams()) -> dict[str, Any]:  # noqa: B008
    return _run(params, response)


@app.get("/simulate")
def simulate_get(response: Response, params: Annotated[SimParams, Query()]) -> dict[str, Any]:
    return _run(params, response)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


_heartbeats: dict[str, Any] = {"count": 0, "last": None, "at": None}


@app.post("/heartbeat")
async def heartbeat(payload: Annotated[Any, Body()] = None) -> dict[str, Any]:
    at = datetime.now(UTC).isoformat()
    _heartbeats.update(count=_heartbeats["count"] + 1, last=payload, at=at)
    return {"received": True, "at": at, "count": _heartbeats["count"], "instance": INSTANCE}


@app.get("/heartbeat")
async def heartbeat_stats() -> dict[str, Any]:
    return {**_heartbeats, "instance": INSTANCE}
