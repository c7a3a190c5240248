"""What is worth another try, and how long to wait before it.

One function, `is_retryable`, decides; one function, `is_systemic`, says which failures
mean every other row will fail the same way (so the run stops instead of sending 10,000
doomed requests). The wait is tenacity's exponential backoff, jittered, except that a
server that says how long to wait (``Retry-After``, ``retry-after-ms``, or in a Google
error body ``RetryInfo.retryDelay``) is believed. Google's bodies (the Gemini API's) are read
here too: which quota a 429 hit (a daily one is exhausted, not busy), and a bad key's 400; and
Anthropic's 400 that says the account's credit is spent.
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import time
from collections.abc import Mapping
from typing import Any

from tenacity import RetryCallState, wait_exponential

from nbtoolkit.config import RetryPolicy
from nbtoolkit.errors import (
    APIError,
    AuthError,
    IgnoredParameter,
    MalformedResponse,
    NotFoundError,
    QuotaExhausted,
    RateLimitError,
    SchemaRefused,
    ServerError,
    TransportError,
)

# Error codes in a 429's body that no amount of waiting fixes.
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})
# Google's error bodies (google.rpc.Status, as the Gemini API sends them) put their details
# in typed entries: the quota hit, when to retry, and why a request was refused.
_GOOGLE_TYPE = "type.googleapis.com/google.rpc."
_GOOGLE_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")


def is_retryable(exc: BaseException) -> bool:
    """True for 408/409/429/5xx, timeouts, resets and unparsable 200s; False for other 4xx."""
    if isinstance(exc, RateLimitError):
        return not is_quota_exhausted(exc)
    return isinstance(exc, ServerError | TransportError | MalformedResponse)


def is_systemic(exc: BaseException) -> bool:
    """True when this error will hit every row alike: a bad key, a wrong URL or model, no quota."""
    if isinstance(
        exc, AuthError | NotFoundError | QuotaExhausted | IgnoredParameter | SchemaRefused
    ):
        return True
    return isinstance(exc, RateLimitError) and is_quota_exhausted(exc)


def is_quota_exhausted(exc: APIError) -> bool:
    """A 429 whose body says the account is out of credit, not merely going too fast.

    Gemini's daily quotas count here too: a ``QuotaFailure`` whose quota is per day
    (``...PerDay...``) would answer every retry with the same 429 until midnight Pacific.
    """
    if any("PerDay" in quota for quota in google_quotas(exc.body)):
        return True
    try:
        error = json.loads(exc.body)["error"]
        codes = {str(error.get("code")), str(error.get("type"))}
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(codes & _QUOTA_CODES)


def anthropic_out_of_credit(body: str) -> bool:
    """An Anthropic 400 that is an empty account, not a bad request: its
    ``invalid_request_error`` says the credit balance is too low."""
    try:
        error = json.loads(body)["error"]
        words = str(error.get("message", "")).lower()
        kind = error.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return kind == "invalid_request_error" and "credit balance is too low" in words


def google_details(body: str) -> list[dict[str, Any]]:
    """The typed ``details`` of a Google error body (``{"error": {"details": [...]}}``)."""
    try:
        details = json.loads(body)["error"]["details"]
    except (ValueError, KeyError, TypeError):
        return []
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def google_quotas(body: str) -> list[str]:
    """The quota ids a Google 429 names (``GenerateRequestsPerDayPerProjectPerModel``, ...)."""
    return [
        str(violation.get("quotaId", ""))
        for detail in google_details(body)
        if detail.get("@type") == _GOOGLE_TYPE + "QuotaFailure"
        for violation in detail.get("violations") or ()
        if isinstance(violation, dict)
    ]


def google_retry_delay(body: str) -> float | None:
    """The wait a Google error body asks for (``RetryInfo.retryDelay``, e.g. ``"24s"``)."""
    for detail in google_details(body):
        if detail.get("@type") == _GOOGLE_TYPE + "RetryInfo":
            match = _GOOGLE_DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def google_rejects_key(body: str) -> bool:
    """A Google 400 that is a bad API key (``ErrorInfo.reason``), which Gemini sends as 400."""
    return any(
        detail.get("@type") == _GOOGLE_TYPE + "ErrorInfo"
        and str(detail.get("reason", "")).startswith("API_KEY_")
        for detail in google_details(body)
    )


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a reply asks for: ``retry-after-ms`` first (finer), then ``Retry-After``.

    ``Retry-After`` may be seconds (``"2"``, ``"0.5"``) or an HTTP date. Unparsable or
    negative values count as "not said".
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
            if value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_wait(exc: BaseException | None) -> float | None:
    """The wait the server asked for with this error, if it asked."""
    return getattr(exc, "retry_after", None)


class RetryAfterOrBackoff:
    """A tenacity wait: the server's Retry-After when given, else jittered exponential backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = wait_exponential(multiplier=policy.wait_initial, max=policy.wait_max)
        self._jitter = policy.jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        asked = server_wait(error)
        if asked is not None:
            return asked
        # Backoff spaces the starts of attempts: an attempt that already spent 5 s timing
        # out has waited longer than a 0.5 s backoff, and is retried at once.
        spent = getattr(error, "elapsed", 0.0)
        backoff = float(self._backoff(retry_state)) * (1.0 - self._jitter * random.random())
        return max(0.0, backoff - spent)


class GiveUp:
    """A tenacity stop: out of attempts, or the server asks for a longer wait than we allow."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        return self._stop(retry_state.attempt_number, error)

    def first(self, error: BaseException) -> bool:
        """Whether a first attempt that failed with ``error`` is also the last."""
        return self._stop(1, error)

    def _stop(self, attempt_number: int, error: BaseException | None) -> bool:
        if attempt_number >= self._policy.attempts:
            return True
        asked = server_wait(error)
        return asked is not None and asked > self._policy.retry_after_max
