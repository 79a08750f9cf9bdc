"""Model groups: which deployment serves a public model name, and in what order the others are
tried when it fails. Pure: the clock and the random source are passed in.

A group orders its deployments by its strategy and skips those cooling down (a circuit breaker
per deployment: `failures` in a row rest it for `open_for`, then one probe at a time may bring it
back). The fallback chain is the group's own order followed by each fallback group's.

    weighted        random, in proportion to `weight` (the rest follow in the same weighted draw)
    least_busy      fewest requests in flight
    lowest_latency  lowest moving average of the time to the first byte; untried ones first
    lowest_cost     cheapest by the price table (input + output per 1M tokens)
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from bridgeway.config.models import ModelGroupConfig
from bridgeway.dataplane.breaker import CircuitBreaker, Ticket
from bridgeway.llm.providers import Deployment

_EWMA = 0.3  # weight of the newest latency sample


class Deployed:
    """One deployment and what the router has learnt about it."""

    __slots__ = ("deployment", "weight", "timeout", "price", "inflight", "latency", "breaker")

    def __init__(self, deployment: Deployment, weight: float, timeout: float, price: float, breaker):
        self.deployment = deployment
        self.weight = weight
        self.timeout = timeout
        self.price = price  # input + output USD per 1M tokens, for ordering by cost
        self.inflight = 0
        self.latency: float | None = None  # EWMA seconds to the first byte
        self.breaker: CircuitBreaker = breaker

    def admit(self, now: float) -> Ticket | None:
        return self.breaker.admit(now)

    def done(self, ticket: Ticket, ok: bool, now: float, latency: float | None = None) -> None:
        self.breaker.record(ticket, ok, now)
        if ok and latency is not None:
            self.latency = (
                latency if self.latency is None else self.latency + _EWMA * (latency - self.latency)
            )

    def snapshot(self, now: float) -> dict:
        d = self.deployment
        return {
            "provider": d.provider,
            "model": d.model,
            "base_url": d.base_url,
            "inflight": self.inflight,
            "latency_ms": round(self.latency * 1000, 1) if self.latency is not None else None,
            "breaker": self.breaker.state(now).value,
        }


class ModelGroup:
    def __init__(self, name: str, config: ModelGroupConfig, deployed: list[Deployed]):
        self.name = name
        self.strategy = config.strategy
        self.fallbacks = config.fallbacks
        self.deployed = deployed

    def ordered(self, rng: random.Random) -> list[Deployed]:
        """This group's deployments, best first by the strategy."""
        items = self.deployed
        if len(items) == 1:  # the common group: nothing to order, no random draw
            return items
        if self.strategy == "least_busy":
            return sorted(items, key=lambda x: x.inflight)
        if self.strategy == "lowest_latency":
            return sorted(items, key=lambda x: -1.0 if x.latency is None else x.latency)
        if self.strategy == "lowest_cost":
            return sorted(items, key=lambda x: x.price)
        # Weighted draw without replacement (Efraimidis-Spirakis): key u^(1/w), highest first.
        return sorted(items, key=lambda x: rng.random() ** (1.0 / x.weight), reverse=True)


class Router:
    """Every model group of one config."""

    def __init__(self, groups: dict[str, ModelGroup], rng: random.Random | None = None):
        self.groups = groups
        self.rng = rng or random.Random()

    def chain(self, model: str) -> Iterator[tuple[ModelGroup, Deployed]]:
        """The deployments to try for `model`, in order: its group's, then its fallbacks'."""
        seen: set[int] = set()
        for name in (model, *self.groups[model].fallbacks):
            group = self.groups[name]
            for item in group.ordered(self.rng):
                if id(item) not in seen:
                    seen.add(id(item))
                    yield group, item
