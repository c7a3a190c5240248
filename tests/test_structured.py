"""df.chat.extract / classify against the real test server: typed columns, re-asks, shapes."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pydantic
import pytest

import nbtoolkit
from nbtoolkit.core.endpoints._schema import normalise
from nbtoolkit.core.endpoints._structured import _refusal, forget_learned_shapes, schema_keywords
from nbtoolkit.testing import (
    LLAMA_CPP_REFUSAL,
    ChatServer,
    FaultRates,
    RecordedRequest,
    Reply,
    StructuredFaults,
    schema_instance,
)
from tests.conftest import settings


class Review(pydantic.BaseModel):
    sentiment: Literal["positive", "negative", "mixed"]
    stars: int
    recommend: bool
    summary: str


REVIEW_DICT = {
    "title": "review",
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "recommend": {"type": "boolean"},
        "summary": {"type": "string"},
    },
    "required": ["sentiment", "stars", "recommend", "summary"],
}
REVIEW_TYPES = {
    "sentiment": Literal["positive", "negative", "mixed"],
    "stars": int,
    "recommend": bool,
    "summary": str,
}
SCHEMAS = {"pydantic": Review, "json_schema": REVIEW_DICT, "types": REVIEW_TYPES}
DTYPES = {"sentiment": "category", "stars": "Int64", "recommend": "boolean", "summary": "string"}
FIELDS = list(DTYPES)


@pytest.fixture(autouse=True)
def _fresh_shapes() -> Iterator[None]:
    """Each test starts without a shape learned by another test's server."""
    forget_learned_shapes()
    yield
    forget_learned_shapes()


def reviews(n: int) -> pd.DataFrame:
    # A duplicate index (two rows per label) must not confuse alignment.
    return pd.DataFrame(
        {"review": [f"review {i}: the kettle was {'good' if i % 3 else 'bad'}" for i in range(n)]},
        index=[f"r{i // 2}" for i in range(n)],
    )


def expected(schema: Any, rows: pd.Series) -> pd.DataFrame:
    """What the test server answers each row (its deterministic schema instance)."""
    strict = normalise(schema).strict
    return pd.DataFrame([schema_instance(strict, text) for text in rows], index=rows.index)


def assert_fields_match(out: pd.DataFrame, want: pd.DataFrame) -> None:
    for name in want.columns:
        assert out[name].astype(object).tolist() == want[name].tolist(), name


def report() -> nbtoolkit.RunReport:
    found = nbtoolkit.last_run()
    assert found is not None
    return found


def sent_shapes(requests: list[RecordedRequest]) -> list[str]:
    return [r.body.get("response_format", {}).get("type", "prompt") for r in requests]


@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=list(SCHEMAS))
def test_every_row_right_typed_and_aligned_despite_broken_answers_and_5xx(
    schema: Any, tmp_path: Path
) -> None:
    """300 rows, 30% of first answers breaking the schema, 5% 5xx: all right, typed, aligned."""
    faults = StructuredFaults(invalid_rate=0.3, seed=3)
    df = reviews(300)
    server = ChatServer(structured=faults, faults=FaultRates(server_error=0.05, seed=1))
    with server.run_in_thread():
        out = df.chat.extract("review", schema=schema, **settings(server, max_parallel=16))
    assert list(out.columns) == ["review", *FIELDS]
    assert list(out.index) == list(df.index)
    assert out["review"].tolist() == df["review"].tolist()
    assert {name: str(out[name].dtype) for name in FIELDS} == DTYPES
    assert list(out["sentiment"].cat.categories) == ["positive", "negative", "mixed"]
    assert_fields_match(out, expected(schema, df["review"]))
    broken = sum(faults.breaks_first_answer(text) is not None for text in df["review"])
    assert 60 < broken < 120  # the scripted share really was about 30%
    stats = report().stats
    assert report().errors.empty
    assert stats.reasks >= broken
    assert stats.statuses["500"] > 0 and stats.retries > 0


