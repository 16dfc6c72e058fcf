"""Reducers: how parallel branches that write the same state key are combined.

Declared on the state model, as LangGraph does:

    class State(BaseModel):
        logs: Annotated[list[str], reducer(operator.add)] = []
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Reducer:
    combine: Callable[[Any, Any], Any]


def reducer(combine: Callable[[Any, Any], Any]) -> Reducer:
    """Mark a state field as combinable: `combine(current, branch_value)` at a join."""
    if not callable(combine):
        raise ValueError("reducer() takes a function of (current, update)")
    return Reducer(combine)


def reducers_of(model: type[BaseModel]) -> dict[str, Callable[[Any, Any], Any]]:
    found = {}
    for name, field in model.model_fields.items():
        for meta in field.metadata:
            if isinstance(meta, Reducer):
                found[name] = meta.combine
    return found
