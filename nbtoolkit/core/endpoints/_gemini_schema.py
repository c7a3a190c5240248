"""A JSON Schema in the form the Gemini API's ``responseSchema`` takes.

Gemini's Schema object is a subset of OpenAPI 3.0: no references, no ``additionalProperties``,
``const`` or ``$defs``, nullability as ``nullable``, types in capitals, string enums only. A
request with a keyword it does not know is a 400 for every row, so the schema is translated
once per run; the answers are still checked against the original schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbtoolkit.core.endpoints._schema import resolve_ref

__all__ = ["gemini_schema"]

# JSON Schema keywords Gemini's Schema object has (an OpenAPI 3.0 subset).
_KEPT = frozenset(
    {
        "description", "enum", "maxItems", "minItems", "minimum", "maximum", "minLength",
        "maxLength", "pattern", "title", "minProperties", "maxProperties",
    }
)  # fmt: skip
_FORMATS = frozenset({"date-time", "enum", "float", "double", "int32", "int64"})


def gemini_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON Schema in the form Gemini's ``responseSchema`` takes: references inlined,
    nullable types as ``nullable``, types in capitals, keywords it does not know (such as
    ``additionalProperties``, ``const``, ``$defs``) dropped or rewritten. Answers are still
    checked against the original schema."""
    converted: dict[str, Any] = _convert(schema, schema, depth=0)
    return converted


def _convert(node: Any, root: Mapping[str, Any], *, depth: int) -> Any:
    node = resolve_ref(node, root)
    if not isinstance(node, Mapping) or depth > 32:
        return {}
    out: dict[str, Any] = {key: node[key] for key in _KEPT if key in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    branches = node.get("anyOf") or node.get("oneOf")
    kind = node.get("type")
    if isinstance(branches, list):
        real = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
        if len(real) < len(branches):
            out["nullable"] = True
        if len(real) == 1:
            merged = _convert(real[0], root, depth=depth + 1)
            return {**merged, **{k: v for k, v in out.items() if k not in merged}}
        out["anyOf"] = [_convert(b, root, depth=depth + 1) for b in real]
        return out
    if isinstance(kind, list):
        if "null" in kind:
            out["nullable"] = True
        kind = next((k for k in kind if k != "null"), None)
    if isinstance(kind, str):
        out["type"] = kind.upper()
    if "enum" in out:
        values = [v for v in out["enum"] if v is not None]
        if None in out["enum"]:
            out["nullable"] = True
        if all(isinstance(v, str) for v in values):
            out["enum"], out["type"] = values, "STRING"
        else:
            del out["enum"]  # Gemini's enums are strings; the check still holds the values
    if isinstance(node.get("format"), str) and node["format"] in _FORMATS:
        out["format"] = node["format"]
    properties = node.get("properties")
    if isinstance(properties, Mapping):
        out["properties"] = {
            str(name): _convert(sub, root, depth=depth + 1) for name, sub in properties.items()
        }
        out["propertyOrdering"] = list(out["properties"])
        required = node.get("required")
        if isinstance(required, list):
            out["required"] = [name for name in required if name in out["properties"]]
    items = node.get("items")
    if isinstance(items, Mapping):
        out["items"] = _convert(items, root, depth=depth + 1)
    return out
