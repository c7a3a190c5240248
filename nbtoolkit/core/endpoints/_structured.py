"""Structured output: a chat request that carries a schema, and an answer checked against it.

`StructuredEndpoint` is the chat endpoint plus three things:

- the schema travels in ``response_format`` in one of three *shapes* (`Shape`). With
  ``structured="auto"`` the first is OpenAI's ``json_schema``; a server that refuses it the
  way llama.cpp's does (HTTP 500 "Input should be 'text' or 'json_object'") moves the run to
  the next shape, ``json_object`` with a ``schema`` (which llama.cpp turns into a grammar),
  then ``prompt`` (the schema in a system message). The engine resends a refused request at
  once (`reshape`); the requests already in flight, at most ``max_parallel``, are the cost.
  The shape a server needed is remembered per base URL for the rest of the process.
- every answer is checked; one that does not fit is sent back with the validator's message
  (a `Reask`), up to ``validation_retries`` times, then the row fails with `SchemaError`.
- the cache keeps the checked fields as JSON, and a cached answer comes back as them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from nbtoolkit.core._client import parse_completion
from nbtoolkit.core._limits import estimate_tokens
from nbtoolkit.core._rows import ChatRequest
from nbtoolkit.core.endpoints._base import (
    Answer,
    Item,
    Outcome,
    Parsed,
    Reask,
    completion_budget,
    is_capped,
    plain_json,
    usage_counts,
)
from nbtoolkit.core.endpoints._schema import AnswerMismatch, StructuredSchema
from nbtoolkit.core.store._cache import encode_body
from nbtoolkit.errors import APIError, ConfigError, SchemaError, Truncated


class Shape(StrEnum):
    """How the schema travels in the request."""

    JSON_SCHEMA = "json_schema"  # OpenAI, vLLM: {"type": "json_schema", "json_schema": {...}}
    JSON_OBJECT = "json_object"  # llama.cpp: {"type": "json_object", "schema": {...}}
    PROMPT = "prompt"  # no JSON mode: the schema in a system message


Structured = Literal["auto", "json_schema", "json_object", "prompt"]
STRUCTURED_CHOICES = ("auto", "json_schema", "json_object", "prompt")

# After a refusal of one shape, the next to try.
_FALLBACK = {Shape.JSON_SCHEMA: Shape.JSON_OBJECT, Shape.JSON_OBJECT: Shape.PROMPT}
# The shape each server (base URL) needed, learned by an "auto" run: the next run starts there.
_LEARNED: dict[str, Shape] = {}
# What a server says when it does not know a response_format shape (lower case).
_REFUSAL_WORDS = ("response_format", "json_schema", "input should be 'text' or 'json_object'")
_PROMPT_INSTRUCTION = (
    "Answer with one JSON object and nothing else. It must match this JSON Schema:\n"
)
_REASK = (
    "That answer does not match the required JSON Schema: {problem}\n"
    "Reply again with only the corrected JSON object."
)


@dataclass(slots=True)
class StructuredItem(Item):
    """A row with a schema: its body without ``response_format``, which is added at send time."""

    raw: bytes = b""  # the body without response_format, encoded
    sent: Shape | None = None  # the shape this row's last request went out in
    spent: tuple[int, int] = (0, 0)  # prompt, completion tokens of its answers sent back


class StructuredEndpoint:
    """``/chat/completions`` with a schema; answers are checked, and re-asked when wrong.

    Args:
        base_body: the model and the request parameters.
        schema: the checked schema (`nbtoolkit.core.endpoints._schema.normalise`).
        structured: "auto", or the one shape to use.
        validation_retries: how many times an answer that does not fit is sent back.
        base_url: the server's base URL, under which an "auto" run remembers its shape.
    """

    path = "/chat/completions"
    max_items = 1
    max_request_tokens = math.inf

    def __init__(
        self,
        base_body: Mapping[str, Any],
        schema: StructuredSchema,
        *,
        structured: Structured,
        validation_retries: int,
        base_url: str,
    ) -> None:
        if "response_format" in base_body:
            raise ConfigError("extract and classify set response_format themselves; drop it")
        self.base_body = plain_json(dict(base_body), what="request parameters")
        self.schema = schema
        self.validation_retries = validation_retries
        self.auto = structured == "auto"
        self.base_url = base_url
        self.shape = _LEARNED.get(base_url, Shape.JSON_SCHEMA) if self.auto else Shape(structured)
        schema_json = encode_body(schema.strict)
        self._formats = {
            Shape.JSON_SCHEMA: b'{"type":"json_schema","json_schema":{"name":'
            + json.dumps(schema.name).encode()
            + b',"schema":'
            + schema_json
            + b',"strict":true}}',
            Shape.JSON_OBJECT: b'{"type":"json_object","schema":' + schema_json + b"}",
        }
        # The cache key holds the schema but not the shape: the shape is how the question is
        # put to one server, not what is asked, and every answer is checked against the same
        # schema whatever the shape. So a run that switched shape halfway, or the next run
        # that starts in the learned shape, finds every answer already bought.
        self._key_suffix = b',"nbtoolkit_schema":' + schema_json + b"}"
        self._prompt_system = _PROMPT_INSTRUCTION + json.dumps(schema.strict, ensure_ascii=False)
        # Servers count the schema as prompt tokens (OpenAI injects it); so does the estimate.
        self._schema_tokens = len(schema_json) / 4

    def item(self, index: int, request: ChatRequest) -> StructuredItem:
        body = {**self.base_body, **request.params, "messages": list(request.messages)}
        return self._item(index, body, reasks=0, spent=(0, 0))

    def _item(
        self, index: int, body: dict[str, Any], *, reasks: int, spent: tuple[int, int]
    ) -> StructuredItem:
        raw = encode_body(body)
        return StructuredItem(
            index,
            body,
            raw[:-1] + self._key_suffix,
            estimate_tokens(body["messages"], 0) + self._schema_tokens,
            completion_budget(body),
            reasks=reasks,
            capped=is_capped(body),
            raw=raw,
            spent=spent,
        )

    def payload(self, items: Sequence[Item]) -> bytes:
        item = items[0]
        assert isinstance(item, StructuredItem)
        # Built at send time from the run's current shape: rows queued before a switch go
        # out in the new shape.
        shape = self.shape
        item.sent = shape
        if shape is Shape.PROMPT:
            return encode_body({**item.body, "messages": self._prompt_messages(item.body)})
        return item.raw[:-1] + b',"response_format":' + self._formats[shape] + b"}"

    def _prompt_messages(self, body: Mapping[str, Any]) -> list[Any]:
        messages = list(body["messages"])
        if messages and messages[0].get("role") == "system":
            first = messages[0]
            joined = f"{first.get('content', '')}\n\n{self._prompt_system}"
            return [{**first, "content": joined}, *messages[1:]]
        return [{"role": "system", "content": self._prompt_system}, *messages]

    def reshape(self, error: APIError, items: Sequence[Item]) -> bool:
        """Called by the engine on an error reply: True when this endpoint now sends that
        request in another shape, so it should go again at once (not as a retry)."""
        item = items[0]
        if not self.auto or not isinstance(item, StructuredItem) or item.sent is None:
            return False
        if not _refuses_shape(error):
            return False  # any other error (a 429, a 503) takes the engine's usual path
        if item.sent is not self.shape:
            return True  # sent before another request moved the run on: resend as it is now
        if self.shape not in _FALLBACK:
            return False
        self.shape = _FALLBACK[self.shape]
        _LEARNED[self.base_url] = self.shape
        return True

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        completion = parse_completion(text)
        item = items[0]
        assert isinstance(item, StructuredItem)
        usage = completion.usage or {}
        prompt, completion_tokens, cached = usage_counts(usage)
        outcome: Outcome
        if completion.text is None:
            outcome = completion.no_text_error()
        elif completion.finish_reason == "length":
            outcome = Truncated(
                "the answer was cut off at max_tokens before the JSON was complete; "
                "raise max_tokens"
            )
        else:
            try:
                value = self.schema.check(completion.text)
            except AnswerMismatch as exc:
                outcome = self._reask(item, completion.text, str(exc), prompt, completion_tokens)
            else:
                spent_prompt, spent_completion = item.spent
                outcome = Answer(
                    _dump(value),
                    value,
                    None if prompt is None else prompt + spent_prompt,
                    None if completion_tokens is None else completion_tokens + spent_completion,
                    cached,
                )
        return Parsed([outcome], completion.usage)

    def _reask(
        self,
        item: StructuredItem,
        answer: str,
        problem: str,
        prompt: int | None,
        completion: int | None,
    ) -> Outcome:
        error = SchemaError(f"{problem} (after {item.reasks} re-asks)"[:500])
        if item.reasks >= self.validation_retries:
            return error
        messages = [
            *item.body["messages"],
            {"role": "assistant", "content": answer},
            {"role": "user", "content": _REASK.format(problem=problem)},
        ]
        spent = (item.spent[0] + (prompt or 0), item.spent[1] + (completion or 0))
        follow_up = self._item(
            item.index, {**item.body, "messages": messages}, reasks=item.reasks + 1, spent=spent
        )
        return Reask(error, follow_up)

    def decode(self, stored: str | bytes) -> Any:
        return json.loads(stored)


def _refuses_shape(error: APIError) -> bool:
    """A 400/422/500 whose message says the server does not take this response_format."""
    if error.status not in (400, 422, 500):
        return False
    text = f"{error} {error.body}".lower()
    return any(word in text for word in _REFUSAL_WORDS)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def forget_learned_shapes() -> None:
    """Forget which shape each server needed (tests; a server that was upgraded)."""
    _LEARNED.clear()
