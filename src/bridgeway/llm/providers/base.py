"""What every provider module shares: the deployment, the error, SSE framing, OpenAI output shapes.

A provider module (openai, anthropic, gemini) is a handful of pure functions translating between
the OpenAI chat/embeddings format our clients speak and one upstream wire format. No I/O happens
here: `bridgeway.llm.client` sends the bytes these functions build and feeds back what arrives,
so every translation is testable with plain bytes, and the per-request cost is a few dict
operations and one orjson call each way (no pydantic, no imports, no regex on the happy path).

A module provides (see `Provider`):

    chat_request(body, d, stream) -> (target, headers, body)        what to send upstream
    chat_response(status, body, d, public_model, headers) -> dict    OpenAI chat.completion, or raise
    chat_stream(d, public_model, include_usage) -> StreamTranslator   feed(bytes) -> OpenAI chunks
    embeddings_request / embeddings_response                         (SUPPORTS_EMBEDDINGS)
    error(status, body, d, headers) -> ProviderError                  the upstream error, classified

Deployments are compiled once from config: the URL is parsed and the upstream headers (including
the credential) are serialised at construction, so a request only reuses them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import orjson

__all__ = [
    "Deployment",
    "Headers",
    "Provider",
    "ProviderError",
    "Request",
    "SHAPE_ERRORS",
    "SSEDecoder",
    "StreamBroken",
    "StreamTranslator",
    "bad_request",
    "bad_response",
    "error_json",
    "completion",
    "load_json",
    "new_id",
    "retry_after",
    "safe_message",
    "status_error",
    "text_of",
    "tokens",
    "tool_arguments",
    "unsupported",
    "usage_dict",
]

Headers = tuple[tuple[bytes, bytes], ...]
# (request target, headers, body) for UpstreamPool.request(b"POST", ...). The headers tuple is the
# deployment's own, shared by every request: copy it to add headers.
Request = tuple[bytes, Headers, bytes]

# provider -> (default base URL, credential header, credential prefix, fixed headers).
# A base URL is everything before the endpoint name, API version included, as the official SDKs
# spell it: OpenAI-compatible servers are `provider: openai` with their own base URL.
_WIRE: Final[dict[str, tuple[str, bytes, bytes, Headers]]] = {
    "openai": ("https://api.openai.com/v1", b"authorization", b"Bearer ", ()),
    "anthropic": (
        "https://api.anthropic.com/v1",
        b"x-api-key",
        b"",
        ((b"anthropic-version", b"2023-06-01"),),
    ),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta", b"x-goog-api-key", b"", ()),
}
_JSON_HEADER: Final = (b"content-type", b"application/json")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


# ----------------------------------------------------------------------------------- deployment


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model at one provider endpoint with one credential.

    `api_key` and the compiled `headers` (which carry it) stay out of repr, so a deployment can
    be logged. `extra_headers` are sent as they are (e.g. OpenAI-Organization, anthropic-beta).
    """

    provider: str
    model: str
    base_url: str = ""
    api_key: str | None = field(default=None, repr=False)
    extra_headers: tuple[tuple[str, str], ...] = ()
    # Compiled from the above in __post_init__.
    tls: bool = field(init=False, repr=False, compare=False)
    host: str = field(init=False, repr=False, compare=False)
    port: int = field(init=False, repr=False, compare=False)
    prefix: bytes = field(init=False, repr=False, compare=False)
    headers: Headers = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        wire = _WIRE.get(self.provider)
        if wire is None:
            raise ValueError(f"unknown LLM provider {self.provider!r}; expected one of {sorted(_WIRE)}")
        if not self.model:
            raise ValueError("a deployment needs a model name")
        default_url, key_header, key_prefix, fixed = wire
        url = self.base_url or default_url
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"deployment base_url {url!r} must be an http:// or https:// URL")
        headers = [_JSON_HEADER, *fixed]
        if self.api_key:
            headers.append((key_header, key_prefix + self.api_key.encode("latin-1")))
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.extra_headers]
        set_ = object.__setattr__  # frozen: compiled fields are set once, here
        set_(self, "base_url", url)
        set_(self, "tls", parts.scheme == "https")
        set_(self, "host", parts.hostname)
        set_(self, "port", parts.port or _DEFAULT_PORTS[parts.scheme])
        set_(self, "prefix", parts.path.rstrip("/").encode())
        set_(self, "headers", tuple(headers))

    @property
    def origin(self) -> tuple[bool, str, int]:
        """(tls, host, port): deployments sharing an origin share one connection pool."""
        return (self.tls, self.host, self.port)


