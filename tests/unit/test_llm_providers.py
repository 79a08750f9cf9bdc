"""Provider translation, both ways, as pure functions: OpenAI requests to each wire format, and
each wire format's responses, streams and errors back to OpenAI's shapes (checked against the
official SDK's types)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from bridgeway.llm.providers import PROVIDERS, Deployment, ProviderError, provider_for, tokens
from bridgeway.llm.providers import anthropic as anthropic_wire
from bridgeway.llm.providers import gemini as gemini_wire
from bridgeway.llm.providers import openai as openai_wire
from bridgeway.llm.providers.base import SSEDecoder, safe_message

OPENAI = Deployment("openai", "gpt-4o-mini", api_key="sk-test-0123456789abcdef")
LOCAL = Deployment("openai", "llama3", "http://127.0.0.1:11434/v1")  # Ollama: no key
ANTHROPIC = Deployment("anthropic", "claude-haiku-4-5", api_key="sk-ant-test-0123456789")
GEMINI = Deployment("gemini", "gemini-2.5-flash", api_key="AIzaTest0123456789abcdef")

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def sent(request: tuple[bytes, Any, bytes]) -> tuple[bytes, dict[bytes, bytes], dict]:
    target, headers, body = request
    return target, dict(headers), orjson.loads(body)


def completion_ok(resp: dict) -> ChatCompletion:
    """The dict is a valid OpenAI chat.completion (as the official SDK reads it)."""
    return ChatCompletion.model_validate(resp)


def chunks_ok(chunks: list[dict]) -> list[ChatCompletionChunk]:
    return [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def finish_of(chunks: list[dict]) -> list[str]:
    return [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]


def tool_calls_of(chunks: list[dict]) -> dict[int, dict]:
    """Tool call deltas assembled the way OpenAI clients do: by index, arguments concatenated."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for ch in c["choices"]:
            for tc in ch["delta"].get("tool_calls") or ():
                call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                call["id"] = tc.get("id") or call["id"]
                fn = tc.get("function") or {}
                call["name"] = fn.get("name") or call["name"]
                call["arguments"] += fn.get("arguments") or ""
    return calls


def feed_split(translator: Any, data: bytes, cuts: list[int]) -> list[dict]:
    out: list[dict] = []
    start = 0
    for cut in [*cuts, len(data)]:
        out += translator.feed(data[start:cut])
        start = cut
    return out + translator.close()


def sse(*events: tuple[str | None, dict], sep: bytes = b"\n") -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + sep
        out += b"data: " + orjson.dumps(data) + sep + sep
    return out


# ----------------------------------------------------------------------------------- deployment


def test_deployment_keeps_the_key_out_of_repr_and_compiles_headers() -> None:
    assert "sk-test" not in repr(OPENAI) and "sk-ant" not in repr(ANTHROPIC) and "AIza" not in repr(GEMINI)
    assert dict(OPENAI.headers)[b"authorization"] == b"Bearer sk-test-0123456789abcdef"
    assert dict(ANTHROPIC.headers)[b"x-api-key"] == b"sk-ant-test-0123456789"
    assert dict(ANTHROPIC.headers)[b"anthropic-version"] == b"2023-06-01"
    assert dict(GEMINI.headers)[b"x-goog-api-key"] == b"AIzaTest0123456789abcdef"
    assert b"authorization" not in dict(LOCAL.headers)
    assert (OPENAI.origin, OPENAI.prefix) == ((True, "api.openai.com", 443), b"/v1")
    assert (LOCAL.origin, LOCAL.prefix) == ((False, "127.0.0.1", 11434), b"/v1")
    assert GEMINI.base_url == "https://generativelanguage.googleapis.com/v1beta"
    extra = Deployment("anthropic", "c", extra_headers=(("anthropic-beta", "x"),))
    assert dict(extra.headers)[b"anthropic-beta"] == b"x"


