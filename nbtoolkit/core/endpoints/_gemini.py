"""The Gemini API: ``models/{model}:generateContent`` (chat and typed answers) and
``models/{model}:batchEmbedContents`` (vectors). Endpoints on the engine, nothing more.

What differs from OpenAI's API, and how it is met here:

- ``base_url`` is the API root, as google-genai takes it; ``/v1beta`` is added unless the
  root already ends in a version (``/v1beta``, ``/v1``). The key goes in ``x-goog-api-key``;
- system messages become ``systemInstruction``; the assistant's turns have role ``model``;
  OpenAI's fields go into ``generationConfig`` under Gemini's names (``max_tokens`` ->
  ``maxOutputTokens``, ``stop`` -> ``stopSequences``, ``top_p`` -> ``topP``, ...);
- the answer is the text of ``candidates[0].content.parts`` (thought parts left out);
  ``finishReason`` ``SAFETY``, ``RECITATION`` (and Gemini's other blocking reasons) and a
  prompt's ``promptFeedback.blockReason`` are the row's outcome (`Refused`), billed once,
  not retried; ``MAX_TOKENS`` is OpenAI's ``length``: chat keeps the cut text, a typed
  answer is `Truncated`;
- usage comes back in OpenAI's shape: prompt tokens, completion tokens with the thoughts
  (Gemini bills them as output, and says so in ``thoughtsTokenCount``), cached tokens;
- typed answers: ``responseMimeType: application/json`` and a ``responseSchema`` in the form
  Gemini's Schema object takes (`gemini_schema`: references inlined, ``additionalProperties``
  and other unknown keywords dropped, nullable types as ``nullable``); the answer is checked
  against the original schema, and re-asked when it does not fit, as for OpenAI.

Errors are read where every provider's are (`nbtoolkit.core._client`,
`nbtoolkit.core._retry`): ``RetryInfo.retryDelay`` in a 429's body is its wait, a daily
quota stops the run, and a 400 ``API_KEY_INVALID`` is a bad key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from nbtoolkit.core._rows import ChatRequest, estimate_tokens
from nbtoolkit.core.endpoints._base import (
    DEFAULT_COMPLETION_TOKENS,
    Answer,
    Item,
    Outcome,
    Parsed,
    Reask,
    plain_json,
)
from nbtoolkit.core.endpoints._embeddings import EmbeddingEndpoint, as_vector
from nbtoolkit.core.endpoints._gemini_schema import gemini_schema
from nbtoolkit.core.endpoints._schema import AnswerMismatch, StructuredSchema
from nbtoolkit.core.store._cache import encode_body
from nbtoolkit.errors import (
    APIError,
    ConfigError,
    IgnoredParameter,
    MalformedResponse,
    NoText,
    Refused,
    SchemaError,
    Truncated,
)

__all__ = ["GeminiEmbeddingEndpoint", "GeminiEndpoint"]

# Gemini's batchEmbedContents takes at most 100 texts per request.
MAX_EMBED_INPUTS = 100
# OpenAI's request fields -> generationConfig's.
_GENERATION = {
    "max_tokens": "maxOutputTokens",
    "max_completion_tokens": "maxOutputTokens",
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "stop": "stopSequences",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "n": "candidateCount",
}
OPENAI_ONLY = frozenset(
    {"response_format", "logit_bias", "reasoning_effort", "parallel_tool_calls", "store"}
)
# Finish reasons that block an answer: the row's outcome, not something to retry.
_BLOCKED = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
_REASK = (
    "That answer does not match the required JSON Schema: {problem}\n"
    "Reply again with only the corrected JSON object."
)


@dataclass(slots=True)
class GeminiItem(Item):
    """A row for generateContent, with the tokens of its answers that were sent back."""

    spent: tuple[int, int] = (0, 0)


def api_path(base_url: str, model: str, method: str) -> str:
    """``/v1beta/models/{model}:{method}``, without the version when the root has one."""
    root = urlsplit(base_url).path.rstrip("/")
    version = "" if root.endswith(("/v1beta", "/v1", "/v1alpha")) else "/v1beta"
    name = quote(model.removeprefix("models/"), safe="-._")
    return f"{version}/models/{name}:{method}"


class GeminiEndpoint:
    """``models/{model}:generateContent``: one row per request; text, or a schema's fields.

    Args:
        base_body: the model and the request parameters (OpenAI's names are translated).
        base_url: the API root, for the request path.
        schema: for ``extract``/``classify``: the checked schema.
        validation_retries: how many times an answer that does not fit is sent back.

    Raises:
        ConfigError: no model, or a parameter the Gemini API does not take.
    """

    max_items = 1
    max_request_tokens = math.inf
    binary_answers = False

    def __init__(
        self,
        base_body: Mapping[str, Any],
        *,
        base_url: str,
        schema: StructuredSchema | None = None,
        validation_retries: int = 0,
    ) -> None:
        body = plain_json(dict(base_body), what="request parameters")
        model = body.pop("model", None)
        if not isinstance(model, str) or not model:
            raise ConfigError("no model: pass model='gemini-2.5-flash' (or another Gemini model)")
        self.path = api_path(base_url, model, "generateContent")
        self.base_body = translate(body)
        self.schema = schema
        self.validation_retries = validation_retries
        if schema is not None:
            config = dict(self.base_body.get("generationConfig", {}))
            config["responseMimeType"] = "application/json"
            config["responseSchema"] = gemini_schema(schema.strict)
            self.base_body["generationConfig"] = config

    def item(self, index: int, request: ChatRequest) -> GeminiItem:
        body = {**self.base_body}
        extra = translate(dict(request.params))
        if extra:
            config = {**body.get("generationConfig", {}), **extra.pop("generationConfig", {})}
            body.update(extra)
            body["generationConfig"] = config
        system = "\n\n".join(
            str(m.get("content", "")) for m in request.messages if m.get("role") == "system"
        )
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        body["contents"] = [
            {
                "role": "model" if m.get("role") == "assistant" else "user",
                "parts": [{"text": m.get("content")}],
            }
            for m in request.messages
            if m.get("role") != "system"
        ]
        return self._item(index, body, reasks=0, spent=(0, 0))

    def _item(
        self, index: int, body: dict[str, Any], *, reasks: int, spent: tuple[int, int]
    ) -> GeminiItem:
        payload = encode_body(body)
        limit = body.get("generationConfig", {}).get("maxOutputTokens")
        completion = float(limit) if isinstance(limit, int) else float(DEFAULT_COMPLETION_TOKENS)
        return GeminiItem(
            index,
            body,
            payload,
            estimate_tokens(payload),
            completion,
            reasks=reasks,
            capped=isinstance(limit, int),
            spent=spent,
        )

    def payload(self, items: Sequence[Item]) -> bytes:
        return items[0].payload

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        # No item only for a batch result line that is none of this run's rows.
        item = items[0] if items else None
        spent = item.spent if isinstance(item, GeminiItem) else (0, 0)
        try:
            reply = json.loads(text)
            candidates = reply.get("candidates") or []
            if not isinstance(candidates, list):
                raise TypeError("candidates is not a list")
        except (ValueError, TypeError, AttributeError) as exc:
            raise MalformedResponse(f"reply is not a Gemini response: {text[:200]!r}") from exc
        usage = openai_usage(reply.get("usageMetadata"))
        blocked = (reply.get("promptFeedback") or {}).get("blockReason")
        if not candidates:
            if not blocked:
                raise MalformedResponse(f"reply has no candidates: {text[:200]!r}")
            return Parsed([Refused(f"the prompt was blocked (blockReason: {blocked})")], usage)
        candidate = candidates[0] if isinstance(candidates[0], dict) else {}
        finish = candidate.get("finishReason")
        parts = (candidate.get("content") or {}).get("parts") or []
        words = [
            p["text"]
            for p in parts
            if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
        ]
        answer = "".join(words)
        outcome: Outcome
        if finish in _BLOCKED:
            outcome = Refused(f"the answer was blocked (finishReason: {finish})")
        elif not words:
            outcome = NoText(f"the reply has no text (finishReason: {finish})")
        elif self.schema is None:
            outcome = Answer(answer, answer, *_counts(usage, spent))
        elif finish == "MAX_TOKENS":
            outcome = Truncated(
                "the answer was cut off at maxOutputTokens before the JSON was complete; "
                "raise max_tokens"
            )
        else:
            try:
                value = self.schema.check(answer)
            except AnswerMismatch as exc:
                mine = item if isinstance(item, GeminiItem) else None
                outcome = self._reask(mine, answer, str(exc), usage)
            else:
                outcome = Answer(_dump(value), value, *_counts(usage, spent))
        return Parsed([outcome], usage)

    def _reask(
        self, item: GeminiItem | None, answer: str, problem: str, usage: Mapping[str, Any] | None
    ) -> Outcome:
        reasks = item.reasks if item is not None else 0
        error = SchemaError(f"{problem} (after {reasks} re-asks)"[:500])
        if item is None or item.reasks >= self.validation_retries:
            return error
        contents = [
            *item.body["contents"],
            {"role": "model", "parts": [{"text": answer}]},
            {"role": "user", "parts": [{"text": _REASK.format(problem=problem)}]},
        ]
        prompt, completion, _ = _counts(usage, (0, 0))
        spent = (item.spent[0] + (prompt or 0), item.spent[1] + (completion or 0))
        body = {**item.body, "contents": contents}
        return Reask(error, self._item(item.index, body, reasks=item.reasks + 1, spent=spent))

    def decode(self, stored: str | bytes) -> Any:
        return stored if self.schema is None else json.loads(stored)

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        return error  # one way of sending a schema: nothing to change


class GeminiEmbeddingEndpoint(EmbeddingEndpoint):
    """``models/{model}:batchEmbedContents``: up to 100 texts per request, vectors in order.

    Items, cache keys and dedupe are `EmbeddingEndpoint`'s (one vector per model,
    dimensions and text); only the wire format differs. ``dimensions`` is sent as
    ``outputDimensionality``.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        dimensions: int | None = None,
        batch_size: int = MAX_EMBED_INPUTS,
        max_batch_tokens: float = math.inf,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model=model,
            dimensions=dimensions,
            batch_size=min(batch_size, MAX_EMBED_INPUTS),
            max_batch_tokens=max_batch_tokens,
            params=params,
        )
        self.path = api_path(base_url, model, "batchEmbedContents")
        self._model_name = "models/" + model.removeprefix("models/")

    def payload(self, items: Sequence[Item]) -> bytes:
        extra = {} if self.dimensions is None else {"outputDimensionality": self.dimensions}
        # Body fields (taskType, title) go with each text, as Gemini reads them.
        requests = [
            {
                **self.params,
                "model": self._model_name,
                "content": {"parts": [{"text": item.body["input"]}]},
                **extra,
            }
            for item in items
        ]
        return encode_body({"requests": requests})

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        try:
            embeddings = json.loads(text)["embeddings"]
            if not isinstance(embeddings, list):
                raise TypeError("embeddings is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedResponse(
                f"reply is not a Gemini embedding list: {text[:200]!r}"
            ) from exc
        if len(embeddings) != len(items):
            raise MalformedResponse(f"{len(items)} texts sent, {len(embeddings)} vectors received")
        outcomes: list[Outcome] = []
        for embedding in embeddings:
            values = embedding.get("values") if isinstance(embedding, dict) else None
            vector = as_vector(values)
            if self.dimensions is not None and vector.shape[0] != self.dimensions:
                raise IgnoredParameter(
                    f"asked for {self.dimensions} dimensions, the server sent vectors of "
                    f"{vector.shape[0]}: it ignored outputDimensionality"
                )
            vector = np.ascontiguousarray(vector, dtype=np.float32)
            outcomes.append(Answer(vector.tobytes(), vector))
        return Parsed(outcomes, None)


