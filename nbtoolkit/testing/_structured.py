"""The test server's structured output: a schema in the request gets an instance of it.

`ChatServer` calls in here for every request. A request that carries a JSON Schema (in
``response_format``, as ``json_schema`` or as ``json_object`` + ``schema``, or in a system
message in prompt mode) is answered with `schema_instance`: a valid instance, derived from
the row's text so that answers differ per row and a test can compute what each row should
get. `StructuredFaults` scripts what goes wrong: first answers that break the schema, rows
whose every answer does, refusals, truncation, and llama.cpp's HTTP 500 for ``json_schema``.

The row's text is the *first* user message: a re-ask appends the model's answer and a new
user message, and must still be answered for the same row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from nbtoolkit.core.endpoints._schema import resolve_ref

__all__ = ["StructuredFaults", "schema_instance"]

BREAKS = ("bad_json", "missing_field", "wrong_type")
# What llama-cpp-python's server answers to response_format type json_schema (HTTP 500).
LLAMA_CPP_REFUSAL = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', "
    "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}"
)


@dataclass(frozen=True, kw_only=True)
class StructuredFaults:
    """How the test server's answers to a schema go wrong.

    Args:
        invalid_rate: the share of rows whose first answer breaks the schema (bad JSON, a
            missing field or a wrong type, picked per row); the answer to a re-ask is valid.
        always_invalid: rows (their text) whose every answer breaks the schema.
        refuse: rows the model refuses (``message.refusal``, no content).
        truncate: rows whose answer is cut at max_tokens (``finish_reason: "length"``).
        reject_json_schema: answer ``response_format`` type ``json_schema`` with HTTP 500,
            as llama.cpp's Python server does (it takes ``json_object`` + ``schema``).
        reject_json_schema_for: models whose ``json_schema`` requests get OpenAI's HTTP 400
            "'json_schema' is not supported with this model" (a gateway with several models).
        refuse_keywords: schema keywords refused in a ``response_format`` schema, with
            OpenAI strict mode's HTTP 400 "Invalid schema for response_format ...: In
            context=(...), 'minLength' is not permitted."
        seed: changes which rows ``invalid_rate`` picks.
    """

    invalid_rate: float = 0.0
    always_invalid: frozenset[str] = frozenset()
    refuse: frozenset[str] = frozenset()
    truncate: frozenset[str] = frozenset()
    reject_json_schema: bool = False
    reject_json_schema_for: frozenset[str] = frozenset()
    refuse_keywords: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.invalid_rate <= 1.0:
            raise ValueError(f"invalid_rate must be in [0, 1], got {self.invalid_rate}")

    def breaks_first_answer(self, row: str) -> str | None:
        """How the first answer for ``row`` breaks the schema, or None."""
        draw = _draw(f"{self.seed}\0{row}")
        if draw >= self.invalid_rate:
            return None
        return BREAKS[_number(f"break\0{self.seed}\0{row}") % len(BREAKS)]


class Shaped(NamedTuple):
    """A structured reply: its content (None for a refusal) and how it ended."""

    text: str | None
    finish_reason: str = "stop"
    refusal: str | None = None


class Refusal(NamedTuple):
    """An error reply to a request the server will not take."""

    status: int
    message: str
    type: str


def rejection(body: Mapping[str, Any], faults: StructuredFaults | None) -> Refusal | None:
    """The error reply for a request this server will not take, or None."""
    rf = body.get("response_format")
    if faults is None or not isinstance(rf, Mapping):
        return None
    kind = rf.get("type")
    if kind == "json_schema" and faults.reject_json_schema:
        return Refusal(500, LLAMA_CPP_REFUSAL, "internal_server_error")
    if kind == "json_schema" and body.get("model") in faults.reject_json_schema_for:
        message = (
            "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
            "with this model."
        )
        return Refusal(400, message, "invalid_request_error")
    schema = request_schema(rf, [])
    found = _refused_keyword(schema, faults.refuse_keywords, ()) if schema else None
    if found is not None:
        keyword, context = found
        inner = rf.get("json_schema")
        name = inner.get("name") if isinstance(inner, Mapping) else "schema"
        message = (
            f"Invalid schema for response_format '{name}': In context={context!r}, "
            f"'{keyword}' is not permitted."
        )
        return Refusal(400, message, "invalid_request_error")
    return None


def _refused_keyword(
    schema: Any, refused: frozenset[str], context: tuple[str, ...]
) -> tuple[str, tuple[str, ...]] | None:
    """The first refused keyword in ``schema`` and where it is, as OpenAI says it."""
    if not isinstance(schema, Mapping) or not refused:
        return None
    for key in schema:
        if key in refused:
            return str(key), context
    for key, value in schema.items():
        if key in ("properties", "$defs") and isinstance(value, Mapping):
            for name, sub in value.items():
                found = _refused_keyword(sub, refused, (*context, str(key), str(name)))
                if found is not None:
                    return found
        elif key == "items":
            found = _refused_keyword(value, refused, (*context, "items"))
            if found is not None:
                return found
    return None


def answer(body: Mapping[str, Any], faults: StructuredFaults | None) -> Shaped | None:
    """The reply to a request with a schema; None when the request has none."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    schema = request_schema(body.get("response_format"), messages)
    if schema is None:
        return None
    user_turns = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "user")
    reasked = any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages)
    row = _first_user_text(messages)
    return shaped(schema, row, reasked=reasked, user_turns=user_turns, faults=faults)


