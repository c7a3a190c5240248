"""``df.chat`` and ``series.chat``: check the input, build one request per row, write a column.

No I/O here: the rows become `ChatRequest`s lazily (memory stays bounded by the engine's
queue, not by the frame), the engine runs them, and the results come back as a new column
of a new frame, in the caller's row order. The caller's frame is never modified.
"""

from __future__ import annotations

import asyncio
import difflib
import enum
import functools
import inspect
import os
import string
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pandas as pd

from nbtoolkit.config import ChatConfig, RetryPolicy, Timeouts, get_config, merge
from nbtoolkit.core._engine import ChatRun, results_in_order
from nbtoolkit.core._rows import ChatRequest, RowResult
from nbtoolkit.core._runner import run_sync
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.endpoints._structured import Structured
from nbtoolkit.errors import ConfigError, RunAborted, RunInterrupted
from nbtoolkit.frame._batch import BatchJob, BatchOptions, batch_mode, run_batch, submit
from nbtoolkit.frame._extraction import (
    DEFAULT_LABEL_COLUMN,
    classification_schema,
    classification_system,
    extraction_schema,
    fields_writer,
    label_values,
    structured_endpoint,
)
from nbtoolkit.frame._progress import ProgressBar
from nbtoolkit.frame._report import RunReport, last_run, remember, rows_frame
from nbtoolkit.frame.semantic._methods import FrameSemanticMethods, SemanticMethods

