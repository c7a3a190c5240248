"""What ``schema=`` may be, how it is sent, how an answer is checked, and each field's dtype.

A schema comes in one of three forms and leaves as one `StructuredSchema`:

    a pydantic model class          validated by pydantic
    {"sent": Literal["a"], "n": int}  a mapping of field -> type: made a pydantic model
    a JSON Schema dict (an object)  validated by the ``jsonschema`` package

What the server gets is the *strict* form of its JSON Schema (OpenAI's structured-output
rules: ``additionalProperties: false`` and every property required, optional ones nullable),
which llama.cpp also turns into a grammar. Nothing here knows pandas: a field's dtype is a
name (``"Int64"``) and, for enums, the allowed values.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbtoolkit.core.endpoints._jsonschema_import import jsonschema_module
from nbtoolkit.errors import ConfigError

if TYPE_CHECKING:  # both are imported by the first schema that needs them, not at import
    import jsonschema
    import pydantic

# An answer wrapped in a Markdown code fence (models in prompt mode like to): the JSON inside.
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*)\n\s*```\s*$", re.DOTALL)
_JSON_TYPES = {"string": "string", "integer": "Int64", "number": "Float64", "boolean": "boolean"}
# Keywords whose value is one subschema, a list of them, or a name -> subschema mapping.
_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_NAMED = ("properties", "$defs", "definitions", "patternProperties")


class AnswerMismatch(Exception):
    """An answer that is not valid JSON or does not match the schema; the message says why."""


@dataclass(frozen=True)
class Field:
    """One top-level field of the schema and the dtype of its column."""

    name: str
    dtype: str  # "string", "Int64", "Float64", "boolean", "category" or "object"
    categories: tuple[Any, ...] = ()  # for "category": the allowed values, in schema order


@dataclass(frozen=True)
class StructuredSchema:
    """A checked schema: its strict JSON Schema, its fields, and the answer validator."""

    name: str  # response_format's json_schema.name
    strict: dict[str, Any]  # the JSON Schema sent to the server
    fields: tuple[Field, ...]
    # The answer text -> its checked fields, as plain JSON values; raises AnswerMismatch.
    check: Callable[[str], dict[str, Any]]


def normalise(schema: Any) -> StructuredSchema:
    """Check ``schema`` and return what a run needs of it.

    Args:
        schema: a pydantic model class, a JSON Schema dict whose top level is an object, or
            a mapping of field name to Python type (``{"stars": int}``).

    Returns:
        The schema's strict JSON Schema, its top-level fields with their dtypes, and a
        validator for answers.

    Raises:
        ConfigError: anything else, or a schema that is not a valid object schema.
    """
    if isinstance(schema, type) and _is_pydantic_model(schema):
        return _from_model(schema)
    if isinstance(schema, Mapping) and schema:
        if all(_is_type(value) for value in schema.values()):
            return _from_model(_model_of_types(schema))
        return _from_json_schema(schema)
    raise ConfigError(
        "schema= must be a pydantic model class, a JSON Schema dict with "
        '"type": "object", or a mapping of field name to type like {"stars": int}; '
        f"got {_shown(schema)}"
    )


def label_schema(labels: Sequence[str], *, field: str, multi_label: bool) -> StructuredSchema:
    """The schema of a classification: one field holding a label (or a list of labels)."""
    label = {"type": "string", "enum": list(labels)}
    value = {"type": "array", "items": label} if multi_label else label
    schema = {
        "title": "classification",
        "type": "object",
        "properties": {field: value},
        "required": [field],
    }
    return _from_json_schema(schema)


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` made strict-compatible: closed objects, every property required, the
    optional ones nullable, and no ``default`` (strict mode refuses it)."""
    strict: dict[str, Any] = _strict(schema)
    return strict


def _strict(node: Any) -> Any:
    if not isinstance(node, Mapping):
        return node
    out = {key: value for key, value in node.items() if key != "default"}
    for key in _ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = _strict(out[key])
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [_strict(sub) for sub in out[key]]
    for key in _NAMED:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _strict(sub) for name, sub in out[key].items()}
    if out.get("type") == "object" or isinstance(out.get("properties"), Mapping):
        properties = out.get("properties") or {}
        required = set(out.get("required") or ())
        out["properties"] = {
            name: sub if name in required else _nullable(sub) for name, sub in properties.items()
        }
        out["required"] = list(properties)
        out["additionalProperties"] = False
    return out


def _nullable(schema: Any) -> Any:
    if _allows_null(schema):
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _allows_null(schema: Any) -> bool:
    if not isinstance(schema, Mapping):
        return True
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    branches = schema.get("anyOf") or schema.get("oneOf") or ()
    return any(isinstance(b, Mapping) and b.get("type") == "null" for b in branches)


def _is_pydantic_model(schema: type) -> bool:
    # A pydantic model class can only exist once pydantic is imported: no need to import it.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and issubclass(schema, pydantic.BaseModel)


