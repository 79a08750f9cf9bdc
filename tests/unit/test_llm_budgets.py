"""LLM budgets: the pure rules, and the three stores (memory, SQLite, Redis) holding to them."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from pydantic import ValidationError

from bridgeway.config.models import Config
from bridgeway.llm.budgets import (
    DAY,
    NANO,
    Hold,
    Ledger,
    Limit,
    cost_nano,
    estimate_tokens,
    parse_budget,
    refusal,
)
from bridgeway.llm.ledger import MemoryLedgerStore, RedisLedgerStore, Settlement, SqliteLedgerStore
from tests.support.services import REDIS_URL, require_redis

NOW = 20000 * DAY + 3600.0  # 01:00 UTC on day 20000


def hold(scopes=("key:a",), nano=0, tokens=10, expires=NOW + 60, id_=None) -> Hold:
    return Hold(id_ or uuid.uuid4().hex[:16], tuple(scopes), nano, tokens, expires)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("5usd/1d", {"period": "1d", "usd": 5.0}),
        ("0.25$/7d", {"period": "7d", "usd": 0.25}),
        ("2000000tokens/30d", {"period": "30d", "tokens": 2000000}),
        ("2M tokens / total", {"period": "total", "tokens": 2000000}),
    ],
)
def test_budget_text(text: str, parsed: dict):
    assert parse_budget(text) == parsed


@pytest.mark.parametrize("text", ["5usd", "5usd/2d", "usd/1d", "-1usd/1d", "5 euros/1d"])
def test_bad_budget_text_is_refused(text: str):
    with pytest.raises(ValueError, match="is not a budget"):
        parse_budget(text)


def test_budgets_in_config_take_both_forms_and_need_a_limit():
    config = Config.model_validate(
        {
            "roles": {"r": {"budgets": ["1usd/1d", {"period": "30d", "tokens": 5}]}},
            "clients": {"c": {"role": "r", "budgets": [{"period": "total", "usd": 2, "tokens": 9}]}},
        }
    )
    assert config.roles["r"].budgets[1].tokens == 5 and config.clients["c"].budgets[0].usd == 2
    with pytest.raises(ValidationError, match="usd, tokens or both"):
        Config.model_validate({"roles": {"r": {"budgets": [{"period": "1d"}]}}})
    with pytest.raises(ValidationError):
        Config.model_validate({"roles": {"r": {"budgets": [{"period": "2d", "usd": 1}]}}})


def test_cost_is_exact_in_nano_usd_and_rounded_up():
    assert cost_nano(1_000_000, 0, (2.5, 10.0)) == 2.5 * NANO
    assert cost_nano(0, 1_000_000, (2.5, 10.0)) == 10 * NANO
    assert cost_nano(1, 1, (0.15, 0.6)) == 150 + 600
    assert cost_nano(1, 0, (0.0001, 0)) == 1  # a fraction of a nano-USD still costs one
    assert cost_nano(123, 456, (0.0, 0.0)) == 0


def test_estimate_uses_the_size_and_the_output_cap():
    body = {"messages": [], "max_tokens": 50}
    assert estimate_tokens(body, 300, 1024) == (100, 50)
    assert estimate_tokens({"messages": [], "max_completion_tokens": 7, "n": 3}, 3, 1024) == (1, 21)
    assert estimate_tokens({"messages": []}, 3, 1024) == (1, 1024)
    assert estimate_tokens({"input": "x"}, 30, 1024) == (10, 0)  # embeddings: no output


def test_ledger_holds_until_the_limit_then_refuses_and_settles_to_the_real_cost():
    ledger = Ledger()
    limit = Limit("key:a", "1d", None, 100)
    assert all(ledger.reserve([limit], hold(tokens=30), NOW) is None for _ in range(3))
    assert ledger.reserve([limit], hold(tokens=30), NOW) is limit  # 90 held + 30 > 100
    assert ledger.reserve([limit], hold(tokens=10), NOW) is None  # exactly 100
    first = next(iter(ledger.holds))
    ledger.settle(first, ("key:a",), 0, 5, NOW)  # 30 held -> 5 spent
    assert ledger.held("key:a") == (0, 70) and ledger.spent_in("key:a", 1, 20000) == (0, 5)
    assert ledger.reserve([limit], hold(tokens=25), NOW) is None


def test_a_refused_hold_holds_nothing_in_any_scope():
    ledger = Ledger()
    team = Limit("team:t", "1d", 1000, None)
    key = Limit("key:a", "1d", 10, None)
    assert ledger.reserve([team, key], hold(("team:t", "key:a"), nano=11, tokens=0), NOW) is key
    assert ledger.held("team:t") == (0, 0)


def test_windows_count_utc_days_and_holds_expire():
    ledger = Ledger()
    ledger.settle(None, ("key:a",), 0, 50, NOW - 6 * DAY)  # 6 days ago: in 7d, not in 1d
    ledger.settle(None, ("key:a",), 0, 40, NOW - 7 * DAY)  # 7 days ago: only in 30d and total
    assert ledger.spent_in("key:a", 1, 20000) == (0, 0)
    assert ledger.spent_in("key:a", 7, 20000) == (0, 50)
    assert ledger.spent_in("key:a", 30, 20000) == (0, 90) == ledger.spent_in("key:a", 0, 20000)
    ledger.reserve([], hold(tokens=10, expires=NOW + 1), NOW)
    assert ledger.held("key:a") == (0, 10)
    ledger.expire(NOW + 1)
    assert ledger.held("key:a") == (0, 0)


def test_refusal_says_which_budget_and_when_it_moves_on():
    error = refusal(Limit("team:agi", "1d", 5 * NANO, None), NOW)
    assert error.status == 429 and error.code == "BUDGET_EXCEEDED"
    assert "team 'agi'" in error.message and "5 USD per 1d" in error.message
    assert error.headers == [(b"retry-after", b"%d" % (DAY - 3600))]
    assert refusal(Limit("key:a", "total", None, 5), NOW).headers == []


# --- the stores ------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryLedgerStore()
    elif request.param == "sqlite":
        s = SqliteLedgerStore(str(tmp_path / "spend.db"))
        yield s
        await s.close()
    else:
        require_redis()
        s = RedisLedgerStore(REDIS_URL, prefix=f"bwtest-{uuid.uuid4().hex}:")
        yield s
        keys = await s._redis.execute("KEYS", s.prefix + "*")
        if keys:
            await s._redis.execute("DEL", *keys)
        await s.close()


def _answered(h: Hold | None, scopes, tokens_in, tokens_out, nano, model="m") -> Settlement:
    return Settlement(h, True, scopes, "key:a", "t", model, "openai/x", tokens_in, tokens_out, nano)


async def test_store_reserve_is_atomic_under_concurrency(store):
    limit = Limit("key:a", "1d", 1000, None)
    holds = [hold(nano=100, expires=time.time() + 60) for _ in range(50)]
    refused = await asyncio.gather(*(store.reserve([limit], h) for h in holds))
    assert sum(r is None for r in refused) == 10


async def test_store_settles_to_the_real_cost_and_records_spend(store):
    limits = [Limit("key:a", "1d", 1000, None), Limit("team:t", "total", None, 100)]
    first = hold(("key:a", "team:t"), nano=600, tokens=60, expires=time.time() + 60)
    assert await store.reserve(limits, first) is None
    second = hold(("key:a", "team:t"), nano=600, tokens=10, expires=time.time() + 60)
    assert await store.reserve(limits, second) is limits[0]  # 600 held + 600 > 1000
    await store.settle([_answered(first, ("key:a", "team:t"), 7, 3, 150)])
    assert await store.reserve(limits, second) is None  # 150 spent + 600 <= 1000
    await store.settle([Settlement(second, False)])  # failed: released, nothing spent
    today = int(time.time() // DAY)
    rows = await store.rows(today - 1, today + 1)
    assert [(r.caller, r.team, r.model, r.requests, r.tokens_in, r.tokens_out, r.nano) for r in rows] == [
        ("key:a", "t", "m", 1, 7, 3, 150)
    ]
    third = hold(("key:a", "team:t"), nano=850, tokens=90, expires=time.time() + 60)
    assert await store.reserve(limits, third) is None  # exactly to both limits
    over = hold(("key:a", "team:t"), nano=0, tokens=1, expires=time.time() + 60)
    assert await store.reserve(limits, over) is limits[1]


async def test_store_holds_expire(store):
    limit = Limit("key:a", "1d", None, 10)
    assert await store.reserve([limit], hold(tokens=10, expires=time.time() + 0.2)) is None
    assert await store.reserve([limit], hold(tokens=1, expires=time.time() + 60)) is limit
    await asyncio.sleep(0.3)
    assert await store.reserve([limit], hold(tokens=9, expires=time.time() + 60)) is None
