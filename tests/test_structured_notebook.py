"""notebooks/structured.ipynb in a real kernel: typed columns, a plot, the failed rows, labels.

The generic checks (no errors, no key in the outputs, max_parallel kept) run on every
notebook in test_notebooks.py; these read what this one showed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_notebooks import NOTEBOOK_DIR, Executed, _outputs, _run, _text

NOTEBOOK = NOTEBOOK_DIR / "structured.ipynb"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    """The notebook, executed once for the module, with matplotlib for its plot (without it
    the plot cell shows a table: test_notebooks runs it so)."""
    return _run(NOTEBOOK, tmp_path_factory.mktemp("structured"), also_installed=("matplotlib",))


@pytest.mark.timeout(180)
def test_extract_shows_typed_columns(run: Executed) -> None:
    """The extract cell's columns have the schema's dtypes."""
    shown = _text(run.cell("out.dtypes"))
    # name -> dtype as printed; the column widths and string's name vary across pandas
    # versions (2.1 prints "string[python]").
    dtypes = dict(line.split() for line in shown.splitlines() if len(line.split()) == 2)
    assert dtypes["sentiment"] == "category", shown
    assert dtypes["stars"] == "Int64" and dtypes["recommend"] == "boolean", shown
    assert dtypes["summary"] in ("string", "string[python]"), shown


@pytest.mark.timeout(180)
def test_groupby_and_plot(run: Executed) -> None:
    """The groupby lists every sentiment; with matplotlib the plot cell shows an image."""
    shown = _text(run.cell("by_sentiment = "))
    assert all(word in shown for word in ("positive", "mixed", "negative", "mean_stars"))
    images = [o for o in _outputs(run.cell(".plot.bar(")) if "image/png" in o.get("data", {})]
    assert len(images) == 1


@pytest.mark.timeout(180)
def test_failed_rows_show_their_reason(run: Executed) -> None:
    """The two long summaries fail after two re-asks, <NA> in the table, the reason listed."""
    shown = _text(run.cell("report.errors"))
    assert "finished: 6 ok, 2 failed" in shown
    assert shown.count("summary: String should have at most 50 characters") == 2
    assert "<NA>" in _text(run.cell('out[out["stars"].isna()]'))
    assert "re-asks: 4" in shown
    # The re-asks showed the model its answer and the validator's message.
    reasks = [
        r for r in run.requests if r.body["messages"][-1]["content"].startswith("That answer")
    ]
    assert len(reasks) == 4


@pytest.mark.timeout(180)
def test_classify_shows_labels(run: Executed) -> None:
    """classify gives a category of the labels; multi_label gives lists of them."""
    counts = _text(run.cell('topics["topic"].value_counts()'))
    assert "Name: count" in counts
    assert sum(int(line.split()[-1]) for line in counts.splitlines()[1:-1]) == 8
    assert "[" in _text(run.cell("multi_label=True"))


def test_notebook_file_exists() -> None:
    """The notebook is where the generic notebook tests find it."""
    assert Path(NOTEBOOK).exists()
