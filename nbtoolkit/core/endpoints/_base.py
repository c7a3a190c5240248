"""How rows become a request body, and a reply becomes row answers: one class per endpoint.

The engine owns everything that is the same for every endpoint (the worker pool, retries,
the rate governor, the breaker, budgets, dedupe, the cache, progress, interrupt safety). An
endpoint knows only its own wire format::

    item(index, request)  -> Item           one row, ready to send (and to hash for the cache)
    payload(items)        -> bytes          the body of one request for a group of rows
    parse(text, items)    -> Parsed         the reply, back as one outcome per row
    decode(stored)        -> value          a cached answer, back as the row's value
    on_error_reply(error, items) -> error   an error reply, made more precise; or None: the
                                            endpoint changed how it asks, send again at once
    binary_answers                          whether answers are bytes (vectors) or text

Every capability is declared here; the engine never probes an endpoint with ``getattr``.

A new endpoint is one class: chat (one row per request) is below; embeddings send up to
``max_items`` rows per request; structured output checks each answer and may ask again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from nbtoolkit.core._client import parse_completion
from nbtoolkit.core._rows import ChatRequest, estimate_tokens
from nbtoolkit.core.store._cache import MessagesBody, encode_body
from nbtoolkit.errors import APIError, ConfigError, NbToolkitError

# Completion tokens assumed for a request that sets no max_tokens: what the budget and the
# token bucket reserve for it until its reply says what it used.
DEFAULT_COMPLETION_TOKENS = 256


@dataclass(slots=True)
class Item:
    """One row on its way to the server."""

    index: int  # the row's position in the run
    body: dict[str, Any]  # chat: the whole request body; other endpoints: this row's part
    payload: bytes  # canonical JSON the cache key is the hash of (chat: the body as sent)
    prompt_tokens: float  # estimated
    completion_tokens: float  # the most the reply may use, or an estimate if not capped
    key: bytes | None = None  # set by the engine when a cache or dedupe needs it
    reasks: int = 0  # how many times this row's answer was sent back to be fixed
    # False: the request sets no max_tokens, completion_tokens is only an estimate, and a
    # hard budget reserves the model's output ceiling instead (core/_budget.py).
    capped: bool = True


@dataclass(frozen=True, slots=True)
class Answer:
    """A row's answer: what the cache keeps, and the value its column gets."""

    stored: str | bytes
    value: Any
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None  # prompt tokens written to the provider's cache


class Reask(NamedTuple):
    """An answer that failed its check, and the request that asks the model to fix it."""

    error: NbToolkitError
    item: Item


# Per row: an answer; an error that is the row's outcome (sent once, billed once, never
# retried: a refusal, a truncated or invalid answer); or a request to ask again.
Outcome = Answer | NbToolkitError | Reask


class Parsed(NamedTuple):
    """A reply: one outcome per row of the request, in the request's order, and its usage."""

    outcomes: list[Outcome]
    usage: Mapping[str, Any] | None


class Endpoint(Protocol):
    """What the engine needs to know about one kind of request."""

    path: str  # appended to the base URL: "/chat/completions", "/embeddings"
    max_items: int  # rows per request
    max_request_tokens: float  # estimated prompt tokens per request, at most
    # The cache keeps answers as bytes (vectors), not text: a look-up reads only that table.
    binary_answers: bool

    def item(self, index: int, request: Any) -> Item:
        """One row as an Item; raises (ValueError, TypeError) when it cannot be encoded."""
        ...

    def payload(self, items: Sequence[Item]) -> bytes:
        """The request body for a group of rows, encoded."""
        ...

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        """A 2xx reply as one outcome per row; raises MalformedResponse for an unusable one."""
        ...

    def decode(self, stored: str | bytes) -> Any:
        """A cached answer as the value its row gets."""
        ...

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        """An error reply to ``items``' request, before the engine retries or fails it.

        Returns:
            None when the endpoint now asks differently (structured output's next shape):
            the engine sends the request again at once, not as a retry. Otherwise the
            error to handle: ``error`` itself, or a more precise one (`SchemaRefused`).
        """
        ...


