"""bridgeway.llm.client against the fake providers over real loopback HTTP (no mocks): answers,
streams, tool calls and embeddings for each wire format, and every failure mode mapped to the
right ProviderError, before the first token (retryable) or after it (StreamBroken)."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from bridgeway.llm.client import ChatStream, Pools, chat, embeddings
from bridgeway.llm.providers import Deployment, ProviderError, StreamBroken, tokens
from tests.support.fake_llm import BAD_KEY, FakeLLM
from tests.support.procs import free_port
from tests.support.tls import LocalCA

PROVIDERS = ["openai", "anthropic", "gemini"]
MODELS = {"openai": "gpt-fake", "anthropic": "claude-fake", "gemini": "gemini-fake"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
async def pools() -> AsyncIterator[Pools]:
    pools = Pools()
    yield pools
    await pools.close()


def deployment(fake: FakeLLM, provider: str, key: str = "test-key-0123456789") -> Deployment:
    return Deployment(provider, MODELS[provider], fake.base_url(provider), api_key=key)


def ask(text: str, **extra: Any) -> dict:
    return {
        "model": "fast",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        **extra,
    }


async def call(pools: Pools, d: Deployment, body: dict, stream: bool = False, **kw: Any) -> Any:
    return await chat(pools.get(d), d, body, "fast", stream, **kw)


async def collect(stream: ChatStream) -> list[dict]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# ---------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_chat(fake_llm: FakeLLM, pools: Pools, provider: str) -> None:
    d = deployment(fake_llm, provider)
    resp = await call(pools, d, ask("hello big world"))
    parsed = ChatCompletion.model_validate(resp)
    assert parsed.model == "fast"
    assert resp["choices"][0]["message"]["content"] == "echo: hello big world"
    assert resp["choices"][0]["finish_reason"] == "stop"
    assert tokens(resp["usage"]) == (5, 4)  # the fake's counts: words
    sent = fake_llm.last["json"]
    if provider == "anthropic":
        assert sent["system"] == "Be brief." and sent["model"] == "claude-fake"
        assert fake_llm.last["headers"]["x-api-key"] == "test-key-0123456789"
    elif provider == "gemini":
        assert fake_llm.last["path"] == "/v1beta/models/gemini-fake:generateContent"
        assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    else:
        assert (
            sent["model"] == "gpt-fake"
            and fake_llm.last["headers"]["authorization"] == "Bearer test-key-0123456789"
        )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream(fake_llm: FakeLLM, pools: Pools, provider: str, include_usage: bool) -> None:
    d = deployment(fake_llm, provider)
    body = ask("hello big world", stream_options={"include_usage": include_usage})
    stream = await call(pools, d, body, stream=True)
    chunks = await collect(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == "echo: hello big world"
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["stop"]
    assert {c["model"] for c in chunks} == {"fast"}
    assert tokens(stream.usage) == (5, 4)
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert usage_chunks == ([{**usage_chunks[0], "usage": stream.usage}] if include_usage else [])
    if provider == "openai":  # usage is always asked upstream, whatever the client said
        assert fake_llm.last["json"]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_max_tokens_and_json_mode(fake_llm: FakeLLM, pools: Pools, provider: str) -> None:
    d = deployment(fake_llm, provider)
    resp = await call(pools, d, ask("one two three four", max_tokens=2))
    assert resp["choices"][0]["message"]["content"] == "echo: one"
    assert resp["choices"][0]["finish_reason"] == "length"
    resp = await call(pools, d, ask("hi there", response_format={"type": "json_object"}))
    assert resp["choices"][0]["message"]["content"] == '{"echo":"hi there"}'


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_tool_call_round_trip(fake_llm: FakeLLM, pools: Pools, provider: str) -> None:
    d = deployment(fake_llm, provider)
    body = ask("weather in Paris", tools=[WEATHER])
    resp = await call(pools, d, body)
    message = resp["choices"][0]["message"]
    assert resp["choices"][0]["finish_reason"] == "tool_calls"
    (tool_call,) = message["tool_calls"]
    assert tool_call["function"]["name"] == "weather"
    assert tool_call["function"]["arguments"] == '{"city":"weather in Paris"}'
    follow_up = {**body, "messages": [*body["messages"], message,
                                      {"role": "tool", "tool_call_id": tool_call["id"], "content": "sunny"}]}  # fmt: skip
    resp = await call(pools, d, follow_up)
    said = resp["choices"][0]["message"]["content"]
    assert said == ('tool said: {"output":"sunny"}' if provider == "gemini" else "tool said: sunny")

    stream = await call(pools, d, {**body, "tool_choice": "required"}, stream=True)
    chunks = await collect(stream)
    deltas = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert deltas[0]["id"] and deltas[0]["function"]["name"] == "weather"
    assert "".join(tc["function"].get("arguments") or "" for tc in deltas) == '{"city":"weather in Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_named_tool_choice_reaches_each_provider(fake_llm: FakeLLM, pools: Pools) -> None:
    clock = {
        "type": "function",
        "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
    }
    body = ask(
        "anything", tools=[WEATHER, clock], tool_choice={"type": "function", "function": {"name": "clock"}}
    )
    for provider in PROVIDERS:
        resp = await call(pools, deployment(fake_llm, provider), body)
        assert resp["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "clock", provider


# ---------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("provider", ["openai", "gemini"])
@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_embeddings(fake_llm: FakeLLM, pools: Pools, provider: str, encoding: str) -> None:
    d = deployment(fake_llm, provider)
    body = {"model": "emb", "input": ["hello world", "bye"], "dimensions": 4, "encoding_format": encoding}
    resp = await embeddings(pools.get(d), d, body, "emb")
    assert resp["model"] == "emb" and [item["index"] for item in resp["data"]] == [0, 1]
    vectors = [item["embedding"] for item in resp["data"]]
    if encoding == "base64":
        vectors = [list(struct.unpack("<4f", base64.b64decode(v))) for v in vectors]
    assert all(len(v) == 4 for v in vectors) and vectors[0] != vectors[1]
    # Same text, same vector, whichever wire format carried it.
    other = deployment(fake_llm, "gemini" if provider == "openai" else "openai")
    again = await embeddings(
        pools.get(other), other, {"model": "emb", "input": "hello world", "dimensions": 4}, "emb"
    )
    assert again["data"][0]["embedding"] == vectors[0]


async def test_anthropic_embeddings_are_refused_without_a_request(fake_llm: FakeLLM, pools: Pools) -> None:
    d = deployment(fake_llm, "anthropic")
    with pytest.raises(ProviderError) as info:
        await embeddings(pools.get(d), d, {"model": "emb", "input": "x"}, "emb")
    assert info.value.code == "UNSUPPORTED" and not fake_llm.requests


# ------------------------------------------------------------------------------------ failures

# mode -> (code, retryable) for each provider, stream or not
FAILURES = {
    "status:429": ("RATE_LIMITED", True),
    "status:500": ("UPSTREAM_ERROR", True),
    "status:503": ("UPSTREAM_ERROR", True),
    "context_window": ("CONTEXT_WINDOW", True),
    "malformed": ("BAD_RESPONSE", True),
    "die_before_first_token": ("UPSTREAM_ERROR", True),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("mode", list(FAILURES))
async def test_failures_before_the_first_token(
    fake_llm: FakeLLM, pools: Pools, provider: str, stream: bool, mode: str
) -> None:
    d = deployment(fake_llm, provider)
    with pytest.raises(ProviderError) as info:
        await call(pools, d, ask(f"one two three four [fake:{mode}]"), stream=stream)
    err = info.value
    assert not isinstance(err, StreamBroken)  # nothing reached the caller: fall back
    assert (err.code, err.retryable) == FAILURES[mode], err
    assert err.message.startswith(provider + ":")
    if mode == "status:429":
        assert err.status == 429 and err.retry_after == (2.0 if provider == "gemini" else 1.0)
    # The pool is fine afterwards (a broken connection was dropped, not reused).
    resp = await call(pools, d, ask("again"))
    assert resp["choices"][0]["message"]["content"] == "echo: again"


async def test_anthropic_overloaded_529(fake_llm: FakeLLM, pools: Pools) -> None:
    d = deployment(fake_llm, "anthropic")
    with pytest.raises(ProviderError) as info:
        await call(pools, d, ask("x [fake:status:529]"))
    assert (info.value.code, info.value.status, info.value.retryable) == ("UPSTREAM_ERROR", 502, True)
    assert info.value.message == "anthropic: Overloaded"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["die_mid_stream", "error_event"])
async def test_failures_after_the_first_token_break_the_stream(
    fake_llm: FakeLLM, pools: Pools, provider: str, mode: str
) -> None:
    d = deployment(fake_llm, provider)
    stream = await call(pools, d, ask(f"one two three four five [fake:{mode}]"), stream=True)
    received: list[dict] = []
    with pytest.raises(StreamBroken) as info:
        async for chunk in stream:
            received.append(chunk)
    err = info.value
    assert (err.code, err.retryable, err.status) == ("STREAM_BROKEN", False, 502)
    assert err.cause.retryable  # what it would have been before the first token
    assert text_of(received).startswith("echo:")
    with pytest.raises(StopAsyncIteration):  # and it stays ended
        await stream.__anext__()
    if provider == "anthropic":
        assert stream.usage is not None and stream.usage["prompt_tokens"] > 0  # told at message_start


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_die_mid_body_of_a_plain_answer(fake_llm: FakeLLM, pools: Pools, provider: str) -> None:
    with pytest.raises(ProviderError) as info:
        await call(pools, deployment(fake_llm, provider), ask("x [fake:die_mid_stream]"))
    assert (info.value.code, info.value.retryable) == ("UPSTREAM_ERROR", True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_slow_upstream_times_out(fake_llm: FakeLLM, pools: Pools, provider: str, stream: bool) -> None:
    d = deployment(fake_llm, provider)
    with pytest.raises(ProviderError) as info:
        await call(pools, d, ask("x [fake:slow:1]"), stream=stream, timeout=0.2)
    assert (info.value.code, info.value.status, info.value.retryable) == ("UPSTREAM_TIMEOUT", 504, True)
    resp = await call(pools, d, ask("x [fake:slow:0.05]"), stream=stream, timeout=5)
    assert resp is not None


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_bad_key_is_the_deployments_fault_and_is_never_echoed(
    fake_llm: FakeLLM, pools: Pools, provider: str
) -> None:
    d = deployment(fake_llm, provider, key=BAD_KEY)
    with pytest.raises(ProviderError) as info:
        await call(pools, d, ask("hi"))
    assert (info.value.code, info.value.status, info.value.retryable) == ("UPSTREAM_AUTH", 502, True)
    assert BAD_KEY not in info.value.message


async def test_refused_connection(pools: Pools) -> None:
    d = Deployment("openai", "m", f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ProviderError) as info:
        await call(pools, d, ask("hi"))
    assert (info.value.code, info.value.retryable) == ("UPSTREAM_CONNECT", True)


async def test_global_control_mode_then_recovery(fake_llm: FakeLLM, pools: Pools) -> None:
    d = deployment(fake_llm, "anthropic")
    fake_llm.control("status:429", count=2)
    for _ in range(2):
        with pytest.raises(ProviderError, match="rate limit"):
            await call(pools, d, ask("hi"))
    assert (await call(pools, d, ask("hi")))["choices"][0]["message"]["content"] == "echo: hi"
    assert pools.get(d).stats["open"] == 1  # errors answered in full keep the connection alive


async def test_header_mode(fake_llm: FakeLLM, pools: Pools) -> None:
    d = Deployment(
        "openai", "m", fake_llm.base_url("openai"), extra_headers=(("x-fake-mode", "context_window"),)
    )
    with pytest.raises(ProviderError) as info:
        await call(pools, d, ask("hi"))
    assert info.value.code == "CONTEXT_WINDOW"


# -------------------------------------------------------------------------------- connections


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_abandoned_stream_closes_its_connection(fake_llm: FakeLLM, pools: Pools, provider: str) -> None:
    d = deployment(fake_llm, provider)
    stream = await call(pools, d, ask("one two three four five six [fake:stall:5]"), stream=True)
    await stream.__anext__()
    stream.close()
    stream.close()  # idempotent
    assert pools.get(d).stats["open"] == 0  # half-read: closed, never reused
    resp = await call(pools, d, ask("again"))
    assert resp["choices"][0]["message"]["content"] == "echo: again"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_stalling_after_the_first_token(fake_llm: FakeLLM, pools: Pools, provider: str) -> None:
    d = deployment(fake_llm, provider)
    stream = await call(pools, d, ask("one two three four five six [fake:stall:5]"), stream=True, timeout=0.3)
    with pytest.raises(StreamBroken) as info:
        await collect(stream)
    assert info.value.cause.code == "UPSTREAM_TIMEOUT"
    stream = await call(pools, d, ask("one two three four five six [fake:stall:0.1]"), stream=True, timeout=2)
    assert text_of(await collect(stream)) == "echo: one two three four five six"


async def test_concurrent_streams_do_not_mix(fake_llm: FakeLLM, pools: Pools) -> None:
    async def one(i: int) -> str:
        provider = PROVIDERS[i % 3]
        stream = await call(pools, deployment(fake_llm, provider), ask(f"number {i} here"), stream=True)
        return text_of(await collect(stream))

    results = await asyncio.gather(*(one(i) for i in range(30)))
    assert results == [f"echo: number {i} here" for i in range(30)]


async def test_https_deployment(pools: Pools) -> None:
    ca = LocalCA.make(["localhost"])
    with FakeLLM(ssl_context=ca.server_context()) as fake:
        tls_pools = Pools(ssl_context=ca.client_context())
        try:
            for provider in PROVIDERS:
                d = Deployment(provider, MODELS[provider], fake.base_url(provider).replace("127.0.0.1", "localhost"),
                               api_key="k-0123456789")  # fmt: skip
                assert d.tls
                resp = await chat(tls_pools.get(d), d, ask("secure hello"), "fast")
                assert resp["choices"][0]["message"]["content"] == "echo: secure hello"
                stream = await chat(tls_pools.get(d), d, ask("secure stream"), "fast", True)
                assert text_of(await collect(stream)) == "echo: secure stream"
        finally:
            await tls_pools.close()
        # The default context (system CAs) does not trust the test CA.
        d = Deployment("openai", "m", fake.base_url("openai").replace("127.0.0.1", "localhost"))
        with pytest.raises(ProviderError) as info:
            await call(pools, d, ask("hi"))
        assert info.value.code == "UPSTREAM_CONNECT" and "TLS" in info.value.message


def test_on_uvloop(fake_llm: FakeLLM) -> None:
    """The gateway runs on uvloop: the same client paths there (answers, streams, breaks, TLS)."""
    uvloop = pytest.importorskip("uvloop")
    ca = LocalCA.make(["localhost"])

    async def scenario() -> None:
        pools = Pools()
        try:
            for provider in PROVIDERS:
                d = deployment(fake_llm, provider)
                resp = await call(pools, d, ask("hello uv"))
                assert resp["choices"][0]["message"]["content"] == "echo: hello uv"
                assert (
                    text_of(await collect(await call(pools, d, ask("stream uv"), stream=True)))
                    == "echo: stream uv"
                )
                with pytest.raises(ProviderError) as before:
                    await call(pools, d, ask("x [fake:die_before_first_token]"), stream=True)
                assert not isinstance(before.value, StreamBroken)
                with pytest.raises(StreamBroken):
                    await collect(
                        await call(pools, d, ask("one two three four [fake:die_mid_stream]"), stream=True)
                    )
        finally:
            await pools.close()
        with FakeLLM(ssl_context=ca.server_context()) as fake:
            tls_pools = Pools(ssl_context=ca.client_context())
            try:
                d = Deployment(
                    "anthropic",
                    "c",
                    fake.base_url("anthropic").replace("127.0.0.1", "localhost"),
                    api_key="k",
                )
                assert (
                    text_of(await collect(await chat(tls_pools.get(d), d, ask("tls uv"), "fast", True)))
                    == "echo: tls uv"
                )
            finally:
                await tls_pools.close()

    uvloop.run(scenario())