def _from_model(model: type[pydantic.BaseModel]) -> StructuredSchema:
    import pydantic

    try:
        raw = model.model_json_schema()
    except (pydantic.PydanticUserError, TypeError, ValueError) as exc:
        raise ConfigError(f"schema {model.__name__} has no JSON Schema: {exc}") from exc
    if raw.get("type") != "object" or not raw.get("properties"):
        raise ConfigError(f"schema {model.__name__} must describe an object with fields")
    strict = strict_schema(raw)
    optional = frozenset(raw["properties"]) - frozenset(raw.get("required", ()))

    def check(text: str) -> dict[str, Any]:
        data = _object(text)
        # Strict mode sends an optional field as null: absent, so its default applies.
        for name in optional:
            if name in data and data[name] is None:
                del data[name]
        try:
            return model.model_validate(data).model_dump(mode="json")
        except pydantic.ValidationError as exc:
            raise AnswerMismatch(_pydantic_message(exc)) from None

    return StructuredSchema(_name(model.__name__), strict, _fields(strict), check)


def _model_of_types(schema: Mapping[Any, Any]) -> type[pydantic.BaseModel]:
    import pydantic

    definitions: dict[str, Any] = {}
    for name, kind in schema.items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ConfigError(
                f"schema field {name!r} must be a name like 'stars' (letters, digits, _; "
                "not starting with _); use a JSON Schema dict for other names"
            )
        definitions[name] = (kind, ...)
    try:
        model: type[pydantic.BaseModel] = pydantic.create_model("extraction", **definitions)
        model.model_json_schema()
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as exc:
        raise ConfigError(f"schema has a type pydantic cannot describe: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"schema has a type pydantic cannot use: {exc}") from exc
    return model


def _from_json_schema(schema: Mapping[Any, Any]) -> StructuredSchema:
    raw = _plain_schema(schema)
    if raw.get("type") != "object" or not isinstance(raw.get("properties"), Mapping):
        raise ConfigError(
            'a JSON Schema for schema= must have "type": "object" and "properties" '
            f"(one column per property); got {_shown(schema)}"
        )
    if not raw["properties"]:
        raise ConfigError("schema has no properties: there would be no column to fill")
    jsonschema = jsonschema_module()
    validator_class = jsonschema.validators.validator_for(
        raw, default=jsonschema.Draft202012Validator
    )
    try:
        validator_class.check_schema(raw)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"schema is not a valid JSON Schema: {exc.message}") from exc
    strict = strict_schema(raw)
    # The answer is checked against the schema as sent (strict): what the model was asked.
    validator = validator_class(strict)

    def check(text: str) -> dict[str, Any]:
        data = _object(text)
        errors = list(itertools.islice(validator.iter_errors(data), 20))
        if errors:
            errors.sort(key=jsonschema.exceptions.relevance)
            raise AnswerMismatch("; ".join(_jsonschema_message(e) for e in errors[:5]))
        return data

    title = raw.get("title")
    name = _name(title) if isinstance(title, str) else "extraction"
    return StructuredSchema(name, strict, _fields(strict), check)


def _plain_schema(schema: Mapping[Any, Any]) -> dict[str, Any]:
    try:
        plain = json.loads(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"schema cannot be sent as JSON: {exc}") from exc
    if not isinstance(plain, dict):
        raise ConfigError(f"schema must be an object schema; got {_shown(schema)}")
    return plain


def unfenced(text: str) -> str:
    """The text inside a Markdown code fence (```json ... ```), or the text as it is."""
    fenced = _FENCE.match(text)
    return fenced.group(1) if fenced else text


def _object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(unfenced(text))
    except ValueError as exc:
        raise AnswerMismatch(f"the answer is not valid JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise AnswerMismatch(f"the answer must be a JSON object, got {type(data).__name__}")
    return data


def _fields(strict: Mapping[str, Any]) -> tuple[Field, ...]:
    return tuple(_field(name, sub, strict) for name, sub in strict["properties"].items())


def _field(name: str, schema: Any, root: Mapping[str, Any]) -> Field:
    schema = resolve_ref(_without_null(resolve_ref(schema, root)), root)
    if not isinstance(schema, Mapping):
        return Field(name, "object")
    if "enum" in schema:
        return Field(name, "category", tuple(v for v in schema["enum"] if v is not None))
    if "const" in schema:
        return Field(name, "category", (schema["const"],))
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return Field(name, _JSON_TYPES.get(kind, "object") if isinstance(kind, str) else "object")


def _without_null(schema: Any) -> Any:
    """The one non-null branch of ``anyOf: [X, null]`` (an optional field), else as is."""
    if isinstance(schema, Mapping):
        branches = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(branches, list):
            rest = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
            if len(rest) == 1:
                return rest[0]
    return schema


def resolve_ref(schema: Any, root: Mapping[str, Any]) -> Any:
    """A local ``{"$ref": "#/$defs/Name"}`` replaced by what it points to."""
    for _ in range(8):  # a chain of references, never a loop
        ref = schema.get("$ref") if isinstance(schema, Mapping) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        schema = target
    return schema


def _is_type(value: Any) -> bool:
    """A Python type or typing form (``int``, ``Literal["a"]``, ``list[str]``, ``int | None``)."""
    return (
        isinstance(value, type | types.UnionType)
        or typing.get_origin(value) is not None
        or value is Any
    )


def _jsonschema_message(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    return f"at '{where}': {error.message}" if where else error.message


def _pydantic_message(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _name(text: str) -> str:
    """A response_format name: letters, digits, _ and -, at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64] or "extraction"


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:200]