@pytest.mark.parametrize(
    "kwargs",
    [{"provider": "cohere", "model": "m"}, {"provider": "openai", "model": "m", "base_url": "ftp://x"}],
)
def test_deployment_rejects_unknown_providers_and_urls(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Deployment(**kwargs)


def test_registry() -> None:
    assert set(PROVIDERS) == {"openai", "anthropic", "gemini"}
    assert provider_for(GEMINI) is gemini_wire
    assert tokens({"prompt_tokens": 3, "completion_tokens": 4}) == (3, 4) and tokens(None) == (0, 0)


# ------------------------------------------------------------------------------------------ SSE


def test_sse_decoder_line_endings_comments_and_multiline_data() -> None:
    data = b": comment\r\nevent: a\r\ndata: 1\r\ndata:2\r\n\r\nid: 7\rdata: x\r\rdata: last\n\n"
    want = [(b"a", b"1\n2"), (None, b"x"), (None, b"last")]
    assert SSEDecoder().feed(data) == want
    for cut in range(len(data) + 1):
        dec = SSEDecoder()
        assert dec.feed(data[:cut]) + dec.feed(data[cut:]) + dec.close() == want, cut


def test_sse_decoder_delivers_an_unterminated_last_event_at_close() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\ndata: b") == [(None, b"a")]
    assert dec.close() == [(None, b"b")]


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_sse_decoder_any_split(cuts: list[int]) -> None:
    data = sse(("message_start", {"a": 1}), (None, {"b": "x\ny"}), sep=b"\r\n") * 4
    dec = SSEDecoder()
    events = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        events += dec.feed(data[start:cut])
        start = cut
    assert events + dec.close() == SSEDecoder().feed(data)


# --------------------------------------------------------------------------------------- OpenAI


def test_openai_request_only_swaps_the_model() -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "seed": 7, "new_param": [1]}
    target, headers, out = sent(openai_wire.chat_request(body, OPENAI, False))
    assert target == b"/v1/chat/completions"
    assert out == {**body, "model": "gpt-4o-mini"}
    assert body["model"] == "fast"  # the caller's dict is untouched (a fallback reuses it)
    assert headers[b"content-type"] == b"application/json"
    target, headers, out = sent(openai_wire.chat_request({**body, "stream": False}, LOCAL, False))
    assert target == b"/v1/chat/completions" and b"authorization" not in headers and "stream" not in out


def test_openai_stream_request_always_asks_for_usage() -> None:
    body = {"model": "fast", "messages": [], "stream_options": {"other": 1}}
    _, _, out = sent(openai_wire.chat_request(body, OPENAI, True))
    assert out["stream"] is True and out["stream_options"] == {"other": 1, "include_usage": True}
    assert body["stream_options"] == {"other": 1}
    _, _, out = sent(openai_wire.chat_request({"model": "x", "messages": []}, OPENAI, True))
    assert out["stream_options"] == {"include_usage": True}
    _, _, out = sent(openai_wire.chat_request(body, OPENAI, False))
    assert "stream_options" not in out  # OpenAI refuses stream_options without stream


def openai_completion(**message: Any) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", **message},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )


def test_openai_response_gets_the_public_model() -> None:
    resp = openai_wire.chat_response(200, openai_completion(content="hello"), OPENAI, "fast")
    assert completion_ok(resp).model == "fast"
    assert resp["choices"][0]["message"]["content"] == "hello" and tokens(resp["usage"]) == (5, 2)


def openai_chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": choices,
        "usage": usage,
    }


OPENAI_STREAM = (
    sse(
        (None, openai_chunk({"role": "assistant", "content": ""})),
        (None, openai_chunk({"content": "Hel"})),
        (None, openai_chunk({"content": "lo"})),
        (None, openai_chunk({}, "stop")),
        (None, openai_chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})),
    )
    + b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_stream_hides_the_usage_chunk_unless_asked(include_usage: bool) -> None:
    tr = openai_wire.chat_stream(OPENAI, "fast", include_usage)
    chunks = tr.feed(OPENAI_STREAM) + tr.close()
    chunks_ok(chunks)
    assert text_of(chunks) == "Hello" and finish_of(chunks) == ["stop"]
    assert all(c["model"] == "fast" for c in chunks)
    assert tokens(tr.usage) == (3, 2)  # known either way, for accounting
    assert [c for c in chunks if not c["choices"]] == (
        [{**openai_chunk(None, usage=tr.usage), "model": "fast"}] if include_usage else []
    )


def test_openai_stream_cut_short_is_a_bad_response() -> None:
    tr = openai_wire.chat_stream(OPENAI, "fast")
    tr.feed(OPENAI_STREAM[:200])
    with pytest.raises(ProviderError) as info:
        tr.close()
    assert info.value.code == "BAD_RESPONSE" and info.value.retryable