# --------------------------------------------------------------------------------------- errors


class ProviderError(Exception):
    """An upstream call failed. `message` is safe to show a client (no credentials).

    status     HTTP status for our client (429, 400, 502, 504...)
    code       RATE_LIMITED, CONTEXT_WINDOW, BAD_REQUEST, UNSUPPORTED, UPSTREAM_AUTH,
               UPSTREAM_ERROR, UPSTREAM_TIMEOUT, UPSTREAM_CONNECT, BAD_RESPONSE, STREAM_BROKEN
    retryable  True when another deployment may well succeed (rate limits, 5xx, timeouts, a
               context window another model may have, a deployment's own misconfiguration)
    retry_after seconds, when the provider said
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int = 502,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code} {self.status} retryable={self.retryable}: {self.message}>"


class StreamBroken(ProviderError):
    """A stream failed after content had reached the caller: it cannot be retried elsewhere.

    A subclass with retryable=False, so a router that falls back on `retryable` does the right
    thing without knowing it; `cause` is the error as it would have been before the first token."""

    def __init__(self, cause: ProviderError) -> None:
        super().__init__("STREAM_BROKEN", f"stream interrupted: {cause.message}", status=502)
        self.cause = cause


# Things that look like credentials: OpenAI/Anthropic keys (also masked ones, "sk-ab***yz"),
# Google API keys, bearer tokens. Providers echo (parts of) a rejected key in their messages.
_SECRETISH: Final = re.compile(r"\b(?:sk-[\w*.\-]{3,}|AIza[\w\-]{10,})|(?i:bearer)\s+\S+")
_MAX_MESSAGE: Final = 500


def safe_message(message: str, d: Deployment) -> str:
    """A provider's message fit for our client: credentials removed, length bounded."""
    key = d.api_key
    if key and len(key) >= 8 and key in message:  # a very short "key" would shred the message
        message = message.replace(key, "[redacted]")
    message = _SECRETISH.sub("[redacted]", message)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return message


def status_error(
    status: int,
    message: str | None,
    d: Deployment,
    *,
    context_window: bool = False,
    auth: bool = False,
    retry_after: float | None = None,
) -> ProviderError:
    """Classify an upstream HTTP error. The provider module decides `context_window` / `auth`
    from its own error codes; the status decides the rest."""
    text = f"{d.provider}: " + (safe_message(message, d) if message else f"HTTP {status}")
    if context_window:
        return ProviderError("CONTEXT_WINDOW", text, status=400, retryable=True)
    if status == 429:
        return ProviderError("RATE_LIMITED", text, status=429, retryable=True, retry_after=retry_after)
    if status >= 500:  # includes Anthropic's 529 overloaded
        return ProviderError("UPSTREAM_ERROR", text, status=502, retryable=True, retry_after=retry_after)
    # The gateway's credential or model name for this deployment is wrong: the client's request
    # is fine and another deployment may serve it.
    if auth or status in (401, 403):
        return ProviderError("UPSTREAM_AUTH", text, status=502, retryable=True)
    if status == 404:
        return ProviderError("UPSTREAM_ERROR", text, status=502, retryable=True)
    if status == 408:
        return ProviderError("UPSTREAM_TIMEOUT", text, status=504, retryable=True)
    return ProviderError("BAD_REQUEST", text, status=413 if status == 413 else 400)


def bad_response(d: Deployment, what: str) -> ProviderError:
    """The upstream answered 2xx with something that is not its protocol: try elsewhere."""
    return ProviderError("BAD_RESPONSE", f"{d.provider}: {what}", status=502, retryable=True)


def bad_request(d: Deployment, what: str) -> ProviderError:
    """The client's request cannot be expressed for this provider."""
    return ProviderError("BAD_REQUEST", f"{d.provider}: {what}", status=400)


def unsupported(d: Deployment, what: str) -> ProviderError:
    """A feature this provider lacks; retryable, since another deployment may have it."""
    return ProviderError("UNSUPPORTED", f"{d.provider} does not support {what}", status=400, retryable=True)


# What walking a JSON document of the wrong shape raises (a string where a dict was expected...).
# Translations catch these around their walk: a try costs nothing until something is raised.
SHAPE_ERRORS: Final = (AttributeError, TypeError, KeyError, IndexError)


def load_json(data: bytes, d: Deployment) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise bad_response(d, "invalid JSON from upstream") from None


def error_json(body: bytes) -> Any:
    """An error body's JSON, or None when it is not JSON (a proxy's HTML error page, say)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def text_of(content: Any, d: Deployment) -> str:
    """The text of an OpenAI message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    raise bad_request(d, "message content must be a string or a list of parts")


