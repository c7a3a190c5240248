"""Batch mode as a transport: the engine's endpoints and keys, sent as a file and read back.

Not a second engine: each row becomes the endpoint's `Item` exactly as the engine builds
it, its key comes from the engine's own `request_keys`, budgets are the engine's `Budget`,
every HTTP call goes through the engine's client (`nbtoolkit.batch._http`), and each answer
is parsed by the endpoint's own ``parse``. Only the transport differs: a JSONL file,
uploaded, run by the provider within 24 hours, and read back by ``custom_id``::

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtoolkit.batch import _files as batch_files
from nbtoolkit.batch._http import BatchHTTP
from nbtoolkit.batch._provider import BatchProvider, provider_for
from nbtoolkit.config import ChatConfig
from nbtoolkit.core._budget import Budget
from nbtoolkit.core._engine import request_keys
from nbtoolkit.core._pricing import config_price
from nbtoolkit.core._rows import SKIPPED, RowError, RowResult, RunStats
from nbtoolkit.core.endpoints._base import Answer, ChatEndpoint, Endpoint, Item, usage_counts
from nbtoolkit.core.store._batch_jobs import TERMINAL, BatchStore, Part, job_key
from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache
from nbtoolkit.errors import ConfigError, NbToolkitError, UnsendableRow

# How long a run waits for another process that is uploading the same job right now.
_OTHER_SUBMITTER_WAIT = 120.0
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


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """How a batch job is split, priced and watched.

    Attributes:
        discount: what a batch costs against the price table (OpenAI: half price).
        max_lines, max_bytes: the most one input file may hold (the API's limits).
        poll_initial, poll_max: seconds between status checks while waiting; the wait
            grows by half each time, from the first to the second.
    """

    discount: float = 0.5
    max_lines: int = batch_files.MAX_LINES
    max_bytes: int = batch_files.MAX_BYTES
    poll_initial: float = 2.0
    poll_max: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.discount <= 1:
            raise ConfigError(f"discount is a share of the price, 0 to 1; got {self.discount}")
        if self.max_lines < 1 or self.max_bytes < 1:
            raise ConfigError("max_lines and max_bytes must be >= 1")
        if not 0 < self.poll_initial <= self.poll_max:
            raise ConfigError("poll_initial must be > 0 and at most poll_max")


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


@dataclass
class PlannedRows:
    """Which request each row of the caller's input stands for."""

    keys: list[bytes | None]  # per row: its request's cache key; None when not sent
    fixed: dict[int, RowResult]  # rows with an outcome from the start (skipped, unsendable)
    items: dict[bytes, Item]  # each distinct request, by key
    cached: set[bytes]  # keys answered by the cache before submission


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


async def submit(
    requests: Iterable[Any],
    config: ChatConfig,
    *,
    endpoint: Endpoint | None = None,
    options: BatchOptions | None = None,
) -> Job:
    """Submit the uncached requests as a batch job, or re-attach to the one already submitted.

    Args:
        requests: one request (or None: nothing to send) per row.
        config: where requests go; its cache file keeps the job.
        endpoint: how requests become bodies; default chat completions.
        options: splitting, discount and polling; default `BatchOptions()`.

    Returns:
        The job, at once (it runs on the server for up to 24 hours).

    Raises:
        ConfigError: no model, no cache, or a worst case over ``max_cost`` /
            ``max_tokens_total``: raised before anything is uploaded.
    """
    config = config.resolved()
    if options is not None and not isinstance(options, BatchOptions):
        raise ConfigError(f"batch= takes a BatchOptions (or nothing); got {options!r}")
    options = options or BatchOptions()
    if not config.model:
        raise ConfigError(
            "no model: pass model='...' or set it with nbtoolkit.configure(model=...)"
        )
    path = cache_path(config)
    endpoint = endpoint or ChatEndpoint({"model": config.model, **config.params})
    if endpoint.max_items != 1:
        raise ConfigError(
            f"batch mode sends one row per line; {type(endpoint).__name__} groups rows"
        )
    rows = _plan(requests, endpoint, request_keys(config, endpoint).key)
    with ResponseCache(path) as cache:
        rows.cached = set(cache.get_many(list(rows.items)))
    job = Job(job_id=None, config=config, endpoint=endpoint, options=options, rows=rows)
    to_send = [k for k in rows.items if k not in rows.cached]
    if not to_send:
        return job
    key = job_key(config.key_url(endpoint.path), to_send)
    lines = []
    for k in to_send:
        custom_id = batch_files.custom_id(k)
        model = rows.items[k].body.get("model")
        data = job.provider.line(custom_id, rows.items[k])
        lines.append(
            batch_files.Line(custom_id, k, model if isinstance(model, str) else None, data)
        )
    files = batch_files.split(lines, max_lines=options.max_lines, max_bytes=options.max_bytes)
    with BatchStore(path) as store:
        if store.live_job(key) is None:
            # Checked only for a new job: re-attaching uploads nothing and pays nothing more.
            _check_budget(config, options, [rows.items[k] for k in to_send])
        job.job_id, created = store.claim(
            key,
            model=config.model,
            endpoint=endpoint.path,
            parts=[[(one.custom_id, one.key) for one in file] for file in files],
        )
    await _send_parts(job, {one.custom_id: one.data for one in lines}, mine=created)
    return job


async def _send_parts(job: Job, lines: Mapping[str, bytes], *, mine: bool) -> None:
    """Submit each batch of the job that has none yet.

    ``mine``: this call claimed the job and sends every part. Otherwise it sends only parts
    left unsent (their submitter failed, or died long ago) and waits for a part another
    process is submitting right now.
    """
    assert job.job_id is not None
    deadline = time.monotonic() + _OTHER_SUBMITTER_WAIT
    async with BatchHTTP(job.config) as http:
        for part in job._parts():
            while part.batch_id is None:
                if not mine:
                    with job._store() as store:
                        taken = store.take_over(part)
                if mine or taken:
                    await _send_part(http, job, part, lines)
                    break
                if time.monotonic() > deadline:
                    raise NbToolkitError(
                        f"another process is still submitting batch job {job.job_id}; "
                        "run the cell again in a minute to re-attach"
                    )
                await asyncio.sleep(0.2)
                part = next(p for p in job._parts() if p.part == part.part)


async def _send_part(http: BatchHTTP, job: Job, part: Part, lines: Mapping[str, bytes]) -> None:
    assert job.job_id is not None
    with job._store() as store:
        ids = store.requests(job.job_id, part.part)
    try:
        submitted = await job.provider.submit(
            http,
            [lines[cid] for cid in ids],
            name=f"{job.job_id}-{part.part}",
            metadata={"nbtoolkit_job": job.job_id, "part": str(part.part)},
        )
    except BaseException:
        with job._store() as store:
            store.update(job.job_id, part.part, status="unsent")  # a re-run sends it
        raise
    with job._store() as store:
        store.update(
            job.job_id,
            part.part,
            batch_id=submitted.batch_id,
            input_file_id=submitted.input_file_id,
            status=submitted.state.status,
            total=submitted.state.total or len(ids),
        )


def _plan(
    requests: Iterable[Any], endpoint: Endpoint, key: Callable[[bytes], bytes]
) -> PlannedRows:
    rows = PlannedRows(keys=[], fixed={}, items={}, cached=set())
    for index, request in enumerate(requests):
        if request is None:
            rows.fixed[index] = SKIPPED
            rows.keys.append(None)
            continue
        try:
            item = endpoint.item(index, request)
        except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
            error = UnsendableRow(f"this row's request cannot be encoded: {exc}"[:500])
            rows.fixed[index] = RowResult(None, RowError(type(error).__name__, str(error)))
            rows.keys.append(None)
            continue
        item.key = key(item.payload)
        rows.items.setdefault(item.key, item)
        rows.keys.append(item.key)
    return rows


def cache_path(config: ChatConfig) -> Path:
    """The cache file that keeps the config's batch jobs and their answers.

    Raises:
        ConfigError: the cache is off.
    """
    path = config.cache_path
    if path is None:
        raise ConfigError(
            "batch mode keeps its jobs and answers in the cache file, so that a new kernel "
            "finds them again; leave cache on (True or a path)"
        )
    return path


def job_budget(config: ChatConfig, options: BatchOptions, *, limited: bool) -> Budget:
    """The engine's `Budget`, at the batch's prices (every price times the discount)."""
    price = config_price(config)
    if price is not None:
        d = options.discount
        cached = None if price.cached_input is None else price.cached_input * d
        price = dataclasses.replace(
            price, input=price.input * d, output=price.output * d, cached_input=cached
        )
    return Budget(
        model=config.model or "",
        price=price,
        max_tokens_total=config.max_tokens_total if limited else None,
        max_cost=config.max_cost if limited else None,
    )


def _check_budget(config: ChatConfig, options: BatchOptions, items: Sequence[Item]) -> None:
    """Refuse a job whose worst case (estimated prompts + max_tokens) is over a limit.

    Raises:
        ConfigError: over ``max_tokens_total`` or ``max_cost`` (at the batch discount), or
            ``max_cost`` without a price for the model.
    """
    budget = job_budget(config, options, limited=True)
    prompt = sum(item.prompt_tokens for item in items)
    completion = sum(item.completion_tokens for item in items)
    if budget.try_reserve(prompt, completion):
        return
    what = f"{len(items):,} requests, at worst {prompt + completion:,.0f} tokens"
    if config.max_tokens_total is not None and prompt + completion > config.max_tokens_total:
        raise ConfigError(
            f"batch not submitted, nothing uploaded: {what}, over max_tokens_total="
            f"{config.max_tokens_total:,}. Lower max_tokens or submit fewer rows."
        )
    cost = budget.price(prompt, completion) or 0.0
    raise ConfigError(
        f"batch not submitted, nothing uploaded: {what}, worst case {cost:.4f} at the "
        f"batch discount ({options.discount:g}), over max_cost={config.max_cost:g}. "
        "Lower max_tokens, submit fewer rows or raise max_cost."
    )


def _line_result(line: batch_files.LineResult, stats: RunStats, budget: Budget) -> RowResult:
    """A result line as its row's result, counting its tokens into the run's stats."""
    if line.usage is not None:
        prompt, completion, cached = (n or 0 for n in usage_counts(line.usage))
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        stats.cached_tokens += cached
        budget.spend(prompt, completion, cached)
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
