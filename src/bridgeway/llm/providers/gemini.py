"""Google Gemini API (generateContent, streamGenerateContent, batchEmbedContents) <-> OpenAI.

Requests: messages become `contents` with roles user/model (system/developer messages become
`systemInstruction`); assistant tool calls become `functionCall` parts and tool results
`functionResponse` parts, named after the earlier call with that id (Gemini matches results by
name and order, not id); same-role neighbours are merged into one turn, so all results of one
model turn travel together. Tool parameters and JSON-mode schemas are sent as plain JSON Schema
(`parametersJsonSchema`, `responseJsonSchema`), so no lossy conversion to Gemini's OpenAPI
subset is needed.

Responses: candidates -> choices, functionCall parts -> tool_calls (Gemini's call id when it
sends one, else a fresh `call_...`), thought parts dropped, finishReason -> finish_reason. Gemini
3 models sign their function calls: the `thoughtSignature` travels in the tool call as
`extra_content.google.thought_signature` (as Google's own OpenAI-compatible endpoint does) and
is sent back on the functionCall part, so multi-turn tool use keeps working. Usage counts
thinking tokens as completion tokens (reported as reasoning_tokens), like OpenAI does.
"""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import sys
from array import array
from collections.abc import Sequence
from typing import Any, Final

import orjson

from bridgeway.llm.providers.base import (
    SHAPE_ERRORS,
    Deployment,
    ProviderError,
    Request,
    StreamTranslator,
    bad_request,
    bad_response,
    completion,
    error_json,
    load_json,
    new_id,
    retry_after,
    status_error,
    text_of,
    tool_arguments,
    unsupported,
    usage_dict,
)

NAME: Final = "gemini"
SUPPORTS_EMBEDDINGS: Final = True

_FINISH: Final = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
_MODES: Final = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
_JSON_MIME: Final = "application/json"
_CONTEXT_PHRASES: Final = ("exceeds the maximum number of tokens",)
# google.rpc codes of errors inside a stream -> HTTP status.
_RPC_STATUS: Final = {"RESOURCE_EXHAUSTED": 429, "INVALID_ARGUMENT": 400, "UNAVAILABLE": 503, "INTERNAL": 500}


# ------------------------------------------------------------------------------------- requests


def chat_request(body: dict, d: Deployment, stream: bool) -> Request:
    try:
        out = _request(body, d)
    except SHAPE_ERRORS:
        raise bad_request(d, "malformed chat request") from None
    method = b":streamGenerateContent?alt=sse" if stream else b":generateContent"
    return _model_path(d) + method, d.headers, orjson.dumps(out)


def _model_path(d: Deployment) -> bytes:
    return d.prefix + b"/models/" + d.model.removeprefix("models/").encode()


def _request(body: dict, d: Deployment) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(d, "'messages' must be a non-empty list")
    system, contents = _contents(messages, d)
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    config: dict[str, Any] = {}
    get = body.get
    if get("temperature") is not None:
        config["temperature"] = body["temperature"]
    if get("top_p") is not None:
        config["topP"] = body["top_p"]
    max_tokens = get("max_completion_tokens") or get("max_tokens")
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    stop = get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    if get("n") is not None:
        config["candidateCount"] = body["n"]
    if get("presence_penalty") is not None:
        config["presencePenalty"] = body["presence_penalty"]
    if get("frequency_penalty") is not None:
        config["frequencyPenalty"] = body["frequency_penalty"]
    if get("seed") is not None:
        config["seed"] = body["seed"]
    fmt = get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = _JSON_MIME
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema:
            config["responseJsonSchema"] = schema
    if config:
        out["generationConfig"] = config
    tools = get("tools")
    if tools:
        out["tools"] = [{"functionDeclarations": [_declaration(tool, d) for tool in tools]}]
        choice = get("tool_choice")
        if choice is not None:
            out["toolConfig"] = {"functionCallingConfig": _calling_config(choice, d)}
    return out


def _contents(messages: list, d: Deployment) -> tuple[list[str], list[dict]]:
    system: list[str] = []
    contents: list[dict] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the results that follow
    for m in messages:
        role = m.get("role")
        if role == "user":
            parts = _user_parts(m.get("content"), d)
        elif role == "assistant":
            role = "model"
            parts = _model_parts(m, names, d)
            if not parts:
                continue
        elif role == "tool":
            role = "user"
            name = names.get(m.get("tool_call_id")) or m.get("name")
            if not name:
                raise bad_request(d, f"tool result {m.get('tool_call_id')!r} answers no earlier tool call")
            parts = [{"functionResponse": {"name": name, "response": _tool_response(m.get("content"), d)}}]
        elif role in ("system", "developer"):
            system.append(text_of(m.get("content"), d))
            continue
        else:
            raise bad_request(d, f"unsupported message role {role!r}")
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})
    return system, contents


def _user_parts(content: Any, d: Deployment) -> list[dict]:
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list):
        return [_part(part, d) for part in content]
    raise bad_request(d, "message content must be a string or a list of parts")


