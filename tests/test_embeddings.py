"""df.chat.embed: batched /embeddings requests, vectors mapped by index, cached per text."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.core.endpoints._embeddings import EmbeddingEndpoint
from nbtoolkit.core.store._cache import ResponseCache, vectors_path
from nbtoolkit.testing import (
    ChatServer,
    EmbeddingBehaviour,
    FaultRates,
    Malformed,
    RecordedRequest,
    Status,
    expected_vector,
)
from tests.conftest import MODEL, settings


def report() -> nbtoolkit.RunReport:
    last = nbtoolkit.last_run()
    assert last is not None
    return last


def inputs(requests: list[RecordedRequest]) -> list[str]:
    """Every text the server was sent, in every request (failed ones too)."""
    return [text for r in requests for text in r.body["input"]]


def cache_file() -> Path:
    return Path(os.environ["NBTOOLKIT_CACHE_DIR"]) / "responses.sqlite3"


def texts(n: int, prefix: str = "text") -> list[str]:
    return [f"{prefix} {i}: a review of item {i}" for i in range(n)]


def assert_vectors(column: pd.Series, expected: list[str | None], dimensions: int = 8) -> None:
    """Each row holds the server's float32 vector for its text, or None where it has none."""
    assert len(column) == len(expected)
    for vector, text in zip(column, expected, strict=True):
        if text is None:
            assert vector is None
            continue
        assert isinstance(vector, np.ndarray)
        assert vector.dtype == np.float32
        np.testing.assert_array_equal(vector, expected_vector(text, dimensions))


def test_3000_rows_with_repeats_gaps_shuffled_replies_and_503s() -> None:
    """Every vector right and float32, each distinct text sent once, >= 20 texts a request."""
    rng = random.Random(7)
    column: list[str | None] = list(texts(2700))
    column += [rng.choice(column) for _ in range(300)]  # 10% repeated texts
    rng.shuffle(column)
    for position in (5, 500, 1500):
        column[position] = None
    column[2500] = "   "
    expected = [t if t is not None and t.strip() else None for t in column]
    frame = pd.DataFrame({"review": column})
    faults = FaultRates(server_error=0.05, server_error_status=503, seed=3)
    with ChatServer(faults=faults).run_in_thread() as server:
        out = frame.chat.embed("review", batch_size=64, **settings(server, max_parallel=8))
        seen = list(server.requests)
    assert_vectors(out["embedding"], expected)
    distinct = {t for t in expected if t is not None}
    assert set(server.answered) == distinct
    assert max(server.answered.values()) == 1
    assert server.statuses["503"] > 0  # the faults did happen, and were retried
    assert len(inputs(seen)) / len(seen) >= 20
    assert all(len(r.body["input"]) <= 64 for r in seen)
    assert report().summary().startswith(f"finished: {len(frame) - 4} ok, 0 failed, 4 skipped")
    pd.testing.assert_frame_equal(out[["review"]], frame)  # the caller's rows, untouched


def test_a_rerun_sends_nothing_and_new_rows_send_only_themselves(server: ChatServer) -> None:
    """The cache answers a re-run; a frame grown by 50 rows sends those 50 texts."""
    frame = pd.DataFrame({"review": texts(300)})
    first = frame.chat.embed("review", **settings(server))
    sent = server.request_count
    again = frame.chat.embed("review", **settings(server))
    assert server.request_count == sent
    assert report().stats.cache_hits == 300
    assert_vectors(again["embedding"], texts(300))
    for before, after in zip(first["embedding"], again["embedding"], strict=True):
        np.testing.assert_array_equal(before, after)
    assert all(v.flags.writeable for v in again["embedding"])  # cached vectors, too

    server.reset_records()
    grown = pd.DataFrame({"review": texts(300) + texts(50, prefix="new")})
    out = grown.chat.embed("review", **settings(server))
    assert sorted(inputs(server.requests)) == sorted(texts(50, prefix="new"))
    assert_vectors(out["embedding"], texts(300) + texts(50, prefix="new"))


