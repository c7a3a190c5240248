"""Run many chat requests at once: a bounded worker pool, retries, ordering, fail-fast.

The engine knows nothing of pandas: it takes any iterable of `ChatRequest` (or None for a
row with nothing to send) and fills `ChatRun.results` in the same order. A partition of a
distributed frame can call it as it is.

The path of one row::

    producer ── cache hit? ──────────────► result (no request)
       │   └── same request in flight? ──► waits for it, shares its answer
       ▼
    queue (2 x max_parallel) ─► worker ─► budget ─► governor ─► client ─► cache.put

Memory stays proportional to ``max_parallel``: the producer pulls requests from the
iterable only as the queue drains. Only the results list grows with the row count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sqlite3
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from nbtoolkit.budget import Budget
from nbtoolkit.cache import CachedAnswer, RequestKeys, ResponseCache, encode_body
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
from nbtoolkit.rows import (
    SKIPPED,
    ChatRequest,
    ProgressListener,
    RowError,
    RowResult,
    RunStats,
)

# Requests looked up in the cache with one query: large enough to make a fully cached
# re-run cheap, small enough not to hold the first requests back.
_LOOKUP_BATCH = 256
# The longest an answer waits for its commit: what a killed process can lose, at most.
_COMMIT_EVERY = 0.020
_DEFAULT_COMPLETION_BUDGET = 256  # tokens counted for a request that sets no max_tokens


@dataclass(slots=True)
class _Job:
    """A request on its way: its row, its body, its cache key, its worst-case tokens."""

    index: int
    body: dict[str, Any]
    payload: bytes  # the body as sent
    key: bytes | None

    def worst_case(self) -> tuple[float, float]:
        """Estimated prompt tokens, and the completion tokens the request may use at most."""
        completion = self.body.get("max_tokens") or self.body.get("max_completion_tokens")
        if not isinstance(completion, int | float):
            completion = _DEFAULT_COMPLETION_BUDGET
        return estimate_tokens(self.body["messages"], 0), float(completion)


class _Attempts(Exception):
    """A row's last error after tenacity gave up, with how many attempts it took."""

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class _OverBudget(Exception):
    """A request that would pass max_cost / max_tokens_total; its row is not sent."""


