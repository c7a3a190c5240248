"""Batch mode: the same requests as `complete`, sent as a Batch API job at half the price.

Not a second engine: each row becomes the endpoint's `Item` exactly as `complete` builds
it, its cache key is the one `complete` would use, and each answer is parsed by the
endpoint's own ``parse``. Only the transport differs: a JSONL file, uploaded, run by the
provider within 24 hours, and read back::

    rows ─ endpoint.item ─ cache hit? ─────────────────────────────► result (nothing sent)
                      └─ JSONL lines ─ split (model, 50,000 lines, 200 MB) ─ upload ─ create
    status / wait ─ output + error files ─ by custom_id ─ endpoint.parse ─ cache ─► result

The job lives in the cache file (`core.store._batch_jobs`), keyed by the requests it holds:
running the same cell again, in a new kernel too, re-attaches to it instead of paying twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from nbtoolkit.batch import _files as batch_files
from nbtoolkit.batch._client import BatchClient
from nbtoolkit.batch._files import Line, LineResult
from nbtoolkit.config import ChatConfig, default_cache_path
from nbtoolkit.core._budget import Budget
from nbtoolkit.core._engine import request_keys
from nbtoolkit.core._pricing import config_price
from nbtoolkit.core._rows import SKIPPED, RowError, RowResult, RunStats
from nbtoolkit.core._runner import run_sync
from nbtoolkit.core.endpoints._base import ChatEndpoint, Endpoint, Item
from nbtoolkit.core.store._batch_jobs import TERMINAL, BatchStore, Part, job_key
from nbtoolkit.core.store._cache import CachedAnswer, RequestKeys, ResponseCache
from nbtoolkit.errors import ConfigError, NbToolkitError, RunInterrupted, UnsendableRow
from nbtoolkit.frame._report import RunReport, remember, rows_frame

# How long a run waits for another process that is uploading the same job right now.
_OTHER_SUBMITTER_WAIT = 120.0


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


def batch_mode(batch: object) -> BatchOptions | None:
    """What ``complete(batch=...)`` asks for: None for live requests, else the job's options.

    Only True or a `BatchOptions` mean Batch API mode (answers within 24 hours): a falsy
    ``None`` or ``0`` must not start a day-long job by accident.

    Raises:
        ConfigError: anything but True, False or a `BatchOptions`.
    """
    if batch is False:
        return None
    if batch is True:
        return BatchOptions()
    if isinstance(batch, BatchOptions):
        return batch
    raise ConfigError(
        f"batch= takes True (send the rows as a Batch API job: half price, answers within "
        f"24 hours), False (the default: live requests) or a BatchOptions; got {batch!r}"
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


@dataclass
class _Rows:
    """Which request each row of the caller's frame stands for."""

    keys: list[bytes | None]  # per row: its request's cache key; None when not sent
    fixed: dict[int, RowResult]  # rows with an outcome from the start (skipped, unsendable)
    items: dict[bytes, Item]  # each distinct request, by key
    cached: set[bytes]  # keys answered by the cache before submission


