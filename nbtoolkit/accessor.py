"""``df.chat`` and ``series.chat``: check the input, build one request per row, write a column.

No I/O here: the rows become `ChatRequest`s lazily (memory stays bounded by the engine's
queue, not by the frame), the engine runs them, and the results come back as a new column
of a new frame, in the caller's row order. The caller's frame is never modified.
"""

from __future__ import annotations

import asyncio
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig, RetryPolicy, Timeouts, get_config, merge
from nbtoolkit.engine import ChatRun
from nbtoolkit.errors import ConfigError, RunAborted, RunInterrupted
from nbtoolkit.progress import ProgressBar
from nbtoolkit.report import RunReport, remember, rows_frame
from nbtoolkit.rows import ChatRequest, RowError, RowResult
from nbtoolkit.runner import run_sync

DEFAULT_OUTPUT = "response"


@dataclass(frozen=True)
class _Plan:
    """Everything a run needs, checked before any request is sent."""

    frame: pd.DataFrame
    prompts: pd.Series  # one str or None per row, same index as frame
    system: str | None
    config: ChatConfig
    output: str
    as_series: bool

    def requests(self) -> Iterator[ChatRequest | None]:
        system = ({"role": "system", "content": self.system},) if self.system else ()
        for prompt in self.prompts:
            if prompt is None:
                yield None
            else:
                yield ChatRequest((*system, {"role": "user", "content": prompt}))


class _ChatAccessorBase:
    """Shared by the DataFrame and Series accessors; keeps no state between calls."""

    def _frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def _as_series(self) -> bool:
        raise NotImplementedError

    def _default_column(self) -> str | None:
        raise NotImplementedError

    def _plan(
        self,
        column: str | None,
        template: str | None,
        system: str | None,
        output: str | None,
        settings: dict[str, Any],
    ) -> _Plan:
        frame = self._frame()
        column = column if column is not None else self._default_column()
        if template is None and column is None:
            raise ConfigError("say what to send: a column name, or template='... {column} ...'")
        if template is not None and column is not None and not self._as_series():
            raise ConfigError("pass either a column or a template, not both")
        prompts = _template_prompts(frame, template) if template else _column_prompts(frame, column)
        config = _settings(settings)
        return _Plan(
            frame=frame,
            prompts=prompts,
            system=system,
            config=config,
            output=output or DEFAULT_OUTPUT,
            as_series=self._as_series(),
        )

    def complete(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        system: str | None = None,
        model: str | None = None,
        output: str | None = None,
        max_parallel: int | None = None,
        progress: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | Timeouts | None = None,
        retry: int | RetryPolicy | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        cache: bool | str | os.PathLike[str] | None = None,
        dedupe: bool | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        **params: Any,
    ) -> Any:
        """Send one chat request per row and return a new frame with the answers as a column.

        Works in scripts and in notebook cells (whose kernel already runs an event loop).

        Args:
            column: the column whose text is the user message.
            template: instead of a column, a ``str.format`` template over the columns,
                e.g. ``"Classify: {review}"``.
            system: a system message sent with every row.
            model: the model name (required here or in the config).
            output: the new column's name; default ``"response"`` (replaced if present).
            max_parallel: the most requests in flight at once; default 16.
            progress: show the progress bar; default True.
            base_url, api_key: default ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY``.
            timeout: total seconds per request, or a `Timeouts`.
            retry: attempts per row, or a `RetryPolicy`.
            rpm, tpm: client-side budgets in requests / tokens per minute. Without them
                the run still follows the server's x-ratelimit-* headers and 429s.
            cache: True (default: the per-user cache file), a path, or False. Answers are
                saved as they arrive; a re-run sends only rows with no saved answer.
            dedupe: send identical requests once and share the answer (default True).
            prices: ``{model: (input, output)}`` per million tokens, for cost figures.
            max_cost, max_tokens_total: stop sending once this would be exceeded; rows not
                sent are None with status ``over_budget``.
            config: a `ChatConfig` to start from instead of the process-wide one.
            **params: extra request-body fields: temperature, max_tokens, seed, ...

        Returns:
            A new DataFrame (a Series for ``series.chat``), same index and order, with the
            answer text per row and None where a row got none. ``nbtoolkit.last_run()``
            says why each None is None.

        Raises:
            ConfigError: bad arguments (before anything is sent).
            RunAborted: a bad key, wrong URL/model or exhausted quota stopped the run;
                ``.partial`` holds the rows that finished.
            RunInterrupted: Ctrl-C or the stop button; ``.partial`` holds the rows that
                finished.
        """
        plan = self._plan(column, template, system, output, _collect(locals(), params))
        run, bar = _start(plan)
        try:
            with bar:
                results = run_sync(run.execute(plan.requests()))
        except RunAborted as exc:
            raise _aborted(plan, run, exc) from exc.cause
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            report = _report(plan, run, run.results, "interrupted")
            raise RunInterrupted(_interrupted_message(report), partial=report.output) from exc
        return _report(plan, run, results, "finished").output

    async def acomplete(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        system: str | None = None,
        model: str | None = None,
        output: str | None = None,
        max_parallel: int | None = None,
        progress: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | Timeouts | None = None,
        retry: int | RetryPolicy | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        cache: bool | str | os.PathLike[str] | None = None,
        dedupe: bool | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        **params: Any,
    ) -> Any:
        """`complete` for ``await`` in a cell or in async code; the same arguments and result.

        Cancelling the awaiting task cancels every request; the rows that finished stay in
        ``nbtoolkit.last_run().output``.
        """
        plan = self._plan(column, template, system, output, _collect(locals(), params))
        run, bar = _start(plan)
        try:
            with bar:
                results = await run.execute(plan.requests())
        except RunAborted as exc:
            raise _aborted(plan, run, exc) from exc.cause
        except KeyboardInterrupt as exc:
            report = _report(plan, run, run.results, "interrupted")
            raise RunInterrupted(_interrupted_message(report), partial=report.output) from exc
        except asyncio.CancelledError as exc:
            report = _report(plan, run, run.results, "interrupted")
            # Cancellation must stay a CancelledError; a note still tells where the rows are.
            exc.add_note(_interrupted_message(report))
            raise
        return _report(plan, run, results, "finished").output


