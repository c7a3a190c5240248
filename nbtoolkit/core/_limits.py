"""Run at the provider's limit, not past it: budgets, the server's headers, a shared pause, AIMD.

Every request of a run passes `RateGovernor.admit()` before it is sent and reports back
with `settle()` when its reply (or error) is in. Five things can hold it back:

1. a shared pause: one 429 pauses every worker until the server's Retry-After or reset
   time, so the run does not retry into the same wall max_parallel times over;
2. the user's own budgets (``rpm=``/``tpm=``);
3. the server's budgets, learned from its rate headers (`ServerLimits`): a bucket per
   limit that mirrors the server's count. Replies set its level (so it never holds a
   request back while the server reports plenty remaining) and teach its refill rate;
4. the adaptive concurrency limit: halved on a 429 or a timeout, grown back by one per
   round trip of successes (AIMD), never above max_parallel;
5. before the first reply, one request goes alone for a moment (``probe_seconds``), and
   then at most half the pool, so that a server's headers size the run before a whole
   pool can hit its limit at once. (Waiting for the first reply in all cases would cost a
   full round trip on every run; a fast server answers within the probe.)

Rate headers come in several families, all read by `ServerLimits.from_headers`:

- ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (OpenAI, LiteLLM, Groq, Azure;
  Groq's request limit is per day, Azure sends only the remaining counts);
- ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (OpenRouter; the reset is an epoch
  timestamp in milliseconds);
- the IETF ``RateLimit`` and ``RateLimit-Policy`` fields, in the ``limit=, remaining=,
  reset=`` / ``50;w=1`` form and the structured ``"name";r=;t=`` / ``"name";q=;w=`` form;
- ``anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,reset}``
  (Anthropic; the reset an RFC 3339 time; limits per minute, as Anthropic documents them,
  so the window is stated rather than learned).

The window a limit counts over is read, not assumed: a stated window (``w=``) wins; else
the refill rate follows from the count used and the time until the budget is full again
(``(capacity - remaining) / reset`` per second, smoothed over replies); only a reply that
says neither is read as OpenAI's per-minute figure.

Why not aiolimiter: its buckets cannot be refunded (a request that used fewer tokens than
it reserved gives them back here) or set to the count a server reports.

Longer than ~400 lines: every rate-header family and the governor that acts on them are one
place on purpose (the style guide: one place that parses rate headers, beside their user).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nbtoolkit.core._pacing import LearnedPace

# Stay this far under a rate the server announced, so clock skew between the two
# buckets does not turn into a trickle of 429s.
_SAFETY = 0.97
_RECHECK = 0.25
# Requests a wave may send at once before the spread (`RateGovernor._spread_by`) paces it.
_SPREAD_BURST = 4.0
# Replies faster than this (seconds) leave admissions unspread.
_SPREAD_FROM = 0.005
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Weight of earlier replies in the refill estimate: about the last 20 count.
_DECAY = 0.95
# Reset values at least this large are Unix timestamps (seconds, or milliseconds), not
# durations: 10^9 s is 31 years.
_EPOCH_SECONDS = 1e9
_EPOCH_MILLIS = 1e12


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations (``1s``, ``6m0s``, ``120ms``, ``1h2m3.5s``) in seconds."""
    text = text.strip()
    try:
        return float(text)  # some servers send plain seconds
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_reset(text: str, *, now: float | None = None) -> float | None:
    """A reset as seconds from now: a duration, or a Unix timestamp in s or ms (OpenRouter).

    Args:
        now: the wall clock (``time.time()``) to measure a timestamp from.
    """
    seconds = parse_duration(text)
    if seconds is None and "T" in text:
        return _rfc3339_seconds(text, now)
    if seconds is None or seconds < _EPOCH_SECONDS:
        return seconds
    wall = time.time() if now is None else now
    stamp = seconds / 1000.0 if seconds >= _EPOCH_MILLIS else seconds
    return max(0.0, stamp - wall)