def shaped(
    schema: Mapping[str, Any],
    row: str,
    *,
    reasked: bool,
    user_turns: int,
    faults: StructuredFaults | None,
) -> Shaped:
    """The answer to ``row`` under ``schema``, gone wrong as ``faults`` say.

    Args:
        reasked: the request carries an earlier answer (a re-ask), which gets a valid one.
        user_turns: the user messages so far: which break an always-invalid row gets.
    """
    faults = faults or StructuredFaults()
    if row in faults.refuse:
        return Shaped(None, refusal="I can't help with that.")
    instance = schema_instance(schema, row)
    text = json.dumps(instance)
    if row in faults.truncate:
        return Shaped(text[: len(text) // 2], finish_reason="length")
    if row in faults.always_invalid:
        return Shaped(broken(instance, BREAKS[(user_turns - 1) % len(BREAKS)], schema))
    how = None if reasked else faults.breaks_first_answer(row)
    return Shaped(text if how is None else broken(instance, how, schema))


def request_schema(response_format: Any, messages: list[Any]) -> dict[str, Any] | None:
    """The JSON Schema a request asks its answer to follow, wherever it travels."""
    if isinstance(response_format, Mapping):
        if response_format.get("type") == "json_schema":
            inner = response_format.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, Mapping) else None
        else:
            schema = response_format.get("schema")
        return dict(schema) if isinstance(schema, Mapping) else None
    for message in messages:  # prompt mode: a JSON Schema inside a system message
        content = message.get("content") if isinstance(message, Mapping) else None
        if message.get("role") == "system" and isinstance(content, str) and "{" in content:
            try:
                found, _ = json.JSONDecoder().raw_decode(content[content.index("{") :])
            except ValueError:
                continue
            if isinstance(found, dict) and "properties" in found:
                return found
    return None


def schema_instance(schema: Mapping[str, Any], row: str) -> Any:
    """A valid instance of ``schema`` that depends only on the schema and the row's text.

    Strings are ``"<field>: <row>"`` (cut to 60 characters), integers fall in
    [minimum, maximum] (default 1-5), booleans and enum values are picked by a hash of the
    row and the field, arrays hold one or two items, and an optional field gets a value.
    """
    return _instance(schema, schema, row, "value")


def _instance(schema: Any, root: Mapping[str, Any], row: str, name: str) -> Any:
    schema = resolve_ref(schema, root)
    if not isinstance(schema, Mapping):
        return None
    pick = _number(f"{name}\0{row}")
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        choices = [v for v in schema["enum"] if v is not None] or [None]
        return choices[pick % len(choices)]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            real = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
            return _instance((real or branches)[0], root, row, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):  # Gemini's responseSchema spells types in capitals
        kind = kind.lower()
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {key: _instance(sub, root, row, key) for key, sub in properties.items()}
    if kind == "array":
        items = schema.get("items", {})
        if isinstance(items, Mapping) and "enum" in resolve_ref(items, root):
            choices = list(resolve_ref(items, root)["enum"])
            first = choices[pick % len(choices)]
            second = choices[(pick // 7) % len(choices)]
            return [first] if first == second else [first, second]
        return [_instance(items, root, row, f"{name}[{i}]") for i in range(1 + pick % 2)]
    if kind == "integer" or kind == "number":
        low = schema.get("minimum")
        high = schema.get("maximum")
        low = (
            low
            if isinstance(low, int | float)
            else (high - 4 if isinstance(high, int | float) else 1)
        )
        high = high if isinstance(high, int | float) else low + 4
        value = int(low) + pick % (int(high) - int(low) + 1)
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return pick % 2 == 0
    if kind == "null":
        return None
    return f"{name}: {row}"[:60]


def broken(instance: Any, how: str, schema: Mapping[str, Any] | None = None) -> str:
    """``instance`` as an answer that breaks its schema in the way ``how`` names."""
    text = json.dumps(instance)
    if how == "bad_json" or not isinstance(instance, dict) or not instance:
        return "Sure! " + text[:-1]
    first = next(iter(instance))
    if how == "missing_field":
        return json.dumps({k: v for k, v in instance.items() if k != first})
    # A label field gets a word that is no label; anything else a value of the wrong type.
    wrong: Any = {"wrong": "type"} if isinstance(instance[first], str | int | float) else "wrong"
    if isinstance(schema, Mapping):
        field = resolve_ref((schema.get("properties") or {}).get(first), schema)
        if isinstance(field, Mapping) and ("enum" in field or "enum" in field.get("items", {})):
            wrong = "not one of the labels"
    return json.dumps({**instance, first: wrong})


def _first_user_text(messages: list[Any]) -> str:
    for message in messages:
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _number(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _draw(text: str) -> float:
    return _number(text) / 2.0**64