DEFAULT_OUTPUT = "response"


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before any request is sent."""

    frame: pd.DataFrame  # the caller's rows (a Series comes as a one-column frame)
    requests: Iterable[Any]  # one request (or None: nothing to send) per row, made lazily
    config: ChatConfig
    # Builds the run's output from one result per row, in the frame's order.
    write: Callable[[Sequence[RowResult]], Any]
    endpoint: Endpoint | None = None  # None: chat completions


def chat_requests(prompts: pd.Series, system: str | None) -> Iterator[ChatRequest | None]:
    """One chat request per prompt (None where there is nothing to send)."""
    system_message = ({"role": "system", "content": system},) if system else ()
    for prompt in prompts:
        if prompt is None:
            yield None
        else:
            yield ChatRequest((*system_message, {"role": "user", "content": prompt}))


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
                raise  # stopped before this run had a report: nothing to hand back
            raise RunInterrupted(_interrupted_message(report), partial=report.output) from exc

    method.__name__ = method.__qualname__ = coroutine_method.__name__.removeprefix("a")
    method.__doc__ = (coroutine_method.__doc__ or "").replace("``await``-able; ", "")
    return method


async def run_plan(plan: Plan) -> Any:
    """Run a plan's requests through the engine and return its output; keep its report.

    Raises:
        RunAborted: a systemic failure; ``.partial`` is the output with the rows that
            finished.
        RunInterrupted: Ctrl-C (a KeyboardInterrupt inside the run).
        asyncio.CancelledError: the awaiting task was cancelled; a note says where the
            finished rows are.
    """
    bar = ProgressBar(len(plan.frame), enabled=plan.config.progress)
    try:
        run = ChatRun(plan.config, endpoint=plan.endpoint, listener=bar)
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
        report = _report(plan, run, run.results, "interrupted")
        raise RunInterrupted(_interrupted_message(report), partial=report.output) from exc
    except asyncio.CancelledError as exc:
        report = _report(plan, run, run.results, "interrupted")
        # Cancellation must stay a CancelledError; a note still tells where the rows are.
        exc.add_note(_interrupted_message(report))
        raise
    if aborted is not None:  # raised outside the except block: one line in a notebook
        report = _report(plan, run, run.results, "aborted")
        raise RunAborted(str(aborted), partial=report.output, cause=aborted.cause) from (
            aborted.cause
        )
    return _report(plan, run, results, "finished").output


class _ChatAccessorBase(SemanticMethods):
    """Shared by the DataFrame and Series accessors; keeps no state between calls."""

    def _frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def _as_series(self) -> bool:
        raise NotImplementedError

    def _default_column(self) -> str | None:
        raise NotImplementedError

    def _prompts(self, column: str | None, template: str | None) -> pd.Series:
        """One prompt (or None: nothing to send) per row, from a column or a template."""
        frame = self._frame()
        column = column if column is not None else self._default_column()
        if template is None and column is None:
            raise ConfigError("say what to send: a column name, or template='... {column} ...'")
        if template is not None and column is not None and not self._as_series():
            raise ConfigError("pass either a column or a template, not both")
        return _template_prompts(frame, template) if template else _column_prompts(frame, column)

    def _text_column(self, output: str | None) -> Callable[[Sequence[RowResult]], Any]:
        """Writes each row's answer text into the column ``output`` of a copy of the frame."""
        frame = self._frame()
        name = output or DEFAULT_OUTPUT
        as_series = self._as_series()

        def write(rows: Sequence[RowResult]) -> Any:
            answers = pd.Series([r.text for r in rows], index=frame.index, dtype=object)
            if as_series:
                answers.name = name if name != DEFAULT_OUTPUT else None
                return answers
            return frame.assign(**{name: answers})

        return write

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
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
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
        batch: bool | BatchOptions = False,
        **params: Any,
    ) -> Any:
        """Send one chat request per row and return a new frame with the answers as a column.

        ``complete`` runs it and waits (in a script or a notebook cell); ``acomplete`` is
        ``await``-able; cancelling the awaiting task cancels every request.

        Args:
            column: the column whose text is the user message.
            template: instead of a column, a ``str.format`` template over the columns,
                e.g. ``"Classify: {review}"`` or ``"Price {price:.2f}"``.
            system: a system message sent with every row.
            model: the model name (required here or in the config).
            output: the new column's name; default ``"response"`` (replaced if present).
            max_parallel: the most requests in flight at once; default 16.
            progress: show the progress bar; default True.
            base_url, api_key: default ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY``.
            headers, query: extra HTTP headers / URL query parameters for every request.
            azure_endpoint, api_version: Azure OpenAI (default ``$AZURE_OPENAI_ENDPOINT``,
                ``$OPENAI_API_VERSION``); ``model`` is then the deployment name.
            timeout: total seconds per request, or a `Timeouts`.
            retry: attempts per row, or a `RetryPolicy`.
            rpm, tpm: client-side budgets in requests / tokens per minute. Without them
                the run still follows the server's rate-limit headers and 429s.
            cache: True (default: the per-user cache file), a path, or False. Answers are
                saved as they arrive; a re-run sends only rows with no saved answer.
            dedupe: send identical requests once and share the answer (default True).
            prices: ``{model: (input, output)}`` per million tokens, for cost figures.
            max_cost, max_tokens_total: stop sending once this would be exceeded; rows not
                sent are None with status ``over_budget``.
            config: a `ChatConfig` to start from instead of the process-wide one.
            batch: True (or a `BatchOptions`) sends the rows as a Batch API job at the
                batch price and waits for it: ``submit_batch`` + ``wait`` + ``result``.
            **params: extra request-body fields: temperature, max_tokens, seed, ...

        Returns:
            A new DataFrame (a Series for ``series.chat``), same index and order, with the
            answer text per row and None where a row got none. ``nbtoolkit.last_run()``
            says why each None is None.

        Raises:
            ConfigError: bad arguments (before anything is sent).
            RunAborted: a bad key, wrong URL/model, exhausted quota or a server that went
                away stopped the run; ``.partial`` holds the rows that finished.
            RunInterrupted: Ctrl-C or the stop button; ``.partial`` holds the rows that
                finished.
        """
        settings = run_settings(
            model=model,
            max_parallel=max_parallel,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            headers=headers,
            query=query,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            timeout=timeout,
            retry=retry,
            rpm=rpm,
            tpm=tpm,
            cache=cache,
            dedupe=dedupe,
            prices=prices,
            max_cost=max_cost,
            max_tokens_total=max_tokens_total,
            config=config,
            params=params,
        )
        prompts = self._prompts(column, template)
        plan = Plan(
            frame=self._frame(),
            requests=chat_requests(prompts, system),
            config=settings,
            write=self._text_column(output),
        )
        if (options := batch_mode(batch)) is not None:
            return await run_batch(plan.frame, plan.requests, settings, plan.write, options=options)
        return await run_plan(plan)

    complete = blocking(acomplete)

    async def aembed(
        self,
        column: str | None = None,
        *,
        model: str | None = None,
        dimensions: int | None = None,
        output: str = "embedding",
        template: str | None = None,
        batch_size: int = 2048,
        max_batch_tokens: float = 300_000,
        max_parallel: int | None = None,
        progress: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
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
    ) -> Any:
        """Embed each row's text and return a new frame with one float32 vector per row.

        ``embed`` runs it and waits; ``aembed`` is ``await``-able. Texts go to
        ``/embeddings`` many at a time; identical texts are embedded once, and the cache
        keeps one vector per (model, dimensions, text), so a re-run or a grown frame pays
        only for texts it has never embedded. ``nbtoolkit.to_matrix(out["embedding"])``
        makes an ``(n, d)`` matrix of the column.

        Args:
            column: the column whose text is embedded.
            model: the embedding model, e.g. ``"text-embedding-3-small"``.
            dimensions: shorter vectors, for models that offer them; None: the model's own.
            output: the new column's name; default ``"embedding"`` (replaced if present).
            template: instead of a column, a ``str.format`` template over the columns.
            batch_size: texts per request, at most (OpenAI allows 2,048).
            max_batch_tokens: estimated tokens per request, at most (OpenAI allows 300,000).
            max_parallel, progress, base_url, api_key, headers, query, timeout, retry, rpm,
                tpm, cache, dedupe, prices, max_cost, max_tokens_total, config: as for
                `complete`; a request's tokens count against ``tpm`` and the budgets.

        Returns:
            A new DataFrame (a Series for ``series.chat``), same index and order, with a 1-D
            float32 numpy array per row, and None where there was no text (missing, empty,
            blank) or the row failed; ``nbtoolkit.last_run()`` says why.

        Raises:
            ConfigError: bad arguments (before anything is sent).
            RunAborted: a bad key, wrong URL/model, exhausted quota or a server that went
                away stopped the run; ``.partial`` holds the rows that finished.
            RunInterrupted: Ctrl-C or the stop button; ``.partial`` holds the rows that
                finished.
        """
        from nbtoolkit.core.endpoints._embeddings import EmbeddingEndpoint
        from nbtoolkit.frame._vectors import embedding_writer

        settings = run_settings(
            model=model,
            max_parallel=max_parallel,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            headers=headers,
            query=query,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            timeout=timeout,
            retry=retry,
            rpm=rpm,
            tpm=tpm,
            cache=cache,
            dedupe=dedupe,
            prices=prices,
            max_cost=max_cost,
            max_tokens_total=max_tokens_total,
            config=config,
            params={},
        )
        if not isinstance(output, str) or not output:
            raise ConfigError(f"output must be a column name, got {output!r}")
        endpoint = EmbeddingEndpoint(
            model=settings.model or "",
            dimensions=dimensions,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
        )
        texts = self._prompts(column, template)
        name = output if self._as_series() and output != "embedding" else None
        plan = Plan(
            frame=self._frame(),
            requests=iter(texts),
            config=settings,
            write=embedding_writer(self._frame(), output, as_series=self._as_series(), name=name),
            endpoint=endpoint,
        )
        return await run_plan(plan)

    embed = blocking(aembed)

    # The semantic operators (frame/semantic): their sync twins, as for every a... method.
    filter = blocking(SemanticMethods.afilter)
    top_k = blocking(SemanticMethods.atop_k)
    aggregate = blocking(SemanticMethods.aaggregate)

    async def asubmit_batch(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        system: str | None = None,
        model: str | None = None,
        output: str | None = None,
        progress: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
        timeout: float | Timeouts | None = None,
        retry: int | RetryPolicy | None = None,
        cache: bool | str | os.PathLike[str] | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        batch: BatchOptions | None = None,
        config: ChatConfig | None = None,
        **params: Any,
    ) -> BatchJob:
        """Submit the rows as an OpenAI Batch API job (half price, up to 24 h) and return at once.

        The same requests ``complete`` would send, one JSONL line each; rows whose answers
        are cached are not sent, identical rows are sent once. Running the same call again,
        here or in a new kernel, re-attaches to the job instead of submitting it twice.

        Args:
            column, template, system, model, output, base_url, api_key, headers, query,
                azure_endpoint, api_version, cache, config, **params: as for ``complete``;
                headers go on the Batch API's own HTTP calls, never into the uploaded file.
            progress: the default for ``job.wait()``'s bar.
            timeout, retry: for the Batch API's own calls (upload, create, status).
            prices, max_cost, max_tokens_total: the job's worst case (estimated prompts
                plus max_tokens, at the batch discount) is checked before anything is
                uploaded.
            batch: splitting, discount and polling (`BatchOptions`).

        Returns:
            A `BatchJob`: ``.id``, ``.status()``, ``.wait()``, ``.result()``, ``.cancel()``.

        Raises:
            ConfigError: bad arguments, no cache, or a worst case over a budget; nothing is
                uploaded.
        """
        settings = run_settings(
            model=model,
            max_parallel=None,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            headers=headers,
            query=query,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            timeout=timeout,
            retry=retry,
            rpm=None,
            tpm=None,
            cache=cache,
            dedupe=None,
            prices=prices,
            max_cost=max_cost,
            max_tokens_total=max_tokens_total,
            config=config,
            params=params,
        )
        prompts = self._prompts(column, template)
        return await submit(
            self._frame(),
            chat_requests(prompts, system),
            settings,
            self._text_column(output),
            options=batch,
        )

    submit_batch = blocking(asubmit_batch)

    async def aextract(
        self,
        column: str | None = None,
        *,
        schema: Any,
        template: str | None = None,
        system: str | None = None,
        prefix: str | None = None,
        validation_retries: int = 2,
        structured: Structured = "auto",
        model: str | None = None,
        max_parallel: int | None = None,
        progress: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
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
    ) -> pd.DataFrame:
        """Ask for a schema's fields per row and return them as typed columns.

        ``extract`` runs it and waits; ``aextract`` is ``await``-able. The row's text is the
        user message, as in `complete`; the schema travels in ``response_format``. Every
        answer is checked, and one that does not fit is sent back to the model with the
        validator's message, up to ``validation_retries`` times.

        Args:
            column, template, system: what to send, as in `complete`.
            schema: a pydantic model class, a JSON Schema dict (an object), or a mapping of
                field name to type, e.g. ``{"sentiment": Literal["pos", "neg"], "stars": int}``.
            prefix: put before each field's name to make its column's name.
            validation_retries: how many times an answer that does not fit is re-asked.
            structured: "auto" (json_schema, or what the server turns out to take),
                "json_schema", "json_object" (llama.cpp) or "prompt" (schema in the system
                message, for servers with no JSON mode).
            model, max_parallel, ...: the run options of `complete`.
            **params: extra request-body fields: temperature, max_tokens, seed, ...

        Returns:
            A new DataFrame: the caller's columns plus one column per top-level field
            (string, Int64, Float64, boolean, category of the allowed values, or object for
            nested values); ``series.chat`` returns only the fields, with the Series' index.
            A row without a valid answer has <NA> in every field and its reason in
            ``nbtoolkit.last_run().errors``.

        Raises:
            ConfigError: a bad schema or option, or a field whose column exists already
                (before anything is sent).
            RunAborted, RunInterrupted: as in `complete`.

        Example:
            >>> df.chat.extract("review", schema={"stars": int})  # doctest: +SKIP
        """
        settings = run_settings(
            model=model,
            max_parallel=max_parallel,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            headers=headers,
            query=query,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            timeout=timeout,
            retry=retry,
            rpm=rpm,
            tpm=tpm,
            cache=cache,
            dedupe=dedupe,
            prices=prices,
            max_cost=max_cost,
            max_tokens_total=max_tokens_total,
            config=config,
            params=params,
        )
        checked = extraction_schema(schema)
        write = fields_writer(
            self._frame(), checked.fields, prefix=prefix, as_series=self._as_series()
        )
        endpoint = structured_endpoint(
            settings, checked, structured=structured, validation_retries=validation_retries
        )
        prompts = self._prompts(column, template)
        plan = Plan(self._frame(), chat_requests(prompts, system), settings, write, endpoint)
        result: pd.DataFrame = await run_plan(plan)
        return result

    extract = blocking(aextract)

    async def aclassify(
        self,
        column: str | None = None,
        *,
        labels: Sequence[str] | type[enum.Enum],
        multi_label: bool = False,
        output: str = DEFAULT_LABEL_COLUMN,
        template: str | None = None,
        system: str | None = None,
        validation_retries: int = 2,
        structured: Structured = "auto",
        model: str | None = None,
        max_parallel: int | None = None,
        progress: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
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
    ) -> pd.DataFrame:
        """Label each row with one of ``labels`` (or several) and return them as a column.

        ``classify`` runs it and waits; ``aclassify`` is ``await``-able. The answer is
        constrained to the labels by an enum schema and checked; an answer that is not a
        label is re-asked, then left <NA>: never guessed.

        Args:
            column, template: what to send, as in `complete`.
            labels: the labels, a list of strings or an Enum (its values), in order.
            multi_label: True: each row gets the list of every label that applies.
            output: the new column's name (default ``"label"``).
            system: a system message; default: one asking for the label(s) that fit.
            validation_retries, structured: as in `extract`.
            model, max_parallel, ...: the run options of `complete`.
            **params: extra request-body fields: temperature, max_tokens, seed, ...

        Returns:
            A new DataFrame with a ``category`` column (categories = the labels, in order),
            or with ``multi_label`` a column of lists of labels; ``series.chat`` returns
            that column alone, as a one-column DataFrame with the Series' index.

        Raises:
            ConfigError: fewer than two labels, duplicates, an ``output`` column that exists
                already, a bad option (before anything is sent).
            RunAborted, RunInterrupted: as in `complete`.
        """
        settings = run_settings(
            model=model,
            max_parallel=max_parallel,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            headers=headers,
            query=query,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            timeout=timeout,
            retry=retry,
            rpm=rpm,
            tpm=tpm,
            cache=cache,
            dedupe=dedupe,
            prices=prices,
            max_cost=max_cost,
            max_tokens_total=max_tokens_total,
            config=config,
            params=params,
        )
        checked = classification_schema(labels, multi_label=multi_label, output=output)
        write = fields_writer(
            self._frame(), checked.fields, prefix=None, as_series=self._as_series(), option="output"
        )
        endpoint = structured_endpoint(
            settings, checked, structured=structured, validation_retries=validation_retries
        )
        if system is None:
            system = classification_system(label_values(labels), multi_label=multi_label)
        prompts = self._prompts(column, template)
        plan = Plan(self._frame(), chat_requests(prompts, system), settings, write, endpoint)
        result: pd.DataFrame = await run_plan(plan)
        return result

    classify = blocking(aclassify)


