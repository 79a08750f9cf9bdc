"""Load balancers: pick one available instance per request.

Every balancer picks only among instances that are `available(now)` and not in `exclude` (the
instances a retry already tried); when every available instance is excluded it falls back to an
excluded one rather than fail; None means nothing is available.

The fast path (all sampled instances usable) allocates nothing; a filtered list is built only
when a sample hits an unavailable or excluded instance.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol

from bridgeway.dataplane.instance import Instance

__all__ = ["BALANCERS", "Balancer", "LeastRequests", "P2CEwma", "RoundRobin", "make_balancer"]

BALANCERS = ("round_robin", "least_requests", "p2c_ewma")


class Balancer(Protocol):
    name: str

    def pick(
        self, instances: Sequence[Instance], now: float, exclude: Collection[Instance] = ()
    ) -> Instance | None: ...


class RoundRobin:
    """Each usable instance in turn; skipping an unusable one does not favour its neighbour."""

    __slots__ = ("_next",)
    name = "round_robin"

    def __init__(self, start: int = 0) -> None:
        self._next = start  # staggered starts keep replicas from all hitting instance 0 first

    def pick(
        self, instances: Sequence[Instance], now: float, exclude: Collection[Instance] = ()
    ) -> Instance | None:
        n = len(instances)
        fallback = -1
        start = self._next
        for k in range(n):
            i = (start + k) % n
            inst = instances[i]
            if inst.available(now):
                if inst not in exclude:
                    self._next = i + 1
                    return inst
                if fallback < 0:
                    fallback = i
        if fallback < 0:
            return None
        self._next = fallback + 1
        return instances[fallback]


class _TwoChoices:
    """Power of two choices: two distinct random usable instances, keep the better one.

    With two or fewer usable instances that is an exact minimum. The pair comes out in random
    order and a tie keeps the first, so ties are broken at random for free.
    """

    __slots__ = ("_random",)
    name = ""

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random  # int(random() * n) is several times cheaper than randrange

    def _better(self, a: Instance, b: Instance, now: float) -> Instance:
        raise NotImplementedError

    def pick(
        self, instances: Sequence[Instance], now: float, exclude: Collection[Instance] = ()
    ) -> Instance | None:
        n = len(instances)
        if n >= 2:
            rand = self._random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            a, b = instances[i], instances[j + (j >= i)]
            if a.available(now) and b.available(now) and a not in exclude and b not in exclude:
                return self._better(a, b, now)
        elif n == 1:  # nothing to choose, nowhere else to retry
            return instances[0] if instances[0].available(now) else None
        usable = [inst for inst in instances if inst.available(now)]
        if exclude:
            usable = [inst for inst in usable if inst not in exclude] or usable
        n = len(usable)
        if n <= 1:
            return usable[0] if usable else None
        i = int(self._random() * n)
        j = int(self._random() * (n - 1))
        return self._better(usable[i], usable[j + (j >= i)], now)


class LeastRequests(_TwoChoices):
    """Fewest requests in flight (Envoy's least_request): p2c over `inflight`."""

    __slots__ = ()
    name = "least_requests"

    def _better(self, a: Instance, b: Instance, now: float) -> Instance:
        return b if b.inflight < a.inflight else a


class P2CEwma(_TwoChoices):
    """Lowest peak-EWMA load, latency * (inflight + 1) (Finagle and linkerd): p2c over `load(now)`."""

    __slots__ = ()
    name = "p2c_ewma"

    def _better(self, a: Instance, b: Instance, now: float) -> Instance:
        return b if b.load(now) < a.load(now) else a


def make_balancer(name: str, rng: random.Random | None = None) -> Balancer:
    """A fresh balancer by config name; one per service, since they keep state."""
    rng = rng or random.Random()
    if name == "round_robin":
        return RoundRobin(start=rng.randrange(1 << 16))
    if name == "least_requests":
        return LeastRequests(rng)
    if name == "p2c_ewma":
        return P2CEwma(rng)
    raise ValueError(f'unknown balancer "{name}" (choose one of {", ".join(BALANCERS)})')