class ChatEndpoint:
    """``/chat/completions``: one row per request, its text as the answer."""

    path = "/chat/completions"
    max_items = 1
    max_request_tokens = math.inf
    binary_answers = False

    def __init__(self, base_body: Mapping[str, Any]) -> None:
        self.base_body = plain_json(dict(base_body), what="request parameters")
        # What every row without params of its own shares, worked out once.
        self._encoder = MessagesBody(self.base_body)
        self._completion = completion_budget(self.base_body)
        self._capped = is_capped(self.base_body)

    def item(self, index: int, request: ChatRequest) -> Item:
        messages = list(request.messages)
        if request.params:
            body = {**self.base_body, **request.params, "messages": messages}
            payload, completion = encode_body(body), completion_budget(body)
            capped = is_capped(body)
        else:
            body = {**self.base_body, "messages": messages}
            payload, completion = self._encoder.encode(messages), self._completion
            capped = self._capped
        # From the encoded body, not message by message: the same four characters a token,
        # plus the JSON's framing (a slight overestimate, corrected by the reply's usage),
        # at a fraction of the cost on a fully cached re-run, where every row is an item.
        return Item(index, body, payload, estimate_tokens(payload), completion, capped=capped)

    def payload(self, items: Sequence[Item]) -> bytes:
        return items[0].payload

    def parse(self, text: str, items: Sequence[Item]) -> Parsed:
        completion = parse_completion(text)
        usage = completion.usage or {}
        outcome: Outcome
        if completion.text is None:
            outcome = completion.no_text_error()
        else:
            outcome = Answer(completion.text, completion.text, *usage_counts(usage))
        return Parsed([outcome], completion.usage)

    def decode(self, stored: str | bytes) -> Any:
        return stored

    def on_error_reply(self, error: APIError, items: Sequence[Item]) -> APIError | None:
        return error  # one shape only: nothing to change


def completion_budget(body: Mapping[str, Any]) -> float:
    """The most completion tokens a chat request may use: its max_tokens, or the default."""
    completion = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(completion, int | float) and not isinstance(completion, bool):
        return float(completion)
    return float(DEFAULT_COMPLETION_TOKENS)


def is_capped(body: Mapping[str, Any]) -> bool:
    """Whether a chat request sets the most completion tokens its reply may use."""
    return any(
        isinstance(body.get(name), int | float) and not isinstance(body.get(name), bool)
        for name in ("max_tokens", "max_completion_tokens")
    )


def usage_counts(usage: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(prompt, completion, cached) tokens from a reply's ``usage``, None where absent."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return (
        _int_or_none(usage.get("prompt_tokens")),
        _int_or_none(usage.get("completion_tokens")),
        _int_or_none(cached),
    )


def cache_write_tokens(usage: Mapping[str, Any]) -> int:
    """The prompt tokens a reply wrote to the provider's prompt cache (Anthropic's
    ``cache_creation_input_tokens``, billed dearer than input); 0 where not said."""
    return _int_or_none(usage.get("cache_creation_input_tokens")) or 0


def reasoning_tokens(usage: Mapping[str, Any]) -> int:
    """The completion tokens a reply spent reasoning (billed as output, never shown)."""
    details = usage.get("completion_tokens_details")
    found = details.get("reasoning_tokens") if isinstance(details, Mapping) else None
    return _int_or_none(found) or 0


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plain_json(value: Any, *, what: str) -> Any:
    """``value`` with numpy scalars and arrays turned into plain numbers and lists.

    Raises:
        ConfigError: something in it JSON cannot carry (a set, an object, NaN), so that a
            run fails before its first request, not on every row.
    """
    converted = _plain(value)
    try:
        json.dumps(converted, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} cannot be sent as JSON: {exc}") from exc
    return converted


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    # numpy without importing it: its scalars and arrays know how to become Python values.
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value
