"""The four operators, from a frame and its prompts to their result and report.

The accessor methods (``df.chat.filter`` and the rest) check their options and call these.
Each leaves one report in ``nbtoolkit.last_run()``: a row per input row (per left row for a
join, per group for an aggregate), every stage's requests and tokens added up, and lines that
say what decided the rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._rows import RowResult
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.endpoints._providers import embedding_endpoint, score_endpoint
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame._estimate import CostEstimate
from nbtoolkit.frame._vectors import to_matrix
from nbtoolkit.frame.semantic._aggregate import (
    DEFAULT_ANSWER_TOKENS,
    Group,
    planned_prompts,
    reduce_groups,
)
from nbtoolkit.frame.semantic._estimate import OperatorEstimate, estimate_step
from nbtoolkit.frame.semantic._filter import Cascade, decide, estimate_decisions, mask_of
from nbtoolkit.frame.semantic._join import (
    JoinTemplate,
    all_pairs,
    check_candidates,
    merged,
    nearest_pairs,
)
from nbtoolkit.frame.semantic._stages import Stages, failed, question

Keep = Literal["rows", "mask"]
SCORE_SYSTEM = (
    "You score how well a record fits a criterion, from 0 (not at all) to 100 (perfectly). "
    'Answer with JSON only: {"score": <number>}.'
)


async def filter_rows(
    frame: pd.DataFrame | pd.Series,
    prompts: pd.Series,
    settings: ChatConfig,
    *,
    system: str | None,
    cascade: Cascade | None,
    keep: Keep,
    dry_run: bool = False,
    stages: Stages | None = None,
) -> pd.DataFrame | pd.Series | OperatorEstimate:
    """The rows whose question the model answers yes (or the yes/no mask)."""
    stages = stages if stages is not None else Stages()
    if keep not in ("rows", "mask"):
        raise ConfigError(f'keep= must be "rows" or "mask"; got {keep!r}')
    if dry_run:
        found, notes = await estimate_decisions(
            list(prompts), settings, system=system, cascade=cascade
        )
        return OperatorEstimate("filter", tuple(found), tuple(notes))
    index = frame.index
    decisions = await decide(list(prompts), settings, stages, system=system, cascade=cascade)
    mask = mask_of(decisions.results, index)
    output = mask if keep == "mask" else frame[mask.fillna(False).to_numpy(dtype=bool)]
    unanswered = int(mask.isna().sum())
    notes = [*decisions.notes]
    if unanswered:
        notes.append(f"filter: {unanswered} rows had no answer and are left out (see .errors)")
    stages.remember(output, index, decisions.results, notes)
    return output


async def join_frames(
    left: pd.DataFrame,
    right: pd.DataFrame,
    template: str,
    settings: ChatConfig,
    *,
    embed_model: str | None,
    candidates: int | Literal["all"],
    max_pairs: int | None,
    left_on: str | None,
    right_on: str | None,
    suffixes: tuple[str, str],
    system: str | None,
    cascade: Cascade | None,
    dry_run: bool = False,
    stages: Stages | None = None,
) -> pd.DataFrame | OperatorEstimate:
    """The pairs the model says match, asked about only among embedding candidates."""
    stages = stages if stages is not None else Stages()
    parsed = JoinTemplate.parse(template, left, right)
    if dry_run:
        return await _estimate_join(
            parsed,
            left,
            right,
            settings,
            embed_model,
            candidates,
            (left_on, right_on),
            system,
            cascade,
        )
    check_candidates(candidates, max_pairs, len(left), len(right))
    notes: list[str] = []
    if candidates == "all":
        pairs = list(all_pairs(len(left), len(right)))
        notes.append(f"join: every pair asked about ({len(pairs):,}), as max_pairs= allowed")
    else:
        if embed_model is None:
            raise ConfigError("join needs embed_model= for its candidates (or candidates='all')")
        embed_settings = dataclasses.replace(settings, model=embed_model)
        vectors = [
            await _embed(parsed.texts(frame, side, on), embed_settings, stages, side)
            for frame, side, on in ((left, "left", left_on), (right, "right", right_on))
        ]
        pairs = list(nearest_pairs(vectors[0], vectors[1], candidates))
        share = len(pairs) / max(1, len(left) * len(right))
        notes.append(
            f"join: {len(pairs):,} candidate pairs ({candidates} nearest right rows per left "
            f"row by {embed_model} embeddings: {share:.2%} of all {len(left) * len(right):,})"
        )
    prompts = pd.Series([parsed.prompt(left, right, i, j) for i, j, _ in pairs], dtype=object)
    decisions = await decide(
        list(prompts), settings, stages, system=system, cascade=cascade, label="join"
    )
    matched = [
        pair
        for pair, result in zip(pairs, decisions.results, strict=True)
        if result.error is None and result.value is not None and result.value.answer
    ]
    output = merged(left, right, matched, suffixes)
    per_left = _per_left_outcomes(len(left), pairs, decisions.results)
    notes += decisions.notes
    notes.append(f"join: {len(matched):,} matching pairs")
    stages.remember(output, left.index, per_left, notes)
    return output


async def _estimate_join(
    parsed: JoinTemplate,
    left: pd.DataFrame,
    right: pd.DataFrame,
    settings: ChatConfig,
    embed_model: str | None,
    candidates: int | Literal["all"],
    on: tuple[str | None, str | None],
    system: str | None,
    cascade: Cascade | None,
) -> OperatorEstimate:
    """The embeddings and the pair questions a join would send; nothing is sent."""
    found: list[tuple[str, CostEstimate]] = []
    notes: list[str] = []
    pairs: Iterable[tuple[int, int]]
    if candidates == "all":
        pairs = ((i, j) for i, j, _ in all_pairs(len(left), len(right)))
        size = len(left) * len(right)
        notes.append(f"every pair: {size:,} questions; to run it, pass max_pairs={size}")
    else:
        check_candidates(candidates, None, len(left), len(right))
        if embed_model is None:
            raise ConfigError("join needs embed_model= for its candidates (or candidates='all')")
        embed_settings = dataclasses.replace(settings, model=embed_model)
        endpoint = _embedder(embed_settings)
        for frame, side, column in ((left, "left", on[0]), (right, "right", on[1])):
            texts = parsed.texts(frame, side, column)
            step = await estimate_step(embed_settings, texts, endpoint)
            found.append((f"join, embeddings of the {side} rows", step))
        k = min(candidates, len(right))
        # Which right rows are nearest is known only after embedding: price k per left row.
        width = max(1, len(right))
        pairs = ((i, (i * k + t) % width) for i in range(len(left)) for t in range(k))
        notes.append(
            f"the pairs asked about are each left row's {k} nearest right rows, known after "
            "the embeddings: priced here with k right rows per left row"
        )
    prompts = [parsed.prompt(left, right, i, j) for i, j in pairs]
    asked, more = await estimate_decisions(
        prompts, settings, system=system, cascade=cascade, label="join"
    )
    return OperatorEstimate("join", (*found, *asked), (*notes, *more))


async def _embed(
    texts: Sequence[str | None], settings: ChatConfig, stages: Stages, side: str
) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    if not texts:
        return None
    endpoint = _embedder(settings)
    results = await stages.run(
        f"join, embeddings of the {side} rows", texts, settings, endpoint=endpoint
    )
    return to_matrix([r.value if r.error is None else None for r in results])


def _embedder(settings: ChatConfig) -> Endpoint:
    """The embeddings endpoint of the join's provider (Anthropic's: a ConfigError, none exists)."""
    return embedding_endpoint(
        settings.resolved(), dimensions=None, batch_size=2048, max_batch_tokens=300_000
    )


def _per_left_outcomes(
    rows: int, pairs: Sequence[tuple[int, int, float]], results: Sequence[RowResult]
) -> list[RowResult]:
    """A left row is ok when each of its pairs got an answer; else the first failure's reason."""
    outcome: list[RowResult] = [RowResult("no candidates", value=None) for _ in range(rows)]
    for (i, _, _), result in zip(pairs, results, strict=True):
        if result.error is not None and outcome[i].error is None:
            outcome[i] = result
        elif outcome[i].error is None:
            outcome[i] = RowResult("asked", value=None)
    return outcome