@pd.api.extensions.register_dataframe_accessor("chat")
class ChatAccessor(_ChatAccessorBase):
    """``df.chat``: chat completions over the rows of a DataFrame."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._obj = frame

    def _frame(self) -> pd.DataFrame:
        return self._obj

    def _as_series(self) -> bool:
        return False

    def _default_column(self) -> str | None:
        return None


@pd.api.extensions.register_series_accessor("chat")
class SeriesChatAccessor(_ChatAccessorBase):
    """``series.chat``: chat completions over a Series; a Series of answers comes back.

    In a template, the value is ``{value}`` (or ``{<series name>}``).
    """

    def __init__(self, series: pd.Series) -> None:
        self._obj = series

    def _frame(self) -> pd.DataFrame:
        frame = self._obj.to_frame(name="value")
        if isinstance(self._obj.name, str) and self._obj.name != "value":
            frame[self._obj.name] = frame["value"]
        return frame

    def _as_series(self) -> bool:
        return True

    def _default_column(self) -> str | None:
        return "value"


_SETTING_NAMES = (
    "model",
    "max_parallel",
    "progress",
    "base_url",
    "api_key",
    "timeout",
    "retry",
    "rpm",
    "tpm",
    "cache",
    "dedupe",
    "prices",
    "max_cost",
    "max_tokens_total",
)


def _collect(arguments: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    settings = {name: arguments[name] for name in _SETTING_NAMES}
    settings["config"] = arguments["config"]
    settings["params"] = params
    return settings


def _settings(settings: dict[str, Any]) -> ChatConfig:
    base = settings.pop("config") or get_config()
    timeout = settings.pop("timeout")
    if isinstance(timeout, Timeouts):
        settings["timeouts"] = timeout
    elif timeout is not None:
        settings["timeout_total"] = float(timeout)
    retry = settings.pop("retry")
    if isinstance(retry, RetryPolicy):
        settings["retry"] = retry
    elif retry is not None:
        settings["retry_attempts"] = int(retry)
    params = settings.pop("params")
    if params:
        settings["params"] = {**base.params, **params}
    return merge(base, **settings)


def _column_prompts(frame: pd.DataFrame, column: str | None) -> pd.Series:
    values = _column(frame, column)
    return pd.Series([_as_prompt(v) for v in values], index=frame.index, dtype=object)


def _template_prompts(frame: pd.DataFrame, template: str) -> pd.Series:
    fields = _template_fields(template)
    columns = [_column(frame, name) for name in fields]
    prompts: list[str | None] = []
    for row in zip(*columns, strict=True) if columns else ((),) * len(frame):
        if any(_is_missing(value) for value in row):
            prompts.append(None)  # a hole in the data would make a misleading prompt
        else:
            prompts.append(template.format_map(dict(zip(fields, map(str, row), strict=True))))
    return pd.Series(prompts, index=frame.index, dtype=object)


def _template_fields(template: str) -> list[str]:
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"template is not a valid format string: {exc}") from exc
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise ConfigError("template fields must name columns, like {review}; got '{}'")
        if any(mark in field_name for mark in ".["):
            raise ConfigError(f"template field {{{field_name}}} must be a plain column name")
        if field_name not in fields:
            fields.append(field_name)
    return fields


def _column(frame: pd.DataFrame, name: str | None) -> Sequence[Any]:
    if name not in frame.columns:
        raise ConfigError(f"column {name!r} not found; columns are {list(frame.columns)}")
    values = frame[name]
    if isinstance(values, pd.DataFrame):
        raise ConfigError(f"column {name!r} appears {values.shape[1]} times; rename the duplicates")
    # object dtype: categoricals give their labels, missing values stay recognisable.
    return list(values.astype(object))


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-likes: not a missing scalar
        return False


def _as_prompt(value: Any) -> str | None:
    """The user message for one cell: None (nothing sent) for missing or blank values."""
    if _is_missing(value):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _start(plan: _Plan) -> tuple[ChatRun, ProgressBar]:
    bar = ProgressBar(len(plan.frame), enabled=plan.config.progress)
    try:
        run = ChatRun(plan.config, listener=bar)
    except BaseException:
        bar.close()
        raise
    return run, bar


def _padded(results: Sequence[RowResult | None], total: int) -> list[RowResult]:
    not_run = RowResult(None, RowError("not_run", "the run stopped before this row was sent"))
    padded = [r if r is not None else not_run for r in results]
    return padded + [not_run] * (total - len(padded))


def _report(
    plan: _Plan, run: ChatRun, results: Sequence[RowResult | None], outcome: str
) -> RunReport:
    rows = _padded(results, len(plan.frame))
    answers = pd.Series([r.text for r in rows], index=plan.frame.index, dtype=object)
    if plan.as_series:
        answers.name = plan.output if plan.output != DEFAULT_OUTPUT else None
        output: Any = answers
    else:
        output = plan.frame.assign(**{plan.output: answers})
    return remember(RunReport(output, rows_frame(rows, plan.frame.index), run.stats, outcome))


def _aborted(plan: _Plan, run: ChatRun, exc: RunAborted) -> RunAborted:
    report = _report(plan, run, run.results, "aborted")
    return RunAborted(str(exc), partial=report.output, cause=exc.cause)


def _interrupted_message(report: RunReport) -> str:
    return (
        f"{report.summary()}. The finished rows are in nbtoolkit.last_run().output "
        "(and in this exception's .partial)."
    )
