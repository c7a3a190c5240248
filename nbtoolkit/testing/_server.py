"""An OpenAI-compatible chat-completions server for tests, with scripted misbehaviour.

It is a real aiohttp server on 127.0.0.1 (the OS picks the port), so the code under test
goes through its whole HTTP stack. It answers ``POST {base_url}/chat/completions`` and
``GET {base_url}/models`` (and ``POST {base_url}/embeddings``, see `EmbeddingBehaviour`),
records what it saw, and can be told to fail::

    from nbtoolkit.testing import ChatServer, Reset, Status

    async def test_retries_a_429() -> None:
        async with ChatServer(latency=0.01) as server:
            server.script(Status(429, retry_after=0.1), Reset(), prompt="hi")
            ...  # call server.base_url; "hi" gets a 429, then a dropped connection, then a reply
            assert server.answered["hi"] == 1
            assert server.peak_in_flight <= 4

    def test_sync_entry_point() -> None:
        with ChatServer().run_in_thread() as server:  # its own thread and event loop
            ...

A request takes the first queued action for its prompt (the content of the last user
message), else the first action queued for any prompt, else ``Reply()``, unless `FaultRates`
picks a fault for it. Fault picks hash (seed, prompt, attempt number), so the Nth attempt at a
prompt meets the same fate whatever order concurrent requests arrive in.

With a `RateLimit`, a request first draws from OpenAI-style token buckets as it arrives; one
that finds them short gets a 429 and takes no action and no attempt number, so faults stay
reproducible however the limiter interleaves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import http
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal, Self, get_args

from aiohttp import web

from nbtoolkit.testing import _embeddings as _embeddings
from nbtoolkit.testing import _structured as _structured
from nbtoolkit.testing._batch import BatchAPI, BatchBehaviour
from nbtoolkit.testing._embeddings import EmbeddingBehaviour
from nbtoolkit.testing._lengths import CompletionLengths, SizedAnswers
from nbtoolkit.testing._structured import StructuredFaults, schema_instance

__all__ = [
    "HEADER_FAMILIES",
    "BatchBehaviour",
    "ChatServer",
    "CompletionLengths",
    "EmbeddingBehaviour",
    "FaultRates",
    "HeaderFamily",
    "Malformed",
    "RateLimit",
    "RecordedRequest",
    "Reply",
    "Reset",
    "Stall",
    "Status",
    "StructuredFaults",
    "schema_instance",
]

Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]


@dataclass(frozen=True)
class Reply:
    """A normal 200 completion: `text`, or the server's responder when None."""

    text: str | None = None
    _: KW_ONLY
    latency: float | None = None  # seconds; None -> the server's latency


