"""Fake LLM providers on loopback: the OpenAI, Anthropic and Gemini wire formats, deterministic,
and able to misbehave on demand.

One aiohttp server answers all three APIs (their paths do not overlap), in a thread with its own
event loop, on 127.0.0.1 and a port the OS picks (over TLS when given an SSL context):

    OpenAI     POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models
    Anthropic  POST /v1/messages
    Gemini     POST /v1beta/models/{model}:generateContent | :streamGenerateContent?alt=sse
                                          | :batchEmbedContents

Answers follow from the request: the reply echoes the last user message ("echo: <text>"), or
says what the last tool result was ("tool said: <result>"); token counts are words. When tools
are offered and the prompt names one (or tool_choice forces one), the model calls it, with
arguments made from its JSON schema (strings get the prompt text, numbers its word count,
booleans true). JSON mode (OpenAI's response_format, Gemini's responseMimeType, for Anthropic,
which has neither, a system prompt that mentions JSON) replies {"echo": "<text>"}. max_tokens
truncates the reply (finish "length"). Request shapes the real API refuses (a system role in
Anthropic messages, unpaired tool results, a missing max_tokens...) get that API's 400 in its
own error format. The key BAD_KEY is refused the way each provider refuses a bad key (OpenAI's
message echoes it, as the real one echoes part of it).

Misbehaviour, chosen per request by the header ``x-fake-mode: MODE`` or ``[fake:MODE]`` in the
prompt, or for the next `count` requests by ``POST /_control {"mode": MODE, "count": n}``
(``fake.control(MODE, n)`` from Python; count -1 means until cleared with mode null):

    slow:<seconds>          wait before answering
    status:<code>           the provider's real error body for that status (429 has retry-after)
    context_window          the provider's real 400 for an over-long prompt
    malformed               200 with garbage (not JSON; in a stream, a garbage event)
    die_before_first_token  send the head (and a stream's preamble: role chunk, message_start)
                            then close the socket
    die_mid_stream          send some content then close the socket (non-stream: half a body)
    stall:<seconds>         a stream sends some content, then waits, then goes on
    error_event             a stream sends some content, then the provider's in-stream error

Every request is recorded (method, path, query, lower-cased headers, parsed JSON body) in
``fake.requests`` and at ``GET /_requests``; ``DELETE /_requests`` clears them.

Pytest fixture (registered through ``pytest_plugins`` in tests/conftest.py)
    fake_llm    function scope: a started ``FakeLLM``, stopped at teardown
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

__all__ = ["BAD_KEY", "FakeLLM", "fake_llm"]

HOST = "127.0.0.1"
BAD_KEY = "bad-key-0123456789"
_PROMPT_MODE = re.compile(r"\[fake:([^\]]+)\]")


class FakeLLM:
    """The fake provider server. `start()` returns once it is listening; `stop()` ends it."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self._mode: str | None = None
        self._count = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{HOST}:{self.port}"

    def base_url(self, provider: str) -> str:
        """The base URL a deployment of `provider` uses to reach this fake."""
        return self.url + ("/v1beta" if provider == "gemini" else "/v1")

    def start(self) -> FakeLLM:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name="fake-llm")
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError("fake LLM server did not start")
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_quiet_disconnects])
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/v1beta/models/{call}", self._gemini)
        app.router.add_post("/_control", self._control)
        app.router.add_get("/_requests", self._list_requests)
        app.router.add_delete("/_requests", self._clear_requests)
        # Stopping does not wait for handlers still sleeping in slow or stalled modes.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, HOST, 0, ssl_context=self.ssl_context)
        loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            # Handlers left sleeping (slow, stalled) are cancelled, not abandoned.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    # -- control -------------------------------------------------------------------------------

    def control(self, mode: str | None, count: int = 1) -> None:
        """Misbehave with `mode` for the next `count` requests (-1: until cleared)."""
        with self._lock:
            self._mode = mode
            self._count = count if mode else 0

    def reset(self) -> None:
        self.control(None)
        self.requests.clear()

    @property
    def last(self) -> dict[str, Any]:
        """The last recorded request."""
        return self.requests[-1]

    def _take_mode(self, request: web.Request, prompt: str) -> str:
        header = request.headers.get("x-fake-mode")
        if header:
            return header
        found = _PROMPT_MODE.search(prompt)
        if found:
            return found.group(1)
        with self._lock:
            if self._mode and self._count:
                if self._count > 0:
                    self._count -= 1
                return self._mode
        return ""

    async def _control(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.control(data.get("mode"), int(data.get("count", 1)))
        return web.json_response({"mode": self._mode, "count": self._count})

    async def _list_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def _clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.Response(status=204)

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "json": body,
            }
        )
        return body

    # -- OpenAI --------------------------------------------------------------------------------

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if _bearer(request) == BAD_KEY:
            return _openai_error(
                401,
                f"Incorrect API key provided: {BAD_KEY}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
        if not isinstance(body, dict) or not body.get("model") or not body.get("messages"):
            return _openai_error(400, "'model' and 'messages' are required", "invalid_request_error")
        if body.get("stream_options") and not body.get("stream"):
            return _openai_error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "invalid_request_error",
            )
        prompt, tool_result = _openai_prompt(body["messages"])
        mode = self._take_mode(request, prompt)
        early = await self._misbehave(request, mode, "openai", bool(body.get("stream")))
        if early is not None:
            return early
        tools = [
            (t["function"]["name"], t["function"].get("parameters") or {}) for t in body.get("tools") or ()
        ]
        forced = _openai_forced(body.get("tool_choice"))
        json_mode = (body.get("response_format") or {}).get("type") in ("json_object", "json_schema")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        turn = _Turn(prompt, tool_result, tools, forced, json_mode, limit, _words(body["messages"]))
        model = body["model"]
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": turn.text,
                "refusal": None,
                "annotations": [],
            }
            if turn.call:
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": turn.call_id,
                        "type": "function",
                        "function": {"name": turn.call[0], "arguments": turn.args},
                    }
                ]
            return web.json_response(
                {
                    "id": "chatcmpl-fake" + turn.call_id[5:],
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": turn.finish}
                    ],
                    "usage": turn.openai_usage(),
                    "system_fingerprint": "fp_fake",
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cid = "chatcmpl-fake" + turn.call_id[5:]

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                data["usage"] = None
            return b"data: " + orjson.dumps(data) + b"\n\n"

        preamble = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if turn.call:
            name, args = turn.call[0], turn.args
            content = [
                chunk({"tool_calls": [{"index": 0, "id": turn.call_id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]}),
                *(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}) for part in _halves(args)),
            ]  # fmt: skip
        else:
            content = [chunk({"content": piece}) for piece in turn.pieces()]
        end = [chunk({}, turn.finish)]
        if include_usage:
            usage = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                     "system_fingerprint": "fp_fake", "choices": [], "usage": turn.openai_usage()}  # fmt: skip
            end.append(b"data: " + orjson.dumps(usage) + b"\n\n")
        end.append(b"data: [DONE]\n\n")
        error = b'data: {"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}\n\n'  # noqa: E501
        return await _sse(request, mode, preamble, content, end, error, b"data: {not json\n\n")

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if _bearer(request) == BAD_KEY:
            return _openai_error(
                401, f"Incorrect API key provided: {BAD_KEY}.", "invalid_request_error", "invalid_api_key"
            )
        if not isinstance(body, dict) or not body.get("model") or "input" not in body:
            return _openai_error(400, "'model' and 'input' are required", "invalid_request_error")
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        mode = self._take_mode(request, " ".join(map(str, inputs)))
        early = await self._misbehave(request, mode, "openai")
        if early is not None:
            return early
        dims = body.get("dimensions") or 8
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vector = _vector(str(text), dims)
            embedding: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if b64 else vector
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(_words(text) for text in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _openai_models(self, request: web.Request) -> web.Response:
        await self._record(request)
        model = {"id": "fake-gpt", "object": "model", "created": 0, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    # -- Anthropic -----------------------------------------------------------------------------

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if request.headers.get("x-api-key") == BAD_KEY or not request.headers.get("x-api-key"):
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
        problem = _anthropic_problem(body)
        if problem:
            return _anthropic_error(400, "invalid_request_error", problem)
        prompt, tool_result = _anthropic_prompt(body["messages"])
        mode = self._take_mode(request, prompt)
        early = await self._misbehave(request, mode, "anthropic", bool(body.get("stream")))
        if early is not None:
            return early
        tools = [(t["name"], t.get("input_schema") or {}) for t in body.get("tools") or ()]
        forced = _anthropic_forced(body.get("tool_choice"))
        json_mode = "JSON" in (body.get("system") or "")
        words = _words(body["messages"]) + _words(body.get("system") or "")
        turn = _Turn(prompt, tool_result, tools, forced, json_mode, body["max_tokens"], words)
        finish = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}[turn.finish]
        mid = "msg_fake" + turn.call_id[5:]
        if not body.get("stream"):
            if turn.call:
                content = [
                    {"type": "tool_use", "id": turn.tool_id, "name": turn.call[0], "input": turn.call[1]}
                ]
            else:
                content = [{"type": "text", "text": turn.text}]
            return web.json_response(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": content,
                    "stop_reason": finish,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": turn.prompt_tokens,
                        "output_tokens": turn.completion_tokens,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                }
            )

        def event(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        start_message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": turn.prompt_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }  # fmt: skip
        preamble = [
            event("message_start", {"type": "message_start", "message": start_message}),
            event("ping", {"type": "ping"}),
        ]
        if turn.call:
            block = {"type": "tool_use", "id": turn.tool_id, "name": turn.call[0], "input": {}}
            deltas = [
                {"type": "input_json_delta", "partial_json": part} for part in ("", *_halves(turn.args))
            ]
        else:
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in turn.pieces()]
        content = [
            event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
            *(
                event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
                for d in deltas
            ),
        ]
        end = [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": finish, "stop_sequence": None},
                    "usage": {"output_tokens": turn.completion_tokens},
                },
            ),
            event("message_stop", {"type": "message_stop"}),
        ]
        error = event(
            "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
        return await _sse(request, mode, preamble, content, end, error, b"event: ping\ndata: {garbage\n\n")

    # -- Gemini --------------------------------------------------------------------------------

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model, _, method = request.match_info["call"].partition(":")
        key = request.headers.get("x-goog-api-key")
        if not key or key == BAD_KEY:
            return _gemini_error(
                400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT", "API_KEY_INVALID"
            )
        if method == "batchEmbedContents":
            return await self._gemini_embed(request, model, body)
        if method not in ("generateContent", "streamGenerateContent"):
            return _gemini_error(404, f"Method {method} not found.", "NOT_FOUND")
        stream = method == "streamGenerateContent"
        if stream and request.query.get("alt") != "sse":
            return _gemini_error(400, "this fake only streams with alt=sse", "INVALID_ARGUMENT")
        problem = _gemini_problem(body)
        if problem:
            return _gemini_error(400, problem, "INVALID_ARGUMENT")
        prompt, tool_result = _gemini_prompt(body["contents"])
        mode = self._take_mode(request, prompt)
        early = await self._misbehave(request, mode, "gemini", stream)
        if early is not None:
            return early
        declarations = [f for t in body.get("tools") or () for f in t.get("functionDeclarations") or ()]
        tools = [
            (f["name"], f.get("parametersJsonSchema") or f.get("parameters") or {}) for f in declarations
        ]
        forced = _gemini_forced(body.get("toolConfig"))
        config = body.get("generationConfig") or {}
        json_mode = config.get("responseMimeType") == "application/json"
        words = _words(body["contents"]) + _words(body.get("systemInstruction") or "")
        turn = _Turn(prompt, tool_result, tools, forced, json_mode, config.get("maxOutputTokens"), words)
        finish = "MAX_TOKENS" if turn.finish == "length" else "STOP"
        n = config.get("candidateCount") or 1
        rid = "fake" + turn.call_id[5:]

        def usage() -> dict:
            return {
                "promptTokenCount": turn.prompt_tokens,
                "candidatesTokenCount": turn.completion_tokens * n,
                "totalTokenCount": turn.prompt_tokens + turn.completion_tokens * n,
            }

        def response(parts: list[dict], finish_reason: str | None) -> dict:
            candidates = []
            for i in range(n):
                cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": i}
                if finish_reason:
                    cand["finishReason"] = finish_reason
                candidates.append(cand)
            return {
                "candidates": candidates,
                "usageMetadata": usage(),
                "modelVersion": model,
                "responseId": rid,
            }

        call_parts = [{"functionCall": {"name": turn.call[0], "args": turn.call[1]}}] if turn.call else []
        if not stream:
            parts = call_parts if turn.call else [{"text": turn.text}]
            return web.json_response(response(parts, finish))

        def event(data: dict) -> bytes:
            return b"data: " + orjson.dumps(data) + b"\r\n\r\n"

        # Real streams put finishReason (and the final usage) on the last content event.
        if turn.call:
            events = [event(response(call_parts, finish))]
        else:
            pieces = turn.pieces()
            events = [event(response([{"text": p}], None)) for p in pieces[:-1]]
            events.append(event(response([{"text": pieces[-1]}], finish)))
        content, end = events[:-1], events[-1:]
        error = event(
            {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded. Please try again later.",
                    "status": "UNAVAILABLE",
                }
            }
        )
        return await _sse(request, mode, [], content, end, error, b"data: {garbage\r\n\r\n")

    async def _gemini_embed(self, request: web.Request, model: str, body: Any) -> web.StreamResponse:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not requests:
            return _gemini_error(400, "requests must not be empty", "INVALID_ARGUMENT")
        texts = []
        for item in requests:
            if item.get("model") != f"models/{model}":
                return _gemini_error(
                    400, f"Model {item.get('model')} does not match the URL model", "INVALID_ARGUMENT"
                )
            texts.append(" ".join(p.get("text", "") for p in item["content"]["parts"]))
        mode = self._take_mode(request, " ".join(texts))
        early = await self._misbehave(request, mode, "gemini")
        if early is not None:
            return early
        dims = requests[0].get("outputDimensionality") or 8
        return web.json_response({"embeddings": [{"values": _vector(text, dims)} for text in texts]})

    # -- misbehaviour --------------------------------------------------------------------------

    async def _misbehave(
        self, request: web.Request, mode: str, provider: str, stream: bool = False
    ) -> web.StreamResponse | None:
        """The answer for modes that replace the normal one; None to go on (maybe after a wait)."""
        if not mode:
            return None
        kind, _, arg = mode.partition(":")
        if kind == "slow":
            await asyncio.sleep(float(arg))
            return None
        if kind == "stall" and not stream:
            return None
        if kind == "status":
            return _status_error(provider, int(arg))
        if kind == "context_window":
            return _CONTEXT_ERRORS[provider]()
        if kind == "malformed" and not stream:
            return web.Response(status=200, body=b"<html>this is not json{", content_type="application/json")
        if kind in ("die_before_first_token", "die_mid_stream") and not stream:
            resp = web.StreamResponse(
                status=200, headers={"Content-Type": "application/json", "Content-Length": "100"}
            )
            await resp.prepare(request)
            if kind == "die_mid_stream":
                await resp.write(b'{"id": "half a bo')
            return await _die(request, resp)
        return None  # stream modes are played by _sse


