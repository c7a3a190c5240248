"""A cost estimate as it is shown: rows, tokens, money and time as low / expected / high.

Plain data and its reprs (text and HTML, one screen in a notebook); `nbtoolkit.core._estimate`
makes it, and the pandas face adds ``to_frame()``.
"""

from __future__ import annotations

import dataclasses
import html
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nbtoolkit.core._pricing import PRICE_UNKNOWN, Price, format_money

# MathJax 2's and 3's "leave this alone" classes: JupyterLab typesets the text between two
# "$" of an HTML output as LaTeX ("$0.15 in, $0.6" became math), pandas' tables carry them too.
NO_MATHJAX = "tex2jax_ignore mathjax_ignore"
SKIP_REASONS = {
    "skipped": "nothing to send (missing or empty)",
    "unsendable": "cannot be encoded as JSON",
    "cache": "answered by the cache",
    "duplicate": "same request as another row",
}


@dataclass(frozen=True, slots=True)
class Span:
    """A quantity as low, expected and high; ``high`` None: nothing bounds it."""

    low: float
    expected: float
    high: float | None

    def plus(self, amount: float) -> Span:
        high = None if self.high is None else self.high + amount
        return Span(self.low + amount, self.expected + amount, high)

    def contains(self, value: float) -> bool:
        return self.low <= value and (self.high is None or value <= self.high)


@dataclass(frozen=True, kw_only=True)
class Pilot:
    """What the pilot sent and what it cost (already paid; its answers are in the cache)."""

    rows: int
    requests: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost: float | None
    seconds: float


@dataclass(frozen=True, kw_only=True)
class CostEstimate:
    """A run's cost before it is run: rows to send, tokens, money and time as ranges.

    ``cost`` is None when the model has no price ("price unknown", never $0). With a pilot,
    every figure covers the whole run, the pilot's own rows and cost included.
    """

    model: str
    path: str
    rows: int
    to_send: int
    skipped: Mapping[str, int]
    prompt_tokens: Span
    prompt_tokens_by_row: tuple[float | None, ...]  # counted locally; None: not sent
    shared_tokens: float  # per row: the same in every row (system prompt, schema, prefix)
    token_method: str
    completion_tokens: Span
    completion_basis: str
    cached_tokens: float  # prompt tokens expected from the provider's prompt cache
    cost: Span | None
    price: Price | None
    batch: bool
    wall_seconds: float | None
    wall_basis: str
    pilot: Pilot | None = None
    notes: tuple[str, ...] = ()
    made: float = dataclasses.field(default_factory=time.time)

    @property
    def shared_share(self) -> float:
        """The share of each row's prompt that is the same in every row."""
        counted = [n for n in self.prompt_tokens_by_row if n is not None]
        per_row = sum(counted) / len(counted) if counted else 0.0
        return min(1.0, self.shared_tokens / per_row) if per_row else 0.0

    def lines(self) -> list[tuple[str, str, str, str, str]]:
        """(quantity, low, expected, high, how) rows: what the reprs and to_frame show."""
        skipped = ", ".join(f"{n:,} {SKIP_REASONS.get(k, k)}" for k, n in self.skipped.items())
        prompt, completion = self.prompt_tokens, self.completion_tokens
        skipped = skipped or "none skipped"
        rows = [
            ("rows to send", "", f"{self.to_send:,}", "", f"of {self.rows:,}; {skipped}"),
            ("prompt tokens", *_span_cells(prompt, _n), self.token_method),
            (
                "  same in every row",
                "",
                f"{self.shared_tokens:,.0f} a row",
                "",
                f"{self.shared_share:.0%} of each prompt (system prompt, schema, prefix); "
                f"{_n(self.cached_tokens)} expected from the provider's prompt cache",
            ),
            ("completion tokens", *_span_cells(completion, _n), self.completion_basis),
        ]  # fmt: skip
        if self.cost is None:
            rows.append(("cost", PRICE_UNKNOWN, PRICE_UNKNOWN, PRICE_UNKNOWN, price_note(self)))
        else:
            rows.append(("cost", *_span_cells(self.cost, format_money), price_note(self)))
        wall = "unknown" if self.wall_seconds is None else _duration(self.wall_seconds)
        rows.append(("wall time", "", wall, "", self.wall_basis))
        if self.pilot is not None:
            p = self.pilot
            rows.append(
                (
                    "pilot (paid)",
                    "",
                    format_money(p.cost),
                    "",
                    f"{p.rows} rows, {p.requests} requests, {p.prompt_tokens:,} prompt + "
                    f"{p.completion_tokens:,} completion tokens ({p.reasoning_tokens:,} "
                    f"reasoning, {p.cached_tokens:,} cached); answers kept in the cache",
                )
            )
        return rows

    def headline(self) -> str:
        """One line: the expected cost and its range, or that the price is unknown."""
        if self.cost is None:
            return f"{self.model}: {self.to_send:,} rows to send, {PRICE_UNKNOWN}"
        high = format_money(self.cost.high) if self.cost.high is not None else "no bound"
        return (
            f"{self.model}: {self.to_send:,} rows to send, ~{format_money(self.cost.expected)} "
            f"({format_money(self.cost.low)} to {high})"
        )

    def __str__(self) -> str:
        table = self.lines()
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        out = [f"CostEstimate {self.headline()}"]
        for row in [("", "low", "expected", "high", ""), *table]:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:4], widths[1:], strict=True)]
            out.append("  ".join(cells) + (f"  {row[4]}" if row[4] else ""))
        out.extend(f"note: {note}" for note in self.notes)
        return "\n".join(out)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("", "low", "expected", "high", "how"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self.lines()
        )
        notes = "".join(f"<li>{html.escape(note)}</li>" for note in self.notes)
        return (
            f'<div class="{NO_MATHJAX}"><b>CostEstimate</b> {html.escape(self.headline())}'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "</div>"
        )


def price_note(estimate: CostEstimate) -> str:
    """Where the estimate's prices come from, or what to pass when there are none."""
    price = estimate.price
    if price is None:
        return (
            f"no price for {estimate.model} behind this server: pass "
            f"prices={{{estimate.model!r}: (input, output)}} per million tokens"
        )
    cached = price.input if price.cached_input is None else price.cached_input
    text = (
        f"{price.source}: ${price.input:g} in, ${cached:g} cached, ${price.output:g} out "
        "per million"
    )
    if estimate.batch:
        text += f"; Batch at {price.batch_discount:g} of that"
    if estimate.pilot is not None:
        text += "; the pilot's cost included"
    return text


def _span_cells(span: Span, show: Callable[[float], str]) -> tuple[str, str, str]:
    high = "no bound" if span.high is None else show(span.high)
    return show(span.low), show(span.expected), high


def _n(value: float | None) -> str:
    return "no bound" if value is None else f"{value:,.0f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
