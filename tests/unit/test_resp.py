"""RespClient against the real Redis on 127.0.0.1:6379, and against tiny loopback servers that
misbehave (close at once, never answer, send garbage). No mocks.

Async tests run on the stdlib loop; the same scenarios run again on uvloop at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bridgeway.state.resp import RespClient, RespConnectionError, RespError, parse_url
from tests.support.services import REDIS_URL, require_redis

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def redis(url: str = REDIS_URL, **kwargs: float) -> AsyncIterator[tuple[RespClient, str]]:
    """A client of the real Redis and a key prefix of its own; the prefix's keys go at the end."""
    require_redis()
    kwargs.setdefault("timeout", 2.0)
    client = RespClient(url, **kwargs)
    prefix = f"bwtest:resp:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        await client.close()
        cleaner = RespClient(url, timeout=2.0)
        keys = await cleaner.execute("KEYS", prefix + "*")
        if keys:
            await cleaner.execute("DEL", *keys)
        await cleaner.close()


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[list[int]]:
    """A loopback server running `handler` per connection. Yields [port, connections accepted]."""
    state = [0, 0]
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state[1] += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()  # no socket may outlive the test's loop
            tasks.discard(task)

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    state[0] = srv.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        srv.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(-1)  # reads everything, answers nothing


# --- replies ---------------------------------------------------------------------------------


async def test_reply_types() -> None:
    async with redis() as (c, p):
        assert await c.execute("SET", p + "s", "v") == b"OK"  # simple string
        assert await c.execute("GET", p + "s") == b"v"  # bulk string
        assert await c.execute("GET", p + "missing") is None  # nil
        assert await c.execute("INCRBY", p + "n", 41) == 41  # integer
        assert await c.execute("INCRBYFLOAT", p + "f", 1.5) == b"1.5"  # float argument
        assert await c.execute("RPUSH", p + "l", b"a", "b", 3) == 3
        assert await c.execute("LRANGE", p + "l", 0, -1) == [b"a", b"b", b"3"]  # array
        assert await c.execute("LRANGE", p + "empty", 0, -1) == []
        assert await c.execute("EVAL", "return {1, {2, 'x'}, 'y'}", 0) == [1, [2, b"x"], b"y"]
        binary = bytes(range(256)) * 4 + b"\r\n$-1\r\n"  # binary-safe both ways
        assert await c.execute("SET", p + "b", binary) == b"OK"
        assert await c.execute("GET", p + "b") == binary
        big = b"x" * (3 * 1024 * 1024)  # arrives over many reads: the parser reassembles it
        await c.execute("SET", p + "big", big)
        assert await c.execute("GET", p + "big") == big
        assert await c.execute("ECHO", "é") == "é".encode()


async def test_error_replies_raise_and_the_connection_stays() -> None:
    async with redis() as (c, p):
        first = await c.execute("CLIENT", "ID")
        with pytest.raises(RespError, match="^ERR unknown command"):
            await c.execute("NOSUCHCOMMAND", "x")
        await c.execute("SET", p + "s", "text")
        with pytest.raises(RespError, match="^WRONGTYPE"):
            await c.execute("LPUSH", p + "s", "x")
        # an error inside an array is a value, not an exception
        reply = await c.execute("EVAL", "return {1, redis.error_reply('ERR boom')}", 0)
        assert reply[0] == 1 and isinstance(reply[1], RespError) and str(reply[1]) == "ERR boom"
        assert await c.execute("CLIENT", "ID") == first  # errors did not cost the connection


# --- pipelining ------------------------------------------------------------------------------


async def test_1000_concurrent_calls_share_one_connection_in_order() -> None:
    async with redis() as (c, p):
        early, late = c.execute("CLIENT", "ID"), c.execute("CLIENT", "ID")  # both before any connect
        ids = await asyncio.gather(*(c.execute("CLIENT", "ID") for _ in range(50)))
        assert len(set(ids)) == 1  # the first calls waited for one shared connect
        assert await early == await late == ids[0]  # awaited after it: no second connection
        echoes = await asyncio.gather(*(c.execute("ECHO", f"m{i}") for i in range(1000)))
        assert echoes == [f"m{i}".encode() for i in range(1000)]
        # Redis ran them in the order they were issued: the counter proves it, not just matching
        counts = await asyncio.gather(*(c.execute("INCR", p + "n") for _ in range(1000)))
        assert counts == list(range(1, 1001))
        assert await c.execute("CLIENT", "ID") == ids[0]


# --- scripts ---------------------------------------------------------------------------------