def test_openai_stream_error_event() -> None:
    tr = openai_wire.chat_stream(OPENAI, "fast")
    event = {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded", "code": None}}
    with pytest.raises(ProviderError) as info:
        tr.feed(sse((None, openai_chunk({"content": "a"})), (None, event)))
    assert info.value.code == "RATE_LIMITED" and info.value.retryable


@pytest.mark.parametrize(
    ("status", "body", "code", "retryable"),
    [
        (429, {"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}}, "RATE_LIMITED", True),
        (500, {"error": {"message": "oops", "type": "server_error", "code": None}}, "UPSTREAM_ERROR", True),
        (503, b"<html>bad gateway</html>", "UPSTREAM_ERROR", True),
        (400, {"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}, "CONTEXT_WINDOW", True),
        # vLLM (no code, only the message), and llama.cpp (its own type)
        (400, {"object": "error", "message": "This model's maximum context length is 4096 tokens.", "code": 400}, "CONTEXT_WINDOW", True),
        (400, {"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error"}}, "CONTEXT_WINDOW", True),
        (400, {"error": {"message": "Invalid value for 'temperature'", "type": "invalid_request_error"}}, "BAD_REQUEST", False),
        (404, {"error": "model 'llama9' not found"}, "UPSTREAM_ERROR", True),  # Ollama's shape
        (401, {"error": {"message": "Incorrect API key provided: sk-test-0123456789abcdef.", "code": "invalid_api_key"}}, "UPSTREAM_AUTH", True),
    ],
)  # fmt: skip
def test_openai_errors(status: int, body: Any, code: str, retryable: bool) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    err = openai_wire.error(status, raw, OPENAI, [(b"Retry-After", b"2")])
    assert (err.code, err.retryable) == (code, retryable)
    assert "sk-test" not in err.message and "<html>" not in err.message
    assert err.retry_after == (2.0 if status in (429, 500, 503) else None)
    with pytest.raises(ProviderError):
        openai_wire.chat_response(status, raw, OPENAI, "fast")


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b'{"id": "x"}'])
def test_openai_garbage_is_a_retryable_bad_response(raw: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        openai_wire.chat_response(200, raw, OPENAI, "fast")
    assert (info.value.code, info.value.status, info.value.retryable) == ("BAD_RESPONSE", 502, True)


def test_openai_embeddings_pass_through() -> None:
    target, _, out = sent(
        openai_wire.embeddings_request({"model": "emb", "input": ["a"], "dimensions": 4}, OPENAI)
    )
    assert target == b"/v1/embeddings" and out == {"model": "gpt-4o-mini", "input": ["a"], "dimensions": 4}
    raw = orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    )
    resp = openai_wire.embeddings_response(200, raw, OPENAI, "emb")
    assert CreateEmbeddingResponse.model_validate(resp).model == "emb"


# ------------------------------------------------------------------------------------ Anthropic


def anthropic_body(**extra: Any) -> dict:
    return {"model": "fast", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_anthropic_request_basics() -> None:
    body = {
        "model": "fast",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": "hi"},
        ],
        "temperature": 1.5,
        "top_p": 0.9,
        "stop": "END",
        "user": "u-1",
        "seed": 3,
        "presence_penalty": 1,
    }
    target, headers, out = sent(anthropic_wire.chat_request(body, ANTHROPIC, False))
    assert target == b"/v1/messages"
    assert (
        headers[b"x-api-key"] == b"sk-ant-test-0123456789" and headers[b"anthropic-version"] == b"2023-06-01"
    )
    assert out == {
        "model": "claude-haiku-4-5",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4096,
        "system": "Be brief.\n\nBe kind.",
        "temperature": 1.0,  # clamped to Anthropic's range
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
    }
    _, _, out = sent(
        anthropic_wire.chat_request(anthropic_body(max_tokens=10, stop=["a", "b"]), ANTHROPIC, True)
    )
    assert (out["max_tokens"], out["stop_sequences"], out["stream"]) == (10, ["a", "b"], True)
    _, _, out = sent(anthropic_wire.chat_request(anthropic_body(max_completion_tokens=20), ANTHROPIC, False))
    assert out["max_tokens"] == 20


@pytest.mark.parametrize(
    ("choice", "parallel", "want"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "weather"}}, None, {"type": "tool", "name": "weather"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
def test_anthropic_tools_and_tool_choice(choice: Any, parallel: Any, want: dict | None) -> None:
    extra: dict[str, Any] = {"tools": [WEATHER]}
    if choice is not None:
        extra["tool_choice"] = choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    _, _, out = sent(anthropic_wire.chat_request(anthropic_body(**extra), ANTHROPIC, False))
    assert out["tools"] == [
        {
            "name": "weather",
            "input_schema": WEATHER["function"]["parameters"],
            "description": "Weather in a city",
        }
    ]
    assert out.get("tool_choice") == want


def test_anthropic_tool_conversation() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "rainy"}]},
        {"role": "user", "content": "Thanks. Which is nicer?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_3", "type": "function", "function": {"name": "weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "toolu_3", "content": "{}"},
    ]  # fmt: skip
    _, _, out = sent(anthropic_wire.chat_request({"model": "m", "messages": messages}, ANTHROPIC, False))
    assert out["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",  # both results, then the user's words: one turn, results first
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "rainy"}],
                },
                {"type": "text", "text": "Thanks. Which is nicer?"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_3", "name": "weather", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "content": "{}"}]},
    ]


