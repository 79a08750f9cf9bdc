"""Prometheus metrics, cheap on the hot path.

A request costs a few integer additions on its service's `ServiceMetrics` (no locks, no label
lookups); prometheus-client renders them, with breaker and instance state read from the
registry, only when `/metrics` is scraped. With several workers each worker also writes its
counters to a file in a shared directory once a second, and a scrape sums every worker's file
(counters of exited workers are kept, as prometheus-client's multiprocess mode does; their
in-flight gauges are not).
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from bridgeway.workers import shared_dir

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
NO_SERVICE = "-"  # label for requests that matched no service: never echo a client's path into a label


class Histogram:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds


def histogram_buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts as prometheus-client wants them: cumulative, the last one +Inf."""
    cumulative, buckets = 0, []
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return buckets


class ServiceMetrics:
    """The counters of one service; the proxy adds to them directly."""

    __slots__ = (
        "name",
        "inflight",
        "retries",
        "limiter_unavailable",
        "cache_hits",
        "cache_misses",
        "cache_stores",
        "cache_errors",
        "statuses",
        "errors",
        "duration",
        "upstream",
    )

    def __init__(self, name: str):
        self.name = name
        self.inflight = 0
        self.retries = 0
        self.limiter_unavailable = 0
        self.cache_hits = 0  # answered from the cache
        self.cache_misses = 0  # looked up, went upstream
        self.cache_stores = 0  # answers stored
        self.cache_errors = 0  # shared tier (state backend) failed or timed out
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.duration = Histogram()
        self.upstream = Histogram()
        _ALL[name] = self

    def answered(self, status: int, seconds: float) -> None:
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.duration.observe(seconds)

    def upstream_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def dump(self) -> dict:
        return {
            "inflight": self.inflight,
            "retries": self.retries,
            "limiter_unavailable": self.limiter_unavailable,
            "cache": [self.cache_hits, self.cache_misses, self.cache_stores, self.cache_errors],
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "errors": self.errors,
            "duration": [self.duration.counts, self.duration.sum],
            "upstream": [self.upstream.counts, self.upstream.sum],
        }


_ALL: dict[str, ServiceMetrics] = {}
# Other parts' metrics (the LLM router's, the event bus's): name -> (this worker's counters as
# JSON-able data, every worker's (data, still running) -> metric families; a gauge counts only
# running workers). Registered by the part itself, so this module does not import it.
Families = Callable[[list[tuple[dict, bool]]], Iterable]
_SECTIONS: dict[str, tuple[Callable[[], dict], Families]] = {}


def register_section(name: str, dump: Callable[[], dict], families: Families) -> None:
    _SECTIONS[name] = (dump, families)


_RELOADS = {"ok": 0, "rejected": 0}
_AUDIT = {"dropped": 0}
# The event bus: counters, and the lag of the webhook subscriptions this worker delivers.


def for_service(name: str) -> ServiceMetrics:
    """One counter set per service name for the life of the process: reloads keep counting."""
    return _ALL.get(name) or ServiceMetrics(name)


UNMATCHED = for_service(NO_SERVICE)


def config_reloaded(ok: bool) -> None:
    _RELOADS["ok" if ok else "rejected"] += 1


def audit_dropped(count: int) -> None:
    _AUDIT["dropped"] += count


def _snapshot() -> dict:
    snap = {
        "services": {name: m.dump() for name, m in _ALL.items()},
        "reloads": _RELOADS,
        "audit": _AUDIT,
    }
    for name, (dump, _) in _SECTIONS.items():
        snap[name] = dump()
    return snap


def write_snapshot() -> None:
    """With several workers: publish this worker's counters for whoever answers the scrape."""
    directory = shared_dir("metrics")
    if directory:
        path = directory / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(_snapshot()))
        tmp.replace(path)


