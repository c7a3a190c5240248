"""What each row sends: its text from a column or a ``str.format`` template over the columns.

A missing or blank value sends nothing (the row's result is None, status ``skipped``); a
template with a hole in any of its fields sends nothing either, since the prompt would be
misleading.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.core._rows import ChatRequest
from nbtoolkit.errors import ConfigError


def row_prompts(
    frame: pd.DataFrame, column: str | None, template: str | None, *, as_series: bool
) -> pd.Series:
    """One prompt (or None: nothing to send) per row, from a column or a template.

    Args:
        frame: the rows.
        column: the column whose text is sent.
        template: instead, a template over the columns (``"Review: {review}"``).
        as_series: the frame is a Series' (its one column is the default ``column``, and a
            template may be given with it).

    Raises:
        ConfigError: neither or (for a DataFrame) both given; a column not in the frame; a
            template that names no plain column or cannot format a value.
    """
    if template is None and column is None:
        raise ConfigError("say what to send: a column name, or template='... {column} ...'")
    if template is not None and column is not None and not as_series:
        raise ConfigError("pass either a column or a template, not both")
    return _template_prompts(frame, template) if template else _column_prompts(frame, column)


def chat_requests(prompts: pd.Series, system: str | None) -> Iterator[ChatRequest | None]:
    """One chat request per prompt (None where there is nothing to send)."""
    system_message = ({"role": "system", "content": system},) if system else ()
    for prompt in prompts:
        if prompt is None:
            yield None
        else:
            yield ChatRequest((*system_message, {"role": "user", "content": prompt}))


def _column_prompts(frame: pd.DataFrame, column: str | None) -> pd.Series:
    values = _column(frame, column)
    # The usual cell, a non-blank str, taken as it is without a call (100,000 rows: 100,000
    # calls); everything else as _as_prompt says.
    prompts = [v if type(v) is str and v and not v.isspace() else _as_prompt(v) for v in values]
    return pd.Series(prompts, index=frame.index, dtype=object)


def _template_prompts(frame: pd.DataFrame, template: str) -> pd.Series:
    fields = _template_fields(template)
    pieces = list(string.Formatter().parse(template))
    columns = [_column(frame, name) for name in fields]
    prompts: list[str | None] = []
    for row in zip(*columns, strict=True) if columns else ((),) * len(frame):
        if any(_is_missing(value) for value in row):
            prompts.append(None)  # a hole in the data would make a misleading prompt
        else:
            prompts.append(_format_row(pieces, dict(zip(fields, row, strict=True))))
    return pd.Series(prompts, index=frame.index, dtype=object)


def _format_row(
    pieces: list[tuple[str, str | None, str | None, str | None]], values: Mapping[str, Any]
) -> str:
    """``template.format_map(values)`` on the raw values (so ``{price:.2f}`` works), with an
    error that names the field and the value it could not format."""
    out: list[str] = []
    formatter = string.Formatter()
    for literal, field, spec, conversion in pieces:
        out.append(literal)
        if field is None:
            continue
        value = values[field]
        try:
            if conversion:
                value = formatter.convert_field(value, conversion)
            out.append(format(value, spec or ""))
        except (ValueError, TypeError) as exc:
            shown = f"!{conversion}" if conversion else ""
            shown += f":{spec}" if spec else ""
            raise ConfigError(
                f"template field {{{field}{shown}}} cannot format the value {value!r}: {exc}"
            ) from exc
    return "".join(out)


def _template_fields(template: str) -> list[str]:
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"template is not a valid format string: {exc}") from exc
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise ConfigError("template fields must name columns, like {review}; got '{}'")
        if any(mark in field_name for mark in ".["):
            raise ConfigError(f"template field {{{field_name}}} must be a plain column name")
        if field_name not in fields:
            fields.append(field_name)
    return fields


def _column(frame: pd.DataFrame, name: str | None) -> Sequence[Any]:
    if name not in frame.columns:
        raise ConfigError(f"column {name!r} not found; columns are {list(frame.columns)}")
    values = frame[name]
    if isinstance(values, pd.DataFrame):
        raise ConfigError(f"column {name!r} appears {values.shape[1]} times; rename the duplicates")
    # object dtype: categoricals give their labels, missing values stay recognisable.
    return list(values.astype(object))


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-likes: not a missing scalar
        return False


def _as_prompt(value: Any) -> str | None:
    """The user message for one cell: None (nothing sent) for missing or blank values."""
    if type(value) is str:  # the usual cell, never missing: no pd.isna (a 100,000-row cost)
        return value if value.strip() else None
    if _is_missing(value):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None
