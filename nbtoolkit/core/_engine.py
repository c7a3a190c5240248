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
       ─► `Sender`: budget ─► governor ─► client ─► breaker ─► endpoint.parse, retries
       ─► result, cache

A 400 goes through the refusal watch (`RefusalWatch`): until something is answered, the
same refusal for three rows or groups stops the run, and a refused group is held rather
than halved until a row sent alone decides. After an answer a refused group is halved until
its bad input stands alone.

Longer than the project's other modules: it is the one path every endpoint's rows take
(look-up, twins, groups, refused groups, re-asks), and its parts that stand alone already
live beside it (`_sender` for one request and its retries, `_breaker`, `_budget`,
`_limits`, `_retry`, `_cachewriter`, `_client`).

Memory stays proportional to ``max_parallel``: the producer pulls requests from the
iterable only as the queue drains. Only the results list grows with the row count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._breaker import RefusalWatch, Verdict, abort_message, refusal_of
from nbtoolkit.core._budget import Budget, OutputCeiling
from nbtoolkit.core._cachewriter import CacheWriter
from nbtoolkit.core._heap import older_objects_frozen
from nbtoolkit.core._limits import RateGovernor
from nbtoolkit.core._pricing import Price, config_price
from nbtoolkit.core._retry import is_systemic
from nbtoolkit.core._rows import (
    SKIPPED,
    ProgressListener,
    RowError,
    RowResult,
    RunStats,
    cache_hit,
)
from nbtoolkit.core._sender import Attempts, Job, OverBudget, Sender, Systemic
from nbtoolkit.core.endpoints._base import Answer, Endpoint, Item, Outcome, Reask
from nbtoolkit.core.endpoints._providers import chat_endpoint
from nbtoolkit.core.store._cache import CachedAnswer, RequestKeys
from nbtoolkit.errors import (
    APIError,
    BadRequestError,
    ConfigError,
    NbToolkitError,
    RunAborted,
    UnsendableRow,
)

if TYPE_CHECKING:  # imported by the first run: `import nbtoolkit` spares it
    import aiohttp

# Requests looked up in the cache with one query: large enough to make a fully cached
# re-run cheap, small enough not to hold the first requests back.
_LOOKUP_BATCH = 256


def governor_for(
    config: ChatConfig,
    *,
    on_wait: Callable[[float, str], None] | None = None,
    on_pause: Callable[[float], None] | None = None,
) -> RateGovernor:
    """The governor a run of ``config`` uses: the one place run options become its settings.

    A caller that passes its own governor (`RunHooks`) builds it here, so that none of the
    user's options (``rpm``, ``tpm``, ``adaptive``, ``retry_after_max``) can be left out.

    Args:
        config: the run's options (resolved or not).
        on_wait: told (seconds, reason) when the run starts waiting on a limit (the bar).
        on_pause: told the seconds of every pause a 429 asks for (a Dask lease shares it).

    Returns:
        A new `RateGovernor` for one run.
    """
    return RateGovernor(
        max_parallel=config.max_parallel,
        rpm=config.rpm,
        tpm=config.tpm,
        adaptive=config.adaptive,
        on_wait=on_wait,
        on_pause=on_pause,
        # A header's wait is capped like a 429's: "remaining 0, reset in 1 h" must not
        # silently freeze the run for an hour.
        pause_max=config.retry.retry_after_max,
    )


@dataclass(frozen=True)
class RunHooks:
    """What a caller above the engine adds to a run, through declared seams.

    A Dask partition uses both: a governor capped at the slots its cluster-wide lease
    holds, and a listener that counts the rows it still has to finish.

    Attributes:
        governor: admits every request of the run; None: ``governor_for(config)``. Build
            it with `governor_for`, so the user's options hold.
        listeners: told of each finished row, retry and wait, after the run's own listener.
    """

    governor: RateGovernor | None = None
    listeners: tuple[ProgressListener, ...] = field(default=())


