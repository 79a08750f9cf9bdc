"""LLM spend and budgets through real gateways, the fake OpenAI provider and the `openai` SDK:
budgets hammered concurrently (two replicas on Redis; two workers on one SQLite file), spend
that survives a restart, per-key model lists and client rate limits on /v1."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.support.fake_llm import FakeLLM
from tests.support.gateway import GatewayProc, start_gateway, wait_until
from tests.support.services import REDIS_URL, require_redis

PRICE = 1000.0  # USD per 1M tokens in and out: 0.001 USD a token, so money tracks tokens
MAX_TOKENS = 12
PROMPT = "hello " * 10  # the fake answers "echo: <prompt>": 11 output tokens, within MAX_TOKENS


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def _config(fake: FakeLLM, model: str, **extra) -> dict:
    deployment = {
        "provider": "openai",
        "model": "gpt-fake",
        "base_url": fake.base_url("openai"),
        "api_key": "sk-test-1234567890",
        "input_per_1m": PRICE,
        "output_per_1m": PRICE,
    }
    return {
        "auth": {"required": True},
        "roles": {"chatter": {"models": [f"{model}*"]}},
        "models": {model: {"deployments": [deployment]}, f"{model}-other": {"deployments": [deployment]}},
        **extra,
    }


def _body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}


def _estimate_usd(model: str) -> float:
    """An upper bound of what the gateway reserves for one request (input from the body's size
    as the SDK sends it, whatever its spacing; output max_tokens)."""
    size = len(json.dumps(_body(model)))
    return (math.ceil(size / 3) + MAX_TOKENS) * PRICE / 1e6


def _spend(gw: GatewayProc, **query) -> dict:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    r = gw.api("GET", f"/spend?{q}")
    assert r.status == 200, r
    return r.json()


async def _hammer(urls: list[str], key: str, model: str, count: int = 50) -> list[int]:
    """`count` concurrent requests, spread over the gateways; their statuses."""
    clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key=key, max_retries=0, timeout=20) for u in urls]

    async def one(i: int) -> int:
        try:
            await clients[i % len(clients)].chat.completions.create(**_body(model))
            return 200
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "BUDGET_EXCEEDED" if isinstance(exc.body, dict) else True
            return 429

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        for c in clients:
            await c.close()


def _until_refused(gw: GatewayProc, key: str, model: str) -> openai.RateLimitError:
    """Sequential requests until the budget refuses one with nothing else held: a refusal counts
    once it holds after a pause (settlements are written just after the answers)."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)
    refused = None
    for _ in range(200):
        try:
            client.chat.completions.create(**_body(model))
            refused = None
        except openai.RateLimitError as exc:
            if refused is not None:
                return exc
            refused = exc
            time.sleep(0.3)
    raise AssertionError("the budget never refused")


def _check_budget_held(gw: GatewayProc, statuses: list[int], limit: float, model: str, **query) -> None:
    refusal = _until_refused(gw, query.pop("api_key"), model)
    assert refusal.response.status_code == 429
    assert refusal.response.json()["error"]["code"] == "BUDGET_EXCEEDED"
    assert 0 < int(refusal.response.headers["retry-after"]) <= 86400
    estimate = _estimate_usd(model)
    spent = _spend(gw, **query)["totals"]
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    # The bound: concurrent requests overspend by at most one request's estimate...
    assert spent["usd"] <= limit + estimate + 1e-9, (spent, estimate)
    # ...and the budget was really used up: the last refusal had nothing else in flight.
    assert spent["usd"] > limit - estimate, (spent, estimate)