def tool_arguments(fn: dict, d: Deployment) -> dict:
    """A tool call's arguments as an object (OpenAI sends them as a JSON string)."""
    args = fn.get("arguments")
    if isinstance(args, dict):
        return args
    if not args:
        return {}
    try:
        value = orjson.loads(args)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise bad_request(d, f"tool call arguments of {fn.get('name')!r} are not a JSON object")
    return value


def retry_after(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    """Seconds from a Retry-After header (the delay form; dates are not used by these APIs)."""
    for name, value in headers:
        if len(name) == 11 and name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------------- OpenAI shape


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def usage_dict(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of an OpenAI usage dict (the provider's own counts)."""
    if not usage:
        return (0, 0)
    return (usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)


def completion(id_: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


# ------------------------------------------------------------------------------------------ SSE


class SSEDecoder:
    """Server-sent events from arbitrary byte chunks: (event name or None, data) per event.

    Lines end in LF, CRLF or CR (Gemini uses CRLF); a chunk may end anywhere, even between CR
    and LF. Comments and unknown fields are ignored; multi-line data is joined with LF."""

    __slots__ = ("_buf", "_cr", "_event", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._cr = False  # the previous chunk ended in CR: an LF starting this one belongs to it
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk[-1:] == b"\r":
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()  # the unterminated rest
        events: list[tuple[bytes | None, bytes]] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                    self._data = []
                self._event = None
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
        return events

    def close(self) -> list[tuple[bytes | None, bytes]]:
        """End of stream: an event whose blank line never came is still delivered (lenient
        towards servers that end the body right after the last data line)."""
        events = self.feed(b"\n\n") if (self._buf or self._data) else []
        self._buf = b""
        return events


class StreamTranslator:
    """Upstream stream bytes in, OpenAI `chat.completion.chunk` dicts out.

    `feed(data)` returns the chunks completed by `data` (possibly none) and raises ProviderError
    on an upstream error event or garbage; `close()` at the clean end of the body returns the
    last chunks (the usage chunk when the client asked for it) and raises if the upstream
    stopped before finishing. `usage` is the OpenAI usage dict as soon as the upstream told
    (also when the stream later breaks, for accounting)."""

    __slots__ = ("d", "model", "include_usage", "id", "created", "usage", "done", "_sse", "_out")

    def __init__(self, d: Deployment, public_model: str, include_usage: bool = False) -> None:
        self.d = d
        self.model = public_model
        self.include_usage = include_usage
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.usage: dict[str, Any] | None = None
        self.done = False
        self._sse = SSEDecoder()
        self._out: list[dict] = []

    def feed(self, data: bytes) -> list[dict]:
        out = self._out = []
        try:
            for event, payload in self._sse.feed(data):
                self._event(event, payload)
        except SHAPE_ERRORS:
            raise bad_response(self.d, "stream event of an unexpected shape") from None
        return out

    def close(self) -> list[dict]:
        out = self._out = []
        try:
            for event, payload in self._sse.close():
                self._event(event, payload)
        except SHAPE_ERRORS:
            raise bad_response(self.d, "stream event of an unexpected shape") from None
        self._end()
        return out

    # -- for subclasses ---------------------------------------------------------------------------

    def _event(self, event: bytes | None, data: bytes) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        if not self.done:
            raise bad_response(self.d, "stream ended before the response was complete")

    def _delta(self, delta: dict, finish_reason: str | None = None, index: int = 0) -> None:
        self._out.append(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
                "usage": None,
            }
        )

    def _usage_chunk(self) -> None:
        self._out.append(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage,
            }
        )


class Provider(Protocol):
    """The shape of a provider module (modules satisfy it structurally)."""

    NAME: str
    SUPPORTS_EMBEDDINGS: bool

    def chat_request(self, body: dict, d: Deployment, stream: bool) -> Request: ...

    def chat_response(
        self, status: int, body: bytes, d: Deployment, public_model: str, headers: Sequence = ()
    ) -> dict: ...

    def chat_stream(
        self, d: Deployment, public_model: str, include_usage: bool = False
    ) -> StreamTranslator: ...

    def embeddings_request(self, body: dict, d: Deployment) -> Request: ...

    def embeddings_response(
        self,
        status: int,
        body: bytes,
        d: Deployment,
        public_model: str,
        encoding_format: str | None = None,
        headers: Sequence = (),
    ) -> dict: ...

    def error(self, status: int, body: bytes, d: Deployment, headers: Sequence = ()) -> ProviderError: ...
