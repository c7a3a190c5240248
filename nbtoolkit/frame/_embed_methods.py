"""``embed`` (and ``aembed``): one float32 vector per row, many texts per request.

A mixin of the accessors (`nbtoolkit.frame._accessor`): the rows' texts go to the provider's
embeddings endpoint (`nbtoolkit.core.endpoints._embeddings`), and the vectors come back as a
column (`nbtoolkit.frame._vectors`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from nbtoolkit.config import ChatConfig, Provider, RetryPolicy, Timeouts
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame._estimate import check_pilot
from nbtoolkit.frame._options import RunOptions, body_fields
from nbtoolkit.frame._run import Plan, blocking, estimate_plan
from nbtoolkit.frame._source import RowSource


class EmbedMethods(RowSource):
    """``embed``: the rows' texts as vectors."""

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
            provider: ``"openai"`` (or any OpenAI-compatible server) or ``"gemini"``, as in
                `complete`; Anthropic has no embeddings API (a `ConfigError`).
            max_parallel, progress, base_url, api_key, headers, query: as for `complete`.
            timeout, retry, rpm, tpm, cache, dedupe, prices: as for `complete`.
            max_cost, max_tokens_total, config, dry_run, pilot: as for `complete`; a
                request's tokens count against ``tpm`` and the budgets.
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
        settings = RunOptions.of(locals()).settings({}, method="embed")
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
        return await self._run(plan)

    embed = blocking(aembed)
