"""Yes-or-no questions: a JSON boolean per row and, where the server gives them, its confidence.

The semantic operators (``filter``, ``join``) ask one question per row or pair. The answer is
constrained to ``{"answer": true|false}`` (a JSON Schema, as structured output is); a server
that ignores the schema and says "yes" or "no" is understood too. With ``confidence=True`` the
request asks for token log-probabilities (``logprobs``, ``top_logprobs``), which OpenAI, vLLM
and llama.cpp's server return; the probability of the answer given is then
``P(chosen) / (P(true) + P(false))`` at the token that decided it. A server that sends none
leaves the confidence None, and the cascade that needs it says so instead of guessing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from nbtoolkit.core._client import parse_completion
from nbtoolkit.core.endpoints._base import Answer, ChatEndpoint, Item, Outcome, Parsed, usage_counts
from nbtoolkit.errors import AnswerError

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "boolean"}},
    "required": ["answer"],
    "additionalProperties": False,
}
ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "strict": True, "schema": ANSWER_SCHEMA},
}
INSTRUCTION = 'Answer with JSON only: {"answer": true} or {"answer": false}.'
_WORDS = {"true": True, "yes": True, "false": False, "no": False}


class Verdict(NamedTuple):
    """A row's answer, and the probability the model put on it (None: not known)."""

    answer: bool
    confidence: float | None


class JudgeEndpoint(ChatEndpoint):
    """``/chat/completions`` asked for a boolean per row."""

    def __init__(self, base_body: Mapping[str, Any], *, confidence: bool) -> None:
        body: dict[str, Any] = {"max_tokens": 16, **base_body, "response_format": ANSWER_FORMAT}
        if confidence:
            body |= {"logprobs": True, "top_logprobs": 5}
        super().__init__(body)

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        completion = parse_completion(text)
        usage = completion.usage or {}
        outcome: Outcome
        if completion.text is None:
            outcome = completion.no_text_error()
        else:
            answer = read_answer(completion.text)
            if answer is None:
                outcome = AnswerError(f"not a yes/no answer: {completion.text[:100]!r}")
            else:
                verdict = Verdict(answer, _confidence(text, answer))
                stored = json.dumps(verdict._asdict())
                outcome = Answer(stored, verdict, *usage_counts(usage))
        return Parsed([outcome], completion.usage)

    def decode(self, stored: str | bytes) -> Any:
        data = json.loads(stored)
        return Verdict(bool(data["answer"]), data.get("confidence"))


def read_answer(text: str) -> bool | None:
    """True, False, or None when the text is neither a JSON verdict nor a plain yes or no."""
    stripped = text.strip()
    try:
        data = json.loads(stripped)
    except ValueError:
        word = stripped.strip(".!\"' \n").lower()
        return _WORDS.get(word)
    if isinstance(data, Mapping):
        data = data.get("answer")
    if isinstance(data, bool):
        return data
    return _WORDS.get(data.lower()) if isinstance(data, str) else None


def _confidence(reply: str, answer: bool) -> float | None:
    """P(answer) at the token that decided it, from the reply's logprobs; None without them."""
    try:
        content = json.loads(reply)["choices"][0]["logprobs"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, list):
        return None
    for token in content:
        if not isinstance(token, Mapping):
            continue
        word = str(token.get("token", "")).strip().strip('"').lower()
        if _WORDS.get(word) is None:
            continue
        chances = {True: 0.0, False: 0.0}
        for option in token.get("top_logprobs") or [token]:
            if not isinstance(option, Mapping):
                continue
            said = _WORDS.get(str(option.get("token", "")).strip().strip('"').lower())
            logprob = option.get("logprob")
            if said is not None and isinstance(logprob, int | float):
                chances[said] += math.exp(logprob)
        total = chances[True] + chances[False]
        return chances[answer] / total if total > 0 else None
    return None


SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "number"}},
    "required": ["score"],
    "additionalProperties": False,
}
SCORE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "score", "strict": True, "schema": SCORE_SCHEMA},
}


class ScoreEndpoint(ChatEndpoint):
    """``/chat/completions`` asked for a number per row (``{"score": 7.5}``), for ``top_k``."""

    def __init__(self, base_body: Mapping[str, Any]) -> None:
        super().__init__({"max_tokens": 16, **base_body, "response_format": SCORE_FORMAT})

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        completion = parse_completion(text)
        usage = completion.usage or {}
        outcome: Outcome
        if completion.text is None:
            outcome = completion.no_text_error()
        else:
            score = read_score(completion.text)
            if score is None:
                outcome = AnswerError(f"not a score: {completion.text[:100]!r}")
            else:
                outcome = Answer(repr(score), score, *usage_counts(usage))
        return Parsed([outcome], completion.usage)

    def decode(self, stored: str | bytes) -> Any:
        return float(stored)


def read_score(text: str) -> float | None:
    """The number in a JSON ``{"score": n}`` or a bare number; None for anything else."""
    try:
        data = json.loads(text.strip())
    except ValueError:
        return None
    if isinstance(data, Mapping):
        data = data.get("score")
    if isinstance(data, int | float) and not isinstance(data, bool) and math.isfinite(data):
        return float(data)
    return None
