"""What is retryable, how long to wait, and how replies map to errors (no server needed)."""

from __future__ import annotations

import email.utils
import time

import pytest
from tenacity import RetryCallState

from nbtoolkit import RetryPolicy
from nbtoolkit.core._client import error_for_status, parse_completion
from nbtoolkit.core._retry import (
    GiveUp,
    RetryAfterOrBackoff,
    is_retryable,
    is_systemic,
    retry_after_seconds,
)
from nbtoolkit.errors import (
    AuthError,
    BadRequestError,
    MalformedResponse,
    NoText,
    NotFoundError,
    RateLimitError,
    Refused,
    RequestTimeout,
    ServerError,
    TransportError,
)

QUOTA_BODY = (
    '{"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}'
)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-3"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_forms(headers: dict[str, str], seconds: float | None) -> None:
    """Seconds, fractional seconds and milliseconds are read; junk counts as not given."""
    assert retry_after_seconds(headers) == seconds


def test_retry_after_http_date() -> None:
    """An HTTP-date Retry-After becomes the seconds until then."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after_seconds({"retry-after": when})
    assert wait is not None and 28 <= wait <= 31


@pytest.mark.parametrize(
    ("status", "kind", "retryable", "systemic"),
    [
        (400, BadRequestError, False, False),
        (401, AuthError, False, True),
        (403, AuthError, False, True),
        (404, NotFoundError, False, True),
        (408, ServerError, True, False),
        (409, ServerError, True, False),
        (422, BadRequestError, False, False),
        (429, RateLimitError, True, False),
        (500, ServerError, True, False),
        (503, ServerError, True, False),
    ],
)
def test_status_classification(status: int, kind: type, retryable: bool, systemic: bool) -> None:
    """Each status maps to one error class, and one rule says retry / fail row / stop run."""
    error = error_for_status(status, '{"error": {"message": "nope"}}', {})
    assert type(error) is kind
    assert error.status == status
    assert str(error) == f"HTTP {status}: nope"
    assert is_retryable(error) is retryable
    assert is_systemic(error) is systemic


def test_quota_429_stops_instead_of_retrying() -> None:
    """A 429 that says insufficient_quota is systemic, not retryable."""
    error = error_for_status(429, QUOTA_BODY, {})
    assert not is_retryable(error)
    assert is_systemic(error)


def test_transport_and_malformed_are_retryable() -> None:
    """Resets, timeouts and bad bodies are worth another try."""
    assert is_retryable(TransportError("reset"))
    assert is_retryable(RequestTimeout("slow"))
    assert is_retryable(MalformedResponse("junk"))
    assert not is_retryable(ValueError("bug"))


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "{}",
        '{"choices": []}',
        '{"choices": [{"message": {}}]}',
        '{"choices": [{"message": {"content": 3}}]}',
        "[1, 2]",
    ],
)
def test_malformed_bodies_are_rejected(body: str) -> None:
    """Anything that is not a completion with text content raises MalformedResponse."""
    with pytest.raises(MalformedResponse):
        parse_completion(body)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ('{"choices": [{"message": {"content": null}, "finish_reason": "stop"}]}', NoText),
        ('{"choices": [{"message": {"content": null, "refusal": "I cannot"}}]}', Refused),
        ('{"choices": [{"message": {"refusal": "I cannot"}}]}', Refused),
        ('{"choices": [{"message": {"content": null, "tool_calls": [{"id": "1"}]}}]}', NoText),
    ],
)
def test_a_complete_reply_without_text_is_an_answer_not_malformed(
    body: str, kind: type[Exception]
) -> None:
    """A refusal, a tool call or content null is the row's outcome, never a retry."""
    completion = parse_completion(body)
    assert completion.text is None
    assert isinstance(completion.no_text_error(), kind)


def test_completion_is_parsed() -> None:
    """Text, finish reason and usage come out of a well-formed body."""
    body = (
        '{"choices": [{"message": {"role": "assistant", "content": "hi"},'
        ' "finish_reason": "stop"}],'
        ' "usage": {"prompt_tokens": 3, "completion_tokens": 1}}'
    )
    completion = parse_completion(body)
    assert completion.text == "hi"
    assert completion.finish_reason == "stop"
    assert completion.usage == {"prompt_tokens": 3, "completion_tokens": 1}


def _state_after(error: BaseException, attempt: int) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_wait_prefers_the_servers_word() -> None:
    """Retry-After beats the computed backoff, even when longer than wait_max."""
    wait = RetryAfterOrBackoff(RetryPolicy(wait_initial=0.1, wait_max=1.0, jitter=0))
    assert wait(_state_after(RateLimitError("slow down", retry_after=7.0), 1)) == 7.0


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    """Without Retry-After: initial * 2^(n-1), capped at wait_max, less a random `jitter` share."""
    wait = RetryAfterOrBackoff(RetryPolicy(wait_initial=0.5, wait_max=4.0, jitter=0.25))
    waits = [wait(_state_after(ServerError("x", status=500), n)) for n in (1, 2, 3, 4, 5)]
    for got, base in zip(waits, [0.5, 1.0, 2.0, 4.0, 4.0], strict=True):
        assert 0.75 * base <= got <= base


def test_full_jitter_spreads_waits_over_the_whole_backoff() -> None:
    """By default a wait is anywhere from 0 to the backoff, so workers never retry in step."""
    wait = RetryAfterOrBackoff(RetryPolicy(wait_initial=1.0, wait_max=8.0))
    waits = [wait(_state_after(ServerError("x", status=500), 3)) for _ in range(400)]
    assert all(0 <= w <= 4.0 for w in waits)
    assert min(waits) < 0.5
    assert max(waits) > 3.5


def test_give_up_on_attempts_or_too_long_a_wait() -> None:
    """Stop after `attempts`, or at once when the server asks for more than retry_after_max."""
    stop = GiveUp(RetryPolicy(attempts=3, retry_after_max=60))
    assert not stop(_state_after(ServerError("x", status=500), 2))
    assert stop(_state_after(ServerError("x", status=500), 3))
    assert stop(_state_after(RateLimitError("x", retry_after=61), 1))
    assert not stop(_state_after(RateLimitError("x", retry_after=59), 1))


@pytest.mark.parametrize(
    "field", ["attempts", "wait_initial", "wait_max", "jitter", "retry_after_max"]
)
def test_policy_rejects_nonsense(field: str) -> None:
    """Negative waits, zero attempts or a jitter share outside 0..1 are refused."""
    from nbtoolkit.errors import ConfigError

    with pytest.raises(ConfigError):
        RetryPolicy(**{field: -1})
    with pytest.raises(ConfigError, match="jitter"):
        RetryPolicy(jitter=1.5)


def test_time_spent_timing_out_counts_toward_the_backoff() -> None:
    """An attempt that spent 5 s timing out is retried at once; a quick failure waits."""
    wait = RetryAfterOrBackoff(RetryPolicy(wait_initial=0.5, wait_max=4.0, jitter=0))
    assert wait(_state_after(RequestTimeout("slow", elapsed=5.0), 1)) == 0.0
    assert wait(_state_after(TransportError("reset", elapsed=0.2), 1)) == pytest.approx(0.3)
    assert wait(_state_after(ServerError("x", status=500), 1)) == pytest.approx(0.5)
