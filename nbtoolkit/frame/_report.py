"""What a run leaves behind: per-row outcomes aligned to the caller's index, and a summary.

`last_run()` returns the report of the most recent run in this process, finished, aborted or
interrupted, so the reason a row failed is one line away without re-running anything.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nbtoolkit.core._rows import NOT_SENT_KINDS, RowResult, RunStats

ROW_COLUMNS = [
    "status",  # "ok", "failed", or never sent: "skipped", "not_run", "cancelled", "over_budget"
    "source",  # where an answer came from: "api", "cache" or "duplicate" (None without one)
    "error_kind",  # exception class name, e.g. "RateLimitError"; None when ok
    "http_status",  # the last HTTP status of a failed row, when there was one
    "attempts",  # requests sent for this row in this run
    "message",  # what went wrong, in the server's words when it gave some
    "prompt_tokens",  # as the server reported them when the answer was bought
    "completion_tokens",
    "cached_tokens",  # prompt tokens the server's own prompt cache served
]


@dataclass(frozen=True, eq=False)  # equality over DataFrames has no single answer
class RunReport:
    """The outcome of one run.

    Attributes:
        output: the result (a DataFrame or Series); after an abort or interrupt, the partial
            result with None in rows that did not finish.
        rows: one row per input row, same index and order, columns ``ROW_COLUMNS``.
        stats: requests sent, retries, statuses seen, wall time.
        outcome: "finished", "aborted" or "interrupted".
        notes: lines an operator adds to the summary (its stages, what decided the rows).
    """

    output: Any
    rows: pd.DataFrame
    stats: RunStats
    outcome: str
    notes: tuple[str, ...] = ()

    @property
    def errors(self) -> pd.DataFrame:
        """The rows that have no answer (failed, skipped or never run), with their reasons."""
        return self.rows[self.rows["status"] != "ok"]

    @property
    def usage(self) -> pd.DataFrame:
        """Token counts per row (same index), with where each answer came from."""
        return self.rows[["source", "prompt_tokens", "completion_tokens", "cached_tokens"]]

    def summary(self) -> str:
        """One line: rows by status; requests, cache hits, retries, 429s; tokens, cost, time."""
        stats = self.stats
        counts = self.rows["status"].value_counts()
        parts = [f"{counts.get(name, 0)} {name}" for name in ("ok", "failed", "skipped")]
        for name in ("not_run", "cancelled", "over_budget"):
            if counts.get(name, 0):
                parts.append(f"{counts[name]} {name}")
        statuses = ", ".join(f"{key}: {n}" for key, n in sorted(stats.statuses.items()))
        cost = f", cost {stats.cost:.4f}" if stats.cost is not None else ""
        capped = stats.items_per_request
        cap = f" (cut to {capped} rows each: the server refused larger ones)" if capped else ""
        notes = "".join(f"\n{note}" for note in self.notes)
        return (
            f"{self.outcome}: {', '.join(parts)}; {stats.requests_sent} requests "
            f"({statuses or 'none'}){cap}, {stats.cache_hits} cache hits, "
            f"{stats.duplicates} duplicates, {stats.retries} retries, "
            f"{stats.statuses.get('429', 0)} rate-limited; "
            f"{stats.prompt_tokens + stats.completion_tokens:,} tokens{cost}; "
            f"{stats.wall_seconds:.1f} s{notes}"
        )

    def __repr__(self) -> str:
        return f"<RunReport {self.summary()}>"


def rows_frame(results: Sequence[RowResult], index: pd.Index) -> pd.DataFrame:
    """Per-row outcomes as a frame with the caller's index (duplicates and MultiIndex kept)."""
    errors = [r.error for r in results]
    columns: dict[str, pd.Series] = {
        "status": _objects(
            [
                "ok" if e is None else (e.kind if e.kind in NOT_SENT_KINDS else "failed")
                for e in errors
            ],
            index,
        ),
        "source": _objects([r.source if r.error is None else None for r in results], index),
        "error_kind": _objects([None if e is None else e.kind for e in errors], index),
        "http_status": pd.Series(
            [None if e is None else e.status for e in errors], index=index, dtype="Int64"
        ),
        "attempts": pd.Series([r.attempts for r in results], index=index, dtype="int64"),
        "message": _objects([None if e is None else e.message for e in errors], index),
        "prompt_tokens": pd.Series([r.prompt_tokens for r in results], index=index, dtype="Int64"),
        "completion_tokens": pd.Series(
            [r.completion_tokens for r in results], index=index, dtype="Int64"
        ),
        "cached_tokens": pd.Series([r.cached_tokens for r in results], index=index, dtype="Int64"),
    }
    return pd.DataFrame(columns, index=index)


def _objects(values: list[Any], index: pd.Index) -> pd.Series:
    # object dtype keeps None as None: pandas 3 would infer a string dtype and turn it into NaN.
    return pd.Series(values, index=index, dtype=object)


_lock = threading.Lock()
_last: RunReport | None = None


def remember(report: RunReport) -> RunReport:
    global _last
    with _lock:
        _last = report
    return report


def last_run() -> RunReport | None:
    """The report of this process's most recent run (None before the first).

    Example:
        >>> out = df.chat.complete("review", model="gpt-4o-mini")  # doctest: +SKIP
        >>> nbtoolkit.last_run().errors  # why each None row is None
    """
    with _lock:
        return _last
