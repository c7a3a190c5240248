"""``extract`` and ``classify`` on the pandas side: check the options, write typed columns.

The accessor methods are thin calls into here. A run's answers come back as dicts of
checked fields (`core.endpoints._structured`); this module turns them into one column per field
with the dtype the schema implies, aligned by position with the caller's rows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._rows import RowResult
from nbtoolkit.core.endpoints import _providers as providers
from nbtoolkit.core.endpoints._base import Endpoint
from nbtoolkit.core.endpoints._schema import Field, StructuredSchema, label_schema, normalise
from nbtoolkit.core.endpoints._structured import STRUCTURED_CHOICES
from nbtoolkit.errors import ConfigError

DEFAULT_LABEL_COLUMN = "label"


def extraction_schema(schema: Any) -> StructuredSchema:
    """``schema=`` checked (see `nbtoolkit.core.endpoints._schema.normalise`)."""
    return normalise(schema)


def classification_schema(labels: Any, *, multi_label: bool, output: str) -> StructuredSchema:
    """The schema of ``classify``: one field, named ``output``, holding a label or a list."""
    if not isinstance(output, str) or not output:
        raise ConfigError(f"output= must be a non-empty column name; got {output!r}")
    if not isinstance(multi_label, bool):
        raise ConfigError(f"multi_label= must be True or False; got {multi_label!r}")
    return label_schema(label_values(labels), field=output, multi_label=multi_label)


def label_values(labels: Any) -> list[str]:
    """The labels as a list of distinct strings, from a list or an Enum class."""
    if isinstance(labels, type) and issubclass(labels, enum.Enum):
        values = [member.value for member in labels]
    elif isinstance(labels, str | bytes) or not isinstance(labels, Iterable):
        raise ConfigError(
            f'labels= must be a list of strings or an Enum, like ["pos", "neg"]; got {labels!r}'
        )
    else:
        values = list(labels)
    if len(values) < 2 or not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"labels= needs at least two non-empty strings; got {values!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"labels= has duplicates: {values!r}")
    return values


def classification_system(labels: Sequence[str], *, multi_label: bool) -> str:
    """The system message of a classification that has none of its own."""
    listed = ", ".join(labels)
    if multi_label:
        return f"Classify the user's text: give every label that applies, from: {listed}."
    return f"Classify the user's text: give the one label that fits best, from: {listed}."


def structured_endpoint(
    settings: ChatConfig,
    schema: StructuredSchema,
    *,
    structured: str,
    validation_retries: int,
) -> Endpoint:
    """The endpoint of one run (its provider's), its options checked.

    Raises:
        ConfigError: an unknown ``structured`` shape, a negative ``validation_retries``.
    """
    if structured not in STRUCTURED_CHOICES:
        raise ConfigError(
            f"structured= must be one of {list(STRUCTURED_CHOICES)}; got {structured!r}"
        )
    if (
        not isinstance(validation_retries, int)
        or isinstance(validation_retries, bool)
        or validation_retries < 0
    ):
        raise ConfigError(f"validation_retries= must be an int >= 0; got {validation_retries!r}")
    return providers.structured_endpoint(
        settings.resolved(),
        schema,
        structured=structured,  # type: ignore[arg-type]  # checked just above
        validation_retries=validation_retries,
    )


def fields_writer(
    frame: pd.DataFrame,
    fields: Sequence[Field],
    *,
    prefix: str | None,
    as_series: bool,
    option: str = "prefix",
) -> Callable[[Sequence[RowResult]], pd.DataFrame]:
    """Writes one typed column per field (named ``prefix + field``) next to ``frame``'s.

    ``as_series``: the output holds only the fields, with ``frame``'s index.

    Raises:
        ConfigError: a column name that is already taken (before anything is sent).
    """
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"prefix= must be a string; got {prefix!r}")
    names = [f"{prefix or ''}{field.name}" for field in fields]
    if not as_series:
        taken = [name for name in names if name in frame.columns]
        if taken:
            hint = "prefix='x_'" if option == "prefix" else "output='...'"
            raise ConfigError(
                f"column {taken[0]!r} already exists; pass {option}= to name the new "
                f"columns apart, e.g. {hint}"
            )

    def write(rows: Sequence[RowResult]) -> pd.DataFrame:
        values = [row.value if row.ok and isinstance(row.value, dict) else None for row in rows]
        columns = {
            name: typed_column(field, values) for name, field in zip(names, fields, strict=True)
        }
        if as_series:
            return pd.DataFrame(columns, index=frame.index)
        out = frame.copy(deep=False)
        for name, column in columns.items():
            out[name] = column  # arrays, not Series: placed by position, whatever the index
        return out

    return write


def typed_column(field: Field, answers: Sequence[dict[str, Any] | None]) -> Any:
    """One field of every answer as an array of the field's dtype; <NA> for a row without one."""
    present = [answer is not None for answer in answers]
    values = [answer.get(field.name) if answer is not None else None for answer in answers]
    if field.dtype == "category":
        return pd.Categorical(values, categories=_distinct(field.categories))
    if field.dtype != "object":
        try:
            return pd.array(values, dtype=field.dtype)  # type: ignore[call-overload]  # dtype from the schema
        except (TypeError, ValueError, OverflowError):
            pass  # an integer past int64, say: keep the values as they are
    cells = [value if ok else pd.NA for value, ok in zip(values, present, strict=True)]
    return pd.array(cells, dtype=object)


def _distinct(values: Iterable[Hashable]) -> list[Hashable]:
    return list(dict.fromkeys(values))
