"""The event bus's metrics, in /metrics beside the data plane's: plain counters this worker adds
to, rendered only when scraped, summed over workers through `metrics.register_section`.
Labels are subscription names from config or the API, never a URL."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bridgeway.observability import metrics

_EVENTS: dict = {"published": 0, "duplicates": 0, "delivered": {}, "failures": {}, "dead": {}, "lag": {}}


def published(created: int, duplicates: int) -> None:
    _EVENTS["published"] += created
    _EVENTS["duplicates"] += duplicates


def delivered(subscription: str) -> None:
    counts = _EVENTS["delivered"]
    counts[subscription] = counts.get(subscription, 0) + 1


def webhook_failed(subscription: str) -> None:
    counts = _EVENTS["failures"]
    counts[subscription] = counts.get(subscription, 0) + 1


def dead_lettered(subscription: str) -> None:
    counts = _EVENTS["dead"]
    counts[subscription] = counts.get(subscription, 0) + 1


def subscription_lag(subscription: str, events: int | None) -> None:
    """Events after the subscription's cursor, as this worker (delivering it) sees; None: it no
    longer delivers it."""
    if events is None:
        _EVENTS["lag"].pop(subscription, None)
    else:
        _EVENTS["lag"][subscription] = events


def _families(workers: list[tuple[dict, bool]]) -> Iterable:
    published_ = CounterMetricFamily("bridgeway_events_published", "Events stored in the event log")
    duplicates = CounterMetricFamily(
        "bridgeway_events_duplicates", "Events published again within the dedupe window, not stored twice"
    )
    delivered_ = CounterMetricFamily(
        "bridgeway_events_delivered",
        "Events a webhook subscription's receiver accepted",
        labels=["subscription"],
    )
    failures = CounterMetricFamily(
        "bridgeway_webhook_failures",
        "Webhook posts that failed (retried, or dead-lettered after the last attempt)",
        labels=["subscription"],
    )
    dead = CounterMetricFamily(
        "bridgeway_webhook_dead_letters",
        "Events a webhook subscription gave up on after its attempts (kept as dead letters)",
        labels=["subscription"],
    )
    lag = GaugeMetricFamily(
        "bridgeway_subscription_lag",
        "Events in the log after a webhook subscription's cursor",
        labels=["subscription"],
    )
    counts = {"published": 0, "duplicates": 0}
    by_subscription: dict[str, dict[str, float]] = {"delivered": {}, "failures": {}, "dead": {}, "lag": {}}
    for events, alive in workers:
        for key in counts:
            counts[key] += events.get(key, 0)
        for key, totals in by_subscription.items():
            if key == "lag" and not alive:  # a gauge: only what running workers see
                continue
            for name, n in (events.get(key) or {}).items():
                totals[name] = totals.get(name, 0) + n
    published_.add_metric([], counts["published"])
    duplicates.add_metric([], counts["duplicates"])
    for family, key in ((delivered_, "delivered"), (failures, "failures"), (dead, "dead"), (lag, "lag")):
        for name, n in sorted(by_subscription[key].items()):
            family.add_metric([name], n)
    yield from (published_, duplicates, delivered_, failures, dead, lag)


metrics.register_section("events", lambda: _EVENTS, _families)
