"""df.chat / series.chat against a real server: shapes, alignment, and every kind of bad input."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.testing import ChatServer, Reply, Status
from tests.conftest import MODEL, settings


def reviews(n: int) -> pd.DataFrame:
    return pd.DataFrame({"review": [f"review number {i}" for i in range(n)], "stars": range(n)})


def test_returns_new_frame_with_answers_in_row_order(server: ChatServer) -> None:
    """The output is a new frame, same index and order, answers as an object column."""
    df = reviews(20).set_index(pd.Index([f"r{i}" for i in range(20)][::-1]))
    before = df.copy()
    out = df.chat.complete("review", **settings(server))
    pd.testing.assert_frame_equal(df, before)  # the caller's frame is untouched
    assert "response" not in df.columns
    assert list(out.index) == list(df.index)
    assert out["response"].dtype == object
    assert out["response"].tolist() == [f"echo: {text}" for text in df["review"]]
    assert server.request_count == 20


def test_answers_stay_aligned_when_replies_arrive_out_of_order(server: ChatServer) -> None:
    """Random per-row latency reorders replies; each row still gets its own answer."""
    df = reviews(60)
    rng = random.Random(7)
    for text in df["review"]:
        server.script(Reply(latency=rng.uniform(0, 0.05)), prompt=text)
    out = df.chat.complete("review", **settings(server, max_parallel=16))
    assert (out["response"] == "echo: " + df["review"]).all()
    assert max(server.answered.values()) == 1


def test_series_in_series_out(server: ChatServer) -> None:
    """series.chat.complete returns a Series with the series' index."""
    s = pd.Series(["a", "b", "c"], index=[10, 20, 30], name="text")
    out = s.chat.complete(**settings(server))
    assert isinstance(out, pd.Series)
    assert out.to_dict() == {10: "echo: a", 20: "echo: b", 30: "echo: c"}


def test_template_system_and_params_reach_the_server(server: ChatServer) -> None:
    """A template fills from columns; system and extra params go into the request body."""
    df = reviews(3)
    df.chat.complete(
        template="Classify {review} ({stars} stars)",
        system="Answer in one word.",
        temperature=0,
        max_tokens=5,
        seed=1,
        **settings(server),
    )
    bodies = sorted((r.body for r in server.requests), key=lambda b: b["messages"][1]["content"])
    assert bodies[0]["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Classify review number 0 (0 stars)"},
    ]
    assert {(b["temperature"], b["max_tokens"], b["seed"], b["model"]) for b in bodies} == {
        (0, 5, 1, MODEL)
    }


async def test_acomplete_in_a_running_loop(aserver: ChatServer) -> None:
    """await df.chat.acomplete works on the caller's loop and gives the same frame."""
    df = reviews(5)
    out = await df.chat.acomplete("review", **settings(aserver))
    assert out["response"].tolist() == [f"echo: {t}" for t in df["review"]]


def test_missing_column_lists_the_columns(server: ChatServer) -> None:
    """A wrong column name raises ConfigError naming the columns; nothing is sent."""
    with pytest.raises(
        nbtoolkit.ConfigError, match=r"'reveiw' not found; columns are \['review', 'stars'\]"
    ):
        reviews(3).chat.complete("reveiw", **settings(server))
    assert server.request_count == 0


def test_template_naming_a_missing_column(server: ChatServer) -> None:
    """A template field that is not a column raises ConfigError before sending."""
    with pytest.raises(nbtoolkit.ConfigError, match="'title' not found"):
        reviews(3).chat.complete(template="Summarise {title}", **settings(server))
    with pytest.raises(nbtoolkit.ConfigError, match="must name columns"):
        reviews(3).chat.complete(template="Summarise {}", **settings(server))
    assert server.request_count == 0


def test_missing_and_blank_prompts_send_nothing(server: ChatServer) -> None:
    """NaN, None, pd.NA and blank strings give None with status 'skipped', and no request."""
    df = pd.DataFrame({"review": ["good", None, np.nan, "", "   ", pd.NA, "bad"]}, dtype=object)
    out = df.chat.complete("review", **settings(server))
    assert out["response"].tolist() == ["echo: good", None, None, None, None, None, "echo: bad"]
    assert server.request_count == 2
    rows = nbtoolkit.last_run().rows  # type: ignore[union-attr]
    assert rows["status"].tolist() == ["ok"] + ["skipped"] * 5 + ["ok"]


def test_template_with_a_missing_value_skips_the_row(server: ChatServer) -> None:
    """A template row with a NaN field is skipped rather than sent as 'nan'."""
    df = pd.DataFrame({"a": ["x", None], "b": [1.0, 2.0]})
    out = df.chat.complete(template="{a} and {b}", **settings(server))
    assert out["response"].tolist() == ["echo: x and 1.0", None]
    assert server.request_count == 1


def test_non_string_values_are_sent_as_their_str(server: ChatServer) -> None:
    """Numbers and booleans are sent as str(value)."""
    df = pd.DataFrame({"v": [3, 2.5, True]}, dtype=object)
    out = df.chat.complete("v", **settings(server))
    assert out["response"].tolist() == ["echo: 3", "echo: 2.5", "echo: True"]


