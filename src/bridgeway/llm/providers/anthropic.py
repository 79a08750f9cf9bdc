"""Anthropic Messages API (`POST {base}/messages`) <-> OpenAI chat completions.

Requests: system/developer messages become the top-level `system` (Anthropic has no system turn,
so mid-conversation ones are hoisted too); assistant `tool_calls` become `tool_use` blocks and
`role: tool` messages `tool_result` blocks in a user turn, consecutive ones (and a user message
right after them) merged, because Anthropic wants all results of one assistant turn in the next
user turn, results first. `max_tokens` is required upstream: the client's, else 4096.
`temperature` is clamped to Anthropic's 0..1. Ignored, as Anthropic has no equivalent:
presence/frequency penalties, seed, logprobs, logit_bias. `n` > 1 is refused (UNSUPPORTED).

JSON mode: Anthropic has no response_format that works on every model, so `json_object` and
`json_schema` add a system instruction (with the schema, for json_schema) asking for one JSON
object and nothing else. It is best effort: the model is not constrained as with OpenAI.
Forcing a tool call with the schema would constrain it better but changes the response's shape
and clashes with the client's own tools; revisit with Anthropic's structured outputs.

Responses and streams: text blocks -> content, tool_use -> tool_calls (arguments as a JSON
string), thinking blocks are dropped, stop_reason -> finish_reason. Usage counts cache reads and
writes as prompt tokens (as OpenAI does), reporting reads as cached_tokens.
"""

from __future__ import annotations

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

NAME: Final = "anthropic"
SUPPORTS_EMBEDDINGS: Final = False

DEFAULT_MAX_TOKENS: Final = 4096
JSON_INSTRUCTION: Final = (
    "Respond only with a single valid JSON object: no text before or after it, no Markdown code fences."
)
_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}
_TOOL_CHOICE: Final = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
_EMPTY_SCHEMA: Final = {"type": "object", "properties": {}}
# Error types of mid-stream `error` events -> the status the error has as a response.
_ERROR_STATUS: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_CONTEXT_PHRASES: Final = ("prompt is too long", "exceed context limit", "context window")


# ------------------------------------------------------------------------------------- requests


def chat_request(body: dict, d: Deployment, stream: bool) -> Request:
    try:
        out = _request(body, d)
    except SHAPE_ERRORS:
        raise bad_request(d, "malformed chat request") from None
    if stream:
        out["stream"] = True
    return d.prefix + b"/messages", d.headers, orjson.dumps(out)


def _request(body: dict, d: Deployment) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(d, "'messages' must be a non-empty list")
    n = body.get("n")
    if n is not None and n != 1:
        raise unsupported(d, "n > 1")
    system, turns = _turns(messages, d)
    out: dict[str, Any] = {
        "model": d.model,
        "messages": turns,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    instruction = _json_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    if system:
        out["system"] = "\n\n".join(system)
    temperature = body.get("temperature")
    if temperature is not None:
        out["temperature"] = min(temperature, 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool, d) for tool in tools]
        choice = _tool_choice(body.get("tool_choice"), d)
        if body.get("parallel_tool_calls") is False:
            choice = {**(choice or _TOOL_CHOICE["auto"]), "disable_parallel_tool_use": True}
        if choice is not None:
            out["tool_choice"] = choice
    user = body.get("user")
    if user:
        out["metadata"] = {"user_id": user}
    return out


def _turns(messages: list, d: Deployment) -> tuple[list[str], list[dict]]:
    """(system texts, Anthropic messages), same-role neighbours merged into one turn."""
    system: list[str] = []
    turns: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "user":
            content = _user_content(m.get("content"), d)
        elif role == "assistant":
            content = _assistant_content(m, d)
            if not content:
                continue  # Anthropic refuses empty turns; an empty assistant turn says nothing
        elif role == "tool":
            role = "user"
            content = [
                {
                    "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id"),
                    "content": _user_content(m.get("content"), d),
                }
            ]
        elif role in ("system", "developer"):
            system.append(text_of(m.get("content"), d))
            continue
        else:
            raise bad_request(d, f"unsupported message role {role!r}")
        if turns and turns[-1]["role"] == role:
            last = turns[-1]
            last["content"] = _blocks(last["content"]) + _blocks(content)
        else:
            turns.append({"role": role, "content": content})
    return system, turns


def _blocks(content: str | list) -> list:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _user_content(content: Any, d: Deployment) -> str | list:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return [_part(part, d) for part in content]
    raise bad_request(d, "message content must be a string or a list of parts")


def _part(part: dict, d: Deployment) -> dict:
    kind = part.get("type")
    if kind == "text":
        block = {"type": "text", "text": part.get("text", "")}
        if "cache_control" in part:  # prompt caching marks, as Anthropic-aware clients send them
            block["cache_control"] = part["cache_control"]
        return block
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise bad_request(d, "image_url part without a url")
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if not head.endswith(";base64"):
                raise bad_request(d, "data: image URLs must be base64")
            return {
                "type": "image",
                "source": {"type": "base64", "media_type": head[5:].partition(";")[0], "data": data},
            }
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise unsupported(d, f"content parts of type {kind!r}")


