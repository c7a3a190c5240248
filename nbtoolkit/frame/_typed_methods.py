"""``extract`` and ``classify`` (and their ``a...`` twins): typed answers from a schema.

A mixin of the accessors (`nbtoolkit.frame._accessor`): the schema and labels are checked
(`nbtoolkit.frame._extraction`), the endpoint sends them and checks every answer
(`nbtoolkit.core.endpoints._structured`), and the fields come back as typed columns.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig, Provider, RetryPolicy, Timeouts
from nbtoolkit.core.endpoints._structured import Structured
from nbtoolkit.frame._estimate import check_pilot
from nbtoolkit.frame._extraction import (
    DEFAULT_LABEL_COLUMN,
    classification_schema,
    classification_system,
    extraction_schema,
    fields_writer,
    label_values,
    structured_endpoint,
)
from nbtoolkit.frame._options import RunOptions
from nbtoolkit.frame._prompts import chat_requests
from nbtoolkit.frame._run import Plan, blocking, estimate_plan
from nbtoolkit.frame._source import RowSource


class TypedMethods(RowSource):
    """``extract`` and ``classify``: a schema's fields, or labels, per row."""

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
            provider: ``"openai"``, ``"anthropic"`` or ``"gemini"``, as in `complete`; each
                takes the schema its own way (a forced tool call, ``responseSchema``).
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
        settings = RunOptions.of(locals()).settings(params, method="extract")
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
        result: pd.DataFrame = await self._run(plan)
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
            provider, model, max_parallel, ..., dry_run, pilot: the run options of
                `complete`.
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
        settings = RunOptions.of(locals()).settings(params, method="classify")
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
        result: pd.DataFrame = await self._run(plan)
        return result

    classify = blocking(aclassify)