def test_anthropic_images() -> None:
    content = [
        {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
    ]
    _, _, out = sent(
        anthropic_wire.chat_request({"messages": [{"role": "user", "content": content}]}, ANTHROPIC, False)
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_anthropic_json_mode_is_a_system_instruction() -> None:
    _, _, out = sent(
        anthropic_wire.chat_request(
            anthropic_body(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                           response_format={"type": "json_object"}),
            ANTHROPIC,
            False,
        )
    )  # fmt: skip
    assert out["system"] == "Be brief.\n\n" + anthropic_wire.JSON_INSTRUCTION
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    _, _, out = sent(anthropic_wire.chat_request(anthropic_body(response_format=fmt), ANTHROPIC, False))
    assert out["system"].startswith(anthropic_wire.JSON_INSTRUCTION)
    assert orjson.dumps(schema).decode() in out["system"]
    _, _, out = sent(
        anthropic_wire.chat_request(anthropic_body(response_format={"type": "text"}), ANTHROPIC, False)
    )
    assert "system" not in out


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (anthropic_body(n=2), "UNSUPPORTED"),
        (anthropic_body(tools=[{"type": "web_search"}]), "UNSUPPORTED"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "UNSUPPORTED"),
        ({"messages": []}, "BAD_REQUEST"),
        ({"messages": ["hi"]}, "BAD_REQUEST"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "BAD_REQUEST"),
        (anthropic_body(tool_choice="sometimes", tools=[WEATHER]), "BAD_REQUEST"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{oops"}}]}]}, "BAD_REQUEST"),
    ],
)  # fmt: skip
def test_anthropic_requests_it_cannot_express(body: dict, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        anthropic_wire.chat_request(body, ANTHROPIC, False)
    assert info.value.code == code and info.value.status == 400
    assert info.value.retryable is (code == "UNSUPPORTED")  # another deployment may support it


def anthropic_message(content: list, stop: str = "end_turn", **usage: int) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5-20251001",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
        }
    )


def test_anthropic_response_text_and_tool_use() -> None:
    raw = anthropic_message(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Checking "},
            {"type": "text", "text": "now."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ],
        "tool_use",
        cache_read_input_tokens=100,
        cache_creation_input_tokens=7,
    )
    resp = anthropic_wire.chat_response(200, raw, ANTHROPIC, "fast")
    parsed = completion_ok(resp)
    assert parsed.model == "fast" and parsed.id == "msg_01"
    message = resp["choices"][0]["message"]
    assert message["content"] == "Checking now."
    assert message["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert resp["choices"][0]["finish_reason"] == "tool_calls"
    assert resp["usage"] == {
        "prompt_tokens": 117,  # cache reads and writes are prompt tokens too
        "completion_tokens": 5,
        "total_tokens": 122,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    tool_use = {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}}
    only_tool = anthropic_wire.chat_response(
        200, anthropic_message([tool_use], "tool_use"), ANTHROPIC, "fast"
    )
    assert only_tool["choices"][0]["message"]["content"] is None  # as OpenAI says it


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"), ("stop_sequence", "stop"),
     ("refusal", "content_filter"), ("something_new", "stop")],
)  # fmt: skip
def test_anthropic_stop_reasons(stop: str, finish: str) -> None:
    resp = anthropic_wire.chat_response(
        200, anthropic_message([{"type": "text", "text": "x"}], stop), ANTHROPIC, "m"
    )
    assert resp["choices"][0]["finish_reason"] == finish


