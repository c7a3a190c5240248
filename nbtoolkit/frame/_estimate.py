"""The pandas face of a cost estimate: ``.to_frame()``, and the run that follows a dry run.

``df.chat.complete(..., dry_run=True)`` returns a `CostEstimate` and remembers it with the
frame it was made for; the next real run of the same frame, model and endpoint starts from
it (its projection on the bar, its early warning against ``max_cost``) and its report
compares the two (`RunReport.estimate_error`). One estimate serves one run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core import _costestimate as core
from nbtoolkit.core._estimate import estimate_run
from nbtoolkit.core._pricing import PRICE_UNKNOWN
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame._progress import ProgressBar


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class CostEstimate(core.CostEstimate):
    """What a run will cost before it is run (see ``dry_run=True``); ``to_frame()`` for a
    table, ``prompt_tokens_by_row`` for each row's counted prompt."""

    def to_frame(self) -> pd.DataFrame:
        """One row per quantity, columns ``low``, ``expected``, ``high`` (numbers; NaN where
        there is none: no bound, or "price unknown") and ``how`` (what it rests on)."""
        prompt, completion, cost = self.prompt_tokens, self.completion_tokens, self.cost
        rows: dict[str, tuple[float, float, float, str]] = {
            "rows_to_send": (math.nan, float(self.to_send), math.nan, f"of {self.rows}"),
            "prompt_tokens": (*_numbers(prompt), self.token_method),
            "shared_prompt_tokens_per_row": (
                math.nan,
                self.shared_tokens,
                math.nan,
                f"{self.shared_share:.0%} of each prompt",
            ),
            "cached_prompt_tokens": (math.nan, self.cached_tokens, math.nan, "prompt cache"),
            "completion_tokens": (*_numbers(completion), self.completion_basis),
            "cost": (
                (*_numbers(cost), core.price_note(self))
                if cost is not None
                else (math.nan, math.nan, math.nan, PRICE_UNKNOWN)
            ),
            "wall_seconds": (
                math.nan,
                math.nan if self.wall_seconds is None else self.wall_seconds,
                math.nan,
                self.wall_basis,
            ),
        }
        if self.pilot is not None:
            paid = math.nan if self.pilot.cost is None else self.pilot.cost
            rows["pilot_cost"] = (math.nan, paid, math.nan, f"{self.pilot.rows} rows, paid")
        frame = pd.DataFrame.from_dict(
            rows, orient="index", columns=["low", "expected", "high", "how"]
        )
        frame.index.name = "quantity"
        return frame


def _numbers(span: core.Span) -> tuple[float, float, float]:
    return span.low, span.expected, math.nan if span.high is None else span.high


async def dry_run(
    owner: object,
    config: ChatConfig,
    requests: Iterable[Any],
    *,
    endpoint: Endpoint | None,
    pilot: int | float | None,
    batch: bool = False,
) -> CostEstimate:
    """Estimate a run (sending only a pilot's rows, if asked) and remember it for the next
    run of ``owner`` (the caller's DataFrame or Series).

    Raises:
        ConfigError: a bad pilot size, or no model.
        RunAborted: the pilot met a bad key, wrong URL or model, or no quota.
        asyncio.CancelledError, KeyboardInterrupt: the stop button during the pilot, with a
            note that says what was kept.
    """
    try:
        made = await estimate_run(
            config,
            requests,
            endpoint=endpoint,
            pilot=pilot,
            seed=0,
            batch=batch,
            pilot_progress=lambda rows: ProgressBar(rows, enabled=config.progress, desc="pilot"),
        )
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        # The pilot is a run with no report of its own: this note is what the stop button
        # shows (`blocking` makes it the RunInterrupted line), not a bare KeyboardInterrupt.
        kept = (
            "the answers it received are saved in the cache, and a run or dry run of these "
            "rows never pays for them again"
            if config.cache_path is not None
            else "the cache is off, so the answers it received are not kept"
        )
        exc.add_note(f"stopped during the dry run's pilot: {kept}")
        raise
    fields = {f.name: getattr(made, f.name) for f in dataclasses.fields(made)}
    estimate = CostEstimate(**fields)
    with _lock:
        global _last
        _last = (weakref.ref(owner), _kind(endpoint), estimate)
    return estimate


def estimate_for(
    owner: object, config: ChatConfig, endpoint: Endpoint | None
) -> CostEstimate | None:
    """The dry run made for this DataFrame or Series, model and kind of request (the plan's
    endpoint), if it is the latest; taken (one estimate serves one run)."""
    global _last
    with _lock:
        if _last is None:
            return None
        ref, kind, estimate = _last
        if ref() is not owner or estimate.model != config.model or kind != _kind(endpoint):
            return None
        _last = None
        return estimate


def check_pilot(pilot: int | float | None, dry: bool) -> None:
    """A pilot only makes sense before a dry run's estimate.

    Raises:
        ConfigError: ``pilot`` without ``dry_run=True``.
    """
    if pilot is not None and not dry:
        raise ConfigError(
            "pilot= sends a sample to measure the rest: pass it with dry_run=True, look at "
            "the estimate, then run without either (the pilot's rows come from the cache)"
        )


_lock = threading.Lock()
_last: tuple[weakref.ref[object], str, CostEstimate] | None = None


def _kind(endpoint: Endpoint | None) -> str:
    """What kind of request a plan makes: a `complete` after `extract`'s dry run on the same
    frame must not start from that estimate."""
    return "chat" if endpoint is None else type(endpoint).__name__
