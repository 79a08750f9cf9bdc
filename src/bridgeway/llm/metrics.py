"""The LLM router's metrics, in /metrics beside the data plane's.

Per model group (the one that served: a router name like `auto` is resolved first), plain
counters a request adds to once, when it ends (`Tally`); prometheus-client renders them only
when scraped, summed over workers through `metrics.register_section`. Labels come from config
only (group names, `provider/model` of deployments, error codes, statuses): never a key, a
prompt or a name a client made up (an unknown model counts as `-`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from bridgeway.observability import metrics
from bridgeway.observability.metrics import Histogram, histogram_buckets

NONE = "-"  # no group (unknown model), or no deployment (refused, or answered from the cache)
# Whole LLM calls and times to the first token are seconds, not milliseconds.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Tally:
    """One request as the metrics see it, filled in as it goes."""

    __slots__ = ("model", "deployment", "status", "started", "first_token", "usage", "fallbacks", "cache")

    def __init__(self) -> None:
        self.model = NONE
        self.deployment = NONE
        self.status = 500
        self.started = time.perf_counter()
        self.first_token: float | None = None  # perf_counter when a stream's first content came
        self.usage: dict | None = None  # OpenAI usage, as the provider told it
        self.fallbacks: list[str] = []  # why each deployment before the one that answered was passed
        self.cache: str | None = None  # "hit", "miss" or None (the group does not cache)


class ModelMetrics:
    __slots__ = (
        "name",
        "requests",
        "tokens",
        "duration",
        "first_token",
        "fallbacks",
        "routed",
        "cache_hits",
        "cache_misses",
        "cache_stores",
        "cache_errors",
    )

    def __init__(self, name: str):
        self.name = name
        self.requests: dict[tuple[str, int], int] = {}  # (deployment, status)
        self.tokens: dict[tuple[str, str], int] = {}  # (deployment, "input" | "output")
        self.duration = Histogram(BUCKETS)
        self.first_token = Histogram(BUCKETS)
        self.fallbacks: dict[str, int] = {}  # code -> deployments passed over
        self.routed: dict[str, int] = {}  # router name -> requests it sent here
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_stores = 0
        self.cache_errors = 0  # the shared tier failed (the data plane's cache counts the same)

    def dump(self) -> dict:
        return {
            "requests": [[d, s, n] for (d, s), n in self.requests.items()],
            "tokens": [[d, k, n] for (d, k), n in self.tokens.items()],
            "duration": [self.duration.counts, self.duration.sum],
            "first_token": [self.first_token.counts, self.first_token.sum],
            "fallbacks": self.fallbacks,
            "routed": self.routed,
            "cache": [self.cache_hits, self.cache_misses, self.cache_stores, self.cache_errors],
        }


_ALL: dict[str, ModelMetrics] = {}


def for_model(name: str) -> ModelMetrics:
    """One counter set per group name for the life of the process: reloads keep counting."""
    m = _ALL.get(name)
    if m is None:
        m = _ALL[name] = ModelMetrics(name)
    return m


def finish(t: Tally) -> None:
    """Count a request that ended."""
    m = for_model(t.model)
    key = (t.deployment, t.status)
    m.requests[key] = m.requests.get(key, 0) + 1
    now = time.perf_counter()
    m.duration.observe(now - t.started)
    if t.first_token is not None:
        m.first_token.observe(t.first_token - t.started)
    for code in t.fallbacks:
        m.fallbacks[code] = m.fallbacks.get(code, 0) + 1
    usage = t.usage
    if usage and t.cache != "hit":  # a cached answer cost no tokens
        for kind, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            n = usage.get(field)
            if isinstance(n, int) and n > 0:
                k = (t.deployment, kind)
                m.tokens[k] = m.tokens.get(k, 0) + n


def routed(router: str, model: str) -> None:
    m = for_model(model)
    m.routed[router] = m.routed.get(router, 0) + 1


def _dump() -> dict:
    return {name: m.dump() for name, m in _ALL.items()}


def _families(workers: list[tuple[dict, bool]]) -> Iterable:
    requests = CounterMetricFamily(
        "bridgeway_llm_requests", "LLM requests answered", labels=["model", "deployment", "status"]
    )
    tokens = CounterMetricFamily(
        "bridgeway_llm_tokens",
        "Tokens, as the providers counted them",
        labels=["model", "deployment", "direction"],
    )
    fallbacks = CounterMetricFamily(
        "bridgeway_llm_fallbacks",
        "Deployments passed over for the next one in the chain, by why",
        labels=["model", "code"],
    )
    routed_ = CounterMetricFamily(
        "bridgeway_llm_routed", "Requests a router name sent to a model group", labels=["router", "model"]
    )
    cache = [
        CounterMetricFamily("bridgeway_llm_cache_hits", "LLM answers from the cache", labels=["model"]),
        CounterMetricFamily(
            "bridgeway_llm_cache_misses", "LLM cache lookups that called a model", labels=["model"]
        ),
        CounterMetricFamily("bridgeway_llm_cache_stores", "LLM answers stored", labels=["model"]),
        CounterMetricFamily(
            "bridgeway_llm_cache_errors",
            "LLM cache reads and writes the state backend failed",
            labels=["model"],
        ),
    ]
    histograms = {
        "duration": HistogramMetricFamily(
            "bridgeway_llm_request_duration_seconds",
            "Whole LLM request, as the gateway saw it",
            labels=["model"],
        ),
        "first_token": HistogramMetricFamily(
            "bridgeway_llm_time_to_first_token_seconds",
            "Streams: request in to the first content sent",
            labels=["model"],
        ),
    }
    totals: dict[str, dict] = {}
    for worker, _ in workers:
        for name, m in worker.items():
            t = totals.setdefault(
                name,
                {"requests": {}, "tokens": {}, "fallbacks": {}, "routed": {}, "cache": [0, 0, 0, 0]}
                | {k: [[0] * (len(BUCKETS) + 1), 0.0] for k in histograms},
            )
            for key in ("requests", "tokens"):
                for a, b, n in m[key]:
                    t[key][(a, b)] = t[key].get((a, b), 0) + n
            for key in ("fallbacks", "routed"):
                for k, n in m[key].items():
                    t[key][k] = t[key].get(k, 0) + n
            t["cache"] = [a + b for a, b in zip(t["cache"], m["cache"], strict=True)]
            for key in histograms:
                counts, total = m[key]
                t[key] = [[a + b for a, b in zip(t[key][0], counts, strict=True)], t[key][1] + total]
    for name, t in sorted(totals.items()):
        for (deployment, status), n in sorted(t["requests"].items()):
            requests.add_metric([name, deployment, str(status)], n)
        for (deployment, kind), n in sorted(t["tokens"].items()):
            tokens.add_metric([name, deployment, kind], n)
        for code, n in sorted(t["fallbacks"].items()):
            fallbacks.add_metric([name, code], n)
        for router, n in sorted(t["routed"].items()):
            routed_.add_metric([router, name], n)
        if name != NONE:
            for family, n in zip(cache, t["cache"], strict=True):
                family.add_metric([name], n)
        for key, family in histograms.items():
            counts, total = t[key]
            family.add_metric([name], histogram_buckets(BUCKETS, counts), total)
    yield from (requests, tokens, fallbacks, routed_, *cache, *histograms.values())


class SpendMetrics:
    """Spend and budgets (labels: the public model name, never a key: cardinality). Tokens are
    counted once, by `ModelMetrics`."""

    __slots__ = ("nano", "refusals", "write_failures", "store_unavailable", "limiter_unavailable")

    def __init__(self) -> None:
        self.nano: dict[str, int] = {}  # model -> nano-USD spent
        self.refusals = 0  # 429 BUDGET_EXCEEDED
        self.write_failures = 0  # answered calls whose spend could not be recorded
        self.store_unavailable = 0  # reserves the budget store could not answer
        self.limiter_unavailable = 0  # client rate limits on /v1 the shared limiter could not check

    def dump(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


SPEND = SpendMetrics()


def _spend_families(snapshots: list[tuple[dict, bool]]) -> Iterable:
    sums: dict = {"nano": {}}
    counts = dict.fromkeys(("refusals", "write_failures", "store_unavailable", "limiter_unavailable"), 0)
    for snap, _ in snapshots:
        for name, value in snap.items():
            if name in sums:
                for model, n in value.items():
                    sums[name][model] = sums[name].get(model, 0) + n
            elif name in counts:
                counts[name] += value
    usd = CounterMetricFamily("bridgeway_llm_spend_usd", "USD spent on LLM calls", labels=["model"])
    for model, n in sorted(sums["nano"].items()):
        usd.add_metric([model], n / 1e9)
    yield usd
    for name, help_ in (
        ("refusals", "LLM calls refused with BUDGET_EXCEEDED"),
        ("write_failures", "Answered LLM calls whose spend could not be recorded"),
        ("store_unavailable", "Budget reservations the state backend could not answer"),
        ("limiter_unavailable", "Client rate limits on /v1 the shared limiter could not check"),
    ):
        family = CounterMetricFamily(f"bridgeway_llm_budget_{name}", help_)
        family.add_metric([], counts[name])
        yield family


metrics.register_section("llm", _dump, _families)
metrics.register_section("llm_spend", SPEND.dump, _spend_families)
