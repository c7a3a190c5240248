"""The progress bar: a tqdm widget in Jupyter, text in a terminal. The engine only calls it.

`tqdm.auto` picks the widget when it runs in a kernel; ipywidgets is a dependency, so the
"IProgress not found" fallback never shows. The bar advances once per finished row (not per
batch), so it never jumps from 0 to 100%.
"""

from __future__ import annotations

import time
from types import TracebackType

from tqdm.auto import tqdm

from nbtoolkit.core._rows import RowResult

# Re-format the ok/failed/retried counts at most this often: formatting them on every row
# would cost more CPU than the request itself on a fast server.
_POSTFIX_INTERVAL = 0.2
_UPDATE_INTERVAL = 0.02


class ProgressBar:
    """Counts finished rows and shows ok / failed / retried; a no-op when disabled."""

    def __init__(self, total: int | None, *, enabled: bool = True, desc: str = "nbtoolkit") -> None:
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
        self._unshown += 1
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
