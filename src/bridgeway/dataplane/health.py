"""Active health checks and lease expiry: the background loop around the registry.

One task per worker wakes every `TICK`, probes each instance whose service has a `health`
section and whose interval has passed, and drops registered instances whose lease ran out.
The verdicts land in `Instance.health`, a pure counter of consecutive passes and failures.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bridgeway.dataplane.instance import Instance
from bridgeway.dataplane.service import Registry, Service, all_instances
from bridgeway.observability.logs import get_logger

TICK = 0.25
log = get_logger("bridgeway.health")


class HealthChecker:
    def __init__(self, registry: Registry, clock=time.monotonic):
        self.registry = registry
        self.clock = clock
        self._due: dict[Instance, float] = {}
        self._probing: set[Instance] = set()
        self._tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._next_sync = 0.0

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, force_close=True), auto_decompress=False
        )
        self._task = asyncio.create_task(self._run(), name="bridgeway-health")

    async def stop(self) -> None:
        tasks = [self._task, *self._tasks] if self._task else list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            now = self.clock()
            try:
                if now >= self._next_sync:
                    self._next_sync = now + 1.0
                    await self.registry.sync_leases()
                    current = {inst for _, inst in all_instances(self.registry)}
                    self._due = {inst: due for inst, due in self._due.items() if inst in current}
                self._tick(now)
            except Exception:  # noqa: BLE001 - one bad round (state backend down) must not end checking
                log.exception("health_round_failed")
            await asyncio.sleep(TICK)

    def _tick(self, now: float) -> None:
        for name, inst in self.registry.expire(now):
            log.info("instance_expired", service=name, instance=inst.url)
        for service, inst in all_instances(self.registry):
            health = service.config.health
            if health is not None and inst not in self._probing and self._due.get(inst, 0.0) <= now:
                self._due[inst] = now + health.interval
                self._probing.add(inst)
                task = asyncio.create_task(self._probe(service, inst))
                self._tasks.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._tasks.discard)

    async def _probe(self, service: Service, inst: Instance) -> None:
        health = service.config.health
        assert health is not None and self._session is not None
        url = inst.url + health.path
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=health.timeout)) as resp:
                ok = 200 <= resp.status < 400
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        finally:
            self._probing.discard(inst)
        was = inst.health.healthy
        inst.health.record(ok)
        if inst.health.healthy != was:
            log.warning(
                "instance_health_changed",
                service=service.name,
                instance=inst.url,
                healthy=inst.health.healthy,
            )