def test_a_server_refusing_json_schema_costs_at_most_max_parallel_requests() -> None:
    """llama.cpp's HTTP 500 for json_schema moves the run to json_object + schema, once."""
    df = reviews(80)
    server = ChatServer(structured=StructuredFaults(reject_json_schema=True), latency=0.02)
    with server.run_in_thread():
        out = df.chat.extract("review", schema=Review, **settings(server, max_parallel=8))
        shapes = sent_shapes(server.requests)
        assert_fields_match(out, expected(Review, df["review"]))
        assert report().errors.empty
        assert 1 <= shapes.count("json_schema") <= 8
        assert shapes.count("json_object") == 80
        assert all(
            r.status == 500
            for r in server.requests
            if r.body["response_format"]["type"] == "json_schema"
        )
        json_object = next(r for r in server.requests if r.status == 200).body["response_format"]
        assert json_object == {"type": "json_object", "schema": normalise(Review).strict}
        assert report().stats.retries == 0  # a changed shape is sent at once, not as a retry

        server.reset_records()
        df.chat.extract("review", schema=Review, **settings(server, cache=False))
        # The process remembers what this server takes: the next run starts there.
        assert set(sent_shapes(server.requests)) == {"json_object"}


def test_forced_json_schema_does_not_switch(server: ChatServer) -> None:
    """structured='json_schema' keeps its shape: a server refusing it fails the rows."""
    with ChatServer(structured=StructuredFaults(reject_json_schema=True)).run_in_thread() as bad:
        bad_settings = settings(bad, retry=1)
        out = reviews(3).chat.extract(
            "review", schema=Review, structured="json_schema", **bad_settings
        )
        assert out["stars"].isna().all()
        assert set(report().errors["error_kind"]) == {"ServerError"}
        assert set(sent_shapes(bad.requests)) == {"json_schema"}


@pytest.mark.parametrize("shape", ["json_schema", "json_object", "prompt"])
def test_each_shape_carries_the_schema_and_leaves_the_user_text_alone(
    server: ChatServer, shape: str
) -> None:
    """The row's text is the user message as sent by complete; the schema goes elsewhere."""
    df = reviews(4)
    out = df.chat.extract(
        "review", schema=Review, structured=shape, system="Be brief.", **settings(server)
    )
    assert_fields_match(out, expected(Review, df["review"]))
    strict = normalise(Review).strict
    for request in server.requests:
        messages = request.body["messages"]
        assert messages[-1] == {"role": "user", "content": request.prompt}
        assert request.prompt in set(df["review"])
        system = messages[0]["content"]
        assert system.startswith("Be brief.")
        if shape == "json_schema":
            assert request.body["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "Review", "schema": strict, "strict": True},
            }
        elif shape == "json_object":
            assert request.body["response_format"] == {"type": "json_object", "schema": strict}
        else:
            assert "response_format" not in request.body
            assert json.dumps(strict, ensure_ascii=False) in system
    assert len(server.requests) == 4


def test_strict_schema_closes_objects_and_makes_optional_fields_nullable() -> None:
    """additionalProperties false everywhere, every property required, optional ones nullable."""

    class Address(pydantic.BaseModel):
        city: str
        zip_code: str | None = None

    class Person(pydantic.BaseModel):
        name: str
        age: int = 30
        address: Address

    strict = normalise(Person).strict
    assert strict["additionalProperties"] is False
    assert strict["required"] == ["name", "age", "address"]
    assert strict["properties"]["age"] == {
        "anyOf": [{"title": "Age", "type": "integer"}, {"type": "null"}]
    }
    address = strict["$defs"]["Address"]
    assert address["additionalProperties"] is False
    assert address["required"] == ["city", "zip_code"]
    assert "default" not in json.dumps(strict)


def test_an_optional_field_answered_null_takes_its_default(server: ChatServer) -> None:
    """Strict mode answers an optional field with null: the model's default fills it."""

    class Item(pydantic.BaseModel):
        name: str
        count: int = 7

    server.script(Reply('{"name": "kettle", "count": null}'))
    out = pd.DataFrame({"text": ["a kettle"]}).chat.extract("text", schema=Item, **settings(server))
    assert out["count"].tolist() == [7]
    assert out["name"].tolist() == ["kettle"]


