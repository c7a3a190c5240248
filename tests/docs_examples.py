"""Runs one docs page's Python examples, in order, against the test server.

``python -m tests.docs_examples docs/api.md`` (tests/test_docs.py runs it per page, each in a
fresh interpreter so that one page's ``configure()`` cannot leak into the next). Examples share
one namespace per page, as the cells of a notebook do, and start with what a reader already has:
``df`` (the sample reviews), ``texts``, ``pd``, ``np`` and ``nbtoolkit``, configured to talk to
a test server on 127.0.0.1 that answers every model name. Top-level ``await`` works, as in a cell.

An example can opt out only with a reason, in a comment on the line before its fence::

    <!-- not run: needs a real Azure deployment -->
"""

from __future__ import annotations

import ast
import asyncio
import enum
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

FENCE = re.compile(
    r"(?:<!-- not run: (?P<why>[^>]+?) -->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M
)
NEEDS_LOCAL_MODEL = "LocalServer"


def examples(text: str) -> list[tuple[str, str | None]]:
    """Each ```python block of a page, with the reason it is not run (None: it runs)."""
    return [(m["code"], m["why"]) for m in FENCE.finditer(text)]


def _namespace(base_url: str) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    import nbtoolkit
    from nbtoolkit.local import sample_reviews

    class Topic(enum.StrEnum):
        QUALITY = "quality"
        DESIGN = "design"
        DURABILITY = "durability"

    nbtoolkit.configure(base_url=base_url, api_key="sk-docs-examples", model="gpt-4o-mini")
    frame = sample_reviews().head(12)
    return {
        "__name__": "__docs__",
        "nbtoolkit": nbtoolkit,
        "pd": pd,
        "np": np,
        "df": frame,
        "texts": list(frame["review"]),
        "catalogue": pd.DataFrame({"name": sorted(set(frame["product"]))}),
        "ChatRequest": nbtoolkit.ChatRequest,
        "Topic": Topic,
    }


def _server_options(page: Path) -> dict[str, Any]:
    """What the page's server knows besides chat: the semantic page's questions have rules."""
    from nbtoolkit.testing import BatchBehaviour, EmbeddingBehaviour, SemanticRules

    options: dict[str, Any] = {
        "batch": BatchBehaviour(validating=0.05, in_progress=0.2, finalizing=0.05)
    }
    if page.stem == "semantic":
        products = r"(?i)\b(kettle|toaster|lamp|mug|headphones|chair)\b"
        options["semantic"] = SemanticRules(
            marker="broke ", key_pattern=products, cheap_model="gpt-4o-mini"
        )
        options["embeddings"] = EmbeddingBehaviour(topic=products)
    return options


def run_page(page: Path) -> int:
    """Runs the page's examples; returns how many ran."""
    from nbtoolkit.testing import ChatServer

    ran = 0
    has_local_model = importlib.util.find_spec("xllamacpp") is not None
    with ChatServer(**_server_options(page)).run_in_thread() as server:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        os.environ["OPENAI_API_KEY"] = "sk-docs-examples"
        namespace = _namespace(server.base_url)
        namespace["server_url"] = server.base_url
        for number, (code, why) in enumerate(examples(page.read_text()), start=1):
            if why is not None:
                print(f"{page}: example {number} not run: {why}")
                continue
            if NEEDS_LOCAL_MODEL in code and not has_local_model:
                print(f"{page}: example {number} skipped: the local extra is not installed")
                continue
            name = f"{page}, example {number}"
            compiled = compile(
                code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
            )
            result = eval(compiled, namespace)  # our own docs, run by design
            if asyncio.iscoroutine(result):
                asyncio.run(result)
            ran += 1
    return ran


def main() -> None:
    page = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as folder:
        # Examples write files (parquet, caches): keep them out of the checkout.
        os.environ["NBTOOLKIT_CACHE_DIR"] = folder
        os.chdir(folder)
        print(f"ran {run_page(page)} examples")


if __name__ == "__main__":
    main()
