"""Stops for a run that cannot succeed: a server that is gone, or one that refuses every request.

`CircuitBreaker`: a server that is gone, whatever came before.

Each attempt reports whether it reached the server. A failure to connect or a reset (a
`TransportError` that is not a timeout: a slow server is still there) adds to a streak; any
reply at all, an error status included, ends it. The breaker trips when the streak is both
long (at least a pool's worth of attempts, so a few resets among successes never trip it)
and, once the server has answered during this run, old enough (``min_seconds``: a blip of
simultaneous resets is over in less). Before any reply the length alone is enough: a wrong
port or a host that is down shows itself at once.

`RefusalWatch`: the same 400 for the first few requests, none answered (see its docstring);
a 400 for what a row holds (`row_specific`: too long, filtered) is always that row's own.

`abort_message`: what a stopped run says, with what to do about the failure that stopped it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from nbtoolkit.core._retry import google_quotas
from nbtoolkit.errors import (
    APIError,
    AuthError,
    BadRequestError,
    IgnoredParameter,
    NbToolkitError,
    NotFoundError,
    RequestTimeout,
    SchemaRefused,
    TransportError,
)

# Long enough that a burst of resets from one restart of a proxy does not stop the run,
# short enough that a dead server costs seconds, not the hours of every row's retries.
DEFAULT_MIN_SECONDS = 3.0


class CircuitBreaker:
    """Counts consecutive attempts that never reached the server."""

    def __init__(
        self,
        *,
        threshold: int,
        min_seconds: float = DEFAULT_MIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = max(3, threshold)
        self.min_seconds = min_seconds
        self._clock = clock
        self.streak = 0
        self._streak_started = 0.0
        self._heard_back = False
        self.last_error: BaseException | None = None

    def reached(self) -> None:
        """An attempt got a reply (any status): the server is there."""
        self.streak = 0
        self._heard_back = True

    def failed(self, error: BaseException) -> bool:
        """Record an attempt's failure; True when the run should stop."""
        if not unreachable(error):
            return False
        if self.streak == 0:
            self._streak_started = self._clock()
        self.streak += 1
        self.last_error = error
        if self.streak < self.threshold:
            return False
        return not self._heard_back or self._clock() - self._streak_started >= self.min_seconds

    def describe(self) -> str:
        if not self._heard_back:
            return f"the server could not be reached: {self.last_error}"
        seconds = self._clock() - self._streak_started
        return (
            f"the server stopped answering: the last {self.streak} requests failed to reach it "
            f"over {seconds:.1f} s ({self.last_error})"
        )


def unreachable(error: BaseException) -> bool:
    """A failure that says nothing answered: refused, reset, or no connection in time."""
    return isinstance(error, TransportError) and not isinstance(error, RequestTimeout)


# Distinct rows or groups refused with the same 400 before anything was answered, for a
# run to stop. Three: one or two rows with the same fault at the head of a frame (sorted,
# say) are not a pattern; three of three with no answer between them are, and a run that
# stops there has sent at most this many plus the requests already in flight.
REFUSALS_TO_STOP = 3


class Refusal(NamedTuple):
    """A 4xx the server gave, as compared across requests: its status and normalized words."""

    status: int
    words: str


class Verdict(enum.StrEnum):
    """What to do with a refused request, as `RefusalWatch.refused` decides."""

    FAIL = "fail"  # one row: it fails with the server's words; the run goes on
    BISECT = "bisect"  # a group, after an answer: halve it to find its bad input
    PARK = "park"  # a group, nothing answered yet: hold it, the next requests will tell
    PROBE = "probe"  # a group, and enough like it: send its rows alone to decide
    STOP = "stop"  # every request is refused alike: the run stops