def test_dtypes_follow_the_schema(server: ChatServer) -> None:
    """number -> Float64, Enum -> category in order, nested objects and arrays -> object."""

    class Color(enum.Enum):
        RED = "red"
        GREEN = "green"
        BLUE = "blue"

    class Part(pydantic.BaseModel):
        weight: float
        color: Color
        tags: list[str]
        size: dict[str, int]
        note: str | None = None

    df = pd.DataFrame({"text": ["bolt", "nut", None]})
    out = df.chat.extract("text", schema=Part, **settings(server))
    dtypes = {name: str(out[name].dtype) for name in ["weight", "color", "tags", "size", "note"]}
    assert dtypes == {
        "weight": "Float64",
        "color": "category",
        "tags": "object",
        "size": "object",
        "note": "string",
    }
    assert list(out["color"].cat.categories) == ["red", "green", "blue"]
    assert isinstance(out["tags"][0], list) and isinstance(out["size"][0], dict)
    assert out.iloc[2][["weight", "color", "tags", "size", "note"]].isna().all()


def test_series_extract_returns_the_fields_with_the_series_index(server: ChatServer) -> None:
    """series.chat.extract gives a DataFrame of the fields only, indexed like the Series."""
    s = pd.Series(["good", "bad"], index=[5, 5], name="review")
    out = s.chat.extract(schema={"stars": int}, prefix="x_", **settings(server))
    assert list(out.columns) == ["x_stars"]
    assert list(out.index) == [5, 5]
    assert str(out["x_stars"].dtype) == "Int64"


def test_prefix_names_the_columns_and_a_collision_is_a_config_error(server: ChatServer) -> None:
    """A field whose column exists is refused, naming it and prefix=; prefix= avoids it."""
    df = pd.DataFrame({"review": ["good"], "stars": [5]})
    with pytest.raises(nbtoolkit.ConfigError, match=r"column 'stars' already exists.*prefix="):
        df.chat.extract("review", schema={"stars": int}, **settings(server))
    assert server.request_count == 0
    out = df.chat.extract("review", schema={"stars": int}, prefix="llm_", **settings(server))
    assert list(out.columns) == ["review", "stars", "llm_stars"]


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


