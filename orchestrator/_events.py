"""Check an event before it is stored: a declared name, a payload its model accepts.

A sender learns at once that a payload is wrong (the field named), whether or not the run
has reached its wait, and nothing is stored then. Where the workflow's code is hosted its
pydantic model decides; elsewhere (a Client) the JSON schema the catalog publishes does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ._committer import MAX_INPUT_DEPTH, nesting_depth
from ._registry import Registry
from ._schemas import normalise, schema_errors


class InvalidEvent(ValueError):
    """An event a run will not accept (unknown name, payload its model refuses); nothing
    was stored."""


# The declared events of a workflow not hosted here: name -> payload JSON schema (None: any).
SchemaLookup = Callable[[str], dict[str, dict[str, Any] | None] | None]


class EventChecker:
    def __init__(self, registry: Registry, published: SchemaLookup | None = None) -> None:
        self.registry = registry
        self.published = published

    def check(self, workflow: str, name: str, payload: Any, max_payload: int) -> Any:
        """`payload` as the run will store it (validated and normalised, as JSON)."""
        if nesting_depth(payload) > MAX_INPUT_DEPTH:
            raise InvalidEvent(f"event {name!r}: payload nested deeper than "
                               f"{MAX_INPUT_DEPTH} levels")
        wf = self.registry.workflows.get(workflow)
        if wf is not None:
            declared: dict[str, Any] = dict(wf.event_models)
        else:
            schemas = self.published(workflow) if self.published else None
            if schemas is None:
                raise InvalidEvent(f"cannot check event {name!r}: workflow {workflow!r} is "
                                   f"neither hosted here nor published")
            declared = schemas
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise InvalidEvent(f"{workflow} receives no event {name!r}; it declares: {known}")
        checked = _by_model(name, declared[name], payload) if wf is not None else _by_schema(
            name, declared[name], payload)
        size = len(json.dumps(checked))
        if size > max_payload:
            raise InvalidEvent(f"event {name!r}: payload is {size} bytes of JSON, over the "
                               f"{max_payload}-byte limit (ORCHESTRATOR_MAX_PAYLOAD)")
        return checked


def _by_model(name: str, model: Any, payload: Any) -> Any:
    if model is None:
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidEvent(f"event {name!r}: payload is not JSON: {exc}") from None
        return payload
    if isinstance(payload, model):
        return payload.model_dump(mode="json")
    try:
        return model.model_validate(payload).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidEvent(f"event {name!r}: {_fields(exc)}") from None


def _by_schema(name: str, schema: dict[str, Any] | None, payload: Any) -> Any:
    if schema is None:
        return payload
    problems = schema_errors(schema, payload, "payload")
    if problems:
        raise InvalidEvent(f"event {name!r}: {problems}")
    return normalise(schema, payload)


def _fields(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}"
                     for e in exc.errors())