async def test_evalsha_falls_back_to_eval_on_noscript() -> None:
    async with redis() as (c, p):
        # a script no server has seen yet (the comment makes its SHA unique)
        sha = c.register_script(f"-- {uuid.uuid4()}\nreturn {{KEYS[1], ARGV[1], ARGV[2]}}")
        assert await c.execute("SCRIPT", "EXISTS", sha) == [0]
        assert await c.evalsha(sha, [p + "k"], ["a", 2]) == [(p + "k").encode(), b"a", b"2"]
        assert await c.execute("SCRIPT", "EXISTS", sha) == [1]  # the EVAL loaded it
        await c.execute("SCRIPT", "FLUSH")  # as after a restart of Redis
        assert await c.evalsha(sha, [p + "k"], ["b", 3]) == [(p + "k").encode(), b"b", b"3"]
        assert await c.execute("SCRIPT", "EXISTS", sha) == [1]
        with pytest.raises(RespError, match="^NOSCRIPT"):  # a SHA it has no source for
            await c.evalsha("0" * 40, [], [])
        bad = c.register_script("return redis.call('INCR', KEYS[1])")
        await c.execute("SET", p + "s", "text")
        with pytest.raises(RespError, match="not an integer"):  # script errors are raised
            await c.evalsha(bad, [p + "s"])


# --- connection set-up -----------------------------------------------------------------------


async def test_db_from_the_url_is_selected() -> None:
    async with redis(REDIS_URL.rsplit("/", 1)[0] + "/7") as (c7, p), redis() as (c0, _):
        assert b" db=7 " in await c7.execute("CLIENT", "INFO")
        await c7.execute("SET", p + "k", "in 7")
        assert await c0.execute("GET", p + "k") is None
        await c0.execute("SELECT", 7)
        assert await c0.execute("GET", p + "k") == b"in 7"
        await c0.execute("DEL", p + "k")


async def test_user_and_password_from_the_url() -> None:
    async with redis() as (admin, _):
        user = f"bwtest-{uuid.uuid4().hex[:12]}"
        await admin.execute("ACL", "SETUSER", user, "on", ">s3cr:et@x", "~*", "&*", "+@all")
        try:
            async with redis(f"redis://{user}:s3cr%3Aet%40x@127.0.0.1:6379/0") as (c, _):
                assert await c.execute("ACL", "WHOAMI") == user.encode()
            wrong = RespClient(f"redis://{user}:nope@127.0.0.1:6379/0", timeout=2.0)
            with pytest.raises(RespError, match="WRONGPASS") as info:
                await wrong.execute("PING")
            assert "nope" not in str(info.value)
            assert repr(wrong).endswith("idle>")  # a refused handshake leaves no connection behind
            await wrong.close()
        finally:
            await admin.execute("ACL", "DELUSER", user)


def test_parse_url() -> None:
    assert parse_url("redis://127.0.0.1:6379/0") == ("127.0.0.1", 6379, 0, None, None)
    assert parse_url("redis://redis.internal") == ("redis.internal", 6379, 0, None, None)
    assert parse_url("redis://:pw@[::1]:7000/3") == ("::1", 7000, 3, None, "pw")
    assert parse_url("redis://u:p%40ss@h/1") == ("h", 6379, 1, "u", "p@ss")
    with pytest.raises(ValueError, match="TLS") as info:
        parse_url("rediss://:topsecret@h:6380/0")
    assert "topsecret" not in str(info.value)  # error messages get logged
    for bad in ("unix:///tmp/redis.sock", "redis://h:6379/x", "redis://h/0?socket_timeout=1"):
        with pytest.raises(ValueError):
            parse_url(bad)


# --- timeouts --------------------------------------------------------------------------------


async def test_timed_out_call_keeps_its_place_and_later_calls_get_their_own_replies() -> None:
    async with redis(timeout=0.3) as (c, p), redis() as (other, _):
        conn_id = await c.execute("CLIENT", "ID")
        blocked = c.execute("BLPOP", p + "q", 0)  # blocks this connection until someone pushes
        with pytest.raises(TimeoutError):
            await blocked
        cancelled = asyncio.ensure_future(c.execute("ECHO", "cancelled"))
        await asyncio.sleep(0)
        cancelled.cancel()
        # Queued behind the BLPOP; its late reply (and the cancelled ECHO's) must not be taken
        # for theirs.
        later = [c.execute("ECHO", f"later-{i}") for i in range(5)]
        await other.execute("LPUSH", p + "q", "late")
        assert await asyncio.gather(*later) == [f"later-{i}".encode() for i in range(5)]
        assert await other.execute("LLEN", p + "q") == 0  # the timed-out BLPOP did run
        assert await c.execute("CLIENT", "ID") == conn_id  # and the connection was kept