def test_the_cache_keeps_float32_bytes_per_model_dimensions_and_text(server: ChatServer) -> None:
    """A vector is a BLOB of 4 bytes per dimension; another model or length is a new text."""
    frame = pd.DataFrame({"review": texts(3)})
    frame.chat.embed("review", dimensions=5, **settings(server))
    with contextlib.closing(sqlite3.connect(cache_file())) as db:
        text_rows = db.execute(
            "SELECT count(*) FROM responses UNION ALL SELECT count(*) FROM journal"
        ).fetchall()
        sizes = db.execute("SELECT record_size FROM vector_keys").fetchall()
    assert text_rows == [(0,), (0,)]
    assert sizes == [(34 + 32 + 20,)] * 3  # header, key, 5 float32s
    # The file: one record per text, its key and its vector's float32 bytes at the end.
    data = vectors_path(cache_file()).read_bytes()
    stored = {data[at + 66 : at + 86] for at in range(0, len(data), 86)}
    assert stored == {expected_vector(t, 5).tobytes() for t in texts(3)}
    frame.chat.embed("review", dimensions=5, **settings(server))
    assert server.request_count == 1
    frame.chat.embed("review", dimensions=6, **settings(server))
    frame.chat.embed("review", **settings(server, model="other-model"))
    assert server.request_count == 3


def test_a_vectors_file_that_cannot_be_written_costs_the_cache_not_the_run(
    server: ChatServer,
) -> None:
    """A full disk or an unwritable vectors file: one warning, every vector in the output."""
    frame = pd.DataFrame({"review": texts(40)})
    ResponseCache(cache_file()).close()
    vectors_path(cache_file()).mkdir()  # opening it for appending fails (IsADirectoryError)
    with pytest.warns(RuntimeWarning, match="response cache write failed"):
        out = frame.chat.embed("review", **settings(server))
    assert_vectors(out["embedding"], texts(40))
    vectors_path(cache_file()).rmdir()
    again = frame.chat.embed("review", **settings(server))  # nothing was kept: paid again
    assert_vectors(again["embedding"], texts(40))
    assert server.request_count == 2  # one batch of 40 each time


def test_the_request_body_is_what_openai_expects(server: ChatServer) -> None:
    """model, input as a list, encoding_format float; dimensions only when asked for."""
    pd.DataFrame({"t": ["a", "b"]}).chat.embed("t", **settings(server, cache=False))
    pd.DataFrame({"t": ["c"]}).chat.embed("t", dimensions=3, **settings(server, cache=False))
    # The server records a request once its reply is written: match them by content, not
    # by the order two quick calls happened to be recorded in.
    first, second = sorted((r.body for r in server.requests), key=lambda body: "dimensions" in body)
    assert first == {"model": MODEL, "input": ["a", "b"], "encoding_format": "float"}
    assert second == {"model": MODEL, "input": ["c"], "encoding_format": "float", "dimensions": 3}
    assert server.requests[0].headers["Content-Type"] == "application/json"


def test_batches_respect_batch_size_and_max_batch_tokens(server: ChatServer) -> None:
    """No request holds more than batch_size texts or more than max_batch_tokens (estimated)."""
    long_texts = [f"{i:04d} " + "x" * 395 for i in range(40)]  # about 100 tokens each
    frame = pd.DataFrame({"t": long_texts})
    frame.chat.embed("t", batch_size=16, max_batch_tokens=1_000, **settings(server, cache=False))
    sizes = [len(r.body["input"]) for r in server.requests]
    assert sum(sizes) == 40
    assert max(sizes) <= 9  # 9 x ~107 estimated tokens fit under 1,000; 10 would not
    server.reset_records()
    short = pd.DataFrame({"t": texts(40)})
    short.chat.embed("t", batch_size=16, **settings(server, cache=False))
    # Sorted: the three requests go out together and may arrive in any order.
    assert sorted(len(r.body["input"]) for r in server.requests) == [8, 16, 16]