@dataclass(frozen=True)
class Status:
    """An HTTP error with an OpenAI-style ``{"error": {...}}`` body.

    ``Status(429, retry_after=2)`` sends ``Retry-After: 2``; ``retry_after_ms=500`` sends
    ``retry-after-ms: 500`` (OpenAI's header). `error_code` is e.g. "rate_limit_exceeded" or
    "insufficient_quota".
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


Action = Reply | Status | Reset | Stall | Malformed


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


HeaderFamily = Literal["openai", "groq", "openrouter", "ietf", "ietf-structured", "azure", "none"]
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


@dataclass(frozen=True)
class RecordedRequest:
    """One chat-completions request as the server saw it, and how it ended.

    `outcome` is "ok" (a valid completion was sent), the status as a string for an error
    ("429", "401", ...), "malformed", "reset", "stall" (cut while stalled) or "dropped" (the
    client hung up, or the server stopped, before the reply was written). Times are
    `time.monotonic()`; `attempt` counts earlier requests with the same prompt, leaving out
    those a `RateLimit` turned away.
    """

    body: dict[str, Any]
    headers: dict[str, str]
    prompt: str
    started: float
    finished: float
    status: int | None
    outcome: str
    attempt: int = 0
    path: str = ""  # the URL path, e.g. /v1/chat/completions
    query: dict[str, str] = field(default_factory=dict)  # the URL's query parameters


@dataclass
class _Exchange:
    """The mutable state of a request in progress, frozen into a RecordedRequest at the end."""

    body: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    attempt: int = 0
    status: int | None = None
    outcome: str = "dropped"
    headers: dict[str, str] = field(default_factory=dict)  # added to whatever reply is sent
    inputs: list[str] | None = None  # an embeddings request's texts, each counted as answered


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


# The completion tokens a request without max_tokens is charged for.
_DEFAULT_MAX_TOKENS = 16


class _Limiter:
    """The buckets of one `RateLimit`; only touched on the server's loop."""

    def __init__(self, limit: RateLimit) -> None:
        now = time.monotonic()
        self.limit = limit
        self._requests = _Bucket(limit.burst, limit.requests_per_second, limit.burst, now)
        tpm = limit.tokens_per_minute
        self._tokens = None if tpm is None else _Bucket(tpm, tpm / 60.0, tpm, now)

    def admit(self, body: dict[str, Any], ex: _Exchange) -> web.Response | None:
        """Draw from the buckets; None to go ahead, else the 429 to send."""
        now = time.monotonic()
        requests, tokens = self._requests, self._tokens
        requests.refill(now)
        cost = 0.0
        if tokens is not None:
            tokens.refill(now)
            # A request bigger than the whole bucket could never pass: charge it a full one.
            cost = min(_token_cost(body), tokens.capacity)
        rejection: tuple[str, str, float] | None = None
        if not requests.has(1):
            what = f"requests per min (RPM): Limit {self._rpm()}, Requested 1"
            rejection = ("requests", what, requests.wait_for(1))
        elif tokens is not None and not tokens.has(cost):
            what = f"tokens per min (TPM): Limit {self.limit.tokens_per_minute}, "
            rejection = ("tokens", what + f"Requested {cost:.0f}", tokens.wait_for(cost))
        else:
            requests.level -= 1
            if tokens is not None:
                tokens.level -= cost
        ex.headers.update(self._headers())
        if rejection is None:
            return None
        kind, what, wait = rejection
        message = f"Rate limit reached for {what}. Please try again in {_duration(wait)}."
        response = _error(429, message, type_=kind, err_code="rate_limit_exceeded")
        if self.limit.retry_after:
            response.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000 - 1e-6)))
            response.headers["Retry-After"] = str(max(1, math.ceil(wait - 1e-6)))
        return response

    def _rpm(self) -> int:
        return max(1, round(self.limit.requests_per_second * 60))

    def _headers(self) -> dict[str, str]:
        """The rate headers of the limit's family, as of now."""
        family, requests, tokens = self.limit.headers, self._requests, self._tokens
        limit, remaining = self.limit.stated_limit, requests.remaining()
        if family in ("openai", "groq"):
            headers = _x_ratelimit("requests", limit, remaining, requests.until_full())
            if tokens is not None and self.limit.tokens_per_minute is not None:
                tpm = self.limit.tokens_per_minute
                headers.update(_x_ratelimit("tokens", tpm, tokens.remaining(), tokens.until_full()))
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
        window = _seconds_header(self.limit.stated_window)
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
        f"x-ratelimit-reset-{name}": _duration(until_full),
    }


def _token_cost(body: dict[str, Any]) -> float:
    messages = body.get("messages")
    prompt = (
        sum(_tokens(_text(m.get("content"))) for m in messages if isinstance(m, dict))
        if isinstance(messages, list)
        else 0
    )
    if "input" in body:  # an embeddings request: its inputs, and no completion
        return float(_embeddings.input_tokens(body))
    completion = body.get("max_completion_tokens", body.get("max_tokens"))
    if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
        completion = _DEFAULT_MAX_TOKENS
    return float(prompt + completion)


def _duration(seconds: float) -> str:
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


