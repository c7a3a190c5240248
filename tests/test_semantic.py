"""Semantic operators: filter (with a cascade), join, top_k and aggregate, on the test server."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.core.endpoints._judge import Verdict, read_answer, read_score
from nbtoolkit.errors import ConfigError
from nbtoolkit.frame.semantic._filter import learn_threshold
from nbtoolkit.testing import ChatServer, EmbeddingBehaviour, SemanticRules

MARK = "<match>"


def _frame(rows: int, every: int = 3) -> pd.DataFrame:
    texts = [f"row {i} {MARK if i % every == 0 else ''}" for i in range(rows)]
    return pd.DataFrame({"text": texts}, index=pd.Index(range(1000, 1000 + rows), name="id"))


def _run(server: ChatServer, tmp_path: Path) -> dict[str, object]:
    return {
        "base_url": server.base_url,
        "api_key": "sk-semantic",
        "cache": str(tmp_path / "cache.sqlite3"),
        "progress": False,
        "max_parallel": 32,
    }


def _models(server: ChatServer) -> collections.Counter[str]:
    return collections.Counter(str(r.body.get("model")) for r in server.requests)


def test_filter_keeps_the_rows_answered_yes_in_order(tmp_path: Path) -> None:
    """filter over 2,000 rows: every decision right, same index and order as the frame."""
    frame = _frame(2000)
    with ChatServer(semantic=SemanticRules(marker=MARK)).run_in_thread() as server:
        out = frame.chat.filter(
            "Does it hold the mark? {text}", model="big", **_run(server, tmp_path)
        )
        assert server.request_count == 2000
    expected = frame[frame["text"].str.contains(MARK, regex=False)]
    pd.testing.assert_frame_equal(out, expected)
    assert "big decided every row" in nbtoolkit.last_run().summary()


def test_filter_mask_has_na_where_a_row_has_no_answer(tmp_path: Path) -> None:
    """keep="mask": a boolean per row, NA for a row with nothing to ask, and the report says why."""
    frame = pd.DataFrame({"text": ["a <match>", None, "b"]}, index=["x", "y", "z"])
    with ChatServer(semantic=SemanticRules(marker=MARK)).run_in_thread() as server:
        mask = frame.chat.filter("{text}", model="big", keep="mask", **_run(server, tmp_path))
        rows = frame.chat.filter("{text}", model="big", **_run(server, tmp_path))
    assert mask.dtype == "boolean"
    assert mask.tolist()[0] is True and mask.isna().tolist() == [False, True, False]
    assert list(rows.index) == ["x"]
    report = nbtoolkit.last_run()
    assert list(report.errors.index) == ["y"]
    assert "1 rows had no answer" in report.summary()


def test_cascade_asks_the_big_model_about_few_rows_and_agrees_with_it(tmp_path: Path) -> None:
    """With cheap_model, `model` answers <= 30% of 2,000 rows; agreement with it stays >= 97%."""
    frame = _frame(2000)
    rules = SemanticRules(marker=MARK, cheap_model="small", cheap_error_rate=0.1, seed=3)
    with ChatServer(semantic=rules).run_in_thread() as server:
        mask = frame.chat.filter(
            "{text}", model="big", cheap_model="small", keep="mask", **_run(server, tmp_path)
        )
        asked = _models(server)
    truth = frame["text"].str.contains(MARK, regex=False)
    agreement = float((mask.astype(bool) == truth).mean())
    assert agreement >= 0.97
    assert asked["big"] <= 0.30 * len(frame)
    assert asked["small"] == len(frame)
    summary = nbtoolkit.last_run().summary()
    assert "small decided" in summary and "big decided" in summary


def test_cascade_without_logprobs_sends_every_row_to_the_model(tmp_path: Path) -> None:
    """A cheap model whose server gives no logprobs decides nothing, and the summary says so."""
    frame = _frame(200)
    rules = SemanticRules(marker=MARK, cheap_model="small", logprobs=False)
    with ChatServer(semantic=rules).run_in_thread() as server:
        out = frame.chat.filter(
            "{text}", model="big", cheap_model="small", **_run(server, tmp_path)
        )
        asked = _models(server)
    assert len(out) == len(frame[frame["text"].str.contains(MARK, regex=False)])
    assert asked["big"] == len(frame)
    assert "no usable confidence" in nbtoolkit.last_run().summary()


def test_a_rerun_of_the_cascade_is_free(tmp_path: Path) -> None:
    """Every stage's answers are cached: the same filter again sends no request."""
    frame = _frame(300)
    rules = SemanticRules(marker=MARK, cheap_model="small")
    with ChatServer(semantic=rules).run_in_thread() as server:
        options = _run(server, tmp_path)
        first = frame.chat.filter("{text}", model="big", cheap_model="small", **options)
        sent = server.request_count
        again = frame.chat.filter("{text}", model="big", cheap_model="small", **options)
        assert server.request_count == sent
    pd.testing.assert_frame_equal(first, again)


