"""The values a run passes around: requests in, one result per row out, and running counts.

Plain data, shared by the engine, the progress bar and the report; nothing here does I/O.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One row's request: the messages and any per-row body fields."""

    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RowError:
    """Why a row has no answer.

    ``kind`` is the exception class name (``RateLimitError``, ``RequestTimeout``, ...), one
    of `NOT_SENT_KINDS`: ``skipped`` (nothing to send: empty prompt), ``not_run`` (the
    run stopped first), ``cancelled`` (in flight when the run stopped, or its batch was
    cancelled first) and ``over_budget`` (``max_cost`` / ``max_tokens_total`` was reached
    first), or one of `BATCH_KINDS`, what a Batch API job says of a line it did not answer.
    """

    kind: str
    message: str
    status: int | None = None
    attempts: int = 0


NOT_SENT_KINDS = frozenset({"skipped", "not_run", "cancelled", "over_budget"})
BATCH_KINDS = frozenset(
    {
        "BatchExpired",  # the batch's 24 h window closed before the line ran
        "BatchLineError",  # the line got no reply, only an error (``code: message``)
        "BatchFailed",  # the whole batch failed the server's validation
        "BatchLineMissing",  # the batch ended with no result for the line
    }
)
# Where a row's answer came from: a request of this run, the response cache, an identical
# row of the same run, or a Batch API job's result file.
Source = Literal["api", "cache", "duplicate", "batch"]
SOURCES: frozenset[str] = frozenset(get_args(Source))


@dataclass(frozen=True, slots=True)
class RowResult:
    """A row's outcome: the text, or None and the error that explains it."""

    text: str | None
    error: RowError | None = None
    attempts: int = 0  # requests sent for this row; 0 for a cache hit or a duplicate
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server served from its prompt cache
    source: Source = "api"  # see `Source`
    # What the row's column gets: the text for chat, a vector for embeddings, the checked
    # fields for structured output; None without an answer.
    value: Any = None
    # Prompt tokens written to the provider's prompt cache (Anthropic bills them dearer).
    cache_write_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


SKIPPED = RowResult(None, RowError("skipped", "no prompt: the value was missing or empty"))

# The slots' own setters: what a frozen dataclass's __init__ reaches through
# object.__setattr__, one lookup by name per field.
(
    _set_text,
    _set_error,
    _set_attempts,
    _set_prompt,
    _set_completion,
    _set_cached,
    _set_source,
    _set_value,
    _set_written,
) = (
    RowResult.__dict__[name].__set__
    for name in (
        "text",
        "error",
        "attempts",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "source",
        "value",
        "cache_write_tokens",
    )
)


def cache_hit(
    text: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cached_tokens: int | None,
    value: Any,
) -> RowResult:
    """``RowResult(text, None, 0, prompt_tokens, completion_tokens, cached_tokens, "cache",
    value)`` in about half the time (0.7 against 1.2 us): a re-run from the cache makes one
    per row, and the frozen dataclass's own __init__ sets each field by name through
    object.__setattr__."""
    result: RowResult = object.__new__(RowResult)
    _set_text(result, text)
    _set_error(result, None)
    _set_attempts(result, 0)
    _set_prompt(result, prompt_tokens)
    _set_completion(result, completion_tokens)
    _set_cached(result, cached_tokens)
    _set_source(result, "cache")
    _set_value(result, value)
    _set_written(result, None)
    return result


class ProgressListener(Protocol):
    """What the engine tells a progress display. Called on the event loop's thread."""

    def row_done(self, result: RowResult) -> None: ...

    def rows_done(self, results: Sequence[RowResult]) -> None:
        """`row_done` for each of many rows finished at once (a batch answered from the
        cache): one call, not one per row (a call per row was about a tenth of a cached
        re-run, profiled)."""

    def row_retried(self) -> None: ...

    def row_waiting(self, seconds: float, reason: str) -> None: ...


@dataclass(slots=True)
class RunStats:
    """Counts a run keeps as it goes; read them after the run or after it stopped."""

    requests_sent: int = 0
    retries: int = 0
    cache_hits: int = 0
    duplicates: int = 0  # rows answered by an identical request of the same run
    reasks: int = 0  # answers sent back to the model to be fixed (structured output)
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "429", "RequestTimeout"
    prompt_tokens: int = 0  # as billed: requests actually sent, not cache hits
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_saved: float | None = None  # what the prompt cache saved, at the price table's rates
    reasoning_tokens: int = 0  # part of completion_tokens: billed as output, never shown
    cost: float | None = None  # in the price table's currency; None without prices
    started: float = 0.0
    finished: float = 0.0
    # The rate limits the run learned from the server's headers: rate per second, window,
    # and which header family said so (empty when the server sent none).
    limits: dict[str, Any] = field(default_factory=dict)
    # Rows per request the server was found to take, when it refused larger requests and
    # took their halves (a server's own cap on inputs per request); None otherwise.
    items_per_request: int | None = None
    # Tokens charged at their worst case because no usage came back (a timeout, a reply
    # without usage): the provider may have billed them; they count against budgets.
    charged_unconfirmed: int = 0
    # What a hard budget assumed a request without max_tokens may use, when it did.
    budget_note: str | None = None

    @property
    def wall_seconds(self) -> float:
        return max(0.0, (self.finished or time.monotonic()) - self.started)


# Characters (or bytes of encoded JSON) per token, on average for English text and JSON.
CHARACTERS_PER_TOKEN = 4.0
# A text sent as one message costs a few tokens beyond its characters (the message's role
# and separators, the reply's priming): the framing of OpenAI's counting recipe.
MESSAGE_FRAMING_TOKENS = 7.0


def estimate_tokens(text: str | bytes) -> float:
    """The one token estimate: four characters a token, of a text or of an encoded body.

    Used for a request's prompt tokens before its reply says how many it used (the budget
    and the token bucket reserve this, and settle on the reply's ``usage``), for the
    dry-run estimate where no tokenizer is on disk, and for grouping texts per request.
    Given the encoded request body, it counts the JSON framing too (a slight
    overestimate): cheaper than walking the messages, and on the side a budget needs.

    Args:
        text: a text, or a request body encoded as JSON (`encode_body`).

    Returns:
        The estimated tokens (a float: the estimate is not a count).
    """
    return len(text) / CHARACTERS_PER_TOKEN
