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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from nbtoolkit.core._client import parse_completion
from nbtoolkit.core.endpoints._base import (
    Answer,
    ChatEndpoint,
    Endpoint,
    Item,
    Outcome,
    Parsed,
    usage_counts,
)
from nbtoolkit.core.endpoints._schema import unfenced
from nbtoolkit.errors import AnswerError, APIError

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
# Enough for {"answer": true} or {"score": 87.5}, where the request sets no limit of its own.
SHORT_ANSWER_TOKENS = 16


def short_answer(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` with a short answer's ``max_tokens``, unless it sets a limit itself: OpenAI's
    reasoning models refuse ``max_tokens`` beside ``max_completion_tokens`` (a 400 per row)."""
    if {"max_tokens", "max_completion_tokens"} & body.keys():
        return dict(body)
    return {"max_tokens": SHORT_ANSWER_TOKENS, **body}


INSTRUCTION = 'Answer with JSON only: {"answer": true} or {"answer": false}.'
_WORDS = {"true": True, "yes": True, "false": False, "no": False}


class Verdict(NamedTuple):
    """A row's answer, and the probability the model put on it (None: not known)."""

    answer: bool
    confidence: float | None


class JudgeEndpoint(ChatEndpoint):
    """``/chat/completions`` asked for a boolean per row."""

    def __init__(self, base_body: Mapping[str, Any], *, confidence: bool) -> None:
        body: dict[str, Any] = {**short_answer(base_body), "response_format": ANSWER_FORMAT}
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
    """True, False, or None when the text is neither a JSON verdict nor a plain yes or no.

    JSON in a Markdown code fence (a model asked in words often answers so) is read inside it.
    """
    stripped = unfenced(text).strip()
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
        super().__init__({**short_answer(base_body), "response_format": SCORE_FORMAT})

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
    """The number in a JSON ``{"score": n}`` or a bare number; None for anything else.

    JSON in a Markdown code fence is read inside it; a number sent as a string
    (``{"score": "87"}``, from a server that does not enforce the schema) is read as the
    number, as `read_answer` reads ``"true"``.
    """
    try:
        data = json.loads(unfenced(text).strip())
    except ValueError:
        return None
    if isinstance(data, Mapping):
        data = data.get("score")
    if isinstance(data, str):
        try:
            data = float(data.strip())
        except ValueError:
            return None
    if isinstance(data, int | float) and not isinstance(data, bool) and math.isfinite(data):
        return float(data)
    return None


def read_verdict(text: str) -> Verdict | None:
    """A text's yes or no as a `Verdict` without a confidence; None when it is neither."""
    answer = read_answer(text)
    return None if answer is None else Verdict(answer, None)


class WordedEndpoint:
    """A provider's own chat endpoint (Anthropic, Gemini) asked for a verdict or a score in words.

    Their APIs take no OpenAI ``response_format`` and give no token log-probabilities, so the
    instruction in the prompt asks for the JSON and the reply's text is read by ``read``
    (`read_verdict`, `read_score`). The model's text is what the cache keeps, as ``complete``
    keeps it for the same request.
    """

    def __init__(self, inner: Endpoint, read: Callable[[str], Any], *, what: str) -> None:
        self._inner, self._read, self._what = inner, read, what
        self.path = inner.path
        self.max_items = inner.max_items
        self.max_request_tokens = inner.max_request_tokens
        self.binary_answers = inner.binary_answers

    def item(self, index: int, request: Any) -> Item:
        return self._inner.item(index, request)

    def payload(self, items: Sequence[Item]) -> bytes:
        return self._inner.payload(items)

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        parsed = self._inner.parse(text, items)
        return Parsed([self._read_outcome(outcome) for outcome in parsed.outcomes], parsed.usage)

    def _read_outcome(self, outcome: Outcome) -> Outcome:
        if not isinstance(outcome, Answer) or not isinstance(outcome.stored, str):
            return outcome
        value = self._read(outcome.stored)
        if value is None:
            return AnswerError(f"not {self._what}: {outcome.stored[:100]!r}")
        return Answer(
            outcome.stored,
            value,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.cached_tokens,
        )

    def decode(self, stored: str | bytes) -> Any:
        text = stored.decode("utf-8", errors="replace") if isinstance(stored, bytes) else stored
        return self._read(text)

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        return self._inner.on_error_reply(error, items)