def translate(params: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's request fields as the Gemini API's: the generation ones in
    ``generationConfig``, under Gemini's names; anything else as it is.

    Raises:
        ConfigError: a field only OpenAI's API takes.
    """
    refused = sorted(OPENAI_ONLY & params.keys())
    if refused:
        raise ConfigError(
            f"{refused[0]!r} is an OpenAI request field the Gemini API refuses; leave it out "
            "(Gemini takes max_tokens, stop, temperature, top_p, top_k, seed, or "
            "generationConfig={...} in its own names)"
        )
    out: dict[str, Any] = {}
    config = dict(params.get("generationConfig") or {})
    for name, value in params.items():
        if name == "generationConfig":
            continue
        if name in _GENERATION:
            if name == "stop":
                value = [value] if isinstance(value, str) else list(value or ())
            config[_GENERATION[name]] = value
        else:
            out[name] = value
    if config:
        out["generationConfig"] = config
    return out


def openai_usage(raw: Any) -> dict[str, Any] | None:
    """Gemini's ``usageMetadata`` in OpenAI's shape (thoughts count as completion tokens)."""
    if not isinstance(raw, Mapping):
        return None

    def number(name: str) -> int:
        value = raw.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    thoughts = number("thoughtsTokenCount")
    return {
        "prompt_tokens": number("promptTokenCount"),
        "completion_tokens": number("candidatesTokenCount") + thoughts,
        "prompt_tokens_details": {"cached_tokens": number("cachedContentTokenCount")},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def _counts(
    usage: Mapping[str, Any] | None, spent: tuple[int, int]
) -> tuple[int | None, int | None, int | None]:
    if usage is None:
        return None, None, None
    return (
        int(usage["prompt_tokens"]) + spent[0],
        int(usage["completion_tokens"]) + spent[1],
        int(usage["prompt_tokens_details"]["cached_tokens"]),
    )


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