# Failures that say nothing answered at all (refused, reset, no connection in time). A total
# timeout is left out: a live server that is merely slower than the timeout is reachable.
_UNREACHABLE_KINDS = frozenset({"TransportError"})


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
        self.budget = Budget(
            model=config.model,
            prices=config.prices,
            max_tokens_total=config.max_tokens_total,
            max_cost=config.max_cost,
        )
        self.governor = RateGovernor(
            max_parallel=config.max_parallel,
            rpm=config.rpm,
            tpm=config.tpm,
            adaptive=config.adaptive,
            on_wait=listener.row_waiting if listener is not None else None,
        )
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeouts.total,
            sock_connect=config.timeouts.connect,
            sock_read=config.timeouts.read,
            # aiohttp rounds timeouts of 5 s and more up to whole seconds (cheaper timers);
            # a 5 s timeout that fires at 5.9 s only delays the retry. Keep them exact.
            ceil_threshold=float("inf"),
        )
        self._headers = config.request_headers()
        self._base_body: dict[str, Any] = {"model": config.model, **config.params}
        self._cache: ResponseCache | None = None
        self._keys = RequestKeys(config.key_url("/chat/completions"))
        # Cache key -> rows waiting for the same request, which is queued or in flight.
        self._pending: dict[bytes, list[int]] = {}
        self._sending: set[int] = set()  # rows a worker holds right now
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_commit = -math.inf  # loop time
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
        queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * workers)
        self._cache = _open_cache(self.config.cache_path)
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
            self.stats.cost = self.budget.cost if self.budget.price(0, 0) is not None else None
            if self._commit_timer is not None:
                self._commit_timer.cancel()  # a notebook's loop runs on after this run
                self._commit_timer = None
            if self._cache is not None:
                try:
                    self._cache.close()  # commits what is still waiting for the timer
                    self._cache = None
                except sqlite3.Error as exc:
                    self._cache_failed(exc)
        return [result if result is not None else SKIPPED for result in self.results]

    async def _produce(
        self,
        requests: Iterable[ChatRequest | None],
        queue: asyncio.Queue[_Job | None],
        workers: int,
    ) -> None:
        batch: list[_Job] = []
        for index, request in enumerate(requests):
            self.results.append(None)
            if request is None:
                self._finish(index, SKIPPED)
                continue
            batch.append(self._job(index, request))
            if len(batch) >= _LOOKUP_BATCH:
                await self._dispatch(batch, queue)
                batch = []
        await self._dispatch(batch, queue)
        for _ in range(workers):
            await queue.put(None)

    def _job(self, index: int, request: ChatRequest) -> _Job:
        body = {**self._base_body, **request.params, "messages": list(request.messages)}
        payload = encode_body(body)
        wants_key = self._cache is not None or self.config.dedupe
        return _Job(index, body, payload, self._keys.key(payload) if wants_key else None)

    async def _dispatch(self, batch: list[_Job], queue: asyncio.Queue[_Job | None]) -> None:
        """Answer what the cache knows, attach duplicates to their twin, queue the rest."""
        if not batch:
            return
        hits: dict[bytes, CachedAnswer] = {}
        if self._cache is not None:
            hits = self._cache.get_many([job.key for job in batch if job.key is not None])
        for job in batch:
            if job.key is not None and (answer := hits.get(job.key)) is not None:
                self.stats.cache_hits += 1
                self._finish(job.index, _from_cache(answer))
                continue
            if job.key is not None and self.config.dedupe:
                twins = self._pending.get(job.key)
                if twins is not None:
                    twins.append(job.index)
                    continue
                self._pending[job.key] = []
            await queue.put(job)

    async def _work(
        self, session: aiohttp.ClientSession, queue: asyncio.Queue[_Job | None]
    ) -> None:
        while (job := await queue.get()) is not None:
            self._sending.add(job.index)
            result = await self._complete(session, job)
            self._sending.discard(job.index)
            self._finish(job.index, result)
            if job.key is not None:
                if result.text is not None and self._cache is not None:
                    self._save(self._cache, job.key, result)
                for twin in self._pending.pop(job.key, ()):
                    self.stats.duplicates += 1
                    self._finish(twin, _shared(result))
            self._check_reachable(result)

    def _save(self, cache: ResponseCache, key: bytes, result: RowResult) -> None:
        try:
            cache.put(key, _to_cache(result), model=self.config.model)
            if self._commit_timer is None:
                # Commit once this loop turn's replies are all in, or, when replies pour in,
                # once per _COMMIT_EVERY: each commit costs ~100 us of CPU however few it holds.
                loop = asyncio.get_running_loop()
                self._commit_timer = loop.call_at(self._last_commit + _COMMIT_EVERY, self._commit)
        except sqlite3.Error as exc:
            self._cache_failed(exc)

    def _commit(self) -> None:
        self._commit_timer = None
        self._last_commit = asyncio.get_running_loop().time()
        if self._cache is None:
            return
        try:
            self._cache.commit()
        except sqlite3.Error as exc:
            self._cache_failed(exc)

    def _cache_failed(self, exc: sqlite3.Error) -> None:
        # A full disk or a lock held too long must not cost the answers themselves: rows keep
        # them, only a re-run would pay again. Say so once, then go on without the cache.
        warnings.warn(
            f"response cache write failed, carrying on without it: {exc}",
            RuntimeWarning,
            stacklevel=1,
        )
        if self._cache is not None:
            with contextlib.suppress(sqlite3.Error):
                self._cache.close()
        self._cache = None

    def _check_reachable(self, result: RowResult) -> None:
        if result.error is None:
            self._any_success = True
        elif not self._any_success and result.error.kind in _UNREACHABLE_KINDS:
            self._unreachable_streak += 1
            if self._unreachable_streak >= max(3, self.config.max_parallel):
                raise _Systemic(
                    TransportError(f"the server could not be reached: {result.error.message}")
                )

    async def _complete(self, session: aiohttp.ClientSession, job: _Job) -> RowResult:
        attempts = 1
        try:
            try:
                completion = await self._send_once(session, job)
            except Exception as first_error:
                if not is_retryable(first_error) or GiveUp(self.config.retry).first(first_error):
                    raise
                completion, attempts = await self._retry(session, job, first_error)
        except _Attempts as failed:
            return self._failed(failed.error, failed.attempts)
        except Exception as exc:
            return self._failed(exc, attempts)
        usage = completion.usage or {}
        details = usage.get("prompt_tokens_details")
        return RowResult(
            completion.text,
            None,
            attempts,
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            cached_tokens=_int_or_none(details.get("cached_tokens"))
            if isinstance(details, Mapping)
            else None,
        )

    async def _retry(
        self, session: aiohttp.ClientSession, job: _Job, first_error: Exception
    ) -> tuple[Completion, int]:
        """Attempts 2 and on, run by tenacity. The first attempt went outside it, because
        tenacity's bookkeeping costs more CPU than a whole request to a fast server; tenacity
        is handed the first failure as its own attempt 1, so its stop and wait rules see
        exactly what happened."""
        policy = self.config.retry
        replay: list[Exception] = [first_error]

        async def attempt() -> Completion:
            if replay:
                raise replay.pop()
            return await self._send_once(session, job)

        retrying = AsyncRetrying(
            stop=GiveUp(policy),
            wait=RetryAfterOrBackoff(policy),
            retry=retry_if_exception(is_retryable),
            before_sleep=self._on_retry,
            reraise=True,
        )
        try:
            completion: Completion = await retrying(attempt)
        except Exception as exc:
            raise _Attempts(exc, retrying.statistics.get("attempt_number", 1)) from exc
        return completion, int(retrying.statistics.get("attempt_number", 1))

    def _failed(self, exc: Exception, attempts: int) -> RowResult:
        """The result of a row whose attempt number ``attempts`` failed with ``exc``."""
        if isinstance(exc, _OverBudget):  # that attempt was never sent
            sent = attempts - 1
            return RowResult(None, RowError("over_budget", self.budget.reason(), None, sent), sent)
        self.stats.statuses[_status_key(exc)] += 1
        if isinstance(exc, NbToolkitError) and is_systemic(exc):
            raise _Systemic(exc) from exc
        return RowResult(None, _row_error(exc, attempts), attempts)

    async def _send_once(self, session: aiohttp.ClientSession, job: _Job) -> Completion:
        """One attempt: within budget, admitted by the governor, reported back to both."""
        prompt_tokens, completion_tokens = job.worst_case()
        if self.budget.limited and not self.budget.try_reserve(prompt_tokens, completion_tokens):
            raise _OverBudget()
        reserved = prompt_tokens + completion_tokens
        ticket = await self.governor.admit(reserved)
        self.stats.requests_sent += 1
        limits: ServerLimits | None = None
        used: float | None = None
        congested = False
        pause: float | None = None
        try:
            completion = await post_chat(
                session,
                self.config.endpoint,
                job.payload,
                headers=self._headers,
                timeout=self._timeout,
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
            used = self._spend(completion.usage)
            return completion
        finally:
            if self.budget.limited:
                self.budget.release(prompt_tokens, completion_tokens)
            self.governor.settle(
                ticket,
                reserved_tokens=reserved,
                used_tokens=used,
                limits=limits,
                congested=congested,
                pause=pause,
            )

    def _spend(self, usage: Mapping[str, Any] | None) -> float | None:
        """Count a reply's billed tokens; returns their total (None if it reported none)."""
        if not usage:
            return None
        prompt = _int_or_none(usage.get("prompt_tokens")) or 0
        completion = _int_or_none(usage.get("completion_tokens")) or 0
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping):
            self.stats.cached_tokens += _int_or_none(details.get("cached_tokens")) or 0
        self.budget.spend(prompt, completion)
        return float(prompt + completion)

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
        """Give every row without a result its reason: ``kind`` if it was in flight, else
        ``not_run`` (it was still waiting its turn)."""
        in_flight = RowResult(None, RowError(kind, message))
        waiting = RowResult(None, RowError("not_run", message))
        for index, result in enumerate(self.results):
            if result is None:
                self.results[index] = in_flight if index in self._sending else waiting


