"""``df.chat`` and ``series.chat``: the methods, each checking its input and building a plan.

A method turns its options into a config (`nbtoolkit.frame._options`), its rows into
requests (`nbtoolkit.frame._prompts`), picks an endpoint and a writer, and hands the plan to
`nbtoolkit.frame._run.run_plan`. The caller's frame is never modified.

Over 400 lines: these are the public methods, and most of it is their signatures and
docstrings, which are the user's reference.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig, RetryPolicy, Timeouts
from nbtoolkit.core._rows import RowResult
from nbtoolkit.core.endpoints._structured import Structured
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame._batch import BatchJob, BatchOptions, batch_mode, run_batch, submit
from nbtoolkit.frame._estimate import CostEstimate, check_pilot
from nbtoolkit.frame._extraction import (
    DEFAULT_LABEL_COLUMN,
    classification_schema,
    classification_system,
    extraction_schema,
    fields_writer,
    label_values,
    structured_endpoint,
)
from nbtoolkit.frame._options import RunOptions, body_fields
from nbtoolkit.frame._prompts import chat_requests, row_prompts
from nbtoolkit.frame._run import Plan, blocking, estimate_plan, run_plan
from nbtoolkit.frame._writers import text_writer
from nbtoolkit.frame.semantic._methods import (
    FrameSemanticMethods,
    SemanticMethods,
    operator_blocking,
)


class _ChatAccessorBase(SemanticMethods):
    """Shared by the DataFrame and Series accessors; keeps no state between calls."""

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
        prices: Mapping[str, Any] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        batch: bool | BatchOptions = False,
        dry_run: bool = False,
        pilot: int | float | None = None,
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
            dry_run: send nothing and return a `CostEstimate` instead: rows to send (after
                the cache and duplicates), prompt tokens counted locally, completion tokens
                and cost as low / expected / high, wall time. The next run of this frame
                starts from it (the bar's projection, ``last_run().estimate_error``).
            pilot: with ``dry_run``, first send this many rows (or this fraction of them),
                sampled across the frame, to measure answer lengths; their answers go to
                the cache, so the run after it does not pay for them again.
            **params: extra request-body fields: temperature, max_tokens, seed, ...

        Returns:
            A new DataFrame (a Series for ``series.chat``), same index and order, with the
            answer text per row and None where a row got none. ``nbtoolkit.last_run()``
            says why each None is None. With ``dry_run``: a `CostEstimate`.

        Raises:
            ConfigError: bad arguments (before anything is sent).
            RunAborted: a bad key, wrong URL/model, exhausted quota or a server that went
                away stopped the run; ``.partial`` holds the rows that finished.
            RunInterrupted: Ctrl-C or the stop button; ``.partial`` holds the rows that
                finished.
        """
        settings = RunOptions(
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
        ).settings(params, method="complete")
        check_pilot(pilot, dry_run)
        prompts = self._prompts(column, template)
        plan = Plan(
            frame=self._frame(),
            requests=chat_requests(prompts, system),
            config=settings,
            write=self._text_column(output),
            owner=self._owner(),
        )
        options = batch_mode(batch)
        if dry_run:
            return await estimate_plan(plan, pilot=pilot, batch=options is not None)
        if options is not None:
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
        prices: Mapping[str, Any] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        pilot: int | float | None = None,
        **params: Any,
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
                tpm, cache, dedupe, prices, max_cost, max_tokens_total, config, dry_run,
                pilot: as for `complete`; a request's tokens count against ``tpm`` and the
                budgets.
            **params: extra request-body fields (``user``, a server's ``input_type``);
                they are part of each text's cache key.

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
        from nbtoolkit.core.endpoints._providers import embedding_endpoint
        from nbtoolkit.frame._vectors import embedding_writer

        check_pilot(pilot, dry_run)
        settings = RunOptions(
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
        ).settings({}, method="embed")
        body = body_fields(params, method="embed")
        if not isinstance(output, str) or not output:
            raise ConfigError(f"output must be a column name, got {output!r}")
        endpoint = embedding_endpoint(
            settings.resolved(),
            dimensions=dimensions,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            params=body,
        )
        texts = self._prompts(column, template)
        name = output if self._as_series() and output != "embedding" else None
        plan = Plan(
            frame=self._frame(),
            requests=iter(texts),
            config=settings,
            write=embedding_writer(self._frame(), output, as_series=self._as_series(), name=name),
            endpoint=endpoint,
            owner=self._owner(),
        )
        if dry_run:
            return await estimate_plan(plan, pilot=pilot)
        return await run_plan(plan)

    embed = blocking(aembed)

    # The semantic operators (frame/semantic): their sync twins, as for every a... method.
    filter = operator_blocking(SemanticMethods.afilter)
    top_k = operator_blocking(SemanticMethods.atop_k)
    aggregate = operator_blocking(SemanticMethods.aaggregate)

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
        prices: Mapping[str, Any] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        batch: BatchOptions | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        pilot: int | float | None = None,
        **params: Any,
    ) -> BatchJob | CostEstimate:
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
            dry_run, pilot: as for `complete`, priced at the Batch discount; a pilot's rows
                are sent at once (not as a batch), at the list price.

        Returns:
            A `BatchJob`: ``.id``, ``.status()``, ``.wait()``, ``.result()``, ``.cancel()``;
            with ``dry_run``, a `CostEstimate`.

        Raises:
            ConfigError: bad arguments, no cache, or a worst case over a budget; nothing is
                uploaded.
        """
        settings = RunOptions(
            model=model,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            headers=headers,
            query=query,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            timeout=timeout,
            retry=retry,
            cache=cache,
            prices=prices,
            max_cost=max_cost,
            max_tokens_total=max_tokens_total,
            config=config,
        ).settings(params, method="submit_batch")
        check_pilot(pilot, dry_run)
        prompts = self._prompts(column, template)
        if dry_run:
            plan = Plan(
                self._frame(),
                chat_requests(prompts, system),
                settings,
                self._text_column(output),
                owner=self._owner(),
            )
            return await estimate_plan(plan, pilot=pilot, batch=True)
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
        prices: Mapping[str, Any] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        pilot: int | float | None = None,
        **params: Any,
    ) -> Any:
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
            model, max_parallel, ..., dry_run, pilot: the run options of `complete`.
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
        settings = RunOptions(
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
        ).settings(params, method="extract")
        check_pilot(pilot, dry_run)
        checked = extraction_schema(schema)
        write = fields_writer(
            self._frame(), checked.fields, prefix=prefix, as_series=self._as_series()
        )
        endpoint = structured_endpoint(
            settings, checked, structured=structured, validation_retries=validation_retries
        )
        prompts = self._prompts(column, template)
        plan = Plan(
            self._frame(), chat_requests(prompts, system), settings, write, endpoint, self._owner()
        )
        if dry_run:
            return await estimate_plan(plan, pilot=pilot)
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
        prices: Mapping[str, Any] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        pilot: int | float | None = None,
        **params: Any,
    ) -> Any:
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
            model, max_parallel, ..., dry_run, pilot: the run options of `complete`.
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
        settings = RunOptions(
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
        ).settings(params, method="classify")
        check_pilot(pilot, dry_run)
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
        plan = Plan(
            self._frame(), chat_requests(prompts, system), settings, write, endpoint, self._owner()
        )
        if dry_run:
            return await estimate_plan(plan, pilot=pilot)
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

    def _owner(self) -> object:
        return self._obj

    def _as_series(self) -> bool:
        return False

    def _default_column(self) -> str | None:
        return None

    join = operator_blocking(FrameSemanticMethods.ajoin)


@pd.api.extensions.register_series_accessor("chat")
class SeriesChatAccessor(_ChatAccessorBase):
    """``series.chat``: chat completions over a Series; a Series of answers comes back.

    In a template, the value is ``{value}`` (or ``{<series name>}``).
    """

    def __init__(self, series: pd.Series) -> None:
        self._obj = series

    def _owner(self) -> object:
        return self._obj

    def _frame(self) -> pd.DataFrame:
        frame = self._obj.to_frame(name="value")
        if isinstance(self._obj.name, str) and self._obj.name != "value":
            frame[self._obj.name] = frame["value"]
        return frame

    def _as_series(self) -> bool:
        return True

    def _default_column(self) -> str | None:
        return "value"
