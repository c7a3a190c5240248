"""The scripted behaviours every test server shares: what a request meets instead of an answer.

`Reply`, `Status`, `Reset`, `Stall` and `Malformed` are queued with ``server.script(...)``;
`FaultRates` picks faults at random, but reproducibly, for requests with nothing queued.
Each server renders a `Status` in its provider's own error format (see its docstring).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

__all__ = ["Action", "Echo", "FaultRates", "Malformed", "Reply", "Reset", "Stall", "Status"]


@dataclass(frozen=True)
class Reply:
    """A normal 200 completion: `text`, or the server's responder when None."""

    text: str | None = None
    _: KW_ONLY
    latency: float | None = None  # seconds; None -> the server's latency


@dataclass(frozen=True)
class Status:
    """An HTTP error, in the error format of the server that sends it.

    On `ChatServer` (OpenAI's ``{"error": {...}}``): ``Status(429, retry_after=2)`` sends
    ``Retry-After: 2``; ``retry_after_ms=500`` sends ``retry-after-ms: 500`` (OpenAI's
    header); `error_code` is e.g. "rate_limit_exceeded" or "insufficient_quota". On
    `AnthropicServer`, `error_type` defaults to Anthropic's for the code (``overloaded_error``
    for 529) and `retry_after` is a ``retry-after`` header; on `GeminiServer` a 429's
    `error_code` is its quota id and `retry_after` its ``RetryInfo.retryDelay`` (see each).
    """

    code: int
    _: KW_ONLY
    message: str = ""  # "" -> a stock message for the code
    headers: Mapping[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    retry_after_ms: int | None = None
    error_code: str | None = None
    error_type: str | None = None  # None -> what OpenAI sends for this code
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not 400 <= self.code <= 599:
            raise ValueError(f"Status code must be 400-599, got {self.code}")


@dataclass(frozen=True)
class Reset:
    """Drop the connection after reading the request: the client sees no HTTP response."""


@dataclass(frozen=True)
class Stall:
    """Send nothing for `seconds`, then reply; ends early if the client or server hangs up."""

    seconds: float = 30.0


@dataclass(frozen=True)
class Malformed:
    """A response whose body is not a chat completion (by default a 200 with non-JSON)."""

    body: str = "this is not json"
    _: KW_ONLY
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class Echo:
    """A 200 whose body is the request's URL and headers, not a completion: what a gateway
    or debugging proxy that echoes the request sends (the key in it, for redaction tests)."""


Action = Reply | Status | Reset | Stall | Malformed | Echo


@dataclass(frozen=True, kw_only=True)
class FaultRates:
    """Probabilities of random faults for requests that have no scripted action.

    ``server_error`` -> ``Status(500)``, ``reset`` -> `Reset`, ``malformed`` -> `Malformed`,
    ``stall`` -> ``Stall(stall_seconds)``. The rates must add up to at most 1.
    """

    server_error: float = 0.0
    reset: float = 0.0
    malformed: float = 0.0
    stall: float = 0.0
    stall_seconds: float = 30.0
    seed: int = 0
    server_error_status: int = 500  # e.g. 503, for a server_error fault

    def __post_init__(self) -> None:
        rates = (self.server_error, self.reset, self.malformed, self.stall)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError(f"fault rates must be in [0, 1] and sum to at most 1, got {rates}")

    def pick(self, prompt: str, attempt: int) -> Action | None:
        """The fault for the `attempt`-th (0-based) request with `prompt`, or None."""
        digest = hashlib.blake2b(f"{self.seed}\0{attempt}\0{prompt}".encode(), digest_size=8)
        # A uniform draw in [0, 1) that depends on nothing but the seed, prompt and attempt.
        draw = int.from_bytes(digest.digest(), "big") / 2.0**64
        faults: tuple[tuple[float, Action], ...] = (
            (self.server_error, Status(self.server_error_status)),
            (self.reset, Reset()),
            (self.malformed, Malformed()),
            (self.stall, Stall(self.stall_seconds)),
        )
        for rate, action in faults:
            if draw < rate:
                return action
            draw -= rate
        return None
