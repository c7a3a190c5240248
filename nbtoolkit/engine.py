"""Run many chat requests at once: a bounded worker pool, retries, ordering, fail-fast.

The engine knows nothing of pandas: it takes any iterable of `ChatRequest` (or None for a
row with nothing to send) and fills `ChatRun.results` in the same order. A partition of a
distributed frame can call it as it is.

Memory stays proportional to ``max_parallel``: a producer pulls requests from the iterable
into a queue of ``2 * max_parallel`` slots, and ``max_parallel`` workers take from it. Only
the results list grows with the row count.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from nbtoolkit.client import Completion, post_chat
from nbtoolkit.config import ChatConfig
from nbtoolkit.errors import (
    APIError,
    AuthError,
    ConfigError,
    NbToolkitError,
    NotFoundError,
    RateLimitError,
    RequestTimeout,
    RunAborted,
    TransportError,
)
from nbtoolkit.limits import RateGovernor, ServerLimits, estimate_tokens
from nbtoolkit.retry import GiveUp, RetryAfterOrBackoff, is_retryable, is_systemic


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One row's request: the messages and any per-row body fields."""

    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RowError:
    """Why a row has no answer.

    ``kind`` is the exception class name (``RateLimitError``, ``RequestTimeout``, ...) or
    one of ``skipped`` (nothing to send: empty prompt), ``not_run`` (the run stopped first)
    and ``cancelled`` (in flight when the run stopped).
    """

    kind: str
    message: str
    status: int | None = None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class RowResult:
    """A row's outcome: the text, or None and the error that explains it."""

    text: str | None
    error: RowError | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ProgressListener(Protocol):
    """What the engine tells a progress display. Called on the event loop's thread."""

    def row_done(self, result: RowResult) -> None: ...

    def row_retried(self) -> None: ...

    def row_waiting(self, seconds: float, reason: str) -> None: ...


@dataclass(slots=True)
class RunStats:
    """Counts a run keeps as it goes; read them after the run or after it stopped."""

    requests_sent: int = 0
    retries: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "429", "RequestTimeout", ...
    started: float = 0.0
    finished: float = 0.0

    @property
    def wall_seconds(self) -> float:
        return max(0.0, (self.finished or time.monotonic()) - self.started)


_TRANSPORT_KINDS = frozenset({"TransportError", "RequestTimeout"})
SKIPPED = RowResult(None, RowError("skipped", "no prompt: the value was missing or empty"))


class _Systemic(Exception):
    """Raised out of a worker to stop the whole task group on a run-wide failure."""

    def __init__(self, error: NbToolkitError) -> None:
        super().__init__(str(error))
        self.error = error