@web.middleware
async def _quiet_disconnects(request: web.Request, handler: Any) -> web.StreamResponse:
    """A client that gave up (timeouts are tested on purpose) is not an error of the fake."""
    try:
        return await handler(request)
    except ConnectionResetError:
        return web.Response(status=499)


async def _sse(
    request: web.Request,
    mode: str,
    preamble: list[bytes],
    content: list[bytes],
    end: list[bytes],
    error: bytes,
    garbage: bytes,
) -> web.StreamResponse:
    """Play a stream, or the stream `mode` asks for."""
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for event in preamble:
        await resp.write(event)
    if mode == "die_before_first_token":
        return await _die(request, resp)
    if mode == "malformed":
        await resp.write(garbage)
        await resp.write_eof()
        return resp
    cut = mode in ("die_mid_stream", "error_event") or mode.startswith("stall:")
    head = content[:2] if cut else content
    for event in head:
        await resp.write(event)
        await asyncio.sleep(0)  # separate writes, so clients see the stream arrive in pieces
    if mode.startswith("stall:"):
        await asyncio.sleep(float(mode[6:]))
        for event in content[2:]:
            await resp.write(event)
    if mode == "die_mid_stream":
        return await _die(request, resp)
    if mode == "error_event":
        await asyncio.sleep(0.05)  # the content arrives first, in its own read
        await resp.write(error)
        await resp.write_eof()
        return resp
    for event in end:
        await resp.write(event)
    await resp.write_eof()
    return resp


