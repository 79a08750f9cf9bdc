"""Rule-based routing, the routing decision endpoint, the LLM answer cache and the LLM metrics,
through a real gateway with fake providers and the official `openai` SDK as the client."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.support.fake_llm import FakeLLM
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.services import require_redis


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def _deployment(fake: FakeLLM, provider: str, model: str) -> dict:
    return {
        "provider": provider,
        "model": model,
        "base_url": fake.base_url(provider),
        "api_key": "sk-test-123456",
    }


def _config(fake: FakeLLM) -> dict:
    return {
        "auth": {"required": True},
        "roles": {
            "router": {"models": ["auto", "*-chat"]},
            "small": {"models": ["auto", "small-chat"]},
            "direct": {"models": ["small-chat"]},
        },
        "models": {
            "small-chat": {
                "deployments": [_deployment(fake, "openai", "gpt-4o-mini")],
                "cache": {"ttl": "10m"},
            },
            "big-chat": {"deployments": [_deployment(fake, "anthropic", "claude-sonnet-4")]},
            "code-chat": {"deployments": [_deployment(fake, "gemini", "gemini-2.5-pro")]},
            "shared-chat": {
                "deployments": [_deployment(fake, "openai", "gpt-4o-mini")],
                "cache": {"ttl": "10m", "scope": "public"},
            },
            "sturdy-chat": {
                "strategy": "lowest_cost",  # the order given: the first fails, the second answers
                "deployments": [
                    _deployment(fake, "openai", "sturdy-a"),
                    _deployment(fake, "openai", "sturdy-b"),
                ],
            },
        },
        "routing": {
            "auto": {
                "rules": [
                    {"when": {"task": "code", "complexity": "high"}, "model": "big-chat"},
                    {"when": {"task": "code"}, "model": "code-chat"},
                    {"when": {"tags": ["shared"]}, "model": "shared-chat"},
                ],
                "default": "small-chat",
            }
        },
    }


@pytest.fixture(scope="module")
def gw(fake: FakeLLM) -> Iterator[GatewayProc]:
    proc = start_gateway(_config(fake))
    proc.keys = {}
    for role in ("admin", "router", "small", "direct"):
        proc.keys[role] = proc.api("POST", "/keys", {"name": role, "role": role}).json()["key"]
    proc.keys["router2"] = proc.api("POST", "/keys", {"name": "r2", "role": "router"}).json()["key"]
    yield proc
    proc.stop()


def _client(gw: GatewayProc, role: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.keys[role], max_retries=0, timeout=10)


def _raw(client: openai.OpenAI, model: str, text: str, **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kw
    )


def _calls(fake: FakeLLM, text: str) -> int:
    """Requests that reached a provider with `text` in them."""
    return sum(1 for r in fake.requests if text in json.dumps(r.get("json")))


def _unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:10]}"


# -- routing ---------------------------------------------------------------------------------------


def test_metadata_chooses_the_model_group(gw: GatewayProc, fake: FakeLLM):
    client = _client(gw)
    raw = _raw(client, "auto", "write a parser", metadata={"task": "code", "complexity": "high"})
    reply = raw.parse()
    assert reply.model == "big-chat" and reply.choices[0].message.content == "echo: write a parser"
    assert raw.headers["x-bridgeway-deployment"] == "anthropic/claude-sonnet-4"
    route = raw.headers["x-bridgeway-route"]
    assert route == "auto: rule 1 (task=code, complexity=high) -> big-chat; weighted"
    assert "metadata" not in fake.last["json"]  # the routing keys stay in the gateway

    raw = _raw(client, "auto", "write a lexer", extra_headers={"X-Bridgeway-Task": "code"})
    assert (
        raw.parse().model == "code-chat" and raw.headers["x-bridgeway-deployment"] == "gemini/gemini-2.5-pro"
    )
    assert raw.headers["x-bridgeway-route"].startswith("auto: rule 2 (task=code) -> code-chat")

    raw = _raw(client, "auto", _unique("just chatting"))
    assert raw.parse().model == "small-chat"
    assert raw.headers["x-bridgeway-route"].startswith("auto: no rule applied, default -> small-chat")

    raw = _raw(client, "auto", "anything", metadata={"prefer": "code-chat"})
    assert raw.parse().model == "code-chat" and "preferred by the caller" in raw.headers["x-bridgeway-route"]


def test_a_stream_is_routed_too(gw: GatewayProc):
    chunks = list(
        _client(gw).chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "stream some code"}],
            metadata={"task": "code"},
            stream=True,
        )
    )
    assert {c.model for c in chunks} == {"code-chat"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: stream some code"


def test_routing_respects_the_callers_grants(gw: GatewayProc):
    raw = _raw(
        _client(gw, "small"), "auto", _unique("hard code"), metadata={"task": "code", "complexity": "high"}
    )
    assert raw.parse().model == "small-chat"  # big-chat and code-chat are not its to use
    assert "big-chat not granted" in raw.headers["x-bridgeway-route"]
    with pytest.raises(openai.PermissionDeniedError):
        _raw(_client(gw, "direct"), "auto", "hi")  # the router name itself is not granted
    assert {m.id for m in _client(gw, "small").models.list()} == {"auto", "small-chat"}
    with pytest.raises(openai.BadRequestError, match="complexity must be one of"):
        _raw(_client(gw), "auto", "hi", metadata={"complexity": "extreme"})
    with pytest.raises(openai.BadRequestError, match="prefer names no model group"):
        _raw(_client(gw), "auto", "hi", metadata={"prefer": "no-such-group"})


# -- the decision endpoint ----------------------------------------------------------------------------


def _route(gw: GatewayProc, body, role: str | None = "admin", headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if role is not None:
        h["Authorization"] = f"Bearer {gw.keys[role]}"
    return gw.request("POST", "/api/v1/ai/route", data, h)


def test_the_decision_endpoint_answers_without_calling_a_model(gw: GatewayProc, fake: FakeLLM):
    text = _unique("refactor this algorithm step by step")
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "metadata": {"task": "code"}}
    r = _route(gw, {**body, "max_tokens": 1000})
    assert r.status == 200, r
    answer = r.json()
    assert answer["selected_model"] == "code-chat" and answer["deployment"] == "gemini/gemini-2.5-pro"
    assert answer["routing_reason"] == "auto: rule 2 (task=code) -> code-chat"
    assert answer["confidence"] == 0.95
    assert answer["estimated_tokens"]["output"] == 1000
    # gemini-2.5-pro: 1.25 in, 10 out per 1M tokens
    expected = (answer["estimated_tokens"]["input"] * 1.25 + 1000 * 10.0) / 1e6
    assert answer["estimated_cost"] == pytest.approx(expected)
    assert answer["signals"]["complexity_estimated"] is True and answer["signals"]["task_estimated"] is False
    assert _calls(fake, text) == 0

    headers = {"X-Bridgeway-Complexity": "high"}
    assert _route(gw, body, headers=headers).json()["selected_model"] == "big-chat"
    assert (
        _route(gw, {**body, "model": "small-chat"}).json()["routing_reason"] == "small-chat: named directly"
    )
    # a caller with a models grant may ask; it hears only of groups it may use
    assert _route(gw, body, role="small").json()["selected_model"] == "small-chat"


def test_the_decision_endpoint_refuses_clearly(gw: GatewayProc):
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    r = _route(gw, body, role=None)
    assert r.status == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED"
    r = _route(gw, body, role="direct")
    assert r.status == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    r = _route(gw, {**body, "model": "no-such"})
    assert r.status == 404 and r.json()["error"]["code"] == "UNKNOWN_MODEL"
    r = _route(gw, b"{not json")
    assert r.status == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = _route(gw, {"model": "auto"})
    assert r.status == 422 and "messages" in r.json()["error"]["message"]
    r = _route(gw, {**body, "metadata": {"tags": "[oops"}})
    assert r.status == 400 and "tags" in r.json()["error"]["message"]
    r = _route(gw, {**body, "max_tokens": -1})
    assert r.status == 422 and "max_tokens" in r.json()["error"]["message"]


# -- the cache ------------------------------------------------------------------------------------------


def test_a_repeated_request_is_answered_from_the_cache(gw: GatewayProc, fake: FakeLLM):
    client = _client(gw)
    text = _unique("cache me")
    first = _raw(client, "small-chat", text, temperature=1)
    assert first.headers["x-cache"] == "MISS"
    second = _raw(client, "small-chat", text, temperature=1.0, user="someone")  # same answer
    assert second.headers["x-cache"] == "HIT" and second.headers["x-bridgeway-route"] == "cache hit"
    assert second.headers["x-bridgeway-deployment"] == "openai/gpt-4o-mini"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert _calls(fake, text) == 1
    assert _raw(client, "small-chat", text, temperature=0.2).headers["x-cache"] == "MISS"  # another answer
    assert _calls(fake, text) == 2
    # routed requests use the chosen group's cache, and say both
    routed = _raw(client, "auto", text, temperature=1)
    assert routed.headers["x-cache"] == "HIT"
    assert routed.headers["x-bridgeway-route"] == "auto: no rule applied, default -> small-chat; cache hit"
    # groups without a cache say nothing about one
    assert "x-cache" not in _raw(client, "big-chat", text).headers


def test_a_request_can_opt_out(gw: GatewayProc, fake: FakeLLM):
    client = _client(gw)
    text = _unique("opt out")
    _raw(client, "small-chat", text)
    skip = _raw(client, "small-chat", text, extra_headers={"Cache-Control": "no-store"})
    assert "x-cache" not in skip.headers
    assert _raw(client, "small-chat", text, metadata={"cache": "no-store"}).headers.get("x-cache") is None
    refresh = _raw(client, "small-chat", text, extra_headers={"Cache-Control": "no-cache"})
    assert refresh.headers["x-cache"] == "MISS"
    assert _calls(fake, text) == 4
    assert _raw(client, "small-chat", text).headers["x-cache"] == "HIT"
    with pytest.raises(openai.BadRequestError, match="metadata.cache"):
        _raw(client, "small-chat", text, metadata={"cache": "maybe"})


def _sse(gw: GatewayProc, role: str, body: dict):
    headers = {"Authorization": f"Bearer {gw.keys[role]}", "Content-Type": "application/json"}
    return gw.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)


def test_a_cached_stream_is_replayed_as_a_stream(gw: GatewayProc, fake: FakeLLM):
    text = _unique("stream and replay")
    body = {"model": "small-chat", "messages": [{"role": "user", "content": text}], "stream": True}
    first, second = _sse(gw, "admin", body), _sse(gw, "admin", body)
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert second.headers["content-type"] == "text/event-stream"
    assert second.body == first.body and second.body.endswith(b"data: [DONE]\n\n")
    assert _calls(fake, text) == 1
    chunks = list(
        _client(gw).chat.completions.create(
            model="small-chat", messages=[{"role": "user", "content": text}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"echo: {text}"
    assert _calls(fake, text) == 1
    # the plain answer is another entry: a stream's events are not a JSON reply
    assert _raw(_client(gw), "small-chat", text).headers["x-cache"] == "MISS"


def test_a_broken_stream_is_not_stored(gw: GatewayProc, fake: FakeLLM):
    text = _unique("a longer answer that breaks")
    body = {"model": "small-chat", "messages": [{"role": "user", "content": text}], "stream": True}
    fake.control("die_mid_stream", 1)
    broken = _sse(gw, "admin", body)
    assert b'"stream_error"' in broken.body and not broken.body.endswith(b"data: [DONE]\n\n")
    again = _sse(gw, "admin", body)
    assert again.headers["x-cache"] == "MISS" and again.body.endswith(b"data: [DONE]\n\n")
    assert _sse(gw, "admin", body).headers["x-cache"] == "HIT"
    fake.control("status:500", 1)
    text = _unique("an error")
    with pytest.raises(openai.InternalServerError):
        _raw(_client(gw), "small-chat", text)
    assert _raw(_client(gw), "small-chat", text).headers["x-cache"] == "MISS"  # errors are not kept


def test_one_caller_never_sees_anothers_answer(gw: GatewayProc, fake: FakeLLM):
    text = _unique("mine only")
    assert _raw(_client(gw, "router"), "small-chat", text).headers["x-cache"] == "MISS"
    assert _raw(_client(gw, "router2"), "small-chat", text).headers["x-cache"] == "MISS"  # same role
    assert _raw(_client(gw, "router"), "small-chat", text).headers["x-cache"] == "HIT"
    # a group cached with scope public shares its answers
    text = _unique("everyone's")
    assert _raw(_client(gw, "router"), "shared-chat", text).headers["x-cache"] == "MISS"
    assert _raw(_client(gw, "router2"), "shared-chat", text).headers["x-cache"] == "HIT"


def test_embeddings_are_cached_too(gw: GatewayProc, fake: FakeLLM):
    text = _unique("embed me")
    client = _client(gw)
    first = client.embeddings.with_raw_response.create(model="small-chat", input=[text])
    second = client.embeddings.with_raw_response.create(model="small-chat", input=[text])
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert _calls(fake, text) == 1


def test_answers_are_shared_through_redis(fake: FakeLLM):
    require_redis()
    config = _config(fake)
    config["state"] = "redis://127.0.0.1:6379/0"
    a, b = start_gateway(config), start_gateway(config)
    try:
        key = a.api("POST", "/keys", {"name": "replicas", "role": "router"}).json()["key"]  # in Redis
        text = _unique("across replicas")  # a fresh key in the shared Redis
        body = {"model": "small-chat", "messages": [{"role": "user", "content": text}], "stream": True}
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        first = a.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
        second = b.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert second.body == first.body and _calls(fake, text) == 1
    finally:
        a.stop()
        b.stop()


# -- metrics --------------------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_llm_metrics_are_exported(gw: GatewayProc, fake: FakeLLM):
    client = _client(gw)
    _raw(client, "auto", _unique("metrics"), metadata={"task": "code", "complexity": "high"})
    list(
        client.chat.completions.create(
            model="big-chat", messages=[{"role": "user", "content": "s"}], stream=True
        )
    )
    fake.control("status:500", 1)
    assert _raw(client, "sturdy-chat", "fall back").headers["x-bridgeway-deployment"] == "openai/sturdy-b"
    text = _unique("cached metric")
    _raw(client, "small-chat", text)
    _raw(client, "small-chat", text)
    with pytest.raises(openai.NotFoundError):
        _raw(client, "made-up-model-name", "hi")
    body = gw.request("GET", "/metrics").body.decode()
    labels = {"model": "big-chat", "deployment": "anthropic/claude-sonnet-4"}
    assert _metric(body, "bridgeway_llm_requests_total", status="200", **labels) >= 2
    assert _metric(body, "bridgeway_llm_tokens_total", direction="input", **labels) > 0
    assert _metric(body, "bridgeway_llm_tokens_total", direction="output", **labels) > 0
    assert _metric(body, "bridgeway_llm_routed_total", router="auto", model="big-chat") >= 1
    assert _metric(body, "bridgeway_llm_time_to_first_token_seconds_count", model="big-chat") >= 1
    assert _metric(body, "bridgeway_llm_request_duration_seconds_count", model="big-chat") >= 2
    assert _metric(body, "bridgeway_llm_fallbacks_total", model="sturdy-chat", code="UPSTREAM_ERROR") >= 1
    assert _metric(body, "bridgeway_llm_cache_hits_total", model="small-chat") >= 1
    assert _metric(body, "bridgeway_llm_requests_total", model="-", status="404") >= 1
    assert "made-up-model-name" not in body and "sk-test" not in body and gw.keys["admin"][:12] not in body
    assert not re.search(r"bridgeway_llm_\w+\{[^}]*(metrics|cached metric)", body)  # no prompts in labels