def _part(part: dict, d: Deployment) -> dict:
    kind = part.get("type")
    if kind == "text":
        return {"text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise bad_request(d, "image_url part without a url")
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if not head.endswith(";base64"):
                raise bad_request(d, "data: image URLs must be base64")
            return {"inlineData": {"mimeType": head[5:].partition(";")[0], "data": data}}
        mime = mimetypes.guess_type(url.partition("?")[0])[0] or "image/jpeg"
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise unsupported(d, f"content parts of type {kind!r}")


def _model_parts(m: dict, names: dict[str, str], d: Deployment) -> list[dict]:
    content = m.get("content")
    text = text_of(content, d) if content else ""
    parts: list[dict] = [{"text": text}] if text else []
    for call in m.get("tool_calls") or ():
        fn = call.get("function") or {}
        name = fn.get("name")
        names[call.get("id")] = name
        part: dict[str, Any] = {"functionCall": {"name": name, "args": tool_arguments(fn, d)}}
        signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def _tool_response(content: Any, d: Deployment) -> dict:
    """functionResponse.response must be an object: a JSON object result is sent as it is,
    anything else under "output" (the key Gemini documents for a function's output)."""
    text = text_of(content, d)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"output": text}
    return value if isinstance(value, dict) else {"output": value}


def _declaration(tool: dict, d: Deployment) -> dict:
    if tool.get("type") != "function":
        raise unsupported(d, f"tools of type {tool.get('type')!r}")
    fn = tool.get("function") or {}
    out = {"name": fn.get("name")}
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("parameters"):
        out["parametersJsonSchema"] = fn["parameters"]
    return out


def _calling_config(choice: Any, d: Deployment) -> dict:
    if isinstance(choice, str):
        mode = _MODES.get(choice)
        if mode is None:
            raise bad_request(d, f"unknown tool_choice {choice!r}")
        return {"mode": mode}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"mode": "ANY", "allowedFunctionNames": [(choice.get("function") or {}).get("name")]}
    raise bad_request(d, "tool_choice must be auto, none, required or a named function")


# ------------------------------------------------------------------------------------ responses


def chat_response(status: int, body: bytes, d: Deployment, public_model: str, headers: Sequence = ()) -> dict:
    if status >= 300:
        raise error(status, body, d, headers)
    data = load_json(body, d)
    if type(data) is not dict:
        raise bad_response(d, "response is not an object")
    try:
        choices = _choices(data)
    except SHAPE_ERRORS:
        raise bad_response(d, "response of an unexpected shape") from None
    if choices is None:
        raise bad_response(d, "response has no candidates")
    return completion(data.get("responseId") or new_id("chatcmpl-"), public_model, choices, _usage(data))


def _choices(data: dict) -> list[dict] | None:
    candidates = data.get("candidates")
    if not candidates:
        # A prompt blocked by safety settings answers no candidate, only promptFeedback.
        if (data.get("promptFeedback") or {}).get("blockReason"):
            message = {"role": "assistant", "content": "", "refusal": None}
            return [{"index": 0, "message": message, "logprobs": None, "finish_reason": "content_filter"}]
        return None
    choices = []
    for i, cand in enumerate(candidates):
        texts, calls = _read_parts((cand.get("content") or {}).get("parts") or ())
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else _FINISH.get(cand.get("finishReason"), "stop")
        choices.append(
            {"index": cand.get("index", i), "message": message, "logprobs": None, "finish_reason": finish}
        )
    return choices


def _read_parts(parts: Sequence[dict]) -> tuple[list[str], list[dict]]:
    texts: list[str] = []
    calls: list[dict] = []
    for part in parts:
        if "text" in part:
            if not part.get("thought"):
                texts.append(part["text"])
        elif "functionCall" in part:
            fc = part["functionCall"]
            call: dict[str, Any] = {
                "id": fc.get("id") or new_id("call_"),
                "type": "function",
                "function": {
                    "name": fc.get("name"),
                    "arguments": orjson.dumps(fc.get("args") or {}).decode(),
                },
            }
            if part.get("thoughtSignature"):
                call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
            calls.append(call)
    return texts, calls


def _usage(data: dict) -> dict | None:
    meta = data.get("usageMetadata")
    if not isinstance(meta, dict):
        return None
    thoughts = meta.get("thoughtsTokenCount") or 0
    return usage_dict(
        meta.get("promptTokenCount") or 0,
        (meta.get("candidatesTokenCount") or 0) + thoughts,
        cached=meta.get("cachedContentTokenCount") or 0,
        reasoning=thoughts,
    )


def chat_stream(d: Deployment, public_model: str, include_usage: bool = False) -> GeminiStream:
    return GeminiStream(d, public_model, include_usage)


