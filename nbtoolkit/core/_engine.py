"""Run many requests at once: a bounded worker pool, retries, ordering, fail-fast.

The engine knows nothing of pandas, nor of any one endpoint's wire format: it takes any
iterable of requests (or None for a row with nothing to send), an `Endpoint` that knows
how they become bodies and how replies become answers, and fills `ChatRun.results` in the
same order. A partition of a distributed frame can call it as it is.

The path of one row::

    producer ── endpoint.item ── cache hit? ─────────────► result (no request)
       │                    └── same request in flight? ──► waits for it, shares its answer
       ▼
    group (endpoint.max_items rows) ─► queue (2 x max_parallel) ─► worker
       ─► budget ─► governor ─► client ─► breaker ─► endpoint.parse ─► cache

Memory stays proportional to ``max_parallel``: the producer pulls requests from the
iterable only as the queue drains. Only the results list grows with the row count.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._breaker import (
    REFUSALS_TO_STOP,
    CircuitBreaker,
    RefusalWatch,
    Verdict,
    refused_parameter,
)
from nbtoolkit.core._budget import Budget
from nbtoolkit.core._cachewriter import CacheWriter
from nbtoolkit.core._client import Redactor, Reply, post_json
from nbtoolkit.core._limits import RateGovernor, ServerLimits
from nbtoolkit.core._pricing import Price, config_price
from nbtoolkit.core._retry import GiveUp, RetryAfterOrBackoff, is_retryable, is_systemic
from nbtoolkit.core._rows import SKIPPED, ProgressListener, RowError, RowResult, RunStats
from nbtoolkit.core.endpoints._base import (
    Answer,
    Endpoint,
    Item,
    Outcome,
    Parsed,
    Reask,
    reasoning_tokens,
    usage_counts,
)
from nbtoolkit.core.endpoints._providers import chat_endpoint
from nbtoolkit.core.store._cache import CachedAnswer, RequestKeys
from nbtoolkit.errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConfigError,
    IgnoredParameter,
    NbToolkitError,
    NotFoundError,
    RateLimitError,
    RequestTimeout,
    RunAborted,
    SchemaRefused,
    TransportError,
    UnsendableRow,
)

# Requests looked up in the cache with one query: large enough to make a fully cached
# re-run cheap, small enough not to hold the first requests back.
_LOOKUP_BATCH = 256

# Shown each new run, when set: a Dask partition (nbtoolkit/_dask.py) caps the run's
# governor at its share of the cluster-wide slots and reads the run's stats afterwards.
RUN_CREATED: contextvars.ContextVar[Callable[[ChatRun], None] | None] = contextvars.ContextVar(
    "nbtoolkit_run_created", default=None
)


@dataclass(slots=True)
class _Job:
    """One request on its way: its rows (one for chat, many for embeddings)."""

    items: list[Item]

    def worst_case(self) -> tuple[float, float]:
        """Estimated prompt tokens, and the completion tokens the request may use at most."""
        return (
            sum(item.prompt_tokens for item in self.items),
            sum(item.completion_tokens for item in self.items),
        )


class _Attempts(Exception):
    """A request's last error after tenacity gave up, with how many attempts it took."""

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class _OverBudget(Exception):
    """A request that would pass max_cost / max_tokens_total; its rows are not sent."""


class _Systemic(Exception):
    """Raised out of a worker to stop the whole task group on a run-wide failure."""

    def __init__(self, error: NbToolkitError) -> None:
        super().__init__(str(error))
        self.error = error


def request_keys(config: ChatConfig, endpoint: Endpoint) -> RequestKeys:
    """The one key function for answers, live or from a batch: a row's cache key.

    Keyed on the URL without its query, which may carry a secret, and Azure's
    ``api-version``: an answer does not change with the API version that delivered it, so
    a batch answer is a cache hit for ``complete`` and the other way round, whatever query.
    """
    return RequestKeys(config.key_url(endpoint.path))


