"""Which rows a batch sends, what they may cost, and where the job is kept.

Each row becomes the endpoint's `Item` exactly as the engine builds it, keyed by the
engine's own `request_keys` (the URL without its query), so a batch answer is a cache hit
for ``complete`` and the other way round. The worst case is checked with the engine's
`Budget`, at the batch's prices, before anything is uploaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtoolkit.batch import _files as batch_files
from nbtoolkit.config import ChatConfig
from nbtoolkit.core._budget import Budget, OutputCeiling
from nbtoolkit.core._pricing import config_price
from nbtoolkit.core._rows import SKIPPED, RowError, RowResult
from nbtoolkit.core.endpoints._base import Endpoint, Item
from nbtoolkit.errors import ConfigError, UnsendableRow


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """How a batch job is split, priced and watched.

    Attributes:
        discount: what a batch costs against the price table (OpenAI: half price).
        max_lines, max_bytes: the most one input file may hold (the API's limits).
        poll_initial, poll_max: seconds between status checks while waiting; the wait
            grows by half each time, from the first to the second.
    """

    discount: float = 0.5
    max_lines: int = batch_files.MAX_LINES
    max_bytes: int = batch_files.MAX_BYTES
    poll_initial: float = 2.0
    poll_max: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.discount <= 1:
            raise ConfigError(f"discount is a share of the price, 0 to 1; got {self.discount}")
        if self.max_lines < 1 or self.max_bytes < 1:
            raise ConfigError("max_lines and max_bytes must be >= 1")
        if not 0 < self.poll_initial <= self.poll_max:
            raise ConfigError("poll_initial must be > 0 and at most poll_max")


@dataclass
class PlannedRows:
    """Which request each row of the caller's input stands for."""

    keys: list[bytes | None]  # per row: its request's cache key; None when not sent
    fixed: dict[int, RowResult]  # rows with an outcome from the start (skipped, unsendable)
    items: dict[bytes, Item]  # each distinct request, by key
    cached: set[bytes]  # keys answered by the cache before submission


def plan_rows(
    requests: Iterable[Any], endpoint: Endpoint, key: Callable[[bytes], bytes]
) -> PlannedRows:
    rows = PlannedRows(keys=[], fixed={}, items={}, cached=set())
    for index, request in enumerate(requests):
        if request is None:
            rows.fixed[index] = SKIPPED
            rows.keys.append(None)
            continue
        try:
            item = endpoint.item(index, request)
        except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
            error = UnsendableRow(f"this row's request cannot be encoded: {exc}"[:500])
            rows.fixed[index] = RowResult(None, RowError(type(error).__name__, str(error)))
            rows.keys.append(None)
            continue
        item.key = key(item.payload)
        rows.items.setdefault(item.key, item)
        rows.keys.append(item.key)
    return rows


def cache_path(config: ChatConfig) -> Path:
    """The cache file that keeps the config's batch jobs and their answers.

    Raises:
        ConfigError: the cache is off.
    """
    path = config.cache_path
    if path is None:
        raise ConfigError(
            "batch mode keeps its jobs and answers in the cache file, so that a new kernel "
            "finds them again; leave cache on (True or a path)"
        )
    return path


def job_budget(config: ChatConfig, options: BatchOptions, *, limited: bool) -> Budget:
    """The engine's `Budget`, at the batch's prices (every price times the discount)."""
    price = config_price(config)
    if price is not None:
        price = price.scaled(options.discount)
    return Budget(
        model=config.model or "",
        price=price,
        max_tokens_total=config.max_tokens_total if limited else None,
        max_cost=config.max_cost if limited else None,
    )


def check_budget(config: ChatConfig, options: BatchOptions, items: Sequence[Item]) -> None:
    """Refuse a job whose worst case (estimated prompts + max_tokens) is over a limit.

    Raises:
        ConfigError: over ``max_tokens_total`` or ``max_cost`` (at the batch discount), or
            ``max_cost`` without a price for the model.
    """
    budget = job_budget(config, options, limited=True)
    prompt = sum(item.prompt_tokens for item in items)
    # A row without max_tokens may use the model's whole output ceiling (core/_budget.py).
    ceiling = OutputCeiling.for_model(config.model or "")
    completion = sum(ceiling.worst(i.completion_tokens, capped=i.capped) for i in items)
    if budget.try_reserve(prompt, completion):
        return
    what = f"{len(items):,} requests, at worst {prompt + completion:,.0f} tokens"
    if config.max_tokens_total is not None and prompt + completion > config.max_tokens_total:
        raise ConfigError(
            f"batch not submitted, nothing uploaded: {what}, over max_tokens_total="
            f"{config.max_tokens_total:,}. Lower max_tokens or submit fewer rows."
        )
    cost = budget.worst_price(prompt, completion) or 0.0
    raise ConfigError(
        f"batch not submitted, nothing uploaded: {what}, worst case {cost:.4f} at the "
        f"batch discount ({options.discount:g}), over max_cost={config.max_cost:g}. "
        "Lower max_tokens, submit fewer rows or raise max_cost."
    )