class RefusalWatch:
    """Tells a 400 every request gets (a parameter the model does not take, a model that
    does not embed, an unknown body field) from a 400 only some rows get (a bad input).

    Until the server has answered one request of the run, each refused request is recorded
    by its `Refusal`. ``threshold`` distinct rows refused alike stop the run. A group (many
    rows in one request) refused alike does not prove it: a server that caps the inputs per
    request refuses every full-size group with the same words. So ``threshold`` groups
    refused alike are followed by single rows of them (`Verdict.PROBE`); a row refused
    alike confirms, and an answered one ends the watch. Once anything is answered, the
    request's shape is known to be acceptable: a 400 is then a row's own, and the run goes
    on whatever comes. A 400 that says it is about what the rows hold (`row_specific`: over
    the context, content-filtered) is never counted: it is the row's own from the start, so
    a frame whose first rows are its longest or its filtered ones runs to the end. The
    price: a system prompt too long for the model fails every row alone, each a quick 400.

    While a probe decides, no other request starts (`wait_decided`), so that a run that
    stops has sent at most ``threshold`` requests plus those in flight.
    """

    def __init__(self, *, threshold: int = REFUSALS_TO_STOP) -> None:
        self.threshold = threshold
        self.armed = True
        self._seen: collections.Counter[Refusal] = collections.Counter()
        self._deciding: asyncio.Event | None = None  # set while no probe is under way
        self.stopped = False

    def answered(self) -> None:
        """A request of the run was answered: the watch ends."""
        self.armed = False
        self.probing(False)

    def refused(self, error: BadRequestError, *, rows: int) -> Verdict:
        """Record a request for ``rows`` distinct rows that ``error`` refused."""
        # 413: too large, by definition its size. A row too long for the context or caught
        # by a content filter is refused for what it holds, in words often the same for every
        # such row (llama.cpp's, Azure's): rows sorted longest first must not stop the run.
        if not self.armed or error.status == 413 or row_specific(error):
            return Verdict.FAIL if rows == 1 else Verdict.BISECT
        refusal = refusal_of(error)
        self._seen[refusal] += 1
        if rows == 1:
            if self._seen[refusal] < self.threshold:
                return Verdict.FAIL
            # Shut for good: a worker woken now must not send before the run is cancelled.
            self.probing(True)
            self.stopped = True
            return Verdict.STOP
        if self._seen[refusal] < self.threshold or self.deciding:
            return Verdict.PARK  # one probe at a time: its answer decides for all
        self.probing(True)
        return Verdict.PROBE

    @property
    def deciding(self) -> bool:
        """A probe is under way."""
        return self._deciding is not None and not self._deciding.is_set()

    def probing(self, on: bool) -> None:
        """Hold (True) or release (False) every request but the probe's."""
        if self.stopped:
            return
        if self._deciding is None:
            if not on:
                return
            self._deciding = asyncio.Event()  # made here: bound to the run's loop
        if on:
            self._deciding.clear()
        else:
            self._deciding.set()

    async def wait_decided(self) -> None:
        """Return once no probe is under way."""
        if self._deciding is not None:
            await self._deciding.wait()


# Error codes and words that say a request was refused for what its rows hold (too long for
# the model's context, caught by a content filter), not for how it asks: OpenAI, Azure,
# llama.cpp's server, vLLM, Anthropic, Gemini.
_ROW_CODES = frozenset(
    {
        "context_length_exceeded",
        "string_above_max_length",
        "exceed_context_size_error",
        "content_filter",
        "content_policy_violation",
        "responsibleaipolicyviolation",
    }
)
_ROW_WORDS = re.compile(
    r"maximum context length|context size|context window|prompt is too long"
    r"|exceeds the maximum number of tokens|content management policy|content filter",
    re.IGNORECASE,
)


def row_specific(error: APIError) -> bool:
    """Whether a 4xx refused the request for what its rows hold: its code or its words."""
    try:
        detail = json.loads(error.body)["error"]
    except (ValueError, KeyError, TypeError):
        detail = None
    if isinstance(detail, dict):
        inner = detail.get("innererror")
        codes = [detail.get("code"), detail.get("type")]
        codes += [inner.get("code")] if isinstance(inner, dict) else []
        if any(isinstance(code, str) and code.lower() in _ROW_CODES for code in codes):
            return True
    return bool(_ROW_WORDS.search(_server_words(error)))