async def _die(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Close the socket abruptly, after what was written reached the kernel."""
    await asyncio.sleep(0.05)
    transport = request.transport
    if transport is not None:
        transport.abort()
    return resp


# ------------------------------------------------------------------------------ the model's turn


class _Turn:
    """What the fake model says: a text (maybe truncated) or one tool call."""

    def __init__(
        self,
        prompt: str,
        tool_result: str | None,
        tools: list[tuple[str, dict]],
        forced: str | None,
        json_mode: bool,
        limit: int | None,
        prompt_tokens: int,
    ) -> None:
        self.prompt_tokens = max(1, prompt_tokens)
        self.call_id = (
            "call_" + hashlib.sha256(f"{prompt}|{tool_result}|{time.time_ns()}".encode()).hexdigest()[:24]
        )
        self.tool_id = "toolu_" + self.call_id[5:]
        self.call: tuple[str, dict] | None = None
        self.args = ""
        self.finish = "stop"
        chosen = None
        if tools and tool_result is None:
            names = [name for name, _ in tools]
            if forced and forced != "*":
                chosen = forced
            else:
                chosen = next((name for name in names if name in prompt), names[0] if forced == "*" else None)
        if chosen is not None:
            schema = dict(tools)[chosen]
            self.call = (chosen, _arguments(schema, prompt))
            self.args = orjson.dumps(self.call[1]).decode()
            self.text = ""
            self.finish = "tool_calls"
            self.completion_tokens = 5
            return
        clean = _PROMPT_MODE.sub("", prompt).strip()
        if tool_result is not None:
            text = f"tool said: {tool_result}"
        elif json_mode:
            text = orjson.dumps({"echo": clean}).decode()
        else:
            text = f"echo: {clean}"
        words = text.split(" ")
        if limit is not None and len(words) > limit:
            words = words[:limit]
            self.finish = "length"
        self.text = " ".join(words)
        self.completion_tokens = max(1, len(words))

    def pieces(self) -> list[str]:
        """The text in stream deltas: one word each (with its leading space)."""
        words = self.text.split(" ")
        return [words[0]] + [" " + w for w in words[1:]]

    def openai_usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _arguments(schema: dict, prompt: str) -> dict:
    clean = _PROMPT_MODE.sub("", prompt).strip()
    args: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type") if isinstance(prop, dict) else None
        if kind in ("integer", "number"):
            args[name] = len(clean.split())
        elif kind == "boolean":
            args[name] = True
        else:
            args[name] = clean
    return args


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [text[:middle], text[middle:]]


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return sum(
            _words(v)
            for k, v in value.items()
            if k not in ("type", "role", "id", "tool_call_id", "tool_use_id")
        )
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    return 0


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic vector from the text; multiples of 1/128, exact in float32 (base64)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i % 32] - 128) / 128 for i in range(dims)]


def _bearer(request: web.Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")


# ----------------------------------------------------------------------------- reading requests


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _openai_prompt(messages: list[dict]) -> tuple[str, str | None]:
    last = messages[-1]
    if last.get("role") == "tool":
        return "", _text_of(last.get("content"))
    for m in reversed(messages):
        if m.get("role") == "user":
            return _text_of(m.get("content")), None
    return "", None


def _openai_forced(choice: Any) -> str | None:
    if choice == "required":
        return "*"
    if isinstance(choice, dict):
        return choice["function"]["name"]
    return None


def _anthropic_prompt(messages: list[dict]) -> tuple[str, str | None]:
    content = messages[-1]["content"]
    if isinstance(content, list):
        results = [b for b in content if b.get("type") == "tool_result"]
        if results:
            return "", " | ".join(_text_of(b.get("content")) for b in results)
    return _text_of(content), None


def _anthropic_forced(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    if choice.get("type") == "any":
        return "*"
    if choice.get("type") == "tool":
        return choice["name"]
    return None


def _anthropic_problem(body: Any) -> str | None:
    """Shapes the Messages API refuses, checked the way it checks them."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    if "temperature" in body and not 0 <= body["temperature"] <= 1:
        return "temperature: range: 0..1"
    if "system" in body and not isinstance(body["system"], str | list):
        return "system: Input should be a valid string or list"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    tool_ids: set[str] = set()
    previous = None
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if role == previous:
            return f"messages.{i}: roles must alternate between 'user' and 'assistant'"
        previous = role
        content = m.get("content")
        if not isinstance(content, str | list) or not content:
            return f"messages.{i}.content: must be a non-empty string or list"
        blocks = content if isinstance(content, list) else []
        seen_other = False
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "tool_result":
                if block.get("tool_use_id") not in tool_ids:
                    return f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks"
                if seen_other:
                    return f"messages.{i}.content.{j}: tool_result blocks must come first"
            else:
                seen_other = True
            if kind == "tool_use" and role != "assistant":
                return f"messages.{i}.content.{j}: tool_use only in assistant messages"
            if kind == "tool_use" and not isinstance(block.get("input"), dict):
                return f"messages.{i}.content.{j}.input: Input should be a valid dictionary"
            if kind == "image" and block.get("source", {}).get("type") not in ("base64", "url"):
                return f"messages.{i}.content.{j}.source: unknown source type"
        tool_ids = {b["id"] for b in blocks if b.get("type") == "tool_use"} if role == "assistant" else set()
    for t in body.get("tools") or ():
        if not t.get("name") or (t.get("input_schema") or {}).get("type") != "object":
            return "tools: each tool needs a name and an input_schema of type object"
    return None


def _gemini_prompt(contents: list[dict]) -> tuple[str, str | None]:
    parts = contents[-1].get("parts") or []
    results = [p["functionResponse"] for p in parts if "functionResponse" in p]
    if results:
        return "", " | ".join(orjson.dumps(r.get("response")).decode() for r in results)
    return " ".join(p.get("text", "") for p in parts if "text" in p), None


def _gemini_forced(config: Any) -> str | None:
    fcc = (config or {}).get("functionCallingConfig") or {}
    if fcc.get("mode") == "ANY":
        allowed = fcc.get("allowedFunctionNames") or []
        return allowed[0] if len(allowed) == 1 else "*"
    return None


def _gemini_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "Invalid JSON payload received."
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    calls: list[str] = []
    for i, content in enumerate(contents):
        role = content.get("role")
        if role not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{i}].role: {role!r})"
        parts = content.get("parts")
        if not parts:
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
        responses = [p["functionResponse"]["name"] for p in parts if "functionResponse" in p]
        if responses and sorted(responses) != sorted(calls):
            return (
                "Please ensure that the number of function response parts is equal to the number of "
                "function call parts of the function call turn."
            )
        calls = [p["functionCall"]["name"] for p in parts if "functionCall" in p] if role == "model" else []
    for t in body.get("tools") or ():
        for f in t.get("functionDeclarations") or ():
            if "parameters" in f and "parametersJsonSchema" in f:
                return "parameters and parametersJsonSchema are mutually exclusive"
    return None