def test_fifty_concurrent_requests_on_two_replicas_overspend_by_at_most_one_estimate(fake: FakeLLM):
    require_redis()
    suffix = uuid.uuid4().hex[:8]
    team, model = f"team{suffix}", f"chat{suffix}"
    limit = 0.4  # about 18 answers of 22 tokens; 50 requests want 2.5 times that
    config = _config(
        fake,
        model,
        state=REDIS_URL,
        clients={team: {"role": "chatter", "budgets": [{"period": "1d", "usd": limit}]}},
    )
    a, b = start_gateway(config), start_gateway(config)
    try:
        key = a.api("POST", "/keys", {"name": "k", "client": team}).json()["key"]
        statuses = asyncio.run(_hammer([a.url, b.url], key, model))
        # The other replica writes its settlements in the background: wait for them.
        wait_until(lambda: _spend(a, team=team)["totals"]["requests"] == statuses.count(200), 5)
        _check_budget_held(a, statuses, limit, model, team=team, api_key=key)
        assert _spend(b, team=team)["totals"] == _spend(a, team=team)["totals"]  # one ledger
    finally:
        a.stop()
        b.stop()
        asyncio.run(_drop_redis_spend(team))


async def _drop_redis_spend(team: str) -> None:
    """This test's keys and fields of the shared Redis: its team's, and its one key's."""
    from bridgeway.state.resp import RespClient

    redis = RespClient(REDIS_URL, timeout=2)
    try:
        for day in await redis.execute("KEYS", "bw:llm:s:*"):
            fields = [f for f in (await redis.execute("HKEYS", day)) if team.encode() in f]
            callers = {f.split(b"\x1e")[0] for f in fields}
            if fields:
                await redis.execute("HDEL", day, *fields)
        keys = await redis.execute("KEYS", f"bw:llm:*team:{team}*")
        for caller in callers:
            keys += await redis.execute("KEYS", b"bw:llm:b:" + caller + b":*")
        if keys:
            await redis.execute("DEL", *keys)
    finally:
        await redis.close()


@pytest.fixture(scope="module")
def sqlite_gw(fake: FakeLLM, tmp_path_factory) -> Iterator[GatewayProc]:
    """Two workers on one SQLite file, a per-key default budget on a role."""
    state = tmp_path_factory.mktemp("spend") / "state.db"
    config = _config(fake, "chat", state=f"sqlite:///{state}")
    config["roles"]["capped"] = {"models": ["chat*"], "budgets": ["0.3usd/1d"]}
    config["clients"] = {"limited": {"role": "chatter", "limits": [{"rate": "2/min", "service": "/v1"}]}}
    gw = start_gateway(config, workers=2)
    gw.config = config
    yield gw
    gw.stop()


def test_a_role_budget_holds_across_two_workers_on_one_sqlite_file(sqlite_gw: GatewayProc):
    gw = sqlite_gw
    key = gw.api("POST", "/keys", {"name": "k", "role": "capped"}).json()
    statuses = asyncio.run(_hammer([gw.url], key["key"], "chat"))
    _check_budget_held(gw, statuses, 0.3, "chat", key=key["id"], api_key=key["key"])


def test_spend_survives_a_restart_and_is_reported_per_key_team_and_model(fake: FakeLLM, tmp_path):
    config = _config(fake, "chat", state=f"sqlite:///{tmp_path / 'state.db'}")
    gw = start_gateway(config)
    # ~51 tokens estimated a call, 21 used: two calls fit in 85, a third does not
    key = gw.api("POST", "/keys", {"name": "k", "role": "chatter", "budgets": ["85tokens/total"]}).json()
    assert key["budgets"] == [{"period": "total", "tokens": 85}]
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key["key"], max_retries=0, timeout=10)
        reply = client.chat.completions.create(**_body("chat"))
        time.sleep(0.2)  # settled
        streamed = list(client.chat.completions.create(**_body("chat-other"), stream=True))  # no usage asked
        assert streamed and not any(c.usage for c in streamed)
    finally:
        gw.stop()
    gw = start_gateway(config)
    try:
        _after_the_restart(gw, key, reply.usage)
    finally:
        gw.stop()