def test_empty_frame_adds_the_column_and_sends_nothing(server: ChatServer) -> None:
    """An empty frame returns an empty frame with the new column; no request."""
    out = reviews(0).chat.complete("review", **settings(server))
    assert list(out.columns) == ["review", "stars", "response"]
    assert len(out) == 0
    assert server.request_count == 0


def test_duplicate_index_keeps_rows_apart(server: ChatServer) -> None:
    """Rows sharing an index label each get their own answer, and so does their report row."""
    df = pd.DataFrame({"review": ["a", "b", "c"]}, index=[1, 1, 1])
    server.script(Status(400, message="too long"), prompt="b")
    out = df.chat.complete("review", **settings(server))
    assert out["response"].tolist() == ["echo: a", None, "echo: c"]
    rows = nbtoolkit.last_run().rows  # type: ignore[union-attr]
    assert rows.index.tolist() == [1, 1, 1]
    assert rows["error_kind"].tolist() == [None, "BadRequestError", None]


def test_multiindex_is_kept(server: ChatServer) -> None:
    """A MultiIndex frame comes back with the same MultiIndex."""
    index = pd.MultiIndex.from_tuples([("x", 1), ("x", 2), ("y", 1)], names=["g", "n"])
    df = pd.DataFrame({"review": ["a", "b", "c"]}, index=index)
    out = df.chat.complete("review", **settings(server))
    assert out.index.equals(index)
    assert out.loc[("y", 1), "response"] == "echo: c"


def test_categorical_column_sends_labels(server: ChatServer) -> None:
    """A categorical column sends its labels; a missing category is skipped."""
    df = pd.DataFrame({"review": pd.Categorical(["good", "bad", None, "good"])})
    out = df.chat.complete("review", **settings(server))
    assert out["response"].tolist() == ["echo: good", "echo: bad", None, "echo: good"]
    assert server.request_count == 2  # the two "good" rows share one request


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8"])
def test_max_parallel_must_be_a_positive_integer(server: ChatServer, bad: object) -> None:
    """max_parallel < 1 or not an int raises ConfigError before sending."""
    with pytest.raises(nbtoolkit.ConfigError, match="max_parallel must be an integer >= 1"):
        reviews(2).chat.complete("review", **settings(server, max_parallel=bad))
    assert server.request_count == 0


def test_model_is_required(server: ChatServer) -> None:
    """Without a model anywhere, the call says how to give one."""
    with pytest.raises(nbtoolkit.ConfigError, match="no model"):
        reviews(2).chat.complete("review", **settings(server, model=None))


def test_column_or_template_but_not_both(server: ChatServer) -> None:
    """Naming nothing to send, or both a column and a template, is a ConfigError."""
    with pytest.raises(nbtoolkit.ConfigError, match="say what to send"):
        reviews(2).chat.complete(**settings(server))
    with pytest.raises(nbtoolkit.ConfigError, match="not both"):
        reviews(2).chat.complete("review", template="{review}", **settings(server))


def test_output_column_name_and_replacement(server: ChatServer) -> None:
    """output= names the column; an existing column of that name is replaced in the copy."""
    df = reviews(2).assign(label="old")
    out = df.chat.complete("review", output="label", **settings(server))
    assert out["label"].tolist() == ["echo: review number 0", "echo: review number 1"]
    assert df["label"].tolist() == ["old", "old"]


def test_failed_row_reason_is_kept_and_aligned(server: ChatServer) -> None:
    """A row that fails is None, and last_run() says why, at that row's index label."""
    df = reviews(4).set_index(pd.Index(list("wxyz")))
    server.script(*[Status(500)] * 10, prompt="review number 2")
    out = df.chat.complete("review", **settings(server))
    assert out["response"].isna().tolist() == [False, False, True, False]
    report = nbtoolkit.last_run()
    assert report is not None and report.outcome == "finished"
    error = report.errors.loc["y"]
    assert error["status"] == "failed"
    assert error["error_kind"] == "ServerError"
    assert error["http_status"] == 500
    assert error["attempts"] == 4  # FAST_RETRY.attempts
    assert "HTTP 500" in error["message"]
    assert list(report.errors.index) == ["y"]
    assert "3 ok, 1 failed" in report.summary()


def test_config_object_and_configure(server: ChatServer) -> None:
    """nbtoolkit.configure sets defaults; a config= object and call arguments override them."""
    nbtoolkit.configure(base_url=server.base_url, model="from-configure", progress=False)
    reviews(1).chat.complete("review", retry=1)
    config = nbtoolkit.ChatConfig(base_url=server.base_url, model="from-object", progress=False)
    reviews(1).chat.complete("review", config=config)
    reviews(1).chat.complete("review", config=config, model="from-call")
    assert [r.body["model"] for r in server.requests] == [
        "from-configure",
        "from-object",
        "from-call",
    ]


def test_environment_variables_give_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPENAI_BASE_URL and OPENAI_API_KEY are read when nothing else is given."""
    with ChatServer(api_key="sk-env-key-1234").run_in_thread() as keyed:
        monkeypatch.setenv("OPENAI_BASE_URL", keyed.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-1234")
        out = reviews(2).chat.complete("review", model=MODEL, progress=False)
    assert out["response"].notna().all()
