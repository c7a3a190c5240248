"""Batch files: the JSONL lines a batch is made of, and the result lines read back.

A line's ``body`` is the endpoint's payload byte for byte, the same bytes `complete` would
POST and hash into the cache key, so an answer bought in a batch is found by a later
`complete` and the other way round. Result lines are matched by ``custom_id`` (derived
from the cache key), never by position: output files come back in any order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbtoolkit.batch._provider import LineRead
from nbtoolkit.core._client import error_for_status
from nbtoolkit.core._rows import RowError
from nbtoolkit.core.endpoints._base import Answer, Endpoint, Item, Reask
from nbtoolkit.errors import ConfigError, NbToolkitError

# The Batch API's limits per input file.
MAX_LINES = 50_000
MAX_BYTES = 200 * 1000 * 1000


@dataclass(frozen=True, slots=True)
class Line:
    """One request line of a batch input file."""

    custom_id: str
    key: bytes  # the request's cache key
    model: str | None
    data: bytes  # the JSONL line, newline included


@dataclass(frozen=True, slots=True)
class LineResult:
    """What one result line says of its request."""

    answer: Answer | None
    error: RowError | None
    usage: Mapping[str, Any] | None
    label: str  # for the run's status counts: "200", "400", "batch_expired", ...


def custom_id(key: bytes) -> str:
    """A line's id: from its cache key, so the same request always has the same id."""
    return f"r-{key.hex()[:32]}"


def split(lines: Sequence[Line], *, max_lines: int, max_bytes: int) -> list[list[Line]]:
    """Lines in files the API accepts: one model per file, at most max_lines / max_bytes.

    Raises:
        ConfigError: one request alone is larger than ``max_bytes``.
    """
    by_model: dict[str | None, list[Line]] = {}
    for one in lines:
        by_model.setdefault(one.model, []).append(one)
    files: list[list[Line]] = []
    for group in by_model.values():
        current: list[Line] = []
        size = 0
        for one in group:
            if len(one.data) > max_bytes:
                raise ConfigError(
                    f"one request is {len(one.data):,} bytes, more than a batch file may hold "
                    f"({max_bytes:,}); send it with complete() instead"
                )
            if current and (len(current) >= max_lines or size + len(one.data) > max_bytes):
                files.append(current)
                current, size = [], 0
            current.append(one)
            size += len(one.data)
        if current:
            files.append(current)
    return files


def records(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a result file; a line that is not one is skipped."""
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def read_line(read: LineRead, item: Item | None, endpoint: Endpoint) -> LineResult:
    """One result record as an answer or a row error: a 200 through the endpoint's own
    ``parse``, an error status through the engine's error mapping."""
    if read.status == 200 and read.body is not None:
        return _parsed(read.body, item, endpoint)
    if read.status is not None:
        exc = error_for_status(read.status, read.body or "", {})
        label = str(read.status)
        return LineResult(None, RowError(type(exc).__name__, str(exc), read.status, 1), None, label)
    if read.error_code is not None:
        kind = "BatchExpired" if read.error_code == "batch_expired" else "BatchLineError"
        message = f"{read.error_code}: {read.error_message or 'no message'}"[:500]
        return LineResult(None, RowError(kind, message, None, 1), None, read.error_code)
    message = "the result line has neither a response nor an error"
    return LineResult(None, RowError("MalformedResponse", message, None, 1), None, "malformed")


def _parsed(body: str, item: Item | None, endpoint: Endpoint) -> LineResult:
    try:
        parsed = endpoint.parse(body, [item] if item is not None else [])
    except NbToolkitError as exc:
        return LineResult(None, RowError(type(exc).__name__, str(exc), 200, 1), None, "200")
    outcome = parsed.outcomes[0]
    if isinstance(outcome, Answer):
        return LineResult(outcome, None, parsed.usage, "200")
    # A re-ask needs another request: the row fails here and stays uncached, so a later
    # complete() asks again.
    error = outcome.error if isinstance(outcome, Reask) else outcome
    return LineResult(None, RowError(type(error).__name__, str(error), 200, 1), parsed.usage, "200")
