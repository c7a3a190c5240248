"""A distributed run's reports: one per partition, kept in the ledger, and their sum.

Each partition pickles a `PartitionReport` (its rows by status, its stats and, at most
``MAX_ERRORS_PER_PARTITION`` of them, the rows without an answer) and sends it to the
run's ledger; `last_dask_run` reads them back, from the scheduler's ledger or this
process's, and adds them up into a `DaskRunReport`.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nbtoolkit.core._engine import results_in_order
from nbtoolkit.core._pricing import format_money
from nbtoolkit.core._rows import RunStats
from nbtoolkit.dask._lease import LocalTransport
from nbtoolkit.frame._report import RunReport, rows_frame

# Failed rows kept per partition in its report: the reasons stay readable without the
# report of a 20-million-row run growing with its failures.
MAX_ERRORS_PER_PARTITION = 10_000
built_runs: deque[str] = deque(maxlen=32)  # the ids of the runs this process built, oldest first


@dataclass(frozen=True)
class PartitionReport:
    """One partition's outcome, as the ledger keeps it (pickled)."""

    partition: int
    rows: int
    outcome: str  # "finished" or "aborted"
    stats: RunStats
    started: float  # wall clock
    finished: float
    statuses: dict[str, int]  # rows by status ("ok", "failed", "skipped", ...)
    errors: pd.DataFrame  # the rows without an answer (at most MAX_ERRORS_PER_PARTITION)


@dataclass(frozen=True, eq=False)
class DaskRunReport:
    """The combined report of a distributed run (see `last_dask_run`).

    Attributes:
        run: the run's id.
        outcome: "finished", "aborted", or "running" (not every partition has reported).
        partitions: one report per partition that finished or stopped.
        stats: requests, retries, statuses, tokens and cost, summed over the partitions.
        errors: the rows with no answer, with the partition's index and their reasons.
        peak_slots: the most concurrency slots held at once across the cluster.
    """

    run: str
    outcome: str
    partitions: list[PartitionReport]
    stats: RunStats
    errors: pd.DataFrame
    peak_slots: int

    @property
    def rows(self) -> Counter[str]:
        """Rows by status, summed over the partitions."""
        total: Counter[str] = Counter()
        for part in self.partitions:
            total.update(part.statuses)
        return total

    def summary(self) -> str:
        """One line: rows by status; requests, cache hits, retries, 429s; tokens, cost, time."""
        stats = self.stats
        rows = ", ".join(f"{n} {status}" for status, n in sorted(self.rows.items()))
        statuses = ", ".join(f"{key}: {n}" for key, n in sorted(stats.statuses.items()))
        cost = f", cost {format_money(stats.cost)}"  # None: "price unknown", never $0
        return (
            f"{self.outcome}: {rows or 'no rows'} in {len(self.partitions)} partitions; "
            f"{stats.requests_sent} requests ({statuses or 'none'}), {stats.cache_hits} cache "
            f"hits, {stats.retries} retries, {stats.statuses.get('429', 0)} rate-limited; "
            f"{stats.prompt_tokens + stats.completion_tokens:,} tokens{cost}; "
            f"peak {self.peak_slots} slots; {stats.wall_seconds:.1f} s"
        )

    def __repr__(self) -> str:
        return f"<DaskRunReport {self.summary()}>"


def partition_report(
    part: Any, number: int, reports: Sequence[RunReport], outcome: str, started: float
) -> bytes:
    if reports:
        rows, stats = reports[-1].rows, reports[-1].stats
    else:  # stopped before its run began
        rows, stats = rows_frame(results_in_order([None]) * len(part), part.index), RunStats()
    failed = rows[rows["status"] != "ok"]
    return pickle.dumps(
        PartitionReport(
            partition=number,
            rows=len(part),
            outcome=outcome,
            stats=stats,
            started=started,
            finished=time.time(),
            statuses={str(k): int(v) for k, v in rows["status"].value_counts().items()},
            errors=failed.head(MAX_ERRORS_PER_PARTITION).assign(partition=number),
        )
    )


def last_dask_run() -> DaskRunReport | None:
    """The combined report of the latest ``ddf.chat`` run this process built and computed.

    Reads the partitions' reports from the ledger (the scheduler's, or this process's for
    dask's threaded scheduler). Call it after ``compute()``; None before any partition ran.

    Returns:
        A `DaskRunReport`: ``.summary()``, ``.stats``, ``.errors`` (why each None is None).
    """
    for run in reversed(built_runs):
        fetched = _fetch(run)
        if fetched["reports"]:
            return _combine(run, fetched)
    return None


def _fetch(run: str) -> dict[str, Any]:
    local: dict[str, Any] = LocalTransport.ledger.reports(run=run)
    if local["reports"] or "distributed" not in sys.modules:
        return local
    from distributed import default_client

    try:
        client = default_client()  # type: ignore[no-untyped-call]
        found: dict[str, Any] = client.sync(client.scheduler.nbtoolkit_reports, run=run)
    except (ValueError, KeyError, AttributeError, OSError):  # no client, or no ledger yet
        return local
    return found


def _combine(run: str, fetched: dict[str, Any]) -> DaskRunReport:
    parts: list[PartitionReport] = [pickle.loads(blob) for blob in fetched["reports"]]
    stats = RunStats()
    costs = [p.stats.cost for p in parts if p.stats.cost is not None]
    for part in parts:
        for name in ("requests_sent", "retries", "cache_hits", "duplicates", "reasks"):
            setattr(stats, name, getattr(stats, name) + getattr(part.stats, name))
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            setattr(stats, name, getattr(stats, name) + getattr(part.stats, name))
        stats.statuses.update(part.stats.statuses)
    stats.cost = sum(costs) if costs else None
    # Wall clock across processes: from the first partition's start to the last one's end.
    stats.started = min((p.started for p in parts), default=0.0)
    stats.finished = max((p.finished for p in parts), default=0.0)
    outcome = "aborted" if fetched["aborted"] else "finished"
    errors = [p.errors for p in parts if len(p.errors)]
    return DaskRunReport(
        run=run,
        outcome=outcome,
        partitions=parts,
        stats=stats,
        errors=pd.concat(errors) if errors else parts[0].errors.iloc[:0],
        peak_slots=int(fetched["peak_held"]),
    )
