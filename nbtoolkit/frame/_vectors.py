"""Embedding columns in a frame: the run's writer, and ``to_matrix`` for the vectors."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from nbtoolkit.core._rows import RowResult
from nbtoolkit.errors import ConfigError


def embedding_writer(frame: pd.DataFrame, output: str, *, as_series: bool, name: str | None) -> Any:
    """Builds the run's output: ``frame`` plus column ``output`` of vectors (None if none).

    Args:
        frame: the caller's rows; not modified.
        output: the new column's name (replaced if present).
        as_series: return the vectors as a Series, named ``name``, instead of a frame.
        name: the Series' name when ``as_series``.
    """

    def write(rows: Sequence[RowResult]) -> Any:
        # Filled one by one: a list of equal-length arrays given to pandas whole could
        # come back as a 2-D block rather than one array per cell.
        column = np.empty(len(rows), dtype=object)
        for position, row in enumerate(rows):
            column[position] = row.value if row.error is None else None
        vectors = pd.Series(column, index=frame.index, dtype=object, name=name)
        if as_series:
            return vectors
        return frame.assign(**{output: vectors})

    return write


def to_matrix(vectors: Iterable[Any], *, dimensions: int | None = None) -> npt.NDArray[np.float32]:
    """The vectors of an embedding column as one ``(rows, dimensions)`` float32 matrix.

    A row with no vector (None, NaN) is a row of NaN, so the matrix lines up with the
    frame, row for row; drop them with ``matrix[~np.isnan(matrix).any(axis=1)]``.

    Args:
        vectors: the column ``df.chat.embed`` wrote (a Series, or any iterable of vectors).
        dimensions: the width when every row is missing (else it comes from the vectors).

    Returns:
        A new float32 array; the column is not modified.

    Raises:
        ConfigError: vectors of different lengths, or something that is not a 1-D vector.

    Example:
        >>> out = df.chat.embed("review", model="text-embedding-3-small")  # doctest: +SKIP
        >>> matrix = nbtoolkit.to_matrix(out["embedding"])  # (len(df), 1536)
    """
    values = list(vectors)
    width = dimensions
    for position, value in enumerate(values):
        if _missing(value):
            continue
        shape = np.shape(value)
        if len(shape) != 1:
            raise ConfigError(f"row {position} is not a 1-D vector (shape {shape})")
        if width is None:
            width = shape[0]
        elif shape[0] != width:
            raise ConfigError(
                f"row {position} has {shape[0]} dimensions, earlier rows {width}: "
                "were they embedded with different models or dimensions=?"
            )
    matrix = np.full((len(values), width or 0), np.nan, dtype=np.float32)
    for position, value in enumerate(values):
        if not _missing(value):
            matrix[position] = value
    return matrix


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)
