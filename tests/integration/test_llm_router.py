"""The OpenAI-compatible endpoint through a real gateway, with the official `openai` SDK as the
client and fake providers on loopback speaking the OpenAI, Anthropic and Gemini wire formats."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from tests.support.fake_llm import BAD_KEY, FakeLLM
from tests.support.gateway import GatewayProc, start_gateway

PROVIDERS = ("openai", "anthropic", "gemini")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def _deployment(fake: FakeLLM, provider: str, model: str, **extra) -> dict:
    return {
        "provider": provider,
        "model": model,
        "base_url": fake.base_url(provider),
        "api_key": "sk-test-1234567890",
        **extra,
    }


@pytest.fixture(scope="module")
def gw(fake: FakeLLM) -> Iterator[GatewayProc]:
    models = {f"chat-{p}": {"deployments": [_deployment(fake, p, f"{p}-model")]} for p in PROVIDERS}
    models["embed-openai"] = {"deployments": [_deployment(fake, "openai", "text-embedding-3-small")]}
    models["embed-gemini"] = {"deployments": [_deployment(fake, "gemini", "text-embedding-004")]}
    models["resilient"] = {
        "strategy": "lowest_cost",  # equal prices: the order given
        "deployments": [_deployment(fake, "openai", "primary"), _deployment(fake, "anthropic", "secondary")],
        "cooldown": {"failures": 1, "open_for": "1s"},
    }
    models["broken"] = {"deployments": [_deployment(fake, "openai", "x", api_key=BAD_KEY)]}
    config = {
        "auth": {"required": True},
        "roles": {"chatter": {"models": ["chat-*", "resilient"]}},
        "services": {},
        "models": models,
    }
    proc = start_gateway(config)
    proc.admin_key = proc.api("POST", "/keys", {"name": "ops", "role": "admin"}).json()["key"]
    yield proc
    proc.stop()


def _client(gw: GatewayProc, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key or gw.admin_key, max_retries=0, timeout=10)


def _ask(client: openai.OpenAI, model: str, text: str = "hello there", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_plain_chat_with_each_provider(gw: GatewayProc, provider: str):
    reply = _ask(_client(gw), f"chat-{provider}")
    assert reply.model == f"chat-{provider}"
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streaming_with_each_provider(gw: GatewayProc, provider: str):
    chunks = list(
        _ask(
            _client(gw),
            f"chat-{provider}",
            "stream me please",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_calls_with_each_provider(gw: GatewayProc, provider: str):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    reply = _ask(_client(gw), f"chat-{provider}", "call get_weather for Monaco", tools=tools)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in call.function.arguments
    assert reply.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", ["embed-openai", "embed-gemini"])
def test_embeddings(gw: GatewayProc, model: str):
    result = _client(gw).embeddings.create(model=model, input=["one", "two words"])
    assert [len(e.embedding) > 0 for e in result.data] == [True, True]
    assert result.model == model


def test_models_lists_what_the_caller_may_use(gw: GatewayProc):
    everything = {m.id for m in _client(gw).models.list()}
    assert {"chat-openai", "resilient", "embed-gemini"} <= everything
    key = gw.api("POST", "/keys", {"name": "c", "role": "chatter"}).json()["key"]
    assert {m.id for m in _client(gw, key).models.list()} == {
        "chat-openai",
        "chat-anthropic",
        "chat-gemini",
        "resilient",
    }
    with pytest.raises(openai.PermissionDeniedError):
        _client(gw, key).embeddings.create(model="embed-openai", input="x")
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(gw, "bw_0000000000_nope"), "chat-openai")
    with pytest.raises(openai.NotFoundError):
        _ask(_client(gw), "no-such-model")


def test_fallback_before_the_first_token_and_cooldown(gw: GatewayProc, fake: FakeLLM):
    client = _client(gw)
    fake.control("status:500", 1)  # the primary fails once
    raw = client.chat.completions.with_raw_response.create(
        model="resilient", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-bridgeway-deployment"] == "anthropic/secondary"
    assert "openai/primary UPSTREAM_ERROR" in raw.headers["x-bridgeway-route"]
    # One failure cooled the primary down for a second: it is skipped, then probed back.
    raw = client.chat.completions.with_raw_response.create(
        model="resilient", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-bridgeway-deployment"] == "anthropic/secondary"
    assert "cooling down" in raw.headers["x-bridgeway-route"]
    time.sleep(1.1)
    raw = client.chat.completions.with_raw_response.create(
        model="resilient", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-bridgeway-deployment"] == "openai/primary"

    fake.control("die_before_first_token", 1)  # a stream that dies before content falls back too
    time.sleep(1.1)
    chunks = list(_ask(client, "resilient", "again", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: again"


def test_a_stream_broken_after_the_first_token_ends_with_an_error_event(gw: GatewayProc, fake: FakeLLM):
    fake.control("die_mid_stream", 1)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in _ask(_client(gw), "chat-openai", "a longer answer to cut", stream=True):
            received.append(chunk)
    assert received and "interrupted" in str(err.value)


def test_provider_errors_reach_the_client_without_the_provider_key(gw: GatewayProc):
    with pytest.raises(openai.APIStatusError) as err:
        _ask(_client(gw), "broken")
    assert err.value.status_code == 502
    assert BAD_KEY not in str(err.value.body) and "UPSTREAM_AUTH" in str(err.value.body)


def test_malformed_requests_get_a_clear_error(gw: GatewayProc):
    headers = {"Authorization": f"Bearer {gw.admin_key}", "Content-Type": "application/json"}
    r = gw.request("POST", "/v1/chat/completions", b"{not json", headers)
    assert r.status == 400 and r.json()["error"]["code"] == "BAD_REQUEST"
    r = gw.request("POST", "/v1/chat/completions", b'{"model": "chat-anthropic", "messages": "x"}', headers)
    assert r.status == 400
