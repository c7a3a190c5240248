"""The documentation: every Python example runs, and the site builds with no warning."""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbtoolkit.frame._accessor import ChatAccessor
from tests.docs_examples import examples

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_on_the_page_runs(page: Path) -> None:
    """Each ```python block runs, in order, against the test server (or says why it is not)."""
    blocks = examples(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page.name} has no Python example")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs_examples", str(page)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "ran " in done.stdout


def test_examples_not_run_say_why() -> None:
    """An example left out of the run names its reason, and they are few."""
    skipped = [
        (page.name, why)
        for page in PAGES
        for _, why in examples(page.read_text(encoding="utf-8"))
        if why
    ]
    total = sum(len(examples(page.read_text(encoding="utf-8"))) for page in PAGES)
    assert all(why.strip() for _, why in skipped)
    assert len(skipped) <= max(2, total // 10), skipped


def test_the_home_page_is_the_readme_top() -> None:
    """The site's home page is the README's opening, its links made relative to docs/.

    It was a copy that drifted: it still gave the suite's size and time of days before.
    """
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    opening = readme.split("\n## Documentation")[0].replace("](docs/", "](").rstrip()
    home = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert home.startswith(opening + "\n"), "docs/index.md no longer starts as README.md does"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_line_of_text_starts_as_a_heading_by_accident(page: Path) -> None:
    """A wrapped line that starts with "#20" is a heading to MkDocs' Markdown (though not to
    GitHub's): the home page showed "20, when it imported Dask" in large type."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert re.findall(r"^#+[^#\s].*$", prose, flags=re.M) == []


# A signature written out in a page: `df.chat.complete(column=None, *, ..., **params)`.
_WRITTEN_SIGNATURE = re.compile(r"`(?:df\.chat\.)?(a?(?:complete|submit_batch))\((.*?)\)`", re.S)


def test_signatures_written_in_the_pages_are_the_methods_own() -> None:
    """A page that writes out a method's whole signature names every parameter, in order.

    The API page's ``complete(...)`` had lost six (provider, azure_endpoint, api_version,
    batch, dry_run, pilot) as the method grew.
    """
    checked = []
    for page in PAGES:
        for method, inside in _WRITTEN_SIGNATURE.findall(page.read_text(encoding="utf-8")):
            items = [item.strip() for item in inside.split(",")]
            if items[-1] != "**params" or not all(
                re.fullmatch(r"\*{0,2}\w*(=.*)?", item) for item in items
            ):
                continue  # a call with arguments, or a signature shortened with "..."
            written = [item.split("=")[0].lstrip("*") for item in items if item != "*"]
            real = [name for name in inspect.signature(getattr(ChatAccessor, method)).parameters]
            assert written == real[1:], f"{page.name}: {method}"
            checked.append((page.name, method))
    assert ("api.md", "complete") in checked
    assert ("batch.md", "submit_batch") in checked


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed"
)
def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    """`mkdocs build --strict` (broken links, missing API docs) passes."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    _assert_methods_documented(reference)


def _assert_methods_documented(reference: str) -> None:
    """Each accessor method on the reference page has its signature and docstring.

    The sync methods are made by ``blocking(acomplete)``: read from the source alone, the
    page showed ``complete = blocking(acomplete)`` with no parameters and no text.
    """
    text = _text(reference)
    prefix = "nbtoolkit.frame._accessor.ChatAccessor."
    names = re.findall(r'id="' + re.escape(prefix) + r'(\w+)"', reference)
    assert {"complete", "acomplete", "extract", "filter", "submit_batch"} <= set(names)
    for name in names:
        heading = reference.index(f'id="{prefix}{name}"')
        after = _text(reference[heading : heading + 4000]).split(">", 1)[1].strip()
        assert after.startswith(f"{name} ( "), f"{name}: {after[:120]!r}"
        assert "= blocking" not in after[:200], f"{name}: {after[:200]!r}"
    assert "Send one chat request per row" in text
    # Parameters documented together ("base_url, api_key: ...") are not in the signature
    # under that name: a table of parameters called them "required"; the list does not.
    start = reference.index(f'id="{prefix}complete"')
    end = reference.index(f'id="{prefix}acomplete"', start)
    section = _text(reference[start:end])
    assert "base_url, api_key" in section
    assert re.findall(r"\brequired\b(?! here)", section) == []


def _text(page: str) -> str:
    """An HTML fragment's text, tags dropped and spaces folded."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))