class _Listeners:
    """Several listeners as one: each is told every event, in order."""

    def __init__(self, listeners: Sequence[ProgressListener]) -> None:
        self._listeners = tuple(listeners)

    def row_done(self, result: RowResult) -> None:
        for listener in self._listeners:
            listener.row_done(result)

    def rows_done(self, results: Sequence[RowResult]) -> None:
        for listener in self._listeners:
            listener.rows_done(results)

    def row_retried(self) -> None:
        for listener in self._listeners:
            listener.row_retried()

    def row_waiting(self, seconds: float, reason: str) -> None:
        for listener in self._listeners:
            listener.row_waiting(seconds, reason)


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
        hooks: a governor and more listeners from the caller (a Dask partition's lease).

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
        hooks: RunHooks | None = None,
    ) -> None:
        config = config.resolved()
        if not config.model:
            raise ConfigError(
                "no model: pass model='...' or set it once with nbtoolkit.configure(model='...')"
            )
        self.config = config
        self.endpoint: Endpoint = endpoint or chat_endpoint(config)
        hooks = hooks or RunHooks()
        listeners = [one for one in (listener, *hooks.listeners) if one is not None]
        self.listener: ProgressListener | None = (
            _Listeners(listeners) if len(listeners) > 1 else (listeners[0] if listeners else None)
        )
        # One slot per request pulled so far; None until that row finishes.
        self.results: list[RowResult | None] = []
        self.stats = RunStats()
        self.budget = Budget(
            model=config.model,
            price=config_price(config),
            max_tokens_total=config.max_tokens_total,
            max_cost=config.max_cost,
        )
        # What a request without max_tokens may cost at most (a documented limit, or the
        # assumption the run's summary states).
        self.ceiling = OutputCeiling.for_model(config.model)
        self.governor = hooks.governor or governor_for(
            config, on_wait=listener.row_waiting if listener is not None else None
        )
        self._refusals = RefusalWatch()
        # Refused groups held while nothing is answered yet, with their refusal.
        self._parked: list[tuple[list[Item], Attempts]] = []
        self._refused_fields: list[str] = []  # a stopping refusal's request body fields
        # What one request goes through, from the budget to the parsed reply.
        self.sender = Sender(
            config,
            self.endpoint,
            stats=self.stats,
            budget=self.budget,
            ceiling=self.ceiling,
            governor=self.governor,
            listener=self.listener,
            on_answered=self._refusals.answered,
        )
        # Whether the endpoint's answers are bytes (vectors) or text: a cache look-up reads
        # only that kind's table.
        self._binary = self.endpoint.binary_answers
        self._cache = CacheWriter()
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
        with older_objects_frozen():  # see core/_heap.py: a third of a cached re-run's CPU
            return await self._execute(requests)

    async def _execute(self, requests: Iterable[Any]) -> list[RowResult]:
        self.stats.started = time.monotonic()
        workers = self.config.max_parallel
        queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=2 * workers)
        # Opened on the cache's own thread: opening may wait seconds on another process.
        self._cache = await CacheWriter.open(self.config.cache_path, model=self.config.model)
        # Pool sized to the workers: no request ever waits for a connection slot, so the
        # total timeout measures the request alone.
        import aiohttp

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
            systemic = [e for e in group_error.exceptions if isinstance(e, Systemic)]
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
            if self.sender.ceiling_used:
                self.stats.budget_note = self.ceiling.describe()
            await self._cache.aclose()  # commits what is still waiting for the timer
        if stopped_by is not None:
            # Raised here, not inside the except block: an exception raised while a group is
            # being handled drags the group along as its context, and IPython then shows
            # the whole chain instead of the one line RunAborted renders.
            raise RunAborted(
                abort_message(stopped_by, self._refused_fields),
                partial=self.results,
                cause=stopped_by,
            ) from stopped_by
        return [result if result is not None else SKIPPED for result in self.results]

    async def _produce(
        self, requests: Iterable[Any], queue: asyncio.Queue[Job | None], workers: int
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

    async def _dispatch(self, batch: list[Item], queue: asyncio.Queue[Job | None]) -> None:
        """Answer what the cache knows, attach duplicates to their twin, queue the rest."""
        if not batch:
            return
        dedupe = self.config.dedupe
        if self._cache.enabled or dedupe:
            key = self._keys.key
            for item in batch:
                item.key = key(item.payload)
        hits = await self._cache.lookup(
            [item.key for item in batch if item.key is not None], binary=self._binary
        )
        # Queued after the loop, not in it: a put that waits lets workers settle rows and
        # drop them from _pending, and a later twin, missed by the lookup above, would be
        # sent again. (Attributes read once: this loop runs for every row of the run.)
        jobs: list[Job] = []
        pending = self._pending
        max_items, max_tokens = self._max_items, self.endpoint.max_request_tokens
        # What `_finish` does, inlined: on a fully cached re-run it is most of the per-row work.
        results, from_cache = self.results, self._from_cache
        answered: list[RowResult] = []
        for item in batch:
            if item.key is not None:
                if hits and (answer := hits.get(item.key)) is not None:
                    result = results[item.index] = from_cache(answer)
                    answered.append(result)
                    continue
                if dedupe:
                    twins = pending.get(item.key)
                    if twins is not None:
                        twins.append(item.index)
                        continue
                    pending[item.key] = []
            if max_items == 1:
                jobs.append(Job([item]))
                continue
            if self._group and (
                len(self._group) >= max_items
                or self._group_tokens + item.prompt_tokens > max_tokens
            ):
                jobs.append(self._take_group())
            self._group.append(item)
            self._group_tokens += item.prompt_tokens
        if answered:
            self.stats.cache_hits += len(answered)
            if self.listener is not None:
                self.listener.rows_done(answered)
        for job in jobs:
            await queue.put(job)

    def _take_group(self) -> Job:
        job = Job(self._group)
        self._group, self._group_tokens = [], 0.0
        return job

    async def _work(self, session: aiohttp.ClientSession, queue: asyncio.Queue[Job | None]) -> None:
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
        if len(items) > 1 and self.budget.limited:
            # A group larger than what is left goes as the rows that fit, then the rest.
            fits = await self.budget.fitting(
                [(item.prompt_tokens, self.sender.owed([item])) for item in items]
            )
            if fits == 0:
                for item in items:
                    self._settle_row(item, self._failed(OverBudget(), 1))
                return False
            if fits < len(items):
                first = await self._run_job(session, items[:fits])
                rest = await self._run_job(session, items[fits:])
                return first and rest
        failed = await self._attempt(session, items)
        return True if failed is None else await self._failed_job(session, items, failed)

    async def _attempt(self, session: aiohttp.ClientSession, items: list[Item]) -> Attempts | None:
        """Send one request for ``items`` (retried as the policy says): None when it was
        answered, its rows finished; else the failure, its rows still open."""
        try:
            parsed, attempts = await self.sender.send(session, Job(items))
        except Attempts as failed:
            return failed
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
        return None

    async def _failed_job(
        self, session: aiohttp.ClientSession, items: list[Item], failed: Attempts
    ) -> bool:
        """Finish the rows of a request that failed: a 400 goes to `_refused`; any other
        error is each row's outcome."""
        if isinstance(failed.error, BadRequestError):
            return await self._refused(session, items, failed)
        for item in items:
            self._settle_row(item, self._failed(failed.error, failed.attempts))
        return False

    async def _refused(
        self,
        session: aiohttp.ClientSession,
        items: list[Item],
        failed: Attempts,
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
            return await self._probe(session, items)
        if verdict is Verdict.BISECT:
            return await self._bisect(session, items, error)
        for item in items:
            self._settle_row(item, self._failed(error, failed.attempts))
        return False

    async def _probe(self, session: aiohttp.ClientSession, items: list[Item]) -> bool:
        """Send rows of a refused group alone, every other request held, until one is
        answered (the group was refused for a bad input or its size: the rest goes on) or
        enough are refused alike that the run stops."""
        try:
            # The middle, then the ends: a bad input the server names by position is rarely
            # at all three.
            ends = [len(items) // 2, 0, len(items) - 1]
            order = list(dict.fromkeys([*ends, *range(len(items))]))  # each row once
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

    async def _bisect(
        self, session: aiohttp.ClientSession, items: list[Item], error: BadRequestError
    ) -> bool:
        """A group refused after the run had answers: halve it until a bad input stands
        alone, so that it does not sink its neighbours.

        Not past the point where both halves are refused in the group's own words and so is
        a row of each sent alone: then every row of it is (a refusal of the request, not of
        an input), and the halving would cost 2n - 1 requests to learn nothing more.
        """
        middle = len(items) // 2
        first, second = items[:middle], items[middle:]
        # Depth first, as a plain halving: a server's cap on inputs per request is learned
        # at the bottom of the first half, and the second half then goes at that size.
        first_failure = await self._attempt(session, first)
        if not _refused_alike(first_failure, error):
            ok_first = await self._finish_attempt(session, first, first_failure)
            ok_second = await self._run_job(session, second)
        else:
            second_failure = await self._attempt(session, second)
            if _refused_alike(second_failure, error):
                return await self._refused_whole(session, items, first, second, error)
            ok_first = await self._finish_attempt(session, first, first_failure)
            ok_second = await self._finish_attempt(session, second, second_failure)
        if ok_first and ok_second:
            # Both halves went through: the server refused the request for its size (a cap
            # on inputs per request, or on its tokens), not for a row. Later requests are
            # no larger than the halves were.
            self._max_items = min(self._max_items, len(items) - middle)
            self.stats.items_per_request = self._max_items
        return ok_first and ok_second

    async def _refused_whole(
        self,
        session: aiohttp.ClientSession,
        items: list[Item],
        first: list[Item],
        second: list[Item],
        error: BadRequestError,
    ) -> bool:
        """Both halves of a group were refused in its own words: a row of each goes alone.
        Refused alike too, every row of the group fails with those words; else the halving
        goes on without the rows so sent."""
        probes = [half[len(half) // 2] for half in (first, second) if len(half) > 1]
        probed = [await self._attempt(session, [probe]) for probe in probes]
        if all(_refused_alike(failure, error) for failure in probed):
            for item in items:
                self._settle_row(item, self._failed(error, 1))
            return False
        ok = True
        for probe, failure in zip(probes, probed, strict=True):
            ok = await self._finish_attempt(session, [probe], failure) and ok
        for half in (first, second):
            rest = [item for item in half if all(item is not probe for probe in probes)]
            if rest:
                ok = await self._run_job(session, rest) and ok
        return ok

    async def _finish_attempt(
        self, session: aiohttp.ClientSession, items: list[Item], failed: Attempts | None
    ) -> bool:
        """The rows of an attempt: answered already (None), or their failure handled."""
        return True if failed is None else await self._failed_job(session, items, failed)

    def _stop_refused(self, items: list[Item], failed: Attempts) -> None:
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
        raise Systemic(failed.error)  # type: ignore[arg-type]

    async def _settle_outcome(
        self, session: aiohttp.ClientSession, item: Item, outcome: Any, attempts: int
    ) -> None:
        """Turn one row's outcome into its result; an answer that failed its check is re-asked."""
        first = item
        while isinstance(outcome, Reask):
            self.stats.reasks += 1
            item = outcome.item
            item.key = self._keys.key(item.payload)
            cached = (await self._cache.lookup([item.key], binary=self._binary)).get(item.key)
            if cached is not None:
                outcome = self._from_cache(cached)
                break
            try:
                parsed, more = await self.sender.send(session, Job([item]))
            except Attempts as failed:
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
            error = _row_error(self.sender.redact.error(outcome), attempts)
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
                    cache_write_tokens=answer.cache_write_tokens,
                ),
            )

    def _settle_row(self, item: Item, result: RowResult) -> None:
        self._finish(item.index, result)
        if item.key is not None and self._pending:
            for twin in self._pending.pop(item.key, ()):
                self.stats.duplicates += 1
                self._finish(twin, _shared(result))

    def _failed(self, exc: Exception, attempts: int) -> RowResult:
        """The result of a row whose attempt number ``attempts`` failed with ``exc``."""
        if isinstance(exc, OverBudget):  # that attempt was never sent
            sent = attempts - 1
            reason = self.budget.reason()
            if exc.uncapped:
                reason += (
                    f"; a request without max_tokens reserves up to {self.ceiling.tokens:,} "
                    "completion tokens (the model's output ceiling): set max_tokens to send "
                    "more rows within the budget"
                )
            return RowResult(None, RowError("over_budget", reason, None, sent), sent)
        if isinstance(exc, NbToolkitError) and is_systemic(exc):
            raise Systemic(exc) from exc
        return RowResult(None, _row_error(exc, attempts), attempts)

    def _from_cache(self, answer: CachedAnswer) -> RowResult:
        # Token counts are what the answer cost when it was bought; this run paid nothing.
        text = answer.text
        return cache_hit(
            text if type(text) is str else None,
            answer.prompt_tokens,
            answer.completion_tokens,
            answer.cached_tokens,
            self.endpoint.decode(text),
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


def _refused_alike(failure: Attempts | None, error: BadRequestError) -> bool:
    """A request refused with a 400 in ``error``'s own words."""
    return (
        failure is not None
        and isinstance(failure.error, BadRequestError)
        and failure.error.status != 413  # too large: the halving is what fixes it
        and refusal_of(failure.error) == refusal_of(error)
    )


def _shared(result: RowResult) -> RowResult:
    return dataclasses.replace(result, attempts=0, source="duplicate")


def _row_error(exc: BaseException, attempts: int) -> RowError:
    status = exc.status if isinstance(exc, APIError) else None
    return RowError(type(exc).__name__, str(exc), status, attempts)


def results_in_order(results: Sequence[RowResult | None]) -> list[RowResult]:
    """The results of a run that may have been cut short, with unfinished rows as not_run."""
    not_run = RowResult(None, RowError("not_run", "the run stopped before this row was sent"))
    return [r if r is not None else not_run for r in results]