async def top_rows(
    frame: pd.DataFrame | pd.Series,
    prompts: pd.Series,
    k: int,
    settings: ChatConfig,
    *,
    system: str | None,
    output: str,
    dry_run: bool = False,
    stages: Stages | None = None,
) -> pd.DataFrame | pd.Series | OperatorEstimate:
    """The ``k`` rows with the highest scores, best first, with their score."""
    stages = stages if stages is not None else Stages()
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be an int >= 1; got {k!r}")
    resolved = settings.resolved()
    endpoint = score_endpoint(resolved)
    requests = [question(p, system or SCORE_SYSTEM) for p in prompts]
    if dry_run:
        estimate = await estimate_step(settings, requests, endpoint)
        return OperatorEstimate("top_k", (("top_k, scores", estimate),))
    results = await stages.run("top_k, scores", requests, settings, endpoint=endpoint)
    scores = pd.Series(
        [r.value if r.error is None else np.nan for r in results], index=frame.index, dtype=float
    )
    values = scores.to_numpy(dtype=float)
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
    chosen = [int(i) for i in order[:k] if not np.isnan(values[int(i)])]
    if isinstance(frame, pd.Series):
        best: pd.DataFrame | pd.Series = frame.iloc[chosen]
    else:
        best = frame.iloc[chosen].assign(**{output: scores.iloc[chosen].to_numpy()})
    notes = [
        f"top_k: method 'scores', one request per row ({len(frame)} rows), a 0-100 score each; "
        "ties keep the frame's order"
    ]
    stages.remember(best, frame.index, results, notes)
    return best


