"""How nbtoolkit's errors show in IPython: one line through `_render_traceback_`.

test_kernel.py checks what a real kernel sends for them.
"""

from __future__ import annotations

import pandas as pd
import pytest

import nbtoolkit

ROWS_LINE = "nbtoolkit.last_run().output (and in this exception's .partial)"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            nbtoolkit.ConfigError("column 'prompt' not found; columns are ['q']"),
            "ConfigError: column 'prompt' not found; columns are ['q']",
        ),
        (
            nbtoolkit.RunAborted("run stopped: HTTP 401", partial=pd.DataFrame({"q": [1]})),
            f"RunAborted: run stopped: HTTP 401 The finished rows are in {ROWS_LINE}.",
        ),
        (
            nbtoolkit.RunAborted("run stopped: HTTP 401"),
            "RunAborted: run stopped: HTTP 401",
        ),
        (
            nbtoolkit.RunInterrupted(
                f"interrupted: 3 ok. The rows are in {ROWS_LINE}.", partial=[]
            ),
            f"RunInterrupted: interrupted: 3 ok. The rows are in {ROWS_LINE}.",
        ),
    ],
)
def test_render_traceback_is_one_line(error: BaseException, line: str) -> None:
    """Each error renders as its name and message, plus where the rows are when it has some."""
    assert error._render_traceback_() == [line]  # type: ignore[attr-defined]