def test_threshold_is_the_lowest_confidence_that_keeps_agreement() -> None:
    """Learned from labels: sure answers that agree set the bar; unsure wrong ones stay below it."""
    pairs = [(Verdict(True, 0.99), Verdict(True, None))] * 90
    pairs += [(Verdict(False, 0.6), Verdict(True, None))] * 10
    threshold, reached = learn_threshold(pairs, 0.98)
    assert threshold == 0.99 and reached == 1.0
    assert learn_threshold([(Verdict(True, None), Verdict(True, None))], 0.98)[0] == float("inf")


def test_answers_are_read_from_json_or_plain_words() -> None:
    """A server that ignores the schema and says "Yes." is understood; a number is a score."""
    assert read_answer('{"answer": false}') is False
    assert read_answer("Yes.") is True
    assert read_answer("maybe") is None
    assert read_score('{"score": 7.5}') == 7.5 and read_score("42") == 42.0
    assert read_score('{"score": "high"}') is None


def _pairs(rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    left = pd.DataFrame({"title": [f"item {i} [key={i}]" for i in range(rows)], "n": range(rows)})
    order = rng.permutation(rows)
    right = pd.DataFrame(
        {"name": [f"product {i} [key={i}]" for i in order], "n": order},
        index=pd.Index([f"r{i}" for i in range(rows)]),
    )
    return left, right


def test_join_finds_the_true_pairs_asking_about_few(tmp_path: Path) -> None:
    """1,000 x 1,000 rows, 1,000 true pairs: recall >= 0.95 asking about <= 3% of the pairs."""
    left, right = _pairs(1000)
    behaviour = EmbeddingBehaviour(topic=True, dimensions=16)
    with ChatServer(semantic=SemanticRules(), embeddings=behaviour).run_in_thread() as server:
        out = left.chat.join(
            right,
            "Same thing? {left.title} / {right.name}",
            model="big",
            embed_model="emb",
            candidates=10,
            **_run(server, tmp_path),
        )
        chats = [r for r in server.requests if r.path.endswith("/chat/completions")]
    found = set(zip(out["n_x"], out["n_y"], strict=True))
    recall = sum(1 for i in range(1000) if (i, i) in found) / 1000
    assert recall >= 0.95
    assert len(chats) <= 0.03 * 1000 * 1000
    assert (out["n_x"] == out["n_y"]).all()  # every pair kept is a true one
    assert {"left_index", "right_index", "title", "name", "similarity"} <= set(out.columns)
    assert set(out["right_index"]) <= set(right.index)


def test_the_cross_product_needs_an_explicit_limit(tmp_path: Path) -> None:
    """candidates="all" without max_pairs is a ConfigError before any request; with it, it runs."""
    left, right = _pairs(5)
    with ChatServer(semantic=SemanticRules()).run_in_thread() as server:
        with pytest.raises(ConfigError, match="max_pairs=25"):
            left.chat.join(
                right, "{left.title} {right.name}", candidates="all", **_run(server, tmp_path)
            )
        assert server.request_count == 0
        out = left.chat.join(
            right,
            "{left.title} {right.name}",
            candidates="all",
            max_pairs=25,
            model="big",
            **_run(server, tmp_path),
        )
        assert server.request_count == 25
    assert sorted(out["n_x"]) == list(range(5))


def test_join_template_fields_must_name_a_side() -> None:
    """A field without left./right., or a column the frame lacks, is a ConfigError naming it."""
    left, right = _pairs(2)
    with pytest.raises(ConfigError, match="must name a side"):
        left.chat.join(right, "{title} {right.name}", embed_model="e")
    with pytest.raises(ConfigError, match="'nope' not in the right frame"):
        left.chat.join(right, "{left.title} {right.nope}", embed_model="e")


def test_top_k_returns_the_best_rows_in_order(tmp_path: Path) -> None:
    """top_k(5): the five highest scores, best first, one request per row."""
    rng = np.random.default_rng(1)
    scores = rng.permutation(200)
    frame = pd.DataFrame({"text": [f"doc [score={s}]" for s in scores]})
    with ChatServer(semantic=SemanticRules()).run_in_thread() as server:
        best = frame.chat.top_k(5, "How good is {text}?", model="big", **_run(server, tmp_path))
        assert server.request_count == 200
    assert list(best["score"]) == [199.0, 198.0, 197.0, 196.0, 195.0]
    assert list(best.index) == [
        int(np.flatnonzero(scores == s)[0]) for s in (199, 198, 197, 196, 195)
    ]
    assert "method 'scores'" in nbtoolkit.last_run().summary()


def test_aggregate_reduces_far_past_the_context_and_reruns_free(tmp_path: Path) -> None:
    """5,000 rows, 20 x the context: one right answer per group, no request over it, re-run free."""
    rows = 5000
    groups = np.arange(rows) % 3
    text = [f"note {i} " + ("<match> " if i % 7 == 0 else "") + "x" * 20 for i in range(rows)]
    frame = pd.DataFrame({"text": text, "group": groups})
    context = sum(len(t) for t in text) // 4 // 20
    rules = SemanticRules(marker=MARK, context_tokens=context)
    with ChatServer(semantic=rules).run_in_thread() as server:
        options = _run(server, tmp_path)
        out = frame.chat.aggregate(
            "How many notes hold the mark in {text}?",
            by="group",
            model="big",
            context_tokens=context,
            max_tokens=20,
            **options,
        )
        assert not [r for r in server.requests if r.status == 400]
        sent = server.request_count
        again = frame.chat.aggregate(
            "How many notes hold the mark in {text}?",
            by="group",
            model="big",
            context_tokens=context,
            max_tokens=20,
            **options,
        )
        assert server.request_count == sent
    for group in range(3):
        expected = sum(1 for i in range(rows) if groups[i] == group and i % 7 == 0)
        assert out[group] == f"count={expected}"
    pd.testing.assert_series_equal(out, again)


def test_aggregate_of_the_whole_frame_is_one_answer(tmp_path: Path) -> None:
    """Without by=, one str."""
    frame = pd.DataFrame({"text": ["a <match>", "b", "c <match>"]})
    with ChatServer(semantic=SemanticRules(marker=MARK)).run_in_thread() as server:
        out = frame.chat.aggregate(
            "Count the marks in {text}", model="big", **_run(server, tmp_path)
        )
    assert out == "count=2"


@pytest.mark.parametrize("cheap", [None, "small"], ids=["one model", "cascade"])
def test_filter_dry_run_sends_nothing_and_prices_each_step(
    tmp_path: Path, cheap: str | None
) -> None:
    """dry_run=True: 0 requests; an estimate per step (three with a cascade) and their sum."""
    frame = _frame(300)
    prices = {"big": (2.5, 10.0), "small": (0.15, 0.6)}
    with ChatServer(semantic=SemanticRules(marker=MARK)).run_in_thread() as server:
        estimate = frame.chat.filter(
            "{text}",
            model="big",
            cheap_model=cheap,
            dry_run=True,
            prices=prices,
            **_run(server, tmp_path),
        )
        assert server.request_count == 0
    assert len(estimate.steps) == (1 if cheap is None else 3)
    assert estimate.steps[-1][1].to_send == (300 if cheap is None else 300 - 30)
    assert estimate.cost is not None and estimate.cost.expected > 0
    table = estimate.to_frame()
    assert set(table["step"]) == {name for name, _ in estimate.steps}
    assert "filter:" in repr(estimate) and "<b>OperatorEstimate</b>" in estimate._repr_html_()


def test_join_dry_run_shows_the_cross_product_before_refusing_it(tmp_path: Path) -> None:
    """candidates="all" with dry_run prices every pair and sends nothing; k candidates price
    both sides' embeddings and k pairs per left row."""
    left, right = _pairs(20)
    with ChatServer(semantic=SemanticRules()).run_in_thread() as server:
        options = {**_run(server, tmp_path), "model": "big"}
        every = left.chat.join(
            right, "{left.title} {right.name}", candidates="all", dry_run=True, **options
        )
        near = left.chat.join(
            right,
            "{left.title} {right.name}",
            embed_model="emb",
            candidates=3,
            dry_run=True,
            **options,
        )
        assert server.request_count == 0
    assert every.requests == 400 and "max_pairs=400" in " ".join(every.notes)
    assert [n for n, _ in near.steps][:2] == [
        "join, embeddings of the left rows",
        "join, embeddings of the right rows",
    ]
    assert near.steps[-1][1].to_send == 60
    assert every.cost is None and "price unknown" in every.headline()


def test_top_k_and_aggregate_dry_runs_send_nothing(tmp_path: Path) -> None:
    """top_k prices one score per row; aggregate prices its first level and bounds the rest."""
    frame = pd.DataFrame({"text": [f"note {i} " + "y" * 200 for i in range(400)]})
    with ChatServer(semantic=SemanticRules()).run_in_thread() as server:
        options = _run(server, tmp_path)
        scores = frame.chat.top_k(5, "{text}", model="big", dry_run=True, **options)
        reduce = frame.chat.aggregate(
            "Sum up {text}",
            model="big",
            context_tokens=2000,
            max_tokens=100,
            dry_run=True,
            **options,
        )
        assert server.request_count == 0
    assert scores.requests == 400
    first, above = reduce.steps
    assert first[1].to_send > 1 and above[1].to_send >= 1
    assert first[1].prompt_tokens.high is None or first[1].prompt_tokens.expected < 400 * 200


def test_a_series_filter_and_top_k_keep_the_series_name_and_dtype(tmp_path: Path) -> None:
    """series.chat.filter and top_k return the caller's Series' rows: its name, not "value"."""
    series = pd.Series(
        ["a <match>", "b", "c <match>"], index=[7, 7, 8], name="review", dtype="string"
    )
    with ChatServer(semantic=SemanticRules()).run_in_thread() as server:
        kept = series.chat.filter("{review}", model="big", **_run(server, tmp_path))
        best = series.chat.top_k(1, "How good is {value}?", model="big", **_run(server, tmp_path))
    pd.testing.assert_series_equal(kept, series.iloc[[0, 2]])
    assert best.name == "review" and best.dtype == "string" and len(best) == 1
