"""What every accessor method reads: the caller's rows, as a frame, and their prompts.

`RowSource` is the base of the method mixins (`nbtoolkit.frame._chat_methods` and the
others); ``df.chat`` and ``series.chat`` (`nbtoolkit.frame._accessor`) fill in where the
rows come from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.core._engine import RunHooks
from nbtoolkit.core._rows import RowResult
from nbtoolkit.frame._prompts import row_prompts
from nbtoolkit.frame._report import RunReport, remember
from nbtoolkit.frame._run import Plan, run_plan
from nbtoolkit.frame._writers import text_writer


class RowSource:
    """The rows a method runs over; keeps no state between calls.

    Two seams for a caller that runs the methods itself (a Dask partition), set by the
    accessors' constructors: ``hooks`` for the engine (`RunHooks`), and ``report_to``, where
    each run's report goes instead of `last_run()`.
    """

    _hooks: RunHooks | None = None
    _report_to: Callable[[RunReport], object] = staticmethod(remember)

    def _seams(
        self, hooks: RunHooks | None, report_to: Callable[[RunReport], object] | None
    ) -> None:
        self._hooks = hooks
        if report_to is not None:
            self._report_to = report_to

    async def _run(self, plan: Plan) -> Any:
        """`run_plan` with this accessor's seams."""
        return await run_plan(plan, hooks=self._hooks, report_to=self._report_to)

    def _frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def _as_series(self) -> bool:
        raise NotImplementedError

    def _owner(self) -> object:
        """The caller's DataFrame or Series itself (a dry run's estimate is kept for it)."""
        raise NotImplementedError

    def _default_column(self) -> str | None:
        raise NotImplementedError

    def _prompts(self, column: str | None, template: str | None) -> pd.Series:
        """One prompt (or None: nothing to send) per row, from a column or a template."""
        column = column if column is not None else self._default_column()
        return row_prompts(self._frame(), column, template, as_series=self._as_series())

    def _text_column(self, output: str | None) -> Callable[[Sequence[RowResult]], Any]:
        """Writes each row's answer text into the column ``output`` of a copy of the frame."""
        return text_writer(self._frame(), output, as_series=self._as_series())
