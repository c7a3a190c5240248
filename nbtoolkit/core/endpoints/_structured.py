"""Structured output: a chat request that carries a schema, and an answer checked against it.

`StructuredEndpoint` is the chat endpoint plus three things:

- the schema travels in ``response_format`` in one of three *shapes* (`Shape`). With
  ``structured="auto"`` the first is OpenAI's ``json_schema``; a server that cannot take it
  (llama.cpp's HTTP 500 "Input should be 'text' or 'json_object'", or a gateway's 400 "'json_schema'
  is not supported with this model") moves the run to the next shape, ``json_object`` with
  a ``schema`` (which llama.cpp turns into a grammar), then ``prompt`` (the schema in a
  system message). The engine resends a refused request at once (`on_error_reply`); the
  requests already in flight, at most ``max_parallel``, are the cost. The shape is
  remembered per (URL, model) in a `ShapeMemory`, so one model's limits never move another's.
- a provider that takes ``json_schema`` but refuses *this schema* (OpenAI strict mode's "Invalid
  schema for response_format ...: 'minLength' is not permitted") is not a server without
  JSON mode: nothing is downgraded, and the run stops with `SchemaRefused`, the provider's
  words and the keyword it named.
- every answer is checked; one that does not fit is sent back with the validator's message
  (a `Reask`), up to ``validation_retries`` times, then the row fails with `SchemaError`.
- the cache keeps the checked fields as JSON, and a cached answer comes back as them.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from nbtoolkit.core._client import parse_completion
from nbtoolkit.core._rows import ChatRequest, estimate_tokens
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
from nbtoolkit.errors import APIError, ConfigError, SchemaError, SchemaRefused, Truncated


class Shape(StrEnum):
    """How the schema travels in the request."""

    JSON_SCHEMA = "json_schema"  # OpenAI, vLLM: {"type": "json_schema", "json_schema": {...}}
    JSON_OBJECT = "json_object"  # llama.cpp: {"type": "json_object", "schema": {...}}
    PROMPT = "prompt"  # no JSON mode: the schema in a system message


Structured = Literal["auto", "json_schema", "json_object", "prompt"]
STRUCTURED_CHOICES = ("auto", "json_schema", "json_object", "prompt")

# After a refusal of one shape, the next to try.
_FALLBACK = {Shape.JSON_SCHEMA: Shape.JSON_OBJECT, Shape.JSON_OBJECT: Shape.PROMPT}
_ORDER = (Shape.JSON_SCHEMA, Shape.JSON_OBJECT, Shape.PROMPT)
# What a server says when it does not know a response_format shape (lower case).
_REFUSAL_WORDS = ("response_format", "json_schema", "input should be 'text' or 'json_object'")
# What a provider says about a schema it will not take (lower case, after removing the words
# "json_schema" and "response_format", which name the shape, not the schema).
_SCHEMA_REFUSAL_WORDS = (
    "invalid schema",
    "schema is invalid",
    "invalid json schema",
    "unsupported schema",
    "unrecognized schema",
    "schema conversion failed",
)
# "'minLength' is not permitted" / "`format` is not supported" / "\"pattern\" is not allowed"
_KEYWORD_REFUSED = re.compile(
    r"""['"`](\$?[A-Za-z]+)['"`]\s+(?:is|are)\s+not\s+(?:permitted|supported|allowed)"""
)
# Words that, in a refusal, make a quoted keyword of ours the one refused.
_NAMES_A_KEYWORD = ("not permitted", "not supported", "unsupported", "invalid schema")
_QUOTED = re.compile(r"""['"`](\$?[A-Za-z]+)['"`]""")
# Keywords too common in any message to name the one a provider refused.
_GENERIC_KEYWORDS = frozenset({"type", "properties", "json_schema", "json_object", "text"})
# Under these keywords are names (of properties, definitions), not keywords.
_NAME_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


class ShapeMemory:
    """The structured-output shape each server needed, per (URL, model).

    Scope: `LEARNED_SHAPES` is the process's, shared by every ``structured="auto"`` run in
    it (and its threads: a lock guards it), so the second run against a server that cannot
    take ``json_schema`` starts in the shape that worked instead of paying up to
    ``max_parallel`` refused requests again. It holds only what a server said it cannot do
    (a shape refusal), never a refusal of one schema, and only for that (URL, model): a
    gateway's other models are unaffected. `forget` (or `forget_learned_shapes`) clears it,
    for a server that was upgraded; a run given its own ``ShapeMemory()`` learns alone.
    """

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, str], Shape] = {}
        self._lock = threading.Lock()

    def shape(self, url: str, model: str) -> Shape:
        """The first shape to try for ``model`` at ``url``: json_schema unless learned."""
        with self._lock:
            return self._shapes.get((url, model), Shape.JSON_SCHEMA)

    def learn(self, url: str, model: str, shape: Shape) -> None:
        """Remember that ``model`` at ``url`` needs ``shape`` (or a later one)."""
        with self._lock:
            known = self._shapes.get((url, model), Shape.JSON_SCHEMA)
            self._shapes[(url, model)] = max(known, shape, key=_ORDER.index)

    def forget(self) -> None:
        """Forget every learned shape."""
        with self._lock:
            self._shapes.clear()


