"""Run at the provider's limit, not past it: budgets, the server's headers, a shared pause, AIMD.

Every request of a run passes `RateGovernor.admit()` before it is sent and reports back
with `settle()` when its reply (or error) is in. Four things can hold it back:

1. a shared pause: one 429 pauses every worker until the server's Retry-After or reset
   time, so the run does not retry into the same wall max_parallel times over;
2. the request and token buckets (``rpm=``/``tpm=``, or learned from the server's
   ``x-ratelimit-*`` headers, which also pull the buckets down to the server's count);
3. the adaptive concurrency limit: halved on a 429 or a timeout, grown back by one per
   round trip of successes (AIMD), never above max_parallel;
4. before the first reply, one request goes alone for a moment (``probe_seconds``), and
   then at most half the pool, so that a server's headers size the run before a whole
   pool can hit its limit at once. (Waiting for the first reply in all cases would cost a
   full round trip on every run; a fast server answers within the probe.)

Why not aiolimiter: its buckets cannot be refunded (a request that used fewer tokens than
it reserved gives them back here) or pulled down to the count a server reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Stay this far under a rate the server announced, so clock skew between the two
# buckets does not turn into a trickle of 429s.
_SAFETY = 0.97
_RECHECK = 0.25
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one reply's ``x-ratelimit-*`` headers said; None where a header was absent."""

    limit_requests: float | None = None  # per minute
    remaining_requests: float | None = None
    reset_requests: float | None = None  # seconds until the request budget is full again
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ServerLimits | None:
        if "x-ratelimit-remaining-requests" not in headers and (
            "x-ratelimit-remaining-tokens" not in headers
        ):
            return None  # most local servers send none: two look-ups, not six
        values: dict[str, float | None] = {}
        for kind in ("requests", "tokens"):
            for field, parse in (
                ("limit", _number),
                ("remaining", _number),
                ("reset", parse_duration),
            ):
                raw = headers.get(f"x-ratelimit-{field}-{kind}")
                values[f"{field}_{kind}"] = parse(raw) if raw is not None else None
        if all(value is None for value in values.values()):
            return None
        return cls(**values)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request's admission: when it went, and how many had gone before it and with it."""

    started: float
    sequence: int


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

    def retune(self, rate: float, capacity: float) -> None:
        self.level()
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._level = min(self._level, self.capacity)