def _after_the_restart(gw: GatewayProc, key: dict, usage) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key["key"], max_retries=0, timeout=10)
    report = _spend(gw, key=key["id"], group_by="model")
    used_in, used_out = 2 * usage.prompt_tokens, 2 * usage.completion_tokens
    assert report["totals"] == {
        "requests": 2,
        "tokens_in": used_in,
        "tokens_out": used_out,
        "usd": pytest.approx((used_in + used_out) * PRICE / 1e6),
    }
    assert [(r["model"], r["requests"]) for r in report["rows"]] == [("chat", 1), ("chat-other", 1)]
    assert _spend(gw, key=key["id"], model="chat")["totals"]["tokens_out"] == usage.completion_tokens
    assert _spend(gw, key="nobody")["totals"]["requests"] == 0
    # what was spent before the restart still counts: the next estimate does not fit
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**_body("chat"))
    assert "retry-after" not in refused.value.response.headers  # a total budget never renews
    # bad queries get clear errors
    for query, problem in [("from=yesterday", "not a date"), ("group_by=colour", "unknown column"),
                           ("from=2020-01-01&to=2026-01-01", "at most")]:  # fmt: skip
        r = gw.api("GET", f"/spend?{query}")
        assert r.status == 422 and problem in r.json()["error"]["message"], r
    assert gw.api("GET", "/spend", auth=False).status == 401


def test_a_failed_call_releases_its_hold_and_costs_nothing(sqlite_gw: GatewayProc, fake: FakeLLM):
    gw = sqlite_gw
    key = gw.api("POST", "/keys", {"name": "k", "role": "chatter", "budgets": ["0.06usd/1d"]}).json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key["key"], max_retries=0, timeout=10)
    fake.control("status:500", 2)  # (a third failure in a row would cool the deployment down)
    for _ in range(2):  # one estimate (~0.051 USD) fits, two do not
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(**_body("chat"))
        assert failed.value.status_code == 502
        time.sleep(0.2)
    client.chat.completions.create(**_body("chat"))  # the three holds were released
    assert _spend(gw, key=key["id"])["totals"]["requests"] == 1


def test_a_key_may_be_limited_to_some_models(sqlite_gw: GatewayProc):
    gw = sqlite_gw
    key = gw.api("POST", "/keys", {"name": "k", "role": "chatter", "models": ["*-other", "not-granted"]})
    assert key.status == 201 and key.json()["models"] == ["*-other", "not-granted"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key.json()["key"], max_retries=0, timeout=10)
    assert [m.id for m in client.models.list()] == ["chat-other"]  # within the role's grant too
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(**_body("chat"))
    client.chat.completions.create(**_body("chat-other"))
    bad = gw.api("POST", "/keys", {"name": "k", "role": "chatter", "budgets": ["lots"]})
    assert bad.status == 422 and "not a budget" in bad.json()["error"]["message"]


def test_client_rate_limits_apply_on_v1(sqlite_gw: GatewayProc):
    gw = sqlite_gw
    key = gw.api("POST", "/keys", {"name": "k", "client": "limited"}).json()["key"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)
    ok = client.chat.completions.with_raw_response.create(**_body("chat"))
    assert ok.headers["ratelimit-policy"] == "2;w=60"
    client.chat.completions.create(**_body("chat"))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(**_body("chat"))
    assert limited.value.response.json()["error"]["code"] == "RATE_LIMITED"


def test_spend_metrics_by_model(sqlite_gw: GatewayProc):
    text = wait_until(
        lambda: (
            (body := sqlite_gw.request("GET", "/metrics").body.decode())
            and 'bridgeway_llm_spend_usd_total{model="chat"}' in body
            and body
        ),
        5,
    )
    tokens = [line for line in text.splitlines() if line.startswith("bridgeway_llm_tokens_total{")]
    assert any('direction="output"' in line and 'model="chat"' in line for line in tokens)
    assert len([line for line in text.splitlines() if line.startswith("# TYPE bridgeway_llm_tokens")]) == 1
    refusals = [line for line in text.splitlines() if line.startswith("bridgeway_llm_budget_refusals_total")]
    assert refusals and float(refusals[0].split()[-1]) > 0
    assert "key:" not in text