LEARNED_SHAPES = ShapeMemory()
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
        url: the server's chat-completions URL as cache keys see it (no query); with the
            model, what an "auto" run remembers its shape under.
        memory: where learned shapes are kept; default the process's `LEARNED_SHAPES`.
    """

    path = "/chat/completions"
    max_items = 1
    max_request_tokens = math.inf
    binary_answers = False

    def __init__(
        self,
        base_body: Mapping[str, Any],
        schema: StructuredSchema,
        *,
        structured: Structured,
        validation_retries: int,
        url: str,
        memory: ShapeMemory | None = None,
    ) -> None:
        if "response_format" in base_body:
            raise ConfigError("extract and classify set response_format themselves; drop it")
        self.base_body = plain_json(dict(base_body), what="request parameters")
        self.schema = schema
        self.validation_retries = validation_retries
        self.auto = structured == "auto"
        self.url = url
        self.model = str(self.base_body.get("model") or "")
        self.memory = memory if memory is not None else LEARNED_SHAPES
        self.shape = self.memory.shape(url, self.model) if self.auto else Shape(structured)
        self._keywords = schema_keywords(schema.strict)
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
        self._schema_tokens = estimate_tokens(schema_json)

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
            estimate_tokens(raw) + self._schema_tokens,
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

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        """An error reply: None when this endpoint now sends the request in another shape
        (send it again at once, not as a retry); `SchemaRefused` when the provider refuses
        the schema itself; else the error as it came."""
        refusal = _refusal(error, self._keywords)
        if refusal is None:
            return error  # any other error (a 429, a 503) takes the engine's usual path
        if refusal.schema:
            return _schema_refused(error, refusal.keyword)
        item = items[0]
        if not self.auto or not isinstance(item, StructuredItem) or item.sent is None:
            return error
        if item.sent is not self.shape:
            return None  # sent before another request moved the run on: resend as it is now
        if self.shape not in _FALLBACK:
            return error
        self.shape = _FALLBACK[self.shape]
        self.memory.learn(self.url, self.model, self.shape)
        return None

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


class _Refusal(NamedTuple):
    schema: bool  # True: this schema is refused; False: the shape (JSON mode) is
    keyword: str | None  # the schema keyword the provider named


def _refusal(error: APIError, keywords: frozenset[str]) -> _Refusal | None:
    """What a 400/422/500 refuses: the schema (naming a keyword of it, or saying the schema
    is invalid), the response_format shape, or neither (None)."""
    if error.status not in (400, 422, 500):
        return None
    raw = f"{error} {error.body}"
    text = raw.lower()
    keyword = _offending_keyword(raw, keywords)
    rest = text.replace("json_schema", "").replace("response_format", "")
    if keyword is not None or any(words in rest for words in _SCHEMA_REFUSAL_WORDS):
        return _Refusal(schema=True, keyword=keyword)
    if any(word in text for word in _REFUSAL_WORDS):
        return _Refusal(schema=False, keyword=None)
    return None


def _offending_keyword(text: str, keywords: frozenset[str]) -> str | None:
    """The keyword of our schema a provider's message refuses, if it names one."""
    for match in _KEYWORD_REFUSED.finditer(text):
        if match.group(1) in keywords:
            return match.group(1)
    lowered = text.lower()
    if not any(
        w in lowered for w in ("not permitted", "not supported", "unsupported", "invalid schema")
    ):
        return None
    candidates = keywords - _GENERIC_KEYWORDS
    return next((m.group(1) for m in _QUOTED.finditer(text) if m.group(1) in candidates), None)


def _schema_refused(error: APIError, keyword: str | None) -> SchemaRefused:
    named = f" (its {keyword!r} keyword)" if keyword else ""
    return SchemaRefused(
        f"the provider refuses this schema{named}, not JSON mode: {error}"[:600],
        status=error.status,
        body=error.body,
        keyword=keyword,
    )


def schema_keywords(schema: Any) -> frozenset[str]:
    """Every JSON Schema keyword used in ``schema`` (not property or definition names)."""
    found: set[str] = set()
    stack: list[tuple[Any, bool]] = [(schema, False)]
    while stack:
        node, names = stack.pop()
        if isinstance(node, Mapping):
            for key, value in node.items():
                if not names:
                    found.add(str(key))
                stack.append((value, not names and key in _NAME_MAPS))
        elif isinstance(node, list):
            stack.extend((value, False) for value in node)
    return frozenset(found)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def forget_learned_shapes() -> None:
    """Forget which shape each server needed (tests; a server that was upgraded)."""
    LEARNED_SHAPES.forget()