def _open_cache(path: Path | None) -> ResponseCache | None:
    if path is None:
        return None
    try:
        return ResponseCache(path)
    except (OSError, sqlite3.Error) as exc:
        # An unwritable cache folder should not stop the work; it only loses the checkpoint.
        warnings.warn(
            f"response cache {path} unavailable, running without it: {exc}",
            RuntimeWarning,
            stacklevel=1,
        )
        return None


def _from_cache(answer: CachedAnswer) -> RowResult:
    # Token counts are what the answer cost when it was bought; this run paid nothing.
    return RowResult(
        answer.text,
        None,
        0,
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.cached_tokens,
        "cache",
    )


def _to_cache(result: RowResult) -> CachedAnswer:
    assert result.text is not None
    return CachedAnswer(
        result.text, result.prompt_tokens, result.completion_tokens, result.cached_tokens
    )


def _shared(result: RowResult) -> RowResult:
    return dataclasses.replace(result, attempts=0, source="duplicate")


def _row_error(exc: Exception, attempts: int) -> RowError:
    status = exc.status if isinstance(exc, APIError) else None
    return RowError(type(exc).__name__, str(exc), status, attempts)


def _status_key(exc: BaseException) -> str:
    return str(exc.status) if isinstance(exc, APIError) else type(exc).__name__


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
