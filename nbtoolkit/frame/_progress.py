"""The progress bar: a tqdm widget in Jupyter, text in a terminal. The engine only calls it.

`tqdm.auto` picks the widget when it runs in a kernel; ipywidgets is a dependency, so the
"IProgress not found" fallback never shows. The bar advances once per finished row (not per
batch), so it never jumps from 0 to 100%.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from types import TracebackType

from tqdm.auto import tqdm

from nbtoolkit.core._pricing import PRICE_UNKNOWN, Price, format_money
from nbtoolkit.core._rows import RowResult

# The projected total is shown once this share of the rows is done (and a few were paid):
# before that, one long answer would swing it.
_PROJECT_AFTER = 0.03
_PROJECT_MIN_PAID = 3


class LiveCost:
    """Money spent so far by one run, and where it is heading.

    Args:
        price: the model's price; None: "price unknown" (never $0).
        rows: rows in the run.
        to_pay: rows expected to be sent (from a dry run's estimate); None: every row not
            yet finished may still be paid for.
        expected: the dry run's expected cost, shown until the run's own projection starts.
        max_cost: warn once, early, when the projection passes it.
    """

    def __init__(
        self,
        price: Price | None,
        *,
        rows: int,
        to_pay: int | None = None,
        expected: float | None = None,
        max_cost: float | None = None,
    ) -> None:
        self.price = price
        self.spent = 0.0
        self.paid_rows = 0
        self.finished = 0
        self.warned = False
        self._rows = rows
        self._to_pay = to_pay
        self._expected = expected
        self._max_cost = max_cost
        if expected is not None:
            self._check(expected, "the dry run's estimate")

    def add(self, result: RowResult) -> None:
        """Count a finished row; a row paid in this run adds what its tokens cost."""
        self.finished += 1
        if self.price is None or result.source != "api" or result.prompt_tokens is None:
            return
        self.paid_rows += 1
        self.spent += self.price.cost(
            result.prompt_tokens,
            result.completion_tokens or 0,
            result.cached_tokens or 0,
            written=result.cache_write_tokens or 0,
        )
        projected = self.projected()
        if projected is not None:
            self._check(projected, "this run's first rows")

    def projected(self) -> float | None:
        """The run's expected total, from what its paid rows cost so far; None until enough
        rows are done to say."""
        if self.paid_rows < _PROJECT_MIN_PAID or self.finished < _PROJECT_AFTER * self._rows:
            return None
        per_row = self.spent / self.paid_rows
        if self._to_pay is not None:
            left = max(0, self._to_pay - self.paid_rows)
        else:
            left = max(0, self._rows - self.finished)
        return self.spent + per_row * left

    def text(self) -> str:
        """``$0.42 of ~$3.10`` (or ``$0.42`` before a projection; "price unknown")."""
        if self.price is None:
            return f"cost: {PRICE_UNKNOWN}"
        projected = self.projected()
        total = projected if projected is not None else self._expected
        text = format_money(self.spent)
        if total is not None:
            text += f" of ~{format_money(total)}"
        if self.warned:
            text += f" (over max_cost={format_money(self._max_cost)})"
        return text

    def _check(self, total: float, basis: str) -> None:
        """Say once, while less than half of max_cost is spent, that the run heads past it."""
        limit = self._max_cost
        if limit is None or self.warned or total <= limit or self.spent >= limit / 2:
            return
        self.warned = True
        # One line in a notebook: no file and source line of ours under it.
        warnings.warn_explicit(
            f"this run is heading for ~{format_money(total)} ({basis}), over max_cost="
            f"{format_money(limit)}: it will stop there and leave the other rows unsent. "
            "Stop it now and lower max_tokens or send fewer rows, or raise max_cost.",
            RuntimeWarning,
            filename="nbtoolkit",
            lineno=0,
        )


# Re-format the ok/failed/retried counts at most this often: formatting them on every row
# would cost more CPU than the request itself on a fast server.
_POSTFIX_INTERVAL = 0.2
_UPDATE_INTERVAL = 0.02


class ProgressBar:
    """Counts finished rows and shows ok / failed / retried; a no-op when disabled."""

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool = True,
        desc: str = "nbtoolkit",
        cost: LiveCost | None = None,
    ) -> None:
        self.cost = cost
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.retried = 0
        self._enabled = enabled
        self._last_postfix = 0.0
        self._last_update = 0.0
        self._unshown = 0
        self._waiting = ""
        self._note = ""
        self._waiting_until = 0.0
        self.tokens = 0
        self._started = time.monotonic()
        self._bar = tqdm(
            total=total, desc=desc, unit="row", disable=not enabled, dynamic_ncols=True
        )

    def row_done(self, result: RowResult) -> None:
        self.rows_done((result,))

    def rows_done(self, results: Sequence[RowResult]) -> None:
        cost = self.cost
        if cost is not None:
            warned = cost.warned
            for result in results:
                cost.add(result)
            if cost.warned and not warned and self._enabled:
                self._bar.postfix = self._counts()  # the warning shows at once
        for result in results:
            if result.error is None:
                self.ok += 1
                self.tokens += (result.prompt_tokens or 0) + (result.completion_tokens or 0)
            elif result.error.kind == "skipped":
                self.skipped += 1
            else:
                self.failed += 1
        if not self._enabled:
            return
        # Hand rows to tqdm in small batches: its per-call bookkeeping would otherwise be the
        # biggest cost of a run answered from the cache. Still many updates a second.
        self._unshown += len(results)
        now = time.monotonic()
        if now - self._last_postfix >= _POSTFIX_INTERVAL:
            self._last_postfix = now
            self._bar.postfix = self._counts()
        if now - self._last_update >= _UPDATE_INTERVAL:
            self._last_update = now
            self._bar.update(self._unshown)
            self._unshown = 0

    def show(self, *, ok: int, failed: int, note: str) -> None:
        """Counts kept elsewhere (a batch job's, as its server reports them), shown as they are."""
        self.ok, self.failed, self._note = ok, failed, note
        if self._enabled:
            self._bar.n = ok + failed
            self._bar.postfix = self._counts()
            self._bar.refresh()

    def row_retried(self) -> None:
        self.retried += 1

    def row_waiting(self, seconds: float, reason: str) -> None:
        """Show that the run is held by a limit, so a still bar does not look like a hang."""
        if self._enabled:
            self._waiting = f"waiting {seconds:.1f}s: {reason}"
            self._waiting_until = time.monotonic() + seconds
            self._bar.postfix = self._counts()
            self._bar.refresh()

    def close(self) -> None:
        if self._enabled:
            self._bar.update(self._unshown)
            self._unshown = 0
            self._bar.postfix = self._counts()
            self._bar.refresh()
        self._bar.close()

    def _counts(self) -> str:
        text = f"ok={self.ok}, failed={self.failed}, retried={self.retried}"
        if self._note:
            text = f"{self._note}, {text}"
        if self.skipped:
            text += f", skipped={self.skipped}"
        if self.cost is not None:
            text += f", {self.cost.text()}"
        if self.tokens:
            elapsed = max(1e-9, time.monotonic() - self._started)
            text += f", {self.tokens / elapsed:,.0f} tok/s"
        if self._waiting and time.monotonic() < self._waiting_until:
            text += f", {self._waiting}"
        return text

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
