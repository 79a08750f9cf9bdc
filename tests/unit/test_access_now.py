"""The hot path's await-free answers: `Access.check_now` (a credential seen within the last
second) and `Budgets.draw_now` (the in-process limiter) decide exactly what their async
counterparts decide."""

from __future__ import annotations

import pytest

from bridgeway.config.loader import parse_config
from bridgeway.errors import GatewayError
from bridgeway.security.access import UNKNOWN, Access
from bridgeway.security.budgets import Budgets, Held
from bridgeway.security.keys import KeyStore
from bridgeway.security.limits import MemoryLimiter
from bridgeway.state.memory import MemoryKV

CONFIG = """
auth: {required: true}
roles:
  whole: {allow: [{service: sim}]}
  narrow: {allow: [{service: sim, methods: [GET], paths: ["/read*"]}]}
services:
  sim: {instances: ["http://127.0.0.1:9"]}
  other: {instances: ["http://127.0.0.1:9"]}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_check_now_answers_only_what_was_authenticated_within_a_second() -> None:
    clock = Clock()
    keys = KeyStore(MemoryKV())
    access = Access(parse_config(CONFIG), keys, MemoryLimiter(), clock=clock)
    whole, _ = await keys.create(name="w", role="whole")
    narrow, _ = await keys.create(name="n", role="narrow")

    assert access.check_now(whole, "sim", "POST", b"/x") is UNKNOWN  # never looked up
    caller = await access.check(whole, "sim", "POST", b"/x?q=1")
    assert access.check_now(whole, "sim", "DELETE", b"/anything") == caller  # a whole grant
    with pytest.raises(GatewayError) as refused:
        access.check_now(whole, "other", "GET", b"/")
    assert refused.value.code == "FORBIDDEN"

    await access.check(narrow, "sim", "GET", b"/read/1")
    assert access.check_now(narrow, "sim", "GET", b"/read/2?x=/write").role == "narrow"
    for method, path in (("POST", b"/read/1"), ("GET", b"/write")):
        with pytest.raises(GatewayError) as refused:
            access.check_now(narrow, "sim", method, path)
        assert refused.value.code == "FORBIDDEN"

    with pytest.raises(GatewayError) as refused:
        access.check_now(None, "sim", "GET", b"/")  # no credential where one is required
    assert refused.value.code == "UNAUTHENTICATED"
    with pytest.raises(GatewayError):
        await access.check("bw_not_a_key", "sim", "GET", b"/")
    with pytest.raises(GatewayError) as refused:
        access.check_now("bw_not_a_key", "sim", "GET", b"/")  # a refusal is remembered too
    assert refused.value.code == "UNAUTHENTICATED"

    clock.now += 1.0  # a second later the store is asked again (a revocation takes effect)
    assert access.check_now(whole, "sim", "GET", b"/") is UNKNOWN


async def test_draw_now_matches_draw() -> None:
    limits = parse_config(LIMITED).services["sim"].limits
    clock = Clock()
    budgets = Budgets("service 'sim'", limits, MemoryLimiter(clock=clock))
    twin = Budgets("service 'sim'", limits, MemoryLimiter(clock=clock))
    assert budgets.local

    def outcome(tightest):
        return (tightest[0].remaining, tightest[1].count) if tightest else None

    sync, asyn = [], []
    held, twin_held = Held(), Held()
    for _ in range(4):  # 3/s and 2 in flight, slots kept: ok, ok, busy, rate spent
        try:
            sync.append(outcome(budgets.draw_now("sim", b"/", "ip", "key:a", held)))
        except GatewayError as exc:
            sync.append((exc.code, exc.message))
        try:
            asyn.append(outcome(await twin.draw("sim", b"/", "ip", "key:a", None, twin_held)))
        except GatewayError as exc:
            asyn.append((exc.code, exc.message))
    assert sync == asyn
    assert sync[:2] == [(2, 3), (1, 3)]
    assert "already in flight" in sync[2][1] and "rate limit of 3" in sync[3][1]
    assert len(held.slots) == 2
    await held.release()
    clock.now += 1.0
    assert outcome(budgets.draw_now("sim", b"/", "ip", "key:a", held)) == (2, 3)


LIMITED = CONFIG.replace(
    'sim: {instances: ["http://127.0.0.1:9"]}',
    'sim: {instances: ["http://127.0.0.1:9"], limits: [{rate: 3/s, per: key}, {concurrency: 2}]}',
)
