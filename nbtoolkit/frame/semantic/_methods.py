"""``df.chat.filter`` / ``join`` / ``top_k`` / ``aggregate`` (and their ``a...`` twins).

A mixin of the accessors: each method checks its options, builds the run's settings as the
other methods do, and hands over to `_operators`. Run options (``model``, ``max_parallel``,
``cache``, ``max_cost``, ...) mean what they mean for ``complete``.

Longer than the ~400 lines of the other modules: each method's signature is its option table
(`frame._options.METHOD_OPTIONS`, checked by tests/test_options.py), written out so that Tab,
``help()`` and the API reference show every option; the bodies are a few lines each.
"""

from __future__ import annotations

import asyncio
import functools
import os
import string
from collections.abc import Callable, Coroutine, Hashable, Mapping, Sequence
from typing import Any, Literal, ParamSpec, TypeVar

import pandas as pd

from nbtoolkit.config import ChatConfig, Provider, RetryPolicy, Timeouts
from nbtoolkit.core._runner import run_sync
from nbtoolkit.errors import ConfigError, RunInterrupted
from nbtoolkit.frame._options import RunOptions
from nbtoolkit.frame._source import RowSource
from nbtoolkit.frame.semantic._estimate import OperatorEstimate
from nbtoolkit.frame.semantic._filter import Cascade
from nbtoolkit.frame.semantic._operators import (
    Keep,
    aggregate_rows,
    filter_rows,
    join_frames,
    top_rows,
)
from nbtoolkit.frame.semantic._stages import Stages


def cascade_for(
    cheap_model: str | None, sample: int | float, agreement: float, seed: int
) -> Cascade | None:
    """The cascade a call asked for, or None."""
    if cheap_model is None:
        return None
    return Cascade(cheap_model=cheap_model, sample=sample, agreement=agreement, seed=seed)


class SemanticMethods(RowSource):
    """The operators, for ``df.chat`` and ``series.chat``."""

    def _stages(self) -> Stages:
        """A new operator's steps, run through this accessor's seams (hooks, report_to)."""
        return Stages(hooks=self._hooks, report_to=self._report_to)

    def _source(self) -> pd.DataFrame | pd.Series:
        """The caller's rows: its own Series (its name and dtype kept), or the frame."""
        owner = self._owner()
        if self._as_series() and isinstance(owner, pd.Series):
            return owner
        return self._frame()

    async def afilter(
        self,
        template: str | None = None,
        *,
        column: str | None = None,
        system: str | None = None,
        keep: Keep = "rows",
        cheap_model: str | None = None,
        sample: int | float = 0.05,
        agreement: float = 0.98,
        sample_seed: int = 0,
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
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        **params: Any,
    ) -> pd.DataFrame | pd.Series | OperatorEstimate:
        """The rows for which the model answers yes to ``template``'s question.

        Args:
            template: the question, over the row's columns: ``"Is {review} about shipping?"``.
            column: instead of a template, a column that holds each row's question.
            model: the model that decides (default: the configured one).
            system: a system message (default: one that asks for a yes/no judgement).
            keep: ``"rows"`` (default): the rows answered yes, same index and order;
                ``"mask"``: a nullable boolean Series for every row (NA: no answer).
            cheap_model: answer first with this model, and send to ``model`` only the rows it
                is unsure about (its token log-probabilities), at a threshold learned from
                ``sample`` rows that ``model`` labels so that they agree on ``agreement`` of them.
            sample: labelled rows for the threshold: a count, or a share of the rows.
            agreement: the agreement required on the labelled rows the cheap model decides.
            sample_seed: which rows are sampled.
            model, max_parallel, ..., config: run options, as for ``complete``
                (``provider``, ``cache``, ``max_cost``, ...).
            dry_run: send nothing; return an `OperatorEstimate`: each step's rows, tokens
                and cost (low / expected / high) and their total.
            **params: request-body fields (``temperature``).

        Returns:
            The rows answered yes (or the mask). Rows with no answer are left out;
            ``nbtoolkit.last_run()`` counts them, lists why in ``.errors`` and says how many
            rows each model decided.
        """
        settings = RunOptions.of(locals()).settings(params, method="filter")
        prompts = self._prompts(column, template)
        cascade = cascade_for(cheap_model, sample, agreement, sample_seed)
        return await filter_rows(
            self._source(),
            prompts,
            settings,
            system=system,
            cascade=cascade,
            keep=keep,
            dry_run=dry_run,
            stages=self._stages(),
        )

    async def atop_k(
        self,
        k: int,
        template: str | None = None,
        *,
        column: str | None = None,
        system: str | None = None,
        output: str = "score",
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
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        **params: Any,
    ) -> pd.DataFrame | pd.Series | OperatorEstimate:
        """The ``k`` rows that best fit a criterion, best first.

        Each row gets one request and a 0-100 score (so cost grows linearly with the rows);
        ties keep the frame's order. The summary states the method.

        Args:
            k: how many rows.
            template: the criterion over the row's columns: ``"How urgent is {ticket}?"``.
            column: instead of a template, a column with each row's text.
            output: the score column added to the rows (a frame only).
            model, provider, system, config, **params: as for ``filter``.
        """
        settings = RunOptions.of(locals()).settings(params, method="top_k")
        prompts = self._prompts(column, template)
        return await top_rows(
            self._source(),
            prompts,
            k,
            settings,
            system=system,
            output=output,
            dry_run=dry_run,
            stages=self._stages(),
        )

    async def aaggregate(
        self,
        template: str,
        *,
        column: str | None = None,
        by: Hashable | Sequence[Hashable] | None = None,
        system: str | None = None,
        context_tokens: int = 8192,
        output: str = "aggregate",
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
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        **params: Any,
    ) -> str | pd.Series | OperatorEstimate | None:
        """One answer over many rows: for the whole frame, or per group with ``by=``.

        Args:
            template: the instruction, naming the columns it reads as ``{column}``:
                ``"What do customers complain about in {review}?"``. Each row contributes
                those columns' values.
            column: instead, the column whose text each row contributes (``template`` is
                then the instruction as it is).
            by: a column (or columns) to group by: one answer per group.
            context_tokens: the model's context window; no request is larger.
            output: the name of the Series returned with ``by=``.
            max_tokens (in ``params``): the longest answer of a chunk (default 512).
            model, provider, system, config, **params: as for ``filter``.

        Returns:
            The answer (a str, None if it failed) or, with ``by=``, a Series of answers
            indexed by group.
        """
        settings = RunOptions.of(locals()).settings(params, method="aggregate")
        frame = self._frame()
        if column is not None:
            texts = self._prompts(column, None)
            instruction = template
        else:
            texts = self._prompts(None, _as_row_text(template, frame))
            instruction = _as_instruction(template)
        return await aggregate_rows(
            frame,
            texts,
            instruction,
            by,
            settings,
            system=system,
            context_tokens=context_tokens,
            output=output,
            dry_run=dry_run,
            stages=self._stages(),
        )


