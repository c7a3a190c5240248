"""Anthropic's Messages API (``POST {base_url}/v1/messages``): chat, and typed answers through
a forced tool call. One endpoint on the engine; the engine does everything else.

What differs from OpenAI's chat completions, and how it is met here:

- system messages go in the top-level ``system`` field; ``max_tokens`` is required, so a
  request without one gets `DEFAULT_MAX_TOKENS`; ``stop`` is sent as ``stop_sequences``;
  ``temperature``, ``top_p``, ``top_k`` pass through. OpenAI-only fields (``seed``,
  ``frequency_penalty``, ``response_format``, ...) are a `ConfigError` before anything is
  sent: the API would refuse every row with a 400;
- the answer is the text of the reply's content blocks. ``stop_reason: "max_tokens"`` is
  what OpenAI's ``finish_reason: "length"`` is: a chat answer keeps the cut text, a typed
  answer is `Truncated`. ``"refusal"`` is the row's outcome (`Refused`), billed once and not
  retried;
- with a schema (``extract``, ``classify``) the request carries one tool whose
  ``input_schema`` is the schema and ``tool_choice`` forces it; the tool call's ``input`` is
  checked against the schema, and one that does not fit is sent back as an ``is_error``
  ``tool_result`` (a re-ask), up to ``validation_retries`` times;
- prompt caching: the part of every request that is the same for each row (the tool, the
  system prompt) carries ``cache_control`` when it is long enough to be cached
  (`CACHE_MIN_TOKENS`); the reply's ``cache_read_input_tokens`` come back as the row's
  cached tokens, and usage is reported in OpenAI's shape so the engine, budgets and report
  read it as they read any other.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbtoolkit.core._rows import ChatRequest, estimate_tokens
from nbtoolkit.core.endpoints._base import (
    Answer,
    Item,
    Outcome,
    Parsed,
    Reask,
    cache_write_tokens,
    plain_json,
)
from nbtoolkit.core.endpoints._schema import AnswerMismatch, StructuredSchema
from nbtoolkit.core.store._cache import encode_body
from nbtoolkit.errors import (
    APIError,
    ConfigError,
    MalformedResponse,
    NoText,
    Refused,
    SchemaError,
    Truncated,
)

__all__ = ["CACHE_MIN_TOKENS", "DEFAULT_MAX_TOKENS", "AnthropicEndpoint"]

# What a request without max_tokens asks for (the API requires the field). Also what the
# budget and the token buckets reserve for each request until its reply says what it used.
DEFAULT_MAX_TOKENS = 1024
# The shortest prefix Anthropic caches (1,024 tokens for Opus and Sonnet, 2,048 for Haiku);
# a shorter one is sent without cache_control, which would only be ignored.
CACHE_MIN_TOKENS = 1024
# Body fields of OpenAI's API that the Messages API refuses (400 for every row).
OPENAI_ONLY = frozenset(
    {
        "seed", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
        "top_logprobs", "n", "response_format", "reasoning_effort", "parallel_tool_calls",
        "store", "modalities", "prediction", "verbosity", "min_p", "repeat_penalty",
    }
)  # fmt: skip
_EPHEMERAL = {"type": "ephemeral"}
_TOOL_DESCRIPTION = "Record the answer: call this with the fields the user's text gives."
_REASK = "The tool input does not match its schema: {problem}\nCall the tool again, corrected."
_TOOL_NAME = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(slots=True)
class AnthropicItem(Item):
    """A row for the Messages API, with the tokens of its answers that were sent back."""

    spent: tuple[int, int] = (0, 0)  # prompt, completion tokens of earlier (re-asked) answers


class AnthropicEndpoint:
    """``/v1/messages``: one row per request; text, or a schema's fields through a tool.

    Args:
        base_body: the model and the request parameters (OpenAI's names are translated).
        schema: for ``extract``/``classify``: the checked schema the forced tool takes.
        validation_retries: how many times a tool input that does not fit is sent back.

    Raises:
        ConfigError: a parameter the Messages API does not take.
    """

    path = "/v1/messages"
    max_items = 1
    max_request_tokens = math.inf
    binary_answers = False

    def __init__(
        self,
        base_body: Mapping[str, Any],
        *,
        schema: StructuredSchema | None = None,
        validation_retries: int = 0,
    ) -> None:
        body = translate(plain_json(dict(base_body), what="request parameters"))
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        self.base_body = body
        self.schema = schema
        self.validation_retries = validation_retries
        self.tool: dict[str, Any] | None = None
        if schema is not None:
            name = _TOOL_NAME.sub("_", schema.name)[:64] or "answer"
            self.tool = {
                "name": name,
                "description": _TOOL_DESCRIPTION,
                "input_schema": schema.strict,
            }
        self._tool_tokens = estimate_tokens(json.dumps(self.tool)) if self.tool else 0.0

    def item(self, index: int, request: ChatRequest) -> AnthropicItem:
        body = {**self.base_body, **translate(dict(request.params))}
        system = "\n\n".join(
            str(m.get("content", "")) for m in request.messages if m.get("role") == "system"
        )
        messages = [
            {"role": m.get("role"), "content": m.get("content")}
            for m in request.messages
            if m.get("role") != "system"
        ]
        # The prefix every row shares (tools, then system) is cached when long enough.
        cached = self._tool_tokens + estimate_tokens(system) >= CACHE_MIN_TOKENS
        tool = self.tool
        if tool is not None:
            mark = cached and not system
            body["tools"] = [{**tool, "cache_control": _EPHEMERAL} if mark else tool]
            body["tool_choice"] = {"type": "tool", "name": tool["name"]}
        if system:
            block: dict[str, Any] = {"type": "text", "text": system}
            body["system"] = [{**block, "cache_control": _EPHEMERAL}] if cached else system
        body["messages"] = messages
        return self._item(index, body, reasks=0, spent=(0, 0))

    def _item(
        self, index: int, body: dict[str, Any], *, reasks: int, spent: tuple[int, int]
    ) -> AnthropicItem:
        payload = encode_body(body)
        budget = body.get("max_tokens")
        completion = float(budget) if isinstance(budget, int) else float(DEFAULT_MAX_TOKENS)
        return AnthropicItem(
            index, body, payload, estimate_tokens(payload), completion, reasks=reasks, spent=spent
        )

    def payload(self, items: Sequence[Item]) -> bytes:
        return items[0].payload

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        # No item only for a batch result line that is none of this run's rows.
        item = items[0] if items else None
        spent = item.spent if isinstance(item, AnthropicItem) else (0, 0)
        try:
            reply = json.loads(text)
            content = reply["content"]
            if not isinstance(content, list):
                raise TypeError("content is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedResponse(f"reply is not an Anthropic message: {text[:200]!r}") from exc
        stop = reply.get("stop_reason")
        usage = openai_usage(reply.get("usage"))
        words = "".join(
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
        outcome: Outcome
        if stop == "refusal":
            outcome = Refused(f"the model refused (stop_reason: refusal) {words}".strip()[:500])
        elif self.schema is None:
            has_text = any(isinstance(b, dict) and b.get("type") == "text" for b in content)
            outcome = (
                Answer(words, words, *_counts(usage, spent), cache_write_tokens(usage or {}))
                if has_text
                else NoText(f"the reply has no text (stop_reason: {stop})")
            )
        else:
            outcome = self._typed(
                item if isinstance(item, AnthropicItem) else None, content, stop, usage
            )
        return Parsed([outcome], usage)

    def _typed(
        self,
        item: AnthropicItem | None,
        content: list[Any],
        stop: Any,
        usage: Mapping[str, Any] | None,
    ) -> Outcome:
        assert self.schema is not None
        assert self.tool is not None
        call = next(
            (b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"), None
        )
        if stop == "max_tokens":
            return Truncated(
                "the tool call was cut off at max_tokens before its input was complete; "
                "raise max_tokens"
            )
        if call is None or not isinstance(call.get("input"), dict):
            return NoText(f"the reply has no call of the tool (stop_reason: {stop})")
        answer = json.dumps(call["input"], ensure_ascii=False)
        try:
            value = self.schema.check(answer)
        except AnswerMismatch as exc:
            return self._reask(item, content, call, str(exc), usage)
        counts = _counts(usage, item.spent if item else (0, 0))
        return Answer(_dump(value), value, *counts, cache_write_tokens(usage or {}))

    def _reask(
        self,
        item: AnthropicItem | None,
        content: list[Any],
        call: Mapping[str, Any],
        problem: str,
        usage: Mapping[str, Any] | None,
    ) -> Outcome:
        reasks = item.reasks if item is not None else 0
        error = SchemaError(f"{problem} (after {reasks} re-asks)"[:500])
        if item is None or item.reasks >= self.validation_retries:
            return error
        result = {
            "type": "tool_result",
            "tool_use_id": call.get("id"),
            "content": _REASK.format(problem=problem),
            "is_error": True,
        }
        messages = [
            *item.body["messages"],
            {"role": "assistant", "content": content},
            {"role": "user", "content": [result]},
        ]
        prompt, completion, _ = _counts(usage, (0, 0))
        spent = (item.spent[0] + (prompt or 0), item.spent[1] + (completion or 0))
        body = {**item.body, "messages": messages}
        return Reask(error, self._item(item.index, body, reasks=item.reasks + 1, spent=spent))

    def decode(self, stored: str | bytes) -> Any:
        return stored if self.schema is None else json.loads(stored)

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        return error  # one way of sending a schema: nothing to change


def translate(params: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's request-field names in the Messages API's: ``stop`` -> ``stop_sequences``,
    ``max_completion_tokens`` -> ``max_tokens``.

    Raises:
        ConfigError: a field only OpenAI's API takes.
    """
    refused = sorted(OPENAI_ONLY & params.keys())
    if refused:
        raise ConfigError(
            f"{refused[0]!r} is an OpenAI request field that Anthropic's Messages API refuses; "
            "leave it out (the Messages API takes max_tokens, stop, temperature, top_p, top_k)"
        )
    out = dict(params)
    if "max_completion_tokens" in out:
        out.setdefault("max_tokens", out.pop("max_completion_tokens"))
    if "stop" in out:
        stop = out.pop("stop")
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop or ())
    return out


def openai_usage(raw: Any) -> dict[str, Any] | None:
    """An Anthropic ``usage`` in OpenAI's shape: prompt tokens are every input token (cache
    reads and writes included), cached tokens the cache reads."""
    if not isinstance(raw, Mapping):
        return None
    numbers = {
        name: value if isinstance(value, int) and not isinstance(value, bool) else 0
        for name, value in raw.items()
    }
    read = numbers.get("cache_read_input_tokens", 0)
    written = numbers.get("cache_creation_input_tokens", 0)
    return {
        "prompt_tokens": numbers.get("input_tokens", 0) + read + written,
        "completion_tokens": numbers.get("output_tokens", 0),
        "prompt_tokens_details": {"cached_tokens": read},
        "cache_creation_input_tokens": written,
    }


def _counts(
    usage: Mapping[str, Any] | None, spent: tuple[int, int]
) -> tuple[int | None, int | None, int | None]:
    if usage is None:
        return None, None, None
    details = usage.get("prompt_tokens_details") or {}
    return (
        int(usage["prompt_tokens"]) + spent[0],
        int(usage["completion_tokens"]) + spent[1],
        int(details.get("cached_tokens", 0)),
    )


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
