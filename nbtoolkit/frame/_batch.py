"""Batch mode's pandas face: ``df.chat.submit_batch`` and ``complete(..., batch=True)``.

The transport is `nbtoolkit.batch` (no pandas): the engine's endpoints and keys, written to
a JSONL file and read back by ``custom_id``. This module adds only what a frame needs: the
caller's index, the writer that turns results into the output frame, the same progress bar
and run report as a live run, and the blocking twins of the async methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from nbtoolkit.batch import BatchOptions, BatchStatus, Job
from nbtoolkit.batch import submit as submit_job
from nbtoolkit.config import ChatConfig, default_cache_path
from nbtoolkit.core._pricing import config_price
from nbtoolkit.core._rows import RowResult, RunStats
from nbtoolkit.core._runner import run_sync
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.store._batch_jobs import BatchStore
from nbtoolkit.errors import ConfigError, RunInterrupted
from nbtoolkit.frame._progress import ProgressBar
from nbtoolkit.frame._report import RunReport, remember, rows_frame

__all__ = ["BatchJob", "BatchOptions", "BatchStatus", "batch_jobs", "batch_mode", "submit"]


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


class BatchJob(Job):
    """A submitted batch job, tied to the frame it answers. Made by ``df.chat.submit_batch``.

    ``.id``, ``.ids``, ``.status()``, ``.wait()``, ``.result()``, ``.cancel()`` and their
    ``await``-able twins. The API key is never part of its repr, its files or its errors.
    """

    def __init__(
        self, job: Job, *, index: pd.Index, write: Callable[[Sequence[RowResult]], Any]
    ) -> None:
        super().__init__(
            job_id=job.job_id,
            config=job.config,
            endpoint=job.endpoint,
            options=job.options,
            rows=job._rows,
        )
        self._index = index
        self._write = write
        self._collected: tuple[list[RowResult], RunStats] | None = None

    def status(self) -> BatchStatus:
        """The server's status and request counts (see `astatus`)."""
        return run_sync(self.astatus())

    async def await_(
        self, *, progress: bool | None = None, poll: float | None = None
    ) -> BatchStatus:
        """Wait until every batch of the job has ended, polling with a growing interval.

        Args:
            progress: show the run's progress bar, of completed / failed lines; default
                the config's.
            poll: seconds between checks, fixed; default from ``poll_initial`` growing to
                ``poll_max`` (`BatchOptions`).

        Returns:
            The final status.
        """
        show = self.config.progress if progress is None else progress
        total = len(self._rows.items) - len(self._rows.cached)
        with ProgressBar(total, enabled=show, desc=f"batch {self.id}") as bar:
            return await self.await_done(
                poll=poll, seen=lambda s: bar.show(ok=s.completed, failed=s.failed, note=s.status)
            )

    def wait(self, *, progress: bool | None = None, poll: float | None = None) -> BatchStatus:
        """Wait for the job to end (see `await_`). Ctrl-C stops waiting, never the job.

        Raises:
            RunInterrupted: Ctrl-C or the stop button; the job keeps running on the server.
        """
        try:
            return run_sync(self.await_(progress=progress, poll=poll))
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            raise RunInterrupted(self.still_running(), partial=None) from exc

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
            self._collected = await self.collect()
        results, stats = self._collected
        stats.started = started
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
            raise RunInterrupted(self.still_running(), partial=None) from exc


async def submit(
    frame: pd.DataFrame,
    requests: Iterable[Any],
    config: ChatConfig,
    write: Callable[[Sequence[RowResult]], Any],
    *,
    endpoint: Endpoint | None = None,
    options: BatchOptions | None = None,
) -> BatchJob:
    """Submit the frame's requests as a batch job (see `nbtoolkit.batch.submit`).

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
    job = await submit_job(requests, config, endpoint=endpoint, options=options)
    return BatchJob(job, index=frame.index, write=write)


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
        exc.add_note(job.still_running())
        raise


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
