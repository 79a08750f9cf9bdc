"""Prometheus metrics.

Hot-path metrics are label children bound once per service (no `.labels()` lookup per request);
state that already lives in the registry (breaker state, instance health) is read at scrape time
by a collector, so it costs nothing per request. With several workers, prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `bridgeway serve`) sums them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
NO_SERVICE = "-"  # label for requests that matched no service: never echo a client's path into a label

REGISTRY = CollectorRegistry(auto_describe=True)
_requests = Counter("bridgeway_requests", "Requests answered, by service and status", ["service", "status"], registry=REGISTRY)
_duration = Histogram(
    "bridgeway_request_duration_seconds", "Whole request, gateway in to response head out", ["service"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
_upstream = Histogram(
    "bridgeway_upstream_duration_seconds", "One upstream try, request out to response head in", ["service"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
_inflight = Gauge(
    "bridgeway_requests_in_flight", "Requests in flight", ["service"], multiprocess_mode="livesum", registry=REGISTRY
)
_retries = Counter("bridgeway_retries", "Upstream tries after the first", ["service"], registry=REGISTRY)
_upstream_errors = Counter(
    "bridgeway_upstream_errors", "Failed upstream tries, by error code", ["service", "code"], registry=REGISTRY
)
_reloads = Counter("bridgeway_config_reloads", "Config reloads, by result", ["result"], registry=REGISTRY)


class ServiceMetrics:
    """The metric children of one service, bound once when its route is compiled."""

    __slots__ = ("name", "duration", "upstream", "inflight", "retries", "_status", "_errors")

    def __init__(self, name: str):
        self.name = name
        self.duration = _duration.labels(name)
        self.upstream = _upstream.labels(name)
        self.inflight = _inflight.labels(name)
        self.retries = _retries.labels(name)
        self._status: dict[int, Counter] = {}
        self._errors: dict[str, Counter] = {}

    def answered(self, status: int, seconds: float) -> None:
        child = self._status.get(status)
        if child is None:
            child = self._status[status] = _requests.labels(self.name, str(status))
        child.inc()
        self.duration.observe(seconds)

    def upstream_error(self, code: str) -> None:
        child = self._errors.get(code)
        if child is None:
            child = self._errors[code] = _upstream_errors.labels(self.name, code)
        child.inc()


UNMATCHED = ServiceMetrics(NO_SERVICE)


def config_reloaded(ok: bool) -> None:
    _reloads.labels("ok" if ok else "rejected").inc()


class StateCollector(Collector):
    """Breaker state and instance health, read from the registry when scraped."""

    def __init__(self, snapshot: Callable[[], Iterable[dict]]):
        self._snapshot = snapshot

    def collect(self):
        breaker = GaugeMetricFamily(
            "bridgeway_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=["service"]
        )
        healthy = GaugeMetricFamily(
            "bridgeway_instance_healthy", "1 if the instance takes traffic", labels=["service", "instance"]
        )
        for service in self._snapshot():
            breaker.add_metric([service["name"]], BREAKER_STATES[service["breaker"]["state"]])
            for inst in service["instances"]:
                healthy.add_metric([service["name"], inst["url"]], 1 if inst["available"] else 0)
        yield breaker
        yield healthy


def render(state: Collector) -> tuple[bytes, str]:
    """The /metrics body: this worker's (or, in multiprocess mode, all workers') metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(state)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        yield from self._registry.collect()
