"""The Batch API's HTTP calls, made through the engine's own client and retry policy.

Every call goes through `nbtoolkit.core._client.send`, the same code a row's request goes
through: one error mapping onto `nbtoolkit.errors`, the key and header values scrubbed from
every message, the run's `Timeouts`. Retries are the engine's too: tenacity with the run's
`RetryPolicy`, `is_retryable` deciding and a server's ``Retry-After`` believed, except for
creating a batch: a create that timed out may have created it, and creating it again would
pay for every line twice, so only a 429 (which the server did not act on) is retried.

Only two things differ from a row's request, because files are large: an upload's timeout
grows with its size (`upload_timeout`), and a download is cut only by a silence, never by
its total time.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception

from nbtoolkit.config import ChatConfig, Timeouts
from nbtoolkit.core._client import Redactor, client_timeout, send
from nbtoolkit.core._retry import GiveUp, RetryAfterOrBackoff, is_retryable
from nbtoolkit.errors import MalformedResponse, RateLimitError

if TYPE_CHECKING:  # imported by the first Batch API call, not by `import nbtoolkit`
    import aiohttp

T = TypeVar("T")

# The slowest upload we allow for, in bytes per second: a 200 MB file gets 200 s on top of
# the request timeout. A chat request's 120 s would cut a large file off half-way, forever.
UPLOAD_BYTES_PER_SECOND = 1_000_000


def upload_timeout(timeouts: Timeouts, size: int) -> aiohttp.ClientTimeout:
    """The timeout for uploading ``size`` bytes: the request's, plus a second per MB."""
    return client_timeout(timeouts, total=timeouts.total + size / UPLOAD_BYTES_PER_SECOND)


class BatchHTTP:
    """One session's worth of Batch API calls with ``config``'s key, headers and policy.

    Use it as ``async with BatchHTTP(config) as http:``; the session is bound to the loop.
    """

    def __init__(self, config: ChatConfig) -> None:
        self.config = config
        # The key and the user's headers; each call sets its own content type (multipart).
        self.headers = {
            k: v for k, v in config.request_headers().items() if k.lower() != "content-type"
        }
        import aiohttp

        self._timeout = client_timeout(config.timeouts, total=config.timeouts.total)
        # A download (an output file may be hundreds of MB) ends when the server goes
        # silent for the request timeout, not after a total time.
        self._download = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeouts.connect, sock_read=config.timeouts.total
        )
        # Every URL of the API carries the config's query: one redactor serves them all.
        self._redact = Redactor(config.url(""), self.headers)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchHTTP:
        import aiohttp

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

    async def get_json(self, url: str) -> Any:
        """GET a JSON object (a batch's status)."""

        async def once() -> Any:
            return await self._json("GET", url)

        return await self._retried(once)

    async def post_json(self, url: str, body: Mapping[str, Any] | None, *, creates: bool) -> Any:
        """POST a JSON body; ``creates``: the call makes something that costs money, so
        only a 429 is retried (a timed-out create may have created it)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}

        async def once() -> Any:
            return await self._json("POST", url, data=data, headers=headers)

        return await self._retried(once, only_429=creates)

    async def upload(
        self, url: str, fields: Mapping[str, str], content: bytes, *, name: str
    ) -> Any:
        """POST a file as multipart (``fields`` beside it), with a timeout for its size."""

        import aiohttp

        async def once() -> Any:
            form = aiohttp.FormData()
            for field, value in fields.items():
                form.add_field(field, value)
            form.add_field("file", content, filename=name, content_type="application/jsonl")
            timeout = upload_timeout(self.config.timeouts, len(content))
            return await self._json("POST", url, data=form, timeout=timeout)

        return await self._retried(once)

    async def text(self, url: str) -> str:
        """GET a file's content as text, with the key and header values scrubbed from it."""

        async def once() -> str:
            reply = await self._send("GET", url, timeout=self._download)
            return self._redact(reply)

        return await self._retried(once)

    async def _json(
        self,
        method: str,
        url: str,
        *,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        text = await self._send(method, url, data=data, headers=headers, timeout=timeout)
        # Scrubbed before anything reads it: a gateway that echoes the request would put
        # the key into an error message about the reply.
        text = self._redact(text)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise MalformedResponse(f"reply is not JSON: {text[:200]!r}") from exc

    async def _send(
        self,
        method: str,
        url: str,
        *,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> str:
        if self._session is None:
            raise RuntimeError("use BatchHTTP in `async with`")
        reply = await send(
            self._session,
            method,
            url,
            data=data,
            headers={**self.headers, **(headers or {})},
            timeout=timeout or self._timeout,
        )
        return reply.text

    async def _retried(self, call: Callable[[], Awaitable[T]], *, only_429: bool = False) -> T:
        """``call`` under the run's retry policy (``call`` must be an ``async def``)."""
        policy = self.config.retry
        retrying = AsyncRetrying(
            stop=GiveUp(policy),
            wait=RetryAfterOrBackoff(policy),
            retry=retry_if_exception(
                (lambda e: isinstance(e, RateLimitError) and is_retryable(e))
                if only_429
                else is_retryable
            ),
            reraise=True,
        )
        result: T = await retrying(call)
        return result