def test_bad_inputs_fail_alone_with_the_servers_reason(server: ChatServer) -> None:
    """A 400 for one text splits its batch until it stands alone; the rest get vectors."""
    column = texts(100)
    column[13] = "this one has a <reject> in it"
    column[77] = "so does <reject> this one"
    out = pd.DataFrame({"t": column}).chat.embed("t", **settings(server, cache=False))
    expected = [None if "<reject>" in t else t for t in column]
    assert_vectors(out["embedding"], expected)
    errors = report().errors
    assert list(errors.index) == [13, 77]
    assert set(errors["error_kind"]) == {"BadRequestError"}
    assert all("contains '<reject>'" in message for message in errors["message"])
    # Every good text was answered exactly once, whatever the halving sent.
    assert max(server.answered.values()) == 1
    assert len(server.answered) == 98
    assert report().stats.items_per_request is None  # bad rows, not a size limit


def test_a_text_over_the_servers_length_limit_fails_alone() -> None:
    """A too-long input (the server's 400) fails its row only; its neighbours succeed."""
    column = [*texts(10), "y" * 500, *texts(5, prefix="after")]
    with ChatServer(embeddings=EmbeddingBehaviour(max_input_chars=200)).run_in_thread() as server:
        out = pd.DataFrame({"t": column}).chat.embed("t", **settings(server, cache=False))
    assert_vectors(out["embedding"], [None if len(t) > 200 else t for t in column])
    assert "too long: 500 characters" in report().errors.loc[10, "message"]


def test_a_server_that_caps_inputs_per_request_is_met_at_its_cap() -> None:
    """A server taking at most 32 texts a request (a 413 above, as text-embeddings-inference
    does): every row gets its vector, and once halves went through, requests stay that size."""
    column = texts(3000)
    behaviour = EmbeddingBehaviour(max_inputs=32)
    with ChatServer(embeddings=behaviour).run_in_thread() as server:
        frame = pd.DataFrame({"t": column})
        out = frame.chat.embed("t", **settings(server, cache=False, max_parallel=4))
    assert_vectors(out["embedding"], column)
    stats = report().stats
    assert 16 <= stats.items_per_request <= 32
    assert f"cut to {stats.items_per_request} rows each" in report().summary()
    refused = server.statuses["413"]
    # Each group first made at 2,048 (at most two before the cap is known, plus what the
    # producer queued meanwhile) is halved six times at most; every later request fits.
    assert 0 < refused <= 6 * (2 + 2 * 4)
    assert stats.requests_sent - refused <= len(column) / 16 + 1
    assert max(server.answered.values()) == 1  # no text answered twice


def test_per_token_vectors_are_mean_pooled() -> None:
    """A [tokens, d] answer per text (llama.cpp, unpooled) becomes the mean of its rows."""
    behaviour = EmbeddingBehaviour(per_token=True, dimensions=6)
    with ChatServer(embeddings=behaviour).run_in_thread() as server:
        out = pd.Series(texts(5)).chat.embed(**settings(server, cache=False))
    for vector, text in zip(out, texts(5), strict=True):
        assert vector.dtype == np.float32
        assert vector.shape == (6,)
        np.testing.assert_allclose(vector, expected_vector(text, 6), rtol=1e-6, atol=1e-6)


def test_a_reply_with_a_duplicate_index_is_malformed_and_retried(server: ChatServer) -> None:
    """Vectors that cannot be mapped back row for row are never guessed at: the batch retries."""
    bad = {
        "data": [
            {"index": 0, "embedding": [1.0, 2.0]},
            {"index": 0, "embedding": [3.0, 4.0]},
        ]
    }
    server.script(Malformed(json.dumps(bad)))
    out = pd.DataFrame({"t": ["a", "b"]}).chat.embed("t", **settings(server, cache=False))
    assert_vectors(out["embedding"], ["a", "b"])
    assert server.statuses["malformed"] == 1
    assert report().stats.retries == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}], "two vectors"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 2, "embedding": [2.0]}], "no valid index"),
        ([{"index": 0, "embedding": [1.0]}], "2 texts sent, 1 vectors received"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": "x"}], "not a list"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": []}], "shape"),
        ([{"index": 0, "embedding": [1.0]}, {"embedding": [2.0]}], "no valid index"),
    ],
)
def test_parse_refuses_replies_it_cannot_map_back(data: list[object], message: str) -> None:
    """A missing, duplicate or out-of-range index, or a bad vector, fails the whole reply."""
    endpoint = EmbeddingEndpoint(model="m")
    items = [endpoint.item(0, "a"), endpoint.item(1, "b")]
    with pytest.raises(nbtoolkit.MalformedResponse, match=message):
        endpoint.parse(json.dumps({"data": data}), items)


