"""One option set per method: each method takes its own options, and body fields pass through."""

from __future__ import annotations

import inspect
from typing import Any

import pandas as pd
import pytest

from nbtoolkit import ConfigError, Timeouts
from nbtoolkit.frame._accessor import ChatAccessor
from nbtoolkit.frame._options import CONFIGURE_ONLY, METHOD_OPTIONS, takers
from nbtoolkit.testing import ChatServer
from tests.conftest import settings

# What each method needs besides the options under test.
REQUIRED: dict[str, dict[str, Any]] = {
    "complete": {},
    "extract": {"schema": {"stars": int}},
    "classify": {"labels": ["pos", "neg"]},
    "embed": {},
    "submit_batch": {},
    "filter": {},
    "top_k": {"k": 3},
    "aggregate": {"template": "sum up {value}"},
    "join": {"right": pd.DataFrame({"value": ["c"]}), "template": "{left.value} {right.value}"},
}
# Methods whose first positional argument is not the column (or template).
NO_COLUMN_FIRST = {"top_k", "join", "aggregate"}
# A plausible value for every option, so that the refusal is about the name alone.
VALUES: dict[str, Any] = {
    "system": "be brief",
    "column": "value",
    "template": "{value}",
    "schema": {"stars": int},
    "prefix": "x_",
    "validation_retries": 1,
    "structured": "prompt",
    "labels": ["pos", "neg"],
    "multi_label": True,
    "output": "out",
    "dimensions": 256,
    "batch_size": 10,
    "keep": "mask",
    "cheap_model": "small",
    "sample": 10,
    "agreement": 0.99,
    "sample_seed": 1,
    "k": 3,
    "by": "value",
    "context_tokens": 4096,
    "right": pd.DataFrame({"value": ["c"]}),
    "embed_model": "emb",
    "candidates": 5,
    "max_pairs": 100,
    "left_on": "value",
    "right_on": "value",
    "suffixes": ("_l", "_r"),
    "max_batch_tokens": 1000,
    "batch": True,
    "dry_run": True,
    "pilot": 5,
    "max_parallel": 4,
    "rpm": 60.0,
    "tpm": 1000.0,
    "dedupe": False,
    "adaptive": False,
    "timeouts": Timeouts(total=5.0),
    "params": {"temperature": 0},
    "retry_attempts": 2,
}


def foreign_options() -> list[tuple[str, str]]:
    """Every (method, option) pair where the option belongs to another method only."""
    every = {name for names in METHOD_OPTIONS.values() for name in names}
    return [
        (method, option)
        for method, own in METHOD_OPTIONS.items()
        for option in sorted(every - set(own))
    ]


def configure_options() -> list[tuple[str, str]]:
    """Every (method, setting) pair where the setting is one only configure() takes."""
    return [(method, option) for method in METHOD_OPTIONS for option in sorted(CONFIGURE_ONLY)]


def test_the_tables_cover_what_the_issue_names() -> None:
    """The options the issue saw leak into request bodies are each another method's."""
    assert takers("dimensions") == ["embed"]
    assert takers("prefix") == ["extract"]
    assert takers("labels") == ["classify"]
    assert "adaptive" in CONFIGURE_ONLY
    assert len(foreign_options()) >= 40


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_each_method_signature_is_its_table(method: str) -> None:
    """complete/acomplete & co take exactly their table's options, plus **params."""
    for name in (method, f"a{method}"):
        parameters = inspect.signature(getattr(ChatAccessor, name)).parameters
        named = [p for p in parameters if p not in {"self", "params"}]
        assert set(named) == set(METHOD_OPTIONS[method])
        assert parameters["params"].kind is inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_each_sync_method_has_its_async_twins_docstring(method: str) -> None:
    """help(df.chat.complete) reads as help(df.chat.acomplete): both forms are named in it.

    It once dropped "``await``-able; " from the text, which left complete's docstring
    saying "``acomplete`` is cancelling the awaiting task cancels every request".
    """
    sync, twin = getattr(ChatAccessor, method), getattr(ChatAccessor, f"a{method}")
    assert sync.__name__ == method
    assert sync.__doc__
    assert sync.__doc__ == twin.__doc__