@pytest.mark.parametrize(
    "call",
    [
        {"schema": 5},
        {"schema": "an object with a stars field"},
        {"schema": {"type": "array", "items": {"type": "string"}}},
        {"schema": {"type": "object", "properties": {}}},
        {"schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}},
        {"schema": {"stars": int, "why": "a string"}},
        {"schema": {"_private": int}},
        {"schema": {"a": type("Thing", (), {})}},
        {"schema": pydantic.RootModel[list[int]]},
        {"schema": {"a": int}, "structured": "xml"},
        {"schema": {"a": int}, "validation_retries": -1},
        {"schema": {"a": int}, "response_format": {"type": "json_object"}},
        {"schema": {"a": int}, "validation_retry": 3},
        {"labels": ["only"]},
        {"labels": ["a", "a"]},
        {"labels": "positive,negative"},
        {"labels": ["a", 2]},
        {"labels": ["a", "b"], "output": "review"},
    ],
)
def test_bad_options_are_config_errors_before_any_request(
    server: ChatServer, call: dict[str, Any]
) -> None:
    """A bad schema, labels or option is a clear ConfigError and nothing is sent."""
    df = pd.DataFrame({"review": ["good"]})
    method = df.chat.classify if "labels" in call else df.chat.extract
    with pytest.raises(nbtoolkit.ConfigError):
        method("review", **call, **settings(server))
    assert server.request_count == 0


def test_refused_truncated_and_invalid_rows_fail_with_their_reason(tmp_path: Path) -> None:
    """Refusal, finish_reason length and answers invalid after every re-ask: <NA>, reason kept."""
    df = pd.DataFrame(
        {"review": ["refuse me", "cut me", "never valid", "fine"]}, index=[0, 0, 1, 1]
    )
    faults = StructuredFaults(
        refuse=frozenset({"refuse me"}),
        truncate=frozenset({"cut me"}),
        always_invalid=frozenset({"never valid"}),
    )
    with ChatServer(structured=faults).run_in_thread() as server:
        out = df.chat.extract("review", schema=Review, **settings(server))
        errors = report().errors
        assert out.iloc[:3][FIELDS].isna().all().all()
        assert out.iloc[3][FIELDS].notna().all()
        assert errors["error_kind"].tolist() == ["Refused", "Truncated", "SchemaError"]
        assert "I can't help with that." in errors["message"].iloc[0]
        assert errors["attempts"].tolist() == [1, 1, 3]
        # Sent once each (never retried), the invalid one once plus validation_retries=2.
        assert server.answered["refuse me"] == 1 and server.answered["cut me"] == 1
        assert (
            len([r for r in server.requests if r.body["messages"][0]["content"] == "never valid"])
            == 3
        )
        assert report().stats.reasks == 2
        server.reset_records()
        df.chat.extract(
            "review", schema=Review, validation_retries=0, **settings(server, cache=False)
        )
        assert report().errors["attempts"].tolist() == [1, 1, 1]
        assert report().stats.reasks == 0


def test_a_reask_shows_the_model_its_answer_and_the_validators_message(server: ChatServer) -> None:
    """The follow-up request is the conversation + the bad answer + what the validator said."""
    bad = {**schema_instance(normalise(REVIEW_DICT).strict, "good kettle"), "stars": "many"}
    server.script(Reply(json.dumps(bad)), prompt="good kettle")
    out = pd.DataFrame({"t": ["good kettle"]}).chat.extract(
        "t", schema=REVIEW_DICT, **settings(server)
    )
    assert out["stars"].notna().all()
    first, second = server.requests
    messages = second.body["messages"]
    assert messages[:-2] == first.body["messages"]
    assert messages[-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert messages[-1]["role"] == "user"
    assert "at 'stars': 'many' is not of type 'integer'" in messages[-1]["content"]


def test_cache_keeps_only_checked_answers_and_a_rerun_sends_nothing(tmp_path: Path) -> None:
    """A re-run is served from the cache; a row that never validated is asked again."""
    df = reviews(40)
    faults = StructuredFaults(invalid_rate=0.3, always_invalid=frozenset({df["review"].iloc[5]}))
    cache = tmp_path / "answers.sqlite"
    with ChatServer(structured=faults).run_in_thread() as server:
        first = df.chat.extract("review", schema=Review, **settings(server, cache=cache))
        assert report().stats.reasks > 2
        server.reset_records()
        # Another shape, same schema: the same question, so the same answers.
        again = df.chat.extract(
            "review", schema=Review, structured="json_object", **settings(server, cache=cache)
        )
        pd.testing.assert_frame_equal(first, again)
        assert report().stats.cache_hits == 39
        # Only the row that never validated is sent again (once plus its re-asks).
        assert {r.body["messages"][0]["content"] for r in server.requests} == {df["review"].iloc[5]}
        assert len(server.requests) == 3
        server.reset_records()
        df.chat.extract("review", schema={"stars": int}, **settings(server, cache=cache))
        # Another schema is another question: every row is asked again.
        assert sum(len(r.body["messages"]) == 1 for r in server.requests) == 40


def test_reask_tokens_count_in_the_row_the_run_and_the_budget() -> None:
    """Every re-ask's tokens are in its row's usage, the run's totals and max_tokens_total."""
    df = reviews(10)
    with ChatServer(structured=StructuredFaults(invalid_rate=1.0)).run_in_thread() as server:
        df.chat.extract("review", schema=Review, **settings(server, cache=False))
        stats, rows = report().stats, report().rows
        assert stats.reasks == 10 and len(server.requests) == 20
        assert stats.prompt_tokens == sum(_server_prompt_tokens(r) for r in server.requests)
        assert rows["prompt_tokens"].sum() == stats.prompt_tokens
        assert rows["completion_tokens"].sum() == stats.completion_tokens
        firsts = {
            r.prompt: _server_prompt_tokens(r)
            for r in server.requests
            if len(r.body["messages"]) == 1
        }
        for text, tokens in zip(df["review"], rows["prompt_tokens"], strict=True):
            assert tokens > firsts[text]

        server.reset_records()
        limit = stats.prompt_tokens + stats.completion_tokens
        df2 = reviews(30)
        df2.chat.extract(
            "review",
            schema=Review,
            max_tokens=40,
            **settings(server, cache=False, max_parallel=2, max_tokens_total=limit),
        )
        after = report().stats
        assert after.prompt_tokens + after.completion_tokens <= limit
        assert after.reasks > 0
        assert (report().rows["status"] == "over_budget").any()


def _server_prompt_tokens(request: RecordedRequest) -> int:
    """The prompt tokens the test server bills a request (about four characters a token)."""
    return sum(len(m["content"] or "") // 4 + 1 for m in request.body["messages"])


async def test_aextract_and_aclassify_in_a_running_loop(aserver: ChatServer) -> None:
    """The async twins work where a loop already runs (a notebook cell)."""
    df = reviews(6)
    out = await df.chat.aextract("review", schema=REVIEW_TYPES, **settings(aserver))
    assert_fields_match(out, expected(REVIEW_TYPES, df["review"]))
    labelled = await df.chat.aclassify("review", labels=["good", "bad"], **settings(aserver))
    assert str(labelled["label"].dtype) == "category"


def test_classify_gives_a_category_column_of_the_labels(server: ChatServer) -> None:
    """One category column (labels in order); the default system message lists the labels."""
    df = reviews(20)
    labels = ["positive", "negative", "neutral"]
    out = df.chat.classify("review", labels=labels, output="sentiment", **settings(server))
    assert list(out.columns) == ["review", "sentiment"]
    assert list(out["sentiment"].cat.categories) == labels
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": labels}},
        "required": ["sentiment"],
    }
    want = [schema_instance(normalise(schema).strict, t)["sentiment"] for t in df["review"]]
    assert out["sentiment"].astype(object).tolist() == want
    system = server.requests[0].body["messages"][0]
    assert system["role"] == "system" and "positive, negative, neutral" in system["content"]


def test_classify_never_guesses_a_label(server: ChatServer) -> None:
    """An answer that is not a label, even after the re-asks, is <NA> with a SchemaError."""
    faults = StructuredFaults(always_invalid=frozenset({"odd"}))
    with ChatServer(structured=faults).run_in_thread() as bad:
        out = pd.DataFrame({"t": ["odd", "fine"]}).chat.classify("t", labels=Mood, **settings(bad))
        assert pd.isna(out["label"].iloc[0]) and out["label"].iloc[1] in {"happy", "sad"}
        assert list(out["label"].cat.categories) == ["happy", "sad"]
        error = report().errors.iloc[0]
        assert error["error_kind"] == "SchemaError"
        # The last answer was a word that is no label: left out, not matched to the nearest.
        assert "'not one of the labels' is not one of ['happy', 'sad']" in error["message"]


def test_multi_label_gives_lists_of_labels(server: ChatServer) -> None:
    """multi_label=True: a column of lists, each a subset of the labels."""
    s = pd.Series(["a", "b", "c", None], index=[1, 1, 2, 3])
    out = s.chat.classify(
        labels=["x", "y", "z"], multi_label=True, output="tags", **settings(server)
    )
    assert list(out.columns) == ["tags"] and list(out.index) == [1, 1, 2, 3]
    assert all(isinstance(v, list) and set(v) <= {"x", "y", "z"} for v in out["tags"][:3])
    assert pd.isna(out["tags"].iloc[3])


class Named(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=3)
    stars: int


def test_a_gateway_model_without_json_schema_downgrades_only_that_model() -> None:
    """One model's "json_schema is not supported" moves that model, not the gateway's others."""
    faults = StructuredFaults(reject_json_schema_for=frozenset({"small-model"}))
    df = reviews(12)
    with ChatServer(structured=faults).run_in_thread() as gateway:
        small = settings(gateway, model="small-model", max_parallel=4, cache=False)
        out = df.chat.extract("review", schema=Review, **small)
        assert_fields_match(out, expected(Review, df["review"]))
        shapes = sent_shapes(gateway.requests)
        assert 1 <= shapes.count("json_schema") <= 4 and shapes.count("json_object") == 12
        assert all(
            r.status == 400
            for r in gateway.requests
            if r.body["response_format"]["type"] == "json_schema"
        )

        gateway.reset_records()
        big = settings(gateway, model="big-model", cache=False)
        df.chat.extract("review", schema=Review, **big)
        # The other model on the same base URL still gets json_schema, and takes it.
        assert set(sent_shapes(gateway.requests)) == {"json_schema"}
        assert {r.status for r in gateway.requests} == {200}

        gateway.reset_records()
        df.chat.extract("review", schema=Review, **small)
        # The refusing model starts where it ended: no refused request this time.
        assert set(sent_shapes(gateway.requests)) == {"json_object"}


@pytest.mark.parametrize("structured", ["auto", "json_schema"])
def test_a_refused_schema_stops_the_run_with_the_keyword_and_downgrades_nothing(
    structured: str,
) -> None:
    """A schema keyword the provider refuses: RunAborted naming it, in json_schema only."""
    faults = StructuredFaults(refuse_keywords=frozenset({"minLength"}))
    df = reviews(40)
    with ChatServer(structured=faults).run_in_thread() as strict:
        options = settings(strict, max_parallel=4, retry=3)
        with pytest.raises(nbtoolkit.RunAborted) as stopped:
            df.chat.extract("review", schema=Named, structured=structured, **options)
        cause = stopped.value.cause
        assert isinstance(cause, nbtoolkit.SchemaRefused) and cause.keyword == "minLength"
        message = str(stopped.value)
        # The provider's own words, the keyword, and what to do.
        assert "In context=('properties', 'name'), 'minLength' is not permitted" in message
        assert "remove 'minLength' from the schema" in message
        # Not a server without JSON mode: nothing moved to json_object or prompt.
        assert set(sent_shapes(strict.requests)) == {"json_schema"}
        # 400 each (None: cut off in flight when the run stopped).
        assert {r.status for r in strict.requests} - {None} == {400}
        assert len(strict.requests) <= 4  # the requests in flight when the first came back
        assert stopped.value.partial["name"].isna().all()

        strict.reset_records()
        out = df.chat.extract("review", schema=Review, **settings(strict, cache=False))
        # Nothing was learned: the next schema, which the provider takes, goes as json_schema.
        assert set(sent_shapes(strict.requests)) == {"json_schema"}
        assert_fields_match(out, expected(Review, df["review"]))


def test_llama_cpp_refusal_still_downgrades_after_a_schema_refusal_elsewhere() -> None:
    """A schema refusal on one server leaves another server's shape refusal working as before."""
    df = reviews(6)
    refusing = StructuredFaults(refuse_keywords=frozenset({"minLength"}))
    with (
        ChatServer(structured=refusing).run_in_thread() as strict,
        pytest.raises(nbtoolkit.RunAborted),
    ):
        df.chat.extract("review", schema=Named, **settings(strict, max_parallel=2))
    with ChatServer(structured=StructuredFaults(reject_json_schema=True)).run_in_thread() as llama:
        out = df.chat.extract("review", schema=Named, **settings(llama, max_parallel=2))
        assert out["name"].notna().all()
        assert sent_shapes(llama.requests).count("json_object") == 6


# What providers say, word for word (OpenAI, vLLM and llama.cpp wordings).
OPENAI_MODEL = (
    "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
)
OPENAI_KEYWORD = (
    "Invalid schema for response_format 'Named': In context=('properties', 'name'), "
    "'minLength' is not permitted."
)
OPENAI_REQUIRED = (
    "Invalid schema for response_format 'Named': In context=(), 'additionalProperties' is "
    "required to be supplied and to be false."
)
LLAMA_CPP_GRAMMAR = 'JSON schema conversion failed:\nUnrecognized schema: {"not": {}}'


@pytest.mark.parametrize(
    ("status", "words", "kind", "keyword"),
    [
        (500, LLAMA_CPP_REFUSAL, "shape", None),
        (400, OPENAI_MODEL, "shape", None),
        (400, "response_format.type json_schema is unavailable", "shape", None),
        (400, OPENAI_KEYWORD, "schema", "minLength"),
        (400, OPENAI_REQUIRED, "schema", "additionalProperties"),
        (400, LLAMA_CPP_GRAMMAR, "schema", None),
        (422, 'Keyword "pattern" is not supported in this json_schema', "schema", "pattern"),
        (400, "'temperature' is not supported with this model.", None, None),
        (503, "Invalid schema for response_format", None, None),
    ],
)
def test_refusals_are_told_apart_by_the_providers_words(
    status: int, words: str, kind: str | None, keyword: str | None
) -> None:
    """Shape refusals (downgrade) and schema refusals (stop, keyword) read from real wordings."""
    error = nbtoolkit.BadRequestError(f"HTTP {status}: {words}", status=status, body="")
    keywords = schema_keywords({**normalise(Named).strict, "pattern": "x"})
    refusal = _refusal(error, keywords)
    if kind is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert (("schema" if refusal.schema else "shape"), refusal.keyword) == (kind, keyword)
