"""A submitted batch job: its status, the wait, cancelling, and reading its answers back.

Batch mode is a transport, not a second engine: each row becomes the endpoint's `Item`
exactly as the engine builds it, its key comes from the engine's own `request_keys`,
budgets are the engine's `Budget`, every HTTP call goes through the engine's client
(`nbtoolkit.batch._http`), and each answer is parsed by the endpoint's own ``parse``. Only
the transport differs: a JSONL file, uploaded, run by the provider within 24 hours, and
read back by ``custom_id``::

    rows ─ endpoint.item ─ request_keys ─ cache hit? ─────────────► result (nothing sent)
                      └─ provider.line ─ split (model, 50,000 lines, 200 MB) ─ submit
    status / wait ─ result files ─ by custom_id ─ endpoint.parse ─ cache ─► result

The job lives in the cache file (`core.store._batch_jobs`), keyed by the requests it holds
and the query-free URL: running the same cell again, in a new kernel too, or with another
``api-version``, re-attaches to it instead of paying twice. The provider-specific parts
(URLs, line shape, result records) are one object, `nbtoolkit.batch._provider`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nbtoolkit.batch import _files as batch_files
from nbtoolkit.batch._http import BatchHTTP
from nbtoolkit.batch._plan import BatchOptions, PlannedRows, cache_path, job_budget
from nbtoolkit.batch._provider import BatchProvider, provider_for
from nbtoolkit.config import ChatConfig
from nbtoolkit.core._budget import Budget
from nbtoolkit.core._rows import RowError, RowResult, RunStats
from nbtoolkit.core.endpoints._base import Answer, Endpoint, cache_write_tokens, usage_counts
from nbtoolkit.core.store._batch_jobs import TERMINAL, BatchStore, Part
from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache
from nbtoolkit.errors import NbToolkitError

# Statuses in the order a batch goes through them, for "the least advanced" of several.
_ORDER = (
    "submitting",
    "unsent",
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
    "failed",
    "expired",
    "cancelled",
    "completed",
)


@dataclass(frozen=True)
class BatchStatus:
    """A job's state as the server last told it: one status, and counts over its batches."""

    status: str  # the server's word; for several batches, the least advanced one
    total: int
    completed: int
    failed: int
    batches: tuple[tuple[str | None, str], ...]  # (batch id, status) per batch

    @property
    def done(self) -> bool:
        return all(status in TERMINAL for _, status in self.batches)

    def __str__(self) -> str:
        return f"{self.status}: {self.completed} completed, {self.failed} failed of {self.total}"