@pytest.mark.parametrize("on_series", [False, True], ids=["frame", "series"])
@pytest.mark.parametrize(("method", "option"), foreign_options())
def test_another_methods_option_is_refused_before_any_request(
    server: ChatServer, method: str, option: str, on_series: bool
) -> None:
    """An option of another method is a ConfigError naming that method; nothing is sent."""
    if on_series and method == "join":
        pytest.skip("join takes two frames: it has no series form")
    frame = pd.DataFrame({"value": ["a", "b"]})
    target = frame["value"] if on_series else frame
    call = getattr(target.chat, method)
    column = () if on_series or method in NO_COLUMN_FIRST else ("value",)
    with pytest.raises(ConfigError, match=rf"{method}\(\) does not take {option}=") as caught:
        call(*column, **REQUIRED[method], **{option: VALUES[option]}, **settings(server))
    for owner in takers(option):
        assert f"{owner}()" in str(caught.value)
    assert server.request_count == 0
    assert not server.requests


@pytest.mark.parametrize(("method", "option"), configure_options())
def test_a_configure_only_setting_is_refused_per_call(
    server: ChatServer, method: str, option: str
) -> None:
    """adaptive=, timeouts=, params=, retry_x=, timeout_x= per call: ConfigError, nothing sent."""
    frame = pd.DataFrame({"value": ["a"]})
    call = getattr(frame.chat, method)
    positional = () if method in NO_COLUMN_FIRST else ("value",)
    value = VALUES.get(option, 1.0)
    with pytest.raises(ConfigError, match=r"nbtoolkit\.configure\("):
        call(*positional, **REQUIRED[method], **{option: value}, **settings(server))
    assert server.request_count == 0


async def test_the_async_form_refuses_too(aserver: ChatServer) -> None:
    """await acomplete(dimensions=...) is refused like complete; nothing is sent."""
    frame = pd.DataFrame({"value": ["a"]})
    with pytest.raises(ConfigError, match="option of embed"):
        await frame.chat.acomplete("value", dimensions=256, **settings(aserver))
    assert aserver.request_count == 0


def test_a_misspelt_option_of_another_method_names_it(server: ChatServer) -> None:
    """complete(dimension=8): did you mean 'dimensions', an option of embed()."""
    frame = pd.DataFrame({"value": ["a"]})
    with pytest.raises(ConfigError, match=r"did you mean 'dimensions', an option of embed\(\)"):
        frame.chat.complete("value", dimension=8, **settings(server))
    assert server.request_count == 0


def test_extra_body_is_merged_into_the_body(server: ChatServer) -> None:
    """extra_body={...} adds its fields to the body (even one named like an option)."""
    frame = pd.DataFrame({"value": ["a"]})
    frame.chat.complete(
        "value", top_k=3, extra_body={"prefix": "x_", "top_k": 5}, **settings(server)
    )
    (request,) = server.requests
    assert "extra_body" not in request.body
    assert (request.body["prefix"], request.body["top_k"]) == ("x_", 5)


def test_extra_body_must_be_a_mapping(server: ChatServer) -> None:
    """extra_body=[...] is a ConfigError; nothing is sent."""
    frame = pd.DataFrame({"value": ["a"]})
    with pytest.raises(ConfigError, match="extra_body must map"):
        frame.chat.complete("value", extra_body=["prefix"], **settings(server))
    assert server.request_count == 0


def test_embed_passes_body_fields_and_keys_on_them(server: ChatServer) -> None:
    """embed(input_type=...) reaches the server; another input_type is another vector."""
    frame = pd.DataFrame({"value": ["a", "b"]})
    frame.chat.embed("value", input_type="query", **settings(server))
    frame.chat.embed("value", input_type="query", **settings(server))  # all cached
    frame.chat.embed("value", extra_body={"input_type": "document"}, **settings(server))
    assert [r.body["input_type"] for r in server.requests] == ["query", "document"]
    assert all(r.body["encoding_format"] == "float" for r in server.requests)


def test_embed_refuses_a_body_field_it_sets(server: ChatServer) -> None:
    """embed(extra_body={"input": ...}) would replace the texts: ConfigError, nothing sent."""
    frame = pd.DataFrame({"value": ["a"]})
    with pytest.raises(ConfigError, match="input is set by embed"):
        frame.chat.embed("value", extra_body={"input": ["x"]}, **settings(server))
    assert server.request_count == 0
