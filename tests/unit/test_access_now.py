"""The hot path's await-free answers: `Access.check_now` (a credential seen within the last
second) and `Budgets.draw_now` (the in-process limiter) decide exactly what their async
counterparts decide."""

from __future__ import annotations

import pytest

from bridgeway.config.loader import parse_config
from bridgeway.errors import GatewayError
from bridgeway.security.access import UNKNOWN, Access
from bridgeway.security.budgets import _SCOPES_MAX, Budgets, Held
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


async def test_a_budget_keeps_one_limiter_key_per_caller_and_address() -> None:
    """Keys are made once per caller (per key) or address (per ip) and reused; distinct callers
    never share one, and a flood of addresses does not grow the table without bound."""
    config = parse_config(
        CONFIG.replace(
            'sim: {instances: ["http://127.0.0.1:9"]}',
            'sim: {instances: ["http://127.0.0.1:9"], limits: [{rate: 2/s, per: key}, {rate: 100/s, per: ip}]}',
        )
    )
    per_key, per_ip = Budgets("service 'sim'", config.services["sim"].limits, MemoryLimiter()).budgets
    first = per_key.scope("10.0.0.1", "key:a")
    assert per_key.scope("10.0.0.9", "key:a") is first  # the address does not matter per key
    assert per_key.scope("10.0.0.1", "key:b") != first
    assert per_key.scope("10.0.0.1", None).endswith(":-")  # anonymous callers share one budget
    assert (
        per_ip.scope("10.0.0.1", "key:a")
        == per_ip.scope("10.0.0.1", "key:b")
        != per_ip.scope("10.0.0.2", None)
    )

    budgets = Budgets("service 'sim'", config.services["sim"].limits, MemoryLimiter())
    held = Held()
    budgets.draw_now("sim", b"/", "10.0.0.1", "key:a", held)
    budgets.draw_now("sim", b"/", "10.0.0.1", "key:a", held)
    with pytest.raises(GatewayError) as limited:  # the cached key still draws from one bucket
        budgets.draw_now("sim", b"/", "10.0.0.1", "key:a", held)
    assert limited.value.code == "RATE_LIMITED"
    assert budgets.draw_now("sim", b"/", "10.0.0.1", "key:b", held) is not None  # its own bucket

    for i in range(_SCOPES_MAX + 5):
        per_ip.scope(f"10.1.{i // 256}.{i % 256}", None)
    assert len(per_ip._scopes) <= _SCOPES_MAX


async def test_a_cached_caller_never_outlives_its_tokens_expiry() -> None:
    """The one-second cache of callers is cut at the credential's own end: a JWT's `exp` (on the
    verifier's clock) and an API key's expiry (on the key store's)."""
    import jwt as pyjwt

    from bridgeway.config.models import JwtIssuerConfig
    from bridgeway.security.jwt import JwtVerifier

    mono, wall = Clock(), Clock()
    wall.now = 1_700_000_000.0
    issuer = JwtIssuerConfig(issuer="https://idp.test", secret="s" * 32, default_role="whole")
    verifier = JwtVerifier([issuer], clock=wall)
    keys = KeyStore(MemoryKV(), clock=wall)
    access = Access(parse_config(CONFIG), keys, MemoryLimiter(), verifier=verifier, clock=mono)

    token = pyjwt.encode({"iss": "https://idp.test", "sub": "a", "exp": wall.now + 0.4}, "s" * 32)
    assert (await access.check(token, "sim", "GET", b"/")).role == "whole"
    mono.now += 0.3
    wall.now += 0.3
    assert access.check_now(token, "sim", "GET", b"/") is not UNKNOWN  # within its exp
    mono.now += 0.2
    wall.now += 0.2
    assert access.check_now(token, "sim", "GET", b"/") is UNKNOWN  # past exp: verified again

    key, _ = await keys.create(name="k", role="whole", expires_in=0.5)
    await access.check(key, "sim", "GET", b"/")
    mono.now += 0.4
    wall.now += 0.4
    assert access.check_now(key, "sim", "GET", b"/") is not UNKNOWN
    mono.now += 0.2
    wall.now += 0.2
    assert access.check_now(key, "sim", "GET", b"/") is UNKNOWN  # the key expired: asked again
    with pytest.raises(GatewayError) as refused:
        await access.check(key, "sim", "GET", b"/")
    assert refused.value.code == "UNAUTHENTICATED"

    long, _ = await keys.create(name="l", role="whole")  # no expiry: the full second
    await access.check(long, "sim", "GET", b"/")
    mono.now += 0.9
    assert access.check_now(long, "sim", "GET", b"/") is not UNKNOWN