def _rfc3339_seconds(text: str, now: float | None) -> float | None:
    """An RFC 3339 time (Anthropic's resets: ``2026-12-07T01:40:05Z``) as seconds from now."""
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one reply's rate headers said; None where the reply did not say.

    A limit counts over ``window_*`` seconds when the reply states it (IETF ``w=``); else
    its window is learned from many replies (see `RateGovernor`).
    """

    limit_requests: float | None = None  # the most the server allows per window
    remaining_requests: float | None = None
    reset_requests: float | None = None  # seconds until the request budget is full again
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None
    window_requests: float | None = None  # seconds, when stated
    window_tokens: float | None = None
    # Which headers said it: "x-ratelimit", "openrouter", "ietf" or "anthropic".
    family: str = "x-ratelimit"

    @classmethod
    def from_headers(
        cls, headers: Mapping[str, str], *, now: float | None = None
    ) -> ServerLimits | None:
        """Read any family of rate headers; None when the reply has none.

        Args:
            now: the wall clock to turn reset timestamps into durations; default time.time().
        """
        if not any(_RATE_HEADER.match(name) for name in headers):
            return None  # most local servers send none: one pass over the names
        lowered = {name.lower(): value for name, value in headers.items()}
        if any(name.startswith("anthropic-ratelimit-") for name in lowered):
            return _anthropic(lowered, now)
        if any(f"x-ratelimit-{f}-{k}" in lowered for f in _FIELDS for k in _KINDS):
            return _x_ratelimit(lowered, now)
        if "x-ratelimit-remaining" in lowered or "x-ratelimit-limit" in lowered:
            limit, remaining, reset = (
                _number(lowered.get("x-ratelimit-limit")),
                _number(lowered.get("x-ratelimit-remaining")),
                _reset(lowered.get("x-ratelimit-reset"), now),
            )
            return cls(limit, remaining, reset, family="openrouter")
        return _ietf(lowered, now)


_RATE_HEADER = re.compile(r"(?i)x-ratelimit-|ratelimit|anthropic-ratelimit-")
_FIELDS = ("limit", "remaining", "reset")
_KINDS = ("requests", "tokens")


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().strip('"'))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _reset(text: str | None, now: float | None) -> float | None:
    return None if text is None else parse_reset(text, now=now)


def _x_ratelimit(headers: Mapping[str, str], now: float | None) -> ServerLimits | None:
    values = [
        read(headers.get(f"x-ratelimit-{field}-{kind}"))
        for kind in _KINDS
        for field, read in (
            ("limit", _number),
            ("remaining", _number),
            ("reset", lambda text: _reset(text, now)),
        )
    ]
    if all(value is None for value in values):
        return None
    limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t = values
    return ServerLimits(limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t)


# Anthropic states its limits per minute (and refills continuously): the window is known.
_ANTHROPIC_WINDOW = 60.0


def _anthropic(headers: Mapping[str, str], now: float | None) -> ServerLimits | None:
    def read(kind: str) -> tuple[float | None, float | None, float | None]:
        prefix = f"anthropic-ratelimit-{kind}-"
        return (
            _number(headers.get(prefix + "limit")),
            _number(headers.get(prefix + "remaining")),
            _reset(headers.get(prefix + "reset"), now),
        )

    limit_r, remaining_r, reset_r = read("requests")
    # "tokens" is the most restrictive of the token limits; older replies name input tokens.
    limit_t, remaining_t, reset_t = read("tokens")
    if limit_t is None and remaining_t is None:
        limit_t, remaining_t, reset_t = read("input-tokens")
    if all(v is None for v in (limit_r, remaining_r, limit_t, remaining_t)):
        return None
    return ServerLimits(
        limit_r,
        remaining_r,
        reset_r,
        limit_t,
        remaining_t,
        reset_t,
        window_requests=_ANTHROPIC_WINDOW if limit_r else None,
        window_tokens=_ANTHROPIC_WINDOW if limit_t else None,
        family="anthropic",
    )


def _items(text: str) -> list[tuple[str, dict[str, str]]]:
    """A header's comma-separated items as (bare token, {param: value}), quotes stripped.

    Reads both IETF drafts: ``limit=50, remaining=3`` (one item per parameter) and
    ``"default";r=3;t=1`` (parameters after a name).
    """
    items = []
    for item in text.split(","):
        parts = [part.strip() for part in item.split(";")]
        token, params = "", {}
        for part in parts:
            name, sep, value = part.partition("=")
            if sep:
                params[name.strip().lower()] = value.strip().strip('"')
            else:
                token = part.strip('"')
        items.append((token, params))
    return items


def _ietf(headers: Mapping[str, str], now: float | None) -> ServerLimits | None:
    name = ""
    if "ratelimit" in headers:
        items = _items(headers["ratelimit"])
        fields: dict[str, str] = {}
        if items and items[0][0] and {"r", "t"} & set(items[0][1]):
            name, fields = items[0][0], items[0][1]  # structured: "default";r=3;t=1
        else:
            for _, params in items:  # limit=50, remaining=3, reset=1
                fields.update(params)
        limit = _number(fields.get("limit"))
        remaining = _number(fields.get("remaining", fields.get("r")))
        reset = _reset(fields.get("reset", fields.get("t")), now)
    else:
        limit = _number(headers.get("ratelimit-limit"))
        remaining = _number(headers.get("ratelimit-remaining"))
        reset = _reset(headers.get("ratelimit-reset"), now)
    window = None
    policies = _items(headers.get("ratelimit-policy", ""))
    # Pick the policy this reply's count belongs to: by name, else by its limit, else the first.
    for token, params in policies:
        quota = _number(params.get("q", token))
        if (name and token == name) or (not name and limit is not None and quota == limit):
            limit, window = quota, _number(params.get("w"))
            break
    else:
        if policies and policies[0] != ("", {}):
            token, params = policies[0]
            limit = limit if limit is not None else _number(params.get("q", token))
            window = _number(params.get("w"))
    if limit is None and remaining is None:
        return None
    return ServerLimits(limit, remaining, reset, window_requests=window or None, family="ietf")


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request's admission: when it went, and what had gone before it and with it."""

    started: float
    sequence: int  # requests admitted so far, this one included
    tokens_through: float = 0.0  # estimated tokens admitted so far, this one's included