@pd.api.extensions.register_dataframe_accessor("chat")
class ChatAccessor(_ChatAccessorBase, FrameSemanticMethods):
    """``df.chat``: chat completions over the rows of a DataFrame."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._obj = frame

    def _frame(self) -> pd.DataFrame:
        return self._obj

    def _as_series(self) -> bool:
        return False

    def _default_column(self) -> str | None:
        return None

    join = blocking(FrameSemanticMethods.ajoin)


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


def run_settings(
    *,
    model: str | None,
    max_parallel: int | None,
    progress: bool | None,
    base_url: str | None,
    api_key: str | None,
    headers: Mapping[str, str] | None,
    query: Mapping[str, str] | None,
    azure_endpoint: str | None,
    api_version: str | None,
    timeout: float | Timeouts | None,
    retry: int | RetryPolicy | None,
    rpm: float | None,
    tpm: float | None,
    cache: bool | str | os.PathLike[str] | None,
    dedupe: bool | None,
    prices: Mapping[str, tuple[float, float]] | None,
    max_cost: float | None,
    max_tokens_total: int | None,
    config: ChatConfig | None,
    params: Mapping[str, Any],
) -> ChatConfig:
    """One call's run options on top of ``config`` (or the process-wide config).

    Raises:
        ConfigError: a bad value, or a keyword in ``params`` that looks like a misspelt
            option (``max_paralel``) or asks for what nbtoolkit does not do (``stream``).
    """
    check_params(params)
    base = config or get_config()
    changes: dict[str, Any] = {
        "model": model,
        "max_parallel": max_parallel,
        "progress": progress,
        "base_url": base_url,
        "api_key": api_key,
        "headers": headers,
        "query": query,
        "azure_endpoint": azure_endpoint,
        "api_version": api_version,
        "rpm": rpm,
        "tpm": tpm,
        "cache": cache,
        "dedupe": dedupe,
        "prices": prices,
        "max_cost": max_cost,
        "max_tokens_total": max_tokens_total,
    }
    if isinstance(timeout, Timeouts):
        changes["timeouts"] = timeout
    elif timeout is not None:
        changes["timeout_total"] = float(timeout)
    if isinstance(retry, RetryPolicy):
        changes["retry"] = retry
    elif retry is not None:
        changes["retry_attempts"] = int(retry)
    if params:
        changes["params"] = {**base.params, **params}
    return merge(base, **changes)


# Our own option names, for catching a misspelt one before it goes into the request body.
OPTION_NAMES = frozenset(
    {
        *inspect.signature(_ChatAccessorBase.acomplete).parameters,
        "schema",
        "labels",
        "prefix",
        "multi_label",
        "validation_retries",
        "structured",
        "dimensions",
        "batch",
    }
) - {"self", "params"}
# Request-body fields of the OpenAI API and common servers: passed through, never flagged.
_BODY_FIELDS = frozenset(
    {
        "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens",
        "seed", "stop", "n", "presence_penalty", "frequency_penalty", "repeat_penalty",
        "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
        "user", "reasoning_effort", "metadata", "store", "service_tier", "modalities",
        "parallel_tool_calls", "prediction", "verbosity", "grammar", "typical_p",
        "mirostat", "num_ctx", "extra_body",
    }
)  # fmt: skip


def check_params(params: Mapping[str, Any]) -> None:
    """Refuse request-body keywords that are surely mistakes, before anything is sent."""
    for name, value in params.items():
        if name == "stream" and value:
            raise ConfigError(
                "stream=True is not supported: nbtoolkit reads whole answers, one per row"
            )
        if name in _BODY_FIELDS or name in OPTION_NAMES:
            continue
        close = difflib.get_close_matches(name, OPTION_NAMES, n=1, cutoff=0.75)
        if close:
            raise ConfigError(
                f"unknown option {name!r}: did you mean {close[0]!r}? (Other keywords go "
                f"into the request body; pass a real body field named like that with "
                f"config=ChatConfig(params={{{name!r}: ...}}).)"
            )


def _column_prompts(frame: pd.DataFrame, column: str | None) -> pd.Series:
    values = _column(frame, column)
    return pd.Series([_as_prompt(v) for v in values], index=frame.index, dtype=object)


def _template_prompts(frame: pd.DataFrame, template: str) -> pd.Series:
    fields = _template_fields(template)
    pieces = list(string.Formatter().parse(template))
    columns = [_column(frame, name) for name in fields]
    prompts: list[str | None] = []
    for row in zip(*columns, strict=True) if columns else ((),) * len(frame):
        if any(_is_missing(value) for value in row):
            prompts.append(None)  # a hole in the data would make a misleading prompt
        else:
            prompts.append(_format_row(pieces, dict(zip(fields, row, strict=True))))
    return pd.Series(prompts, index=frame.index, dtype=object)


def _format_row(
    pieces: list[tuple[str, str | None, str | None, str | None]], values: Mapping[str, Any]
) -> str:
    """``template.format_map(values)`` on the raw values (so ``{price:.2f}`` works), with an
    error that names the field and the value it could not format."""
    out: list[str] = []
    formatter = string.Formatter()
    for literal, field, spec, conversion in pieces:
        out.append(literal)
        if field is None:
            continue
        value = values[field]
        try:
            if conversion:
                value = formatter.convert_field(value, conversion)
            out.append(format(value, spec or ""))
        except (ValueError, TypeError) as exc:
            shown = f"!{conversion}" if conversion else ""
            shown += f":{spec}" if spec else ""
            raise ConfigError(
                f"template field {{{field}{shown}}} cannot format the value {value!r}: {exc}"
            ) from exc
    return "".join(out)


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
    if type(value) is str:  # the usual cell, never missing: no pd.isna (a 100,000-row cost)
        return value if value.strip() else None
    if _is_missing(value):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _report(
    plan: Plan, run: ChatRun, results: Sequence[RowResult | None], outcome: str
) -> RunReport:
    rows = results_in_order(results)
    rows += results_in_order([None]) * (len(plan.frame) - len(rows))
    return remember(
        RunReport(plan.write(rows), rows_frame(rows, plan.frame.index), run.stats, outcome)
    )


def _interrupted_message(report: RunReport) -> str:
    return (
        f"{report.summary()}. The finished rows are in nbtoolkit.last_run().output "
        "(and in this exception's .partial)."
    )
