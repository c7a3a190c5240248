"""Tab completion after ``<expression>.chat.``: what the IPython matcher offers, and what it
never does (call a function to find out). The same in a real kernel: tests/test_kernel.py."""

from __future__ import annotations

import pandas as pd
import pytest

import nbtoolkit  # noqa: F401  (registers df.chat)
from nbtoolkit.frame._completion import accessor_names

FRAME = pd.DataFrame({"review": ["good", "bad"]})


@pytest.mark.parametrize(
    ("line", "partial", "some"),
    [
        ('df["review"].chat.', "", {"complete", "embed", "aextract", "filter"}),
        ('x = df["review"].chat.emb', "emb", {"embed"}),
        ('print(df["review"].chat.cl', "cl", {"classify"}),
        ("df.chat.j", "j", {"join"}),
    ],
)
def test_the_accessor_methods_are_offered(line: str, partial: str, some: set[str]) -> None:
    found, names = accessor_names(line, {"df": FRAME}, "limited")
    assert found == partial
    assert some <= set(names)
    assert all(name.startswith(partial) and not name.startswith("_") for name in names)


def test_a_series_does_not_offer_the_frame_only_join() -> None:
    _, names = accessor_names('df["review"].chat.', {"df": FRAME}, "limited")
    assert "join" not in names and "complete" in names


@pytest.mark.parametrize(
    "line",
    [
        "df.chat",  # no dot after chat yet
        'df["review"].str.',  # another accessor
        'd["k"].chat.',  # a dict's item: no chat accessor
        'missing["review"].chat.',  # a name not defined
        '"text".chat.',
        ".chat.",
    ],
)
def test_nothing_is_offered_for_other_text(line: str) -> None:
    assert accessor_names(line, {"df": FRAME, "d": {"k": "v"}}, "limited")[1] == []


def test_completion_never_calls_a_function() -> None:
    """The "limited" policy reads items and attributes; a call is refused, not made."""
    calls: list[int] = []

    def make() -> pd.DataFrame:
        calls.append(1)
        return FRAME

    assert accessor_names('make()["review"].chat.', {"make": make}, "limited")[1] == []
    assert calls == []
