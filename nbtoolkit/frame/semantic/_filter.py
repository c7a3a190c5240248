"""``filter``: the rows for which the model answers yes, with an optional cheap-model cascade.

Without ``cheap_model`` every row is one yes/no question to ``model``. With it (as LOTUS's
cascades and BigQuery's optimized mode do):

1. a seeded sample of rows, spread over the frame, is answered by ``model``: the labels;
2. ``cheap_model`` answers every row, with its confidence (token log-probabilities);
3. the confidence threshold is the lowest at which the cheap model agreed with ``model`` on
   at least ``agreement`` of the labelled rows it would decide;
4. rows the cheap model is that sure about are decided by it, the rest go to ``model``.

A server that sends no log-probabilities gives no confidence: then ``model`` answers every
row, and the summary says why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._rows import ChatRequest, RowResult
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.endpoints._judge import INSTRUCTION, Verdict
from nbtoolkit.core.endpoints._providers import judge_endpoint
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame._estimate import CostEstimate
from nbtoolkit.frame.semantic._estimate import estimate_step
from nbtoolkit.frame.semantic._stages import Stages, question

DEFAULT_SYSTEM = "You decide whether a statement holds for the record you are given."


@dataclass(frozen=True, kw_only=True)
class Cascade:
    """How the cheap model shares the work (see the module's docstring)."""

    cheap_model: str
    sample: int | float = 0.05  # labelled rows: a count, or a share of the rows
    min_sample: int = 30
    agreement: float = 0.98  # on the labelled rows the cheap model decides
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 < self.agreement <= 1.0:
            raise ConfigError(f"agreement= must be in (0.5, 1]; got {self.agreement!r}")
        if isinstance(self.sample, float) and not 0.0 < self.sample <= 1.0:
            raise ConfigError(f"a sample= share must be in (0, 1]; got {self.sample!r}")
        if isinstance(self.sample, int) and self.sample < 1:
            raise ConfigError(f"sample= must be at least 1 row; got {self.sample!r}")

    def size(self, rows: int) -> int:
        wanted = self.sample if isinstance(self.sample, int) else math.ceil(self.sample * rows)
        return min(rows, max(wanted, self.min_sample))


@dataclass
class Decisions:
    """One result per row (value: a `Verdict`), and who decided how many rows."""

    results: list[RowResult]
    notes: list[str]


async def decide(
    prompts: Sequence[str | None],
    settings: ChatConfig,
    stages: Stages,
    *,
    system: str | None,
    cascade: Cascade | None,
    label: str = "filter",
) -> Decisions:
    """Asks each prompt's yes/no question, through a cascade when one is given."""
    requests = filter_requests(prompts, system)
    model = str(settings.model)
    if cascade is None:
        results = await stages.run(label, requests, settings, endpoint=judge(settings, False))
        return Decisions(results, [f"{label}: {model} decided every row"])
    return await _cascaded(requests, settings, stages, cascade, label)


def filter_requests(prompts: Sequence[str | None], system: str | None) -> list[ChatRequest | None]:
    """The yes/no question each prompt becomes (None: nothing to ask)."""
    return [question(_asked(p), system or DEFAULT_SYSTEM) for p in prompts]


async def estimate_decisions(
    prompts: Sequence[str | None],
    settings: ChatConfig,
    *,
    system: str | None,
    cascade: Cascade | None,
    label: str = "filter",
) -> tuple[list[tuple[str, CostEstimate]], list[str]]:
    """What `decide` would cost, step by step, sending nothing; and notes on the sizing."""
    requests = filter_requests(prompts, system)
    model = str(settings.model)
    if cascade is None:
        return [
            (f"{label}, {model}", await estimate_step(settings, requests, judge(settings, False)))
        ], []
    sendable = [i for i, r in enumerate(requests) if r is not None]
    labelled = set(_sample(sendable, cascade))
    cheap_settings = dataclasses.replace(settings, model=cascade.cheap_model)
    rest = [r if i not in labelled else None for i, r in enumerate(requests)]
    found = [
        (
            f"{label}, labels from {model}",
            await estimate_step(
                settings, [requests[i] for i in sorted(labelled)], judge(settings, False)
            ),
        ),
        (
            f"{label}, {cascade.cheap_model}",
            await estimate_step(cheap_settings, requests, judge(cheap_settings, True)),
        ),
        (
            f"{label}, {model} on the unsure rows (at most)",
            await estimate_step(settings, rest, judge(settings, False)),
        ),
    ]
    note = (
        f"the last step is sized for every row {cascade.cheap_model} might be unsure of; only "
        f"those it is unsure of go to {model} (about a fifth in the tests)"
    )
    return found, [note]


def _sample(sendable: Sequence[int], cascade: Cascade) -> list[int]:
    rng = np.random.default_rng(cascade.seed)
    return sorted(rng.choice(sendable, size=cascade.size(len(sendable)), replace=False))


def judge(settings: ChatConfig, confidence: bool) -> Endpoint:
    """The yes/no endpoint for a run with ``settings``, in its provider's format."""
    return judge_endpoint(settings.resolved(), confidence=confidence)


async def _cascaded(
    requests: list[ChatRequest | None],
    settings: ChatConfig,
    stages: Stages,
    cascade: Cascade,
    label: str,
) -> Decisions:
    model = str(settings.model)
    sendable = [i for i, r in enumerate(requests) if r is not None]
    labelled = _sample(sendable, cascade)
    labels = await stages.run(
        f"{label}, labels from {model}",
        [requests[i] for i in labelled],
        settings,
        endpoint=judge(settings, False),
    )
    cheap_settings = dataclasses.replace(settings, model=cascade.cheap_model)
    cheap = await stages.run(
        f"{label}, {cascade.cheap_model}",
        requests,
        cheap_settings,
        endpoint=judge(cheap_settings, True),
    )
    threshold, agreed = learn_threshold(
        [(cheap[i].value, label_row.value) for i, label_row in zip(labelled, labels, strict=True)],
        cascade.agreement,
    )
    results: list[RowResult] = list(cheap)
    for i, label_row in zip(labelled, labels, strict=True):
        results[i] = label_row
    labelled_set = set(labelled)
    unsure = [i for i in sendable if i not in labelled_set and not _sure(cheap[i].value, threshold)]
    answers = await stages.run(
        f"{label}, {model} on the rows {cascade.cheap_model} was unsure of",
        [requests[i] for i in unsure],
        settings,
        endpoint=judge(settings, False),
    )
    for i, answer in zip(unsure, answers, strict=True):
        results[i] = answer
    by_cheap = len(sendable) - len(labelled) - len(unsure)
    if math.isinf(threshold):
        why = f"{cascade.cheap_model} gave no usable confidence (no logprobs from its server)"
    else:
        why = (
            f"confidence >= {threshold:.3f}, learned from {len(labelled)} rows {model} labelled; "
            f"agreement there {agreed:.1%}"
        )
    notes = [
        f"{label}: {cascade.cheap_model} decided {by_cheap} rows ({why}); "
        f"{model} decided {len(labelled) + len(unsure)} rows"
    ]
    return Decisions(results, notes)


def learn_threshold(
    pairs: Sequence[tuple[Verdict | None, Verdict | None]], agreement: float
) -> tuple[float, float]:
    """The lowest confidence at which the cheap answers agree with the labels often enough.

    Args:
        pairs: (cheap model's verdict, label) for each labelled row; None where either has none.
        agreement: the share of labelled rows at or above the threshold that must agree.

    Returns:
        (threshold, agreement reached there); ``inf`` when no threshold is good enough (or the
        cheap model gave no confidence), so that ``model`` answers every row.
    """
    scored = [
        (cheap.confidence, cheap.answer == label.answer)
        for cheap, label in pairs
        if cheap is not None and label is not None and cheap.confidence is not None
    ]
    scored.sort(key=lambda pair: -pair[0])
    best, reached, agree = math.inf, 1.0, 0
    for position, (confidence, same) in enumerate(scored, start=1):
        agree += same
        ties_follow = position < len(scored) and scored[position][0] == confidence
        if not ties_follow and agree / position >= agreement:
            best, reached = confidence, agree / position
    return best, reached


def _sure(verdict: Verdict | None, threshold: float) -> bool:
    return (
        verdict is not None and verdict.confidence is not None and verdict.confidence >= threshold
    )


def _asked(prompt: str | None) -> str | None:
    return None if prompt is None else f"{prompt}\n\n{INSTRUCTION}"


def mask_of(results: Sequence[RowResult], index: pd.Index) -> pd.Series:
    """The answers as a nullable boolean Series (NA where a row has no answer)."""
    values = [r.value.answer if r.error is None and r.value is not None else pd.NA for r in results]
    return pd.Series(values, index=index, dtype="boolean")
