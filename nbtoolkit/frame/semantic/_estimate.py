"""``dry_run=True`` for the operators: what each step would cost, and the total, sending nothing.

An operator is several runs, so its estimate is one `CostEstimate` per step and their sum.
Where a step's size depends on answers not yet had (the rows a cascade's cheap model is unsure
of, the pairs a join's embeddings pick, the levels an aggregate needs), the step is sized by
what bounds it, and a note says so.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core import _estimate as core
from nbtoolkit.core._costestimate import NO_MATHJAX, Span
from nbtoolkit.core._pricing import PRICE_UNKNOWN
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.frame._estimate import CostEstimate


@dataclasses.dataclass(frozen=True)
class OperatorEstimate:
    """What an operator would cost: each step's `CostEstimate`, and their sum.

    ``cost`` is None when any step's model has no price ("price unknown", never $0).
    """

    operator: str
    steps: tuple[tuple[str, CostEstimate], ...]
    notes: tuple[str, ...] = ()

    @property
    def requests(self) -> int:
        """Rows the steps would send (requests, for one-row-per-request endpoints)."""
        return sum(estimate.to_send for _, estimate in self.steps)

    @property
    def cost(self) -> Span | None:
        """The total cost as low / expected / high; None if a step's price is unknown."""
        spans = [estimate.cost for _, estimate in self.steps]
        if any(span is None for span in spans):
            return None
        known = [span for span in spans if span is not None]
        highs = [span.high for span in known]
        return Span(
            sum(s.low for s in known),
            sum(s.expected for s in known),
            None if any(h is None for h in highs) else sum(h for h in highs if h is not None),
        )

    def headline(self) -> str:
        """One line: the operator, rows to send over its steps, and the cost range."""
        cost = self.cost
        if cost is None:
            money = PRICE_UNKNOWN
        else:
            high = "no bound" if cost.high is None else f"${cost.high:,.4f}"
            money = f"${cost.low:,.4f} / ${cost.expected:,.4f} / {high} (low / expected / high)"
        return (
            f"{self.operator}: {self.requests:,} rows to send in {len(self.steps)} "
            f"step{'s' if len(self.steps) != 1 else ''}; {money}"
        )

    def to_frame(self) -> pd.DataFrame:
        """Every step's table (`CostEstimate.to_frame`), with a ``step`` column first."""
        frames = [est.to_frame().reset_index().assign(step=name) for name, est in self.steps]
        frame = pd.concat(frames, ignore_index=True)
        return frame[["step", *[c for c in frame.columns if c != "step"]]]

    def __str__(self) -> str:
        parts = [self.headline()]
        for name, estimate in self.steps:
            parts.append(f"\n[{name}]\n{estimate}")
        parts.extend(f"note: {note}" for note in self.notes)
        return "\n".join(parts)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        steps = "".join(
            f"<details><summary>{html.escape(name)}: {html.escape(est.headline())}</summary>"
            f"{est._repr_html_()}</details>"
            for name, est in self.steps
        )
        notes = "".join(f"<li>{html.escape(note)}</li>" for note in self.notes)
        return (
            f'<div class="{NO_MATHJAX}"><b>OperatorEstimate</b> '
            f"{html.escape(self.headline())}{steps}"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "</div>"
        )


async def estimate_step(
    settings: ChatConfig, requests: Iterable[Any], endpoint: Endpoint | None
) -> CostEstimate:
    """One step's estimate, sending nothing."""
    made = await core.estimate_run(settings, requests, endpoint=endpoint, pilot=None)
    fields = {f.name: getattr(made, f.name) for f in dataclasses.fields(made)}
    return CostEstimate(**fields)
