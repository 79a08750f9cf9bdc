"""One suite for every state backend: memory, SQLite (WAL) and Redis (real server on loopback)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

import bridgeway
from bridgeway.state import KV, Entry, VersionMismatch, open_state
from bridgeway.state.base import prefix_end
from bridgeway.state.memory import MemoryKV
from bridgeway.state.sqlite import SqliteKV
from tests.support.services import REDIS_URL, drop_redis_kv, open_redis_kv


async def eventually(check, timeout: float = 3.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


# --- basics -------------------------------------------------------------------------------------


async def test_satisfies_protocol(kv):
    assert isinstance(kv, KV)


async def test_put_get_and_version_increments(kv):
    assert await kv.get("ns", "k") is None
    e1 = await kv.put("ns", "k", b"one")
    assert e1 == Entry(b"one", 1, None)
    assert await kv.get("ns", "k") == e1
    e2 = await kv.put("ns", "k", b"two")
    assert (e2.value, e2.version) == (b"two", 2)
    assert await kv.get("ns", "k") == e2
    assert (await kv.put("ns", "k", b"")).version == 3
    assert await kv.get("ns", "k") == Entry(b"", 3, None)


async def test_binary_values_and_unicode_keys(kv):
    blob = bytes(range(256)) * 4
    await kv.put("ns", "clé/ü:日本", blob)
    assert (await kv.get("ns", "clé/ü:日本")).value == blob


async def test_rejects_bad_arguments(kv):
    with pytest.raises(TypeError):
        await kv.put("ns", "k", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await kv.put("ns", "k", b"v", ttl=0)
    with pytest.raises(ValueError):
        await kv.put("ns", "k", b"v", if_version=-1)
    assert await kv.get("ns", "k") is None


# --- TTL ----------------------------------------------------------------------------------------


async def test_ttl_expiry(kv):
    before = time.time()
    e = await kv.put("ns", "short", b"v", ttl=0.2)
    await kv.put("ns", "long", b"v")
    assert e.expires_at is not None and before + 0.2 <= e.expires_at <= time.time() + 0.2
    got = await kv.get("ns", "short")
    assert got is not None and got.expires_at == pytest.approx(e.expires_at)

    async def gone():
        return await kv.get("ns", "short") is None

    assert await eventually(gone)
    assert [k for k, _ in await kv.list("ns")] == ["long"]
    # an expired key is absent: create-only succeeds and the version restarts
    assert (await kv.put("ns", "short", b"again", if_version=0)).version == 1


async def test_put_without_ttl_clears_ttl(kv):
    await kv.put("ns", "k", b"v", ttl=0.2)
    e = await kv.put("ns", "k", b"v2")
    assert e.expires_at is None
    await asyncio.sleep(0.3)
    assert await kv.get("ns", "k") == Entry(b"v2", 2, None)


# --- compare-and-set ----------------------------------------------------------------------------


async def test_cas_create_only(kv):
    assert (await kv.put("ns", "k", b"a", if_version=0)).version == 1
    with pytest.raises(VersionMismatch) as err:
        await kv.put("ns", "k", b"b", if_version=0)
    assert err.value.current == 1
    assert (await kv.get("ns", "k")).value == b"a"


async def test_cas_on_version(kv):
    await kv.put("ns", "k", b"a")
    await kv.put("ns", "k", b"b")
    assert (await kv.put("ns", "k", b"c", if_version=2)).version == 3
    with pytest.raises(VersionMismatch) as err:
        await kv.put("ns", "k", b"d", if_version=2)
    assert err.value.current == 3 and err.value.expected == 2
    assert await kv.get("ns", "k") == Entry(b"c", 3, None)


async def test_cas_on_missing_key_reports_none(kv):
    with pytest.raises(VersionMismatch) as err:
        await kv.put("ns", "missing", b"x", if_version=4)
    assert err.value.current is None
    assert await kv.get("ns", "missing") is None


async def test_concurrent_cas_increments_are_atomic(kv):
    await kv.put("ns", "counter", b"0")
    conflicts = 0

    async def increment():
        nonlocal conflicts
        while True:
            e = await kv.get("ns", "counter")
            await asyncio.sleep(0)  # let the others read the same version
            try:
                await kv.put("ns", "counter", str(int(e.value) + 1).encode(), if_version=e.version)
                return
            except VersionMismatch:
                conflicts += 1

    await asyncio.gather(*(increment() for _ in range(50)))
    e = await kv.get("ns", "counter")
    assert (e.value, e.version) == (b"50", 51)
    assert conflicts > 0  # the test did exercise contention


# --- delete -------------------------------------------------------------------------------------


async def test_delete(kv):
    assert await kv.delete("ns", "k") is False
    await kv.put("ns", "k", b"v")
    assert await kv.delete("ns", "k") is True
    assert await kv.get("ns", "k") is None
    assert await kv.list("ns") == []
    assert (await kv.put("ns", "k", b"v")).version == 1  # a deleted key starts over


async def test_delete_if_version(kv):
    await kv.put("ns", "k", b"v")
    await kv.put("ns", "k", b"v")
    with pytest.raises(VersionMismatch) as err:
        await kv.delete("ns", "k", if_version=1)
    assert err.value.current == 2
    assert await kv.get("ns", "k") is not None
    assert await kv.delete("ns", "k", if_version=2) is True
    with pytest.raises(VersionMismatch) as err:
        await kv.delete("ns", "k", if_version=2)
    assert err.value.current is None
    assert await kv.delete("ns", "k", if_version=0) is False  # "absent" holds; nothing to delete


# --- list ---------------------------------------------------------------------------------------


async def test_list_by_prefix_with_paging(kv):
    keys = [f"user:{i:03d}" for i in range(25)] + ["user", "userx", "use", "zzz", "a"]
    for k in keys:
        await kv.put("ns", k, k.encode())
    page = await kv.list("ns", "user:", limit=10)
    assert [k for k, _ in page] == [f"user:{i:03d}" for i in range(10)]
    assert all(e.value == k.encode() and e.version == 1 for k, e in page)

    seen, after = [], None
    while True:
        page = await kv.list("ns", "user:", limit=10, after=after)
        if not page:
            break
        seen += [k for k, _ in page]
        after = page[-1][0]
    assert seen == [f"user:{i:03d}" for i in range(25)]

    assert [k for k, _ in await kv.list("ns", "user")] == [
        "user",
        *(f"user:{i:03d}" for i in range(25)),
        "userx",
    ]
    assert [k for k, _ in await kv.list("ns")] == sorted(keys)
    assert [k for k, _ in await kv.list("ns", after="user:024")] == ["userx", "zzz"]
    assert [k for k, _ in await kv.list("ns", "user:", after="a")][:1] == ["user:000"]  # cursor before prefix
    assert await kv.list("ns", "user:", after="user:999") == []
    assert await kv.list("ns", "nope") == []
    assert await kv.list("ns", limit=0) == []


async def test_list_skips_expired_and_fills_the_page(kv):
    for i in range(6):
        await kv.put("ns", f"k{i}", b"v", ttl=0.2 if i % 2 == 0 else None)

    async def only_live():
        return [k for k, _ in await kv.list("ns", "k", limit=2)] == ["k1", "k3"]

    assert await eventually(only_live)
    assert [k for k, _ in await kv.list("ns", "k", limit=10)] == ["k1", "k3", "k5"]


async def test_namespaces_are_isolated(kv):
    await kv.put("a", "b:c", b"1")
    await kv.put("a:b", "c", b"2")
    await kv.put("b", "x", b"3")
    assert (await kv.get("a", "b:c")).value == b"1"
    assert (await kv.get("a:b", "c")).value == b"2"
    assert await kv.get("a", "c") is None
    assert await kv.get("b", "b:c") is None
    assert [k for k, _ in await kv.list("a")] == ["b:c"]
    assert [k for k, _ in await kv.list("a:b")] == ["c"]
    assert [k for k, _ in await kv.list("b")] == ["x"]
    assert await kv.delete("b", "b:c") is False
    assert (await kv.get("a", "b:c")).value == b"1"


# --- SQLite specifics ---------------------------------------------------------------------------


async def test_sqlite_durable_across_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    kv = open_state(url)
    await kv.put("ns", "k", b"v")
    await kv.put("ns", "k", b"v2")
    await kv.close()
    kv = open_state(url)
    try:
        assert await kv.get("ns", "k") == Entry(b"v2", 2, None)
    finally:
        await kv.close()


async def test_sqlite_two_handles_share_one_file(tmp_path):
    path = tmp_path / "shared.db"
    a, b = SqliteKV(path), SqliteKV(path)
    try:
        await a.put("ns", "k", b"from a")
        assert (await b.get("ns", "k")).value == b"from a"
        await b.put("ns", "k", b"from b", if_version=1)
        assert await a.get("ns", "k") == Entry(b"from b", 2, None)
        with pytest.raises(VersionMismatch):
            await a.put("ns", "k", b"stale", if_version=1)

        # CAS increments racing across two connections (as two worker processes would)
        await a.put("ns", "counter", b"0")

        async def increment(kv):
            while True:
                e = await kv.get("ns", "counter")
                try:
                    await kv.put("ns", "counter", str(int(e.value) + 1).encode(), if_version=e.version)
                    return
                except VersionMismatch:
                    pass

        await asyncio.gather(*(increment(a if i % 2 else b) for i in range(50)))
        assert (await a.get("ns", "counter")).value == b"50"
    finally:
        await a.close()
        await b.close()


def test_sqlite_relative_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kv = open_state("sqlite:///./bridgeway.db")
    assert isinstance(kv, SqliteKV)
    asyncio.run(kv.close())
    assert (tmp_path / "bridgeway.db").exists()


async def test_sqlite_shared_by_worker_processes(tmp_path):
    """CAS increments from several OS processes on one file (the multi-worker deployment)."""
    path = tmp_path / "procs.db"
    kv = SqliteKV(path)
    await kv.put("ns", "counter", b"0")
    script = (
        "import asyncio, sys\n"
        "from bridgeway.state import VersionMismatch, open_state\n"
        "async def main():\n"
        "    kv = open_state('sqlite:///' + sys.argv[1])\n"
        "    for _ in range(20):\n"
        "        while True:\n"
        "            e = await kv.get('ns', 'counter')\n"
        "            try:\n"
        "                await kv.put('ns', 'counter', str(int(e.value) + 1).encode(), if_version=e.version)\n"
        "                break\n"
        "            except VersionMismatch:\n"
        "                pass\n"
        "    await kv.close()\n"
        "asyncio.run(main())\n"
    )
    src = str(Path(bridgeway.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(path), env=env)
        for _ in range(3)
    ]
    assert [await p.wait() for p in procs] == [0, 0, 0]
    try:
        assert await kv.get("ns", "counter") == Entry(b"60", 61, None)
    finally:
        await kv.close()


# --- Redis specifics ----------------------------------------------------------------------------


async def test_redis_index_pruned_after_expiry():
    kv = await open_redis_kv()
    try:
        await kv.put("ns", "gone", b"v", ttl=0.1)
        await kv.put("ns", "kept", b"v")
        index = kv._index("ns")
        assert await kv._redis.zcard(index) == 2

        async def pruned():
            return [k for k, _ in await kv.list("ns")] == ["kept"] and await kv._redis.zcard(index) == 1

        assert await eventually(pruned)
        await kv.delete("ns", "kept")
        assert await kv._redis.zcard(index) == 0
    finally:
        await drop_redis_kv(kv)
        await kv.close()


async def test_redis_writes_with_a_ttl_sweep_expired_keys_out_of_the_index():
    # Short-lived keys that are never listed (the response cache) must not grow the index forever.
    kv = await open_redis_kv()
    try:
        for i in range(3):
            await kv.put("ns", f"short{i}", b"v", ttl=0.05)
        await kv.put("ns", "forever", b"v")
        index, expiries = kv._index("ns"), kv._expiries("ns")
        assert (await kv._redis.zcard(index), await kv._redis.zcard(expiries)) == (4, 3)
        await asyncio.sleep(0.15)
        kv._next_sweep.clear()  # as if SWEEP_EVERY had passed
        await kv.put("ns", "later", b"v", ttl=60)
        assert sorted(m.decode() for m in await kv._redis.zrange(index, 0, -1)) == ["forever", "later"]
        assert [m.decode() for m in await kv._redis.zrange(expiries, 0, -1)] == ["later"]
        await kv.put("ns", "later", b"v")  # no TTL any more: not swept
        await kv.delete("ns", "forever")
        assert await kv._redis.zcard(expiries) == 0
    finally:
        await drop_redis_kv(kv)
        await kv.close()


async def test_a_redis_sweep_steps_over_keys_another_clock_thinks_are_due(monkeypatch):
    monkeypatch.setattr("bridgeway.state.redis.SWEEP_BATCH", 1)
    kv = await open_redis_kv()
    try:
        await kv.put("ns", "alive", b"v", ttl=60)
        await kv._redis.zadd(kv._expiries("ns"), {"alive": 0})  # due by a clock far ahead
        for i in range(3):
            await kv.put("ns", f"short{i}", b"v", ttl=0.05)
        await asyncio.sleep(0.15)
        kv._next_sweep.clear()
        await kv.put("ns", "later", b"v", ttl=60)
        members = sorted(m.decode() for m in await kv._redis.zrange(kv._index("ns"), 0, -1))
        assert members == ["alive", "later"]
    finally:
        await drop_redis_kv(kv)
        await kv.close()


async def test_open_state_redis():
    await (await open_redis_kv()).close()  # skips (or fails) like the other Redis tests when no server
    kv = open_state(REDIS_URL)
    try:
        assert type(kv).__name__ == "RedisKV"
        ns = f"bwtest-{uuid.uuid4().hex}"
        await kv.put(ns, "k", b"v")
        assert (await kv.get(ns, "k")).value == b"v"
        assert await kv.delete(ns, "k") is True
    finally:
        await kv.close()


# --- open_state ---------------------------------------------------------------------------------


def test_open_state_memory():
    assert isinstance(open_state("memory://"), MemoryKV)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "bridgeway.db",
        "postgres://localhost/db",
        "memory://somewhere",
        "sqlite://",
        "sqlite:///",
        "redis://",
    ],
)
def test_open_state_bad_url(url):
    with pytest.raises(ValueError, match="state URL"):
        open_state(url)


def test_prefix_end():
    assert prefix_end("") is None
    assert prefix_end("ab") == "ac"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("a\ud7ff") == "a\ue000"
