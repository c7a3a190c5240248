"""One request -> one reply, or one of our exceptions; and the chat-completion parser.

This is the only module that speaks HTTP. It maps every reply onto the exception tree in
`nbtoolkit.errors`, so that nothing above it sees an aiohttp type or a status code rule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from nbtoolkit.config import Timeouts
from nbtoolkit.core._limits import ServerLimits
from nbtoolkit.core._retry import (
    anthropic_out_of_credit,
    google_rejects_key,
    google_retry_delay,
    retry_after_seconds,
)
from nbtoolkit.errors import (
    AnswerError,
    APIError,
    AuthError,
    BadRequestError,
    MalformedResponse,
    NoText,
    NotFoundError,
    QuotaExhausted,
    RateLimitError,
    Refused,
    RequestTimeout,
    ServerError,
    TransportError,
)

if TYPE_CHECKING:  # imported where a request is sent: `import nbtoolkit` spares it
    import aiohttp


@dataclass(frozen=True, slots=True)
class Reply:
    """A 2xx reply's body, and what its rate-limit headers said."""

    text: str
    limits: ServerLimits | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A parsed chat completion: the text (None when the model gave none) and its usage."""

    text: str | None
    finish_reason: str | None
    usage: Mapping[str, Any] | None
    refusal: str | None = None
    tool_calls: bool = False

    def no_text_error(self) -> AnswerError:
        """Why a reply with no text has none, as the row's outcome."""
        if self.refusal:
            return Refused(f"the model refused: {self.refusal}"[:500])
        if self.tool_calls:
            return NoText("the model answered with a tool call, not text")
        return NoText(f"the reply's content is null (finish_reason: {self.finish_reason})")


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: bytes,
    *,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    redact: Redactor | None = None,
) -> Reply:
    """Send one request (``payload``: the JSON body, encoded) and return its 2xx reply.

    ``redact`` scrubs the request's secrets from error texts; default: one built from
    ``url`` and ``headers`` when an error needs it. A 2xx body comes back as it is: its
    parser's errors are the caller's to scrub (`Redactor.error`).

    Raises:
        APIError: (a subclass per status) the server answered with an error status.
        TransportError: no complete HTTP reply (refused, reset, timed out).
    """
    import aiohttp  # loaded by the session's creator: a dict look-up here

    started = time.monotonic()
    try:
        async with session.post(url, data=payload, headers=headers, timeout=timeout) as reply:
            raw = await reply.read()
            status = reply.status
            reply_headers = reply.headers
    except (TimeoutError, aiohttp.ClientError) as exc:
        redact = redact or Redactor(url, headers)
        raise _transport_error(exc, redact, timeout, started) from exc
    text = raw.decode("utf-8", errors="replace")
    limits = ServerLimits.from_headers(reply_headers)
    if status >= 300:
        redact = redact or Redactor(url, headers)
        raise _status_error(status, text, redact, reply_headers, limits)
    return Reply(text, limits)


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: Any = None,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> Reply:
    """Any other request (a file upload, a status check, a download) and its 2xx reply.

    The same error mapping and redaction as `post_json`, for callers that are not one JSON
    body per row: the Batch API's files and batches (`nbtoolkit.batch`).

    Raises:
        APIError: (a subclass per status) the server answered with an error status.
        TransportError: no complete HTTP reply (refused, reset, timed out).
    """
    import aiohttp

    started = time.monotonic()
    try:
        async with session.request(
            method, url, data=data, headers=headers, timeout=timeout
        ) as reply:
            raw = await reply.read()
            status = reply.status
            reply_headers = reply.headers
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _transport_error(exc, Redactor(url, headers), timeout, started) from exc
    text = raw.decode("utf-8", errors="replace")
    limits = ServerLimits.from_headers(reply_headers)
    if status >= 300:
        raise _status_error(status, text, Redactor(url, headers), reply_headers, limits)
    return Reply(text, limits)


def _transport_error(
    exc: BaseException,
    redact: Redactor,
    timeout: aiohttp.ClientTimeout,
    started: float,
) -> TransportError:
    """Our exception for a request that got no complete HTTP reply."""
    import aiohttp

    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # Never connected: a host that is down or filtered, not a slow answer.
        return TransportError(f"could not connect within {timeout.sock_connect}s: {exc}")
    if isinstance(exc, TimeoutError):  # aiohttp raises asyncio.TimeoutError (= TimeoutError)
        return RequestTimeout(
            f"no complete reply within the timeout ({_describe(timeout)})",
            elapsed=time.monotonic() - started,
        )
    # str(exc) names the host and the OS error, never the request headers; some errors
    # name the URL, whose query may hold a key.
    return TransportError(
        redact(f"{type(exc).__name__}: {exc}"),
        elapsed=time.monotonic() - started,
    )


def _status_error(
    status: int,
    text: str,
    redact: Redactor,
    reply_headers: Mapping[str, str],
    limits: ServerLimits | None,
) -> APIError:
    # Some proxies echo the key (or any header) in error bodies: never let it reach a
    # message, a traceback or the run report.
    error = error_for_status(status, redact(text), reply_headers)
    error.limits = limits
    return error