# Request ids and other one-off tokens a server puts in an error's words.
_ONE_OFF = re.compile(
    r"\b(?:req|request|trace|id)[_\-:= ]+[0-9a-z\-]{6,}\b"
    r"|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
    r"|\b[0-9a-f]{16,}\b"
)


def refusal_of(error: APIError) -> Refusal:
    """The refusal's status and words, lower-cased, spaces collapsed, one-off ids dropped.

    Numbers stay: "maximum context length is 8192 tokens, however you requested 9312"
    differs from row to row, as the rows that get it do.
    """
    words = _ONE_OFF.sub("#", _server_words(error).lower())
    return Refusal(error.status, " ".join(words.split()))


# "Unrecognized request argument supplied: foo", "Invalid value for 'dimensions'".
_NAMED = re.compile(r"argument supplied: ([\w.\[\]]+)|['`\"]([A-Za-z_][\w.\[\]]*)['`\"]")


def refused_parameter(error: APIError, fields: Iterable[str] = ()) -> str | None:
    """The request field a 4xx names: its body's ``error.param``; else the first quoted name
    in its words; else the first of ``fields`` (the request body's) its words mention."""
    try:
        param = json.loads(error.body)["error"].get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        param = None
    if isinstance(param, str) and param:
        return param
    words = _server_words(error)
    found = _NAMED.search(words)
    if found:
        return next(group for group in found.groups() if group)
    # Not "model", "messages" or "input": most messages mention them, whatever they refuse.
    mentioned = (
        field
        for field in fields
        if field not in ("model", "messages", "input")
        and re.search(rf"\b{re.escape(field)}\b", words)
    )
    return next(mentioned, None)


def _server_words(error: APIError) -> str:
    try:
        words = json.loads(error.body)["error"]["message"]
        return words if isinstance(words, str) else str(error)
    except (ValueError, KeyError, TypeError):
        return str(error)


def abort_message(error: NbToolkitError, fields: Iterable[str] = ()) -> str:
    """RunAborted's message: what stopped the run, and what to do (``fields``: the request
    body's, for a refusal that names one without saying it is a parameter)."""
    if isinstance(error, AuthError):
        advice = (
            "check the API key (api_key=, or the provider's variable: OPENAI_API_KEY, "
            "ANTHROPIC_API_KEY, GOOGLE_API_KEY or GEMINI_API_KEY) and that it may use this model"
        )
    elif isinstance(error, NotFoundError):
        advice = "check base_url (it usually ends in /v1) and the model name"
    elif isinstance(error, TransportError):
        advice = "check base_url and that the server is running"
    elif isinstance(error, SchemaRefused):
        advice = (
            f"remove {error.keyword!r} from the schema (or the pydantic constraint behind it)"
            if error.keyword
            else "simplify the schema to what the provider's structured output takes"
        ) + ", or pass structured='prompt' to send the schema in a message instead"
    elif isinstance(error, IgnoredParameter):
        advice = (
            "this model does not shorten its vectors; leave dimensions= out, or use a model "
            "that takes it (text-embedding-3-*)"
        )
    elif isinstance(error, BadRequestError):
        parameter = refused_parameter(error, fields)
        named = f" (parameter: {parameter!r})" if parameter else ""
        return (
            f"run stopped, every row would fail the same way: the server refused the first "
            f"{REFUSALS_TO_STOP} requests with the same words and answered none: {error}"
            f"{named}. What to do: the request itself is refused, not a row: check "
            f"{repr(parameter) if parameter else 'the parameters'} (leave it out, or use a "
            "model that takes it), the model name, and any params= or extra body fields."
        )
    elif isinstance(error, APIError) and any("PerDay" in q for q in google_quotas(error.body)):
        advice = (
            "the daily quota is spent (Gemini's reset at midnight Pacific time); run the rest "
            "tomorrow (answers so far are cached), or use a key on a paid tier"
        )
    else:
        advice = "the account is out of quota or credit; add credit or use another key"
    return f"run stopped, every row would fail the same way: {error}. What to do: {advice}."
