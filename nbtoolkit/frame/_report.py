"""What a run leaves behind: per-row outcomes aligned to the caller's index, and a summary.

`last_run()` returns the report of the most recent run in this process, finished, aborted or
interrupted, so the reason a row failed is one line away without re-running anything.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nbtoolkit.core._costestimate import CostEstimate
from nbtoolkit.core._pricing import PRICE_UNKNOWN, Price, format_money
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
    "cost",  # what this row cost in this run (0 from the cache); NaN: price unknown
]


@dataclass(frozen=True, eq=False)  # equality over DataFrames has no single answer
class RunReport:
    """The outcome of one run.

    Attributes:
        output: the result (a DataFrame or Series); after an abort or interrupt, the partial
            result with None in rows that did not finish.
        rows: one row per input row, same index and order, columns ``ROW_COLUMNS`` (built
            when first read: given as a function, a run that nobody asks about does not
            build a 100,000-row frame).
        stats: requests sent, retries, statuses seen, wall time.
        outcome: "finished", "aborted" or "interrupted".
        notes: lines an operator adds to the summary (its stages, what decided the rows).
        price: the model's price the costs were figured at; None: "price unknown".
        estimate: the dry run's estimate this run started from, if there was one.
    """

    output: Any
    _rows: pd.DataFrame | Callable[[], pd.DataFrame]
    stats: RunStats
    outcome: str
    notes: tuple[str, ...] = ()
    price: Price | None = None
    estimate: CostEstimate | None = None

    @functools.cached_property
    def rows(self) -> pd.DataFrame:
        return self._rows() if callable(self._rows) else self._rows

    @property
    def cost(self) -> float | None:
        """What the run cost, with the pilot of its estimate (None: price unknown)."""
        if self.stats.cost is None:
            return None
        pilot = self.estimate.pilot if self.estimate is not None else None
        return self.stats.cost + (pilot.cost or 0.0 if pilot is not None else 0.0)

    @property
    def estimate_error(self) -> float | None:
        """How far the dry run's expected cost was from what the run cost: +0.05 is an
        estimate 5% too high; None without an estimate or a price, or when some rows were
        never sent (stopped, over budget): the estimate priced every row."""
        cost = self.cost
        if self.estimate is None or self.estimate.cost is None or not cost or self._unsent():
            return None
        return self.estimate.cost.expected / cost - 1

    def _unsent(self) -> int:
        """Rows the run never finished sending: not run, cancelled or over budget."""
        return int(self.rows["status"].isin(("not_run", "cancelled", "over_budget")).sum())

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
        cost = f", cost {self._cost_text()}"
        capped = stats.items_per_request
        cap = f" (cut to {capped} rows each: the server refused larger ones)" if capped else ""
        notes = "".join(f"\n{note}" for note in (*self.notes, *_budget_notes(stats)))
        return (
            f"{self.outcome}: {', '.join(parts)}; {stats.requests_sent} requests "
            f"({statuses or 'none'}){cap}, {stats.cache_hits} cache hits, "
            f"{stats.duplicates} duplicates, {stats.retries} retries, "
            f"{stats.statuses.get('429', 0)} rate-limited; "
            f"{stats.prompt_tokens + stats.completion_tokens:,} tokens{_cached(stats)}{cost}; "
            f"{stats.wall_seconds:.1f} s{self._estimate_text()}{notes}"
        )

    def _cost_text(self) -> str:
        stats = self.stats
        if stats.cost is None:
            return PRICE_UNKNOWN
        text = format_money(stats.cost)
        price = self.price
        if price is None:  # a report put together from other runs' (an operator's stages)
            return text
        if self.rows["source"].eq("batch").any():
            text += f" (Batch price, {price.batch_discount:g} of the list price)"
        return text

    def _estimate_text(self) -> str:
        estimate, error = self.estimate, self.estimate_error
        if estimate is not None and estimate.cost is not None and (unsent := self._unsent()):
            return (
                f"; estimated ~{format_money(estimate.cost.expected)} for every row, not "
                f"compared: {unsent:,} rows were not sent"
            )
        if estimate is None or estimate.cost is None or error is None:
            return ""
        span = estimate.cost
        high = "no bound" if span.high is None else format_money(span.high)
        inside = "inside" if span.contains(self.cost or 0.0) else "outside"
        return (
            f"; estimated ~{format_money(span.expected)} ({format_money(span.low)} to {high}), "
            f"cost {format_money(self.cost)} with the pilot: {error:+.0%}, {inside} the range"
        )

    def __repr__(self) -> str:
        return f"<RunReport {self.summary()}>"


def _budget_notes(stats: RunStats) -> list[str]:
    """What a budget assumed or charged without the server's word for it."""
    notes = [stats.budget_note] if stats.budget_note else []
    if stats.charged_unconfirmed:
        notes.append(
            f"budget: {stats.charged_unconfirmed:,} tokens charged at their worst case, for "
            "requests that timed out or came back without usage (the provider may bill them)"
        )
    return notes


def _cached(stats: RunStats) -> str:
    """`` (1,234 cached, saved 0.0123)``: prompt tokens the provider's prompt cache served."""
    if not stats.cached_tokens:
        return ""
    saved = f", saved {stats.cache_saved:.4f}" if stats.cache_saved is not None else ""
    return f" ({stats.cached_tokens:,} cached{saved})"


def rows_frame(
    results: Sequence[RowResult], index: pd.Index, price: Price | None = None
) -> pd.DataFrame:
    """Per-row outcomes as a frame with the caller's index (duplicates and MultiIndex kept);
    ``price`` gives each row's cost (NaN for every row without one)."""
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
        "cost": pd.Series([_row_cost(r, price) for r in results], index=index, dtype="float64"),
    }
    return pd.DataFrame(columns, index=index)


def _row_cost(result: RowResult, price: Price | None) -> float:
    """What a row cost in this run: its tokens if it was sent (Batch at its discount), 0 for
    an answer from the cache or a duplicate, NaN without a price."""
    if price is None:
        return math.nan
    if result.source not in ("api", "batch") or result.attempts == 0:
        return 0.0
    if result.prompt_tokens is None and result.completion_tokens is None:
        return 0.0
    return price.cost(
        result.prompt_tokens or 0,
        result.completion_tokens or 0,
        result.cached_tokens or 0,
        written=result.cache_write_tokens or 0,
        batch=result.source == "batch",
    )


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