async def aggregate_rows(
    frame: pd.DataFrame,
    texts: pd.Series,
    instruction: str,
    by: Hashable | Sequence[Hashable] | None,
    settings: ChatConfig,
    *,
    system: str | None,
    context_tokens: int,
    output: str,
    dry_run: bool = False,
    stages: Stages | None = None,
) -> str | pd.Series | OperatorEstimate | None:
    """One answer per group (or for the whole frame) by a hierarchical reduce."""
    stages = stages if stages is not None else Stages()
    if not isinstance(context_tokens, int) or context_tokens < 256:
        raise ConfigError(f"context_tokens must be an int >= 256; got {context_tokens!r}")
    params = settings.params
    answer_tokens = (
        params.get("max_tokens") or params.get("max_completion_tokens") or DEFAULT_ANSWER_TOKENS
    )
    # Not beside max_completion_tokens: OpenAI's reasoning models refuse the pair.
    if not {"max_tokens", "max_completion_tokens"} & params.keys():
        settings = dataclasses.replace(
            settings, params={**settings.params, "max_tokens": answer_tokens}
        )
    keyed: list[tuple[Any, pd.Series]]
    if by is None:
        keyed = [(None, texts)]
    else:
        keys = list(by) if isinstance(by, list | tuple) else [by]
        for key in keys:
            if key not in frame.columns:
                known = list(frame.columns)
                raise ConfigError(f"by= column {key!r} not found; columns are {known}")
        grouper: Any = keys if isinstance(by, list | tuple) else by
        positions = pd.Series(np.arange(len(frame)), index=frame.index)
        keyed = [
            (key, texts.iloc[positions.loc[rows.index].to_numpy()])
            for key, rows in frame.groupby(grouper, sort=True, dropna=False)
        ]
    groups = [Group(key, [str(t) for t in part if isinstance(t, str)]) for key, part in keyed]
    if dry_run:
        first, above = planned_prompts(
            groups, instruction, context_tokens=context_tokens, answer_tokens=int(answer_tokens)
        )
        level_one = await estimate_step(settings, [question(p, system) for p in first], None)
        combining = await estimate_step(settings, [question(p, system) for p in above], None)
        return OperatorEstimate(
            "aggregate",
            (("aggregate, level 1", level_one), ("aggregate, combining (at most)", combining)),
            ("combining is sized as if every answer used all of max_tokens: an upper bound",),
        )
    reduction = await reduce_groups(
        groups,
        instruction,
        settings,
        stages,
        system=system,
        context_tokens=context_tokens,
        answer_tokens=int(answer_tokens),
    )
    outcomes = [
        RowResult(g.answer) if g.answer is not None else failed("AnswerError", g.error or "none")
        for g in reduction.groups
    ]
    if by is None:
        result: str | pd.Series | None = reduction.groups[0].answer
        index = pd.Index(["all rows"])
    else:
        index = pd.Index(
            [g.key for g in reduction.groups], name=by if isinstance(by, str) else None
        )
        result = pd.Series(
            [g.answer for g in reduction.groups], index=index, name=output, dtype=object
        )
    stages.remember(result, index, outcomes, reduction.notes)
    return result
