"""The Python SDK: what a service needs to use Bridgeway from code.

async with Client("http://127.0.0.1:8080", api_key="bw_...") as bw:
    await bw.kv.put("agent-7", "memory", b"...", ttl="1h")
    entry = await bw.kv.get("agent-7", "memory")
    await bw.kv.put("agent-7", "memory", b"new", if_version=entry.version)  # compare-and-set
    resp = await bw.call("sim", "POST", "/simulate", json={"laps": 50})
    job_id = await bw.queues.enqueue("reports", {"day": "2026-01-01"}, idempotency_key="r-0101")

    worker = Worker(bw)
    @worker.job("reports")
    async def report(job: Job): ...   # return: ack; raise: retried with back-off
    await worker.run()
"""

from bridgeway.sdk.client import BridgewayError, Client, Entry, Job, VersionConflict
from bridgeway.sdk.worker import Bury, RetryLater, Worker

__all__ = ["BridgewayError", "Bury", "Client", "Entry", "Job", "RetryLater", "VersionConflict", "Worker"]