def test_parse_maps_vectors_back_by_index() -> None:
    """Data in reverse order lands in the right rows; the usage is the request's."""
    endpoint = EmbeddingEndpoint(model="m")
    items = [endpoint.item(0, "a"), endpoint.item(1, "b")]
    reply = {
        "data": [{"index": 1, "embedding": [2.0, 2.5]}, {"index": 0, "embedding": [1.0, 1.5]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    parsed = endpoint.parse(json.dumps(reply), items)
    values = [outcome.value for outcome in parsed.outcomes]  # type: ignore[union-attr]
    np.testing.assert_array_equal(values, [[1.0, 1.5], [2.0, 2.5]])
    assert parsed.usage == {"prompt_tokens": 4, "total_tokens": 4}
    decoded = endpoint.decode(parsed.outcomes[1].stored)  # type: ignore[union-attr]
    np.testing.assert_array_equal(decoded, [2.0, 2.5])
    assert decoded.dtype == np.float32
    # A server that sends no index at all answers in input order, as the API specifies.
    unnumbered = {"data": [{"embedding": [1.0, 1.5]}, {"embedding": [2.0, 2.5]}]}
    parsed = endpoint.parse(json.dumps(unnumbered), items)
    values = [outcome.value for outcome in parsed.outcomes]  # type: ignore[union-attr]
    np.testing.assert_array_equal(values, [[1.0, 1.5], [2.0, 2.5]])


def test_keys_are_the_canonical_json_of_model_dimensions_and_text() -> None:
    """The key material is encode_body's bytes, built without it for speed: the same bytes
    for any text and any model name (quotes, escapes, non-ASCII), so caches stay valid."""
    from nbtoolkit.core.store._cache import encode_body

    cases = (("m", None, {}), ('a"input":""b', 1024, {}), ("é0", 7, {"input_type": 'q"x'}))
    for model, dimensions, params in cases:
        endpoint = EmbeddingEndpoint(model=model, dimensions=dimensions, params=params)
        for text in ("hi", 'é "q" \\ \n\t\x01 \u2028 😀', "", "{}"):
            item = endpoint.item(0, text)
            body = {**params, "model": model, "dimensions": dimensions, "input": text}
            assert item.payload == encode_body(body)
            assert item.prompt_tokens == len(text) / 4 + 7


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"column": "nope"}, "column 'nope' not found"),
        ({"column": "t", "batch_size": 0}, "batch_size must be"),
        ({"column": "t", "dimensions": -3}, "dimensions must be"),
        ({"column": "t", "dimensions": 2.5}, "dimensions must be"),
        ({"column": "t", "max_batch_tokens": 0}, "max_batch_tokens must be"),
        ({"column": "t", "output": ""}, "output must be"),
        ({"column": "t", "max_parallel": 0}, "max_parallel must be"),
        ({}, "say what to send"),
    ],
)
def test_bad_arguments_are_config_errors_before_any_request(
    server: ChatServer, call: dict[str, object], message: str
) -> None:
    """A wrong column or option raises ConfigError and sends nothing."""
    frame = pd.DataFrame({"t": ["a", "b"]})
    with pytest.raises(nbtoolkit.ConfigError, match=message):
        frame.chat.embed(**call, **settings(server))  # type: ignore[arg-type]
    assert server.request_count == 0


def test_no_model_is_a_config_error(server: ChatServer) -> None:
    """Without a model anywhere, embed says so before sending."""
    with pytest.raises(nbtoolkit.ConfigError, match="no model"):
        pd.DataFrame({"t": ["a"]}).chat.embed("t", **settings(server, model=None))
    assert server.request_count == 0