def _assistant_content(m: dict, d: Deployment) -> str | list:
    content = m.get("content")
    calls = m.get("tool_calls")
    if not calls:
        return content if isinstance(content, str) else text_of(content or "", d)
    text = text_of(content or "", d)
    blocks: list[dict] = [{"type": "text", "text": text}] if text else []
    for call in calls:
        fn = call.get("function") or {}
        blocks.append(
            {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": tool_arguments(fn, d)}
        )
    return blocks


def _tool(tool: dict, d: Deployment) -> dict:
    if tool.get("type") != "function":
        raise unsupported(d, f"tools of type {tool.get('type')!r}")
    fn = tool.get("function") or {}
    out = {"name": fn.get("name"), "input_schema": fn.get("parameters") or _EMPTY_SCHEMA}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any, d: Deployment) -> dict | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        mapped = _TOOL_CHOICE.get(choice)
        if mapped is None:
            raise bad_request(d, f"unknown tool_choice {choice!r}")
        return mapped
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    raise bad_request(d, "tool_choice must be auto, none, required or a named function")


def _json_instruction(fmt: Any) -> str | None:
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return JSON_INSTRUCTION
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema:
            return JSON_INSTRUCTION + " It must conform to this JSON Schema: " + orjson.dumps(schema).decode()
        return JSON_INSTRUCTION
    return None


# ------------------------------------------------------------------------------------ responses


def chat_response(status: int, body: bytes, d: Deployment, public_model: str, headers: Sequence = ()) -> dict:
    if status >= 300:
        raise error(status, body, d, headers)
    data = load_json(body, d)
    if type(data) is not dict or not isinstance(data.get("content"), list):
        raise bad_response(d, "response has no content")
    try:
        return _response(data, public_model)
    except SHAPE_ERRORS:
        raise bad_response(d, "response of an unexpected shape") from None


def _response(data: dict, public_model: str) -> dict:
    texts: list[str] = []
    calls: list[dict] = []
    for block in data["content"]:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input", {})).decode(),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _FINISH.get(data.get("stop_reason"), "stop"),
    }
    return completion(
        data.get("id") or new_id("chatcmpl-"), public_model, [choice], _usage(data.get("usage"))
    )


def _usage(usage: Any, output: int | None = None) -> dict:
    if not isinstance(usage, dict):
        usage = {}
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + cached
    return usage_dict(
        prompt, output if output is not None else usage.get("output_tokens") or 0, cached=cached
    )


def chat_stream(d: Deployment, public_model: str, include_usage: bool = False) -> AnthropicStream:
    return AnthropicStream(d, public_model, include_usage)


class AnthropicStream(StreamTranslator):
    """Anthropic stream events -> OpenAI chunks.

    message_start -> the role chunk; content_block_start(tool_use) -> a tool call's id and name;
    text_delta / input_json_delta -> content / argument fragments; message_delta -> the chunk
    with finish_reason; message_stop -> the usage chunk (when asked). ping, content_block_stop
    and thinking deltas say nothing an OpenAI client reads."""

    __slots__ = ("_tools", "_prompt_usage")

    def __init__(self, d: Deployment, public_model: str, include_usage: bool = False) -> None:
        super().__init__(d, public_model, include_usage)
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._prompt_usage: dict = {}

    def _event(self, event: bytes | None, data: bytes) -> None:
        msg = load_json(data, self.d)
        kind = msg.get("type") if type(msg) is dict else None
        if kind == "content_block_delta":  # the hot one first
            delta = msg.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                self._delta({"content": delta.get("text", "")})
            elif dkind == "input_json_delta":
                index = self._tools.get(msg.get("index"))
                fragment = delta.get("partial_json")
                if index is not None and fragment:  # Anthropic opens with an empty fragment
                    self._delta({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        elif kind == "content_block_start":
            block = msg.get("content_block") or {}
            bkind = block.get("type")
            if bkind == "tool_use":
                index = self._tools[msg.get("index")] = len(self._tools)
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                self._delta({"tool_calls": [call]})
            elif bkind == "text" and block.get("text"):
                self._delta({"content": block["text"]})
        elif kind == "message_start":
            message = msg.get("message") or {}
            if message.get("id"):
                self.id = message["id"]
            self._prompt_usage = message.get("usage") or {}
            self.usage = _usage(self._prompt_usage)
            self._delta({"role": "assistant", "content": ""})
        elif kind == "message_delta":
            usage = msg.get("usage") or {}
            # Output tokens are cumulative here; newer API versions repeat the input counts too.
            self.usage = _usage({**self._prompt_usage, **usage})
            self._delta({}, _FINISH.get((msg.get("delta") or {}).get("stop_reason"), "stop"))
        elif kind == "message_stop":
            self.done = True
            if self.include_usage:
                self._usage_chunk()
        elif kind == "error":
            err = msg.get("error")
            err_kind = err.get("type") if isinstance(err, dict) else None
            raise _error_from(
                _ERROR_STATUS.get(err_kind, 500) if isinstance(err_kind, str) else 500, msg, self.d, None
            )
        elif kind is None:
            raise bad_response(self.d, "stream event without a type")


# --------------------------------------------------------------------------------------- errors


def embeddings_request(body: dict, d: Deployment) -> Request:
    raise unsupported(d, "embeddings")


def embeddings_response(
    status: int,
    body: bytes,
    d: Deployment,
    public_model: str,
    encoding_format: str | None = None,
    headers: Sequence = (),
) -> dict:
    raise unsupported(d, "embeddings")


def error(status: int, body: bytes, d: Deployment, headers: Sequence = ()) -> ProviderError:
    return _error_from(status, error_json(body), d, retry_after(headers))


def _error_from(status: int, data: Any, d: Deployment, after: float | None) -> ProviderError:
    message = kind = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message, kind = data["error"].get("message"), data["error"].get("type")
    if not isinstance(message, str):
        message = None
    context = False
    if status == 400 and message:
        lowered = message.lower()
        context = any(phrase in lowered for phrase in _CONTEXT_PHRASES)
    auth = kind == "authentication_error" or kind == "permission_error"
    return status_error(status, message, d, context_window=context, auth=auth, retry_after=after)
