"""Stages: one engine run over some rows, and the report that adds several runs up."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._engine import RunHooks
from nbtoolkit.core._rows import ChatRequest, RowError, RowResult, RunStats
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.errors import RunAborted, RunInterrupted
from nbtoolkit.frame._report import RunReport, remember, rows_frame
from nbtoolkit.frame._run import Plan, run_plan


@dataclasses.dataclass
class Stages:
    """The runs an operator made, in order, so its report can add them up.

    ``hooks`` and ``report_to`` are the accessor's seams (`frame._source.RowSource`): on a
    Dask partition every step runs under the cluster's governor, and no report reaches the
    client's `last_run()`.
    """

    hooks: RunHooks | None = None
    report_to: Callable[[RunReport], object] = remember
    reports: list[tuple[str, RunReport]] = dataclasses.field(default_factory=list)

    async def run(
        self,
        name: str,
        requests: Sequence[Any],
        settings: ChatConfig,
        *,
        endpoint: Endpoint | None = None,
    ) -> list[RowResult]:
        """Runs ``requests`` through the engine; one result per request, in order.

        Raises:
            RunAborted, RunInterrupted: as a run does, naming the step; the answers it got
                are in the cache (an operator's partial output is not one frame).
        """
        plan = Plan(
            frame=pd.DataFrame(index=pd.RangeIndex(len(requests))),
            requests=iter(requests),
            config=settings,
            write=list,
            endpoint=endpoint,
        )
        kept: list[RunReport] = []

        def keep(report: RunReport) -> object:
            kept.append(report)
            return self.report_to(report)

        try:
            rows: list[RowResult] = await run_plan(plan, hooks=self.hooks, report_to=keep)
        except RunAborted as exc:
            raise RunAborted(f"{name}: {exc}", cause=exc.cause) from exc
        except RunInterrupted as exc:
            message = (
                f"stopped during {name!r}: the answers it received are saved in the cache, so "
                "running the cell again sends only the rest. "
                "nbtoolkit.last_run() is that step's report."
            )
            raise RunInterrupted(message) from exc
        finally:
            self.reports.extend((name, report) for report in kept)
        return rows

    def remember(
        self, output: Any, index: pd.Index, rows: Sequence[RowResult], notes: Iterable[str]
    ) -> RunReport:
        """Makes the operator's report ``last_run()``: one row per input row, all stages' counts."""
        report = RunReport(output, rows_frame(rows, index), self.stats(), "finished")
        report = dataclasses.replace(report, notes=(*self.lines(), *notes))
        self.report_to(report)
        return report

    def stats(self) -> RunStats:
        """Every stage's counts added up; the wall time from the first start to the last end."""
        total = RunStats()
        statuses: Counter[str] = Counter()
        costs = [r.stats.cost for _, r in self.reports if r.stats.cost is not None]
        for _, report in self.reports:
            stats = report.stats
            for name in (
                "requests_sent",
                "retries",
                "cache_hits",
                "duplicates",
                "reasks",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
            ):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            statuses.update(stats.statuses)
            total.limits = stats.limits or total.limits
        total.statuses = statuses
        total.cost = sum(costs) if costs else None
        if self.reports:
            total.started = min(r.stats.started for _, r in self.reports)
            total.finished = max(r.stats.finished for _, r in self.reports)
        return total

    def lines(self) -> list[str]:
        """One line per stage: its name, requests and cache hits."""
        return [
            f"{name}: {len(r.rows)} rows, {r.stats.requests_sent} requests, "
            f"{r.stats.cache_hits} cache hits"
            for name, r in self.reports
        ]


def failed(kind: str, message: str) -> RowResult:
    """A row result that says why an operator has no answer for the row."""
    return RowResult(None, RowError(kind, message))


def question(prompt: str | None, system: str | None) -> ChatRequest | None:
    """A chat request for one prompt (None: nothing to send)."""
    if prompt is None:
        return None
    system_message: tuple[Mapping[str, Any], ...] = (
        ({"role": "system", "content": system},) if system else ()
    )
    return ChatRequest((*system_message, {"role": "user", "content": prompt}))