def _text(content: Any) -> str:
    # Content may be a list of parts ({"type": "text", "text": ...}) in the vision format.
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _last_user_text(messages: Any) -> str:
    """The content of the last message with role "user", or "" when there is none."""
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
    return ""


def _chat_prompt(body: dict[str, Any]) -> str:
    return _last_user_text(body.get("messages"))


def _echo(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    return "echo: " + _last_user_text(messages)


def _tokens(text: str) -> int:
    # A rough estimate (about four characters a token), enough for usage arithmetic in tests.
    return len(text) // 4 + 1


def _seconds_header(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _error(code: int, message: str, *, type_: str, err_code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": err_code}}
    return web.json_response(body, status=code)


class ChatServer:
    """An OpenAI-compatible ``/chat/completions`` server on 127.0.0.1 for tests.

    Args:
        latency: Seconds every successful reply waits before it is sent.
        api_key: When set, any other ``Authorization: Bearer`` value gets a 401.
        responder: Builds the reply text from (messages, request body); the default echoes
            the last user message as ``"echo: <text>"``.
        faults: Random but reproducible faults for requests without a scripted action.
        record: False keeps no per-request list (for big benchmarks); counters still work.
        model_names: When given, other models get a 404 ``model_not_found``.
        rate_limit: Request (and token) buckets, and the rate headers to describe them;
            see `RateLimit`.
        azure: Speak Azure OpenAI's conventions instead of OpenAI's: the key comes in an
            ``api-key`` header (401 otherwise), and requests go to
            ``/openai/deployments/{deployment}/chat/completions?api-version=...`` (a 404
            without ``api-version``; the deployment is the model) or to the v1 form
            ``/openai/v1/chat/completions`` (which also takes ``Authorization: Bearer``).
            `azure_endpoint` is the resource URL to give the client.
        embeddings: how ``/v1/embeddings`` answers; see `EmbeddingBehaviour`.
        batch: how the Batch API (``/files``, ``/batches``) behaves; see `BatchBehaviour`.
            Its files, batches and counters are on ``server.batch``.
        structured: how answers to a JSON Schema go wrong; see `StructuredFaults`. A
            request with a schema always gets a valid instance (`schema_instance`) otherwise.
        lengths: answers whose length varies by row (seeded, long-tailed), with reasoning
            tokens and a prompt cache reported in ``usage``; see `CompletionLengths`.

    Counters (`request_count`, `in_flight`, `peak_in_flight`, `answered`, `statuses`) are
    only written by the server's loop, so reading them from another thread is safe.
    `statuses` counts the `RecordedRequest.outcome` of each finished request.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        responder: Responder | None = None,
        faults: FaultRates | None = None,
        record: bool = True,
        model_names: Iterable[str] | None = None,
        rate_limit: RateLimit | None = None,
        azure: bool = False,
        embeddings: EmbeddingBehaviour | None = None,
        batch: BatchBehaviour | None = None,
        structured: StructuredFaults | None = None,
        lengths: CompletionLengths | None = None,
    ) -> None:
        self.latency = latency
        self._sized = None if lengths is None else SizedAnswers(lengths)
        self.azure = azure
        self.embeddings = embeddings or EmbeddingBehaviour()
        self.rate_limit = rate_limit
        self._api_key = api_key
        self._responder = responder or _echo
        self._faults = faults
        self._structured = structured
        self._record = record
        self._models = None if model_names is None else tuple(model_names)
        # script() is called from the test's thread while requests pop on the server's loop.
        self._lock = threading.Lock()
        self._global: collections.deque[Action] = collections.deque()
        self._by_prompt: dict[str, collections.deque[Action]] = {}
        # Attempt numbers drive fault picks, so reset_records() leaves them alone.
        self._seen: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = False
        # Pending waits, woken at shutdown so stalled handlers never hold up runner.cleanup().
        self._sleepers: set[asyncio.Future[None]] = set()
        self._limiter: _Limiter | None = None
        self.in_flight = 0
        self.batch = BatchAPI(
            batch or BatchBehaviour(),
            responder=self._responder,
            completion=lambda model, messages, text: (
                self._completion(model, messages, text).text or ""
            ),
            authorized=self._authorized,
            auth_error=self._auth_error,
        )
        self.reset_records()

    def reset_records(self) -> None:
        """Forget recorded requests and zero the counters (scripts and attempts stay)."""
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        # Requests still in flight keep counting: they decrement in_flight when they end.
        self.peak_in_flight = self.in_flight
        self.answered: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()

    def script(self, *actions: Action, prompt: str | None = None) -> None:
        """Queue `actions` for the next requests with `prompt`, or for any prompt when None.

        Safe to call from any thread while the server runs.
        """
        with self._lock:
            if prompt is None:
                self._global.extend(actions)
            else:
                self._by_prompt.setdefault(prompt, collections.deque()).extend(actions)

    @property
    def port(self) -> int:
        """The port the OS picked; only valid while the server runs."""
        if self._port is None:
            raise RuntimeError("ChatServer is not running; use `async with` or run_in_thread()")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the OpenAI ``base_url`` to give the client.

        In `azure` mode, the v1 form: ``http://127.0.0.1:PORT/openai/v1``.
        """
        if self.azure:
            return f"{self.azure_endpoint}/openai/v1"
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the resource URL, as in ``$AZURE_OPENAI_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start listening on 127.0.0.1 on a free port."""
        if self._runner is not None:
            raise RuntimeError("ChatServer is already running")
        app = web.Application()
        if self.azure:
            app.router.add_post("/openai/v1/chat/completions", self._chat)
            app.router.add_post("/openai/v1/embeddings", self._embed)
            app.router.add_get("/openai/v1/models", self._list_models)
            app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
            app.router.add_post("/openai/deployments/{deployment}/embeddings", self._embed)
        else:
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/v1/embeddings", self._embed)
            app.router.add_get("/v1/models", self._list_models)
        self.batch.add_routes(app)
        # handler_cancellation: a client hanging up ends its handler (and a Stall) at once.
        # shutdown_timeout: handlers still running at stop are cancelled after a second.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._closing = False
        # Full buckets on every start: a limit's history never leaks into the next run.
        self._limiter = None if self.rate_limit is None else _Limiter(self.rate_limit)
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop the server, cutting stalled requests short."""
        if self._runner is None:
            return
        self._closing = True
        for sleeper in list(self._sleepers):
            if not sleeper.done():
                sleeper.set_result(None)
        runner, self._runner, self._port = self._runner, None, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self, *, timeout: float = 10.0) -> Iterator[Self]:
        """Run the server on a daemon thread with its own event loop, for sync tests.

        Args:
            timeout: Seconds to wait for the server to start, and to stop.

        Returns:
            A context manager that yields this server once it is listening.
        """
        ready = threading.Event()
        handle: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        failure: list[BaseException] = []

        async def serve() -> None:
            done = asyncio.Event()
            async with self:
                handle.append((asyncio.get_running_loop(), done))
                ready.set()
                await done.wait()

        def main() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:
                failure.append(exc)
            finally:
                ready.set()

        thread = threading.Thread(target=main, name="nbtoolkit-chat-server", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"ChatServer did not start within {timeout} s")
        if failure:
            raise RuntimeError("ChatServer failed to start") from failure[0]
        loop, done = handle[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(done.set)
            thread.join(timeout)

    async def _wait(self, seconds: float) -> bool:
        """Sleep `seconds`; False when the server started stopping meanwhile."""
        if seconds > 0 and not self._closing:
            loop = asyncio.get_running_loop()
            sleeper: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(seconds, _wake, sleeper)
            self._sleepers.add(sleeper)
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleepers.discard(sleeper)
        return not self._closing

    def _next_action(self, prompt: str) -> tuple[Action, int]:
        with self._lock:
            attempt = self._seen[prompt]
            self._seen[prompt] += 1
            queue = self._by_prompt.get(prompt)
            if queue:
                return queue.popleft(), attempt
            if self._global:
                return self._global.popleft(), attempt
        fault = self._faults.pick(prompt, attempt) if self._faults else None
        return fault or Reply(), attempt

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, embeddings=True)

    async def _chat(self, request: web.Request, *, embeddings: bool = False) -> web.StreamResponse:
        started = time.monotonic()
        self.request_count += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        ex = _Exchange()
        try:
            return await self._handle(request, ex, embeddings=embeddings)
        finally:
            self.in_flight -= 1
            self.statuses[ex.outcome] += 1
            if ex.outcome == "ok" and ex.inputs is not None:
                self.answered.update(ex.inputs)
            elif ex.outcome == "ok":
                self.answered[ex.prompt] += 1
            if self._record:
                record = RecordedRequest(
                    body=ex.body,
                    headers=dict(request.headers),
                    prompt=ex.prompt,
                    started=started,
                    finished=time.monotonic(),
                    status=ex.status,
                    outcome=ex.outcome,
                    attempt=ex.attempt,
                    path=request.path,
                    query=dict(request.query),
                )
                self.requests.append(record)

    async def _handle(
        self, request: web.Request, ex: _Exchange, *, embeddings: bool = False
    ) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            ex.body = body
            get_prompt = _embeddings.first_input if embeddings else _chat_prompt
            ex.prompt = get_prompt(body)
        if not self._authorized(request):
            return await self._send(request, ex, self._auth_error())
        deployment = request.match_info.get("deployment")
        if deployment is not None and not request.query.get("api-version"):
            # What Azure answers a deployment URL without its api-version.
            msg = "Resource not found: deployment URLs need an api-version query parameter"
            return await self._send(request, ex, _error(404, msg, type_=_INVALID, err_code="404"))
        if not isinstance(body, dict):
            msg = "We could not parse the JSON body of your request."
            return await self._send(request, ex, _error(400, msg, type_=_INVALID, err_code=None))
        model = deployment or body.get("model", "test-model")
        if self._models is not None and model not in self._models:
            msg = f"The model `{model}` does not exist"
            response = _error(404, msg, type_=_INVALID, err_code="model_not_found")
            return await self._send(request, ex, response)
        if self._limiter is not None:
            rejection = self._limiter.admit(body, ex)
            if rejection is not None:
                with self._lock:
                    ex.attempt = self._seen[ex.prompt]
                return await self._send(request, ex, rejection)

        refused = _structured.rejection(body, self._structured)
        if refused is not None:
            response = _error(refused.status, refused.message, type_=refused.type, err_code=None)
            return await self._send(request, ex, response)
        action, ex.attempt = self._next_action(ex.prompt)
        if isinstance(action, Reset):
            ex.outcome = "reset"
            return _abort(request)
        if isinstance(action, Status):
            if not await self._wait(action.latency):
                return _abort(request)
            return await self._send(request, ex, _status_response(action))
        if isinstance(action, Malformed):
            response = web.Response(
                status=action.status, text=action.body, content_type=action.content_type
            )
            return await self._send(request, ex, response, outcome="malformed")
        if isinstance(action, Stall):
            ex.outcome = "stall"
            if not await self._wait(action.seconds):
                return _abort(request)
            ex.outcome = "dropped"
            action = Reply()
        latency = self.latency if action.latency is None else action.latency
        if not await self._wait(latency):
            return _abort(request)
        if embeddings:
            return await _embeddings.answer(self, request, ex, body)
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        shaped = _structured.answer(body, self._structured) if action.text is None else None
        if shaped is not None:
            reply = self._completion(model, messages, shaped.text, *shaped[1:])
            return await self._send(request, ex, reply, outcome="ok")
        if self._sized is not None and action.text is None:
            reply = self._sized_completion(model, messages, body, ex.prompt)
            return await self._send(request, ex, reply, outcome="ok")
        text = action.text if action.text is not None else self._responder(messages, body)
        return await self._send(request, ex, self._completion(model, messages, text), outcome="ok")

    def _sized_completion(
        self, model: Any, messages: list[dict[str, Any]], body: dict[str, Any], prompt: str
    ) -> web.Response:
        """A reply of the length `CompletionLengths` draws for this prompt, usage and all."""
        assert self._sized is not None
        counts = [_tokens(_text(m.get("content"))) for m in messages if isinstance(m, dict)]
        prefix = json.dumps(messages[:-1], sort_keys=True).encode()
        text, finish, usage = self._sized.reply(
            prompt=prompt,
            prompt_tokens=sum(counts),
            prefix_tokens=sum(counts[:-1]),
            prefix=prefix,
            body=body,
        )
        return self._completion(model, messages, text, finish, usage=usage)

    async def _send(
        self,
        request: web.Request,
        ex: _Exchange,
        response: web.StreamResponse,
        *,
        outcome: str | None = None,
    ) -> web.StreamResponse:
        response.headers.update(ex.headers)
        # Written here, not by aiohttp after we return, so in_flight covers the write.
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            return response
        ex.status = response.status
        ex.outcome = outcome or str(response.status)
        return response

    def _authorized(self, request: web.Request) -> bool:
        if self._api_key is None:
            return True
        bearer = f"Bearer {self._api_key}".encode()
        given = request.headers.get("Authorization", "").encode()
        if self.azure:
            key = request.headers.get("api-key", "").encode()
            if hmac.compare_digest(key, self._api_key.encode()):
                return True
            # Azure's v1 API also takes the key as a bearer token, as the openai SDK sends it.
            return request.path.startswith("/openai/v1/") and hmac.compare_digest(given, bearer)
        return hmac.compare_digest(given, bearer)

    def _auth_error(self) -> web.Response:
        # Never echo the key the client sent: tests check that it cannot leak through errors.
        if self.azure:
            msg = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
            return _error(401, msg, type_=_INVALID, err_code="401")
        msg = "Incorrect API key provided."
        return _error(401, msg, type_=_INVALID, err_code="invalid_api_key")

    def _completion(
        self,
        model: Any,
        messages: list[dict[str, Any]],
        text: str | None,
        finish_reason: str = "stop",
        refusal: str | None = None,
        *,
        usage: dict[str, Any] | None = None,
    ) -> web.Response:
        prompt_tokens = sum(
            _tokens(_text(m.get("content"))) for m in messages if isinstance(m, dict)
        )
        completion_tokens = _tokens(text or refusal or "")
        message = {"role": "assistant", "content": text}
        if refusal is not None:
            message["refusal"] = refusal
        usage = usage or {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        body = {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage,
        }
        return web.json_response(body)

    async def _list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._auth_error()
        names = self._models or ("test-model",)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "nbtoolkit"} for n in names]
        return web.json_response({"object": "list", "data": data})


_INVALID = "invalid_request_error"


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


def _abort(request: web.Request) -> web.StreamResponse:
    # No HTTP response at all: aiohttp's write of the returned object fails quietly on the
    # aborted transport, and the client sees the connection drop.
    if request.transport is not None:
        request.transport.abort()
    return web.Response()


def _status_response(action: Status) -> web.Response:
    if action.error_type is not None:
        type_ = action.error_type
    elif action.code == 429:
        type_ = "requests"
    else:
        type_ = "server_error" if action.code >= 500 else _INVALID
    try:
        default_message = http.HTTPStatus(action.code).phrase
    except ValueError:  # a code with no standard name, e.g. 529
        default_message = f"Error {action.code}"
    message = action.message or default_message
    response = _error(action.code, message, type_=type_, err_code=action.error_code)
    response.headers.update(action.headers)
    if action.retry_after is not None:
        response.headers["Retry-After"] = _seconds_header(action.retry_after)
    if action.retry_after_ms is not None:
        response.headers["retry-after-ms"] = str(action.retry_after_ms)
    return response
