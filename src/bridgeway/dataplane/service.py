"""A service's live state and the registry of all of them.

`Registry.apply(config)` compiles a config into `Service` objects and swaps them in at once; an
in-flight request keeps the `Service` it started with, so a reload never fails a request. State
worth keeping (instance health and latency, breaker, pools) is carried over when its config is
unchanged.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable

from bridgeway.config.models import Config, ServiceConfig
from bridgeway.dataplane.balancer import make_balancer
from bridgeway.dataplane.breaker import CircuitBreaker
from bridgeway.dataplane.cache import ResponseCache, RouteCache
from bridgeway.dataplane.instance import ActiveHealth, Instance, OutlierDetector
from bridgeway.dataplane.retry import RetryBudget
from bridgeway.dataplane.upstream import UpstreamPool
from bridgeway.observability import metrics
from bridgeway.security.budgets import Budgets
from bridgeway.security.limits import MemoryLimiter
from bridgeway.state import KV, Entry
from bridgeway.state.memory import MemoryKV

POOL_GRACE = 120.0  # seconds a replaced pool stays open for the requests still streaming on it


class Service:
    __slots__ = (
        "name",
        "config",
        "instances",
        "balancer",
        "breaker",
        "budget",
        "pools",
        "metrics",
        "base_paths",
        "limits",
        "cache",
        "retries",
        "timeout",
        "per_try_timeout",
        "body_timeout",
        "max_body",
    )

    def __init__(
        self,
        name: str,
        config: ServiceConfig,
        previous: Service | None,
        limiter=None,
        cache: ResponseCache | None = None,
    ):
        self.name = name
        self.config = config
        # Read on every request: plain attributes, since each read of a pydantic model's field
        # goes through its __getattr__ hook (~300 instructions).
        self.retries = config.retries
        self.timeout = config.timeout
        self.per_try_timeout = config.retries.per_try_timeout
        self.body_timeout = config.read_timeout or config.timeout  # between body chunks
        self.max_body = config.max_body
        self.balancer = make_balancer(config.balancer, random.Random())
        keep_breaker = previous is not None and previous.config.breaker == config.breaker
        self.breaker = (
            previous.breaker
            if keep_breaker
            else CircuitBreaker(
                failures=config.breaker.failures,
                open_for=config.breaker.open_for,
                half_open_probes=config.breaker.probes,
            )
        )
        retries = config.retries
        keep_budget = previous is not None and previous.config.retries == retries
        self.budget = previous.budget if keep_budget else RetryBudget(retries.budget, retries.min_per_second)
        self.metrics = metrics.for_service(name)
        # A concurrency slot in Redis outlives a crashed holder by its lease, at least 5 minutes.
        lease = max(300.0, 2 * config.timeout)
        self.limits = Budgets(f"service {name!r}", config.limits, limiter, lease) if config.limits else None
        self.cache = (
            RouteCache(name, config.cache, cache or ResponseCache(), self.metrics) if config.cache else None
        )

        old = {i.url: i for i in previous.instances} if previous else {}
        same_checks = previous is not None and (previous.config.health, previous.config.outlier) == (
            config.health,
            config.outlier,
        )
        self.instances: list[Instance] = []
        for url in config.instances:
            inst = old.get(url) if same_checks else None
            self.instances.append(
                inst if inst is not None and inst.source == "config" else self._new_instance(url)
            )
        # Instances that registered themselves at run time outlive a reload.
        for inst in previous.instances if previous else ():
            if inst.source == "registered" and inst.url not in config.instances:
                self.instances.append(inst if same_checks else self._new_instance(inst.url, inst.expires_at))

        keep_pools = previous is not None and previous.config.pool == config.pool
        self.pools: dict[str, UpstreamPool] = {}
        self.base_paths: dict[str, bytes] = {}
        for inst in self.instances:
            self._attach(inst, previous.pools.get(inst.url) if keep_pools and previous else None)

    def _new_instance(self, url: str, expires_at: float | None = None) -> Instance:
        health = self.config.health
        outlier = self.config.outlier
        inst = Instance.from_url(
            url,
            health=ActiveHealth(health.healthy, health.unhealthy) if health else ActiveHealth(),
            outlier=OutlierDetector(outlier.failures, outlier.base_ejection, outlier.max_ejection),
        )
        if expires_at is not None:
            inst.source = "registered"
            inst.expires_at = expires_at
        return inst

    def _attach(self, inst: Instance, pool: UpstreamPool | None) -> None:
        cfg = self.config.pool
        self.pools[inst.url] = pool or UpstreamPool(
            inst.host,
            inst.port,
            max_connections=cfg.max_connections,
            max_idle=cfg.max_idle,
            idle_timeout=cfg.idle_timeout,
            connect_timeout=self.config.connect_timeout,
        )
        self.base_paths[inst.url] = inst.base_path.encode()

    # -- run-time registration -------------------------------------------------------------

    def register(self, url: str, ttl: float, now: float) -> tuple[Instance, bool]:
        """Add an instance, or renew its lease (a heartbeat). Returns (instance, created)."""
        for inst in self.instances:
            if inst.url == url:
                if inst.source == "registered":
                    inst.expires_at = now + ttl
                return inst, False
        inst = self._new_instance(url, now + ttl)
        self._attach(inst, None)
        self.instances = [*self.instances, inst]  # copy-on-write: pickers iterate without locks
        return inst, True

    def deregister(self, url: str) -> bool:
        for inst in self.instances:
            if inst.url == url and inst.source == "registered":
                self._drop([inst])
                return True
        return False

    def expire(self, now: float) -> list[Instance]:
        gone = [i for i in self.instances if i.expires_at is not None and i.expires_at <= now]
        if gone:
            self._drop(gone)
        return gone

    def _drop(self, gone: list[Instance]) -> None:
        self.instances = [i for i in self.instances if i not in gone]
        for inst in gone:
            self.base_paths.pop(inst.url, None)
            close_later(self.pools.pop(inst.url))

    def snapshot(self, now: float) -> dict:
        return {
            "name": self.name,
            "balancer": self.config.balancer,
            "breaker": self.breaker.snapshot(now),
            "instances": [
                inst.snapshot(now) | {"pool": self.pools[inst.url].stats} for inst in self.instances
            ],
        }


class Registry:
    """Every service by name: one truth for the data plane and the management API.

    Run-time registrations are leases in the state backend (`LEASES` namespace, expiring with
    their TTL), so every worker and every replica sharing that state sees them: each one
    reconciles its instances with the leases once a second.
    """

    LEASES = "_leases"

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.state: KV | None = None  # set once the state backend is open
        self.limiter = MemoryLimiter()  # RedisLimiter when the state is in Redis
        self.cache = ResponseCache()  # one per worker, shared by every cached route

    def apply(self, config: Config) -> None:
        old = self.services
        # memory:// is this process already: a second copy there would only escape the byte bound.
        shared = None if isinstance(self.state, MemoryKV) else self.state
        self.cache.configure(config.cache, shared)
        self.services = {
            name: Service(name, cfg, old.get(name), self.limiter, self.cache)
            for name, cfg in config.services.items()
        }
        for name, service in old.items():
            kept = self.services.get(name)
            for url, pool in service.pools.items():
                if kept is None or kept.pools.get(url) is not pool:
                    close_later(pool)

    async def register(self, service: Service, url: str, ttl: float) -> tuple[Instance, bool]:
        """A run-time registration or heartbeat: stored for everyone, applied here at once."""
        if self.state is not None:
            await self.state.put(self.LEASES, f"{service.name} {url}", b"", ttl=ttl)
        return service.register(url, ttl, time.monotonic())

    async def deregister(self, service: Service, url: str) -> bool:
        if self.state is not None:
            await self.state.delete(self.LEASES, f"{service.name} {url}")
        return service.deregister(url)

    async def sync_leases(self) -> None:
        """Take in registrations made elsewhere, and drop those removed or expired there."""
        if self.state is None:
            return
        leases: list[tuple[str, Entry]] = []
        after = None
        while page := await self.state.list(self.LEASES, limit=1000, after=after):
            leases += page
            after = page[-1][0]
        wall, now = time.time(), time.monotonic()
        live: set[tuple[str, str]] = set()
        for key, entry in leases:
            name, _, url = key.partition(" ")
            service = self.services.get(name)
            if service is not None and entry.expires_at is not None:
                service.register(url, entry.expires_at - wall, now)
                live.add((name, url))
        for service in self.services.values():
            for inst in service.instances:
                if inst.source == "registered" and (service.name, inst.url) not in live:
                    if inst.expires_at is not None and inst.expires_at <= now:
                        continue  # its lease ran out here too: `expire` drops it, and says so
                    service.deregister(inst.url)

    def snapshot(self, now: float) -> list[dict]:
        return [s.snapshot(now) for s in self.services.values()]

    def expire(self, now: float) -> list[tuple[str, Instance]]:
        return [(s.name, i) for s in self.services.values() for i in s.expire(now)]

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for s in self.services.values() for p in s.pools.values()))


def close_later(pool: UpstreamPool, grace: float = POOL_GRACE) -> None:
    """Close a pool that left the config once the requests still using it are done."""
    loop = asyncio.get_running_loop()
    loop.call_later(grace, lambda: loop.create_task(pool.close()))


def all_instances(registry: Registry) -> Iterable[tuple[Service, Instance]]:
    for service in registry.services.values():
        for inst in service.instances:
            yield service, inst
