"""The bill before it is paid, from a frame: dry_run on every method, the pilot, live cost."""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.testing import ChatServer, CompletionLengths, RateLimit

from .conftest import MODEL, settings

PRICES = {MODEL: (1.1, 0.275, 4.4)}
SYSTEM = "Answer as a careful analyst would, in one paragraph. " * 4


@pytest.fixture
def sized() -> Any:
    """A test server whose answers vary in length by row, with reasoning tokens."""
    lengths = CompletionLengths(median=40, sigma=0.5, reasoning_median=60, seed=2)
    with ChatServer(lengths=lengths).run_in_thread() as running:
        yield running


def reviews(rows: int) -> pd.DataFrame:
    text = [f"review {i}: " + "solid and cheap " * (i % 9) for i in range(rows)]
    return pd.DataFrame({"review": text}, index=range(100, 100 + rows))


def report() -> nbtoolkit.RunReport:
    found = nbtoolkit.last_run()
    assert found is not None
    return found


def test_a_dry_run_returns_an_estimate_and_sends_nothing(sized: ChatServer) -> None:
    """complete(dry_run=True) sends 0 requests and shows rows, tokens, cost and time."""
    df = reviews(40)
    estimate = df.chat.complete(
        "review", system=SYSTEM, dry_run=True, prices=PRICES, **settings(sized)
    )
    assert sized.request_count == 0
    assert isinstance(estimate, nbtoolkit.CostEstimate)
    assert estimate.to_send == 40 and estimate.rows == 40
    assert estimate.cost is not None and estimate.cost.high is None  # no max_tokens: no bound
    table = estimate.to_frame()
    assert list(table.columns) == ["low", "expected", "high", "how"]
    assert table.loc["rows_to_send", "expected"] == 40
    assert table.loc["cost", "expected"] == pytest.approx(estimate.cost.expected)
    assert table.loc["shared_prompt_tokens_per_row", "expected"] >= len(SYSTEM) / 4
    for shown in (str(estimate), estimate._repr_html_()):
        assert "rows to send" in shown and "completion tokens" in shown
        assert "pass pilot=20" in shown  # completion lengths are a guess, and it says so


@pytest.mark.parametrize(
    ("method", "arguments"),
    [
        ("complete", {}),
        ("extract", {"schema": {"stars": int}}),
        ("classify", {"labels": ["good", "bad"]}),
        ("embed", {}),
        ("submit_batch", {}),
    ],
)
def test_every_method_has_a_dry_run(
    sized: ChatServer, method: str, arguments: dict[str, Any]
) -> None:
    """Each method's dry_run=True returns a CostEstimate and the server sees no request."""
    estimate = getattr(reviews(12).chat, method)(
        "review", dry_run=True, prices=PRICES, **arguments, **settings(sized)
    )
    assert isinstance(estimate, nbtoolkit.CostEstimate)
    assert estimate.to_send == 12
    assert sized.request_count == 0
    if method == "embed":
        assert estimate.completion_tokens.high == 0
    if method == "submit_batch":
        assert estimate.batch and "Batch at 0.5" in str(estimate)


def test_a_dry_run_counts_cache_hits_and_duplicates(sized: ChatServer) -> None:
    """Rows the cache answers and repeated rows are not counted as rows to send."""
    df = reviews(10)
    df.head(4).chat.complete("review", **settings(sized))
    sized.reset_records()
    doubled = pd.concat([df, df.tail(2)], ignore_index=True)
    estimate = doubled.chat.complete("review", dry_run=True, **settings(sized))
    assert sized.request_count == 0
    assert estimate.to_send == 6
    assert estimate.skipped == {"cache": 4, "duplicate": 2}


