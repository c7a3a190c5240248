"""``complete`` and ``submit_batch`` (and ``acomplete``, ``asubmit_batch``): text answers.

A mixin of the accessors (`nbtoolkit.frame._accessor`): each method turns its options into a
config (`nbtoolkit.frame._options`), its rows into chat requests, and runs them live
(`nbtoolkit.frame._run`) or as a Batch API job (`nbtoolkit.frame._batch`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from nbtoolkit.config import ChatConfig, Provider, RetryPolicy, Timeouts
from nbtoolkit.frame._batch import BatchJob, BatchOptions, batch_mode, run_batch, submit
from nbtoolkit.frame._estimate import CostEstimate, check_pilot
from nbtoolkit.frame._options import RunOptions
from nbtoolkit.frame._prompts import chat_requests
from nbtoolkit.frame._run import Plan, blocking, estimate_plan
from nbtoolkit.frame._source import RowSource


class ChatMethods(RowSource):
    """``complete`` and ``submit_batch``: one chat request per row, its text as the answer."""

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
        provider: Provider | None = None,
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
            provider: ``"openai"`` (any OpenAI-compatible server), ``"anthropic"`` or
                ``"gemini"``, for this call; default the config's. A provider other than the
                config's takes none of its base URL, key, headers, query or model: they
                come from this call or that provider's environment variables.
            base_url, api_key: default ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY`` (for
                Anthropic and Gemini, their own; see `ChatConfig`).
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
        settings = RunOptions.of(locals()).settings(params, method="complete")
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
        return await self._run(plan)

    complete = blocking(acomplete)

    async def asubmit_batch(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        system: str | None = None,
        model: str | None = None,
        output: str | None = None,
        progress: bool | None = None,
        provider: Provider | None = None,
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
            column, template, system, model, output, config, **params: as for ``complete``.
            provider, base_url, api_key, azure_endpoint, api_version, cache: as for
                ``complete`` (``provider="anthropic"``: a Message Batch).
            headers, query: as for ``complete``; they go on the Batch API's own HTTP calls,
                never into the uploaded file.
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
        settings = RunOptions.of(locals()).settings(params, method="submit_batch")
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