def test_series_embed_returns_a_series_on_the_same_index(server: ChatServer) -> None:
    """series.chat.embed gives a Series of vectors, same index; output= names it."""
    series = pd.Series(["a", None, "c"], index=[10, 20, 30], name="review")
    out = series.chat.embed(**settings(server))
    assert isinstance(out, pd.Series)
    assert list(out.index) == [10, 20, 30]
    assert out.name is None
    assert_vectors(out, ["a", None, "c"])
    assert series.chat.embed(output="vec", **settings(server)).name == "vec"
    templated = series.chat.embed(template="Review: {review}", **settings(server))
    assert_vectors(templated, ["Review: a", None, "Review: c"])


async def test_aembed_in_a_running_loop() -> None:
    """aembed is awaitable and gives the same vectors as embed."""
    async with ChatServer() as server:
        out = await pd.DataFrame({"t": texts(30)}).chat.aembed(
            "t", output="vec", **settings(server)
        )
    assert_vectors(out["vec"], texts(30))


def test_to_matrix_lines_up_with_the_frame(server: ChatServer) -> None:
    """An (n, d) float32 matrix, NaN rows where a row has no vector."""
    out = pd.DataFrame({"t": ["a", None, "b", ""]}).chat.embed("t", **settings(server))
    matrix = nbtoolkit.to_matrix(out["embedding"])
    assert matrix.shape == (4, 8)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[0], expected_vector("a"))
    np.testing.assert_array_equal(matrix[2], expected_vector("b"))
    assert np.isnan(matrix[[1, 3]]).all()
    assert nbtoolkit.to_matrix([None, float("nan")], dimensions=3).shape == (2, 3)
    assert nbtoolkit.to_matrix([]).shape == (0, 0)
    with pytest.raises(nbtoolkit.ConfigError, match="row 1 has 2 dimensions, earlier rows 3"):
        nbtoolkit.to_matrix([np.zeros(3), np.zeros(2)])
    with pytest.raises(nbtoolkit.ConfigError, match="not a 1-D vector"):
        nbtoolkit.to_matrix([np.zeros((2, 2))])


def test_tokens_count_against_the_token_budget(server: ChatServer) -> None:
    """max_tokens_total stops sending once the estimate would pass it; a group larger than
    what is left goes as the rows that fit."""
    frame = pd.DataFrame({"t": texts(100)})
    out = frame.chat.embed("t", batch_size=10, max_tokens_total=200, **settings(server))
    stats = report().stats
    embedded = int(out["embedding"].notna().sum())
    assert 0 < stats.requests_sent < 10
    assert stats.prompt_tokens <= 200
    assert (report().rows["status"] == "over_budget").sum() == 100 - embedded
    sizes = [len(r.body["input"]) for r in server.requests]
    assert sum(sizes) == embedded  # every row sent was answered, once
    assert min(sizes) < 10  # a group was cut to fit


def test_a_budget_smaller_than_one_group_embeds_until_it_is_spent(server: ChatServer) -> None:
    """max_tokens_total=50,000 at the default batch size, where one group's estimate is
    larger: the group is cut to fit, and rows are embedded until the budget is spent."""
    frame = pd.DataFrame(
        {"t": [f"{i:05d} " + "a fairly short review text " * 4 for i in range(3000)]}
    )
    one_row = len(frame["t"].iloc[0]) / 4 + 7  # the estimate the budget reserves per text
    assert 2048 * one_row > 50_000  # the default group alone would not fit
    out = frame.chat.embed("t", max_tokens_total=50_000, **settings(server))
    stats = report().stats
    embedded = int(out["embedding"].notna().sum())
    assert embedded == sum(server.answered.values())
    assert embedded > 1_000
    assert (report().rows["status"] == "over_budget").sum() == 3000 - embedded
    # Spent, and never passed: refused only when not even one more row fitted.
    assert 50_000 - one_row < stats.prompt_tokens <= 50_000


def test_a_systemic_failure_aborts_with_the_reason(server: ChatServer) -> None:
    """A 401 on a batch stops the run at once: every row would fail the same way."""
    server.script(Status(401, message="bad key"))
    with pytest.raises(nbtoolkit.RunAborted, match="bad key"):
        pd.DataFrame({"t": texts(10)}).chat.embed("t", **settings(server))