# ----------------------------------------------------------------------------- provider errors


def _openai_error(
    status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _anthropic_error(status: int, kind: str, message: str, headers: dict | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers={"request-id": "req_fake", **(headers or {})})


def _gemini_error(status: int, message: str, rpc: str, reason: str | None = None) -> web.Response:
    err: dict[str, Any] = {"code": status, "message": message, "status": rpc}
    if reason:
        err["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
            }
        ]
    if status == 429:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}]
    return web.json_response({"error": err}, status=status)


def _status_error(provider: str, status: int) -> web.Response:
    retry = {"retry-after": "1"} if status == 429 else None
    if provider == "openai":
        if status == 429:
            return _openai_error(
                429, "Rate limit reached for requests", "requests", "rate_limit_exceeded", retry
            )
        if status >= 500:
            return _openai_error(
                status,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
            )
        return _openai_error(status, f"fake error {status}", "invalid_request_error")
    if provider == "anthropic":
        kind = {
            429: "rate_limit_error",
            529: "overloaded_error",
            401: "authentication_error",
            404: "not_found_error",
        }.get(status, "api_error" if status >= 500 else "invalid_request_error")
        message = {"overloaded_error": "Overloaded", "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit"}.get(
            kind, "Internal server error" if status >= 500 else f"fake error {status}"
        )  # fmt: skip
        return _anthropic_error(status, kind, message, retry)
    rpc = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 404: "NOT_FOUND"}.get(
        status, "INVALID_ARGUMENT"
    )
    message = {429: "Resource has been exhausted (e.g. check quota).", 503: "The model is overloaded. Please try again later."}.get(
        status, "An internal error has occurred." if status >= 500 else f"fake error {status}"
    )  # fmt: skip
    return _gemini_error(status, message, rpc)


_CONTEXT_ERRORS = {
    "openai": lambda: _openai_error(
        400,
        "This model's maximum context length is 128000 tokens. However, your messages resulted in 131072 tokens. "
        "Please reduce the length of the messages.",
        "invalid_request_error",
        "context_length_exceeded",
    ),
    "anthropic": lambda: _anthropic_error(
        400, "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum"
    ),
    "gemini": lambda: _gemini_error(
        400,
        "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
        "INVALID_ARGUMENT",
    ),
}


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake
