"""Check and normalise JSON against a schema the catalog publishes (a pydantic model's),
for processes that have the schema but not the model: clients, the CLI."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema


def field_errors(schema: dict[str, Any], data: Any) -> list[tuple[str, str]]:
    """(field, message) for each thing wrong with `data`, the field as a dotted path (''
    for the whole value); a missing required field is named itself, not its parent, so a
    form can show the message beside it."""
    found = []
    for e in sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: [str(p) for p in e.path]):
        path = [str(p) for p in e.path]
        if e.validator == "required" and isinstance(e.instance, dict):
            missing = [r for r in e.validator_value if r not in e.instance]
            path += missing[:1]
        found.append((".".join(path), e.message))
    return found


def schema_errors(schema: dict[str, Any], data: Any, what: str) -> str | None:
    """What is wrong with `data`, field by field, or None if the schema accepts it."""
    errors = field_errors(schema, data)
    if not errors:
        return None
    return "; ".join(f"{field or what}: {message}" for field, message in errors)


def normalise(schema: dict[str, Any], data: Any) -> Any:
    """`data` (valid against `schema`, a pydantic model's JSON schema) as the model would
    store it: defaults filled, unknown keys dropped unless the schema allows them, integral
    floats as ints where it says integer. Defaults made by a `default_factory` are not in
    the schema, so the workflow's model fills those when the step reads its input."""
    return _Normaliser(schema).value(schema, data)


class _Normaliser:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.validator = jsonschema.Draft202012Validator(root)

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Follow local `$ref`s; keywords beside a `$ref` (pydantic puts `default` there)
        still apply."""
        while "$ref" in schema:
            target: Any = self.root
            for part in schema["$ref"].removeprefix("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def value(self, schema: dict[str, Any], data: Any) -> Any:
        schema = self.resolve(schema)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:  # the first alternative that accepts it, as pydantic's
                for option in schema[keyword]:  # smart unions do for these plain types
                    if self.validator.evolve(schema=option).is_valid(data):
                        return self.value(option, data)
                return data
        for part in schema.get("allOf", ()):
            data = self.value(part, data)
        if isinstance(data, dict):
            return self.object(schema, data)
        if isinstance(data, list):
            return self.array(schema, data)
        if isinstance(data, float) and data.is_integer() and "integer" in _types(schema):
            return int(data)
        return data

    def object(self, schema: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        properties: dict[str, Any] = schema.get("properties", {})
        # A model's schema omits additionalProperties when pydantic ignores extra keys.
        extra = schema.get("additionalProperties", "properties" not in schema)
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in properties:
                out[key] = self.value(properties[key], value)
            elif isinstance(extra, dict):
                out[key] = self.value(extra, value)
            elif extra is True:
                out[key] = value
        for key, option in properties.items():
            option = self.resolve(option)
            if key not in out and "default" in option:
                out[key] = copy.deepcopy(option["default"])
        return out

    def array(self, schema: dict[str, Any], data: list[Any]) -> list[Any]:
        positional: list[dict[str, Any]] = schema.get("prefixItems", [])
        rest = schema.get("items")
        return [self.value(positional[i], v) if i < len(positional)
                else self.value(rest, v) if isinstance(rest, dict) else v
                for i, v in enumerate(data)]


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type", ())
    return {kind} if isinstance(kind, str) else set(kind)
