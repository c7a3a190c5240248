"""Answers whose length varies by row, with usage reported as a real provider reports it.

A cost estimate is only tested when answers are not all alike: real completion lengths are
long-tailed (most answers short, a few very long), reasoning models bill hidden reasoning
tokens as output, and a provider's prompt cache serves a repeated prefix at a discount.
`CompletionLengths` makes the test server do all three, reproducibly::

    ChatServer(lengths=CompletionLengths(median=60, reasoning_median=120, seed=3))

Each prompt draws its answer and reasoning lengths from log-normal distributions seeded by
(seed, prompt), so a row gets the same lengths in every run and in any arrival order. The
reply's ``usage`` is the truth about what the server did: ``completion_tokens`` is the
visible answer plus ``completion_tokens_details.reasoning_tokens``, both cut to the
request's ``max_tokens`` / ``max_completion_tokens`` (``finish_reason: "length"`` then),
and ``prompt_tokens_details.cached_tokens`` counts the prefix it served from its own
prompt cache.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_NORMAL = statistics.NormalDist()


@dataclass(frozen=True, kw_only=True)
class CompletionLengths:
    """Per-row completion lengths: log-normal, seeded, with optional reasoning tokens.

    Args:
        median: the median visible answer, in tokens.
        sigma: the log-normal's shape: 0.5 is a moderate tail, 1.0 a heavy one.
        reasoning_median: the median hidden reasoning, in tokens; 0: not a reasoning model.
        reasoning_sigma: the reasoning lengths' shape.
        cache_min_tokens: the shortest prefix the server's prompt cache keeps (OpenAI: 1,024).
        cache_step: cached prefixes count in steps of this many tokens (OpenAI: 128).
        seed: a different seed gives every row different lengths.
    """

    median: float = 60.0
    sigma: float = 0.5
    reasoning_median: float = 0.0
    reasoning_sigma: float = 0.6
    cache_min_tokens: int = 1024
    cache_step: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.median < 1 or self.reasoning_median < 0:
            raise ValueError("median must be >= 1 and reasoning_median >= 0 tokens")
        if self.sigma < 0 or self.reasoning_sigma < 0:
            raise ValueError("sigma and reasoning_sigma must be >= 0")

    def draw(self, prompt: str) -> tuple[int, int]:
        """(answer tokens, reasoning tokens) for a prompt, before any max_tokens cut."""
        first, second = _uniforms(f"{self.seed}\0{prompt}")
        answer = max(1, round(self.median * math.exp(self.sigma * _NORMAL.inv_cdf(first))))
        reasoning = 0
        if self.reasoning_median > 0:
            z = _NORMAL.inv_cdf(second)
            reasoning = max(1, round(self.reasoning_median * math.exp(self.reasoning_sigma * z)))
        return answer, reasoning


@dataclass
class SizedAnswers:
    """The server's side of `CompletionLengths`: answer texts, usage and its prompt cache."""

    lengths: CompletionLengths
    # Prefixes (every message before the last) the server has answered; later requests
    # that start with one are served it from cache, as a provider's prompt cache does.
    _seen_prefixes: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(
        self,
        *,
        prompt: str,
        prompt_tokens: int,
        prefix_tokens: int,
        prefix: bytes,
        body: Mapping[str, Any],
    ) -> tuple[str, str, dict[str, Any]]:
        """(text, finish_reason, usage) for one request."""
        answer, reasoning = self.lengths.draw(prompt)
        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            limit = None
        if limit is not None and reasoning + answer > limit:
            finish = "length"
            reasoning = min(reasoning, limit)
            answer = limit - reasoning
        cached = 0
        with self._lock:
            if prefix_tokens >= self.lengths.cache_min_tokens and prefix in self._seen_prefixes:
                step = self.lengths.cache_step
                cached = prefix_tokens // step * step
            self._seen_prefixes.add(prefix)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": answer + reasoning,
            "total_tokens": prompt_tokens + answer + reasoning,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
        return _text_of(answer), finish, usage


def _text_of(tokens: int) -> str:
    """A text the server's own count (len // 4 + 1) makes ``tokens`` long."""
    return "lorem ipsum " * ((tokens - 1) // 3) + "abcd" * ((tokens - 1) % 3)


def _uniforms(text: str) -> tuple[float, float]:
    """Two independent draws in (0, 1) that depend on nothing but ``text``."""
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    scale = 2.0**64
    return (
        (int.from_bytes(digest[:8], "big") + 0.5) / scale,
        (int.from_bytes(digest[8:], "big") + 0.5) / scale,
    )
