"""``python -m benchmarks.estimate_accuracy``: how close a 1% pilot's estimate comes to the bill.

For each of 10 seeds: a test server whose answers are long-tailed (log-normal, median 60
visible tokens) with hidden reasoning (median 120 tokens), priced as o4-mini; 2,000 rows
behind one system prompt; ``dry_run=True, pilot=20``, then the full run. The actual cost is
the run's plus the pilot's. A second pass, with ``max_tokens=150`` and no pilot, checks
that the high bound is never exceeded. Writes ``benchmarks/results-estimate.md``.
"""

from __future__ import annotations

import datetime
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import nbtoolkit
from nbtoolkit.testing import ChatServer, CompletionLengths

ROWS = 2000
PILOT = 20
SEEDS = range(10)
MODEL = "bench-model"
PRICES = {MODEL: (1.1, 0.275, 4.4)}  # o4-mini: input, cached input, output per million
SYSTEM = "You are a careful analyst; answer in one paragraph. " * 6
OUT = Path(__file__).with_name("results-estimate.md")


def reviews(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"review": [f"review {i}: " + "good value " * (i % 40) for i in range(rows)]}
    )


@dataclass(frozen=True)
class Outcome:
    """One seed: the estimate's range and what the run (with its pilot) cost."""

    seed: int
    low: float
    expected: float
    high: float
    actual: float
    error: float
    inside: bool


def one_seed(seed: int, *, pilot: int | None, max_tokens: int | None) -> Outcome:
    """Estimate, run, and compare, for one seed."""
    lengths = CompletionLengths(
        median=60, sigma=0.5, reasoning_median=120, reasoning_sigma=0.6, seed=seed
    )
    body = {} if max_tokens is None else {"max_tokens": max_tokens}
    with (
        ChatServer(lengths=lengths, record=False).run_in_thread() as server,
        tempfile.TemporaryDirectory() as folder,
    ):
        options = {
            "model": MODEL,
            "base_url": server.base_url,
            "system": SYSTEM,
            "prices": PRICES,
            "cache": Path(folder) / "cache.sqlite3",
            "max_parallel": 64,
            "progress": False,
            **body,
        }
        df = reviews(ROWS)
        estimate = df.chat.complete("review", dry_run=True, pilot=pilot, **options)
        df.chat.complete("review", **options)
    report = nbtoolkit.last_run()
    assert report is not None
    assert report.cost is not None
    assert report.estimate_error is not None
    cost = estimate.cost
    assert cost is not None
    assert cost.high is not None
    return Outcome(
        seed,
        cost.low,
        cost.expected,
        cost.high,
        report.cost,
        report.estimate_error,
        cost.contains(report.cost),
    )


def main() -> None:
    piloted = [one_seed(seed, pilot=PILOT, max_tokens=None) for seed in SEEDS]
    bounded = [one_seed(seed, pilot=None, max_tokens=150) for seed in SEEDS]
    good = sum(1 for r in piloted if abs(r.error) <= 0.15 and r.inside)
    never_over = all(r.actual <= r.high for r in bounded)
    lines = [
        "# Cost estimates against the bill",
        "",
        f"`python -m benchmarks.estimate_accuracy`, {datetime.date.today()}. {ROWS:,} rows, "
        "answers log-normal (median 60 tokens, sigma 0.5) plus reasoning (median 120, "
        "sigma 0.6), priced as o4-mini ($1.10 / $0.275 cached / $4.40 per million).",
        "",
        f"## dry_run=True, pilot={PILOT} (1%), then the run",
        "",
        "| seed | low | expected | high | actual (run + pilot) | error | inside |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in piloted:
        lines.append(
            f"| {r.seed} | ${r.low:.3f} | ${r.expected:.3f} | ${r.high:.3f} | "
            f"${r.actual:.3f} | {r.error:+.1%} | {'yes' if r.inside else 'no'} |"
        )
    lines += [
        "",
        f"Within 15% and inside low-high: **{good} of {len(piloted)}** seeds (target: 9).",
        "",
        "## max_tokens=150, no pilot: the high bound",
        "",
        "| seed | high | actual |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r.seed} | ${r.high:.3f} | ${r.actual:.3f} |" for r in bounded]
    lines += ["", f"High bound never exceeded: **{'yes' if never_over else 'no'}**.", ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
