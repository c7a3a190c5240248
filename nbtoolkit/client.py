"""One chat-completion request -> one parsed completion, or one of our exceptions.

This is the only module that speaks HTTP. It maps every reply onto the exception tree in
`nbtoolkit.errors`, so that nothing above it sees an aiohttp type or a status code rule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from nbtoolkit.errors import (
    APIError,
    AuthError,
    BadRequestError,
    MalformedResponse,
    NotFoundError,
    RateLimitError,
    RequestTimeout,
    ServerError,
    TransportError,
)
from nbtoolkit.limits import ServerLimits
from nbtoolkit.retry import retry_after_seconds


@dataclass(frozen=True, slots=True)
class Completion:
    """A parsed reply: the text, why generation stopped, and the token usage if reported."""

    text: str
    finish_reason: str | None
    usage: Mapping[str, Any] | None
    limits: ServerLimits | None = None  # the reply's rate headers, of any family


async def post_chat(
    session: aiohttp.ClientSession,
    url: str,
    payload: bytes,
    *,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> Completion:
    """Send one request (``payload``: the JSON body, encoded) and parse its reply.

    Raises:
        APIError: (a subclass per status) the server answered with an error status.
        TransportError: no complete HTTP reply (refused, reset, timed out).
        MalformedResponse: a 2xx whose body is not a chat completion.
    """
    started = time.monotonic()
    try:
        async with session.post(url, data=payload, headers=headers, timeout=timeout) as reply:
            raw = await reply.read()
            status = reply.status
            reply_headers = reply.headers
    except aiohttp.ConnectionTimeoutError as exc:
        # Never connected: a host that is down or filtered, not a slow answer.
        raise TransportError(f"could not connect within {timeout.sock_connect}s: {exc}") from exc
    except TimeoutError as exc:  # aiohttp raises asyncio.TimeoutError (= TimeoutError on 3.11)
        raise RequestTimeout(
            f"no complete reply within the timeout ({_describe(timeout)})",
            elapsed=time.monotonic() - started,
        ) from exc
    except aiohttp.ClientError as exc:
        # str(exc) names the host and the OS error, never the request headers; some errors
        # name the URL, whose query may hold a key.
        raise TransportError(
            _redact(f"{type(exc).__name__}: {exc}", url, headers),
            elapsed=time.monotonic() - started,
        ) from exc
    text = raw.decode("utf-8", errors="replace")
    if status >= 300:
        # Some proxies echo the key (or any header) in error bodies: never let it reach a
        # message, a traceback or the run report.
        error = error_for_status(status, _redact(text, url, headers), reply_headers)
        error.limits = ServerLimits.from_headers(reply_headers)
        raise error
    return parse_completion(text, limits=ServerLimits.from_headers(reply_headers))


def parse_completion(text: str, *, limits: ServerLimits | None = None) -> Completion:
    """Parse a chat.completion body; raise MalformedResponse when it is not one."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MalformedResponse(f"reply is not JSON: {text[:200]!r}") from exc
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise MalformedResponse(f"reply has no choices[0].message.content: {text[:200]!r}") from exc
    if not isinstance(content, str):
        raise MalformedResponse(f"choices[0].message.content is not text: {content!r}"[:300])
    usage = data.get("usage") if isinstance(data, dict) else None
    return Completion(
        text=content,
        finish_reason=choice.get("finish_reason"),
        usage=usage if isinstance(usage, dict) else None,
        limits=limits,
    )


def error_for_status(status: int, text: str, headers: Mapping[str, str]) -> APIError:
    """The exception for an HTTP error reply, with the server's own message when it gave one."""
    message = f"HTTP {status}: {_server_message(text)}"
    if status == 429:
        return RateLimitError(message, body=text, retry_after=retry_after_seconds(headers))
    if status in (408, 409) or status >= 500:
        return ServerError(
            message, status=status, body=text, retry_after=retry_after_seconds(headers)
        )
    if status in (401, 403):
        return AuthError(message, status=status, body=text)
    if status == 404:
        return NotFoundError(message, status=status, body=text)
    return BadRequestError(message, status=status, body=text)


# Request headers that never hold a secret.
_PLAIN_HEADERS = frozenset({"content-type", "accept", "user-agent"})
# Shorter values of other headers and query parameters are left alone: they are not keys,
# and replacing a short word everywhere would garble the server's message.
_SHORTEST_SECRET = 8


def _redact(text: str, url: str, headers: Mapping[str, str]) -> str:
    """``text`` with the key, header values and query values replaced by ``***``."""
    secrets = set()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _PLAIN_HEADERS:
            continue
        value = value.removeprefix("Bearer ").strip()
        if len(value) >= (4 if lowered in ("authorization", "api-key") else _SHORTEST_SECRET):
            secrets.add(value)
    for name, value in parse_qsl(urlsplit(url).query):
        if name != "api-version" and len(value) >= _SHORTEST_SECRET:
            secrets.add(value)
    for secret in sorted(secrets, key=len, reverse=True):  # a key before any part of it
        text = text.replace(secret, "***")
    return text


def _server_message(text: str) -> str:
    try:
        error = json.loads(text)["error"]
        message = error["message"] if isinstance(error, dict) else error
        return str(message)[:500]
    except (ValueError, KeyError, TypeError):
        return text[:500] or "(empty body)"


def _describe(timeout: aiohttp.ClientTimeout) -> str:
    parts = [
        f"{name}={value:g}s"
        for name in ("total", "connect", "sock_read")
        if (value := getattr(timeout, name)) is not None
    ]
    return ", ".join(parts) or "no limit"