def test_the_pilot_is_paid_once_and_the_run_checks_the_estimate(
    sized: ChatServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pilot's rows are cache hits in the run; the report prices every row and compares
    the cost with the estimate; the bar shows spent and projected money."""
    df = reviews(300)
    options = settings(sized, prices=PRICES, max_tokens=400)
    estimate = df.chat.complete("review", dry_run=True, pilot=15, **options)
    assert sized.request_count == 15
    assert estimate.pilot is not None and estimate.pilot.cost is not None
    assert "pilot (paid)" in str(estimate)
    sized.reset_records()
    df.chat.complete("review", **{**options, "progress": True})
    run = report()
    assert run.stats.cache_hits == 15
    assert sized.request_count == 285
    assert len(sized.answered) == 285  # none of the pilot's prompts was sent again
    costs = run.rows["cost"]
    assert (costs[run.rows["source"] == "cache"] == 0).all()
    assert (costs[run.rows["source"] == "api"] > 0).all()
    assert run.stats.cost == pytest.approx(costs.sum())
    assert run.estimate is estimate and run.estimate_error is not None
    assert abs(run.estimate_error) < 0.5
    assert "estimated ~$" in run.summary() and "with the pilot" in run.summary()
    assert " of ~$" in capsys.readouterr().err  # the bar: "$0.42 of ~$3.10"


def test_an_unknown_price_is_never_zero(
    sized: ChatServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a price: "price unknown" in the estimate, on the bar and in the summary."""
    df = reviews(5)
    estimate = df.chat.complete("review", dry_run=True, **settings(sized))
    assert estimate.cost is None and "price unknown" in str(estimate)
    assert pd.isna(estimate.to_frame().loc["cost", "expected"])
    df.chat.complete("review", **settings(sized, progress=True))
    assert "cost: price unknown" in capsys.readouterr().err
    assert "cost price unknown" in report().summary()
    assert report().rows["cost"].isna().all()


def test_a_run_heading_past_max_cost_is_told_once_and_early(sized: ChatServer) -> None:
    """An estimate over max_cost warns once as the run starts, long before the limit."""
    df = reviews(200)
    options = settings(sized, prices=PRICES, max_tokens=400)
    estimate = df.chat.complete("review", dry_run=True, pilot=10, **options)
    assert estimate.cost is not None
    limit = estimate.cost.expected / 3
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        df.chat.complete("review", max_cost=limit, **options)
    told = [w for w in seen if "over max_cost" in str(w.message)]
    assert len(told) == 1
    assert "the dry run's estimate" in str(told[0].message)
    rows = report().rows
    assert (rows["status"] == "over_budget").any()
    assert report().stats.cost is not None and report().stats.cost <= limit


def test_without_a_pilot_answer_lengths_come_from_the_cache(sized: ChatServer) -> None:
    """Earlier answers of the same model in the cache give the completion estimate."""
    reviews(30).chat.complete("review", **settings(sized))
    sized.reset_records()
    fresh = pd.DataFrame({"review": [f"another review {i}" for i in range(50)]})
    estimate = fresh.chat.complete("review", dry_run=True, prices=PRICES, **settings(sized))
    assert sized.request_count == 0
    assert "learned from 30 earlier answers" in estimate.completion_basis
    per_row = estimate.completion_tokens.expected / 50
    assert 40 < per_row < 200  # the server's answers: a median of 40 + 60 reasoning tokens


def test_the_wall_time_follows_the_servers_limit() -> None:
    """A pilot that meets rate headers times the rest at the server's own limit: its burst at
    once, the rest at its rate (measured: 31 s for this run, estimated 29 s)."""
    with ChatServer(rate_limit=RateLimit(5.0, 50)).run_in_thread() as server:
        estimate = reviews(205).chat.complete(
            "review", dry_run=True, pilot=5, **settings(server, max_parallel=8)
        )
    assert "the server's requests limit" in estimate.wall_basis
    assert estimate.wall_seconds == pytest.approx((200 - 50) / 5, rel=0.2)


def test_an_estimate_serves_only_its_own_kind_of_run(sized: ChatServer) -> None:
    """extract's dry run is not the estimate a later complete on the same frame starts from."""
    df = reviews(6)
    df.chat.extract("review", schema={"stars": int}, dry_run=True, **settings(sized))
    df.chat.complete("review", **settings(sized))
    assert report().estimate is None
    estimate = df.chat.complete("review", dry_run=True, **settings(sized))
    df.chat.complete("review", **settings(sized))
    assert report().estimate is estimate


def test_pilot_needs_dry_run(sized: ChatServer) -> None:
    """pilot= without dry_run=True is a ConfigError, before anything is sent."""
    with pytest.raises(nbtoolkit.ConfigError, match="dry_run=True"):
        reviews(3).chat.complete("review", pilot=2, **settings(sized))
    assert sized.request_count == 0


def test_a_dask_frame_has_a_dry_run(sized: ChatServer) -> None:
    """ddf.chat.complete(dry_run=True) estimates every partition's rows and sends nothing."""
    dd = pytest.importorskip("dask.dataframe")
    ddf = dd.from_pandas(reviews(30), npartitions=3)
    estimate = ddf.chat.complete("review", dry_run=True, prices=PRICES, **settings(sized))
    assert isinstance(estimate, nbtoolkit.CostEstimate)
    assert estimate.to_send == 30
    assert sized.request_count == 0


def test_a_run_stopped_by_its_budget_is_not_compared_with_the_estimate(
    sized: ChatServer,
) -> None:
    """A run that max_cost stopped short was not the run the estimate priced: no error figure,
    and the summary says how many rows were not sent instead of "+2900%, outside the range"."""
    df = reviews(60)
    options = settings(sized, prices=PRICES, max_tokens=400)
    estimate = df.chat.complete("review", dry_run=True, pilot=5, **options)
    assert estimate.cost is not None
    limit = estimate.cost.expected / 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the early "heading over max_cost" line
        df.chat.complete("review", max_cost=limit, **options)
    run = report()
    unsent = int(run.rows["status"].eq("over_budget").sum())
    assert unsent > 0
    assert run.estimate is estimate and run.estimate_error is None
    assert f"not compared: {unsent:,} rows were not sent" in run.summary()
    assert "the range" not in run.summary()


def test_the_pilot_shows_a_bar_of_its_own_rows(
    sized: ChatServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pilot sends real requests (seconds each against a slow model): it shows a bar of
    its rows, as a run does; none with progress=False."""
    df = reviews(60)
    df.chat.complete("review", dry_run=True, pilot=12, **settings(sized, progress=True))
    err = capsys.readouterr().err
    assert "pilot" in err and "12/12" in err, err
    df.head(30).chat.complete("review", dry_run=True, pilot=6, **settings(sized, progress=False))
    assert "pilot" not in capsys.readouterr().err
    assert sized.request_count == 18
