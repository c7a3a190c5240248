"""Rate limits for the test servers: token buckets decided on arrival, and the headers that tell.

A server with a `RateLimit` asks its `Limiter` about each request as it arrives (before any
latency). The limiter answers with a `Rejection` (the server renders it as its provider's
429) or None, and with the rate headers of the limit's family for whatever reply is sent.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import KW_ONLY, dataclass
from typing import Literal, NamedTuple, get_args

__all__ = ["HEADER_FAMILIES", "HeaderFamily", "Limiter", "RateLimit", "Rejection"]

HeaderFamily = Literal[
    "openai", "groq", "openrouter", "ietf", "ietf-structured", "azure", "anthropic", "none"
]
HEADER_FAMILIES: tuple[HeaderFamily, ...] = get_args(HeaderFamily)


@dataclass(frozen=True)
class RateLimit:
    """Rate limits, decided as each request arrives (before any latency).

    Requests draw from a bucket of `burst` that refills at `requests_per_second`. With
    `tokens_per_minute`, each request also draws its token cost (the prompt estimate plus the
    body's ``max_tokens``, else 16) from a bucket that size, refilled over a minute. A request
    that finds either bucket short gets a 429 ``rate_limit_exceeded``; with `retry_after` it
    says when to come back (``retry-after-ms``, and ``Retry-After`` in whole seconds rounded
    up). Every reply to a request that got this far carries rate headers in the `headers`
    family, describing the request limit as ``requests_per_second * window`` per `window`:

    - ``"openai"``: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets as
      durations (``120ms``, ``6m0s``) until the bucket is full; `window` 60 by default;
    - ``"groq"``: the same headers, the request limit per day (`window` 86400 by default),
      tokens per minute;
    - ``"openrouter"``: ``X-RateLimit-Limit``, ``-Remaining``, and ``-Reset`` as the Unix
      time in milliseconds when the bucket is full (requests only);
    - ``"ietf"``: ``RateLimit: limit=L, remaining=R, reset=T`` (whole seconds) and
      ``RateLimit-Policy: L;w=W``; ``"ietf-structured"``: ``RateLimit: "default";r=R;t=T``
      and ``RateLimit-Policy: "default";q=L;w=W`` (requests only);
    - ``"azure"``: only ``x-ratelimit-remaining-requests`` and ``-tokens``;
    - ``"anthropic"``: ``anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,
      reset}``, the limit per minute, resets as RFC 3339 times (whole seconds, as Anthropic
      sends them) when the bucket is full; a 429 carries ``retry-after`` in whole seconds;
    - ``"none"``: no rate headers at all (429s keep their Retry-After).

    Example:
        ``ChatServer(rate_limit=RateLimit(50, 50))`` allows bursts of 50, then 50 a second,
        and says "3000 requests per minute". ``RateLimit(50, 50, window=1)`` says "50 per
        second" of the same limit.
    """

    requests_per_second: float
    burst: int
    _: KW_ONLY
    tokens_per_minute: int | None = None
    retry_after: bool = True  # False: 429s say nothing of when to retry
    headers: HeaderFamily = "openai"
    window: float | None = None  # seconds the stated limit counts over; None: the family's

    def __post_init__(self) -> None:
        if not self.requests_per_second > 0:
            raise ValueError(f"requests_per_second must be > 0, got {self.requests_per_second}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        if self.tokens_per_minute is not None and self.tokens_per_minute < 1:
            raise ValueError(f"tokens_per_minute must be >= 1, got {self.tokens_per_minute}")
        if self.headers not in HEADER_FAMILIES:
            raise ValueError(f"headers must be one of {HEADER_FAMILIES}, got {self.headers!r}")
        if self.window is not None and not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window}")

    @property
    def stated_window(self) -> float:
        """The window the headers describe the request limit over, in seconds."""
        if self.window is not None:
            return self.window
        return 86400.0 if self.headers == "groq" else 60.0

    @property
    def stated_limit(self) -> int:
        """The request limit the headers state: requests_per_second * stated_window."""
        return max(1, round(self.requests_per_second * self.stated_window))


@dataclass
class _Bucket:
    """A token bucket; `level` is brought up to date by `refill` before each decision."""

    capacity: float
    rate: float  # refill per second
    level: float
    stamp: float  # time.monotonic() of the last refill

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def has(self, amount: float) -> bool:
        # The slack absorbs float error: a client that waited exactly retry-after-ms gets in.
        return self.level >= amount - 1e-6

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate

    def remaining(self) -> int:
        return max(0, math.floor(self.level + 1e-6))


class Rejection(NamedTuple):
    """A request the limiter turned away: which bucket, in the words of a 429, and the wait."""

    kind: str  # "requests" or "tokens"
    what: str  # e.g. "requests per min (RPM): Limit 3000, Requested 1"
    wait: float  # seconds until the request would pass


class Limiter:
    """The buckets of one `RateLimit`; only touched on the server's loop."""

    def __init__(self, limit: RateLimit) -> None:
        now = time.monotonic()
        self.limit = limit
        self._requests = _Bucket(limit.burst, limit.requests_per_second, limit.burst, now)
        tpm = limit.tokens_per_minute
        self._tokens = None if tpm is None else _Bucket(tpm, tpm / 60.0, tpm, now)

    def admit(self, cost: float) -> Rejection | None:
        """Draw one request and ``cost`` tokens; None to go ahead, else why not."""
        now = time.monotonic()
        requests, tokens = self._requests, self._tokens
        requests.refill(now)
        if tokens is not None:
            tokens.refill(now)
            # A request bigger than the whole bucket could never pass: charge it a full one.
            cost = min(cost, tokens.capacity)
        if not requests.has(1):
            what = f"requests per min (RPM): Limit {self._rpm()}, Requested 1"
            return Rejection("requests", what, requests.wait_for(1))
        if tokens is not None and not tokens.has(cost):
            what = f"tokens per min (TPM): Limit {self.limit.tokens_per_minute}, "
            return Rejection("tokens", what + f"Requested {cost:.0f}", tokens.wait_for(cost))
        requests.level -= 1
        if tokens is not None:
            tokens.level -= cost
        return None

    def _rpm(self) -> int:
        return max(1, round(self.limit.requests_per_second * 60))

    def headers(self) -> dict[str, str]:
        """The rate headers of the limit's family, as of now."""
        family, requests, tokens = self.limit.headers, self._requests, self._tokens
        limit, remaining = self.limit.stated_limit, requests.remaining()
        if family in ("openai", "groq"):
            headers = _x_ratelimit("requests", limit, remaining, requests.until_full())
            if tokens is not None and self.limit.tokens_per_minute is not None:
                tpm = self.limit.tokens_per_minute
                headers.update(_x_ratelimit("tokens", tpm, tokens.remaining(), tokens.until_full()))
            return headers
        if family == "anthropic":
            headers = _anthropic("requests", limit, remaining, requests.until_full())
            if tokens is not None and self.limit.tokens_per_minute is not None:
                tpm, left, full = (
                    self.limit.tokens_per_minute,
                    tokens.remaining(),
                    tokens.until_full(),
                )
                headers.update(_anthropic("tokens", tpm, left, full))
                headers.update(_anthropic("input-tokens", tpm, left, full))
            return headers
        if family == "azure":
            headers = {"x-ratelimit-remaining-requests": str(remaining)}
            if tokens is not None:
                headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining())
            return headers
        if family == "openrouter":
            full_at = time.time() + requests.until_full()
            return {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(math.ceil(full_at * 1000)),
            }
        window = seconds_header(self.limit.stated_window)
        reset = math.ceil(requests.until_full() - 1e-6)  # delta-seconds: whole numbers
        if family == "ietf":
            return {
                "RateLimit": f"limit={limit}, remaining={remaining}, reset={reset}",
                "RateLimit-Policy": f"{limit};w={window}",
            }
        if family == "ietf-structured":
            return {
                "RateLimit": f'"default";r={remaining};t={reset}',
                "RateLimit-Policy": f'"default";q={limit};w={window}',
            }
        return {}


def _x_ratelimit(name: str, limit: int, remaining: int, until_full: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{name}": str(limit),
        f"x-ratelimit-remaining-{name}": str(remaining),
        f"x-ratelimit-reset-{name}": duration(until_full),
    }


def _anthropic(name: str, limit: int, remaining: int, until_full: float) -> dict[str, str]:
    full_at = math.ceil(time.time() + until_full - 1e-6)  # whole seconds, rounded up
    stamp = datetime.datetime.fromtimestamp(full_at, datetime.UTC)
    return {
        f"anthropic-ratelimit-{name}-limit": str(limit),
        f"anthropic-ratelimit-{name}-remaining": str(remaining),
        f"anthropic-ratelimit-{name}-reset": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format, to the millisecond: ``120ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    text = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text


def seconds_header(value: float) -> str:
    """Seconds as a header value: ``2`` for whole seconds, else ``0.25``."""
    return str(int(value)) if value == int(value) else repr(value)
