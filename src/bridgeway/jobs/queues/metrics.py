"""The job queues' metrics, in /metrics beside the data plane's: per-queue counters the queue
service adds to (summed over workers through `metrics.register_section`), and gauges from the
backend's stats, which every worker reads from the one backend (so any running worker's last
look is the queue's)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bridgeway.jobs.queues.backend import QueueStats
from bridgeway.observability import metrics


class QueueMetrics:
    """The counters of one job queue."""

    __slots__ = ("enqueued", "delivered", "retried", "buried", "lost_leases")
    FIELDS = __slots__

    def __init__(self, name: str):
        self.enqueued = 0  # jobs stored (an idempotent repeat is not)
        self.delivered = 0  # acked
        self.retried = 0  # failed attempts that will be tried again
        self.buried = 0  # jobs that went to the dead-letter set
        self.lost_leases = 0  # outcomes refused: the lease had expired or was settled
        _QUEUES[name] = self

    def dump(self) -> list[int]:
        return [getattr(self, f) for f in self.FIELDS]


_QUEUES: dict[str, QueueMetrics] = {}
_STATS: dict[str, QueueStats] = {}  # this worker's last look at the backend


def for_queue(name: str) -> QueueMetrics:
    return _QUEUES.get(name) or QueueMetrics(name)


def set_stats(stats: dict[str, QueueStats]) -> None:
    _STATS.clear()
    _STATS.update(stats)


def _dump() -> dict:
    return {
        "counters": {name: m.dump() for name, m in _QUEUES.items()},
        "stats": {name: [s.queued, s.leased, s.dead, s.oldest_age] for name, s in _STATS.items()},
    }


_COUNTERS = {
    "enqueued": "Jobs stored",
    "delivered": "Jobs done (acknowledged)",
    "retried": "Failed attempts that will be tried again",
    "buried": "Jobs moved to the dead-letter set",
    "lost_leases": "Outcomes refused because the lease was lost",
}
_GAUGES = (
    ("bridgeway_queue_depth", "Jobs waiting, due or delayed"),
    ("bridgeway_queue_leased", "Jobs held by a consumer"),
    ("bridgeway_queue_dead", "Jobs in the dead-letter set"),
    ("bridgeway_queue_oldest_age_seconds", "Age of the oldest due job"),
)


def _families(workers: list[tuple[dict, bool]]) -> Iterable:
    totals: dict[str, list[int]] = {}
    stats: dict[str, list[float]] = {}
    for data, alive in workers:
        for name, counts in data["counters"].items():
            have = totals.get(name, [0] * len(counts))
            totals[name] = [a + b for a, b in zip(have, counts, strict=True)]
        if alive:
            stats.update(data["stats"])
    for i, field in enumerate(QueueMetrics.FIELDS):
        family = CounterMetricFamily(f"bridgeway_queue_{field}", _COUNTERS[field], labels=["queue"])
        for name, counts in sorted(totals.items()):
            family.add_metric([name], counts[i])
        yield family
    for i, (metric, text) in enumerate(_GAUGES):
        family = GaugeMetricFamily(metric, text, labels=["queue"])
        for name, values in sorted(stats.items()):
            family.add_metric([name], values[i])
        yield family


metrics.register_section("queues", _dump, _families)