def _all_workers() -> list[tuple[dict, bool]]:
    """Every worker's snapshot, and whether that worker still runs; this one's is fresh."""
    directory = shared_dir("metrics")
    if not directory:
        return [(_snapshot(), True)]
    own = f"{os.getpid()}.json"
    out = [(_snapshot(), True)]
    for path in directory.glob("*.json"):
        if path.name == own:
            continue
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            out.append((orjson.loads(path.read_bytes()), _alive(int(path.stem))))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Collector(Collector):
    def __init__(self, state: Callable[[], Iterable[dict]]):
        self._state = state

    def collect(self):
        requests = CounterMetricFamily(
            "bridgeway_requests", "Requests answered", labels=["service", "status"]
        )
        inflight = GaugeMetricFamily("bridgeway_requests_in_flight", "Requests in flight", labels=["service"])
        retries = CounterMetricFamily(
            "bridgeway_retries", "Upstream tries after the first", labels=["service"]
        )
        unavailable = CounterMetricFamily(
            "bridgeway_ratelimit_unavailable",
            "Limit checks the shared limiter could not answer",
            labels=["service"],
        )
        errors = CounterMetricFamily(
            "bridgeway_upstream_errors", "Failed upstream tries, by error code", labels=["service", "code"]
        )
        cache = [
            CounterMetricFamily(
                "bridgeway_cache_hits", "Requests answered from the cache", labels=["service"]
            ),
            CounterMetricFamily(
                "bridgeway_cache_misses", "Cache lookups that went upstream", labels=["service"]
            ),
            CounterMetricFamily("bridgeway_cache_stores", "Answers stored in the cache", labels=["service"]),
            CounterMetricFamily(
                "bridgeway_cache_errors",
                "Cache reads and writes the shared tier (state backend) failed",
                labels=["service"],
            ),
        ]
        reloads = CounterMetricFamily(
            "bridgeway_config_reloads", "Config reloads, by result", labels=["result"]
        )
        audit_dropped = CounterMetricFamily(
            "bridgeway_audit_dropped", "Audit records dropped: the queue to the state backend was full"
        )
        dropped = 0
        totals: dict = {}
        workers = _all_workers()
        for snap, alive in workers:
            for name, m in snap["services"].items():
                t = totals.setdefault(
                    name,
                    {
                        "inflight": 0,
                        "retries": 0,
                        "limiter_unavailable": 0,
                        "cache": [0, 0, 0, 0],
                        "statuses": {},
                        "errors": {},
                        "duration": None,
                        "upstream": None,
                    },
                )
                t["inflight"] += m["inflight"] if alive else 0
                t["retries"] += m["retries"]
                t["limiter_unavailable"] += m.get("limiter_unavailable", 0)
                t["cache"] = [a + b for a, b in zip(t["cache"], m.get("cache", (0, 0, 0, 0)), strict=True)]
                for key in ("statuses", "errors"):
                    for k, v in m[key].items():
                        t[key][k] = t[key].get(k, 0) + v
                for key in ("duration", "upstream"):
                    counts, total = m[key]
                    if t[key] is None:
                        t[key] = [list(counts), total]
                    else:
                        t[key] = [[a + b for a, b in zip(t[key][0], counts, strict=True)], t[key][1] + total]
            dropped += snap.get("audit", {}).get("dropped", 0)
            for result, n in snap["reloads"].items():
                totals.setdefault("_reloads", {}).setdefault(result, 0)
                totals["_reloads"][result] += n
        for section, (_, families) in _SECTIONS.items():
            yield from families([(snap[section], alive) for snap, alive in workers if section in snap])
        for result, n in totals.pop("_reloads", {}).items():
            reloads.add_metric([result], n)
        yield reloads
        audit_dropped.add_metric([], dropped)
        yield audit_dropped
        histograms = {
            "duration": HistogramMetricFamily(
                "bridgeway_request_duration_seconds",
                "Whole request, as the gateway saw it",
                labels=["service"],
            ),
            "upstream": HistogramMetricFamily(
                "bridgeway_upstream_duration_seconds",
                "One upstream try, request out to response head in",
                labels=["service"],
            ),
        }
        for name, t in sorted(totals.items()):
            inflight.add_metric([name], t["inflight"])
            retries.add_metric([name], t["retries"])
            unavailable.add_metric([name], t["limiter_unavailable"])
            for family, n in zip(cache, t["cache"], strict=True):
                family.add_metric([name], n)
            for status, n in sorted(t["statuses"].items()):
                requests.add_metric([name, str(status)], n)
            for code, n in sorted(t["errors"].items()):
                errors.add_metric([name, code], n)
            for key, family in histograms.items():
                counts, total = t[key]
                family.add_metric([name], histogram_buckets(LATENCY_BUCKETS, counts), total)
        yield from (requests, inflight, retries, unavailable, errors, *cache, *histograms.values())

        breaker = GaugeMetricFamily(
            "bridgeway_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=["service"]
        )
        healthy = GaugeMetricFamily(
            "bridgeway_instance_healthy", "1 if the instance takes traffic", labels=["service", "instance"]
        )
        for service in self._state():
            breaker.add_metric([service["name"]], BREAKER_STATES[service["breaker"]["state"]])
            for inst in service["instances"]:
                healthy.add_metric([service["name"], inst["url"]], 1 if inst["available"] else 0)
        yield breaker
        yield healthy


def render(state: Callable[[], Iterable[dict]]) -> tuple[bytes, str]:
    """The /metrics body and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state))
    return generate_latest(registry), CONTENT_TYPE_LATEST
