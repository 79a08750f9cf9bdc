"""One LLM call to one deployment, over the data plane's pooled upstream client.

    pools = Pools()
    d = Deployment("anthropic", "claude-haiku-4-5", api_key=key)
    reply = await chat(pools.get(d), d, body, "fast-chat")                   # OpenAI dict
    stream = await chat(pools.get(d), d, body, "fast-chat", stream=True)     # ChatStream
    async for chunk in stream: ...                                           # OpenAI chunk dicts

Translation is the provider modules' (pure); this module only moves bytes and maps transport
failures to ProviderError (retryable: the router may try the next deployment).

Streams and fallback: `chat(stream=True)` returns only once the stream has produced its first
content (text, a tool call, or a finish), buffering the role chunk that precedes it. Everything
that goes wrong before then -- an error status, a dead connection, an error event, garbage --
raises ProviderError from `chat()`, when nothing has been sent to our client and another
deployment can still answer. Anything that goes wrong later raises StreamBroken (retryable False)
from the iteration: the client has seen tokens, so the only honest thing left is to end the
stream with an error. `ChatStream.usage` holds the provider's counts as far as they were told.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any, Final

from bridgeway.dataplane.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    default_ssl_context,
)
from bridgeway.llm.providers import PROVIDERS
from bridgeway.llm.providers.base import (
    Deployment,
    ProviderError,
    StreamBroken,
    StreamTranslator,
)

__all__ = ["DEFAULT_TIMEOUT", "ChatStream", "Pools", "chat", "embeddings", "transport_error"]

# Seconds to wait for the response head, and then between body chunks. Generous: a long prompt
# can take a while to its first token, and reasoning models pause mid-stream.
DEFAULT_TIMEOUT: Final = 300.0
_POST: Final = b"POST"


class Pools:
    """One UpstreamPool per deployment origin, made on first use; https origins get TLS with the
    given context (default: the system's CAs)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, **pool_options: Any) -> None:
        self._ssl_context = ssl_context
        self._options = pool_options
        self._pools: dict[tuple[bool, str, int], UpstreamPool] = {}

    def get(self, d: Deployment) -> UpstreamPool:
        pool = self._pools.get(d.origin)
        if pool is None:
            context = (self._ssl_context or default_ssl_context()) if d.tls else None
            pool = self._pools[d.origin] = UpstreamPool(d.host, d.port, ssl=context, **self._options)
        return pool

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()


async def chat(
    pool: UpstreamPool,
    d: Deployment,
    body: dict,
    public_model: str,
    stream: bool = False,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> dict | ChatStream:
    """An OpenAI chat.completion dict, or (stream=True) a ChatStream past its first content.

    `body` is the client's OpenAI request (not modified); `public_model` is the model name the
    client asked for, which every response and chunk carries. Raises ProviderError."""
    provider = PROVIDERS[d.provider]
    target, headers, payload = provider.chat_request(body, d, stream)
    if not stream:
        status, resp_headers, data = await _exchange(pool, d, target, headers, payload, timeout)
        return provider.chat_response(status, data, d, public_model, resp_headers)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    translator = provider.chat_stream(d, public_model, include_usage)
    try:
        resp = await pool.request(_POST, target, headers, payload, read_timeout=timeout)
    except UpstreamError as exc:
        raise transport_error(exc, d) from None
    if resp.status != 200:
        try:
            data = await resp.read()
        except UpstreamError as exc:
            raise transport_error(exc, d) from None
        finally:
            resp.release()
        raise provider.error(resp.status, data, d, resp.headers)
    chat_stream = ChatStream(resp, translator)
    try:
        await chat_stream._first_content()
    except BaseException:
        chat_stream.close()
        raise
    return chat_stream


async def embeddings(
    pool: UpstreamPool,
    d: Deployment,
    body: dict,
    public_model: str,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> dict:
    """An OpenAI embeddings list. Raises ProviderError (UNSUPPORTED for providers without)."""
    provider = PROVIDERS[d.provider]
    target, headers, payload = provider.embeddings_request(body, d)
    status, resp_headers, data = await _exchange(pool, d, target, headers, payload, timeout)
    return provider.embeddings_response(
        status, data, d, public_model, body.get("encoding_format"), resp_headers
    )


async def _exchange(
    pool: UpstreamPool,
    d: Deployment,
    target: bytes,
    headers: Any,
    payload: bytes,
    timeout: float | None,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    try:
        resp = await pool.request(_POST, target, headers, payload, read_timeout=timeout)
        try:
            data = await resp.read()
        finally:
            resp.release()
    except UpstreamError as exc:
        raise transport_error(exc, d) from None
    return resp.status, resp.headers, data


def transport_error(exc: UpstreamError, d: Deployment) -> ProviderError:
    """A failure to talk to the deployment at all: always worth trying another one.
    UpstreamError messages name the origin only, never headers, so they are safe to show."""
    if isinstance(exc, UpstreamTimeout):
        return ProviderError("UPSTREAM_TIMEOUT", f"{d.provider}: {exc}", status=504, retryable=True)
    if isinstance(exc, UpstreamConnectError):
        return ProviderError("UPSTREAM_CONNECT", f"{d.provider}: {exc}", status=502, retryable=True)
    return ProviderError("UPSTREAM_ERROR", f"{d.provider}: {exc}", status=502, retryable=True)


class ChatStream:
    """OpenAI chunk dicts from one streaming upstream response (see the module docstring).

    Iterate with `async for`; `close()` (idempotent, also done at the end or on error) gives
    the connection back or closes it. `usage` is the OpenAI usage dict, None if never told."""

    __slots__ = ("_resp", "_translator", "_pending", "_ended", "_started")

    def __init__(self, resp: UpstreamResponse, translator: StreamTranslator) -> None:
        self._resp: UpstreamResponse | None = resp
        self._translator = translator
        self._pending: deque[dict] = deque()
        self._ended = False
        self._started = False  # True once content was handed out: failures are StreamBroken then

    @property
    def usage(self) -> dict | None:
        return self._translator.usage

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> dict:
        pending = self._pending
        while not pending:
            if self._ended:
                raise StopAsyncIteration
            await self._pull()
        return pending.popleft()

    def close(self) -> None:
        resp = self._resp
        if resp is not None:
            self._resp = None
            resp.release()

    async def _first_content(self) -> None:
        """Read until a chunk with content is buffered (or the stream ended cleanly)."""
        pending = self._pending
        seen = 0
        while not self._ended:
            await self._pull()
            for i in range(seen, len(pending)):
                if _has_content(pending[i]):
                    self._started = True
                    return
            seen = len(pending)
        self._started = True

    async def _pull(self) -> None:
        """One upstream read, translated into pending chunks; errors mapped and the stream
        closed. Cancellation closes the connection too (a half-read response is never reused)."""
        resp = self._resp
        if resp is None:
            raise self._failure(ProviderError("UPSTREAM_ERROR", "stream already closed", retryable=True))
        translator = self._translator
        try:
            try:
                data = await resp.__anext__()
            except StopAsyncIteration:
                chunks = translator.close()
                self._ended = True
                self.close()
            else:
                chunks = translator.feed(data)
        except UpstreamError as exc:
            self.close()
            raise self._failure(transport_error(exc, translator.d)) from None
        except ProviderError as exc:
            self.close()
            raise self._failure(exc) from None
        except BaseException:
            self.close()
            raise
        self._pending.extend(chunks)

    def _failure(self, error: ProviderError) -> ProviderError:
        self._ended = True
        return StreamBroken(error) if self._started else error


def _has_content(chunk: dict) -> bool:
    choices = chunk.get("choices")
    if not choices:
        return chunk.get("usage") is not None
    for choice in choices:
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls"):
            return True
    return False