def anthropic_stream(blocks: list[tuple[dict, list[dict]]], stop: str = "end_turn") -> bytes:
    events: list[tuple[str | None, dict]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("ping", {"type": "ping"}),
    ]  # fmt: skip
    for i, (block, deltas) in enumerate(blocks):
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})
        )
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas
        ]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events += [
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                           "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return sse(*events)


TOOL_STREAM = anthropic_stream(
    [
        ({"type": "thinking", "thinking": ""}, [{"type": "thinking_delta", "thinking": "Let me think"}]),
        (
            {"type": "text", "text": ""},
            [{"type": "text_delta", "text": "Hello"}, {"type": "text_delta", "text": " there"}],
        ),
        (
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
            [
                {"type": "input_json_delta", "partial_json": ""},
                {"type": "input_json_delta", "partial_json": '{"city": '},
                {"type": "input_json_delta", "partial_json": '"Paris"}'},
            ],
        ),
        (
            {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
            [{"type": "input_json_delta", "partial_json": "{}"}],
        ),
    ],
    "tool_use",
)


def check_tool_stream(chunks: list[dict]) -> None:
    chunks_ok(chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text_of(chunks) == "Hello there"
    assert tool_calls_of(chunks) == {
        0: {"id": "toolu_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_2", "name": "time", "arguments": "{}"},
    }
    assert finish_of(chunks) == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and tokens(chunks[-1]["usage"]) == (25, 15)
    assert {c["id"] for c in chunks} == {"msg_01"} and {c["model"] for c in chunks} == {"fast"}


def test_anthropic_stream_with_text_and_tool_calls() -> None:
    tr = anthropic_wire.chat_stream(ANTHROPIC, "fast", include_usage=True)
    chunks = tr.feed(TOOL_STREAM) + tr.close()
    check_tool_stream(chunks)
    assert tokens(tr.usage) == (25, 15) and tr.done


def test_anthropic_stream_split_at_every_byte_boundary() -> None:
    for cut in range(len(TOOL_STREAM) + 1):
        tr = anthropic_wire.chat_stream(ANTHROPIC, "fast", include_usage=True)
        check_tool_stream(feed_split(tr, TOOL_STREAM, [cut]))


def test_anthropic_stream_byte_by_byte() -> None:
    tr = anthropic_wire.chat_stream(ANTHROPIC, "fast", include_usage=True)
    check_tool_stream(feed_split(tr, TOOL_STREAM, list(range(1, len(TOOL_STREAM)))))


def test_anthropic_stream_without_usage_chunk_and_usage_known_early() -> None:
    tr = anthropic_wire.chat_stream(ANTHROPIC, "fast")
    head, tail = TOOL_STREAM.split(b"event: message_stop")
    chunks = tr.feed(head)
    assert tokens(tr.usage) == (25, 15)  # from message_delta, before the end
    with pytest.raises(ProviderError) as info:  # the body ended before message_stop
        tr.close()
    assert info.value.code == "BAD_RESPONSE"
    chunks += anthropic_wire.chat_stream(ANTHROPIC, "fast").feed(TOOL_STREAM)[-1:]
    assert all(c["choices"] for c in chunks)


@pytest.mark.parametrize(
    ("kind", "code", "retryable"),
    [("overloaded_error", "UPSTREAM_ERROR", True), ("rate_limit_error", "RATE_LIMITED", True),
     ("api_error", "UPSTREAM_ERROR", True), ("invalid_request_error", "BAD_REQUEST", False)],
)  # fmt: skip
def test_anthropic_stream_error_event(kind: str, code: str, retryable: bool) -> None:
    tr = anthropic_wire.chat_stream(ANTHROPIC, "fast")
    assert tr.feed(TOOL_STREAM[: TOOL_STREAM.index(b"\n\n", 300) + 2])
    with pytest.raises(ProviderError) as info:
        tr.feed(sse(("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})))
    assert (info.value.code, info.value.retryable) == (code, retryable)


@pytest.mark.parametrize(
    "event",
    [b"data: {oops\n\n", b'data: {"type": "content_block_delta", "delta": "x"}\n\n', b"data: [1]\n\n"],
)
def test_anthropic_stream_garbage(event: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        anthropic_wire.chat_stream(ANTHROPIC, "fast").feed(event)
    assert info.value.code == "BAD_RESPONSE" and info.value.retryable


@pytest.mark.parametrize(
    ("status", "kind", "message", "code", "retryable"),
    [
        (429, "rate_limit_error", "Number of requests has exceeded your rate limit", "RATE_LIMITED", True),
        (529, "overloaded_error", "Overloaded", "UPSTREAM_ERROR", True),
        (500, "api_error", "Internal server error", "UPSTREAM_ERROR", True),
        (400, "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum", "CONTEXT_WINDOW", True),
        (400, "invalid_request_error", "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000", "CONTEXT_WINDOW", True),
        (400, "invalid_request_error", "max_tokens: Field required", "BAD_REQUEST", False),
        (413, "request_too_large", "Request exceeds the maximum allowed number of bytes.", "BAD_REQUEST", False),
        (401, "authentication_error", "invalid x-api-key", "UPSTREAM_AUTH", True),
        (403, "permission_error", "Your API key does not have permission", "UPSTREAM_AUTH", True),
    ],
)  # fmt: skip
def test_anthropic_errors(status: int, kind: str, message: str, code: str, retryable: bool) -> None:
    raw = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    err = anthropic_wire.error(status, raw, ANTHROPIC, [(b"retry-after", b"30")])
    assert (err.code, err.retryable) == (code, retryable)
    assert err.message == f"anthropic: {message}"
    assert err.status == {"RATE_LIMITED": 429, "CONTEXT_WINDOW": 400, "BAD_REQUEST": status}.get(code, 502)
    if code == "RATE_LIMITED":
        assert err.retry_after == 30.0


def test_anthropic_has_no_embeddings() -> None:
    assert anthropic_wire.SUPPORTS_EMBEDDINGS is False
    with pytest.raises(ProviderError) as info:
        anthropic_wire.embeddings_request({"input": "x"}, ANTHROPIC)
    assert info.value.code == "UNSUPPORTED" and "embeddings" in info.value.message


# --------------------------------------------------------------------------------------- Gemini


def test_gemini_request() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False}
    body = {
        "model": "fast",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png?x=1"}},
            ]},
        ],
        "temperature": 0.2, "top_p": 0.5, "max_tokens": 100, "stop": ["END"], "n": 2,
        "presence_penalty": 0.1, "frequency_penalty": 0.3, "seed": 9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }  # fmt: skip
    target, headers, out = sent(gemini_wire.chat_request(body, GEMINI, False))
    assert target == b"/v1beta/models/gemini-2.5-flash:generateContent"
    assert headers[b"x-goog-api-key"] == b"AIzaTest0123456789abcdef"
    assert out == {
        "contents": [
            {"role": "user", "parts": [{"text": "hi"}]},
            {"role": "model", "parts": [{"text": "hello"}]},
            {
                "role": "user",
                "parts": [
                    {"text": "look"},
                    {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                    {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/a.png?x=1"}},
                ],
            },
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.5,
            "maxOutputTokens": 100,
            "stopSequences": ["END"],
            "candidateCount": 2,
            "presencePenalty": 0.1,
            "frequencyPenalty": 0.3,
            "seed": 9,
            "responseMimeType": "application/json",
            "responseJsonSchema": schema,  # plain JSON Schema: additionalProperties survives
        },
    }
    target, _, out = sent(gemini_wire.chat_request({"messages": [{"role": "user", "content": "x"}],
                                                    "response_format": {"type": "json_object"}}, GEMINI, True))  # fmt: skip
    assert target == b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert out["generationConfig"] == {"responseMimeType": "application/json"}
    prefixed = Deployment("gemini", "models/gemini-2.5-pro", "http://127.0.0.1:9/v1beta")
    assert gemini_wire.chat_request({"messages": [{"role": "user", "content": "x"}]}, prefixed, False)[0] == (
        b"/v1beta/models/gemini-2.5-pro:generateContent"
    )


@pytest.mark.parametrize(
    ("choice", "want"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["weather"]},
        ),
    ],
)
def test_gemini_tools_and_tool_choice(choice: Any, want: dict) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "tool_choice": choice}
    _, _, out = sent(gemini_wire.chat_request(body, GEMINI, False))
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "weather",
                    "description": "Weather in a city",
                    "parametersJsonSchema": WEATHER["function"]["parameters"],
                }
            ]
        }
    ]
    assert out["toolConfig"] == {"functionCallingConfig": want}


