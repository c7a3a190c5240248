"""Which endpoint a run uses: by method (chat, typed answers, embeddings) and by provider.

A provider is only a set of endpoints (`ChatConfig.provider`): OpenAI's chat completions and
embeddings (and every compatible server), Anthropic's Messages API, the Gemini API. The engine
runs any of them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nbtoolkit.config import ChatConfig
from nbtoolkit.core.endpoints._anthropic import DEFAULT_MAX_TOKENS, AnthropicEndpoint
from nbtoolkit.core.endpoints._base import ChatEndpoint, Endpoint
from nbtoolkit.core.endpoints._embeddings import EmbeddingEndpoint
from nbtoolkit.core.endpoints._gemini import GeminiEmbeddingEndpoint, GeminiEndpoint
from nbtoolkit.core.endpoints._judge import (
    JudgeEndpoint,
    ScoreEndpoint,
    WordedEndpoint,
    read_score,
    read_verdict,
    short_answer,
)
from nbtoolkit.core.endpoints._schema import StructuredSchema
from nbtoolkit.core.endpoints._structured import Structured, StructuredEndpoint
from nbtoolkit.errors import ConfigError

__all__ = [
    "chat_endpoint",
    "embedding_endpoint",
    "judge_endpoint",
    "provider_notes",
    "score_endpoint",
    "structured_endpoint",
]


def chat_endpoint(config: ChatConfig) -> Endpoint:
    """The chat endpoint of a resolved config's provider, with its model and params."""
    base = {"model": config.model, **config.params}
    if config.provider == "anthropic":
        return AnthropicEndpoint(base)
    if config.provider == "gemini":
        return GeminiEndpoint(base, base_url=str(config.base_url))
    return ChatEndpoint(base)


def judge_endpoint(config: ChatConfig, *, confidence: bool) -> Endpoint:
    """The yes/no endpoint of a resolved config's provider (``filter``, ``join``).

    OpenAI-compatible servers get the JSON schema and, with ``confidence``, logprobs; Anthropic
    and Gemini are asked in words through their own chat endpoints (no confidence).
    """
    if config.provider in ("anthropic", "gemini"):
        return WordedEndpoint(_short(config), read_verdict, what="a yes/no answer")
    return JudgeEndpoint({"model": config.model, **config.params}, confidence=confidence)


def score_endpoint(config: ChatConfig) -> Endpoint:
    """The 0-100 score endpoint of a resolved config's provider (``top_k``)."""
    if config.provider in ("anthropic", "gemini"):
        return WordedEndpoint(_short(config), read_score, what="a score")
    return ScoreEndpoint({"model": config.model, **config.params})


def _short(config: ChatConfig) -> Endpoint:
    """The provider's chat endpoint with a short answer's max_tokens unless one is set.

    Not on Gemini: its thinking models (2.5 and later) spend ``maxOutputTokens`` on thoughts
    first, and a short cap leaves an empty answer (``finishReason: MAX_TOKENS``) on every row.
    """
    if config.provider == "gemini":
        return chat_endpoint(config)
    return chat_endpoint(dataclasses.replace(config, params=short_answer(config.params)))


def structured_endpoint(
    config: ChatConfig,
    schema: StructuredSchema,
    *,
    structured: Structured,
    validation_retries: int,
) -> Endpoint:
    """The typed-answer endpoint of a resolved config's provider.

    ``structured`` picks among OpenAI's ways of sending a schema; Anthropic (a forced tool
    call) and Gemini (``responseSchema``) each have one way, and take only "auto".

    Raises:
        ConfigError: a ``structured`` shape the provider has no such thing as.
    """
    base = {"model": config.model, **config.params}
    if config.provider in ("anthropic", "gemini") and structured != "auto":
        raise ConfigError(
            f"structured={structured!r} is a way of sending a schema to OpenAI-compatible "
            f"servers; {config.provider} takes the schema its own way: leave structured= out"
        )
    if config.provider == "anthropic":
        return AnthropicEndpoint(base, schema=schema, validation_retries=validation_retries)
    if config.provider == "gemini":
        return GeminiEndpoint(
            base,
            base_url=str(config.base_url),
            schema=schema,
            validation_retries=validation_retries,
        )
    return StructuredEndpoint(
        base,
        schema,
        structured=structured,
        validation_retries=validation_retries,
        url=config.key_url("/chat/completions"),
    )


def embedding_endpoint(
    config: ChatConfig,
    *,
    dimensions: int | None,
    batch_size: int,
    max_batch_tokens: float,
    params: Mapping[str, Any] | None = None,
) -> Endpoint:
    """The embeddings endpoint of a resolved config's provider (``params``: body fields).

    Raises:
        ConfigError: Anthropic, which has no embeddings API; a bad option value.
    """
    if config.provider == "anthropic":
        raise ConfigError(
            "Anthropic has no embeddings API: embed with provider='openai' (or any "
            "OpenAI-compatible server: a local model, Azure, vLLM, Ollama) or provider='gemini'"
        )
    if config.provider == "gemini":
        return GeminiEmbeddingEndpoint(
            model=config.model or "",
            base_url=str(config.base_url),
            dimensions=dimensions,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            params=params,
        )
    return EmbeddingEndpoint(
        model=config.model or "",
        dimensions=dimensions,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        params=params,
    )


def provider_notes(config: ChatConfig) -> list[str]:
    """Lines for a run's summary: the defaults nbtoolkit chose for the provider."""
    params = config.params
    if config.provider == "anthropic" and not (
        {"max_tokens", "max_completion_tokens"} & params.keys()
    ):
        return [
            f"max_tokens: {DEFAULT_MAX_TOKENS} per request (Anthropic requires one; "
            "nbtoolkit's default: pass max_tokens= to change it)"
        ]
    return []