class BatchJob:
    """A submitted batch job, tied to the rows it answers. Made by ``df.chat.submit_batch``.

    Its state is on the server and in the cache file; this object only knows how to ask.
    The API key is never part of its repr, its files or its errors.
    """

    def __init__(
        self,
        *,
        job_id: str | None,
        config: ChatConfig,
        endpoint: Endpoint,
        rows: _Rows,
        index: pd.Index,
        write: Callable[[Sequence[RowResult]], Any],
        options: BatchOptions,
    ) -> None:
        self.job_id = job_id  # None: every row was answered already; nothing was sent
        self.config = config
        self.endpoint = endpoint
        self.options = options
        self._rows = rows
        self._index = index
        self._write = write
        self._collected: dict[bytes, RowResult] | None = None
        self._stats: RunStats | None = None

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
        return BatchStore(_cache_path(self.config))

    def _parts(self) -> list[Part]:
        if self.job_id is None:
            return []
        with self._store() as store:
            return store.parts(self.job_id)

    async def astatus(self) -> BatchStatus:
        """Ask the server how each batch is doing; the answer is also kept in the cache file."""
        parts = self._parts()
        async with BatchClient(self.config) as api:
            with self._store() as store:
                for part in parts:
                    if part.batch_id is None or part.status in TERMINAL:
                        continue
                    batch = await api.get(part.batch_id)
                    counts = batch.get("request_counts") or {}
                    errors = (batch.get("errors") or {}).get("data") or []
                    store.update(
                        part.job_id,
                        part.part,
                        status=str(batch.get("status")),
                        completed=int(counts.get("completed") or 0),
                        failed=int(counts.get("failed") or 0),
                        output_file_id=batch.get("output_file_id"),
                        error_file_id=batch.get("error_file_id"),
                        errors="; ".join(_describe(e) for e in errors) or None,
                    )
        return _summarise(self._parts())

    def status(self) -> BatchStatus:
        """The server's status and request counts (see `astatus`)."""
        return run_sync(self.astatus())

    async def await_(
        self, *, progress: bool | None = None, poll: float | None = None
    ) -> BatchStatus:
        """Wait until every batch of the job has ended, polling with a growing interval.

        Args:
            progress: show a bar of completed / failed / total lines; default the config's.
            poll: seconds between checks, fixed; default from ``poll_initial`` growing to
                ``poll_max`` (`BatchOptions`).

        Returns:
            The final status.
        """
        show = self.config.progress if progress is None else progress
        unsent = [p.part for p in self._parts() if p.batch_id is None]
        if unsent:
            raise NbToolkitError(
                f"batch job {self.job_id} has parts {unsent} that were never created on the "
                "server (the upload failed); re-run the same submit_batch call to send them"
            )
        interval = poll or self.options.poll_initial
        state = await self.astatus()
        bar = tqdm(total=state.total, desc=f"batch {self.id}", unit="row", disable=not show)
        try:
            while True:
                bar.n = state.completed + state.failed
                bar.set_postfix_str(f"{state.status}, failed={state.failed}", refresh=True)
                if state.done:
                    return state
                await asyncio.sleep(interval)
                if poll is None:
                    interval = min(interval * 1.5, self.options.poll_max)
                state = await self.astatus()
        finally:
            bar.close()

    def wait(self, *, progress: bool | None = None, poll: float | None = None) -> BatchStatus:
        """Wait for the job to end (see `await_`). Ctrl-C stops waiting, never the job.

        Raises:
            RunInterrupted: Ctrl-C or the stop button; the job keeps running on the server.
        """
        try:
            return run_sync(self.await_(progress=progress, poll=poll))
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            raise RunInterrupted(self._still_running(), partial=None) from exc

    async def acancel(self) -> BatchStatus:
        """Ask the server to cancel every batch still running; lines already run are kept."""
        async with BatchClient(self.config) as api:
            for part in self._parts():
                if part.batch_id is not None and part.status not in TERMINAL:
                    await api.cancel(part.batch_id)
        return await self.astatus()

    def cancel(self) -> BatchStatus:
        """Cancel the job on the server (see `acancel`)."""
        return run_sync(self.acancel())

    async def aresult(self) -> Any:
        """Wait for the job, read its answers into the cache, return the caller's rows.

        Returns:
            A new frame exactly like `complete`'s: the caller's rows in order, the answer
            column, None where a row got none; ``nbtoolkit.last_run()`` says why.
        """
        started = time.monotonic()
        if self._collected is None:
            if not (await self.astatus()).done:
                await self.await_()
            self._collected, self._stats = await self._collect()
        results = self._results()
        stats = dataclasses.replace(self._stats or RunStats(), started=started)
        stats.cache_hits = sum(1 for r in results if r.source == "cache" and r.error is None)
        stats.duplicates = sum(1 for r in results if r.source == "duplicate")
        stats.finished = time.monotonic()
        price = config_price(self.config.resolved())
        rows = rows_frame(results, self._index, price)
        report = RunReport(self._write(results), rows, stats, "finished", price=price)
        return remember(report).output

    def result(self) -> Any:
        """The answers as a new frame (see `aresult`); waits for the job first.

        Raises:
            RunInterrupted: Ctrl-C while waiting; the job keeps running on the server.
        """
        try:
            return run_sync(self.aresult())
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            raise RunInterrupted(self._still_running(), partial=None) from exc

    def _still_running(self) -> str:
        return (
            f"stopped waiting; batch job {self.id} keeps running on the server. Call "
            ".wait() or .result() again, or re-run the same submit_batch cell to re-attach."
        )

    async def _collect(self) -> tuple[dict[bytes, RowResult], RunStats]:
        """Read every batch's output and error file into the cache, by custom_id."""
        outcomes: dict[bytes, RowResult] = {}
        stats = RunStats()
        budget = _budget(self.config)
        path = _cache_path(self.config)
        async with BatchClient(self.config) as api:
            for part in self._parts():
                with self._store() as store:
                    requests = store.requests(part.job_id, part.part)
                seen: dict[str, LineResult] = {}
                for file_id in (part.output_file_id, part.error_file_id):
                    if file_id is None:
                        continue
                    for record in batch_files.records(await api.content(file_id)):
                        key = requests.get(record["custom_id"])
                        if key is None:
                            continue  # not ours: a line of another job's file
                        line = batch_files.read_line(
                            record, self._rows.items.get(key), self.endpoint
                        )
                        seen[record["custom_id"]] = line
                with ResponseCache(path) as cache:
                    for cid, key in requests.items():
                        line_result = seen.get(cid)
                        if line_result is None:
                            outcomes[key] = RowResult(None, _missing(part))
                            continue
                        stats.requests_sent += 1
                        stats.statuses[line_result.label] += 1
                        outcomes[key] = _row(line_result, stats, budget, self.options.discount)
                        if line_result.answer is not None:
                            answer = line_result.answer
                            stored = CachedAnswer(
                                answer.stored,
                                answer.prompt_tokens,
                                answer.completion_tokens,
                                answer.cached_tokens,
                            )
                            cache.put(key, stored, model=self.config.model)
                    cache.commit()
        if self.job_id is not None:
            with self._store() as store:
                store.mark_collected(self.job_id)
        priced = budget.unit_price is not None
        stats.cost = budget.cost * self.options.discount if priced else None
        return outcomes, stats

    def _results(self) -> list[RowResult]:
        """One result per row of the caller's frame, in its order."""
        rows = self._rows
        collected = self._collected or {}
        looked_up: dict[bytes, CachedAnswer] = {}
        wanted = [k for k in rows.items if k not in collected]
        if wanted:
            with ResponseCache(_cache_path(self.config)) as cache:
                looked_up = cache.get_many(wanted)
        results: list[RowResult] = []
        given: set[bytes] = set()
        for position, key in enumerate(rows.keys):
            if key is None:
                results.append(rows.fixed[position])
                continue
            if key in collected:
                result = collected[key]
                results.append(
                    dataclasses.replace(result, attempts=0, source="duplicate")
                    if key in given
                    else result
                )
                given.add(key)
                continue
            answer = looked_up.get(key)
            if answer is None:
                message = "no answer: not in this job and not in the cache (was it cleared?)"
                results.append(RowResult(None, RowError("not_run", message)))
                continue
            value = self.endpoint.decode(answer.text)
            text = answer.text if isinstance(answer.text, str) else None
            results.append(
                RowResult(
                    text,
                    None,
                    0,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                    answer.cached_tokens,
                    "cache",
                    value=value,
                )
            )
        return results


