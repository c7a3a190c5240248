"""A checked plan run through the engine, with its report kept; the sync twin of a method.

No I/O before `run_plan`: the rows become requests lazily (memory stays bounded by the
engine's queue, not by the frame), the engine runs them, and the plan's writer builds the
output, a new frame in the caller's row order. The caller's frame is never modified.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._engine import ChatRun, RunHooks, results_in_order
from nbtoolkit.core._rows import RowResult
from nbtoolkit.core._runner import run_sync
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.endpoints._providers import provider_notes
from nbtoolkit.errors import RunAborted, RunInterrupted
from nbtoolkit.frame._estimate import CostEstimate, dry_run, estimate_for
from nbtoolkit.frame._progress import LiveCost, ProgressBar
from nbtoolkit.frame._report import RunReport, last_run, remember, rows_frame


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before any request is sent."""

    frame: pd.DataFrame  # the caller's rows (a Series comes as a one-column frame)
    requests: Iterable[Any]  # one request (or None: nothing to send) per row, made lazily
    config: ChatConfig
    # Builds the run's output from one result per row, in the frame's order.
    write: Callable[[Sequence[RowResult]], Any]
    endpoint: Endpoint | None = None  # None: chat completions
    # The caller's DataFrame or Series: a dry run's estimate is kept for its next run.
    owner: object | None = None


P = ParamSpec("P")
R = TypeVar("R")


def blocking(coroutine_method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]:
    """The sync twin of an ``a...`` method: same parameters, runs it to the end and returns.

    Works in scripts and in notebook cells (whose kernel already runs an event loop).
    Ctrl-C or the stop button raises `RunInterrupted`, carrying the rows that finished.
    """

    @functools.wraps(coroutine_method)
    def method(*args: P.args, **kwargs: P.kwargs) -> R:
        before = last_run()
        try:
            return run_sync(coroutine_method(*args, **kwargs))
        except RunInterrupted:
            raise
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            report = last_run()
            if report is None or report is before or report.outcome != "interrupted":
                note = _stop_note(exc)
                if note is None:
                    raise  # stopped before this run had a report: nothing to hand back
                raise RunInterrupted(note) from exc
            raise RunInterrupted(_interrupted_message(report), partial=report.output) from exc

    # The docstring stays the twin's (functools.wraps): it names both forms.
    method.__name__ = method.__qualname__ = coroutine_method.__name__.removeprefix("a")
    return method


def _stop_note(exc: BaseException) -> str | None:
    """What a stopped step with no report of its own (a dry run's pilot) noted on the
    cancellation: on ``exc`` or, once the runner turned it into a KeyboardInterrupt, on the
    CancelledError it replaced."""
    for error in (exc, exc.__context__):
        notes = getattr(error, "__notes__", None)
        if notes:
            return str(notes[-1])
    return None


async def run_plan(
    plan: Plan,
    *,
    hooks: RunHooks | None = None,
    report_to: Callable[[RunReport], object] = remember,
) -> Any:
    """Run a plan's requests through the engine and return its output; keep its report.

    Args:
        plan: the checked requests, options and output writer.
        hooks: the engine's seams (a Dask partition's governor and row counter).
        report_to: where the run's report goes; default `last_run()`'s.

    Raises:
        RunAborted: a systemic failure; ``.partial`` is the output with the rows that
            finished.
        RunInterrupted: Ctrl-C (a KeyboardInterrupt inside the run).
        asyncio.CancelledError: the awaiting task was cancelled; a note says where the
            finished rows are.
    """
    bar = ProgressBar(len(plan.frame), enabled=plan.config.progress)
    try:
        run = ChatRun(plan.config, endpoint=plan.endpoint, listener=bar, hooks=hooks)
        estimate = None
        if plan.owner is not None:
            estimate = estimate_for(plan.owner, run.config, plan.endpoint)
        bar.cost = live_cost(run, len(plan.frame), estimate)
    except BaseException:
        bar.close()
        raise
    aborted: RunAborted | None = None
    try:
        with bar:
            results = await run.execute(plan.requests)
    except RunAborted as exc:
        aborted = exc
    except KeyboardInterrupt as exc:
        report = _report(plan, run, run.results, "interrupted", estimate, report_to)
        raise RunInterrupted(_interrupted_message(report), partial=report.output) from exc
    except asyncio.CancelledError as exc:
        report = _report(plan, run, run.results, "interrupted", estimate, report_to)
        # Cancellation must stay a CancelledError; a note still tells where the rows are.
        exc.add_note(_interrupted_message(report))
        raise
    if aborted is not None:  # raised outside the except block: one line in a notebook
        report = _report(plan, run, run.results, "aborted", estimate, report_to)
        raise RunAborted(str(aborted), partial=report.output, cause=aborted.cause) from (
            aborted.cause
        )
    return _report(plan, run, results, "finished", estimate, report_to).output


async def estimate_plan(
    plan: Plan, *, pilot: int | float | None, batch: bool = False
) -> CostEstimate:
    """What running the plan would cost, sending nothing but a pilot's rows (if asked).

    Raises:
        ConfigError: no model, or a bad pilot size.
        RunAborted: the pilot met a bad key, wrong URL or model, or no quota.
    """
    owner = plan.owner if plan.owner is not None else plan.frame
    return await dry_run(
        owner, plan.config, plan.requests, endpoint=plan.endpoint, pilot=pilot, batch=batch
    )


def live_cost(run: ChatRun, rows: int, estimate: CostEstimate | None) -> LiveCost:
    """The bar's cost figures for one run, starting from its dry run's estimate if any."""
    to_pay = expected = None
    if estimate is not None:
        answered = 0 if estimate.pilot is None else estimate.pilot.rows - estimate.pilot.failed
        to_pay = estimate.to_send - answered
        if estimate.cost is not None:
            paid = estimate.pilot.cost or 0.0 if estimate.pilot is not None else 0.0
            expected = estimate.cost.expected - paid
    return LiveCost(
        run.budget.unit_price,
        rows=rows,
        to_pay=to_pay,
        expected=expected,
        max_cost=run.config.max_cost,
    )


def _report(
    plan: Plan,
    run: ChatRun,
    results: Sequence[RowResult | None],
    outcome: str,
    estimate: CostEstimate | None = None,
    report_to: Callable[[RunReport], object] = remember,
) -> RunReport:
    rows = results_in_order(results)
    rows += results_in_order([None]) * (len(plan.frame) - len(rows))
    price = run.budget.unit_price
    report = RunReport(
        plan.write(rows),
        functools.partial(rows_frame, rows, plan.frame.index, price),
        run.stats,
        outcome,
        price=price,
        estimate=estimate,
        notes=tuple(provider_notes(run.config)),
    )
    report_to(report)
    return report


def _interrupted_message(report: RunReport) -> str:
    return (
        f"{report.summary()}. The finished rows are in nbtoolkit.last_run().output "
        "(and in this exception's .partial)."
    )