class ChatRun:
    """One run over many requests; keeps its results reachable even if the run is cut short.

    Args:
        config: where requests go and how the run behaves.
        endpoint: how requests become bodies and replies become answers; default chat
            completions with the config's model and params.
        listener: told of each finished row, retry and wait (the progress bar).

    Example:
        >>> run = ChatRun(config)  # doctest: +SKIP
        >>> results = await run.execute([ChatRequest(({"role": "user", "content": "hi"},))])
    """

    def __init__(
        self,
        config: ChatConfig,
        *,
        endpoint: Endpoint | None = None,
        listener: ProgressListener | None = None,
    ) -> None:
        config = config.resolved()
        if not config.model:
            raise ConfigError(
                "no model: pass model='...' or set it once with nbtoolkit.configure(model='...')"
            )
        self.config = config
        self.endpoint: Endpoint = endpoint or chat_endpoint(config)
        self.listener = listener
        # One slot per request pulled so far; None until that row finishes.
        self.results: list[RowResult | None] = []
        self.stats = RunStats()
        self.budget = Budget(
            model=config.model,
            price=config_price(config),
            max_tokens_total=config.max_tokens_total,
            max_cost=config.max_cost,
        )
        self.governor = RateGovernor(
            max_parallel=config.max_parallel,
            rpm=config.rpm,
            tpm=config.tpm,
            adaptive=config.adaptive,
            on_wait=listener.row_waiting if listener is not None else None,
            # A header's wait is capped like a 429's: "remaining 0, reset in 1 h" must not
            # silently freeze the run for an hour.
            pause_max=config.retry.retry_after_max,
        )
        self.breaker = CircuitBreaker(threshold=config.max_parallel)
        self._refusals = RefusalWatch()
        # Refused groups held while nothing is answered yet, with their refusal.
        self._parked: list[tuple[list[Item], _Attempts]] = []
        self._refused_fields: list[str] = []  # a stopping refusal's request body fields
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeouts.total,
            sock_connect=config.timeouts.connect,
            sock_read=config.timeouts.read,
            # aiohttp rounds timeouts of 5 s and more up to whole seconds (cheaper timers);
            # a 5 s timeout that fires at 5.9 s only delays the retry. Keep them exact.
            ceil_threshold=float("inf"),
        )
        # Whether the endpoint's answers are bytes (vectors) or text: a cache look-up reads
        # only that kind's table.
        self._binary = self.endpoint.binary_answers
        self._url = config.url(self.endpoint.path)
        self._headers = config.request_headers()
        # Every text about a request that reaches a row, the report or an exception goes
        # through it: a gateway may echo the key in any body, a 200's included.
        self._redact = Redactor(self._url, self._headers)
        self._cache = CacheWriter(None, model=None)
        self._keys = request_keys(config, self.endpoint)
        # Cache key -> rows waiting for the same request, which is queued or in flight.
        self._pending: dict[bytes, list[int]] = {}
        self._group: list[Item] = []  # rows waiting to fill a request (max_items > 1)
        # Rows per request, at most: the endpoint's, lowered when a server refuses a request
        # for its size that it takes in halves (see _run_job).
        self._max_items = self.endpoint.max_items
        self._group_tokens = 0.0
        self._sending: set[int] = set()  # rows a worker holds right now
        self._executed = False
        if (seen := RUN_CREATED.get()) is not None:
            seen(self)

    async def execute(self, requests: Iterable[Any]) -> list[RowResult]:
        """Send every request, at most ``max_parallel`` at once, and return results in order.

        Raises:
            RunAborted: a bad key, a wrong URL or model, an exhausted quota, or a server
                that stopped answering; ``partial`` holds the results list, with rows that
                did not finish marked.
            RuntimeError: the run was already executed (make a new one per run).
        """
        if self._executed:
            raise RuntimeError("a ChatRun runs once; make a new ChatRun for another run")
        self._executed = True
        self.stats.started = time.monotonic()
        workers = self.config.max_parallel
        queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * workers)
        self._cache = CacheWriter(self.config.cache_path, model=self.config.model)
        # Pool sized to the workers: no request ever waits for a connection slot, so the
        # total timeout measures the request alone.
        connector = aiohttp.TCPConnector(limit=workers, limit_per_host=workers)
        stopped_by: NbToolkitError | None = None
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, trust_env=self.config.use_proxy_env
                ) as session,
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
            stopped_by = systemic[0].error
            self._mark_unfinished("not_run", f"the run was stopped: {stopped_by}")
        except BaseException:
            # Interrupted (Ctrl-C, cancellation): the task group has already cancelled and
            # awaited every worker; say which rows did not finish, then let it propagate.
            self._mark_unfinished("cancelled", "the run was interrupted before this row finished")
            raise
        finally:
            self.stats.finished = time.monotonic()
            self.stats.cost = self.budget.cost if self.budget.unit_price is not None else None
            self.stats.cache_saved = _cache_saved(self.budget.unit_price, self.stats.cached_tokens)
            self.stats.limits = self.governor.learned()
            self._cache.close()  # commits what is still waiting for the timer
        if stopped_by is not None:
            # Raised here, not inside the except block: an exception raised while a group is
            # being handled drags the group along as its context, and IPython then shows
            # the whole chain instead of the one line RunAborted renders.
            raise RunAborted(
                _abort_message(stopped_by, self._refused_fields),
                partial=self.results,
                cause=stopped_by,
            ) from stopped_by
        return [result if result is not None else SKIPPED for result in self.results]

    async def _produce(
        self, requests: Iterable[Any], queue: asyncio.Queue[_Job | None], workers: int
    ) -> None:
        batch: list[Item] = []
        make_item, results = self.endpoint.item, self.results  # read once: once per row
        per_lookup = max(_LOOKUP_BATCH, self.endpoint.max_items)
        for index, request in enumerate(requests):
            results.append(None)
            if request is None:
                self._finish(index, SKIPPED)
                continue
            try:
                item = make_item(index, request)
            except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
                # One bad row (a lone surrogate, an object JSON cannot carry) fails alone.
                error = UnsendableRow(f"this row's request cannot be encoded: {exc}"[:500])
                self._finish(index, RowResult(None, _row_error(error, 0)))
                continue
            batch.append(item)
            if len(batch) >= per_lookup:
                await self._dispatch(batch, queue)
                batch = []
        await self._dispatch(batch, queue)
        if self._group:
            await queue.put(self._take_group())
        for _ in range(workers):
            await queue.put(None)

    async def _dispatch(self, batch: list[Item], queue: asyncio.Queue[_Job | None]) -> None:
        """Answer what the cache knows, attach duplicates to their twin, queue the rest."""
        if not batch:
            return
        dedupe = self.config.dedupe
        if self._cache.enabled or dedupe:
            key = self._keys.key
            for item in batch:
                item.key = key(item.payload)
        hits = self._cache.lookup(
            [item.key for item in batch if item.key is not None], binary=self._binary
        )
        # Queued after the loop, not in it: a put that waits lets workers settle rows and
        # drop them from _pending, and a later twin, missed by the lookup above, would be
        # sent again. (Attributes read once: this loop runs for every row of the run.)
        jobs: list[_Job] = []
        pending = self._pending
        max_items, max_tokens = self._max_items, self.endpoint.max_request_tokens
        for item in batch:
            if item.key is not None:
                if hits and (answer := hits.get(item.key)) is not None:
                    self.stats.cache_hits += 1
                    self._finish(item.index, self._from_cache(answer))
                    continue
                if dedupe:
                    twins = pending.get(item.key)
                    if twins is not None:
                        twins.append(item.index)
                        continue
                    pending[item.key] = []
            if max_items == 1:
                jobs.append(_Job([item]))
                continue
            if self._group and (
                len(self._group) >= max_items
                or self._group_tokens + item.prompt_tokens > max_tokens
            ):
                jobs.append(self._take_group())
            self._group.append(item)
            self._group_tokens += item.prompt_tokens
        for job in jobs:
            await queue.put(job)

    def _take_group(self) -> _Job:
        job = _Job(self._group)
        self._group, self._group_tokens = [], 0.0
        return job

    async def _work(
        self, session: aiohttp.ClientSession, queue: asyncio.Queue[_Job | None]
    ) -> None:
        while (job := await queue.get()) is not None:
            await self._refusals.wait_decided()
            indexes = [item.index for item in job.items]
            self._sending.update(indexes)
            await self._run_job(session, job.items)
            self._sending.difference_update(indexes)
        # Groups held while nothing was answered yet: decided now that no other work is left
        # (each worker drains them as it finishes, so the last one sees every one).
        while self._parked:
            while self._refusals.deciding:  # one probe at a time, here too
                await self._refusals.wait_decided()
            if not self._parked:
                break
            items, failed = self._parked.pop()
            indexes = [item.index for item in items]
            self._sending.update(indexes)
            await self._refused(session, items, failed, parked=True)
            self._sending.difference_update(indexes)

    async def _run_job(self, session: aiohttp.ClientSession, items: list[Item]) -> bool:
        """Send one request for ``items`` and finish each of its rows; True when every row
        got an answer from the server (in this request or in parts of it)."""
        if len(items) > self._max_items:  # grouped before the server's cap was learned
            cap = self._max_items
            parts = [items[start : start + cap] for start in range(0, len(items), cap)]
            return all([await self._run_job(session, part) for part in parts])
        try:
            parsed, attempts = await self._send(session, _Job(items))
        except _Attempts as failed:
            if isinstance(failed.error, BadRequestError):
                return await self._refused(session, items, failed)
            for item in items:
                self._settle_row(item, self._failed(failed.error, failed.attempts))
            return False
        answers: list[tuple[Item, Answer]] = []
        others: list[tuple[Item, Outcome]] = []
        for item, outcome in zip(items, parsed.outcomes, strict=True):
            if isinstance(outcome, Answer):
                answers.append((item, outcome))
            else:
                others.append((item, outcome))
        # The answers first, all at once (saved and shown before any re-ask is sent).
        self._settle_answers(answers, attempts)
        for item, outcome in others:
            await self._settle_outcome(session, item, outcome, attempts)
        return True

    async def _refused(
        self,
        session: aiohttp.ClientSession,
        items: list[Item],
        failed: _Attempts,
        *,
        parked: bool = False,
    ) -> bool:
        """A 400 for ``items``: the row fails, or the group is held, probed or halved, or the
        run stops, as the refusal watch decides (see `RefusalWatch`)."""
        error = failed.error
        assert isinstance(error, BadRequestError)
        if parked:  # already counted when it was held
            verdict = Verdict.PROBE if self._refusals.armed else Verdict.BISECT
            if verdict is Verdict.PROBE:
                self._refusals.probing(True)
        else:
            verdict = self._refusals.refused(error, rows=len(items))
        if verdict is Verdict.STOP:
            self._stop_refused(items, failed)
        if verdict is Verdict.PARK:
            self._parked.append((items, failed))
            return False
        if verdict is Verdict.PROBE:
            return await self._probe(session, items, failed)
        if verdict is Verdict.BISECT:
            return await self._bisect(session, items)
        for item in items:
            self._settle_row(item, self._failed(error, failed.attempts))
        return False

    async def _probe(
        self, session: aiohttp.ClientSession, items: list[Item], failed: _Attempts
    ) -> bool:
        """Send rows of a refused group alone, every other request held, until one is
        answered (the group was refused for a bad input or its size: the rest goes on) or
        enough are refused alike that the run stops."""
        try:
            # The middle, then the ends: a bad input the server names by position is rarely
            # at all three.
            order = [len(items) // 2, 0, len(items) - 1]
            order += [i for i in range(len(items)) if i not in order]
            left = list(items)
            for position in order:
                if not self._refusals.armed:
                    break
                item = items[position]
                left.remove(item)
                await self._run_job(session, [item])
        finally:
            self._refusals.probing(False)
        return await self._run_job(session, left) if left else False

    async def _bisect(self, session: aiohttp.ClientSession, items: list[Item]) -> bool:
        """A group refused after the run had answers: halve it until a bad input stands
        alone, so that it does not sink its neighbours."""
        middle = len(items) // 2
        first = await self._run_job(session, items[:middle])
        second = await self._run_job(session, items[middle:])
        if first and second:
            # Both halves went through: the server refused the request for its size (a cap
            # on inputs per request, or on its tokens), not for a row. Later requests are
            # no larger than the halves were.
            self._max_items = min(self._max_items, len(items) - middle)
            self.stats.items_per_request = self._max_items
        return first and second

    def _stop_refused(self, items: list[Item], failed: _Attempts) -> None:
        """The run stops on a refusal: the refused rows (held ones too) say why, then raise."""
        try:  # the fields of the refused body, for the message to name the one refused
            body = json.loads(self.endpoint.payload(items[:1]))
            self._refused_fields = list(body) if isinstance(body, dict) else []
        except ValueError:
            pass
        for held, held_failure in [(items, failed), *self._parked]:
            for item in held:
                attempts = held_failure.attempts
                error = _row_error(held_failure.error, attempts)
                self._settle_row(item, RowResult(None, error, attempts))
        self._parked.clear()
        raise _Systemic(failed.error)  # type: ignore[arg-type]

    async def _settle_outcome(
        self, session: aiohttp.ClientSession, item: Item, outcome: Any, attempts: int
    ) -> None:
        """Turn one row's outcome into its result; an answer that failed its check is re-asked."""
        first = item
        while isinstance(outcome, Reask):
            self.stats.reasks += 1
            item = outcome.item
            item.key = self._keys.key(item.payload)
            cached = self._cache.lookup([item.key], binary=self._binary).get(item.key)
            if cached is not None:
                outcome = self._from_cache(cached)
                break
            try:
                parsed, more = await self._send(session, _Job([item]))
            except _Attempts as failed:
                self._settle_row(first, self._failed(failed.error, attempts + failed.attempts))
                return
            attempts += more
            outcome = parsed.outcomes[0]
        if isinstance(outcome, RowResult):  # a re-ask answered from the cache
            self._settle_row(first, outcome)
        elif isinstance(outcome, Answer):
            if item is not first and item.key is not None:
                self._cache.save_many([(item.key, outcome)])  # the re-ask, under its own key
            self._settle_answer(first, outcome, attempts)
        else:  # a refusal or a bad answer: its message quotes the reply
            error = _row_error(self._redact.error(outcome), attempts)
            self._settle_row(first, RowResult(None, error, attempts))

    def _settle_answer(self, item: Item, answer: Answer, attempts: int) -> None:
        self._settle_answers([(item, answer)], attempts)

    def _settle_answers(self, answers: Sequence[tuple[Item, Answer]], attempts: int) -> None:
        """Checked answers: each row's result, saved under the row's own request, so that a
        re-run of an answer that needed fixing finds the fixed one and pays for nothing.

        One call per reply (an embeddings reply answers 2,048 rows): the per-row work is
        a large share of a run's CPU against a fast server.
        """
        self._cache.save_many(
            [(item.key, answer) for item, answer in answers if item.key is not None]
        )
        settle = self._settle_row
        for item, answer in answers:
            stored = answer.stored
            settle(
                item,
                RowResult(
                    stored if isinstance(stored, str) else None,
                    None,
                    attempts,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    answer.cached_tokens,
                    value=answer.value,
                ),
            )

    def _settle_row(self, item: Item, result: RowResult) -> None:
        self._finish(item.index, result)
        if item.key is not None and self._pending:
            for twin in self._pending.pop(item.key, ()):
                self.stats.duplicates += 1
                self._finish(twin, _shared(result))

    async def _send(self, session: aiohttp.ClientSession, job: _Job) -> tuple[Parsed, int]:
        """Send one request, retried as the policy says; raises _Attempts when it gives up."""
        try:
            return await self._send_once(session, job), 1
        except _Systemic:
            raise
        except Exception as error:
            first_error = self._explained(error, job)
            if first_error is None:  # the endpoint asks differently now: at once, no retry
                return await self._send(session, job)
            if not is_retryable(first_error) or GiveUp(self.config.retry).first(first_error):
                raise _Attempts(first_error, 1) from first_error
            return await self._retry(session, job, first_error)

    async def _retry(
        self, session: aiohttp.ClientSession, job: _Job, first_error: Exception
    ) -> tuple[Parsed, int]:
        """Attempts 2 and on, run by tenacity. The first attempt went outside it, because
        tenacity's bookkeeping costs more CPU than a whole request to a fast server; tenacity
        is handed the first failure as its own attempt 1, so its stop and wait rules see
        exactly what happened."""
        policy = self.config.retry
        replay: list[Exception] = [first_error]

        async def attempt() -> Parsed:
            if replay:
                raise replay.pop()
            try:
                return await self._send_once(session, job)
            except APIError as exc:
                explained = self._explained(exc, job)
                if explained is exc:
                    raise
                if explained is not None:
                    raise explained from exc
            return await self._send_once(session, job)

        retrying = AsyncRetrying(
            stop=GiveUp(policy),
            wait=RetryAfterOrBackoff(policy),
            retry=retry_if_exception(is_retryable),
            before_sleep=self._on_retry,
            reraise=True,
        )
        try:
            parsed: Parsed = await retrying(attempt)
        except _Systemic:
            raise
        except Exception as exc:
            raise _Attempts(exc, retrying.statistics.get("attempt_number", 1)) from exc
        return parsed, int(retrying.statistics.get("attempt_number", 1))

    def _explained(self, error: Exception, job: _Job) -> Exception | None:
        """The endpoint's reading of an error reply (`Endpoint.on_error_reply`): None when
        it now sends the request another way (send again at once, not as a retry)."""
        if isinstance(error, APIError):
            return self.endpoint.on_error_reply(error, job.items)
        return error

    def _failed(self, exc: Exception, attempts: int) -> RowResult:
        """The result of a row whose attempt number ``attempts`` failed with ``exc``."""
        if isinstance(exc, _OverBudget):  # that attempt was never sent
            sent = attempts - 1
            return RowResult(None, RowError("over_budget", self.budget.reason(), None, sent), sent)
        if isinstance(exc, NbToolkitError) and is_systemic(exc):
            raise _Systemic(exc) from exc
        return RowResult(None, _row_error(exc, attempts), attempts)

    async def _send_once(self, session: aiohttp.ClientSession, job: _Job) -> Parsed:
        """One attempt: within budget, admitted by the governor, reported back to both."""
        prompt_tokens, completion_tokens = job.worst_case()
        if self.budget.limited and not await self.budget.reserve(prompt_tokens, completion_tokens):
            raise _OverBudget()
        reserved = prompt_tokens + completion_tokens
        try:
            ticket = await self.governor.admit(reserved)
        except BaseException:
            if self.budget.limited:
                self.budget.release(prompt_tokens, completion_tokens)
            raise
        self.stats.requests_sent += 1
        limits: ServerLimits | None = None
        body = ""
        used: float | None = None
        congested = False
        pause: float | None = None
        try:
            reply: Reply = await post_json(
                session,
                self._url,
                self.endpoint.payload(job.items),
                headers=self._headers,
                timeout=self._timeout,
                redact=self._redact,
            )
            limits = reply.limits
            self.breaker.reached()
            body = reply.text
            parsed = self.endpoint.parse(body, job.items)
        except RateLimitError as exc:
            self.breaker.reached()
            self.stats.statuses["429"] += 1
            limits, congested = exc.limits, True
            pause = self._shared_pause(exc)
            raise
        except RequestTimeout:
            self.stats.statuses["RequestTimeout"] += 1
            congested = True
            raise
        except TransportError as exc:
            self.stats.statuses[type(exc).__name__] += 1
            if self.breaker.failed(exc):
                raise _Systemic(TransportError(self.breaker.describe())) from exc
            raise
        except APIError as exc:
            self.breaker.reached()
            self.stats.statuses[str(exc.status)] += 1
            limits = exc.limits
            raise
        except Exception as exc:  # a 2xx that is not what the endpoint expects
            self.stats.statuses[type(exc).__name__] += 1
            used = self._spend(None, prompt_tokens, completion_tokens)
            # Its message quotes the body, which a gateway may have filled with our headers.
            raise self._scrubbed(exc, body, job.items) from None
        else:
            self.stats.statuses["200"] += 1
            self._refusals.answered()
            used = self._spend(parsed.usage, prompt_tokens, completion_tokens)
            return parsed
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

    def _scrubbed(self, error: Exception, body: str, items: list[Item]) -> Exception:
        """The error a 2xx body that is not an answer raises, with the request's secrets
        scrubbed from the body before the parser quotes (and cuts) it: scrubbed after the
        cut, a key cut in half would escape."""
        clean = self._redact(body)
        if clean != body:
            try:
                self.endpoint.parse(clean, items)
            except Exception as again:  # the same failure, told from the scrubbed body
                error = again
        self._redact.error(error)
        return error

    def _spend(
        self, usage: Mapping[str, Any] | None, prompt_reserved: float, completion_reserved: float
    ) -> float:
        """Count a reply's billed tokens; returns their total.

        A reply that reports no usage was still billed: the budget charges it what was
        reserved for it (its worst case), never zero, so a budget stays a hard limit.
        """
        prompt, completion, cached = usage_counts(usage or {})
        if prompt is None and completion is None:
            self.budget.spend(round(prompt_reserved), round(completion_reserved))
            return prompt_reserved + completion_reserved
        prompt, completion = prompt or 0, completion or 0
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        self.stats.cached_tokens += cached or 0
        self.stats.reasoning_tokens += reasoning_tokens(usage or {})
        self.budget.spend(prompt, completion, cached or 0)
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
        if self.listener is not None:
            self.listener.row_retried()

    def _from_cache(self, answer: CachedAnswer) -> RowResult:
        # Token counts are what the answer cost when it was bought; this run paid nothing.
        return RowResult(
            answer.text if isinstance(answer.text, str) else None,
            None,
            0,
            answer.prompt_tokens,
            answer.completion_tokens,
            answer.cached_tokens,
            "cache",
            value=self.endpoint.decode(answer.text),
        )

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


def _cache_saved(price: Price | None, cached_tokens: int) -> float | None:
    """What the provider's prompt cache saved: cached tokens at the input price less the
    cached-input price; None without a price."""
    if price is None or not cached_tokens:
        return None
    return price.cost(cached_tokens, 0) - price.cost(cached_tokens, 0, cached_tokens)


def _shared(result: RowResult) -> RowResult:
    return dataclasses.replace(result, attempts=0, source="duplicate")


def _row_error(exc: BaseException, attempts: int) -> RowError:
    status = exc.status if isinstance(exc, APIError) else None
    return RowError(type(exc).__name__, str(exc), status, attempts)


def results_in_order(results: Sequence[RowResult | None]) -> list[RowResult]:
    """The results of a run that may have been cut short, with unfinished rows as not_run."""
    not_run = RowResult(None, RowError("not_run", "the run stopped before this row was sent"))
    return [r if r is not None else not_run for r in results]


def _abort_message(error: NbToolkitError, fields: Iterable[str] = ()) -> str:
    """RunAborted's message: what stopped the run, and what to do (``fields``: the request
    body's, for a refusal that names one without saying it is a parameter)."""
    if isinstance(error, AuthError):
        advice = (
            "check the API key (api_key=, or the provider's variable: OPENAI_API_KEY, "
            "ANTHROPIC_API_KEY, GOOGLE_API_KEY or GEMINI_API_KEY) and that it may use this model"
        )
    elif isinstance(error, NotFoundError):
        advice = "check base_url (it usually ends in /v1) and the model name"
    elif isinstance(error, TransportError):
        advice = "check base_url and that the server is running"
    elif isinstance(error, SchemaRefused):
        advice = (
            f"remove {error.keyword!r} from the schema (or the pydantic constraint behind it)"
            if error.keyword
            else "simplify the schema to what the provider's structured output takes"
        ) + ", or pass structured='prompt' to send the schema in a message instead"
    elif isinstance(error, IgnoredParameter):
        advice = (
            "this model does not shorten its vectors; leave dimensions= out, or use a model "
            "that takes it (text-embedding-3-*)"
        )
    elif isinstance(error, BadRequestError):
        parameter = refused_parameter(error, fields)
        named = f" (parameter: {parameter!r})" if parameter else ""
        return (
            f"run stopped, every row would fail the same way: the server refused the first "
            f"{REFUSALS_TO_STOP} requests with the same words and answered none: {error}"
            f"{named}. What to do: the request itself is refused, not a row: check "
            f"{repr(parameter) if parameter else 'the parameters'} (leave it out, or use a "
            "model that takes it), the model name, and any params= or extra body fields."
        )
    else:
        advice = "the account is out of quota or credit; add credit or use another key"
    return f"run stopped, every row would fail the same way: {error}. What to do: {advice}."