def parse_completion(text: str) -> Completion:
    """Parse a chat.completion body; raise MalformedResponse when it is not one.

    A reply that is a whole completion but carries no text (a refusal, a tool call,
    ``content: null``) is not malformed: it comes back with ``text`` None, to be the row's
    outcome rather than retried and billed again. Content as a list of parts is the text of
    its ``text`` parts.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MalformedResponse(f"reply is not JSON: {text[:200]!r}") from exc
    try:
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content")
        if "content" not in message and not (message.get("refusal") or message.get("tool_calls")):
            raise KeyError("content")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedResponse(f"reply has no choices[0].message.content: {text[:200]!r}") from exc
    if isinstance(content, list):
        content = _text_parts(content)
    if content is not None and not isinstance(content, str):
        raise MalformedResponse(f"choices[0].message.content is not text: {content!r}"[:300])
    refusal = message.get("refusal")
    usage = data.get("usage") if isinstance(data, dict) else None
    return Completion(
        text=content if not refusal else None,
        finish_reason=choice.get("finish_reason"),
        usage=usage if isinstance(usage, dict) else None,
        refusal=refusal if isinstance(refusal, str) and refusal else None,
        tool_calls=bool(message.get("tool_calls")),
    )


def _text_parts(parts: list[Any]) -> str | list[Any]:
    """Content sent as a list of parts (Mistral's reasoning models: a ``thinking`` part, then
    ``text`` parts) as the text of its ``text`` parts; the list itself when it has none."""
    texts = [
        part["text"]
        for part in parts
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    ]
    return "".join(texts) if texts else parts


def error_for_status(status: int, text: str, headers: Mapping[str, str]) -> APIError:
    """The exception for an HTTP error reply, with the server's own message when it gave one."""
    message = f"HTTP {status}: {_server_message(text)}"
    # A header's wait first; Gemini says it in the body instead (RetryInfo.retryDelay).
    wait = retry_after_seconds(headers)
    if wait is None and status in (429, 503):
        wait = google_retry_delay(text)
    if status == 429:
        return RateLimitError(message, body=text, retry_after=wait)
    # 529 is Anthropic's "overloaded": a 5xx, retried like a 503.
    if status in (408, 409) or status >= 500:
        return ServerError(message, status=status, body=text, retry_after=wait)
    if status in (401, 403) or (status == 400 and google_rejects_key(text)):
        # Gemini answers a wrong key with 400 API_KEY_INVALID: as final as a 401.
        return AuthError(message, status=status, body=text)
    if status == 404:
        return NotFoundError(message, status=status, body=text)
    if status == 400 and anthropic_out_of_credit(text):
        # Not this request's fault: every row, and every retry, gets the same answer.
        return QuotaExhausted(message, status=status, body=text)
    return BadRequestError(message, status=status, body=text)


# Request headers that never hold a secret.
_PLAIN_HEADERS = frozenset({"content-type", "accept", "user-agent", "anthropic-version"})
# Headers that hold nothing but a key: redacted however short.
_KEY_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "x-goog-api-key"})
# Shorter values of other headers and query parameters are left alone: they are not keys,
# and replacing a short word everywhere would garble the server's message.
_SHORTEST_SECRET = 8


class Redactor:
    """Replaces the secrets a request carries (the key, other header values, query values)
    by ``***`` in any text about it: an error body, a 2xx body that is not what was expected,
    a transport error naming the URL. Built once per run: the secrets do not change.
    """

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        secrets = set()
        for name, value in headers.items():
            lowered = name.lower()
            if lowered in _PLAIN_HEADERS:
                continue
            value = value.removeprefix("Bearer ").strip()
            if len(value) >= (4 if lowered in _KEY_HEADERS else _SHORTEST_SECRET):
                secrets.add(value)
        for name, value in parse_qsl(urlsplit(url).query):
            if name != "api-version" and len(value) >= _SHORTEST_SECRET:
                secrets.add(value)
        # Longest first: a key before any part of it.
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def error(self, error: BaseException) -> BaseException:
        """``error`` with its message scrubbed (in place, keeping its type and attributes)."""
        if self._secrets and error.args:
            error.args = tuple(self(a) if isinstance(a, str) else a for a in error.args)
        return error


def _redact(text: str, url: str, headers: Mapping[str, str]) -> str:
    """``text`` with the key, header values and query values replaced by ``***``."""
    return Redactor(url, headers)(text)


def _server_message(text: str) -> str:
    try:
        error = json.loads(text)["error"]
        message = error["message"] if isinstance(error, dict) else error
        return str(message)[:500]
    except (ValueError, KeyError, TypeError):
        return text[:500] or "(empty body)"


def client_timeout(timeouts: Timeouts, *, total: float | None) -> aiohttp.ClientTimeout:
    """The run's timeouts as aiohttp takes them, with ``total`` in place of the run's."""
    import aiohttp

    return aiohttp.ClientTimeout(
        total=total,
        sock_connect=timeouts.connect,
        sock_read=timeouts.read,
        # aiohttp rounds timeouts of 5 s and more up to whole seconds (cheaper timers);
        # a 5 s timeout that fires at 5.9 s only delays the retry. Keep them exact.
        ceil_threshold=float("inf"),
    )


def _describe(timeout: aiohttp.ClientTimeout) -> str:
    parts = [
        f"{name}={value:g}s"
        for name in ("total", "connect", "sock_read")
        if (value := getattr(timeout, name)) is not None
    ]
    return ", ".join(parts) or "no limit"