def test_a_server_that_ignores_dimensions_stops_the_run_and_caches_nothing() -> None:
    """Asked for 4 dimensions, a server sends 8: silent wrong lengths, cached under the
    wrong key, for every row. The run stops at the first reply, saying what to do."""
    behaviour = EmbeddingBehaviour(ignore_dimensions=True, dimensions=8)
    frame = pd.DataFrame({"t": texts(200)})
    with ChatServer(embeddings=behaviour).run_in_thread() as server:
        with pytest.raises(nbtoolkit.RunAborted, match="asked for 4 dimensions") as raised:
            frame.chat.embed("t", dimensions=4, batch_size=10, **settings(server, max_parallel=4))
        assert server.request_count <= 4  # the batches in flight at once, at most
        assert "leave dimensions= out" in str(raised.value)
        assert isinstance(raised.value.cause, nbtoolkit.IgnoredParameter)
        out = frame.chat.embed("t", batch_size=10, **settings(server))  # without: fine
    assert_vectors(out["embedding"], texts(200))
    assert report().stats.cache_hits == 0  # nothing of the stopped run was kept


CHILD = """
import os, sys
import pandas as pd
import nbtoolkit
rows = int(sys.argv[1])
df = pd.DataFrame({"t": [f"text {i}" for i in range(rows)]})
out = df.chat.embed("t", model="test-model", base_url=os.environ["URL"], batch_size=10,
                    max_parallel=1, progress=False)
print("filled", int(out["embedding"].notna().sum()), flush=True)
"""


def test_a_killed_run_resumes_where_it_stopped() -> None:
    """A run killed with SIGKILL midway, run again, sends only the texts with no vector."""
    with ChatServer(latency=0.1).run_in_thread() as server:
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILD), "300"],
            env={**os.environ, "URL": server.base_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60  # the child imports pandas first: slow on a busy box
        while sum(server.answered.values()) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Kill while the one request in flight sleeps on the server, so no reply is caught
        # between the server's write and the client's commit (that one would be paid twice).
        while time.monotonic() < deadline:
            last = max((r.finished for r in server.requests if r.finished), default=0.0)
            if server.in_flight == 1 and time.monotonic() - last > 0.03:
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        paid_before = sum(server.answered.values())
        assert 50 <= paid_before < 300

        column = [f"text {i}" for i in range(300)]
        out = pd.DataFrame({"t": column}).chat.embed(
            "t", model=MODEL, base_url=server.base_url, batch_size=10, progress=False
        )
    assert_vectors(out["embedding"], column)
    assert len(server.answered) == 300
    # At most the one batch in flight at the kill is paid twice: on a loaded machine its
    # reply can reach the client between the server's write and the client's commit.
    paid_twice = sum(n - 1 for n in server.answered.values())
    assert paid_twice in (0, 10)
    assert report().stats.cache_hits == paid_before - paid_twice


SHARING_CHILD = """
import os, sys
import pandas as pd
import nbtoolkit
first, count = int(sys.argv[1]), int(sys.argv[2])
df = pd.DataFrame({"t": [f"text {i}" for i in range(first, first + count)]})
out = df.chat.embed("t", model="test-model", base_url=os.environ["URL"], batch_size=25,
                    max_parallel=4, progress=False)
print("filled", sum(v is not None for v in out["embedding"]), flush=True)
"""


def test_two_processes_embedding_into_one_cache_leave_every_vector_readable() -> None:
    """Two runs appending vectors to one cache file at once (notebooks, Dask workers): both
    finish, and afterwards every vector is found, intact, with nothing sent again."""
    with ChatServer(latency=0.005).run_in_thread() as server:
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(SHARING_CHILD), str(first), "600"],
                env={**os.environ, "URL": server.base_url},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for first in (0, 300)  # texts 300-599 are embedded by both
        ]
        for run in runs:
            stdout, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stderr
            assert "filled 600" in stdout
        sent_before = server.request_count
        column = [f"text {i}" for i in range(900)]
        out = pd.DataFrame({"t": column}).chat.embed(
            "t", model=MODEL, base_url=server.base_url, progress=False
        )
        assert server.request_count == sent_before  # all 900 from the cache
    assert_vectors(out["embedding"], column)
    assert report().stats.cache_hits == 900
    with contextlib.closing(sqlite3.connect(cache_file())) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