class TokenBucket:
    """A bucket refilled continuously at ``rate`` per second, up to ``capacity``.

    It may go into debt: a request larger than the whole bucket waits for a full bucket and
    then takes what it needs, rather than waiting forever.
    """

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._level

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (or a full bucket, if larger) is available; 0 if now."""
        missing = min(amount, self.capacity) - self.level()
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float) -> None:
        self.level()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        self._level = min(self.capacity, self.level() + amount)

    def lower_to(self, level: float) -> None:
        """Believe a server that says fewer remain than we think (other clients share it)."""
        if level < self.level():
            self._level = level

    def set_level(self, level: float) -> None:
        """Believe the server's count, up or down (it knows best what it will accept)."""
        self.level()
        self._level = min(self.capacity, level)

    def retune(self, rate: float, capacity: float) -> None:
        self.level()
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._level = min(self._level, self.capacity)


class ServerBudget:
    """One of the server's limits (requests or tokens), as its replies describe it.

    ``bucket`` mirrors the server's own: its level is set from each reply's remaining count
    (less what was sent after that request), and it refills at the learned rate. The rate:

    - a stated window (IETF ``w=``): ``limit / window``;
    - else remaining counts with reset times: the server refills ``capacity - remaining``
      in ``reset`` seconds, so ``sum(capacity - remaining) / sum(reset)`` over recent
      replies, where ``capacity`` is the fullest the budget was seen (the limit at most).
      That undercounts only while the server was never seen full, and then the levels the
      replies report lift the bucket anyway: a low guess never holds the run back while the
      server reports plenty left;
    - else, a limit alone: OpenAI's meaning, per minute.
    """

    def __init__(self, unit: str, clock: Callable[[], float]) -> None:
        self.unit = unit  # "requests" or "tokens"
        self.family = ""
        self.limit: float | None = None
        self.capacity = 0.0
        self.rate: float | None = None  # per second, before the safety margin
        self.window: float | None = None  # stated, or limit / rate
        self.basis = ""  # how the rate was found
        self.bucket: TokenBucket | None = None
        # This run's part of the server's budget (a Dask partition's slots / max_parallel):
        # its bucket refills, holds and starts at that part of what the server reports.
        self.share = 1.0
        self._clock = clock
        self._count = self._remaining = self._reset = 0.0  # decayed sums over replies

    def update(
        self,
        *,
        limit: float | None,
        remaining: float | None,
        reset: float | None,
        window: float | None,
        family: str,
        cost: float,
        sent_since: float,
    ) -> None:
        """Learn from one reply.

        Args:
            cost: what its request took from this budget (1 request, its tokens).
            sent_since: what was admitted after it, which the server had not counted yet.
        """
        self.family = family
        if limit:
            self.limit = limit
        if remaining is not None:
            # The server counted this request before replying: it held at least this much.
            seen = remaining + cost
            self.capacity = max(self.capacity, min(seen, limit) if limit else seen)
        if limit and window:
            self.rate, self.window, self.basis = limit / window, window, "stated window"
        elif remaining is not None and reset is not None and reset > 0 and self.capacity > 0:
            self._count = _DECAY * self._count + 1.0
            self._remaining = _DECAY * self._remaining + remaining
            self._reset = _DECAY * self._reset + reset
            rate = (self._count * self.capacity - self._remaining) / self._reset
            if self.limit:  # never more than the whole limit refilled in that time
                rate = min(rate, (self._count * self.limit - self._remaining) / self._reset)
            if rate > 0:
                self.rate, self.basis = rate, "remaining and reset"
        elif limit and self.rate is None:
            self.rate, self.basis = limit / 60.0, "per minute (assumed)"
        if self.rate is None:
            return
        if not (limit and window):
            self.window = self.limit / self.rate if self.limit else None
        capacity = self.share * (self.capacity or max(self.limit or 0.0, 1.0))
        if self.bucket is None:
            self.bucket = TokenBucket(_SAFETY * self.rate * self.share, capacity, self._clock)
        else:
            self.bucket.retune(
                _SAFETY * self.rate * self.share, max(capacity, self.bucket.capacity)
            )
        if remaining is not None:
            # Not below zero: some of those sent since may be refused and cost nothing, and a
            # deep debt would stall the run for seconds.
            self.bucket.set_level(max(0.0, self.share * remaining - sent_since))

    def take_share(self, share: float) -> None:
        """Pace at ``share`` of the server's budget from now on (see `RateGovernor.share`)."""
        if share == self.share:
            return
        if self.bucket is not None and self.rate is not None:
            scale = share / self.share
            level = self.bucket.level()
            self.bucket.retune(self.bucket.rate * scale, self.bucket.capacity * scale)
            self.bucket.set_level(level * scale)
        self.share = share

    def describe(self) -> str:
        """For the bar: ``server limit 3000 requests / 60 s``."""
        if self.limit and self.window:
            return f"server limit {self.limit:g} {self.unit} / {_span(self.window)}"
        return f"server limit ~{self.rate or 0:.3g} {self.unit}/s"

    def learned(self) -> dict[str, Any]:
        return {
            "rate_per_second": self.rate,
            "window_seconds": self.window,
            "limit": self.limit,
            "burst": self.capacity or None,
            "basis": self.basis,
            "headers": self.family,
        }


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size * 0.95:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


