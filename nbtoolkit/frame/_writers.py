"""The output of a text run: each row's answer in a column of a copy of the frame.

(Typed fields are written by `nbtoolkit.frame._extraction.fields_writer`, vectors by
`nbtoolkit.frame._vectors.embedding_writer`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.core._rows import RowResult

DEFAULT_OUTPUT = "response"


def text_writer(
    frame: pd.DataFrame, output: str | None, *, as_series: bool
) -> Callable[[Sequence[RowResult]], Any]:
    """Writes each row's answer text into the column ``output`` of a copy of ``frame``.

    Args:
        frame: the caller's rows.
        output: the column's name; None: ``"response"`` (replaced if present).
        as_series: return the answers as a Series (named ``output`` if one was given).
    """
    name = output or DEFAULT_OUTPUT

    def write(rows: Sequence[RowResult]) -> Any:
        answers = pd.Series([r.text for r in rows], index=frame.index, dtype=object)
        if as_series:
            answers.name = name if name != DEFAULT_OUTPUT else None
            return answers
        return frame.assign(**{name: answers})

    return write
