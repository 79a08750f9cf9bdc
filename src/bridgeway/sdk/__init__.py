"""The Python SDK: what a service needs to use Bridgeway from code.

async with Client("http://127.0.0.1:8080", api_key="bw_...") as bw:
    await bw.kv.put("agent-7", "memory", b"...", ttl="1h")
    entry = await bw.kv.get("agent-7", "memory")
    await bw.kv.put("agent-7", "memory", b"new", if_version=entry.version)  # compare-and-set
    resp = await bw.call("sim", "POST", "/simulate", json={"laps": 50})
"""

from bridgeway.sdk.client import BridgewayError, Client, Entry, VersionConflict

__all__ = ["BridgewayError", "Client", "Entry", "VersionConflict"]