class FrameSemanticMethods(SemanticMethods):
    """``join``, which needs two frames."""

    async def ajoin(
        self,
        right: pd.DataFrame,
        template: str,
        *,
        embed_model: str | None = None,
        candidates: int | Literal["all"] = 10,
        max_pairs: int | None = None,
        left_on: str | None = None,
        right_on: str | None = None,
        suffixes: tuple[str, str] = ("_x", "_y"),
        system: str | None = None,
        cheap_model: str | None = None,
        sample: int | float = 0.05,
        agreement: float = 0.98,
        sample_seed: int = 0,
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
        prices: Mapping[str, tuple[float, float]] | None = None,
        max_cost: float | None = None,
        max_tokens_total: int | None = None,
        config: ChatConfig | None = None,
        dry_run: bool = False,
        **params: Any,
    ) -> pd.DataFrame | OperatorEstimate:
        """The pairs of rows, one from this frame and one from ``right``, the model matches.

        Candidates come from embeddings: each left row is asked about with its
        ``candidates`` nearest right rows only, so a 1,000 x 1,000 join asks about 1% of the
        pairs, not a million.

        Args:
            right: the other frame.
            template: the question about a pair, ``{left.col}`` and ``{right.col}``:
                ``"Is {left.title} the same product as {right.name}?"``.
            embed_model: the embedding model for the candidates.
            candidates: right rows asked about per left row; ``"all"`` asks about every
                pair, and needs ``max_pairs`` at least ``len(left) * len(right)``.
            left_on, right_on: the column embedded on each side (default: the columns the
                template names, one ``col: value`` line each).
            suffixes: for column names both frames have, as ``pandas.merge``.
            model, system, cheap_model, sample, agreement, sample_seed, config, **params: as for
                ``filter``.
            provider: as for ``filter``; it also embeds the candidates, so not
                ``"anthropic"`` (no embeddings API: a `ConfigError`).

        Returns:
            One row per matching pair: ``left_index``, ``right_index``, the left columns,
            the right columns and the pair's ``similarity``.
        """
        settings = RunOptions.of(locals()).settings(params, method="join")
        if not isinstance(right, pd.DataFrame):
            raise ConfigError(f"join's right must be a DataFrame; got {type(right).__name__}")
        return await join_frames(
            self._frame(),
            right,
            template,
            settings,
            embed_model=embed_model,
            candidates=candidates,
            max_pairs=max_pairs,
            left_on=left_on,
            right_on=right_on,
            suffixes=suffixes,
            system=system,
            cascade=cascade_for(cheap_model, sample, agreement, sample_seed),
            dry_run=dry_run,
            stages=self._stages(),
        )


def _as_row_text(template: str, frame: pd.DataFrame) -> str:
    """What each row contributes: the values of the columns the instruction names."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if not fields:
        raise ConfigError(
            "aggregate's template names no column: write it as '... {column} ...', or pass column="
        )
    if len(fields) == 1:
        return "{" + fields[0] + "}"
    return "; ".join(f"{field}: {{{field}}}" for field in dict.fromkeys(fields))


def _as_instruction(template: str) -> str:
    """The instruction with each ``{column}`` read as "the column values below"."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if field:
            out.append(f"the {field} of the records below")
    return "".join(out)


P = ParamSpec("P")
R = TypeVar("R")


def operator_blocking(coroutine_method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]:
    """The sync twin of an operator's ``a...`` method (``filter`` for ``afilter``).

    As `blocking` for the row methods, except for what a stop says: an operator is several
    runs, and its answers so far live in the cache, not in one output.
    """

    @functools.wraps(coroutine_method)
    def method(*args: P.args, **kwargs: P.kwargs) -> R:
        name = coroutine_method.__name__.removeprefix("a")
        try:
            return run_sync(coroutine_method(*args, **kwargs))
        except RunInterrupted:
            raise
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            stopped = exc
        raise RunInterrupted(  # outside the except block: one line in a notebook
            f"{name} stopped: the answers received so far are saved in the cache, so running "
            "the cell again sends only the rest. nbtoolkit.last_run() is the report of the "
            "step it stopped in."
        ) from stopped

    method.__name__ = method.__qualname__ = coroutine_method.__name__.removeprefix("a")
    return method