class RateGovernor:
    """Decides when each request of one run may go. Lives on one event loop, one run.

    Args:
        max_parallel: the ceiling for the adaptive concurrency limit.
        rpm, tpm: client-side budgets; None: only what the server announces.
        adaptive: cut concurrency on 429s and timeouts, grow it back on success.
        probe_seconds: how long the others wait for the first reply's headers.
        clock: a monotonic clock (tests may pass a fake one).
        on_wait: told (seconds, reason) when the run starts waiting on a limit.
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
    ) -> None:
        self.max_parallel = max_parallel
        self.limit = float(max_parallel)  # the adaptive concurrency limit
        self.in_flight = 0
        self.paused_until = 0.0
        self._clock = clock
        self._on_wait = on_wait
        self._adaptive = adaptive
        self._user_rpm = rpm
        self._user_tpm = tpm
        self.requests = TokenBucket(rpm / 60.0, rpm / 60.0, clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60.0, tpm / 60.0, clock) if tpm else None
        self._probe_deadline: float | None = None
        self._probe_seconds = probe_seconds
        self._heard_back = False  # has any reply (and its headers) come in yet?
        self._sent = 0  # requests admitted so far; tickets remember their place
        self._last_cut = -math.inf
        self._round_trip = 1.0  # smoothed seconds per request; paces the AIMD cuts
        self._changed = asyncio.Event()
        self._announced_until = -math.inf

    async def admit(self, tokens: float) -> Ticket:
        """Wait until a request of ``tokens`` estimated tokens may go; hand its ticket to settle."""
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
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(tokens)
        self.in_flight += 1
        self._sent += 1
        if self._probe_deadline is None:
            self._probe_deadline = self._clock() + self._probe_seconds
        return Ticket(self._clock(), self._sent)

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
        if self.in_flight >= max(1, int(self.limit)):
            return math.inf, "concurrency"  # woken by settle()
        if self.requests is not None and (wait := self.requests.wait_for(1)) > 0:
            return wait, "requests per minute"
        if self.tokens is not None and (wait := self.tokens.wait_for(tokens)) > 0:
            return wait, "tokens per minute"
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
    ) -> None:
        """Report one finished request: its usage, the server's headers, and how it went.

        Args:
            congested: a 429 or a timeout: cut the concurrency limit (once per round trip).
            pause: seconds every worker should wait (a 429's Retry-After), if any.
        """
        now = self._clock()
        self.in_flight -= 1
        self._heard_back = True  # its headers (if any) now size the run
        self._round_trip = 0.8 * self._round_trip + 0.2 * (now - ticket.started)
        if self.tokens is not None and used_tokens is not None:
            self.tokens.give_back(reserved_tokens - used_tokens)
        if limits is not None:
            self._follow(limits, sent_since=self._sent - ticket.sequence)
        if pause is not None and pause > 0:
            self.paused_until = max(self.paused_until, now + pause)
        if self._adaptive:
            if congested:
                if now - self._last_cut >= self._round_trip:
                    self.limit = max(1.0, self.limit / 2)
                    self._last_cut = now
            else:
                self.limit = min(float(self.max_parallel), self.limit + 1.0 / max(1.0, self.limit))
        self._changed.set()

    def _follow(self, limits: ServerLimits, *, sent_since: int) -> None:
        """Take the server's announced budgets as ours (a user's own budget stays if lower)."""
        if limits.limit_requests:
            self.requests = self._learned(
                self.requests, limits.limit_requests, limits.remaining_requests, self._user_rpm
            )
        if self.requests is not None and limits.remaining_requests is not None:
            # Believe the server's count (others may share the key), less what we sent after
            # this request, which it had not seen yet. Not below zero: some of those may be
            # refused and cost nothing, and a deep debt would stall the run for seconds.
            self.requests.lower_to(max(0.0, limits.remaining_requests - sent_since))
        if limits.limit_tokens:
            self.tokens = self._learned(
                self.tokens, limits.limit_tokens, limits.remaining_tokens, self._user_tpm
            )
        if self.tokens is not None and limits.remaining_tokens is not None:
            self.tokens.lower_to(limits.remaining_tokens)
        if limits.remaining_requests == 0 and limits.reset_requests and not limits.limit_requests:
            # Out of requests and no rate to pace by: wait for the reset. With a known rate,
            # the emptied bucket already waits just long enough for the next request.
            self.paused_until = max(self.paused_until, self._clock() + limits.reset_requests)

    def learned(self) -> dict[str, float]:
        """The limits this run paces by, per second (empty when none was set or learned)."""
        found: dict[str, float] = {}
        if self.requests is not None:
            found["requests_per_second"] = self.requests.rate
        if self.tokens is not None:
            found["tokens_per_second"] = self.tokens.rate
        return found

    def _learned(
        self,
        bucket: TokenBucket | None,
        per_minute: float,
        remaining: float | None,
        user_per_minute: float | None,
    ) -> TokenBucket:
        """A bucket paced just under a limit the server announced (or the user's, if lower)."""
        rate = _SAFETY * per_minute / 60.0
        if user_per_minute:
            rate = min(rate, user_per_minute / 60.0)
        capacity = max(remaining or 1.0, rate)
        if bucket is None:
            return TokenBucket(rate, capacity, self._clock)
        bucket.retune(rate, max(capacity, bucket.capacity))
        return bucket


def estimate_tokens(messages: object, max_tokens: object) -> float:
    """Prompt tokens (about 4 characters each, plus framing) plus the completion budget."""
    characters = 0
    count = 0
    if isinstance(messages, list | tuple):
        for message in messages:
            count += 1
            content = message.get("content") if isinstance(message, Mapping) else None
            characters += len(content) if isinstance(content, str) else 0
    completion = max_tokens if isinstance(max_tokens, int | float) else 256
    return characters / 4 + 4 * count + 3 + float(completion)