async def test_silent_server_times_out_then_the_connection_is_dropped() -> None:
    async with server(silent) as srv:
        c = RespClient(f"redis://127.0.0.1:{srv[0]}", timeout=0.2, dead_after=0.3)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await c.execute("PING")
        assert 0.15 < time.monotonic() - start < 0.5
        # silent for 0.4 s > dead_after while owing two replies: presumed dead, closed
        with pytest.raises(TimeoutError):
            await c.execute("PING")
        assert srv[1] == 1
        with pytest.raises(TimeoutError):
            await c.execute("PING")
        assert srv[1] == 2  # the next call opened a new connection
        await c.close()


async def test_calls_time_out_each_at_its_own_deadline_whatever_the_order_sent() -> None:
    async with server(silent) as srv:
        c = RespClient(f"redis://127.0.0.1:{srv[0]}", timeout=0.8, dead_after=5.0)
        start = time.monotonic()
        slow = asyncio.ensure_future(c.execute("PING"))  # due at 0.8 s
        await asyncio.sleep(0.05)
        c.timeout = 0.2
        fast = asyncio.ensure_future(c.execute("PING"))  # sent later, due sooner: at 0.25 s
        later = asyncio.ensure_future(c.execute("PING"))  # due at 0.25 s too
        for call, due in ((fast, 0.25), (later, 0.25), (slow, 0.8)):
            with pytest.raises(TimeoutError):
                await call
            assert due - 0.05 < time.monotonic() - start < due + 0.25
        await c.close()


async def test_connect_to_a_dead_port_fails_fast() -> None:
    c = RespClient("redis://127.0.0.1:1/0", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(RespConnectionError, match="failed"):
        await c.execute("PING")
    with pytest.raises(ConnectionError):  # and again on the next call: no stale state
        await c.execute("PING")
    assert time.monotonic() - start < 0.5
    await c.close()


# --- lost connections ------------------------------------------------------------------------


async def test_killed_connection_fails_pending_calls_and_the_next_call_reconnects() -> None:
    async with redis() as (c, p), redis() as (other, _):
        conn_id = await c.execute("CLIENT", "ID")
        pending = [c.execute("BLPOP", p + "q", 0), *(c.execute("ECHO", i) for i in range(3))]
        await asyncio.sleep(0.05)  # let them reach Redis
        assert await other.execute("CLIENT", "KILL", "ID", conn_id) == 1
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, RespConnectionError) for r in results), results
        assert await c.execute("PING") == b"PONG"
        assert await c.execute("CLIENT", "ID") != conn_id


async def test_server_closing_at_once_fails_pending_calls() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    async with server(close_at_once) as srv:
        c = RespClient(f"redis://127.0.0.1:{srv[0]}", timeout=2.0)
        results = await asyncio.gather(*(c.execute("PING") for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, RespConnectionError) for r in results), results
        with pytest.raises(ConnectionError):
            await c.execute("PING")
        assert srv[1] == 2
        await c.close()


async def test_garbage_or_unasked_replies_close_the_connection() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"?what\r\n")
        await reader.read(-1)

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"+PONG\r\n+EXTRA\r\n")
        await reader.read(-1)

    for handler, message in ((garbage, "invalid reply"), (chatty, "unexpected reply")):
        async with server(handler) as srv:
            c = RespClient(f"redis://127.0.0.1:{srv[0]}", timeout=2.0)
            first = c.execute("PING")
            if handler is chatty:
                assert await first == b"PONG"
                await asyncio.sleep(0.05)  # the extra reply arrives with nobody waiting
                assert repr(c).endswith("idle>")
            else:
                with pytest.raises(RespConnectionError, match=message):
                    await first
            await c.close()


async def test_close_fails_pending_and_later_calls() -> None:
    async with redis() as (c, p):
        pending = c.execute("BLPOP", p + "q", 0)
        await asyncio.sleep(0.05)
        await c.close()
        with pytest.raises(RespConnectionError, match="closed"):
            await pending
        with pytest.raises(RespConnectionError, match="closed"):
            await c.execute("PING")


async def test_close_while_connecting() -> None:
    async with server(silent) as srv:
        c = RespClient(f"redis://127.0.0.1:{srv[0]}/1", timeout=2.0)  # SELECT never answered
        calls = [asyncio.ensure_future(c.execute("PING")) for _ in range(3)]
        await asyncio.sleep(0.05)
        await c.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, RespConnectionError) for r in results), results


# ------------------------------------------------------------------------------------- uvloop

_SCENARIOS = [
    fn
    for name, fn in sorted(globals().items())
    if name.startswith("test_") and asyncio.iscoroutinefunction(fn) and fn.__code__.co_argcount == 0
]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[fn.__name__[5:] for fn in _SCENARIOS])
def test_scenarios_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(scenario())  # type: ignore[arg-type]