class GeminiStream(StreamTranslator):
    """Gemini streams whole GenerateContentResponse objects, each with the next text pieces (and
    whole function calls); the last candidate events carry finishReason, usage is cumulative.
    There is no end marker: the stream is complete when every candidate has finished and the
    body ends, so the usage chunk is sent from close()."""

    __slots__ = ("_started", "_finished", "_ntools")

    def __init__(self, d: Deployment, public_model: str, include_usage: bool = False) -> None:
        super().__init__(d, public_model, include_usage)
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._ntools: dict[int, int] = {}  # candidate -> tool calls so far

    def _event(self, event: bytes | None, data: bytes) -> None:
        msg = load_json(data, self.d)
        if type(msg) is not dict:
            raise bad_response(self.d, "stream event is not an object")
        if "error" in msg:
            err = msg["error"]
            kind = err.get("status") if isinstance(err, dict) else None
            status = _RPC_STATUS.get(kind, 500) if isinstance(kind, str) else 500
            raise _error_from(status, msg, self.d, None)
        if msg.get("responseId") and not self._started:
            self.id = msg["responseId"]
        candidates = msg.get("candidates")
        if not candidates and (msg.get("promptFeedback") or {}).get("blockReason"):
            self._start(0)
            self._delta({}, "content_filter")
            self._finished.add(0)
        for i, cand in enumerate(candidates or ()):
            index = cand.get("index", i)
            self._start(index)
            texts, calls = _read_parts((cand.get("content") or {}).get("parts") or ())
            if texts:
                self._delta({"content": "".join(texts)}, index=index)
            if calls:
                base = self._ntools.get(index, 0)
                self._ntools[index] = base + len(calls)
                for n, call in enumerate(calls):
                    call["index"] = base + n
                self._delta({"tool_calls": calls}, index=index)
            reason = cand.get("finishReason")
            if reason:
                finish = "tool_calls" if self._ntools.get(index) else _FINISH.get(reason, "stop")
                self._delta({}, finish, index)
                self._finished.add(index)
        usage = _usage(msg)
        if usage is not None:
            self.usage = usage

    def _start(self, index: int) -> None:
        if index not in self._started:
            self._started.add(index)
            self._delta({"role": "assistant", "content": ""}, index=index)

    def _end(self) -> None:
        if not self._finished or self._finished != self._started:
            raise bad_response(self.d, "stream ended before a finishReason")
        self.done = True
        if self.include_usage:
            self._usage_chunk()


# ----------------------------------------------------------------------------------- embeddings


def embeddings_request(body: dict, d: Deployment) -> Request:
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) for text in inputs):
        raise unsupported(d, "embedding inputs other than a string or a list of strings")
    model = "models/" + d.model.removeprefix("models/")
    dimensions = body.get("dimensions")
    requests = []
    for text in inputs:
        request: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
        if dimensions:
            request["outputDimensionality"] = dimensions
        requests.append(request)
    return _model_path(d) + b":batchEmbedContents", d.headers, orjson.dumps({"requests": requests})


def embeddings_response(
    status: int,
    body: bytes,
    d: Deployment,
    public_model: str,
    encoding_format: str | None = None,
    headers: Sequence = (),
) -> dict:
    """OpenAI's embeddings list. Gemini reports no token count for embeddings: usage is 0."""
    if status >= 300:
        raise error(status, body, d, headers)
    data = load_json(body, d)
    embeddings = data.get("embeddings") if type(data) is dict else None
    if not isinstance(embeddings, list):
        raise bad_response(d, "embeddings response has no embeddings")
    try:
        vectors = [item["values"] for item in embeddings]
    except SHAPE_ERRORS:
        raise bad_response(d, "embeddings of an unexpected shape") from None
    if encoding_format == "base64":  # what the official OpenAI SDKs ask for by default
        vectors = [_base64_floats(vector) for vector in vectors]
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": public_model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def _base64_floats(values: list[float]) -> str:
    """Little-endian float32, base64: OpenAI's `encoding_format: base64`."""
    packed = array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


# --------------------------------------------------------------------------------------- errors


def error(status: int, body: bytes, d: Deployment, headers: Sequence = ()) -> ProviderError:
    return _error_from(status, error_json(body), d, retry_after(headers))


def _error_from(status: int, data: Any, d: Deployment, after: float | None) -> ProviderError:
    # {"error": {"code": 400, "message": "...", "status": "INVALID_ARGUMENT", "details": [...]}};
    # streams without alt=sse wrap it in a list.
    if isinstance(data, list) and data:
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    message = None
    auth = False
    if isinstance(err, dict):
        message = err.get("message")
        for detail in err.get("details") or ():
            if not isinstance(detail, dict):
                continue
            # An invalid key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
            if detail.get("reason") == "API_KEY_INVALID":
                auth = True
            delay = detail.get("retryDelay")  # google.rpc.RetryInfo, "37s"
            if after is None and isinstance(delay, str) and delay.endswith("s"):
                with contextlib.suppress(ValueError):
                    after = float(delay[:-1])
    if not isinstance(message, str):
        message = None
    context = False
    if status == 400 and message and not auth:
        lowered = message.lower()
        context = any(phrase in lowered for phrase in _CONTEXT_PHRASES)
    return status_error(status, message, d, context_window=context, auth=auth, retry_after=after)