class RateGovernor:
    """Decides when each request of one run may go. Lives on one event loop, one run.

    Args:
        max_parallel: the ceiling for the adaptive concurrency limit.
        rpm, tpm: client-side budgets; None: only what the server announces.
        adaptive: cut concurrency on 429s and timeouts, grow it back on success.
        probe_seconds: how long the others wait for the first reply's headers.
        clock: a monotonic clock (tests may pass a fake one).
        on_wait: told (seconds, reason) when the run starts waiting on a limit.
        on_pause: told the seconds of each pause a 429 asks for (for others to share it).
        pause_max: the longest the server's headers may hold the run (as
            ``RetryPolicy.retry_after_max`` caps a 429's wait). Past it, requests go, and
            the server's own answers (a 429 and its Retry-After) decide.
    """

    def __init__(
        self,
        *,
        max_parallel: int,
        rpm: float | None = None,
        tpm: float | None = None,
        adaptive: bool = True,
        probe_seconds: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float, str], None] | None = None,
        on_pause: Callable[[float], None] | None = None,
        pause_max: float = 300.0,
    ) -> None:
        self.max_parallel = max_parallel
        self.limit = float(max_parallel)  # the adaptive concurrency limit
        self.in_flight = 0
        self.paused_until = 0.0
        self._clock = clock
        self._on_wait = on_wait
        self._on_pause = on_pause
        # Set from outside the run (a Dask lease): the most requests in flight right now,
        # whatever the adaptive limit says; None: max_parallel alone. 0 holds every request.
        self.ceiling: int | None = None
        self._share = 1.0
        self._user_rates = (rpm, tpm)
        self._adaptive = adaptive
        self.requests = TokenBucket(rpm / 60.0, rpm / 60.0, clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60.0, tpm / 60.0, clock) if tpm else None
        self.server_requests = ServerBudget("requests", clock)
        self.server_tokens = ServerBudget("tokens", clock)
        # Used only while the headers state no request rate (see `_paced`).
        self.pace = LearnedPace(clock)
        self._pause_max = pause_max
        # A header wait longer than pause_max holds the run for pause_max, then the
        # headers are overruled until the time they named.
        self._capped_until = -math.inf
        self._overruled_until = -math.inf
        self._capped_reason = ""
        self._probe_deadline: float | None = None
        self._probe_seconds = probe_seconds
        self._heard_back = False  # has any reply (and its headers) come in yet?
        self._sent = 0  # requests admitted so far; tickets remember their place
        self._tokens_sent = 0.0
        self._last_cut = -math.inf
        self._round_trip = 1.0  # smoothed seconds per request; paces the AIMD cuts
        # Smoothed seconds per reply other than a 429 (which comes back at once), and the
        # bucket that spreads admissions at twice the rate the concurrency limit sustains.
        self._reply_time: float | None = None
        self._spread: TokenBucket | None = None
        # Replies in a row without a 429: once a whole pool's worth came back, the opening
        # wave is over, and the spread stands down until the next 429 (see `_spread_by`).
        self._calm = 0
        self._changed = asyncio.Event()
        self._turnstile = asyncio.Lock()
        self._announced_until = -math.inf

    async def admit(self, tokens: float) -> Ticket:
        """Wait until a request of ``tokens`` estimated tokens may go; hand its ticket to settle."""
        if self._paced() and (self.pace.rate is not None or self._spread is not None):
            # Paced requests go one by one: the rest wait their turn on the lock, not each
            # on a timer of its own (a hundred workers polling a 20 ms pace ate the CPU).
            async with self._turnstile:
                await self._until_clear(tokens)
                return self._take(tokens)
        await self._until_clear(tokens)
        return self._take(tokens)

    async def _until_clear(self, tokens: float) -> None:
        while True:
            wait, reason = self._wait_needed(tokens)
            if wait <= 0:
                break
            self._announce(wait, reason)
            self._changed.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # lands as the event fires, and the cancelled worker would carry on sending.
            # Re-check at least every _RECHECK s: budgets refill without anyone settling.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, _RECHECK)):
                    await self._changed.wait()

    def _take(self, tokens: float) -> Ticket:
        for bucket, amount in (
            (self.requests, 1.0),
            (self.tokens, tokens),
            (self.server_requests.bucket, 1.0),
            (self.server_tokens.bucket, tokens),
        ):
            if bucket is not None:
                bucket.take(amount)
        self.pace.admitted()
        if self._spread is not None:
            self._spread.take(1.0)
        self.in_flight += 1
        self._sent += 1
        self._tokens_sent += tokens
        if self._probe_deadline is None:
            self._probe_deadline = self._clock() + self._probe_seconds
        return Ticket(self._clock(), self._sent, self._tokens_sent)

    def hold_to(self, ceiling: int | None) -> None:
        """Never more than ``ceiling`` requests in flight from now on (None: no such cap).

        For a run that shares ``max_parallel`` with others (a Dask partition holding some
        of the cluster's slots); requests already in flight finish, waiting ones are woken.
        """
        self.ceiling = ceiling
        self._changed.set()

    def share(self, fraction: float) -> None:
        """Pace at ``fraction`` of every budget: ``rpm``/``tpm`` and the server's headers.

        For a run that is one of several sending at once under the same limits (a Dask
        partition holding k of max_parallel slots takes k/max_parallel), so that together
        they keep to the budgets, and the server's remaining count is not spent once per run.
        """
        fraction = min(1.0, max(0.0, fraction))
        if fraction == self._share:
            return
        self._share = fraction
        for bucket, per_minute in zip((self.requests, self.tokens), self._user_rates, strict=True):
            if bucket is not None and per_minute:
                bucket.retune(per_minute / 60.0 * fraction, per_minute / 60.0 * fraction)
        for budget in (self.server_requests, self.server_tokens):
            budget.take_share(fraction)
        self._changed.set()

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (a 429 another run saw under the same limits)."""
        if seconds > 0:
            self.paused_until = max(self.paused_until, self._clock() + seconds)
            self._changed.set()

    def _announce(self, wait: float, reason: str) -> None:
        """Tell the progress display about a long wait, once per wait rather than per worker."""
        until = self._clock() + wait
        if self._on_wait is None or wait < 0.5 or math.isinf(wait):
            return
        if until > self._announced_until + 0.5:
            self._announced_until = until
            self._on_wait(wait, reason)

    def _wait_needed(self, tokens: float) -> tuple[float, str]:
        now = self._clock()
        if self.paused_until > now:
            return self.paused_until - now, "rate limited by the server"
        if not self._heard_back and self._probe_deadline is not None and self.in_flight:
            if now < self._probe_deadline:
                return self._probe_deadline - now, "first request"
            if self.in_flight >= max(1, self.max_parallel // 2):
                return math.inf, "first replies"  # woken by settle()
        if self.ceiling is not None and self.in_flight >= self.ceiling:
            return math.inf, "cluster-wide max_parallel"  # woken by hold_to() or settle()
        if self.in_flight >= max(1, int(self.limit)):
            return math.inf, "concurrency"  # woken by settle()
        if self.requests is not None and (wait := self.requests.wait_for(1)) > 0:
            return wait, "requests per minute"
        if self.tokens is not None and (wait := self.tokens.wait_for(tokens)) > 0:
            return wait, "tokens per minute"
        if self._paced():
            if self.pace.rate is not None:
                if (wait := self.pace.wait()) > 0:
                    return wait, f"429s: pacing at ~{self.pace.rate:.3g} requests/s"
            elif self._spread is not None and (wait := self._spread.wait_for(1)) > 0:
                return wait, "spreading a wave of requests"
        return self._server_wait(now, tokens)

    def _paced(self) -> bool:
        """Whether 429s pace the requests: adaptive, and no header states a request rate."""
        return self._adaptive and self.server_requests.bucket is None

    def _server_wait(self, now: float, tokens: float) -> tuple[float, str]:
        """The wait the server's headers ask for, capped at pause_max."""
        if now < self._capped_until:
            return self._capped_until - now, self._capped_reason
        if now < self._overruled_until:
            return 0.0, ""
        for budget, amount in ((self.server_requests, 1.0), (self.server_tokens, tokens)):
            if budget.bucket is None or (wait := budget.bucket.wait_for(amount)) <= 0:
                continue
            if wait <= self._pause_max:
                return wait, budget.describe()
            self._capped_until = now + self._pause_max
            self._overruled_until = now + wait
            self._capped_reason = (
                f"{budget.describe()}: the server asks for {wait:.0f} s, "
                f"capped at {self._pause_max:g} s (retry_after_max)"
            )
            return self._pause_max, self._capped_reason
        return 0.0, ""

    def settle(
        self,
        ticket: Ticket,
        *,
        reserved_tokens: float,
        used_tokens: float | None,
        limits: ServerLimits | None,
        congested: bool,
        pause: float | None = None,
        throttled: bool = False,
    ) -> None:
        """Report one finished request: its usage, the server's headers, and how it went.

        Args:
            congested: a 429 or a timeout: cut the concurrency limit (once per round trip).
            pause: seconds every worker should wait (a 429's Retry-After), if any.
            throttled: a 429. While no header states the server's request rate, it cuts
                the learned pace (`LearnedPace`) instead of the concurrency limit: a rate
                limit is a rate, and a cut in concurrency does not space the requests.
        """
        now = self._clock()
        self.in_flight -= 1
        self._heard_back = True  # its headers (if any) now size the run
        self._round_trip = 0.8 * self._round_trip + 0.2 * (now - ticket.started)
        if throttled:
            self._calm = 0
        else:
            self._calm += 1
            self._spread_by(now - ticket.started)
        if self.tokens is not None and used_tokens is not None:
            self.tokens.give_back(reserved_tokens - used_tokens)
        if limits is not None:
            self._follow(limits, ticket, reserved_tokens)
        if pause is not None and pause > 0:
            self.paused_until = max(self.paused_until, now + pause)
            if self._on_pause is not None:
                self._on_pause(pause)
        if throttled and self._paced():
            self.pace.throttled(ticket.started)
        elif self._adaptive:
            if not congested and self._paced():
                self.pace.succeeded(ticket.started)
            if congested:
                if now - self._last_cut >= self._round_trip:
                    self.limit = max(1.0, self.limit / 2)
                    self._last_cut = now
            else:
                self.limit = min(float(self.max_parallel), self.limit + 1.0 / max(1.0, self.limit))
        self._changed.set()

    def _spread_by(self, reply_time: float) -> None:
        """Learn how long replies take, and spread admissions to match.

        While no rate is known, workers freed together would all go in one instant; at the
        first reply, half the pool. Released at most twice as fast as the concurrency limit
        sustains (``limit / reply time``), a wave costs no throughput, and a rate limit's
        first 429 comes back while most of the wave still waits, not after all of it was
        refused.

        Once ``max_parallel`` replies in a row came back without a 429, the wave is over:
        replies now free workers one by one, which spreads them by itself, and a bucket
        would only add waits on a timer to admissions that need none. A 429 arms it again
        for the next wave.
        """
        if self._reply_time is None:
            self._reply_time = reply_time
        else:
            self._reply_time = 0.8 * self._reply_time + 0.2 * reply_time
        if self._reply_time < _SPREAD_FROM or self._calm >= self.max_parallel:
            # Replies as fast as this: nothing to spread, only CPU to spend; or the wave is over.
            self._spread = None
            return
        rate = 2.0 * self.limit / self._reply_time
        if self._spread is None:
            self._spread = TokenBucket(rate, _SPREAD_BURST, self._clock)
        else:
            self._spread.retune(rate, _SPREAD_BURST)

    def _follow(self, limits: ServerLimits, ticket: Ticket, reserved_tokens: float) -> None:
        """Learn the server's budgets from one reply's headers."""
        # What went after this request, which the server had not counted yet.
        self.server_requests.update(
            limit=limits.limit_requests,
            remaining=limits.remaining_requests,
            reset=limits.reset_requests,
            window=limits.window_requests,
            family=limits.family,
            cost=1.0,
            sent_since=self._sent - ticket.sequence,
        )
        self.server_tokens.update(
            limit=limits.limit_tokens,
            remaining=limits.remaining_tokens,
            reset=limits.reset_tokens,
            window=limits.window_tokens,
            family=limits.family,
            cost=reserved_tokens,
            sent_since=self._tokens_sent - ticket.tokens_through,
        )

    def learned(self) -> dict[str, dict[str, Any]]:
        """What the server's headers taught this run, per limit ("requests", "tokens").

        Each: ``rate_per_second`` (the server's refill rate, before our safety margin),
        ``window_seconds`` (what its limit counts over), ``limit``, ``burst`` (the most
        it was seen to hold), ``basis`` (how the rate was found) and ``headers`` (the
        family). With no request rate in the headers, "requests" is the pace learned from
        429s, if any came. Empty when neither taught anything.
        """
        learned = {
            budget.unit: budget.learned()
            for budget in (self.server_requests, self.server_tokens)
            if budget.rate is not None
        }
        if "requests" not in learned and self.pace.rate is not None:
            learned["requests"] = self.pace.learned()
        return learned
