"""The test server's semantic rules: questions whose right answers a test knows.

`ChatServer(semantic=SemanticRules(...))` answers the requests of the semantic operators
(``df.chat.filter``, ``join``, ``top_k``, ``aggregate``) by rules, not by hashes:

- **Yes or no.** A text is a match when it holds ``marker``, or when it holds two or more
  ``[key=...]`` tags (matches of ``key_pattern``) that are all equal (a pair, for a join).
  A request whose JSON Schema asks for ``{"answer": boolean}`` gets that answer; one that
  asks for ``logprobs`` also gets the token log-probabilities of ``true`` and ``false``,
  as OpenAI, vLLM and llama.cpp send them.
- **A cheap model.** For the model named ``cheap_model`` the answer is wrong on a seeded share
  ``cheap_error_rate`` of texts, and its confidence there is low (``cheap_unsure``); on a
  further share ``cheap_unsure_rate`` it is right but as unsure. Elsewhere it is sure.
- **Scores.** A schema asking for ``{"score": number}`` gets the number in the text's
  ``[score=N]`` tag (0 without one).
- **Summaries.** A plain-text request is answered ``count=N``: the number of ``marker``s in it
  plus every ``count=N`` it quotes, so a hierarchical reduce that loses or repeats a row gives
  a wrong total.
- **A context window.** A request whose messages hold more than ``context_tokens`` tokens
  (four characters a token) gets OpenAI's 400 ``context_length_exceeded``.

Embeddings (`EmbeddingBehaviour(topic=True)`, or a pattern): texts that share a key get
vectors near one another, so their nearest neighbours are the true matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SemanticRules", "matches", "score_of"]

KEY_TAG = re.compile(r"\[key=([^\]]+)\]")
SCORE_TAG = re.compile(r"\[score=(-?\d+(?:\.\d+)?)\]")
COUNT_TAG = re.compile(r"count=(\d+)")


@dataclass(frozen=True, kw_only=True)
class SemanticRules:
    """Rules the test server answers semantic questions by (see the module's docstring)."""

    marker: str = "<match>"
    cheap_model: str | None = None
    cheap_error_rate: float = 0.1
    cheap_unsure_rate: float = 0.05
    cheap_unsure: float = 0.6  # the cheap model's probability for its answer when unsure
    sure: float = 0.99
    context_tokens: int | None = None
    key_pattern: str = KEY_TAG.pattern  # what makes two texts the same thing (a join's pair)
    score_pattern: str = SCORE_TAG.pattern  # where a text's score is (top_k)
    logprobs: bool = True  # False: a server that sends none even when asked
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("cheap_error_rate", "cheap_unsure_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.5 <= self.cheap_unsure < self.sure <= 1.0:
            raise ValueError("need 0.5 <= cheap_unsure < sure <= 1")

    def too_long(self, messages: list[Any]) -> str | None:
        """OpenAI's words for a request over the context window, or None."""
        if self.context_tokens is None:
            return None
        tokens = sum(_tokens(_content(m)) for m in messages if isinstance(m, Mapping))
        if tokens <= self.context_tokens:
            return None
        return (
            f"This model's maximum context length is {self.context_tokens} tokens. However, "
            f"your messages resulted in {tokens} tokens. Please reduce the length of the messages."
        )

    def answer(
        self, model: Any, messages: list[Any], body: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any] | None]:
        """The reply's text and, when asked for, its ``logprobs``."""
        text = _user_text(messages)
        properties = _schema_properties(body.get("response_format"))
        if "score" in properties:
            return json.dumps({"score": score_of(text, self.score_pattern)}), None
        if "answer" in properties:
            truth, probability = self.judge(str(model), text)
            reply = json.dumps({"answer": truth})
            logprobs = (
                _logprobs(truth, probability) if self.logprobs and body.get("logprobs") else None
            )
            return reply, logprobs
        return f"count={_count(text, self.marker)}", None

    def judge(self, model: str, text: str) -> tuple[bool, float]:
        """The answer a model gives about ``text`` and the probability it puts on it."""
        truth = matches(text, self.marker, self.key_pattern)
        if model != self.cheap_model:
            return truth, self.sure
        draw = _draw(self.seed, text)
        if draw < self.cheap_error_rate:
            return not truth, self.cheap_unsure
        if draw < self.cheap_error_rate + self.cheap_unsure_rate:
            return truth, self.cheap_unsure
        return truth, self.sure


def matches(text: str, marker: str, key_pattern: str = KEY_TAG.pattern) -> bool:
    """The rule's answer: ``marker`` in the text, or two or more equal keys (``[key=...]``)."""
    if marker in text:
        return True
    keys = re.findall(key_pattern, text)
    return len(keys) >= 2 and len(set(keys)) == 1


def score_of(text: str, score_pattern: str = SCORE_TAG.pattern) -> float:
    """The number in the text's ``[score=N]`` tag (or ``score_pattern``'s group), 0 without."""
    found = re.search(score_pattern, text)
    return float(found.group(1)) if found else 0.0


def _count(text: str, marker: str) -> int:
    return text.count(marker) + sum(int(n) for n in COUNT_TAG.findall(text))


def _logprobs(truth: bool, probability: float) -> dict[str, Any]:
    chosen, other = ("true", "false") if truth else ("false", "true")
    top = [
        {"token": chosen, "logprob": math.log(probability), "bytes": list(chosen.encode())},
        {"token": other, "logprob": math.log(1.0 - probability), "bytes": list(other.encode())},
    ]
    # The answer's tokens as a tokenizer splits {"answer": true}: only one of them is a choice.
    pieces = ['{"', "answer", '":', " ", chosen, "}"]
    content = [
        {
            "token": piece,
            "logprob": top[0]["logprob"] if piece == chosen else 0.0,
            "bytes": list(piece.encode()),
            "top_logprobs": top if piece == chosen else [],
        }
        for piece in pieces
    ]
    return {"content": content}


def _draw(seed: int, text: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _schema_properties(response_format: Any) -> Mapping[str, Any]:
    if not isinstance(response_format, Mapping):
        return {}
    inner = response_format.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, Mapping) else response_format.get("schema")
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    return properties if isinstance(properties, Mapping) else {}


def _user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return _content(message)
    return ""


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def _tokens(text: str) -> int:
    return len(text) // 4 + 1
