"""``aggregate``: one answer per group over many rows, by a reduce that fits the context.

The rows of each group are packed, in order, into chunks whose request fits the model's
context (``context_tokens``, less the answer's ``max_tokens`` and a margin for the estimate);
each chunk gets an answer; the answers are packed and answered again, until one remains per
group. Every level is one engine run over the chunks of every group, so requests go out many
at once, and every chunk's answer is cached under its own text: a re-run pays nothing, and a
group that changed pays only for the chunks that changed.

A row too long for a chunk on its own is cut to fit, and the summary says how many were.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._rows import RowResult
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame.semantic._stages import Stages, question

CHARS_PER_TOKEN = 3.0  # fewer than the usual four: the estimate must not undercount
MARGIN = 0.85  # of the context left for the prompt, after the answer's tokens
DEFAULT_ANSWER_TOKENS = 512
MAX_LEVELS = 12

FIRST = "{instruction}\n\nThe records ({count}):\n{items}"
LATER = (
    "{instruction}\n\nBelow are {count} partial answers, each over a different part of the "
    "records. Combine them into one answer to the instruction, over all the records:\n{items}"
)


@dataclass
class Group:
    """One group's texts on their way to one answer."""

    key: object
    texts: list[str]
    answer: str | None = None
    error: str | None = None
    cut: int = 0  # rows shortened to fit a chunk


@dataclass
class Reduction:
    """The answers, the levels it took and what the summary should say."""

    groups: list[Group]
    levels: int = 0
    notes: list[str] = field(default_factory=list)


def chunk_budget(context_tokens: int, answer_tokens: int, instruction: str) -> int:
    """Characters of records a chunk may hold.

    Raises:
        ConfigError: the context cannot hold the instruction, the answer and a record.
    """
    tokens = int(context_tokens * MARGIN) - answer_tokens
    chars = int(tokens * CHARS_PER_TOKEN) - len(
        LATER.format(instruction=instruction, count=0, items="")
    )
    if chars < 200:
        raise ConfigError(
            f"context_tokens={context_tokens} leaves no room for records after the instruction "
            f"and max_tokens={answer_tokens}: raise context_tokens or lower max_tokens"
        )
    return chars


def chunks(texts: Sequence[str], budget: int) -> tuple[list[list[str]], int]:
    """Packs texts, in order, into chunks of at most ``budget`` characters; (chunks, rows cut)."""
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    cut = 0
    for text in texts:
        line_budget = budget - 16  # the item's number and newline
        if len(text) > line_budget:
            text = text[:line_budget]
            cut += 1
        if current and size + len(text) + 16 > budget:
            out.append(current)
            current, size = [], 0
        current.append(text)
        size += len(text) + 16
    if current:
        out.append(current)
    return out, cut


def prompt(instruction: str, items: Sequence[str], level: int) -> str:
    """The request for one chunk: the records at the first level, answers above it."""
    listed = "\n".join(f"{n}. {text}" for n, text in enumerate(items, start=1))
    form = FIRST if level == 0 else LATER
    return form.format(instruction=instruction, count=len(items), items=listed)


async def reduce_groups(
    groups: list[Group],
    instruction: str,
    settings: ChatConfig,
    stages: Stages,
    *,
    system: str | None,
    context_tokens: int,
    answer_tokens: int,
) -> Reduction:
    """Reduces every group to one answer (or an error), a level at a time."""
    budget = chunk_budget(context_tokens, answer_tokens, instruction)
    pending = [g for g in groups if g.texts]
    for group in groups:
        if not group.texts:
            group.error = "the group has no rows with text"
    level = 0
    while pending:
        if level >= MAX_LEVELS:
            for group in pending:
                group.error = f"no single answer after {MAX_LEVELS} levels: answers too long"
            break
        owners: list[Group] = []
        prompts: list[str] = []
        for group in pending:
            packed, cut = chunks(group.texts, budget)
            group.cut += cut if level == 0 else 0
            for items in packed:
                owners.append(group)
                prompts.append(prompt(instruction, items, level))
        results = await stages.run(
            f"aggregate, level {level + 1}",
            [question(p, system) for p in prompts],
            settings,
        )
        level += 1
        pending = _next_level(pending, owners, results)
    notes = [f"aggregate: {len(groups)} groups reduced in {level} levels"]
    cut = sum(g.cut for g in groups)
    if cut:
        notes.append(f"aggregate: {cut} rows were longer than a chunk and were cut to fit")
    return Reduction(groups, level, notes)


def _next_level(
    pending: list[Group], owners: list[Group], results: Sequence[RowResult]
) -> list[Group]:
    answers: dict[int, list[str]] = {id(g): [] for g in pending}
    chunks_of = Counter(id(owner) for owner in owners)
    for group, result in zip(owners, results, strict=True):
        if result.text is None:
            reason = result.error.message if result.error is not None else "no answer"
            group.error = group.error or f"a chunk got no answer: {reason}"
        else:
            answers[id(group)].append(result.text)
    still: list[Group] = []
    for group in pending:
        if group.error is not None:
            continue  # an answer over part of the rows would be silently wrong: none at all
        if chunks_of[id(group)] == 1:  # one chunk, one answer: the group's
            group.answer = answers[id(group)][0]
        else:
            group.texts = answers[id(group)]
            still.append(group)
    return still


def planned_prompts(
    groups: Sequence[Group],
    instruction: str,
    *,
    context_tokens: int,
    answer_tokens: int,
) -> tuple[list[str], list[str]]:
    """The first level's prompts, and those of the levels above sized for full-length answers.

    For ``dry_run``: the first level is exact; above it, every answer is assumed to use its
    whole ``max_tokens`` (an upper bound on how many combining requests there will be).
    """
    budget = chunk_budget(context_tokens, answer_tokens, instruction)
    first: list[str] = []
    above: list[str] = []
    placeholder = "x" * int(answer_tokens * 4)
    for group in groups:
        packed, _ = chunks(group.texts, budget)
        first += [prompt(instruction, items, 0) for items in packed]
        level, count = 1, len(packed)
        while count > 1 and level < MAX_LEVELS:
            packed, _ = chunks([placeholder] * count, budget)
            above += [prompt(instruction, items, level) for items in packed]
            count, level = len(packed), level + 1
    return first, above