def test_gemini_tool_conversation_names_results_and_returns_signatures() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
             "extra_content": {"google": {"thought_signature": "c2lnbmF0dXJl"}}},
            {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
    ]  # fmt: skip
    _, _, out = sent(gemini_wire.chat_request({"messages": messages}, GEMINI, False))
    assert out["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "c2lnbmF0dXJl",
                },
                {"functionCall": {"name": "time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "time", "response": {"output": "noon"}}},
            ],
        },
    ]
    with pytest.raises(ProviderError) as info:
        gemini_wire.chat_request(
            {"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, GEMINI, False
        )
    assert info.value.code == "BAD_REQUEST" and "nope" in info.value.message


def gemini_response(candidates: list[dict], **extra: Any) -> dict:
    return {
        "candidates": candidates,
        "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 4, "totalTokenCount": 12},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "resp-1",
        **extra,
    }


def test_gemini_response_text_tool_calls_and_usage() -> None:
    data = gemini_response(
        [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "thinking...", "thought": True},
                        {"text": "Sure. "},
                        {
                            "functionCall": {"name": "weather", "args": {"city": "Paris"}},
                            "thoughtSignature": "sig",
                        },
                        {"functionCall": {"id": "fc-2", "name": "time", "args": {}}},
                    ],
                },
                "finishReason": "STOP",
            },
            {
                "content": {"role": "model", "parts": [{"text": "Other"}]},
                "finishReason": "MAX_TOKENS",
                "index": 1,
            },
        ]
    )
    data["usageMetadata"].update(thoughtsTokenCount=6, cachedContentTokenCount=2)
    resp = gemini_wire.chat_response(200, orjson.dumps(data), GEMINI, "fast")
    completion_ok(resp)
    assert resp["id"] == "resp-1" and resp["model"] == "fast"
    first, second = resp["choices"]
    assert first["message"]["content"] == "Sure. " and first["finish_reason"] == "tool_calls"
    calls = first["message"]["tool_calls"]
    assert calls[0]["id"].startswith("call_") and calls[1]["id"] == "fc-2"
    assert calls[0]["function"] == {"name": "weather", "arguments": '{"city":"Paris"}'}
    assert calls[0]["extra_content"] == {"google": {"thought_signature": "sig"}}
    assert (second["index"], second["message"]["content"], second["finish_reason"]) == (1, "Other", "length")
    assert resp["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 10,  # thinking tokens are billed as output
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 6},
    }


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
     ("PROHIBITED_CONTENT", "content_filter"), ("OTHER", "stop")],
)  # fmt: skip
def test_gemini_finish_reasons(reason: str, finish: str) -> None:
    data = gemini_response([{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": reason}])
    assert (
        gemini_wire.chat_response(200, orjson.dumps(data), GEMINI, "m")["choices"][0]["finish_reason"]
        == finish
    )


def test_gemini_blocked_prompt_and_empty_answers() -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    resp = gemini_wire.chat_response(200, orjson.dumps(blocked), GEMINI, "m")
    completion_ok(resp)
    assert resp["choices"][0]["finish_reason"] == "content_filter" and tokens(resp["usage"]) == (3, 0)
    with pytest.raises(ProviderError) as info:
        gemini_wire.chat_response(200, b'{"candidates": []}', GEMINI, "m")
    assert info.value.code == "BAD_RESPONSE"


def gemini_event(
    parts: list[dict], finish: str | None = None, out_tokens: int = 1, index: int | None = None
) -> dict:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
    if finish:
        cand["finishReason"] = finish
    if index is not None:
        cand["index"] = index
    usage = {"promptTokenCount": 8, "candidatesTokenCount": out_tokens, "totalTokenCount": 8 + out_tokens}
    return {"candidates": [cand], "usageMetadata": usage, "responseId": "r-1"}


GEMINI_STREAM = sse(
    (None, gemini_event([{"text": "Hel"}])),
    (None, gemini_event([{"text": "lo "}, {"text": "there"}], out_tokens=2)),
    (None, gemini_event([{"functionCall": {"name": "weather", "args": {"city": "Paris"}}}], "STOP", 7)),
    sep=b"\r\n",
)


def check_gemini_stream(chunks: list[dict]) -> None:
    chunks_ok(chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text_of(chunks) == "Hello there"
    calls = tool_calls_of(chunks)
    assert calls[0]["name"] == "weather" and calls[0]["arguments"] == '{"city":"Paris"}'
    assert calls[0]["id"].startswith("call_")
    assert finish_of(chunks) == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and tokens(chunks[-1]["usage"]) == (8, 7)
    assert {c["id"] for c in chunks} == {"r-1"}


def test_gemini_stream_split_at_every_byte_boundary() -> None:
    for cut in range(len(GEMINI_STREAM) + 1):
        tr = gemini_wire.chat_stream(GEMINI, "fast", include_usage=True)
        check_gemini_stream(feed_split(tr, GEMINI_STREAM, [cut]))


def test_gemini_stream_needs_a_finish_reason() -> None:
    tr = gemini_wire.chat_stream(GEMINI, "fast")
    tr.feed(sse((None, gemini_event([{"text": "Hel"}]))))
    with pytest.raises(ProviderError) as info:
        tr.close()
    assert info.value.code == "BAD_RESPONSE"


def test_gemini_stream_with_two_candidates() -> None:
    data = sse(
        (None, gemini_event([{"text": "a"}], index=0)),
        (None, gemini_event([{"text": "b"}], index=1)),
        (None, gemini_event([{"text": "c"}], "STOP", index=0)),
        (None, gemini_event([{"text": "d"}], "MAX_TOKENS", index=1)),
    )
    tr = gemini_wire.chat_stream(GEMINI, "fast")
    chunks = tr.feed(data) + tr.close()
    chunks_ok(chunks)
    by_index: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            by_index[ch["index"]] = by_index.get(ch["index"], "") + (ch["delta"].get("content") or "")
    assert by_index == {0: "ac", 1: "bd"} and finish_of(chunks) == ["stop", "length"]


def test_gemini_stream_error_event() -> None:
    tr = gemini_wire.chat_stream(GEMINI, "fast")
    err = {"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}
    with pytest.raises(ProviderError) as info:
        tr.feed(sse((None, gemini_event([{"text": "a"}])), (None, err)))
    assert info.value.code == "RATE_LIMITED"


@pytest.mark.parametrize(
    ("status", "error", "code", "retryable"),
    [
        (429, {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
               "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]},
         "RATE_LIMITED", True),
        (503, {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}, "UPSTREAM_ERROR", True),
        (400, {"code": 400, "message": "The input token count (1200000) exceeds the maximum number of tokens allowed "
               "(1048576).", "status": "INVALID_ARGUMENT"}, "CONTEXT_WINDOW", True),
        (400, {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
               "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]},
         "UPSTREAM_AUTH", True),
        (400, {"code": 400, "message": "Invalid value at 'contents'", "status": "INVALID_ARGUMENT"}, "BAD_REQUEST", False),
        (404, {"code": 404, "message": "models/gemini-9 is not found", "status": "NOT_FOUND"}, "UPSTREAM_ERROR", True),
    ],
)  # fmt: skip
def test_gemini_errors(status: int, error: dict, code: str, retryable: bool) -> None:
    err = gemini_wire.error(status, orjson.dumps({"error": error}), GEMINI)
    assert (err.code, err.retryable) == (code, retryable)
    assert err.message == "gemini: " + error["message"]
    if status == 429:
        assert err.retry_after == 37.0
    # The same error wrapped in a list, as Gemini streams without alt=sse send it.
    assert gemini_wire.error(status, orjson.dumps([{"error": error}]), GEMINI).code == code


@pytest.mark.parametrize("encoding", [None, "float", "base64"])
def test_gemini_embeddings(encoding: str | None) -> None:
    target, _, out = sent(gemini_wire.embeddings_request({"input": ["a", "b"], "dimensions": 2}, GEMINI))
    assert target == b"/v1beta/models/gemini-2.5-flash:batchEmbedContents"
    assert out == {
        "requests": [
            {
                "model": "models/gemini-2.5-flash",
                "content": {"parts": [{"text": t}]},
                "outputDimensionality": 2,
            }
            for t in ("a", "b")
        ]
    }
    raw = orjson.dumps({"embeddings": [{"values": [0.5, -0.25]}, {"values": [1.0, 0.0]}]})
    resp = gemini_wire.embeddings_response(200, raw, GEMINI, "emb", encoding)
    vectors = [item["embedding"] for item in resp["data"]]
    if encoding == "base64":  # the SDK decodes these itself, before its types see them
        vectors = [list(struct.unpack("<2f", base64.b64decode(v))) for v in vectors]
    else:
        assert CreateEmbeddingResponse.model_validate(resp).model == "emb"
    assert vectors == [[0.5, -0.25], [1.0, 0.0]]
    with pytest.raises(ProviderError) as info:
        gemini_wire.embeddings_request({"input": [[1, 2, 3]]}, GEMINI)
    assert info.value.code == "UNSUPPORTED"


# ------------------------------------------------------------------------------------- safety


def test_messages_never_carry_credentials() -> None:
    d = Deployment("openai", "m", api_key="my-very-secret-key-123")
    text = (
        "bad key my-very-secret-key-123, also sk-proj-abc***xyz and AIzaSyA1234567890abcdefgh, Bearer tok.en"
    )
    cleaned = safe_message(text, d)
    for secret in ("my-very-secret", "sk-proj", "AIzaSy", "tok.en"):
        assert secret not in cleaned
    assert len(safe_message("x" * 5000, d)) == 500


def test_requests_are_small_and_do_not_mutate_the_input() -> None:
    body = {
        "model": "fast",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "ok"},
        ],
        "tools": [WEATHER],
    }  # fmt: skip
    before = orjson.dumps(body)
    for d in (OPENAI, ANTHROPIC, GEMINI):
        provider_for(d).chat_request(body, d, True)
        provider_for(d).chat_request(body, d, False)
    assert orjson.dumps(body) == before
