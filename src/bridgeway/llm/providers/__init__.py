"""LLM provider wire formats: pure translation between OpenAI's format and each provider's.

    from bridgeway.llm.providers import Deployment, provider_for
    d = Deployment("anthropic", "claude-haiku-4-5", api_key=key)
    target, headers, body = provider_for(d).chat_request(openai_body, d, stream=False)

See `base` for the shape every provider module has.
"""

from __future__ import annotations

from bridgeway.llm.providers import anthropic, gemini, openai
from bridgeway.llm.providers.base import (
    Deployment,
    Provider,
    ProviderError,
    StreamBroken,
    StreamTranslator,
    tokens,
)

PROVIDERS: dict[str, Provider] = {"openai": openai, "anthropic": anthropic, "gemini": gemini}  # type: ignore[dict-item]


def provider_for(d: Deployment) -> Provider:
    return PROVIDERS[d.provider]


__all__ = [
    "PROVIDERS",
    "Deployment",
    "Provider",
    "ProviderError",
    "StreamBroken",
    "StreamTranslator",
    "provider_for",
    "tokens",
]
