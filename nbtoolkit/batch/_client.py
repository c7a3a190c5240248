"""The Batch API's own calls: upload a file, create, look at and cancel a batch, download.

Beside `nbtoolkit.core._client` (one chat request, one reply) and mapping replies onto the same
exception tree with the same key scrubbing. Control calls are few and cheap, so each is
retried on the same terms as a row (`is_retryable`, the run's `RetryPolicy`), except
creating a batch: a create that timed out may have created it, and creating it again would
pay for every line twice, so only a 429 (which the server did not act on) is retried.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._client import _redact, error_for_status
from nbtoolkit.core._retry import is_retryable
from nbtoolkit.errors import MalformedResponse, RateLimitError, RequestTimeout, TransportError

T = TypeVar("T")


class BatchClient:
    """One session's worth of Batch API calls against ``config``'s base URL.

    Use it as ``async with BatchClient(config) as api:``; the session is bound to the loop.
    """

    def __init__(self, config: ChatConfig) -> None:
        self.config = config
        # The key and the user's headers; each call sets its own content type (multipart).
        self._headers = {
            k: v for k, v in config.request_headers().items() if k.lower() != "content-type"
        }
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeouts.total, sock_connect=config.timeouts.connect
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchClient:
        self._session = aiohttp.ClientSession(trust_env=self.config.use_proxy_env)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def upload(self, content: bytes, *, filename: str) -> str:
        """Upload a JSONL file for a batch; returns its file id."""

        async def once() -> Any:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", content, filename=filename, content_type="application/jsonl")
            return _json(await self._request("POST", "/files", data=form))

        reply = await self._retried(once)
        return _field(reply, "id")

    async def create(self, *, input_file_id: str, endpoint: str, metadata: dict[str, str]) -> Any:
        """Create a batch over an uploaded file; returns the batch object."""
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }

        async def once() -> Any:
            data = json.dumps(body).encode()
            headers = {"Content-Type": "application/json"}
            return _json(await self._request("POST", "/batches", data=data, headers=headers))

        return await self._retried(once, only_rate_limits=True)

    async def get(self, batch_id: str) -> Any:
        """The batch object: status, request_counts, file ids."""
        return await self._retried(
            lambda: self._json_of(self._request("GET", f"/batches/{batch_id}"))
        )

    async def cancel(self, batch_id: str) -> Any:
        return await self._retried(
            lambda: self._json_of(self._request("POST", f"/batches/{batch_id}/cancel"))
        )

    async def content(self, file_id: str) -> str:
        """A file's content as text (an output or error file)."""
        raw = await self._retried(lambda: self._request("GET", f"/files/{file_id}/content"))
        return _redact(
            raw.decode("utf-8", errors="replace"), self.config.url("/files"), self._headers
        )

    async def _json_of(self, raw: Awaitable[bytes]) -> Any:
        return _json(await raw)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        if self._session is None:
            raise RuntimeError("use BatchClient in `async with`")
        url = self.config.url(path)
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                headers={**self._headers, **(headers or {})},
                timeout=self._timeout,
            ) as reply:
                raw = await reply.read()
                status, reply_headers = reply.status, reply.headers
        except TimeoutError as exc:
            raise RequestTimeout(f"{method} {path}: no reply within the timeout") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if status >= 300:
            text = _redact(raw.decode("utf-8", errors="replace"), url, self._headers)
            raise error_for_status(status, text, reply_headers)
        return raw

    async def _retried(
        self, call: Callable[[], Awaitable[T]], *, only_rate_limits: bool = False
    ) -> T:
        policy = self.config.retry
        for attempt in range(1, policy.attempts + 1):
            try:
                return await call()
            except Exception as exc:
                worth = isinstance(exc, RateLimitError) if only_rate_limits else is_retryable(exc)
                if not worth or attempt == policy.attempts:
                    raise
                wait = getattr(exc, "retry_after", None)
                if wait is None:
                    wait = min(policy.wait_max, policy.wait_initial * 2 ** (attempt - 1))
                    wait *= 1 - policy.jitter * random.random()
                await asyncio.sleep(min(wait, policy.retry_after_max))
        raise AssertionError("unreachable")  # the loop returns or raises


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise MalformedResponse(f"reply is not JSON: {raw[:200]!r}") from exc


def _field(reply: Any, name: str) -> str:
    value = reply.get(name) if isinstance(reply, dict) else None
    if not isinstance(value, str):
        raise MalformedResponse(f"reply has no {name!r}: {str(reply)[:200]}")
    return value
