"""``join``: the pairs of rows, one from each frame, for which the model answers yes.

Asking about every pair costs N x M requests (a million for two frames of a thousand rows).
Instead both sides are embedded first (cached per text, as ``embed`` does) and each left row is
asked about only with its ``candidates`` nearest right rows by cosine similarity: a few percent
of the pairs. The full cross product is asked about only when ``candidates="all"`` comes with
``max_pairs=`` at least its size, a limit the caller sets knowing the count.

The template names columns of either side as ``{left.col}`` and ``{right.col}``.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from nbtoolkit.errors import ConfigError

SIDES = ("left", "right")
BLOCK_ROWS = 1024  # left rows per similarity block: memory stays rows x right x 4 bytes


@dataclass(frozen=True)
class JoinTemplate:
    """A pair template and the columns it reads from each side."""

    template: str
    columns: dict[str, list[str]]

    @classmethod
    def parse(cls, template: str, left: pd.DataFrame, right: pd.DataFrame) -> JoinTemplate:
        """Checks every field is ``left.col`` or ``right.col`` with a column that exists.

        Raises:
            ConfigError: a field without a side, or naming a column the frame lacks.
        """
        columns: dict[str, list[str]] = {"left": [], "right": []}
        frames = {"left": left, "right": right}
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            side, dot, column = field.partition(".")
            if not dot or side not in SIDES:
                raise ConfigError(
                    f"join template field {{{field}}} must name a side: "
                    "{left.col} or {right.col}"
                )
            if column not in frames[side].columns:
                known = [str(c) for c in frames[side].columns]
                raise ConfigError(f"column {column!r} not in the {side} frame; columns: {known}")
            if column not in columns[side]:
                columns[side].append(column)
        for side in SIDES:
            if not columns[side]:
                raise ConfigError(f"the join template names no {side} column ({{{side}.col}})")
        return cls(template, columns)

    def texts(self, frame: pd.DataFrame, side: str, on: str | None) -> list[str | None]:
        """What is embedded for each row of one side: ``on``, or the template's columns."""
        columns = [on] if on is not None else self.columns[side]
        for column in columns:
            if column not in frame.columns:
                raise ConfigError(f"column {column!r} not in the {side} frame")
        out: list[str | None] = []
        for values in zip(*(frame[c] for c in columns), strict=True):
            if any(_missing(v) for v in values):
                out.append(None)
            elif len(values) == 1:
                out.append(str(values[0]))
            else:
                out.append("\n".join(f"{c}: {v}" for c, v in zip(columns, values, strict=True)))
        return out

    def prompt(self, left: pd.DataFrame, right: pd.DataFrame, i: int, j: int) -> str | None:
        """The question about left row ``i`` and right row ``j`` (None: a value is missing)."""
        values: dict[str, dict[str, Any]] = {"left": {}, "right": {}}
        for side, frame, row in (("left", left, i), ("right", right, j)):
            for column in self.columns[side]:
                value = frame[column].iat[row]
                if _missing(value):
                    return None
                values[side][column] = value
        namespace = {side: _Row(values[side]) for side in SIDES}
        return self.template.format_map(namespace)


class _Row:
    """A row's values as attributes, so that ``{left.title}`` formats."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def nearest_pairs(
    left: npt.NDArray[np.float32] | None,
    right: npt.NDArray[np.float32] | None,
    k: int,
) -> Iterator[tuple[int, int, float]]:
    """(left row, right row, cosine similarity) for each left row's ``k`` nearest right rows.

    Rows whose vector is missing (NaN) have no pairs. Computed a block of left rows at a
    time, so memory is bounded by the block, not by N x M.
    """
    if left is None or right is None or len(left) == 0 or len(right) == 0:
        return
    right_ok = ~np.isnan(right).any(axis=1)
    right_ids = np.flatnonzero(right_ok)
    if len(right_ids) == 0:
        return
    unit_right = _unit(right[right_ids])
    k = min(k, len(right_ids))
    for start in range(0, len(left), BLOCK_ROWS):
        block = left[start : start + BLOCK_ROWS]
        ok: npt.NDArray[np.bool_] = np.asarray(~np.isnan(block).any(axis=1))
        similarity = _unit(np.where(ok[:, None], block, 0.0)) @ unit_right.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        for offset in np.flatnonzero(ok):
            nearest = np.asarray(top[offset])
            for column in nearest[np.argsort(-similarity[offset, nearest])]:
                yield start + int(offset), int(right_ids[column]), float(similarity[offset, column])


def all_pairs(rows: int, columns: int) -> Iterator[tuple[int, int, float]]:
    """Every pair, for ``candidates="all"``; no similarity."""
    for i in range(rows):
        for j in range(columns):
            yield i, j, float("nan")


def check_candidates(
    candidates: int | Literal["all"], max_pairs: int | None, left: int, right: int
) -> None:
    """Refuses the cross product without an explicit limit that covers it.

    Raises:
        ConfigError: ``candidates`` is not a positive int or "all", or "all" without a
            ``max_pairs`` at least ``left x right``.
    """
    if candidates == "all":
        pairs = left * right
        if max_pairs is None or max_pairs < pairs:
            raise ConfigError(
                f'candidates="all" would ask about every pair: {pairs:,} requests. Check the '
                f"cost with dry_run=True, then pass max_pairs={pairs} to confirm, or ask about "
                "each row's nearest rows only with candidates=k (default 10)"
            )
        return
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ConfigError(f'candidates= must be an int >= 1 or "all"; got {candidates!r}')


def merged(
    left: pd.DataFrame,
    right: pd.DataFrame,
    pairs: Sequence[tuple[int, int, float]],
    suffixes: tuple[str, str],
) -> pd.DataFrame:
    """The matched pairs as one frame, pandas ``merge`` style, with both indexes as columns."""
    left_rows = [i for i, _, _ in pairs]
    right_rows = [j for _, j, _ in pairs]
    left_part = left.iloc[left_rows].reset_index(drop=True)
    right_part = right.iloc[right_rows].reset_index(drop=True)
    clash = set(left_part.columns) & set(right_part.columns)
    left_part = left_part.rename(columns={c: f"{c}{suffixes[0]}" for c in clash})
    right_part = right_part.rename(columns={c: f"{c}{suffixes[1]}" for c in clash})
    out = pd.concat([left_part, right_part], axis=1)
    out.insert(0, "right_index", right.index[right_rows])
    out.insert(0, "left_index", left.index[left_rows])
    out["similarity"] = [s for _, _, s in pairs]
    return out


def _unit(matrix: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
