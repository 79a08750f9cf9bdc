"""OpenAI wire format, also spoken by vLLM, Ollama, llama.cpp and other OpenAI-compatible servers.

Nearly a pass-through: the client's body goes upstream as it came, with only `model` replaced by
the deployment's (unknown parameters survive, so new OpenAI features work without us). Streams
always ask the upstream for `stream_options.include_usage`, so usage is known for accounting;
the usage-only chunk is then removed from what the client sees unless the client asked for it.
Responses get the public model name the client asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import orjson

from bridgeway.llm.providers.base import (
    Deployment,
    ProviderError,
    Request,
    StreamTranslator,
    bad_response,
    error_json,
    load_json,
    retry_after,
    status_error,
)

NAME: Final = "openai"
SUPPORTS_EMBEDDINGS: Final = True

_USAGE_ON: Final = {"include_usage": True}
# Context-window errors: OpenAI's code, llama.cpp's type, and the messages of vLLM and others
# that answer 400 without a code.
_CONTEXT_CODES: Final = frozenset(("context_length_exceeded", "exceed_context_size_error"))
_CONTEXT_PHRASES: Final = (
    "maximum context length",
    "context length exceeded",
    "exceeds the available context",
)
# Mid-stream error types -> the status the error would have had as a response.
_STREAM_ERROR_STATUS: Final = {"rate_limit_exceeded": 429, "invalid_request_error": 400}


def chat_request(body: dict, d: Deployment, stream: bool) -> Request:
    out = dict(body)  # shallow: the messages are shared, the caller's dict is not changed
    out["model"] = d.model
    if stream:
        out["stream"] = True
        options = out.get("stream_options")
        out["stream_options"] = {**options, **_USAGE_ON} if options else _USAGE_ON
    else:
        out.pop("stream", None)
        out.pop("stream_options", None)  # OpenAI rejects stream_options without stream
    return d.prefix + b"/chat/completions", d.headers, orjson.dumps(out)


def chat_response(status: int, body: bytes, d: Deployment, public_model: str, headers: Sequence = ()) -> dict:
    if status >= 300:
        raise error(status, body, d, headers)
    data = load_json(body, d)
    if type(data) is not dict or not isinstance(data.get("choices"), list):
        raise bad_response(d, "response has no choices")
    data["model"] = public_model
    return data


def chat_stream(d: Deployment, public_model: str, include_usage: bool = False) -> OpenAIStream:
    return OpenAIStream(d, public_model, include_usage)


class OpenAIStream(StreamTranslator):
    """Upstream chunks are already OpenAI chunks: rename the model, track finish and usage."""

    __slots__ = ("_finished",)

    def __init__(self, d: Deployment, public_model: str, include_usage: bool = False) -> None:
        super().__init__(d, public_model, include_usage)
        self._finished = False

    def _event(self, event: bytes | None, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        chunk = load_json(data, self.d)
        if type(chunk) is not dict:
            raise bad_response(self.d, "stream chunk is not an object")
        err = chunk.get("error")
        if err is not None:
            status = 500
            if isinstance(err, dict):
                kind = err.get("type") or err.get("code")
                status = _STREAM_ERROR_STATUS.get(kind, 500) if isinstance(kind, str) else 500
            raise _error_from(status, chunk, self.d, None)
        chunk["model"] = self.model
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        choices = chunk.get("choices")
        if not choices:
            if usage and not self.include_usage:
                return  # the usage-only chunk we asked for on our own account
        else:
            if usage and not self.include_usage:
                chunk["usage"] = None
            if not self._finished:
                for choice in choices:
                    if choice.get("finish_reason"):
                        self._finished = True
        self._out.append(chunk)

    def _end(self) -> None:
        # A few compatible servers end the body without "[DONE]"; a finished choice is enough.
        if not (self.done or self._finished):
            super()._end()
        self.done = True


def embeddings_request(body: dict, d: Deployment) -> Request:
    out = dict(body)
    out["model"] = d.model
    return d.prefix + b"/embeddings", d.headers, orjson.dumps(out)


def embeddings_response(
    status: int,
    body: bytes,
    d: Deployment,
    public_model: str,
    encoding_format: str | None = None,
    headers: Sequence = (),
) -> dict:
    if status >= 300:
        raise error(status, body, d, headers)
    data = load_json(body, d)
    if type(data) is not dict or not isinstance(data.get("data"), list):
        raise bad_response(d, "embeddings response has no data")
    data["model"] = public_model
    return data


def error(status: int, body: bytes, d: Deployment, headers: Sequence = ()) -> ProviderError:
    return _error_from(status, error_json(body), d, retry_after(headers))


def _error_from(status: int, data: object, d: Deployment, after: float | None) -> ProviderError:
    message = code = kind = None
    if isinstance(data, dict):
        err = data.get("error", data)  # vLLM's older errors are top-level {"object": "error", ...}
        if isinstance(err, dict):
            message, code, kind = err.get("message"), err.get("code"), err.get("type")
        elif isinstance(err, str):  # Ollama: {"error": "..."}
            message = err
    if not isinstance(message, str):
        message = None
    context = False
    if 400 <= status < 500 and status != 429:
        context = (type(code) is str and code in _CONTEXT_CODES) or (
            type(kind) is str and kind in _CONTEXT_CODES
        )
        if not context and message:
            lowered = message.lower()
            context = any(phrase in lowered for phrase in _CONTEXT_PHRASES)
    return status_error(status, message, d, context_window=context, retry_after=after)