class ChatRun:
    """One run over many requests; keeps its results reachable even if the run is cut short.

    Example:
        >>> run = ChatRun(config)  # doctest: +SKIP
        >>> results = await run.execute([ChatRequest(({"role": "user", "content": "hi"},))])
    """

    def __init__(self, config: ChatConfig, *, listener: ProgressListener | None = None) -> None:
        config = config.resolved()
        if not config.model:
            raise ConfigError(
                "no model: pass model='...' or set it once with nbtoolkit.configure(model='...')"
            )
        self.config = config
        self.listener = listener
        # One slot per request pulled so far; None until that row finishes.
        self.results: list[RowResult | None] = []
        self.stats = RunStats()
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeouts.total,
            sock_connect=config.timeouts.connect,
            sock_read=config.timeouts.read,
        )
        self.governor = RateGovernor(
            max_parallel=config.max_parallel,
            rpm=config.rpm,
            tpm=config.tpm,
            adaptive=config.adaptive,
            on_wait=listener.row_waiting if listener is not None else None,
        )
        self._headers = config.headers()
        self._base_body: dict[str, Any] = {"model": config.model, **config.params}
        # Rows that failed to reach the server before any row succeeded: past a pool's worth,
        # the server is unreachable (wrong port, host down) and every other row would spend
        # all its retries finding that out again.
        self._unreachable_streak = 0
        self._any_success = False

    async def execute(self, requests: Iterable[ChatRequest | None]) -> list[RowResult]:
        """Send every request, at most ``max_parallel`` at once, and return results in order.

        Raises:
            RunAborted: a bad key, a wrong URL or model, or an exhausted quota; ``partial``
                holds the results list, with rows that did not finish marked.
        """
        self.stats.started = time.monotonic()
        workers = self.config.max_parallel
        queue: asyncio.Queue[tuple[int, ChatRequest] | None] = asyncio.Queue(maxsize=2 * workers)
        # Pool sized to the workers: no request ever waits for a connection slot, so the
        # total timeout measures the request alone.
        connector = aiohttp.TCPConnector(limit=workers, limit_per_host=workers)
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                asyncio.TaskGroup() as group,
            ):
                group.create_task(self._produce(requests, queue, workers))
                for _ in range(workers):
                    group.create_task(self._work(session, queue))
        except BaseExceptionGroup as group_error:
            systemic = [e for e in group_error.exceptions if isinstance(e, _Systemic)]
            if not systemic:
                self._mark_unfinished("not_run", f"the run failed: {group_error!r}")
                raise
            cause = systemic[0].error
            self._mark_unfinished("not_run", f"the run was stopped: {cause}")
            raise RunAborted(_abort_message(cause), partial=self.results, cause=cause) from cause
        except BaseException:
            # Interrupted (Ctrl-C, cancellation): the task group has already cancelled and
            # awaited every worker; say which rows did not finish, then let it propagate.
            self._mark_unfinished("cancelled", "the run was interrupted before this row finished")
            raise
        finally:
            self.stats.finished = time.monotonic()
        return [result if result is not None else SKIPPED for result in self.results]

    async def _produce(
        self,
        requests: Iterable[ChatRequest | None],
        queue: asyncio.Queue[tuple[int, ChatRequest] | None],
        workers: int,
    ) -> None:
        for index, request in enumerate(requests):
            self.results.append(None)
            if request is None:
                self._finish(index, SKIPPED)
                continue
            await queue.put((index, request))
        for _ in range(workers):
            await queue.put(None)

    async def _work(
        self,
        session: aiohttp.ClientSession,
        queue: asyncio.Queue[tuple[int, ChatRequest] | None],
    ) -> None:
        while (item := await queue.get()) is not None:
            index, request = item
            result = await self._complete(session, request)
            self._finish(index, result)
            self._check_reachable(result)

    def _check_reachable(self, result: RowResult) -> None:
        if result.error is None:
            self._any_success = True
        elif not self._any_success and result.error.kind in _TRANSPORT_KINDS:
            self._unreachable_streak += 1
            if self._unreachable_streak >= max(3, self.config.max_parallel):
                raise _Systemic(
                    TransportError(f"the server could not be reached: {result.error.message}")
                )

    async def _complete(self, session: aiohttp.ClientSession, request: ChatRequest) -> RowResult:
        policy = self.config.retry
        body = {**self._base_body, **request.params, "messages": list(request.messages)}
        attempts = 0
        retrying = AsyncRetrying(
            stop=GiveUp(policy),
            wait=RetryAfterOrBackoff(policy),
            retry=retry_if_exception(is_retryable),
            before_sleep=self._on_retry,
            reraise=True,
        )
        tokens = estimate_tokens(request.messages, body.get("max_tokens"))
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    completion = await self._send_once(session, body, tokens)
        except NbToolkitError as exc:
            self.stats.statuses[_status_key(exc)] += 1
            if is_systemic(exc):
                raise _Systemic(exc) from exc
            return RowResult(None, _row_error(exc, attempts), attempts)
        except Exception as exc:
            self.stats.statuses[type(exc).__name__] += 1
            return RowResult(None, RowError(type(exc).__name__, str(exc), None, attempts), attempts)
        usage = completion.usage or {}
        return RowResult(
            completion.text,
            None,
            attempts,
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
        )

    async def _send_once(
        self, session: aiohttp.ClientSession, body: Mapping[str, Any], tokens: float
    ) -> Completion:
        """One attempt, admitted by the governor and reported back to it however it ends."""
        started = await self.governor.admit(tokens)
        self.stats.requests_sent += 1
        limits: ServerLimits | None = None
        used: float | None = None
        congested = False
        pause: float | None = None
        try:
            completion = await post_chat(
                session, self.config.endpoint, body, headers=self._headers, timeout=self._timeout
            )
        except RateLimitError as exc:
            limits, congested = exc.limits, True
            pause = self._shared_pause(exc)
            raise
        except RequestTimeout:
            congested = True
            raise
        except APIError as exc:
            limits = exc.limits
            raise
        else:
            self.stats.statuses["200"] += 1
            limits = completion.limits
            used = _total_tokens(completion.usage)
            return completion
        finally:
            self.governor.settle(
                started,
                reserved_tokens=tokens,
                used_tokens=used,
                limits=limits,
                congested=congested,
                pause=pause,
            )

    def _shared_pause(self, exc: RateLimitError) -> float | None:
        """How long a 429 pauses every worker: the server's word, unless past our ceiling."""
        wait = exc.retry_after
        if wait is None and exc.limits is not None:
            wait = exc.limits.reset_requests
        if wait is None or wait > self.config.retry.retry_after_max:
            return None  # no word from the server (AIMD and backoff handle it), or too long
        return wait

    def _on_retry(self, retry_state: RetryCallState) -> None:
        self.stats.retries += 1
        outcome = retry_state.outcome
        if outcome is not None and (exc := outcome.exception()) is not None:
            self.stats.statuses[_status_key(exc)] += 1
        if self.listener is not None:
            self.listener.row_retried()

    def _finish(self, index: int, result: RowResult) -> None:
        self.results[index] = result
        if self.listener is not None:
            self.listener.row_done(result)

    def _mark_unfinished(self, kind: str, message: str) -> None:
        for index, result in enumerate(self.results):
            if result is None:
                self.results[index] = RowResult(None, RowError(kind, message))


def _row_error(exc: Exception, attempts: int) -> RowError:
    status = exc.status if isinstance(exc, APIError) else None
    return RowError(type(exc).__name__, str(exc), status, attempts)


def _status_key(exc: BaseException) -> str:
    return str(exc.status) if isinstance(exc, APIError) else type(exc).__name__


def _total_tokens(usage: Mapping[str, Any] | None) -> float | None:
    if not usage:
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int | float):
        return float(total)
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return float(sum(p for p in parts if isinstance(p, int | float)))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _abort_message(error: NbToolkitError) -> str:
    if isinstance(error, AuthError):
        advice = "check the API key (OPENAI_API_KEY or api_key=) and that it may use this model"
    elif isinstance(error, NotFoundError):
        advice = "check base_url (it usually ends in /v1) and the model name"
    elif isinstance(error, TransportError):
        advice = "check base_url and that the server is running"
    else:
        advice = "the account is out of quota or credit; add credit or use another key"
    return f"run stopped, every row would fail the same way: {error}. What to do: {advice}."