class Job:
    """A submitted batch job, tied to the rows it answers. Made by `submit`.

    Its state is on the server and in the cache file; this object only knows how to ask.
    The API key is never part of its repr, its files or its errors.
    """

    def __init__(
        self,
        *,
        job_id: str | None,
        config: ChatConfig,
        endpoint: Endpoint,
        options: BatchOptions,
        rows: PlannedRows,
    ) -> None:
        self.job_id = job_id  # None: every row was answered already; nothing was sent
        self.config = config
        self.endpoint = endpoint
        self.options = options
        self.provider: BatchProvider = provider_for(config, endpoint)
        self._rows = rows

    @property
    def ids(self) -> tuple[str, ...]:
        """The server's batch ids (one per input file)."""
        return tuple(p.batch_id for p in self._parts() if p.batch_id is not None)

    @property
    def id(self) -> str | None:
        """The server's batch id; for a job of several batches, our job id."""
        ids = self.ids
        return ids[0] if len(ids) == 1 else self.job_id

    def __repr__(self) -> str:
        sent = len(self._rows.items) - len(self._rows.cached)
        return (
            f"<BatchJob {self.id} batches={len(self.ids)} rows={len(self._rows.keys)} "
            f"requests={sent} cached={len(self._rows.cached)}>"
        )

    def _store(self) -> BatchStore:
        return BatchStore(cache_path(self.config))

    def _parts(self) -> list[Part]:
        if self.job_id is None:
            return []
        with self._store() as store:
            return store.parts(self.job_id)

    async def astatus(self) -> BatchStatus:
        """Ask the server how each batch is doing; the answer is also kept in the cache file."""
        parts = self._parts()
        async with BatchHTTP(self.config) as http:
            for part in parts:
                if part.batch_id is None or part.status in TERMINAL:
                    continue
                state = await self.provider.status(http, part.batch_id)
                with self._store() as store:
                    store.update(
                        part.job_id,
                        part.part,
                        status=state.status,
                        completed=state.completed,
                        failed=state.failed,
                        output_file_id=state.output_file_id,
                        error_file_id=state.error_file_id,
                        errors=state.errors,
                    )
        return _summarise(self._parts())

    async def await_done(
        self, *, poll: float | None = None, seen: Callable[[BatchStatus], None] | None = None
    ) -> BatchStatus:
        """Poll until every batch of the job has ended; ``seen`` is told each status.

        Args:
            poll: seconds between checks, fixed; default from ``poll_initial`` growing to
                ``poll_max`` (`BatchOptions`).
            seen: called with each status as it comes (the progress bar).

        Raises:
            NbToolkitError: a part of the job was never created on the server.
        """
        unsent = [p.part for p in self._parts() if p.batch_id is None]
        if unsent:
            raise NbToolkitError(
                f"batch job {self.job_id} has parts {unsent} that were never created on the "
                "server (the upload failed); re-run the same submit_batch call to send them"
            )
        interval = poll or self.options.poll_initial
        while True:
            state = await self.astatus()
            if seen is not None:
                seen(state)
            if state.done:
                return state
            await asyncio.sleep(interval)
            if poll is None:
                interval = min(interval * 1.5, self.options.poll_max)

    async def acancel(self) -> BatchStatus:
        """Ask the server to cancel every batch still running; lines already run are kept."""
        async with BatchHTTP(self.config) as http:
            for part in self._parts():
                if part.batch_id is not None and part.status not in TERMINAL:
                    await self.provider.cancel(http, part.batch_id)
        return await self.astatus()

    def still_running(self) -> str:
        """What to tell a user who stopped waiting."""
        return (
            f"stopped waiting; batch job {self.id} keeps running on the server. Call "
            ".wait() or .result() again, or re-run the same submit_batch cell to re-attach."
        )

    async def collect(self) -> tuple[list[RowResult], RunStats]:
        """Read every batch's result files into the cache, by custom_id; one result per row.

        Call once the job is done. Answers go into the response cache under each request's
        key, so they are cache hits for ``complete`` from then on.
        """
        outcomes: dict[bytes, RowResult] = {}
        stats = RunStats(started=time.monotonic())
        budget = job_budget(self.config, self.options, limited=False)
        async with BatchHTTP(self.config) as http:
            for part in self._parts():
                with self._store() as store:
                    requests = store.requests(part.job_id, part.part)
                seen: dict[str, batch_files.LineResult] = {}
                texts = await self.provider.results(http, part.output_file_id, part.error_file_id)
                for text in texts:
                    for record in batch_files.records(text):
                        read = self.provider.read(record)
                        key = None if read is None else requests.get(read.custom_id)
                        if read is None or key is None:
                            continue  # not a line of ours
                        item = self._rows.items.get(key)
                        seen[read.custom_id] = batch_files.read_line(read, item, self.endpoint)
                with ResponseCache(cache_path(self.config)) as cache:
                    for cid, key in requests.items():
                        line = seen.get(cid)
                        if line is None:
                            outcomes[key] = RowResult(None, _missing(part))
                            continue
                        stats.requests_sent += 1
                        stats.statuses[line.label] += 1
                        outcomes[key] = _line_result(line, stats, budget)
                        if line.answer is not None:
                            cache.put(key, _stored(line.answer), model=self.config.model)
                    cache.commit()
        if self.job_id is not None:
            with self._store() as store:
                store.mark_collected(self.job_id)
        stats.cost = budget.cost if budget.unit_price is not None else None
        results = self._results(outcomes)
        stats.cache_hits = sum(1 for r in results if r.source == "cache" and r.error is None)
        stats.duplicates = sum(1 for r in results if r.source == "duplicate")
        stats.finished = time.monotonic()
        return results, stats

    def _results(self, collected: Mapping[bytes, RowResult]) -> list[RowResult]:
        """One result per row of the caller's input, in its order."""
        rows = self._rows
        wanted = [k for k in rows.items if k not in collected]
        looked_up: dict[bytes, CachedAnswer] = {}
        if wanted:
            with ResponseCache(cache_path(self.config)) as cache:
                looked_up = cache.get_many(wanted)
        results: list[RowResult] = []
        given: set[bytes] = set()
        for position, key in enumerate(rows.keys):
            if key is None:
                results.append(rows.fixed[position])
            elif key in collected:
                result = collected[key]
                if key in given:
                    result = dataclasses.replace(result, attempts=0, source="duplicate")
                given.add(key)
                results.append(result)
            elif (answer := looked_up.get(key)) is not None:
                results.append(_from_cache(answer, self.endpoint))
            else:
                message = "no answer: not in this job and not in the cache (was it cleared?)"
                results.append(RowResult(None, RowError("not_run", message)))
        return results


def _line_result(line: batch_files.LineResult, stats: RunStats, budget: Budget) -> RowResult:
    """A result line as its row's result, counting its tokens into the run's stats."""
    if line.usage is not None:
        prompt, completion, cached = (n or 0 for n in usage_counts(line.usage))
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        stats.cached_tokens += cached
        budget.spend(prompt, completion, cached, cache_write_tokens(line.usage))
    answer = line.answer
    if answer is None:
        return RowResult(None, line.error, 1)
    text = answer.stored if isinstance(answer.stored, str) else None
    return RowResult(
        text,
        None,
        1,
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.cached_tokens,
        "batch",
        value=answer.value,
        cache_write_tokens=answer.cache_write_tokens,
    )


def _stored(answer: Answer) -> CachedAnswer:
    return CachedAnswer(
        answer.stored, answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens
    )


def _from_cache(answer: CachedAnswer, endpoint: Endpoint) -> RowResult:
    # Token counts are what the answer cost when it was bought; this run paid nothing.
    return RowResult(
        answer.text if isinstance(answer.text, str) else None,
        None,
        0,
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.cached_tokens,
        "cache",
        value=endpoint.decode(answer.text),
    )


def _missing(part: Part) -> RowError:
    """Why a request has no line in any result file: what became of its batch."""
    if part.status == "cancelled":
        return RowError("cancelled", f"batch {part.batch_id} was cancelled before this row ran")
    if part.status == "expired":
        return RowError("BatchExpired", f"batch {part.batch_id} expired before this row ran")
    if part.status == "failed":
        return RowError("BatchFailed", f"batch {part.batch_id} failed validation: {part.errors}")
    return RowError(
        "BatchLineMissing", f"batch {part.batch_id} ({part.status}) has no line for this row"
    )


def _summarise(parts: Sequence[Part]) -> BatchStatus:
    statuses = [p.status for p in parts]
    if not parts:
        status = "completed"  # nothing to send: every row was answered already
    else:
        status = min(statuses, key=lambda s: _ORDER.index(s) if s in _ORDER else 0)
    return BatchStatus(
        status=status,
        total=sum(p.total for p in parts),
        completed=sum(p.completed for p in parts),
        failed=sum(p.failed for p in parts),
        batches=tuple((p.batch_id, p.status) for p in parts),
    )