async def submit(
    frame: pd.DataFrame,
    requests: Iterable[Any],
    config: ChatConfig,
    write: Callable[[Sequence[RowResult]], Any],
    *,
    endpoint: Endpoint | None = None,
    options: BatchOptions | None = None,
) -> BatchJob:
    """Submit the uncached requests as a batch job, or re-attach to the one already submitted.

    Args:
        frame: the caller's rows (for the index of the result).
        requests: one request (or None: nothing to send) per row.
        config: where requests go; its cache file keeps the job.
        write: builds the output from one result per row.
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
    path = _cache_path(config)
    endpoint = endpoint or ChatEndpoint({"model": config.model, **config.params})
    if endpoint.max_items != 1:
        raise ConfigError(
            f"batch mode sends one row per line; {type(endpoint).__name__} groups rows"
        )
    rows = _plan(requests, endpoint, request_keys(config, endpoint))
    with ResponseCache(path) as cache:
        rows.cached = set(cache.get_many(list(rows.items)))
    line_url = "/v1" + endpoint.path
    to_send = [k for k in rows.items if k not in rows.cached]
    job = BatchJob(
        job_id=None,
        config=config,
        endpoint=endpoint,
        rows=rows,
        index=frame.index,
        write=write,
        options=options,
    )
    if not to_send:
        return job
    key = job_key(config.key_url(endpoint.path), to_send)
    lines = [batch_files.line(rows.items[k], k, line_url) for k in to_send]
    files = batch_files.split(lines, max_lines=options.max_lines, max_bytes=options.max_bytes)
    with BatchStore(path) as store:
        if store.live_job(key) is None:
            # Checked only for a new job: re-attaching uploads nothing and pays nothing more.
            _check_budget(config, options, [rows.items[k] for k in to_send])
        job_id, created = store.claim(
            key,
            model=config.model,
            endpoint=line_url,
            parts=[[(one.custom_id, one.key) for one in file] for file in files],
        )
    job.job_id = job_id
    await _send_parts(job, {one.custom_id: one for one in lines}, line_url, mine=created)
    return job


async def run_batch(
    frame: pd.DataFrame,
    requests: Iterable[Any],
    config: ChatConfig,
    write: Callable[[Sequence[RowResult]], Any],
    *,
    endpoint: Endpoint | None = None,
    options: BatchOptions | None = None,
) -> Any:
    """Submit (or re-attach), wait and return the result: ``complete(..., batch=True)``."""
    job = await submit(frame, requests, config, write, endpoint=endpoint, options=options)
    try:
        return await job.aresult()
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        exc.add_note(job._still_running())
        raise


async def _send_parts(job: BatchJob, lines: dict[str, Line], url: str, *, mine: bool) -> None:
    """Upload and create each batch of the job that has none yet.

    ``mine``: this call claimed the job and sends every part. Otherwise it sends only parts
    left unsent (their submitter failed, or died long ago) and waits for a part another
    process is submitting right now.
    """
    assert job.job_id is not None
    deadline = time.monotonic() + _OTHER_SUBMITTER_WAIT
    async with BatchClient(job.config) as api:
        for part in job._parts():
            while part.batch_id is None:
                if not mine:
                    with job._store() as store:
                        taken = store.take_over(part)
                if mine or taken:
                    await _send_part(api, job, part, lines, url)
                    break
                if time.monotonic() > deadline:
                    raise NbToolkitError(
                        f"another process is still submitting batch job {job.job_id}; "
                        "run the cell again in a minute to re-attach"
                    )
                await asyncio.sleep(0.2)
                part = next(p for p in job._parts() if p.part == part.part)


async def _send_part(
    api: BatchClient, job: BatchJob, part: Part, lines: dict[str, Line], url: str
) -> None:
    assert job.job_id is not None
    with job._store() as store:
        ids = store.requests(job.job_id, part.part)
    content = b"".join(lines[cid].data for cid in ids)
    try:
        file_id = await api.upload(content, filename=f"{job.job_id}-{part.part}.jsonl")
        with job._store() as store:
            store.update(job.job_id, part.part, input_file_id=file_id)
        batch = await api.create(
            input_file_id=file_id,
            endpoint=url,
            metadata={"nbtoolkit_job": job.job_id, "part": str(part.part)},
        )
    except BaseException:
        with job._store() as store:
            store.update(job.job_id, part.part, status="unsent")  # a re-run sends it
        raise
    counts = batch.get("request_counts") or {}
    with job._store() as store:
        store.update(
            job.job_id,
            part.part,
            batch_id=str(batch["id"]),
            status=str(batch.get("status", "validating")),
            total=int(counts.get("total") or len(ids)),
        )


def batch_jobs(cache: str | Path | None = None) -> pd.DataFrame:
    """The batch jobs this cache file knows, newest first, one row per server batch.

    Statuses and counts are as last seen (by ``job.status()``, ``wait`` or ``result``);
    nothing is asked of the server.

    Args:
        cache: the cache file; default the per-user one.

    Returns:
        A DataFrame with columns id, job, created, status, total, completed, failed, model,
        endpoint, part, collected.
    """
    with BatchStore(cache or default_cache_path()) as store:
        rows = store.jobs()
    columns = [
        "id",
        "job",
        "created",
        "status",
        "total",
        "completed",
        "failed",
        "model",
        "endpoint",
        "part",
        "collected",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["created"] = pd.to_datetime(frame["created"], unit="s", utc=True)
    frame["collected"] = frame["collected"].astype(bool)
    return frame


def _plan(requests: Iterable[Any], endpoint: Endpoint, keys: RequestKeys) -> _Rows:
    rows = _Rows(keys=[], fixed={}, items={}, cached=set())
    for index, request in enumerate(requests):
        if request is None:
            rows.fixed[index] = SKIPPED
            rows.keys.append(None)
            continue
        try:
            item = endpoint.item(index, request)
        except (ValueError, TypeError, UnicodeError) as exc:
            error = UnsendableRow(f"this row's request cannot be encoded: {exc}"[:500])
            rows.fixed[index] = RowResult(None, RowError(type(error).__name__, str(error)))
            rows.keys.append(None)
            continue
        key = keys.key(item.payload)
        rows.items.setdefault(key, item)
        rows.keys.append(key)
    return rows


def _cache_path(config: ChatConfig) -> Path:
    path = config.cache_path
    if path is None:
        raise ConfigError(
            "batch mode keeps its jobs and answers in the cache file, so that a new kernel "
            "finds them again; leave cache on (True or a path)"
        )
    return path


def _budget(config: ChatConfig) -> Budget:
    return Budget(
        model=config.model or "", price=config_price(config), max_tokens_total=None, max_cost=None
    )


def _check_budget(config: ChatConfig, options: BatchOptions, items: Sequence[Item]) -> None:
    """Refuse a job whose worst case (estimated prompts + max_tokens) is over a limit.

    Raises:
        ConfigError: over ``max_tokens_total`` or ``max_cost`` (at the batch discount), or
            ``max_cost`` without a price for the model.
    """
    prompt = sum(item.prompt_tokens for item in items)
    completion = sum(item.completion_tokens for item in items)
    budget = Budget(
        model=config.model or "",
        price=config_price(config),
        max_tokens_total=config.max_tokens_total,
        max_cost=config.max_cost,
    )
    what = f"{len(items):,} requests, at worst {prompt + completion:,.0f} tokens"
    if config.max_tokens_total is not None and prompt + completion > config.max_tokens_total:
        raise ConfigError(
            f"batch not submitted, nothing uploaded: {what}, over max_tokens_total="
            f"{config.max_tokens_total:,}. Lower max_tokens or submit fewer rows."
        )
    cost = (budget.price(prompt, completion) or 0.0) * options.discount
    if config.max_cost is not None and cost > config.max_cost:
        raise ConfigError(
            f"batch not submitted, nothing uploaded: {what}, worst case {cost:.4f} at the "
            f"batch discount ({options.discount:g}), over max_cost={config.max_cost:g}. "
            "Lower max_tokens, submit fewer rows or raise max_cost."
        )


def _row(line: LineResult, stats: RunStats, budget: Budget, discount: float) -> RowResult:
    """A result line as its row's result, counting its tokens into the run's stats."""
    if line.usage is not None:
        prompt = int(line.usage.get("prompt_tokens") or 0)
        completion = int(line.usage.get("completion_tokens") or 0)
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        budget.spend(prompt, completion)
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


def _missing(part: Part) -> RowError:
    """Why a request has no line in either result file: what became of its batch."""
    if part.status == "cancelled":
        return RowError("cancelled", f"batch {part.batch_id} was cancelled before this row ran")
    if part.status == "expired":
        return RowError("BatchExpired", f"batch {part.batch_id} expired before this row ran")
    if part.status == "failed":
        return RowError("BatchFailed", f"batch {part.batch_id} failed validation: {part.errors}")
    return RowError(
        "BatchLineMissing", f"batch {part.batch_id} ({part.status}) has no line for this row"
    )


def _describe(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)[:200]
    line = f" (line {error['line']})" if error.get("line") is not None else ""
    return f"{error.get('code')}: {error.get('message')}{line}"[:300]


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
